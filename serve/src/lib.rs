//! `llamagen serve`: an HTTP image-generation server for LlamaGen GPTs.
//!
//! - [`server`]: axum routes (`POST /v1/generate`, `GET /health`, `GET /metrics`) and the
//!   SIGTERM drain.
//! - [`api`]: request parsing and validation (refusals name their field).
//! - [`engine`]: the bounded queue, the continuous-batching scheduler over a paged KV cache
//!   (`llamagen_train::sample::BatchDecoder`), batched VQ decoding and T5 prompt encoding.
//! - [`metrics`]: Prometheus text metrics.
//! - [`random_checkpoint`]: a random-weight GPT checkpoint for tests and benchmarks.

pub mod api;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod server;

pub use error::{Result, ServeError};
pub use server::{ServeOptions, serve};

use std::path::Path;

/// Writes a GPT of `cfg` with random weights (uniform in ±`scale`, every tensor, the output
/// layer included, so that logits are not flat) as `dir/model.safetensors`, and a run config
/// `dir/run.toml` whose `[model]` describes it (for `--checkpoint … --config …`). For tests and
/// benchmarks: the model means nothing.
pub fn random_checkpoint(
    dir: &Path,
    model_toml: &str,
    seed: u64,
    scale: f32,
) -> Result<std::path::PathBuf> {
    use candle_core::{Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir)?;
    let run = format!(
        "[model]\n{model_toml}\n\n[data]\nroot = \"unused\"\n\n[output]\ndir = \"unused\"\n"
    );
    let run_path = dir.join("run.toml");
    std::fs::write(&run_path, &run)?;
    let cfg = llamagen_train::run::RunConfig::from_file(&run_path)?
        .model
        .gpt_config()?;
    let vm = candle_nn::VarMap::new();
    let model = llamagen_train::checkpoint::new_trainable(&vm, &cfg, &Device::Cpu)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, v) in vars {
        let x: Vec<f32> = (0..v.elem_count())
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu)?)?;
    }
    let weights = dir.join("model.safetensors");
    llamagen_train::checkpoint::save_safetensors(&weights, &model.state_dict())?;
    Ok(weights)
}
