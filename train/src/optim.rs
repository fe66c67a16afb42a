//! AdamW with the official parameter groups, gradient-norm clipping and learning-rate schedules.
//!
//! Invariants enforced here:
//! - Parameter groups: weight decay on every parameter of rank >= 2 (all linear weights, token
//!   and class embeddings, caption projection), none on rank-1 parameters (the RMSNorm
//!   weights). Buffers (the t2i null caption) are never optimised.
//! - PyTorch AdamW arithmetic, in this order: `p *= 1 - lr*wd`; `m = lerp(m, g, 1-b1)`;
//!   `v = b2*v + (1-b2)*g^2`; `p -= (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
//! - A CPU float32 parameter keeps its moments in host buffers, and its update is one parallel
//!   in-place pass over parameter, gradient and both moments, with exactly the float32
//!   operations, in the same order, of the composed candle ops used elsewhere (moment tensors
//!   on the parameter's device), so both give bit-identical results.
//! - Clipping: total norm `N` = L2 norm of the per-tensor L2 norms; every gradient is multiplied
//!   by `min(1, max_norm/(N + 1e-6))` (as `g·c + 0` in float32, and not at all when the factor
//!   is 1); `N` (before clipping) is returned. [`AdamW::step_scaled`] applies that factor inside
//!   the moment passes instead of rewriting every gradient first; the result is the same.
//! - ZeRO-1 ([`AdamW::shard`]): the parameters are split, whole and in order, into `world`
//!   contiguous runs of about equal element count (as PyTorch's `ZeroRedundancyOptimizer`
//!   assigns whole parameters); a rank keeps the moments of its own run only and updates only
//!   those parameters, with exactly the arithmetic above, so after the ranks exchange their
//!   parameters every weight equals the unsharded update bit for bit. Its state tensors and
//!   loads cover its own parameters only (a checkpoint gathers them, see `train`), so a state
//!   written on any world size loads on any other.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use candle_nn::VarMap;
use llamagen_kernels::{f32_slice, f32_slice_mut};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

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
    moments: Moments,
    /// The rank that updates this parameter (ZeRO-1); 0 when unsharded.
    owner: usize,
}

/// AdamW over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
    /// Use the in-place CPU passes where they apply (always, except to test them).
    fused: bool,
    /// This rank and the world size of the sharding (0 of 1: unsharded).
    rank: usize,
    world: usize,
}

