//! GELU (tanh form), alone or times a gate, with a vectorised CPU inference path.
//!
//! Invariants enforced here:
//! - `gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, the form of candle's `gelu`
//!   and of T5's `gelu_new`; `gelu_tanh_mul(a, b) = gelu_tanh(a) · b` (T5's gated FFN).
//! - When nothing needs a gradient and the inputs are float32 on the CPU, one pass computes it
//!   with `tanh(u) = 1 − 2/(e^{2u} + 1)` and the polynomial exponential of [`crate::norm`]
//!   (absolute error below 1e-6 on the result's scale); otherwise candle's ops run.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use llamagen_kernels::f32_slice;
use rayon::prelude::*;

use crate::norm::fast_exp;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}

/// `out[i] = gelu(a[i]) · b[i]` (or `gelu(a[i])` without `b`), with AVX2/FMA when available.
fn gelu_into(out: &mut [MaybeUninit<f32>], a: &[f32], b: Option<&[f32]>) {
    #[inline(always)]
    fn body(out: &mut [MaybeUninit<f32>], a: &[f32], b: Option<&[f32]>) {
        match b {
            Some(b) => {
                for ((o, &x), &g) in out.iter_mut().zip(a).zip(b) {
                    o.write(gelu(x) * g);
                }
            }
            None => {
                for (o, &x) in out.iter_mut().zip(a) {
                    o.write(gelu(x));
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2(out: &mut [MaybeUninit<f32>], a: &[f32], b: Option<&[f32]>) {
            body(out, a, b)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            return unsafe { avx2(out, a, b) };
        }
    }
    body(out, a, b)
}

/// `gelu_tanh(a) · b`, or `gelu_tanh(a)` when `b` is `None`.
pub fn gelu_tanh_mul(a: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    let fast = f32_cpu(a) && b.is_none_or(|b| f32_cpu(b) && b.shape() == a.shape());
    if !fast {
        let g = a.gelu()?;
        return match b {
            Some(b) => g * b,
            None => Ok(g),
        };
    }
    let a = a.contiguous()?;
    match b {
        Some(b) => a.apply_op2_no_bwd(&b.contiguous()?, &GeluMul { gated: true }),
        None => a.apply_op2_no_bwd(&a, &GeluMul { gated: false }),
    }
}

struct GeluMul {
    gated: bool,
}

impl CustomOp2 for GeluMul {
    fn name(&self) -> &'static str {
        "gelu-tanh-mul-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, "gelu")?, f32_slice(s2, l2, "gelu")?);
        let mut out = llamagen_kernels::uninit_buffer(a.len());
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
            let a = &a[i * CHUNK..i * CHUNK + o.len()];
            let b = self.gated.then(|| &b[i * CHUNK..i * CHUNK + o.len()]);
            gelu_into(o, a, b);
        });
        // SAFETY: the chunks cover `out` and `gelu_into` writes each element of its chunk.
        let out = unsafe { llamagen_kernels::assume_init(out) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_gelu() -> Result<()> {
        let dev = Device::Cpu;
        let a = (Tensor::randn(0f32, 3., (4, 1000), &dev)? * 1.0)?;
        let a = Tensor::cat(
            &[
                a,
                Tensor::new(&[[-100f32, -10., 0., 1e-6, 10., 100.]], &dev)?.repeat((4, 1))?,
            ],
            1,
        )?;
        let b = Tensor::randn(0f32, 1., a.shape(), &dev)?;
        for (got, want) in [
            (gelu_tanh_mul(&a, None)?, a.gelu()?),
            (gelu_tanh_mul(&a, Some(&b))?, (a.gelu()? * &b)?),
        ] {
            let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
            let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= 1e-6 * scale.max(1.0), "{d}");
        }
        Ok(())
    }
}
