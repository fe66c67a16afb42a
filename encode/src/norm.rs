//! GroupNorm, optionally followed by swish, with a fused CPU inference path.
//!
//! Invariants enforced here:
//! - The value is candle's `GroupNorm` (biased variance over each group of channels × pixels,
//!   `(x − mean) / sqrt(var + eps) · weight + bias`), then `y · sigmoid(y)` for `forward_swish`.
//! - When no argument needs a gradient and the input is float32 on the CPU, it is computed in
//!   two passes (group statistics, then one affine + swish pass per channel plane, in parallel)
//!   instead of candle's dozen whole-tensor passes; the exponential of the swish is a
//!   polynomial of relative error below 2e-7. Otherwise candle's composed ops run, so
//!   training differentiates it as before.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use llamagen_kernels::f32_slice;
use rayon::prelude::*;

/// GroupNorm with affine `weight` and `bias` (`(channels,)`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    groups: usize,
    inner: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (initialised to ones and zeros for training).
    pub fn load(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            eps,
            groups,
            inner,
        })
    }

    fn fused(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
            && !(x.track_op() || self.weight.track_op() || self.bias.track_op())
            && x.rank() >= 3
    }

    fn run(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        if self.fused(x) {
            let op = FusedGroupNorm {
                groups: self.groups,
                eps: self.eps as f32,
                swish,
            };
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let y = self.inner.forward(x)?;
        if swish { y.silu() } else { Ok(y) }
    }

    /// `swish(group_norm(x))`.
    pub fn forward_swish(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

struct FusedGroupNorm {
    groups: usize,
    eps: f32,
    swish: bool,
}

/// Sum of a slice, in 16 lanes (vectorised).
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + rest.iter().map(|&a| f(a) as f64).sum::<f64>()
}

/// `exp(x)` for the swish: `2^n · p(f)`, relative error below 2e-7, branch-free so loops over
/// it vectorise; inputs are clamped to [−87, 88].
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.max(-87.0).min(88.0);
    // Round to nearest by the 1.5·2²³ trick (no libm call, so the loops vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    // x − n·ln2 in two steps (Cody–Waite): the high part of ln2 has few bits, so n·LN2_HI is exact.
    let f = (x - n * 0.693_145_75) - n * 1.428_606_8e-6; // |f| ≤ ln2/2
    // exp(f) on [−0.347, 0.347], Taylor to degree 7.
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    // 2^n from the float's own bits: n + 127 + 2²³ holds n + 127 in its low mantissa bits, and
    // the shift keeps exactly those (no float-to-int conversion, which would not vectorise).
    let scale = f32::from_bits((n + 127.0 + 8_388_608.0).to_bits() << 23);
    p * scale
}

/// `out = swish(inp·s + t)`, with AVX2/FMA code when the CPU has it.
fn swish_affine(out: &mut [f32], inp: &[f32], s: f32, t: f32) {
    #[inline(always)]
    fn body(out: &mut [f32], inp: &[f32], s: f32, t: f32) {
        for (o, &v) in out.iter_mut().zip(inp) {
            let z = v * s + t;
            *o = z / (1.0 + fast_exp(-z));
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(out: &mut [f32], inp: &[f32], s: f32, t: f32) {
            body(out, inp, s, t)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { avx2(out, inp, s, t) };
        }
    }
    body(out, inp, s, t)
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-swish-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.dims();
        let c = dims[1];
        let hw: usize = dims[2..].iter().product();
        let g = self.groups;
        if c % g != 0 {
            candle_core::bail!("group_norm: {g} groups do not divide {c} channels");
        }
        let op = "group_norm";
        let (x, w, bias) = (
            f32_slice(xs, xl, op)?,
            f32_slice(ws, wl, op)?,
            f32_slice(bs, bl, op)?,
        );
        if w.len() != c || bias.len() != c {
            candle_core::bail!("group_norm: affine of {} for {c} channels", w.len());
        }
        let gsize = c / g * hw;
        // Per (image, group): mean and 1/sqrt(var + eps), var from the centred second pass.
        let stats: Vec<(f32, f32)> = x
            .par_chunks(gsize)
            .map(|v| {
                let mean = (lane_sum(v, |a| a) / gsize as f64) as f32;
                let var = (lane_sum(v, |a| (a - mean) * (a - mean)) / gsize as f64) as f32;
                (mean, 1.0 / (var + self.eps).sqrt())
            })
            .collect();
        let mut y = vec![0f32; x.len()];
        let swish = self.swish;
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, (out, inp))| {
                let ch = plane % c;
                let (mean, inv) = stats[(plane / c) * g + ch / (c / g)];
                let s = w[ch] * inv;
                let t = bias[ch] - mean * s;
                if swish {
                    swish_affine(out, inp, s, t);
                } else {
                    for (o, &v) in out.iter_mut().zip(inp) {
                        *o = v * s + t;
                    }
                }
            });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let (a, b) = (fast_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 2e-7, "exp({x}): {a} vs {b}");
        }
    }

    /// The fused path against candle's GroupNorm (+ silu), and the training path is candle's.
    #[test]
    fn fused_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let gn = GroupNorm::load(4, 8, 1e-6, vb)?;
        let w = Tensor::randn(1f32, 0.5, 8, &dev)?;
        let b = Tensor::randn(0f32, 0.5, 8, &dev)?;
        let gn = GroupNorm {
            inner: candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-6)?,
            weight: w,
            bias: b,
            ..gn
        };
        let x = (Tensor::randn(0f32, 3., (2, 8, 5, 7), &dev)? + 2.0)?;
        let want = gn.inner.forward(&x)?;
        for (got, want) in [
            (gn.forward(&x)?, want.clone()),
            (gn.forward_swish(&x)?, want.silu()?),
        ] {
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 2e-5, "{d}");
        }
        // A tracked input takes candle's differentiable path.
        let xv = Var::from_tensor(&x)?;
        let g = gn.forward_swish(&xv)?.sum_all()?.backward()?;
        assert!(g.get(&xv).is_some());
        Ok(())
    }
}