impl AdamW {
    /// Optimiser over `params`; the decay group is decided by rank (module invariants).
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let moments = if var.device().is_cpu() && var.dtype() == DType::F32 {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                    Moments::Tensors {
                        m: zeros()?,
                        v: zeros()?,
                    }
                };
                Ok(ParamState {
                    decay: var.rank() >= 2,
                    name,
                    moments,
                    var,
                    owner: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            params,
            step: 0,
            fused: true,
            rank: 0,
            world: 1,
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

    /// ZeRO-1: from now on this optimiser updates and keeps moments only for the parameters
    /// [`zero_partition`] gives `rank` of `world` (module invariants); the others' moments are
    /// freed. Call before loading a state.
    pub fn shard(&mut self, rank: usize, world: usize) -> Result<()> {
        if world == 0 || rank >= world {
            return Err(TrainError::InvalidInput(format!(
                "ZeRO-1 shard {rank} of {world}"
            )));
        }
        let sizes: Vec<usize> = self.params.iter().map(|p| p.var.elem_count()).collect();
        for (p, owner) in self.params.iter_mut().zip(zero_partition(&sizes, world)) {
            p.owner = owner;
            if owner != rank {
                p.moments = Moments::Elsewhere;
            }
        }
        (self.rank, self.world) = (rank, world);
        Ok(())
    }

    /// Whether the state is sharded over more than one rank.
    pub fn is_sharded(&self) -> bool {
        self.world > 1
    }

    /// The rank that updates each parameter, in order.
    pub fn owners(&self) -> Vec<usize> {
        self.params.iter().map(|p| p.owner).collect()
    }

    /// This rank's moments, flattened: `m` then `v` of each parameter it owns, in order.
    pub fn own_moments(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in self.params.iter().filter(|p| p.owner == self.rank) {
            let (m, v) = p.moments.tensors(&p.var)?;
            for t in [m, v] {
                out.extend(t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(out)
    }

    /// The names and shapes of the parameters, in order.
    pub fn shapes(&self) -> Vec<(String, candle_core::Shape)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.shape().clone()))
            .collect()
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
        self.step_scaled(grads, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `scale` first (the clipping factor of
    /// [`clip_factor`]); on the fast path the product is formed inside the moment passes.
    pub fn step_scaled(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bc1;
        for p in &mut self.params {
            if p.owner != self.rank {
                continue;
            }
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let mut g = g.detach().to_dtype(DType::F32)?;
            let fast = self.fused
                && matches!(p.moments, Moments::Host { .. })
                && [p.var.as_tensor(), &g]
                    .iter()
                    .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous());
            if let (true, Moments::Host { m, v }) = (fast, &mut p.moments) {
                let k = Coefs {
                    c1: (1.0 - c.beta1) as f32,
                    b2: c.beta2 as f32,
                    c2: (1.0 - c.beta2) as f32,
                    inv_bc2: (1.0 / bc2_sqrt) as f32,
                    eps: c.eps as f32,
                    step: step_size as f32,
                    decay: (p.decay && c.weight_decay != 0.0)
                        .then_some((1.0 - c.lr * c.weight_decay) as f32),
                    scale: (scale != 1.0).then_some(scale as f32),
                };
                let update = Update {
                    k,
                    moments: Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                };
                p.var.as_tensor().inplace_op2(&g, &update)?;
                continue;
            }
            if scale != 1.0 {
                g = (g * scale)?;
            }
            let mut w = p.var.as_tensor().detach().to_dtype(DType::F32)?;
            if p.decay && c.weight_decay != 0.0 {
                w = w.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
            }
            let (m, v) = p.moments.tensors(&p.var)?;
            let m = (&m + ((&g - &m)? * (1.0 - c.beta1))?)?;
            let v = ((&v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, c.eps)?;
            let update = ((&m / denom)? * step_size)?;
            p.moments.set(&m, &v)?;
            let w = (w - update)?.to_dtype(p.var.dtype())?;
            p.var.set(&w)?;
        }
        Ok(())
    }

    /// Optimiser state as named tensors: `exp_avg.{param}`, `exp_avg_sq.{param}`, and `step`
    /// (shape `[1]`, f64); sharded, of this rank's parameters only.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in self.params.iter().filter(|p| p.owner == self.rank) {
            let (m, v) = p.moments.tensors(&p.var)?;
            out.push((format!("exp_avg.{}", p.name), m));
            out.push((format!("exp_avg_sq.{}", p.name), v));
        }
        let dev = self.params.first().map(|p| p.var.device().clone());
        if let Some(dev) = dev {
            out.push(("step".to_string(), Tensor::new(&[self.step as f64], &dev)?));
        }
        Ok(out)
    }

    /// Restores the state written by [`AdamW::state_tensors`] (sharded: this rank's
    /// parameters, from a state of any sharding that has them).
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        let missing = |name: String| TrainError::MissingReference {
            path: source.to_path_buf(),
            name,
        };
        let rank = self.rank;
        for p in self.params.iter_mut().filter(|p| p.owner == rank) {
            let mut mv = Vec::with_capacity(2);
            for key in [
                format!("exp_avg.{}", p.name),
                format!("exp_avg_sq.{}", p.name),
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
                mv.push(t.to_dtype(DType::F32)?.to_device(p.var.device())?);
            }
            p.moments.set(&mv[0], &mv[1])?;
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

/// The float32 constants of one update, cast from f64 as candle's `affine` casts them.
#[derive(Clone, Copy)]
struct Coefs {
    c1: f32,
    b2: f32,
    c2: f32,
    inv_bc2: f32,
    eps: f32,
    step: f32,
    decay: Option<f32>,
    /// The clipping factor `c` (gradients enter as `g·c + 0`); None for 1.
    scale: Option<f32>,
}

/// A parameter's first and second moments.
enum Moments {
    /// A CPU float32 parameter's, updated together with it in one pass ([`Update`]).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Any other parameter's: float32 tensors on its device.
    Tensors { m: Tensor, v: Tensor },
    /// Kept by another rank (ZeRO-1).
    Elsewhere,
}

impl Moments {
    /// Both moments as tensors shaped like `var` (copies of host buffers).
    fn tensors(&self, var: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, var.shape(), var.device())?,
                Tensor::from_slice(v, var.shape(), var.device())?,
            ),
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
            Moments::Elsewhere => {
                return Err(TrainError::InvalidInput(
                    "the moments of this parameter are kept by another rank (ZeRO-1)".into(),
                ));
            }
        })
    }

    /// Replaces both moments with float32 `m` and `v`, shaped like the parameter.
    fn set(&mut self, m: &Tensor, v: &Tensor) -> Result<()> {
        match self {
            Moments::Host { m: hm, v: hv } => {
                *hm = m.flatten_all()?.to_vec1::<f32>()?;
                *hv = v.flatten_all()?.to_vec1::<f32>()?;
            }
            Moments::Tensors { m: tm, v: tv } => {
                *tm = m.clone();
                *tv = v.clone();
            }
            Moments::Elsewhere => {}
        }
        Ok(())
    }
}

/// ZeRO-1 owners of parameters of `sizes` elements over `world` ranks: contiguous runs in order,
/// a parameter going to the rank whose equal share of the total its midpoint falls in (some
/// ranks may own none when a few tensors dominate).
pub fn zero_partition(sizes: &[usize], world: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum::<usize>().max(1);
    let mut before = 0usize;
    sizes
        .iter()
        .map(|&n| {
            let mid = before as u128 * 2 + n as u128;
            before += n;
            ((mid * world as u128 / (2 * total as u128)) as usize).min(world - 1)
        })
        .collect()
}

/// Elements per parallel chunk of the in-place pass.
const CHUNK: usize = 1 << 15;

/// One AdamW update in place, element by element, from the gradient `g` (entering as
/// `g·c + 0` when clipped) and the host moments:
/// - `m = m + ((g − m)·c1 + 0)` (candle's `lerp` as composed above);
/// - `v = (v·b2 + 0) + ((g·g)·c2 + 0)`;
/// - `w = [w·(1 − lr·wd) + 0] − ((m / (sqrt(v)·inv_bc2 + eps))·step + 0)`.
struct Update<'a> {
    k: Coefs,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (w, g) = (f32_slice_mut(s1, l1, "adamw")?, f32_slice(s2, l2, "adamw")?);
        let mut moments = self.moments.lock().expect("adamw moments");
        let (m, v) = &mut *moments;
        if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!(
                "adamw: {} parameters, {} gradients, {}/{} moments",
                w.len(),
                g.len(),
                m.len(),
                v.len()
            );
        }
        let k = self.k;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| {
                for i in 0..w.len() {
                    let g = match k.scale {
                        Some(c) => g[i] * c + 0.0,
                        None => g[i],
                    };
                    let mi = m[i] + ((g - m[i]) * k.c1 + 0.0);
                    let vi = (v[i] * k.b2 + 0.0) + ((g * g) * k.c2 + 0.0);
                    (m[i], v[i]) = (mi, vi);
                    let base = match k.decay {
                        Some(d) => w[i] * d + 0.0,
                        None => w[i],
                    };
                    let denom = vi.sqrt() * k.inv_bc2 + k.eps;
                    w[i] = base - ((mi / denom) * k.step + 0.0);
                }
            });
        Ok(())
    }
}

