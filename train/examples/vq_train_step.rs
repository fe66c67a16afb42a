//! Times VQ tokenizer training steps on random weights (see bench/vq_train_step.sh):
//! `vq_train_step REPEATS IMAGE_SIZE BATCH` prints one JSON line.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use llamagen_encode::vq::ModelArgs;
use llamagen_train::vq_train::{
    DiscConfig, LossConfig, Lpips, VqOptimConfig, VqStepConfig, VqTrainer, init_vq_tensors,
};

/// The benchmark configuration (the same in bench/vq_train_step_torch.py): the reduced VQ
/// (ch 32, ch_mult [1, 2, 2], z 16, 64 × 8 codebook), the official discriminator and VGG16 widths.
fn args() -> ModelArgs {
    ModelArgs::reduced()
}

fn main() -> anyhow::Result<()> {
    // As the `llamagen` binary does (llamagen_kernels::alloc).
    llamagen_kernels::alloc::reuse_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    let repeats: usize = a.get(1).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let size: usize = a.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let batch: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let dev = Device::Cpu;
    let widths = [64usize, 128, 256, 512, 512];
    let convs = [2usize, 2, 3, 3, 3];
    let idx = llamagen_train::vq_train::lpips::VGG16_CONV_INDICES;
    let mut vgg = HashMap::new();
    let mut lin = HashMap::new();
    let (mut cin, mut k) = (3usize, 0usize);
    for (s, (&w, &n)) in widths.iter().zip(&convs).enumerate() {
        for _ in 0..n {
            let std = (2.0 / (9.0 * cin as f64)).sqrt();
            vgg.insert(
                format!("features.{}.weight", idx[k]),
                (Tensor::randn(0f32, 1f32, (w, cin, 3, 3), &dev)? * std)?,
            );
            vgg.insert(
                format!("features.{}.bias", idx[k]),
                Tensor::zeros(w, candle_core::DType::F32, &dev)?,
            );
            cin = w;
            k += 1;
        }
        lin.insert(
            format!("lin{s}.model.1.weight"),
            Tensor::rand(0f32, 0.2f32, (1, w, 1, 1), &dev)?,
        );
    }
    let lpips = Lpips::from_tensors(
        &vgg,
        Path::new("random"),
        &lin,
        Path::new("random"),
        true,
        &dev,
    )?;
    let cfg = VqStepConfig {
        model: args(),
        disc: DiscConfig::default(),
        loss: LossConfig {
            disc_start: 0,
            ..LossConfig::default()
        },
        optim: VqOptimConfig::default(),
        seed: 0,
    };
    let tensors = init_vq_tensors(&cfg.model, 0, &dev)?;
    let mut t = VqTrainer::from_tensors(&cfg, &tensors, None, lpips, &dev)?;
    let x = Tensor::rand(-1f32, 1f32, (batch, 3, size, size), &dev)?;
    t.step(&x)?; // warm-up
    let mut times = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        t.step(&x)?;
        times.push(start.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({"impl": "llamagen", "image_size": size, "batch": batch, "step_s": times})
    );
    Ok(())
}
