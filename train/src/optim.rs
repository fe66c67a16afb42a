//! AdamW with the official parameter groups, gradient-norm clipping and learning-rate schedules.
//!
//! Invariants enforced here:
//! - Parameter groups: weight decay on every parameter of rank >= 2 (all linear weights, token
//!   and class embeddings, caption projection), none on rank-1 parameters (the RMSNorm
//!   weights). Buffers (the t2i null caption) are never optimised.
//! - PyTorch AdamW arithmetic, in this order: `p *= 1 - lr*wd`; `m = lerp(m, g, 1-b1)`;
//!   `v = b2*v + (1-b2)*g^2`; `p -= (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
//! - Clipping: total norm `N` = L2 norm of the per-tensor L2 norms; every gradient is multiplied
//!   by `min(1, max_norm/(N + 1e-6))`; `N` (before clipping) is returned.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::config::GptConfig;
use crate::error::{Result, TrainError};

/// AdamW hyper-parameters (defaults: the official training recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Learning rate. Default 1e-4.
    pub lr: f64,
    /// First-moment decay. Default 0.9.
    pub beta1: f64,
    /// Second-moment decay. Default 0.95.
    pub beta2: f64,
    /// Denominator epsilon. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay of the rank >= 2 group. Default 0.05.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
}

impl AdamW {
    /// Optimiser over `params`; the decay group is decided by rank (module invariants).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(ParamState {
                    decay: var.rank() >= 2,
                    name,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            params,
            step: 0,
        })
    }

    /// Optimiser over the trainable parameters of a GPT whose variables live in `varmap`.
    pub fn for_gpt(varmap: &VarMap, gpt: &GptConfig, cfg: AdamWConfig) -> Result<Self> {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        let params = gpt
            .parameter_names()
            .into_iter()
            .map(|n| {
                let v = data.get(&n).cloned().ok_or_else(|| {
                    TrainError::InvalidInput(format!("parameter `{n}` is not in the VarMap"))
                })?;
                Ok((n, v))
            })
            .collect::<Result<Vec<_>>>()?;
        drop(data);
        AdamW::new(params, cfg)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Sets the learning rate (for schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the decayed and non-decayed parameters.
    pub fn groups(&self) -> (Vec<String>, Vec<String>) {
        let mut d = Vec::new();
        let mut n = Vec::new();
        for p in &self.params {
            if p.decay {
                d.push(p.name.clone());
            } else {
                n.push(p.name.clone());
            }
        }
        (d, n)
    }

    /// The optimised variables, in order.
    pub fn vars(&self) -> Vec<&Var> {
        self.params.iter().map(|p| &p.var).collect()
    }

    /// One AdamW update from `grads`. Parameters without a gradient are left untouched (their
    /// moments too), as in PyTorch.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bc1;
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = g.detach().to_dtype(DType::F32)?;
            let mut w = p.var.as_tensor().detach().to_dtype(DType::F32)?;
            if p.decay && c.weight_decay != 0.0 {
                w = w.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            }
            p.exp_avg = (&p.exp_avg + ((&g - &p.exp_avg)? * (1.0 - c.beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = p.exp_avg_sq.sqrt()?.affine(1.0 / bc2_sqrt, c.eps)?;
            let update = ((&p.exp_avg / denom)? * step_size)?;
            let w = (w - update)?.to_dtype(p.var.dtype())?;
            p.var.set(&w)?;
        }
        Ok(())
    }

    /// Optimiser state as named tensors: `exp_avg.{param}`, `exp_avg_sq.{param}`, and `step`
    /// (shape `[1]`, f64).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push((format!("exp_avg.{}", p.name), p.exp_avg.clone()));
            out.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.clone()));
        }
        let dev = self.params.first().map(|p| p.var.device().clone());
        if let Some(dev) = dev {
            out.push(("step".to_string(), Tensor::new(&[self.step as f64], &dev)?));
        }
        Ok(out)
    }

    /// Restores the state written by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        let missing = |name: String| TrainError::MissingReference {
            path: source.to_path_buf(),
            name,
        };
        for p in &mut self.params {
            for (key, slot) in [
                (format!("exp_avg.{}", p.name), &mut p.exp_avg),
                (format!("exp_avg_sq.{}", p.name), &mut p.exp_avg_sq),
            ] {
                let t = state.get(&key).ok_or_else(|| missing(key.clone()))?;
                if t.dims() != p.var.dims() {
                    return Err(TrainError::ShapeMismatch {
                        path: source.to_path_buf(),
                        name: key,
                        expected: p.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.var.device())?;
            }
        }
        let step = state
            .get("step")
            .ok_or_else(|| missing("step".into()))?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}

/// Clips the gradients of `params` in `grads` to total L2 norm `max_norm` and returns the
/// total norm before clipping (module invariants).
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&Var], max_norm: f64) -> Result<f32> {
    let mut norms = Vec::new();
    for v in params {
        if let Some(g) = grads.get(v.as_tensor()) {
            norms.push(g.detach().to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt()?);
        }
    }
    if norms.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&norms, 0)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    let coef = (max_norm / (total as f64 + 1e-6)).min(1.0);
    for v in params {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g.detach() * coef)?);
        }
    }
    Ok(total)
}

/// Learning-rate schedule: optional linear warm-up, then constant (the official recipe) or
/// cosine decay to `min_lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LrSchedule {
    /// Peak learning rate. Default 1e-4.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`. Default 0 (none, as the official recipe).
    pub warmup_steps: u64,
    /// Total steps for cosine decay; 0 keeps the rate constant after warm-up. Default 0.
    pub decay_steps: u64,
    /// Final rate of the cosine decay. Default 0.
    pub min_lr: f64,
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule {
            lr: 1e-4,
            warmup_steps: 0,
            decay_steps: 0,
            min_lr: 0.0,
        }
    }
}

impl LrSchedule {
    /// Learning rate for 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.decay_steps == 0 {
            return self.lr;
        }
        let span = self.decay_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
