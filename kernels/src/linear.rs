//! Bias-free linear layers (the GPT's, T5's), `y = x·Wᵀ`, with CPU float32 products (forward
//! and backward) through [`crate::sgemm`].
//!
//! Invariants enforced here:
//! - `weight` is `(out, in)` with the checkpoint's layout; inputs are `(.., in)`.
//! - On the CPU in float32: `y = x·Wᵀ`, `∂x = ∂y·W`, `∂W = ∂yᵀ·x` (summed over every leading
//!   position), each one `sgemm` on the rayon pool and each computed only for an argument that
//!   is a variable or depends on one. Elsewhere it is `candle_nn::Linear` (candle's matmul and
//!   its backward). Both agree to float32 summation order.
//! - A layer built with [`Linear::for_inference`] on a CPU with AMX (`crate::amx`) also holds its
//!   weight packed for the AMX product, and uses it for every float32 CPU input that no gradient
//!   is tracked through; such results differ from float32 products by about 1e-5 relative
//!   (`crate::amx`'s bound). Tracked inputs take the float32 path above.

use crate::amx;
use crate::f32_slice;
use crate::sgemm::sgemm;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    inner: candle_nn::Linear,
    /// The weight packed for `amx::gemm` (inference layers on AMX CPUs only).
    packed: Option<Arc<amx::PackedB>>,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("weight", &self.weight)
            .field("amx", &self.packed.is_some())
            .finish()
    }
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        let inner = candle_nn::Linear::new(weight.clone(), None);
        Self {
            weight,
            inner,
            packed: None,
        }
    }

    /// A layer for inference: as [`Linear::new`], and where the weight is a CPU float32 matrix
    /// and [`amx::available`], it is also packed once for the AMX product cut as `split`.
    pub fn for_inference(weight: Tensor, split: amx::Split) -> Result<Self> {
        let mut layer = Self::new(weight);
        let w = &layer.weight;
        if w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2 && amx::available() {
            let (n, k) = w.dims2()?;
            let data = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            layer.packed = Some(Arc::new(amx::PackedB::from_weight(&data, n, k, split)));
        }
        Ok(layer)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !(cpu_f32(x) && cpu_f32(&self.weight)) {
            return self.inner.forward(x);
        }
        if let Some(packed) = &self.packed
            && !x.track_op()
        {
            return x
                .contiguous()?
                .apply_op1_no_bwd(&AmxProduct(packed.clone()));
        }
        let (x, w) = (x.contiguous()?, self.weight.contiguous()?);
        let op = Product {
            ta: false,
            tb: true,
        };
        if x.track_op() || w.track_op() {
            x.apply_op2(&w, op)
        } else {
            x.apply_op2_no_bwd(&w, &op)
        }
    }
}

/// `x·Wᵀ` through `amx::gemm`, `W` pre-packed; `x` is contiguous `(.., in)`.
struct AmxProduct(Arc<amx::PackedB>);

impl CustomOp1 for AmxProduct {
    fn name(&self) -> &'static str {
        "linear-amx"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "linear")?;
        let (m, k) = as_matrix(l);
        let (n, wk) = (self.0.n(), self.0.k());
        if k != wk {
            candle_core::bail!(
                "linear: input {:?} does not chain with a {n}×{wk} weight",
                l.dims()
            );
        }
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: `amx::gemm` writes every element of the `m × n` result (row stride `n`)
        // before anything reads it.
        unsafe {
            amx::gemm(
                m,
                x,
                k,
                &self.0,
                std::slice::from_raw_parts_mut(y.as_mut_ptr(), m * n),
                n,
                rayon::current_num_threads(),
            );
            y.set_len(m * n);
        }
        let mut d = l.dims().to_vec();
        *d.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(d)))
    }
}

/// `op(A)·op(B)` over contiguous float32 operands seen as matrices (leading dimensions
/// flattened): `A` is `[m, k]` (stored `[k, m]` when `ta`), `B` is `[k, n]` (stored `[n, k]`
/// when `tb`). The result keeps `A`'s leading dimensions when `!ta`, else it is `[m, n]`.
#[derive(Clone, Copy)]
struct Product {
    ta: bool,
    tb: bool,
}

