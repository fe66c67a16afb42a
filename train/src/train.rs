//! One optimisation step of the official recipe: forward on `z[:, :-1]`, loss against `z`,
//! backward, gradient clipping, AdamW; with optional gradient accumulation.
//!
//! Invariants enforced here:
//! - A non-finite loss or gradient norm never reaches the optimiser: the step fails with
//!   [`TrainError::NonFiniteLoss`] / [`TrainError::NonFiniteGradient`] and the weights and
//!   moments are unchanged.
//! - With `k` micro-batches each loss is scaled by `1/k` and the gradients are summed, so the
//!   update equals one step on the mean of the micro-batch losses.

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use rand::rngs::StdRng;

use crate::error::{Result, TrainError};
use crate::gpt::{Condition, Dropout, Gpt, loss};
use crate::optim::{AdamW, clip_factor, grad_norm};

/// One (micro-)batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Class labels or caption features.
    pub cond: Condition,
    /// Image tokens `(B, block_size)`: the targets; the model input is `tokens[:, :-1]`.
    pub tokens: Tensor,
    /// Optional "1 = may attend" mask `(B, 1, S, S)` over `S = cls_token_num + block_size - 1`
    /// (t2i: [`crate::gpt::caption_attention_mask`] of the caption mask at length `S`).
    pub mask: Option<Tensor>,
    /// Optional per-sample validity `(B,)`; samples with 0 do not count in the loss.
    pub valid: Option<Tensor>,
}

/// What a step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Loss before the update (mean over micro-batches).
    pub loss: f32,
    /// Total gradient norm before clipping.
    pub grad_norm: f32,
}

/// Loss of `batch` (training-style forward, no backward).
pub fn batch_loss(model: &Gpt, batch: &Batch, dropout: Option<Dropout>) -> Result<Tensor> {
    let n = batch.tokens.dim(1)?;
    let idx = batch.tokens.narrow(1, 0, n - 1)?;
    let logits = model.forward(&idx, &batch.cond, batch.mask.as_ref(), dropout)?;
    loss(&logits, &batch.tokens, batch.valid.as_ref())
}

fn add_grads(acc: &mut Option<GradStore>, new: GradStore, opt: &AdamW) -> Result<()> {
    match acc {
        None => *acc = Some(new),
        Some(acc) => {
            for v in opt.vars() {
                if let Some(g) = new.get(v.as_tensor()) {
                    let sum = match acc.get(v.as_tensor()) {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    };
                    acc.insert(v.as_tensor(), sum);
                }
            }
        }
    }
    Ok(())
}

/// One optimiser step over `micro_batches` (gradient accumulation when more than one), with
/// clipping at `max_grad_norm`. `rng` enables dropout (training mode); None runs without it.
/// `step` is only used to label a non-finite loss.
pub fn train_step(
    model: &Gpt,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    max_grad_norm: f64,
    mut rng: Option<&mut StdRng>,
    step: u64,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(TrainError::InvalidInput("no micro-batches".into()));
    }
    let k = micro_batches.len() as f64;
    let mut grads: Option<GradStore> = None;
    let mut total = 0f32;
    for b in micro_batches {
        let dropout = rng.as_deref_mut().map(Dropout::new);
        let l = batch_loss(model, b, dropout)?;
        let lv = l.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(TrainError::NonFiniteLoss { step, loss: lv });
        }
        total += lv;
        let g = if k == 1.0 {
            l.backward()?
        } else {
            l.affine(1.0 / k, 0.0)?.backward()?
        };
        add_grads(&mut grads, g, opt)?;
    }
    let grads = grads.expect("at least one micro-batch");
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let refs: Vec<_> = vars.iter().collect();
    let grad_norm = grad_norm(&grads, &refs)?;
    if !grad_norm.is_finite() {
        return Err(TrainError::NonFiniteGradient {
            step,
            norm: grad_norm,
        });
    }
    // Clipping (optim invariants) happens inside the update.
    opt.step_scaled(&grads, clip_factor(grad_norm, max_grad_norm))?;
    Ok(StepStats {
        loss: total / k as f32,
        grad_norm,
    })
}

/// Randomness of training step `step` for run seed `seed`: an independent generator per step,
/// so a resumed run draws exactly what an uninterrupted one would.
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    use rand::SeedableRng;
    // SplitMix64 finaliser of (seed, step): distinct, well-mixed seeds per step.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(step.wrapping_add(1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// Training-progress record stored beside the weights of a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: u64,
    /// Run seed (see [`step_rng`]).
    pub seed: u64,
    /// Model configuration.
    pub model: crate::config::GptConfig,
    /// Optimiser hyper-parameters (learning rate as of the last step).
    pub optimizer: crate::optim::AdamWConfig,
}

