//! llamagen side of bench/vq_encode.sh: VQ-16 encode of 256 px images with random weights of the
//! real config; prints one JSON line. Arguments: REPEATS BATCH.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use llamagen_encode::{ModelArgs, VqModel};

fn main() -> anyhow::Result<()> {
    // As the `llamagen` binary does (llamagen_kernels::alloc).
    llamagen_kernels::alloc::reuse_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let repeats: usize = args.get(1).map_or(Ok(3), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let dev = Device::Cpu;
    // Random weights, then loaded as plain tensors the way checkpoints are (no gradient
    // tracking, as in the encode stage).
    let varmap = VarMap::new();
    VqModel::load(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &ModelArgs::vq_16(),
    )?;
    let weights: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let model = VqModel::load(
        VarBuilder::from_tensors(weights, DType::F32, &dev),
        &ModelArgs::vq_16(),
    )?;
    let x = Tensor::rand(-1f32, 1f32, (batch, 3, 256, 256), &dev)?;
    model.encode_indices(&x)?; // warm-up
    let (mut step, mut enc) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let t0 = Instant::now();
        let h = model.quant_conv().forward(&model.encoder().forward(&x)?)?;
        let t1 = t0.elapsed().as_secs_f64();
        let q = model.quantize().forward(&h)?;
        let _ = q.indices.to_vec1::<u32>()?;
        step.push(t0.elapsed().as_secs_f64());
        enc.push(t1);
    }
    let best = step.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{}",
        serde_json::json!({
            "impl": "llamagen (candle CPU)", "image_size": 256, "batch": batch,
            "step_s": step, "encoder_s": enc, "images_per_s": batch as f64 / best,
        })
    );
    Ok(())
}
