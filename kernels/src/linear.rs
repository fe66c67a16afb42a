//! Bias-free linear layers (the GPT's, T5's), `y = x·Wᵀ`, with CPU float32 products (forward
//! and backward) through [`crate::sgemm`].
//!
//! Invariants enforced here:
//! - `weight` is `(out, in)` with the checkpoint's layout; inputs are `(.., in)`.
//! - On the CPU in float32: `y = x·Wᵀ`, `∂x = ∂y·W`, `∂W = ∂yᵀ·x` (summed over every leading
//!   position), each one `sgemm` on the rayon pool and each computed only for an argument that
//!   is a variable or depends on one. Elsewhere it is `candle_nn::Linear` (candle's matmul and
//!   its backward). Both agree to float32 summation order.
//! - An [`InferenceLinear`] on a CPU with AMX (`crate::amx`) holds only its weight packed for the
//!   AMX product (the float32 copy is dropped) and takes untracked CPU float32 inputs only; its
//!   results are within `crate::amx`'s bounds of the float32 product. Elsewhere it is a
//!   [`Linear`].

use crate::amx;
use crate::f32_slice;
use crate::sgemm::sgemm;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        let inner = candle_nn::Linear::new(weight.clone(), None);
        Self { weight, inner }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// A linear layer for inference only (the T5 encoder's).
#[derive(Debug, Clone)]
pub enum InferenceLinear {
    /// The float32 product of [`Linear`] (no AMX, or a weight that is not CPU float32).
    Float(Linear),
    /// The AMX product from the weight packed once (`amx::PackedB`); the float32 weight is not
    /// kept, so the layer needs no more memory than before (1.5 times with three pieces).
    Amx(Arc<amx::PackedB>),
}

impl InferenceLinear {
    /// The AMX form, cut as `split`, where the weight is a CPU float32 matrix and
    /// [`amx::available`]; the float32 form otherwise.
    pub fn new(weight: Tensor, split: amx::Split) -> Result<Self> {
        if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && weight.rank() == 2
            && amx::available()
        {
            let (n, k) = weight.dims2()?;
            let data = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Self::Amx(Arc::new(amx::PackedB::from_weight(
                &data, n, k, split,
            ))));
        }
        Ok(Self::Float(Linear::new(weight)))
    }
}

impl Module for InferenceLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Float(l) => l.forward(x),
            Self::Amx(packed) => {
                if !(x.device().is_cpu() && x.dtype() == DType::F32) {
                    candle_core::bail!(
                        "linear: an AMX layer takes CPU float32 inputs, got {:?} on {:?}",
                        x.dtype(),
                        x.device()
                    );
                }
                if x.track_op() {
                    candle_core::bail!("linear: an AMX layer is inference-only (no gradient)");
                }
                x.contiguous()?
                    .apply_op1_no_bwd(&AmxProduct(packed.clone()))
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !(cpu_f32(x) && cpu_f32(&self.weight)) {
            return self.inner.forward(x);
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
        // Zeroed rather than uninitialised: `amx::gemm` takes a slice, and a `&mut [f32]` over
        // uninitialised memory is undefined behaviour. The fill costs m·n stores against the
        // product's 2·m·n·k flops (k ≥ 512 here).
        let mut y = vec![0f32; m * n];
        amx::gemm(m, x, k, &self.0, &mut y, n, rayon::current_num_threads());
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

    /// An inference layer: the AMX product where the CPU has it (close to float32, not equal),
    /// the float32 product otherwise; a tracked input is refused by the AMX form.
    #[test]
    fn inference_layer_matches_float32() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (70, 300), &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 45, 300), &dev)?;
        let plain = Linear::new(w.clone());
        let want = plain.forward(&x)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        for (split, bound) in [(amx::Split::Two, 2e-5), (amx::Split::Three, 1e-6)] {
            let fast = InferenceLinear::new(w.clone(), split)?;
            assert_eq!(matches!(fast, InferenceLinear::Amx(_)), amx::available());
            let got = fast.forward(&x)?;
            assert_eq!(got.dims(), want.dims());
            let err = (&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
            assert!(err < bound, "{split:?}: relative error {err}");
            if amx::available() {
                assert!(err > 0.0, "the AMX product was not used");
            }
        }
        let fast = InferenceLinear::new(w.clone(), amx::Split::Two)?;
        let xv = Var::from_tensor(&x)?;
        match fast {
            InferenceLinear::Amx(_) => {
                let err = fast.forward(&xv).unwrap_err().to_string();
                assert!(err.contains("inference-only"), "{err}");
            }
            InferenceLinear::Float(_) => {
                let got = fast.forward(&xv)?;
                assert_eq!((&got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            }
        }
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