/// File names inside a training checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimiser moments and step count.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// [`TrainState`] as JSON.
pub const STATE_FILE: &str = "train_state.json";
/// The EMA of the weights (official key names), when the run keeps one.
pub const EMA_FILE: &str = "ema.safetensors";

/// Writes a training checkpoint to `dir/{step:07}/` (model weights with official key names,
/// optimiser state, [`TrainState`]). The directory appears atomically: it is written under a
/// temporary name and renamed. Returns the checkpoint directory.
pub fn save_training_checkpoint(
    dir: &std::path::Path,
    model: &Gpt,
    opt: &AdamW,
    seed: u64,
) -> Result<std::path::PathBuf> {
    save_training_checkpoint_with(dir, model, opt, seed, None)
}

/// [`save_training_checkpoint`], with the EMA of the weights as [`EMA_FILE`] when given.
pub fn save_training_checkpoint_with(
    dir: &std::path::Path,
    model: &Gpt,
    opt: &AdamW,
    seed: u64,
    ema: Option<&crate::optim::Ema>,
) -> Result<std::path::PathBuf> {
    let step = opt.step_count();
    let fin = dir.join(format!("{step:07}"));
    let tmp = dir.join(format!(".{step:07}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    crate::checkpoint::save_gpt(&tmp.join(MODEL_FILE), model)?;
    crate::checkpoint::save_safetensors(&tmp.join(OPTIMIZER_FILE), &opt.state_tensors()?)?;
    if let Some(ema) = ema {
        // The whole state dict, as the official `ema.state_dict()`: the averaged parameters and
        // the model's buffers (the t2i null caption), so the file loads wherever weights do.
        let averaged = ema.tensors();
        let mut sd = model.state_dict();
        for (name, t) in sd.iter_mut() {
            if let Some((_, e)) = averaged.iter().find(|(n, _)| n == name) {
                *t = e.clone();
            }
        }
        crate::checkpoint::save_safetensors(&tmp.join(EMA_FILE), &sd)?;
    }
    let state = TrainState {
        step,
        seed,
        model: model.config().clone(),
        optimizer: opt.config().clone(),
    };
    let json = serde_json::to_string_pretty(&state).map_err(|source| TrainError::Json {
        path: tmp.join(STATE_FILE),
        source,
    })?;
    std::fs::write(tmp.join(STATE_FILE), json)
        .map_err(|e| TrainError::io(tmp.join(STATE_FILE), e))?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| TrainError::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| TrainError::io(&fin, e))?;
    Ok(fin)
}

/// Reads the [`TrainState`] (`train_state.json`) of a training checkpoint directory.
pub fn read_train_state(ckpt: &std::path::Path) -> Result<TrainState> {
    let sp = ckpt.join(STATE_FILE);
    let text = std::fs::read_to_string(&sp).map_err(|e| TrainError::io(&sp, e))?;
    serde_json::from_str(&text).map_err(|source| TrainError::Json { path: sp, source })
}

/// Restores the AdamW moments and step count of a training checkpoint directory
/// (`optimizer.safetensors`) into `opt`; every moment must have its parameter's shape. The
/// learning rate and the other hyper-parameters of `opt` are left as they are.
pub fn load_optimizer_state(ckpt: &std::path::Path, opt: &mut AdamW) -> Result<()> {
    let device = opt
        .vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let op = ckpt.join(OPTIMIZER_FILE);
    let ost = candle_core::safetensors::load(&op, &device).map_err(|e| {
        TrainError::UnreadableCheckpoint {
            path: op.clone(),
            reason: e.to_string(),
        }
    })?;
    opt.load_state(&ost, &op)
}

/// Restores weights (into the VarMap of a model built by
/// [`crate::checkpoint::new_trainable`]) and optimiser state from a checkpoint written by
/// [`save_training_checkpoint`], and returns its [`TrainState`]. The checkpoint's model
/// configuration must equal `cfg`.
pub fn load_training_checkpoint(
    ckpt: &std::path::Path,
    varmap: &candle_nn::VarMap,
    cfg: &crate::config::GptConfig,
    opt: &mut AdamW,
) -> Result<TrainState> {
    let state = read_train_state(ckpt)?;
    if &state.model != cfg {
        return Err(TrainError::InvalidConfig(format!(
            "checkpoint {} was written for a different model configuration",
            ckpt.display()
        )));
    }
    let device = opt
        .vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let sd = crate::checkpoint::read_state_dict(&ckpt.join(MODEL_FILE), &device)?;
    crate::checkpoint::load_into_varmap(varmap, cfg, &sd)?;
    load_optimizer_state(ckpt, opt)?;
    opt.set_lr(state.optimizer.lr);
    Ok(state)
}

/// Seeds a generator from several words (SplitMix64 over each).
pub fn mix_seed(words: &[u64]) -> u64 {
    let mut z: u64 = 0x243F_6A88_85A3_08D3;
    for &w in words {
        z = z.wrapping_add(w).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}
