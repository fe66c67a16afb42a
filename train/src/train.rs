//! One optimisation step of the official recipe: forward on `z[:, :-1]`, loss against `z`,
//! backward, gradient clipping, AdamW; with optional gradient accumulation.
//!
//! Invariants enforced here:
//! - A non-finite loss or gradient norm never reaches the optimiser: the step fails with
//!   [`TrainError::NonFiniteLoss`] / [`TrainError::NonFiniteGradient`] and the weights and
//!   moments are unchanged.
//! - With `k` micro-batches each loss is scaled by `1/k` and the gradients are summed, so the
//!   update equals one step on the mean of the micro-batch losses.
//! - Data parallel ([`train_step_with`] on a [`Comm`] of `W > 1` ranks): after the local
//!   backward passes the gradients are summed over the ranks (in buckets of flattened f32, of at
//!   most [`BUCKET_ELEMS`] values unless one tensor is larger) and divided by `W`, so the update
//!   equals one process's step on the whole global batch (every rank has the same micro-batch
//!   size). A loss with per-sample validity (t2i) is normalised by the *global* count of valid
//!   tokens of its micro-batch, not the rank's: a rank's loss is rescaled by
//!   `W · local_count / global_count` before backward. Every rank receives bit-identical sums
//!   (see `dist`), so the gradient norm, the clipping factor, the NaN/Inf guard (applied to the
//!   global loss and the global gradient norm) and the AdamW update agree on every rank, and the
//!   replicas stay bit-identical without broadcasting weights. A parameter counts as having a
//!   gradient when any rank has one (a rank without one contributes zeros).
//! - ZeRO-1 (an optimiser [`AdamW::shard`]ed over the ranks): each rank updates its own
//!   parameters from the same averaged gradients, then the ranks exchange them (all-gather in
//!   rank order), so every weight equals the unsharded step's bit for bit; a checkpoint gathers
//!   the moments at rank 0 into the one `optimizer.safetensors` of an unsharded run, which
//!   loads on any world size, sharded or not.

use candle_core::Tensor;
use candle_core::backprop::GradStore;
use rand::rngs::StdRng;

use crate::dist::Comm;
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
    rng: Option<&mut StdRng>,
    step: u64,
) -> Result<StepStats> {
    train_step_with(
        model,
        opt,
        micro_batches,
        max_grad_norm,
        rng,
        step,
        &Comm::single(),
    )
}

/// Gradient values per all-reduce bucket (16 MiB of f32).
pub const BUCKET_ELEMS: usize = 1 << 22;

/// [`train_step`] as one of the ranks of `comm` (module invariants): `micro_batches` are this
/// rank's share of the global batch; the returned loss is the global one. With a world of one
/// it is [`train_step`].
pub fn train_step_with(
    model: &Gpt,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    max_grad_norm: f64,
    rng: Option<&mut StdRng>,
    step: u64,
    comm: &Comm,
) -> Result<StepStats> {
    if comm.world() > 1 {
        return train_step_dist(model, opt, micro_batches, max_grad_norm, rng, step, comm);
    }
    train_step_local(model, opt, micro_batches, max_grad_norm, rng, step)
}

fn train_step_local(
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
    let grad_norm = clip_and_update(opt, &grads, &vars, max_grad_norm, step)?;
    Ok(StepStats {
        loss: total / k as f32,
        grad_norm,
    })
}

