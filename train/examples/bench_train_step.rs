//! Rust side of bench/train_step.sh: a GPT-B c2i training step (256 tokens, batch 2, forward +
//! backward + clip + AdamW, official dropouts) and KV-cache sampling with CFG, on the CPU.
//!
//!   cargo run --profile bench-opt -p llamagen-train --example bench_train_step -- 3 256
//!
//! Arguments: timed repeats (after one warm-up step), sampled tokens. Prints one JSON object.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use llamagen_train::checkpoint::{new_trainable, seeded_init};
use llamagen_train::optim::{AdamW, AdamWConfig};
use llamagen_train::sample::{SamplingConfig, generate};
use llamagen_train::train::{Batch, step_rng, train_step};
use llamagen_train::{Condition, GptConfig, GptSize};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As the `llamagen` binary does (llamagen_kernels::alloc).
    llamagen_kernels::alloc::reuse_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let sample_tokens: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let dev = Device::Cpu;
    let cfg = GptConfig::c2i(GptSize::B, 256);
    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &cfg, &dev)?;
    seeded_init(&varmap, &cfg, 0)?;
    let mut opt = AdamW::for_gpt(&varmap, &cfg, AdamWConfig::default())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let z: Vec<u32> = (0..2 * 256).map(|_| rng.random_range(0..16384)).collect();
    let batch = Batch {
        cond: Condition::Class(Tensor::new(&[207u32, 360], &dev)?),
        tokens: Tensor::from_vec(z, (2, 256), &dev)?,
        mask: None,
        valid: None,
    };
    let mut times = Vec::new();
    for step in 0..=repeats as u64 {
        let mut r = step_rng(0, step);
        let t = std::time::Instant::now();
        train_step(
            &model,
            &mut opt,
            std::slice::from_ref(&batch),
            1.0,
            Some(&mut r),
            step + 1,
        )?;
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    // Where one step's time goes: forward + loss, backward, gradient norm, AdamW (clipped).
    let t = std::time::Instant::now();
    let mut r = step_rng(0, 99);
    let loss = llamagen_train::train::batch_loss(
        &model,
        &batch,
        Some(llamagen_train::gpt::Dropout::new(&mut r)),
    )?;
    let t_fwd = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let grads = loss.backward()?;
    let t_bwd = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let refs: Vec<_> = vars.iter().collect();
    let norm = llamagen_train::optim::grad_norm(&grads, &refs)?;
    let t_clip = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    // As train_step: the clipping factor is applied inside the update.
    opt.step_scaled(&grads, llamagen_train::optim::clip_factor(norm, 1.0))?;
    let t_adam = t.elapsed().as_secs_f64();
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let sc = SamplingConfig {
        cfg_scale: 4.0,
        ..SamplingConfig::default()
    };
    let t = std::time::Instant::now();
    let toks = generate(
        &model,
        &Condition::Class(Tensor::new(&[207u32], &dev)?),
        None,
        sample_tokens,
        &sc,
        &mut rng,
    )?;
    let st = t.elapsed().as_secs_f64();
    println!(
        "{{\"impl\": \"llamagen (candle)\", \"params\": {}, \"step_s\": {median}, \"step_s_all\": {times:?}, \"forward_s\": {t_fwd}, \"backward_s\": {t_bwd}, \"clip_s\": {t_clip}, \"adamw_s\": {t_adam}, \"sample_tokens\": {}, \"sample_s\": {st}, \"sample_tokens_per_s\": {}}}",
        cfg.num_parameters(),
        toks.dim(1)?,
        toks.dim(1)? as f64 / st
    );
    Ok(())
}
