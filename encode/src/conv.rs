//! 2-D convolution with a faster backward pass on the CPU.
//!
//! Invariants enforced here:
//! - The forward value is exactly candle's `conv2d` (dilation 1, one group), plus the bias.
//! - On the CPU, the gradient with respect to the input of a stride-1 convolution is the
//!   convolution of the output gradient with the spatially flipped, in/out-transposed kernel and
//!   padding `k − 1 − p` (candle's own backward uses `conv_transpose2d`, several times slower on
//!   the CPU); other strides use `conv_transpose2d` as candle does. The kernel gradient is
//!   candle's formula, computed only when the kernel is a variable or depends on one.
//! - On other devices the plain candle `conv2d` (and its backward) is used.

use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};

/// A 2-D convolution layer (`weight` (out, in, k, k), optional `bias` (out)).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Self {
        Self {
            weight,
            bias,
            padding,
            stride,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.padding, self.stride)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        }
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)` with the backward pass of the module invariants.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || !(x.track_op() || w.track_op()) {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let y = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
    x.apply_op3(w, &y, ConvBackward { padding, stride })
}

/// Passes the precomputed output through and supplies the gradients.
struct ConvBackward {
    padding: usize,
    stride: usize,
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d-cpu-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = ly.contiguous_offsets() else {
            candle_core::bail!("conv2d output is not contiguous");
        };
        let out = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
            _ => candle_core::bail!("conv2d backward: unsupported dtype"),
        };
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, kh, kw) = w.dims4()?;
        let grad_x = if !x.track_op() {
            None
        } else if s == 1 && kh == kw && kh > p {
            let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            Some(grad.conv2d(&wt, kh - 1 - p, 1, 1, 1)?)
        } else {
            let out_size = (grad.dim(2)? - 1) * s + (kh - 1) + 1 - 2 * p;
            let out_padding = x.dim(2)? - out_size;
            Some(grad.conv_transpose2d(w, p, out_padding, s, 1)?)
        };
        let grad_w = if !w.track_op() {
            None
        } else {
            let g = x
                .transpose(0, 1)?
                .conv2d(&grad.transpose(0, 1)?, p, 1, s, 1)?
                .transpose(0, 1)?;
            let (_, _, g0, g1) = g.dims4()?;
            Some(if g0 != kh || g1 != kw {
                g.narrow(2, 0, kh)?.narrow(3, 0, kw)?
            } else {
                g
            })
        };
        Ok((grad_x, grad_w, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Gradients of the fast path against candle's own conv2d backward, for the shapes the
    /// models use (3×3 s1 p1, 1×1, 3×3 s2 p0 on odd sizes, 4×4 s2/s1 p1).
    #[test]
    fn gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, k, p, s) in [
            (3, 8, 9, 3, 1, 1),
            (8, 4, 8, 1, 0, 1),
            (4, 4, 9, 3, 0, 2),
            (3, 8, 16, 4, 1, 2),
            (8, 1, 5, 4, 1, 1),
        ] {
            let x0 = Tensor::randn(0f32, 1., (2, c, h, h), &dev)?;
            let w0 = Tensor::randn(0f32, 1., (o, c, k, k), &dev)?;
            let up = Tensor::randn(0f32, 1., x0.conv2d(&w0, p, s, 1, 1)?.shape(), &dev)?;
            let (x, w) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let fast = conv2d(&x, &w, p, s)?;
            let g = (fast.clone() * &up)?.sum_all()?.backward()?;
            let (x2, w2) = (Var::from_tensor(&x0)?, Var::from_tensor(&w0)?);
            let slow = x2.conv2d(&w2, p, s, 1, 1)?;
            let g2 = (slow.clone() * &up)?.sum_all()?.backward()?;
            let d = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            assert_eq!(d(&fast, &slow)?, 0.0);
            let gx = d(g.get(&x).unwrap(), g2.get(&x2).unwrap())?;
            let gw = d(g.get(&w).unwrap(), g2.get(&w2).unwrap())?;
            assert!(
                gx < 1e-4 && gw < 1e-4,
                "k{k} p{p} s{s}: grad x {gx}, grad w {gw}"
            );
        }
        Ok(())
    }
}