/// The data-parallel step (module invariants).
fn train_step_dist(
    model: &Gpt,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    max_grad_norm: f64,
    mut rng: Option<&mut StdRng>,
    step: u64,
    comm: &Comm,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(TrainError::InvalidInput("no micro-batches".into()));
    }
    let world = comm.world() as f32;
    let k = micro_batches.len() as f64;
    // Loss denominators of each micro-batch: this rank's and (after the sum) the global one,
    // as `gpt::loss` forms them (valid samples x targets per sample, at least 1).
    let denoms = micro_batches
        .iter()
        .map(|b| {
            let l = b.tokens.dim(1)? as f32;
            Ok(match &b.valid {
                None => b.tokens.dim(0)? as f32 * l,
                Some(v) => {
                    v.to_dtype(candle_core::DType::F32)?
                        .sum_all()?
                        .to_scalar::<f32>()?
                        * l
                }
            })
        })
        .collect::<Result<Vec<f32>>>()?;
    let mut global = denoms.clone();
    comm.all_reduce_sum(&mut global)?;

    let mut grads: Option<GradStore> = None;
    let mut total = 0f32;
    for ((b, local), global) in micro_batches.iter().zip(&denoms).zip(&global) {
        let dropout = rng.as_deref_mut().map(Dropout::new);
        let l = batch_loss(model, b, dropout)?;
        // Without validity every rank's loss is a mean over equally many tokens: averaging
        // over ranks is the global mean. With it, rescale to the global count.
        let factor = match &b.valid {
            None => 1.0,
            Some(_) => (local.max(1.0) * world / global.max(1.0)) as f64,
        };
        let l = if factor == 1.0 {
            l
        } else {
            l.affine(factor, 0.0)?
        };
        // A non-finite loss is not refused here: the global loss below is non-finite on every
        // rank at once, so all ranks stop together instead of one leaving the others waiting.
        total += l.to_scalar::<f32>()?;
        let g = if k == 1.0 {
            l.backward()?
        } else {
            l.affine(1.0 / k, 0.0)?.backward()?
        };
        add_grads(&mut grads, g, opt)?;
    }
    let mut grads = grads.expect("at least one micro-batch");
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    // One small sum first: which parameters have a gradient anywhere, and the loss.
    let mut head: Vec<f32> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).map_or(0.0, |_| 1.0))
        .collect();
    head.push(total);
    comm.all_reduce_sum(&mut head)?;
    let loss = head[vars.len()] / (world * k as f32);
    if !loss.is_finite() {
        return Err(TrainError::NonFiniteLoss { step, loss });
    }
    // The buckets, in parameter order.
    let present: Vec<&candle_core::Var> = vars
        .iter()
        .zip(&head)
        .filter(|(_, p)| **p > 0.0)
        .map(|(v, _)| v)
        .collect();
    let mut i = 0;
    while i < present.len() {
        let start = i;
        let mut len = 0;
        while i < present.len() && (i == start || len + present[i].elem_count() <= BUCKET_ELEMS) {
            len += present[i].elem_count();
            i += 1;
        }
        // Flatten with tensor ops (copies, not element loops), sum, average.
        let cpu = candle_core::Device::Cpu;
        let parts = present[start..i]
            .iter()
            .map(|v| {
                Ok(match grads.get(v.as_tensor()) {
                    Some(g) => g
                        .detach()
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_device(&cpu)?,
                    None => Tensor::zeros(v.elem_count(), candle_core::DType::F32, &cpu)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut bucket = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        drop(parts);
        comm.all_reduce_sum(&mut bucket)?;
        let mean = (Tensor::from_vec(bucket, len, &cpu)? / world as f64)?;
        let mut off = 0;
        for v in &present[start..i] {
            let n = v.elem_count();
            let t = mean
                .narrow(0, off, n)?
                .reshape(v.shape())?
                .to_device(v.device())?;
            off += n;
            grads.insert(v.as_tensor(), t);
        }
    }
    let grad_norm = clip_and_update(opt, &grads, &vars, max_grad_norm, step)?;
    if opt.is_sharded() {
        gather_parameters(opt, comm)?;
    }
    Ok(StepStats { loss, grad_norm })
}

/// The gradient norm over `vars`, refused when not finite, then the AdamW update with the clip
/// factor applied inside it (optim invariants). Returns the norm.
fn clip_and_update(
    opt: &mut AdamW,
    grads: &GradStore,
    vars: &[candle_core::Var],
    max_grad_norm: f64,
    step: u64,
) -> Result<f32> {
    let refs: Vec<_> = vars.iter().collect();
    let norm = grad_norm(grads, &refs)?;
    if !norm.is_finite() {
        return Err(TrainError::NonFiniteGradient { step, norm });
    }
    opt.step_scaled(grads, clip_factor(norm, max_grad_norm))?;
    Ok(norm)
}

/// ZeRO-1: every rank's own parameters to every rank (module invariants).
pub fn gather_parameters(opt: &AdamW, comm: &Comm) -> Result<()> {
    let owners = opt.owners();
    let vars = opt.vars();
    let cpu = candle_core::Device::Cpu;
    let mine = vars
        .iter()
        .zip(&owners)
        .filter(|(_, o)| **o == comm.rank())
        .map(|(v, _)| {
            Ok(v.as_tensor()
                .detach()
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_device(&cpu)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mine = match mine.is_empty() {
        true => Vec::new(),
        false => Tensor::cat(&mine, 0)?.to_vec1::<f32>()?,
    };
    let all = comm.all_gather_f32(&mine)?;
    let expected: usize = vars.iter().map(|v| v.elem_count()).sum();
    if all.len() != expected {
        return Err(TrainError::DistProtocol(format!(
            "rank {}: the parameter all-gather gave {} values for {expected} parameters",
            comm.rank(),
            all.len()
        )));
    }
    // Owners are contiguous in parameter order, so rank order is parameter order.
    let all = Tensor::from_vec(all, expected, &cpu)?;
    let mut off = 0;
    for (v, o) in vars.iter().zip(&owners) {
        let n = v.elem_count();
        if *o != comm.rank() {
            let t = all
                .narrow(0, off, n)?
                .reshape(v.shape())?
                .to_device(v.device())?
                .to_dtype(v.dtype())?;
            v.set(&t)?;
        }
        off += n;
    }
    Ok(())
}

/// ZeRO-1: the whole optimiser state at rank 0 (what [`AdamW::state_tensors`] gives unsharded),
/// None on the other ranks. Every rank must call it.
pub fn gather_optimizer_state(opt: &AdamW, comm: &Comm) -> Result<Option<Vec<(String, Tensor)>>> {
    if !opt.is_sharded() {
        return comm.is_main().then(|| opt.state_tensors()).transpose();
    }
    let Some(parts) = comm.gather_f32(&opt.own_moments()?)? else {
        return Ok(None);
    };
    let owners = opt.owners();
    let shapes = opt.shapes();
    let device = opt
        .vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let mut offsets = vec![0usize; parts.len()];
    let mut out = Vec::with_capacity(2 * shapes.len() + 1);
    for ((name, shape), &o) in shapes.iter().zip(&owners) {
        let n = shape.elem_count();
        let part = parts.get(o).map(|p| p.as_slice()).unwrap_or(&[]);
        if part.len() < offsets[o] + 2 * n {
            return Err(TrainError::DistProtocol(format!(
                "rank 0: rank {o} sent {} moment values, fewer than its parameters need",
                part.len()
            )));
        }
        for key in ["exp_avg", "exp_avg_sq"] {
            let t = Tensor::from_slice(&part[offsets[o]..offsets[o] + n], shape, &device)?;
            out.push((format!("{key}.{name}"), t));
            offsets[o] += n;
        }
    }
    out.push((
        "step".to_string(),
        Tensor::new(&[opt.step_count() as f64], &device)?,
    ));
    Ok(Some(out))
}

/// A digest of the bits of every parameter `opt` updates, in order (replica checks).
pub fn parameter_digest(opt: &AdamW) -> Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in opt.vars() {
        let x = v
            .as_tensor()
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        crate::dist::digest_f32(&mut h, &x);
    }
    Ok(h)
}

/// Makes every rank's parameters rank 0's (bucketed broadcast, in parameter order), as a
/// data-parallel job starts.
pub fn broadcast_parameters(opt: &AdamW, comm: &Comm) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    for v in opt.vars() {
        let mut x = v
            .as_tensor()
            .detach()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        comm.broadcast_f32(&mut x)?;
        let t = Tensor::from_vec(x, v.shape(), v.device())?.to_dtype(v.dtype())?;
        v.set(&t)?;
    }
    Ok(())
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
    save_training_checkpoint_state(dir, model, opt, &opt.state_tensors()?, seed, ema)
}

/// [`save_training_checkpoint_with`] with the optimiser state given (ZeRO-1: the state
/// [`gather_optimizer_state`] collected; `opt` supplies the step and hyper-parameters).
pub fn save_training_checkpoint_state(
    dir: &std::path::Path,
    model: &Gpt,
    opt: &AdamW,
    opt_state: &[(String, Tensor)],
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
    crate::checkpoint::save_safetensors(&tmp.join(OPTIMIZER_FILE), opt_state)?;
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
