//! 2-D convolution with a fast CPU path for float32.
//!
//! Invariants enforced here:
//! - The value is candle's `conv2d` (dilation 1, one group) plus the bias, to float32 rounding:
//!   on the CPU in float32 it is computed here, per image and tile of output rows, as one
//!   matrix multiply (`crate::sgemm`) of the kernel `[out, in·kh·kw]` by the tile's im2col patch matrix
//!   `[in·kh·kw, tile]`, written straight into the NCHW output that was pre-filled with the bias
//!   (1×1 stride-1 convolutions multiply the input itself, with no copy). The forward writes the
//!   patch matrix straight into the multiply's packed panel layout (`PackedB`), one block of
//!   rows just before it is used, so it is never stored whole nor copied. Other devices and
//!   dtypes use candle's `conv2d` and a broadcast bias add.
//! - Gradients (CPU, float32): the input gradient of a stride-1 convolution is the convolution of
//!   the output gradient with the spatially flipped, in/out-transposed kernel and padding
//!   `k − 1 − p` (candle's own backward uses `conv_transpose2d`, several times slower on the
//!   CPU); other strides use `conv_transpose2d` as candle does. The kernel gradient is
//!   `Σ_images grad · im2col(x)ᵀ`, the bias gradient the sum of the output gradient over images
//!   and pixels. Each is computed only for an argument that is a variable or depends on one.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::sgemm::{PackedA, PackedB, sgemm, sgemm_packed, sgemm_produced};
use llamagen_kernels::f32_slice;

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

impl Conv2d {
    /// `forward(x) + residual` (the residual has the output's shape); on the CPU inference path
    /// the output starts from `residual + bias` instead of a separate addition.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let p = (self.padding, self.padding);
        match self.inference(x, Some(residual), p)? {
            Some(y) => Ok(y),
            None => self.forward(x)? + residual,
        }
    }

    /// The convolution of `x` zero-padded by `before` rows/columns above and left and `after`
    /// below and right (the layer's own padding is not used).
    pub fn forward_padded(&self, x: &Tensor, (before, after): (usize, usize)) -> Result<Tensor> {
        match self.inference(x, None, (before, after))? {
            Some(y) => Ok(y),
            None => {
                let x = x
                    .pad_with_zeros(3, before, after)?
                    .pad_with_zeros(2, before, after)?;
                let y = conv2d(&x, &self.weight, 0, self.stride)?;
                match &self.bias {
                    None => Ok(y),
                    Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
                }
            }
        }
    }

    /// The fused CPU float32 forward when nothing needs a gradient, `None` otherwise.
    fn inference(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        pads: (usize, usize),
    ) -> Result<Option<Tensor>> {
        let tracked = x.track_op()
            || self.weight.track_op()
            || self.bias.as_ref().is_some_and(|b| b.track_op())
            || residual.is_some_and(|r| r.track_op());
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if tracked
            || !f32_cpu(x)
            || !f32_cpu(&self.weight)
            || !self.bias.as_ref().is_none_or(f32_cpu)
            || !residual.is_none_or(f32_cpu)
        {
            return Ok(None);
        }
        let o = self.weight.dim(0)?;
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; o],
        };
        let op = CpuConvInference {
            pads,
            stride: self.stride,
            bias,
        };
        let (x, w) = (x.contiguous()?, self.weight.contiguous()?);
        let r = match residual {
            Some(r) => r.contiguous()?,
            None => Tensor::zeros(0, DType::F32, x.device())?,
        };
        Ok(Some(x.apply_op3_no_bwd(&w, &r, &op)?))
    }
}

/// Inference-only CPU convolution over (x, w, residual-or-empty) with asymmetric padding.
struct CpuConvInference {
    pads: (usize, usize),
    stride: usize,
    bias: Vec<f32>,
}

