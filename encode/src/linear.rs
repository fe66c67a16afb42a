//! A bias-free linear layer `y = x·Wᵀ` with the CPU float32 product through [`crate::sgemm`].
//!
//! Invariants enforced here:
//! - `weight` is `(out, in)` as in PyTorch; the input's last dimension is `in`, and the output
//!   keeps the input's leading dimensions.
//! - When nothing needs a gradient and input and weight are float32 on the CPU, the product is
//!   one `sgemm` over all rows on the rayon pool; otherwise it is candle's `matmul`, so training
//!   and other devices and dtypes behave as `candle_nn::Linear`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};

use crate::sgemm::sgemm;

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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fast = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && !(x.track_op() || self.weight.track_op());
        if !fast {
            return self.inner.forward(x);
        }
        x.contiguous()?
            .apply_op2_no_bwd(&self.weight.contiguous()?, &CpuLinear)
    }
}

struct CpuLinear;

impl CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "linear-cpu-f32"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xv), CpuStorage::F32(wv)) = (xs, ws) else {
            candle_core::bail!("linear: expected f32 input and weight");
        };
        let (Some((xa, xb)), Some((wa, wb))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("linear: expected contiguous input and weight");
        };
        let (x, w) = (&xv[xa..xb], &wv[wa..wb]);
        let (out, inp) = wl.shape().dims2()?;
        let dims = xl.dims();
        if dims.last() != Some(&inp) {
            candle_core::bail!("linear: input {dims:?} for a weight of ({out}, {inp})");
        }
        let m = x.len() / inp.max(1);
        let mut y = vec![0f32; m * out];
        // SAFETY: x is [m, inp], w is [out, inp] read as Wᵀ = [inp, out] (row stride 1, column
        // stride inp), y is [m, out]; all within their slices.
        unsafe {
            sgemm(
                (m, out, inp),
                (x.as_ptr(), inp as isize, 1),
                (w.as_ptr(), 1, inp as isize),
                (y.as_mut_ptr(), out as isize),
                false,
                rayon::current_num_threads(),
            );
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_linear() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (37, 70), &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 11, 70), &dev)?;
        let lin = Linear::new(w.clone());
        let want = candle_nn::Linear::new(w, None).forward(&x)?;
        let got = lin.forward(&x)?;
        assert_eq!(got.dims(), &[3, 11, 37]);
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        // A tracked input keeps candle's differentiable path.
        let xv = Var::from_tensor(&x)?;
        let g = lin.forward(&xv)?.sum_all()?.backward()?;
        assert!(g.get(&xv).is_some());
        Ok(())
    }
}