fn as_matrix(l: &Layout) -> (usize, usize) {
    let dims = l.dims();
    let last = *dims.last().unwrap_or(&1);
    (l.shape().elem_count() / last.max(1), last)
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "linear-cpu-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        let ((ar, ac), (br, bc)) = (as_matrix(l1), as_matrix(l2));
        let (m, k) = if self.ta { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.tb { (bc, br) } else { (br, bc) };
        if k != k2 {
            candle_core::bail!(
                "linear: shapes {:?} and {:?} do not chain",
                l1.dims(),
                l2.dims()
            );
        }
        let a_str = if self.ta {
            (1, m as isize)
        } else {
            (k as isize, 1)
        };
        let b_str = if self.tb {
            (1, k as isize)
        } else {
            (n as isize, 1)
        };
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: the strides describe the stored matrices inside their slices; y has room for
        // [m, n], and a product that does not accumulate writes every element of it.
        unsafe {
            sgemm(
                (m, n, k),
                (a.as_ptr(), a_str.0, a_str.1),
                (b.as_ptr(), b_str.0, b_str.1),
                (y.as_mut_ptr(), n as isize),
                false,
                rayon::current_num_threads(),
            );
            y.set_len(m * n);
        }
        let shape = if self.ta {
            Shape::from((m, n))
        } else {
            let mut d = l1.dims().to_vec();
            *d.last_mut().expect("rank >= 1") = n;
            Shape::from(d)
        };
        Ok((CpuStorage::F32(y), shape))
    }

    /// Only the forward `x·Wᵀ` is differentiated: `∂x = ∂y·W`, `∂W = ∂yᵀ·x`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let nn = Product {
            ta: false,
            tb: false,
        };
        let tn = Product {
            ta: true,
            tb: false,
        };
        let gx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &nn)?.reshape(x.shape())?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(x, &tn)?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// An inference layer: untracked inputs take the AMX product where the CPU has it (close to
    /// float32, not equal), tracked ones the float32 product and its backward.
    #[test]
    fn inference_layer_matches_float32() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (70, 300), &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 45, 300), &dev)?;
        let plain = Linear::new(w.clone());
        let want = plain.forward(&x)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        for (split, bound) in [(amx::Split::Two, 2e-5), (amx::Split::Three, 1e-6)] {
            let fast = Linear::for_inference(w.clone(), split)?;
            assert_eq!(fast.packed.is_some(), amx::available());
            let got = fast.forward(&x)?;
            assert_eq!(got.dims(), want.dims());
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(err < bound, "{split:?}: relative error {err}");
            if amx::available() {
                assert!(err > 0.0, "the AMX product was not used");
            }
        }
        let fast = Linear::for_inference(w.clone(), amx::Split::Two)?;
        let xv = Var::from_tensor(&x)?;
        let tracked = fast.forward(&xv)?;
        let exact = (&tracked - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(exact, 0.0, "a tracked input must take the float32 product");
        let g = tracked.sum_all()?.backward()?;
        assert!(g.get(&xv).is_some());
        Ok(())
    }

    /// Values and gradients against candle's Linear, for 2-D and 3-D inputs and a small batch.
    #[test]
    fn values_and_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![3usize, 70], vec![2, 9, 70], vec![2, 1, 70]] {
            let w0 = Tensor::randn(0f32, 1., (37, 70), &dev)?;
            let x0 = Tensor::randn(0f32, 1., dims.as_slice(), &dev)?;
            let up = Tensor::randn(
                0f32,
                1.,
                candle_nn::Linear::new(w0.clone(), None)
                    .forward(&x0)?
                    .shape(),
                &dev,
            )?;
            let (x1, w1) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let (x2, w2) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let y1 = Linear::new(w1.as_tensor().clone()).forward(&x1)?;
            let y2 = candle_nn::Linear::new(w2.as_tensor().clone(), None).forward(&x2)?;
            let g1 = (&y1 * &up)?.sum_all()?.backward()?;
            let g2 = (&y2 * &up)?.sum_all()?.backward()?;
            let d = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert!(d(&y1, &y2)? < 1e-4, "{dims:?} value");
            assert!(
                d(g1.get(&x1).unwrap(), g2.get(&x2).unwrap())? < 1e-4,
                "{dims:?} grad x"
            );
            assert!(
                d(g1.get(&w1).unwrap(), g2.get(&w2).unwrap())? < 1e-4,
                "{dims:?} grad w"
            );
        }
        Ok(())
    }
}