impl CustomOp3 for CpuConvInference {
    fn name(&self) -> &'static str {
        "conv2d-cpu-f32-inference"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeom::of_layouts(xl, wl, self.pads, self.stride)?;
        let shape = g.out_shape();
        let r = f32_slice(rs, rl, "conv2d residual")?;
        let residual = if r.is_empty() {
            None
        } else if rl.shape() == &shape {
            Some(r)
        } else {
            candle_core::bail!(
                "conv2d: residual {:?} for an output {:?}",
                rl.shape(),
                shape
            );
        };
        let y = g.forward(
            f32_slice(xs, xl, "conv2d input")?,
            f32_slice(ws, wl, "conv2d kernel")?,
            &self.bias,
            residual,
        );
        Ok((CpuStorage::F32(y), shape))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d_bias(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.padding,
            self.stride,
        )
    }
}

/// `x.conv2d(w, padding, stride, 1, 1)`, computed and differentiated as the module invariants say.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_bias(x, w, None, padding, stride)
}

/// `x.conv2d(w, padding, stride, 1, 1) + bias[None, :, None, None]`.
pub fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    if !fast {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return match bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        };
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let b = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, DType::F32, w.device())?,
    };
    let op = CpuConv {
        padding,
        stride,
        has_bias: bias.is_some(),
    };
    if x.track_op() || w.track_op() || b.track_op() {
        x.apply_op3(&w, &b, op)
    } else {
        x.apply_op3_no_bwd(&w, &b, &op)
    }
}

/// The CPU float32 convolution of the module invariants, as a candle op over (x, w, bias).
struct CpuConv {
    padding: usize,
    stride: usize,
    has_bias: bool,
}

impl CustomOp3 for CpuConv {
    fn name(&self) -> &'static str {
        "conv2d-cpu-f32"
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
        let g = ConvGeom::of_layouts(xl, wl, (self.padding, self.padding), self.stride)?;
        let x = f32_slice(xs, xl, "conv2d input")?;
        let k = f32_slice(ws, wl, "conv2d kernel")?;
        let bias = f32_slice(bs, bl, "conv2d bias")?;
        let y = g.forward(x, k, bias, None);
        Ok((CpuStorage::F32(y), g.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, s) = (self.padding, self.stride);
        let (_, _, kh, kw) = w.dims4()?;
        let grad = grad.contiguous()?;
        let grad_x = if !x.track_op() {
            None
        } else if s == 1 && kh == kw && kh > p {
            let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            Some(conv2d(&grad, &wt, kh - 1 - p, 1)?)
        } else {
            // Input rows/columns beyond the last window (bottom, right) get a zero gradient.
            let gx = grad.conv_transpose2d(w, p, 0, s, 1)?;
            let (eh, ew) = (x.dim(2)? - gx.dim(2)?, x.dim(3)? - gx.dim(3)?);
            Some(gx.pad_with_zeros(2, 0, eh)?.pad_with_zeros(3, 0, ew)?)
        };
        let grad_w = if !w.track_op() {
            None
        } else {
            let (bn, c, h, wd) = x.dims4()?;
            let (o, _, _, _) = w.dims4()?;
            let g = ConvGeom::new((bn, c, h, wd), (o, kh, kw), p, s)?;
            let xv = x.detach().flatten_all()?.to_vec1::<f32>()?;
            let gv = grad.detach().flatten_all()?.to_vec1::<f32>()?;
            let gw = g.kernel_grad(&xv, &gv);
            Some(Tensor::from_vec(gw, w.shape(), w.device())?)
        };
        let grad_b = if self.has_bias && b.track_op() {
            Some(grad.sum((0, 2, 3))?)
        } else {
            None
        };
        Ok((grad_x, grad_w, grad_b))
    }
}

/// Shapes of one convolution and its tiling of the output.
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    /// Zero padding above/left (`pad`) and below/right (`pad_after`) of the input.
    pad: usize,
    pad_after: usize,
    stride: usize,
    out_h: usize,
    out_w: usize,
    /// Output rows per tile.
    rows: usize,
}

