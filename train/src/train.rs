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
use crate::optim::{AdamW, clip_grad_norm};

/// One (micro-)batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Class labels or caption features.
    pub cond: Condition,
    /// Image tokens `(B, block_size)`: the targets; the model input is `tokens[:, :-1]`.
    pub tokens: Tensor,
    /// Optional "1 = may attend" mask `(B, 1, S, S)` over `S = cls_token_num + block_size - 1`.
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
    let mut grads = grads.expect("at least one micro-batch");
    let vars: Vec<_> = opt.vars().into_iter().cloned().collect();
    let refs: Vec<_> = vars.iter().collect();
    let grad_norm = clip_grad_norm(&mut grads, &refs, max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(TrainError::NonFiniteGradient {
            step,
            norm: grad_norm,
        });
    }
    opt.step(&grads)?;
    Ok(StepStats {
        loss: total / k as f32,
        grad_norm,
    })
}