/// Clips the gradients of `params` in `grads` to total L2 norm `max_norm` and returns the
/// total norm before clipping (module invariants).
pub fn clip_grad_norm(grads: &mut GradStore, params: &[&Var], max_norm: f64) -> Result<f32> {
    let total = grad_norm(grads, params)?;
    let coef = clip_factor(total, max_norm);
    if coef != 1.0 {
        for v in params {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g.detach() * coef)?);
            }
        }
    }
    Ok(total)
}

/// The clipping factor `min(1, max_norm/(N + 1e-6))` for total norm `N`.
pub fn clip_factor(total: f32, max_norm: f64) -> f64 {
    (max_norm / (total as f64 + 1e-6)).min(1.0)
}

/// The total L2 norm of the gradients of `params` (0 when none has one): the L2 norm of the
/// per-tensor norms. A CPU float32 gradient is read once, in parallel chunks whose sums of
/// squares are added in order.
pub fn grad_norm(grads: &GradStore, params: &[&Var]) -> Result<f32> {
    let mut norms = Vec::new();
    for v in params {
        let Some(g) = grads.get(v.as_tensor()) else {
            continue;
        };
        let g = g.detach().to_dtype(DType::F32)?;
        let n = if g.device().is_cpu() {
            let g = g.contiguous()?.flatten_all()?;
            let (storage, layout) = g.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                unreachable!("a CPU tensor has CPU storage");
            };
            let x = f32_slice(cpu, layout, "grad_norm")?;
            let partial: Vec<f64> = x
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
                .collect();
            Tensor::new(
                partial.iter().sum::<f64>().sqrt() as f32,
                &candle_core::Device::Cpu,
            )?
        } else {
            g.sqr()?.sum_all()?.sqrt()?
        };
        norms.push(n.to_device(&candle_core::Device::Cpu)?);
    }
    if norms.is_empty() {
        return Ok(0.0);
    }
    Ok(Tensor::stack(&norms, 0)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The in-place CPU passes give bit-identical parameters and moments to the composed ops,
    /// for a decayed matrix and an undecayed vector, over several steps.
    #[test]
    fn fused_update_is_bit_identical_to_the_composed_ops_with_and_without_clipping() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = Tensor::randn(0f32, 1., (33, 70), &dev)?;
        let b0 = Tensor::randn(0f32, 1., 70, &dev)?;
        let make = || -> Result<(Var, Var)> {
            Ok((
                Var::from_tensor(&w0.copy()?)?,
                Var::from_tensor(&b0.copy()?)?,
            ))
        };
        let ((w1, b1), (w2, b2)) = (make()?, make()?);
        let cfg = AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        };
        let mut fused = AdamW::new(
            vec![("w".into(), w1.clone()), ("b".into(), b1.clone())],
            cfg.clone(),
        )?;
        let mut plain = AdamW::new(
            vec![("w".into(), w2.clone()), ("b".into(), b2.clone())],
            cfg,
        )?;
        plain.fused = false;
        for step in 0..4 {
            let x = Tensor::randn(0f32, 1., (5, 70), &dev)?;
            let loss = |w: &Var, b: &Var| -> Result<GradStore> {
                let y = x
                    .broadcast_mul(&b.as_tensor().unsqueeze(0)?)?
                    .matmul(&w.as_tensor().t()?)?;
                Ok(y.sqr()?.mean_all()?.backward()?)
            };
            // Odd steps clip: the fused update scales inside its passes, the plain one
            // rewrites the gradients first (clip_grad_norm).
            let max_norm = if step % 2 == 1 { 0.05 } else { f64::INFINITY };
            let g1 = loss(&w1, &b1)?;
            let n1 = grad_norm(&g1, &[&w1, &b1])?;
            assert_eq!(
                clip_factor(n1, max_norm) < 1.0,
                step % 2 == 1,
                "step {step}: {n1}"
            );
            fused.step_scaled(&g1, clip_factor(n1, max_norm))?;
            let mut g2 = loss(&w2, &b2)?;
            let n2 = clip_grad_norm(&mut g2, &[&w2, &b2], max_norm)?;
            assert_eq!(n1, n2, "step {step}");
            plain.step(&g2)?;
            for (a, b) in [(&w1, &w2), (&b1, &b2)] {
                let (a, b) = (
                    a.flatten_all()?.to_vec1::<f32>()?,
                    b.flatten_all()?.to_vec1::<f32>()?,
                );
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "step {step}"
                );
            }
        }
        for ((na, ta), (nb, tb)) in fused
            .state_tensors()?
            .iter()
            .zip(plain.state_tensors()?.iter())
        {
            assert_eq!(na, nb);
            let all = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>();
            let (a, b) = (all(ta)?, all(tb)?);
            assert_eq!(a, b, "{na}");
        }
        Ok(())
    }
}