/// Target size, in floats, of one tile's whole patch matrix (4 MiB; the forward only ever holds
/// one packed block of its rows), and the fewest pixels per tile.
const TILE_FLOATS: usize = 1 << 20;
const MIN_TILE_PIXELS: usize = 256;

/// Where `im2col` writes a `[ksize, n]` patch matrix: row-major (`Plain`) or packed panels.
trait Patches {
    /// `P[r, j..j + len] = 0`.
    fn zero(&mut self, r: usize, j: usize, len: usize);
    /// `P[r, j..j + src.len()] = src`.
    fn copy(&mut self, r: usize, j: usize, src: &[f32]);
}

/// A row-major patch matrix with `n` columns.
struct Plain<'a> {
    col: &'a mut [f32],
    n: usize,
}

impl Patches for Plain<'_> {
    fn zero(&mut self, r: usize, j: usize, len: usize) {
        self.col[r * self.n + j..][..len].fill(0.0);
    }
    fn copy(&mut self, r: usize, j: usize, src: &[f32]) {
        self.col[r * self.n + j..][..src.len()].copy_from_slice(src);
    }
}

impl Patches for PackedB {
    fn zero(&mut self, r: usize, j: usize, len: usize) {
        PackedB::zero(self, r, j, len)
    }
    fn copy(&mut self, r: usize, j: usize, src: &[f32]) {
        PackedB::copy(self, r, j, src)
    }
}

