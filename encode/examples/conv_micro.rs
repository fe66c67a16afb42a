use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for (c, o, hw, b) in [(128usize, 128usize, 256usize, 4usize), (512, 512, 16, 4), (256, 256, 64, 4)] {
        let x = Tensor::randn(0f32, 1., (b, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 1., (o, c, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1., o, &dev)?;
        llamagen_encode::conv::conv2d_bias(&x, &w, Some(&bias), 1, 1)?;
        let t = Instant::now();
        for _ in 0..3 { llamagen_encode::conv::conv2d_bias(&x, &w, Some(&bias), 1, 1)?; }
        let s = t.elapsed().as_secs_f64() / 3.0;
        let gf = 2.0 * (c * 9 * o * hw * hw * b) as f64 / 1e9;
        println!("c{c} o{o} {hw}x{hw} b{b}: {s:.3} s, {:.1} GFLOP/s", gf / s);
    }
    Ok(())
}