/// An exponential moving average of the trainable parameters, as the official `--ema`:
/// initialised as a copy of the weights, then after every optimiser step
/// `e ← decay·e + (1 − decay)·w` (`update_ema`: parameters only, in float32).
pub struct Ema {
    decay: f64,
    /// (name, parameter, average) in the optimiser's parameter order.
    params: Vec<(String, Var, Tensor)>,
}

impl Ema {
    /// An average over the parameters `opt` updates, starting at their current values.
    pub fn new(opt: &AdamW, decay: f64) -> Result<Ema> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(TrainError::InvalidConfig(format!(
                "optim.ema_decay = {decay}: must be in [0, 1]"
            )));
        }
        let params = opt
            .params
            .iter()
            .map(|p| {
                let e = p.var.as_tensor().detach().to_dtype(DType::F32)?.copy()?;
                Ok((p.name.clone(), p.var.clone(), e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Ema { decay, params })
    }

    /// One update after an optimiser step.
    pub fn update(&mut self) -> Result<()> {
        let d = self.decay;
        for (_, var, e) in &mut self.params {
            let w = var.as_tensor().detach().to_dtype(DType::F32)?;
            *e = ((&*e * d)? + (w * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// The averages under the parameters' names.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, _, e)| (n.clone(), e.clone()))
            .collect()
    }

    /// Replaces the averages with those of a checkpoint (every parameter, same shapes).
    pub fn load(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        for (name, var, e) in &mut self.params {
            let t = state
                .get(name.as_str())
                .ok_or_else(|| TrainError::MissingReference {
                    path: source.to_path_buf(),
                    name: name.clone(),
                })?;
            if t.dims() != var.dims() {
                return Err(TrainError::ShapeMismatch {
                    path: source.to_path_buf(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            *e = t.to_dtype(DType::F32)?.to_device(var.device())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod ema_tests {
    use super::*;
    use candle_core::Device;

    /// e0 = w0; after each step e ← d·e + (1 − d)·w, over the parameters only.
    #[test]
    fn ema_follows_the_official_update() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[10f32, -10.0], &dev)?)?;
        let opt = AdamW::new(
            vec![("w".into(), w.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )?;
        let mut ema = Ema::new(&opt, 0.75)?;
        w.set(&Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &dev)?)?;
        b.set(&Tensor::new(&[2f32, 2.0], &dev)?)?;
        ema.update()?;
        w.set(&Tensor::new(&[[1f32, 1.0], [1.0, 1.0]], &dev)?)?;
        ema.update()?;
        let t: std::collections::HashMap<_, _> = ema.tensors().into_iter().collect();
        // w: 0.75·(0.75·w0 + 0.25·w1) + 0.25·w2; b: 0.75·(0.75·b0 + 0.25·b1) + 0.25·b1.
        let want_w = [[1.75f32, 2.5], [3.25, 4.0]];
        let want_b = [6.5f32, -4.75];
        assert_eq!(t["w"].to_vec2::<f32>()?, want_w);
        assert_eq!(t["b"].to_vec1::<f32>()?, want_b);
        assert!(Ema::new(&opt, 1.5).is_err());
        // Restoring replaces the averages; a missing parameter is an error naming it.
        let mut back = Ema::new(&opt, 0.75)?;
        back.load(&t, std::path::Path::new("ema.safetensors"))?;
        assert_eq!(back.tensors()[0].1.to_vec2::<f32>()?, want_w);
        let mut partial = t.clone();
        partial.remove("b");
        let e = back
            .load(&partial, std::path::Path::new("ema.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains('b') && e.contains("ema.safetensors"), "{e}");
        Ok(())
    }
}