/// Shares the output buffer between the threads that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl ConvGeom {
    fn new(
        (b, c, h, w): (usize, usize, usize, usize),
        (o, kh, kw): (usize, usize, usize),
        pad: usize,
        stride: usize,
    ) -> Result<Self> {
        Self::padded((b, c, h, w), (o, kh, kw), (pad, pad), stride)
    }

    /// The geometry of input `xl` (NCHW) convolved with kernel `wl` (out, in, kh, kw).
    fn of_layouts(xl: &Layout, wl: &Layout, pads: (usize, usize), stride: usize) -> Result<Self> {
        let (b, c, h, w) = xl.shape().dims4()?;
        let (o, c2, kh, kw) = wl.shape().dims4()?;
        if c != c2 {
            candle_core::bail!("conv2d: input has {c} channels, kernel expects {c2}");
        }
        Self::padded((b, c, h, w), (o, kh, kw), pads, stride)
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.o, self.out_h, self.out_w))
    }

    fn padded(
        (b, c, h, w): (usize, usize, usize, usize),
        (o, kh, kw): (usize, usize, usize),
        (pad, pad_after): (usize, usize),
        stride: usize,
    ) -> Result<Self> {
        let (ph, pw) = (h + pad + pad_after, w + pad + pad_after);
        if stride == 0 || ph < kh || pw < kw {
            candle_core::bail!(
                "conv2d: a {kh}×{kw} kernel (stride {stride}, padding {pad}/{pad_after}) does not fit a {h}×{w} input"
            );
        }
        let out_h = (ph - kh) / stride + 1;
        let out_w = (pw - kw) / stride + 1;
        let ksize = c * kh * kw;
        let pixels = (TILE_FLOATS / ksize.max(1)).max(MIN_TILE_PIXELS);
        let rows = pixels.div_ceil(out_w).clamp(1, out_h);
        Ok(Self {
            b,
            c,
            h,
            w,
            o,
            kh,
            kw,
            pad,
            pad_after,
            stride,
            out_h,
            out_w,
            rows,
        })
    }

    fn ksize(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// A 1×1 stride-1 unpadded convolution multiplies the input itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0 && self.pad_after == 0
    }

    fn tiles(&self) -> usize {
        self.out_h.div_ceil(self.rows)
    }

    /// Output rows `[start, end)` of tile `t`.
    fn tile_rows(&self, t: usize) -> (usize, usize) {
        let start = t * self.rows;
        (start, (start + self.rows).min(self.out_h))
    }

    /// Fills `out` with rows `[r0, r1)` of the patch matrix (`[ksize, pixels]`) of output rows
    /// `[oy0, oy1)` of image `bi`, as its rows `0..r1 − r0`; rows are ordered (channel, ky, kx)
    /// like the kernel's columns.
    fn im2col(
        &self,
        x: &[f32],
        bi: usize,
        (oy0, oy1): (usize, usize),
        (r0, r1): (usize, usize),
        out: &mut impl Patches,
    ) {
        let (h, w, ow, p, s) = (self.h, self.w, self.out_w, self.pad, self.stride);
        let mut gather = Vec::new();
        for r in r0..r1 {
            let (ci, ky, kx) = (r / (self.kh * self.kw), r / self.kw % self.kh, r % self.kw);
            let plane = &x[(bi * self.c + ci) * h * w..][..h * w];
            let r = r - r0;
            // Output columns whose input column `ox·s + kx − p` lies inside the image.
            let lo = (p.saturating_sub(kx)).div_ceil(s).min(ow);
            let hi = if w + p > kx {
                ((w + p - kx - 1) / s + 1).min(ow)
            } else {
                0
            }
            .max(lo);
            for (t, oy) in (oy0..oy1).enumerate() {
                let j = t * ow;
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy >= h as isize {
                    out.zero(r, j, ow);
                    continue;
                }
                let src = &plane[iy as usize * w..][..w];
                out.zero(r, j, lo);
                out.zero(r, j + hi, ow - hi);
                if s == 1 {
                    let off = lo + kx - p;
                    out.copy(r, j + lo, &src[off..off + (hi - lo)]);
                } else {
                    gather.clear();
                    gather.extend((lo..hi).map(|ox| src[ox * s + kx - p]));
                    out.copy(r, j + lo, &gather);
                }
            }
        }
    }

    /// The output `[b, o, out_h, out_w]`, bias (and `residual`, of the output's shape) included.
    fn forward(&self, x: &[f32], k: &[f32], bias: &[f32], residual: Option<&[f32]>) -> Vec<f32> {
        let ohw = self.out_h * self.out_w;
        let len = self.b * self.o * ohw;
        // Every plane is written once, with its bias (and residual), before the products add
        // to it: no zero-fill first.
        let mut y: Vec<f32> = Vec::with_capacity(len);
        let planes = y.spare_capacity_mut()[..len].par_chunks_mut(ohw.max(1));
        match residual {
            None => planes
                .enumerate()
                .for_each(|(i, plane)| plane.fill(std::mem::MaybeUninit::new(bias[i % self.o]))),
            Some(r) => {
                planes
                    .zip(r.par_chunks(ohw.max(1)))
                    .enumerate()
                    .for_each(|(i, (plane, r))| {
                        let b = bias[i % self.o];
                        plane
                            .iter_mut()
                            .zip(r)
                            .for_each(|(d, r)| *d = std::mem::MaybeUninit::new(r + b));
                    })
            }
        }
        // SAFETY: the `len` elements were all initialised just above.
        unsafe { y.set_len(len) };
        let out = OutPtr(y.as_mut_ptr());
        let items: Vec<(usize, usize)> = (0..self.b)
            .flat_map(|bi| (0..self.tiles()).map(move |t| (bi, t)))
            .collect();
        let threads = rayon::current_num_threads();
        let ksize = self.ksize();
        // SAFETY: `k` is the `[o, ksize]` kernel and outlives `pa`.
        let pa = unsafe { PackedA::new(self.o, ksize, (k.as_ptr(), ksize as isize, 1)) };
        let run = |(bi, t): (usize, usize), threads: usize| {
            let (oy0, oy1) = self.tile_rows(t);
            let n = (oy1 - oy0) * self.out_w;
            let out = out; // the whole `OutPtr` (Sync), not its raw-pointer field
            let c = (
                // SAFETY: each (image, tile) item writes only its own columns of its own image.
                unsafe { out.0.add(bi * self.o * ohw + oy0 * self.out_w) },
                ohw as isize,
            );
            // SAFETY (both products): the strides describe `[o, n]` inside `[o, ohw]`,
            // `[o, ksize]` and `[ksize, n]` inside the input image.
            if self.is_pointwise() {
                let rhs = x[bi * self.c * ohw + oy0 * self.out_w..].as_ptr();
                unsafe { sgemm_packed(&pa, n, (rhs, ohw as isize, 1), c, true, threads) };
            } else {
                let produce = |r0: usize, pb: &mut PackedB| {
                    self.im2col(x, bi, (oy0, oy1), (r0, r0 + pb.k()), pb)
                };
                unsafe { sgemm_produced(&pa, n, &produce, c, true, threads) };
            }
        };
        if items.len() >= 2 * threads && threads > 1 {
            items.into_par_iter().for_each(|it| run(it, 1));
        } else {
            for it in items {
                run(it, threads);
            }
        }
        y
    }

    /// `∂L/∂w = Σ_images grad_b · im2col(x_b)ᵀ`, `[o, c, kh, kw]`, from the input and the output
    /// gradient (both contiguous NCHW).
    fn kernel_grad(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let ohw = self.out_h * self.out_w;
        let ksize = self.ksize();
        let items: Vec<(usize, usize)> = (0..self.b)
            .flat_map(|bi| (0..self.tiles()).map(move |t| (bi, t)))
            .collect();
        let threads = rayon::current_num_threads().max(1);
        // Each worker sums its share of the items into its own kernel gradient.
        let chunk = items.len().div_ceil(threads);
        let partial: Vec<Vec<f32>> = items
            .par_chunks(chunk.max(1))
            .map(|its| {
                let mut gw = vec![0f32; self.o * ksize];
                let mut col = Vec::new();
                for &(bi, t) in its {
                    let (oy0, oy1) = self.tile_rows(t);
                    let n = (oy1 - oy0) * self.out_w;
                    let (rhs, rhs_cs) = if self.is_pointwise() {
                        (x[bi * self.c * ohw + oy0 * self.out_w..].as_ptr(), ohw)
                    } else {
                        col.resize(ksize * n, 0.0);
                        let rows = (0, ksize);
                        self.im2col(x, bi, (oy0, oy1), rows, &mut Plain { col: &mut col, n });
                        (col.as_ptr(), n)
                    };
                    let lhs = grad[bi * self.o * ohw + oy0 * self.out_w..].as_ptr();
                    // SAFETY: gw is [o, ksize]; lhs is grad's [o, n] block (row stride ohw); rhs
                    // is the patch matrix read transposed ([n, ksize], column stride rhs_cs).
                    unsafe {
                        sgemm(
                            (self.o, ksize, n),
                            (lhs, ohw as isize, 1),
                            (rhs, 1, rhs_cs as isize),
                            (gw.as_mut_ptr(), ksize as isize),
                            true,
                            1,
                        );
                    }
                }
                gw
            })
            .collect();
        let mut gw = vec![0f32; self.o * ksize];
        for p in partial {
            for (a, b) in gw.iter_mut().zip(p) {
                *a += b;
            }
        }
        gw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Values and gradients (input, kernel, bias) of the fast path against candle's own conv2d
    /// and its backward, for the shapes the models use (3×3 s1 p1, 1×1, 3×3 s2 p0 on odd sizes,
    /// 4×4 s2/s1 p1) and tiles that split the output rows.
    #[test]
    fn values_and_gradients_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, h, k, p, s) in [
            (3, 8, 9, 3, 1, 1),
            (8, 4, 8, 1, 0, 1),
            (4, 4, 9, 3, 0, 2),
            (3, 8, 16, 4, 1, 2),
            (8, 1, 5, 4, 1, 1),
            (5, 3, 70, 3, 1, 1),
            (600, 2, 20, 3, 1, 1),
            (300, 2, 30, 1, 0, 1),
        ] {
            // Non-square inputs only at stride 1: candle's own backward assumes square ones otherwise.
            let x0 = Tensor::randn(0f32, 1., (2, c, h, h + usize::from(s == 1)), &dev)?;
            let w0 = Tensor::randn(0f32, 1., (o, c, k, k), &dev)?;
            let b0 = Tensor::randn(0f32, 1., o, &dev)?;
            let up = Tensor::randn(0f32, 1., x0.conv2d(&w0, p, s, 1, 1)?.shape(), &dev)?;
            let (x, w, b) = (
                Var::from_tensor(&x0)?,
                Var::from_tensor(&w0)?,
                Var::from_tensor(&b0)?,
            );
            let fast = conv2d_bias(&x, &w, Some(&b), p, s)?;
            let g = (fast.clone() * &up)?.sum_all()?.backward()?;
            let (x2, w2, b2) = (
                Var::from_tensor(&x0)?,
                Var::from_tensor(&w0)?,
                Var::from_tensor(&b0)?,
            );
            let slow = x2
                .conv2d(&w2, p, s, 1, 1)?
                .broadcast_add(&b2.reshape((1, o, 1, 1))?)?;
            let g2 = (slow.clone() * &up)?.sum_all()?.backward()?;
            let scale = slow.abs()?.max_all()?.to_scalar::<f32>()?;
            let dy = max_diff(&fast, &slow)?;
            assert!(
                dy <= 1e-5 * scale,
                "k{k} p{p} s{s} c{c}: value {dy} (scale {scale})"
            );
            let no_grad = conv2d_bias(&x0, &w0, Some(&b0), p, s)?;
            assert_eq!(max_diff(&no_grad, &fast)?, 0.0);
            for (a, b, what) in [(&x, &x2, "x"), (&w, &w2, "w"), (&b, &b2, "b")] {
                let (ga, gb) = (g.get(a).unwrap(), g2.get(b).unwrap());
                let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = max_diff(ga, gb)?;
                assert!(
                    d <= 1e-4 * scale,
                    "k{k} p{p} s{s} c{c}: grad {what} {d} (scale {scale})"
                );
            }
        }
        Ok(())
    }

    /// The fused residual and asymmetric-padding forms against their composed definitions.
    #[test]
    fn residual_and_asymmetric_padding_match_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 9, 9), &dev)?;
        let w = Tensor::randn(0f32, 1., (5, 6, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 5, &dev)?;
        let bias = b.reshape((1, 5, 1, 1))?;
        let same = Conv2d::new(w.clone(), Some(b.clone()), 1, 1);
        let r = Tensor::randn(0f32, 1., (2, 5, 9, 9), &dev)?;
        let want = (x.conv2d(&w, 1, 1, 1, 1)?.broadcast_add(&bias)? + &r)?;
        assert!(max_diff(&same.forward_add(&x, &r)?, &want)? < 1e-4);
        let down = Conv2d::new(w.clone(), Some(b), 0, 2);
        let xp = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        let want = xp.conv2d(&w, 0, 2, 1, 1)?.broadcast_add(&bias)?;
        let got = down.forward_padded(&x, (0, 1))?;
        assert_eq!(got.dims(), want.dims());
        assert!(max_diff(&got, &want)? < 1e-4);
        // A tracked input takes the differentiable path, with the same value.
        let xv = Var::from_tensor(&x)?;
        let got = down.forward_padded(&xv, (0, 1))?;
        assert!(max_diff(&got, &want)? < 1e-4);
        assert!(got.sum_all()?.backward()?.get(&xv).is_some());
        Ok(())
    }

    /// Without a bias, no bias gradient exists and the value is the bare convolution.
    #[test]
    fn no_bias_is_the_bare_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 4, 6, 6), &dev)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 4, 3, 3), &dev)?)?;
        let y = conv2d(&x, &w, 1, 1)?;
        let d = max_diff(&y, &x.conv2d(&w, 1, 1, 1, 1)?)?;
        assert!(d < 1e-4, "{d}");
        let g = y.sum_all()?.backward()?;
        assert!(g.get(&w).is_some() && g.get(&x).is_none());
        Ok(())
    }
}
