//! Fused CPU float32 training ops of the GPT, each with its own backward pass (candle's fused
//! kernels have none): RMSNorm, the attention core (interleaved RoPE, scaled scores plus bias,
//! softmax, values), SwiGLU's `silu(a)·b`, per-token cross-entropy, and a product with a
//! constant (a dropout mask).
//!
//! Each replaces a chain of small candle ops whose forward and backward each read and write
//! whole tensors and whose gradients candle sums node by node.
//!
//! Invariants enforced here:
//! - Inputs are CPU float32 tensors (targets: u32). Callers keep the composed candle forms for
//!   other devices and dtypes ([`is_cpu_f32`]). Inputs are made contiguous first.
//! - Each op computes the same function as the GPT's composed form in float32, up to rounding.
//!   Its backward returns a gradient only for an argument that tracks gradients, and never for
//!   a constant (RoPE tables, attention bias, targets).
//! - Work is split over rows (or heads) in chunks of a fixed size. A sum over rows (RMSNorm's
//!   weight gradient) adds the chunks' partial sums in chunk order. Results therefore do not
//!   depend on the thread count, and a resumed run repeats an uninterrupted one.
//! - A forward that tracks gradients keeps what its backward needs inside the op: the attention
//!   op keeps its rotated queries and keys, its values and its probabilities; cross-entropy
//!   keeps each row's log-sum-exp. A forward that tracks nothing keeps nothing.

use crate::sgemm::sgemm;
use crate::{assume_init, assume_init_mut, f32_slice, uninit_buffer};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};
use candle_core::{Tensor, bail};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// Rows per parallel task.
const ROWS: usize = 16;

/// Whether `t` is a CPU float32 tensor, the only kind the ops here take.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn apply2<C: CustomOp2 + Send + Sync + 'static>(a: &Tensor, b: &Tensor, op: C) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if a.track_op() || b.track_op() {
        a.apply_op2(&b, op)
    } else {
        a.apply_op2_no_bwd(&b, &op)
    }
}

/// `Σ a·b` with 16 partial sums (vectorised).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `f(a[i], b[i])` for every element, in parallel chunks.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = uninit_buffer(a.len());
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                y.write(f(a, b));
            }
        });
    // SAFETY: the chunks cover `y`, and every element was written above.
    unsafe { assume_init(y) }
}

/// `C (+)= A·B` on the calling thread: `A` (`m×k`) and `B` (`k×n`) as pointer, row stride
/// and column stride, `C` as pointer and row stride.
///
/// # Safety
/// As [`sgemm`]: the operands must address their elements, `C` apart from `A` and `B`.
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
) {
    let a = (a, a_rs as isize, a_cs as isize);
    let b = (b, b_rs as isize, b_cs as isize);
    unsafe { sgemm((m, n, k), a, b, (c, c_rs as isize), accumulate, 1) }
}

/// Splits a two-gradient result `(2, ..)` into its halves, each shaped like `like`.
fn halves(t: Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((
        t.get(0)?.reshape(like.shape())?,
        t.get(1)?.reshape(like.shape())?,
    ))
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// `x · rsqrt(mean(x²) + eps) · weight` over the last dimension; `weight` is `(D,)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    apply2(x, weight, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

fn row_dim(l: &Layout, d: usize, op: &str) -> Result<()> {
    if l.dims().last() != Some(&d) {
        bail!("{op}: input {:?} does not end in {d}", l.dims());
    }
    Ok(())
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(s1, l1, "rms-norm")?,
            f32_slice(s2, l2, "rms-norm")?,
        );
        let d = w.len();
        row_dim(l1, d, "rms-norm")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                        *y = (x * r) * w;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `∂x = r·(g⊙w) − x·r³·mean(g⊙w⊙x)` per row, `∂w = Σ_rows g⊙x·r`.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &g, &RmsNormGradX { eps: self.eps })?)
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(x.apply_op2_no_bwd(
                &g,
                &RmsNormGradW {
                    eps: self.eps,
                    d: w.elem_count(),
                },
            )?)
        } else {
            None
        };
        Ok((gx, gw))
    }
}

struct RmsNormGradX {
    eps: f32,
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "rms-norm-grad-x-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm grad")?;
        let w = f32_slice(s2, l2, "rms-norm grad")?;
        let g = f32_slice(s3, l3, "rms-norm grad")?;
        let d = w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS).zip(g.par_chunks(d * ROWS)))
            .for_each(|(dx, (x, g))| {
                let mut gw = vec![0f32; d];
                for (dx, (x, g)) in dx.chunks_mut(d).zip(x.chunks(d).zip(g.chunks(d))) {
                    let r = inv_rms(x, self.eps);
                    for ((gw, &g), &w) in gw.iter_mut().zip(g).zip(w) {
                        *gw = g * w;
                    }
                    let c = dot(&gw, x) * r * r * r / d as f32;
                    for ((dx, &gw), &x) in dx.iter_mut().zip(&gw).zip(x) {
                        *dx = r * gw - x * c;
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct RmsNormGradW {
    eps: f32,
    d: usize,
}

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "rms-norm-grad-w-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms-norm grad")?;
        let g = f32_slice(s2, l2, "rms-norm grad")?;
        let d = self.d;
        let partial: Vec<Vec<f32>> = x
            .par_chunks(d * ROWS)
            .zip(g.par_chunks(d * ROWS))
            .map(|(x, g)| {
                let mut s = vec![0f32; d];
                for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                    let r = inv_rms(x, self.eps);
                    for ((s, &x), &g) in s.iter_mut().zip(x).zip(g) {
                        *s += g * (x * r);
                    }
                }
                s
            })
            .collect();
        let mut dw = vec![0f32; d];
        for p in &partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(d)))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(a)·b`, elementwise (`silu(a) = a·σ(a)`); `a` and `b` have the same shape.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!("silu_mul: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    apply2(a, b, SiluMul)
}

struct SiluMul;

const CHUNK: usize = 1 << 14;

fn sigmoid(a: f32) -> f32 {
    1.0 / (1.0 + (-a).exp())
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            f32_slice(s1, l1, "silu_mul")?,
            f32_slice(s2, l2, "silu_mul")?,
        );
        let y = zip_map(a, b, |a, b| (a / (1.0 + (-a).exp())) * b);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// `∂a = g·b·σ(a)·(1 + a·(1 − σ(a)))`, `∂b = g·silu(a)`, computed together.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = g.contiguous()?;
        let (ga, gb) = halves(a.apply_op3_no_bwd(b, &g, &SiluMulGrad)?, a)?;
        Ok((a.track_op().then_some(ga), b.track_op().then_some(gb)))
    }
}

struct SiluMulGrad;

impl CustomOp3 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "silu-mul-grad-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, "silu_mul grad")?;
        let b = f32_slice(s2, l2, "silu_mul grad")?;
        let g = f32_slice(s3, l3, "silu_mul grad")?;
        let n = a.len();
        let mut out = vec![0f32; 2 * n];
        let (ga, gb) = out.split_at_mut(n);
        ga.par_chunks_mut(CHUNK)
            .zip(gb.par_chunks_mut(CHUNK))
            .zip(
                a.par_chunks(CHUNK)
                    .zip(b.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((ga, gb), ((a, b), g))| {
                for i in 0..a.len() {
                    let s = sigmoid(a[i]);
                    ga[i] = g[i] * b[i] * (s * (1.0 + a[i] * (1.0 - s)));
                    gb[i] = g[i] * (a[i] * s);
                }
            });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

// ---------------------------------------------------------------------------------------------
// Product with a constant

/// `x ⊙ c` for a constant `c` of `x`'s element count (inverted dropout's mask of `0` and
/// `1/(1 − p)`); the backward is `g ⊙ c`, and `c` gets no gradient.
pub fn mul_constant(x: &Tensor, c: Vec<f32>) -> Result<Tensor> {
    if c.len() != x.elem_count() {
        bail!("mul_constant: {} factors for {:?}", c.len(), x.dims());
    }
    let x = x.contiguous()?;
    let op = MulConstant(c);
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

struct MulConstant(Vec<f32>);

impl CustomOp1 for MulConstant {
    fn name(&self) -> &'static str {
        "mul-constant-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "mul_constant")?;
        let y = zip_map(x, &self.0, |x, c| x * c);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

/// Per-row cross-entropy `logsumexp(x) − x[t]` of `logits` `(N, V)` against u32 `targets` `(N,)`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        bail!(
            "cross_entropy: targets {:?} for logits {:?}",
            targets.dims(),
            logits.dims()
        );
    }
    let targets = targets.to_dtype(DType::U32)?;
    let op = CrossEntropy {
        v,
        lse: Mutex::new(Vec::new()),
        keep: logits.track_op(),
    };
    apply2(logits, &targets, op)
}

struct CrossEntropy {
    v: usize,
    keep: bool,
    lse: Mutex<Vec<f32>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, v: usize) -> Result<&'a [u32]> {
    let t = match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(t), Some((a, b))) => &t[a..b],
        _ => bail!("cross_entropy: targets must be contiguous u32"),
    };
    if let Some((row, &bad)) = t.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
        bail!("cross_entropy: target {bad} in row {row} is out of range (vocabulary {v})");
    }
    Ok(t)
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "cross_entropy")?;
        let v = self.v;
        let t = targets_of(s2, l2, v)?;
        let lse: Vec<f32> = x
            .par_chunks(v)
            .map(|row| {
                let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln() + m
            })
            .collect();
        let ce: Vec<f32> = lse
            .iter()
            .zip(t)
            .enumerate()
            .map(|(i, (&lse, &t))| lse - x[i * v + t as usize])
            .collect();
        if self.keep {
            *self.lse.lock().expect("cross_entropy state") = lse;
        }
        Ok((CpuStorage::F32(ce), Shape::from(t.len())))
    }

    /// `∂x[n, j] = g[n]·(softmax(x[n])[j] − [j = t[n]])`.
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _ce: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let g = g.contiguous()?;
        Ok((
            Some(x.apply_op3_no_bwd(t, &g, &CrossEntropyGrad { fwd: self })?),
            None,
        ))
    }
}

struct CrossEntropyGrad<'a> {
    fwd: &'a CrossEntropy,
}

impl CustomOp3 for CrossEntropyGrad<'_> {
    fn name(&self) -> &'static str {
        "cross-entropy-grad-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "cross_entropy grad")?;
        let v = self.fwd.v;
        let t = targets_of(s2, l2, v)?;
        let g = f32_slice(s3, l3, "cross_entropy grad")?;
        let lse = self.fwd.lse.lock().expect("cross_entropy state");
        if lse.len() != t.len() {
            bail!("cross_entropy: backward without a forward that tracked gradients");
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(n, (dx, x))| {
                for (d, &x) in dx.iter_mut().zip(x) {
                    *d = g[n] * (x - lse[n]).exp();
                }
                dx[t[n] as usize] -= g[n];
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Head counts of the attention core.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `Hkv` (dividing `H`; query head `h` uses key/value head `h / (H/Hkv)`).
    pub kv_heads: usize,
    /// Features per head `D` (even with RoPE).
    pub head_dim: usize,
}

/// RoPE rows of positions `0..L`: `cos`/`sin` `(L, D/2)`, pairs `(2i, 2i+1)` rotated.
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// The attention core (the GPT's training forward, the T5 encoder): `qkv`
/// `(B, L, (H + 2·Hkv)·D)` is the fused projection (queries, keys, values; heads in order, each
/// head's `D` features contiguous); queries and keys are rotated by `rope` when given; `bias`
/// `(B|1, H|1, L, L)` is added to the scores times `scale`. Returns `(B, L, H·D)`:
/// `softmax(rope(q)·rope(k)ᵀ·scale + bias)·v` per head, heads side by side.
pub fn attention(
    qkv: &Tensor,
    rope: Option<Rope>,
    bias: &Tensor,
    heads: Heads,
    scale: f64,
) -> Result<Tensor> {
    let (b, l, w) = qkv.dims3()?;
    let Heads {
        heads: h,
        kv_heads: hkv,
        head_dim: d,
    } = heads;
    if hkv == 0 || h % hkv != 0 || (rope.is_some() && d % 2 != 0) || w != (h + 2 * hkv) * d {
        bail!(
            "attention: qkv {:?} does not hold {h} query and {hkv} key/value heads of {d}",
            qkv.dims()
        );
    }
    let rope = match rope {
        Some(Rope { cos, sin }) => {
            if cos.dims() != [l, d / 2] || sin.dims() != [l, d / 2] {
                bail!(
                    "attention: RoPE tables {:?}/{:?}, expected ({l}, {})",
                    cos.dims(),
                    sin.dims(),
                    d / 2
                );
            }
            let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            Some((host(cos)?, host(sin)?))
        }
        None => None,
    };
    let bd = bias.dims();
    if bd.len() != 4
        || !(bd[0] == 1 || bd[0] == b)
        || !(bd[1] == 1 || bd[1] == h)
        || bd[2] != l
        || bd[3] != l
    {
        bail!("attention: bias {bd:?}, expected ({b}|1, {h}|1, {l}, {l})");
    }
    let op = Attention {
        heads,
        scale: scale as f32,
        rope,
        bias_strides: (
            if bd[0] > 1 { bd[1] * l * l } else { 0 },
            if bd[1] > 1 { l * l } else { 0 },
        ),
        keep: qkv.track_op(),
        saved: Mutex::new(None),
    };
    apply2(qkv, bias, op)
}

struct Attention {
    heads: Heads,
    scale: f32,
    /// Host copies of the RoPE `cos` and `sin` rows.
    rope: Option<(Vec<f32>, Vec<f32>)>,
    /// Elements between the bias blocks of consecutive samples and heads (0: shared).
    bias_strides: (usize, usize),
    keep: bool,
    saved: Mutex<Option<Saved>>,
}

/// What the backward reads: `q` `(B, H, L, D)` and `k`, `v` `(B, Hkv, L, D)` after RoPE,
/// `p` `(B, H, L, L)` the probabilities.
struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

/// A pointer that parallel tasks write through, each to its own disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element at `i`.
    ///
    /// # Safety
    /// `i` must lie inside the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        unsafe { self.0.add(i) }
    }
}

impl Attention {
    /// Rows `0..L` of one head: `src` row `t` at `t·stride`, rotated into `dst` (`L × D`).
    fn rotate(&self, src: &[f32], stride: usize, dst: &mut [MaybeUninit<f32>], rope: bool) {
        let d = self.heads.head_dim;
        for (t, dst) in dst.chunks_mut(d).enumerate() {
            let x = &src[t * stride..][..d];
            let Some((cos, sin)) = self.rope.as_ref().filter(|_| rope) else {
                for (o, &v) in dst.iter_mut().zip(x) {
                    o.write(v);
                }
                continue;
            };
            let (c, s) = (&cos[t * d / 2..][..d / 2], &sin[t * d / 2..][..d / 2]);
            for i in 0..d / 2 {
                let (x0, x1) = (x[2 * i], x[2 * i + 1]);
                dst[2 * i].write(x0 * c[i] - x1 * s[i]);
                dst[2 * i + 1].write(x1 * c[i] + x0 * s[i]);
            }
        }
    }

    /// The transpose of [`Attention::rotate`] for gradients: `src` `L × D` into rows of `dst`
    /// at `t·stride`.
    ///
    /// # Safety
    /// `dst` must address `L` rows of `D` writable elements at `t·stride`.
    unsafe fn unrotate(&self, src: &[f32], dst: *mut f32, stride: usize, rope: bool) {
        let d = self.heads.head_dim;
        for (t, g) in src.chunks(d).enumerate() {
            let out = unsafe { std::slice::from_raw_parts_mut(dst.add(t * stride), d) };
            let Some((cos, sin)) = self.rope.as_ref().filter(|_| rope) else {
                out.copy_from_slice(g);
                continue;
            };
            let (c, s) = (&cos[t * d / 2..][..d / 2], &sin[t * d / 2..][..d / 2]);
            for i in 0..d / 2 {
                let (g0, g1) = (g[2 * i], g[2 * i + 1]);
                out[2 * i] = g0 * c[i] + g1 * s[i];
                out[2 * i + 1] = g1 * c[i] - g0 * s[i];
            }
        }
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "attention-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, "attention")?;
        let bias = f32_slice(s2, l2, "attention")?;
        let (b, l, w) = l1.shape().dims3()?;
        let Heads {
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        } = self.heads;
        let (ld, ll) = (l * d, l * l);
        // Heads in their own contiguous (L, D) blocks, queries and keys rotated.
        // Every buffer below is written whole before it is read.
        let split = |nh: usize, col0: usize, rope: bool| {
            let mut buf = uninit_buffer(b * nh * ld);
            buf.par_chunks_mut(ld).enumerate().for_each(|(bh, dst)| {
                let (bi, hi) = (bh / nh, bh % nh);
                self.rotate(&qkv[bi * l * w + (col0 + hi) * d..], w, dst, rope);
            });
            // SAFETY: the (L, D) chunks cover the buffer and `rotate` writes each whole.
            unsafe { assume_init(buf) }
        };
        let q = split(h, 0, true);
        let k = split(hkv, h, true);
        let v = split(hkv, h + hkv, false);
        let mut p = uninit_buffer(b * h * ll);
        let mut y = uninit_buffer(b * l * h * d);
        let yp = Out(y.as_mut_ptr().cast::<f32>());
        let r = h / hkv;
        p.par_chunks_mut(ll).enumerate().for_each(|(bh, p)| {
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * hkv + hi / r) * ld;
            let (qh, kg, vg) = (&q[bh * ld..][..ld], &k[kv..][..ld], &v[kv..][..ld]);
            let (bs, hs) = self.bias_strides;
            let bias = &bias[bi * bs + hi * hs..][..ll];
            // SAFETY: the operands are the (L, D) and (L, L) blocks above; each task writes its
            // own p block (all of it: `mm` without accumulation stores every element of C) and
            // its own head's columns of y.
            let p = unsafe {
                mm(
                    (l, l, d),
                    (qh.as_ptr(), d, 1),
                    (kg.as_ptr(), 1, d),
                    (p.as_mut_ptr().cast::<f32>(), l),
                    false,
                );
                assume_init_mut(p)
            };
            for (row, bias) in p.chunks_mut(l).zip(bias.chunks(l)) {
                let mut m = f32::NEG_INFINITY;
                for (x, &bv) in row.iter_mut().zip(bias) {
                    *x = *x * self.scale + bv;
                    m = m.max(*x);
                }
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                for x in row.iter_mut() {
                    *x /= sum;
                }
            }
            unsafe {
                let yh = yp.at(bi * l * h * d + hi * d);
                mm(
                    (l, d, l),
                    (p.as_ptr(), l, 1),
                    (vg.as_ptr(), d, 1),
                    (yh, h * d),
                    false,
                );
            }
        });
        // SAFETY: every p block was written by its task's `mm`, and the heads' column blocks of
        // the tasks' second `mm` cover y.
        let (p, y) = unsafe { (assume_init(p), assume_init(y)) };
        if self.keep {
            *self.saved.lock().expect("attention state") = Some(Saved { q, k, v, p });
        }
        Ok((CpuStorage::F32(y), Shape::from((b, l, h * d))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !qkv.track_op() {
            return Ok((None, None));
        }
        let g = g.contiguous()?;
        Ok((
            Some(g.apply_op1_no_bwd(&AttentionGrad {
                fwd: self,
                qkv: qkv.dims().to_vec(),
            })?),
            None,
        ))
    }
}

struct AttentionGrad<'a> {
    fwd: &'a Attention,
    qkv: Vec<usize>,
}

impl CustomOp1 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "attention-grad-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, lay: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, lay, "attention grad")?;
        let a = self.fwd;
        let saved = a.saved.lock().expect("attention state");
        let Some(Saved { q, k, v, p }) = saved.as_ref() else {
            bail!("attention: backward without a forward that tracked gradients");
        };
        let (b, l, w) = (self.qkv[0], self.qkv[1], self.qkv[2]);
        let Heads {
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        } = a.heads;
        let (ld, ll, r, hd) = (l * d, l * l, h / hkv, h * d);
        let mut dqkv = vec![0f32; b * l * w];
        let out = Out(dqkv.as_mut_ptr());
        (0..b * hkv).into_par_iter().for_each(|bg| {
            let (bi, gi) = (bg / hkv, bg % hkv);
            let (kg, vg) = (&k[bg * ld..][..ld], &v[bg * ld..][..ld]);
            let (mut dk, mut dv) = (vec![0f32; ld], vec![0f32; ld]);
            let (mut ds, mut dq) = (vec![0f32; ll], vec![0f32; ld]);
            let gb = &g[bi * l * hd..][..l * hd];
            for hi in gi * r..(gi + 1) * r {
                let bh = bi * h + hi;
                let (ph, qh, gh) = (
                    &p[bh * ll..][..ll],
                    &q[bh * ld..][..ld],
                    gb[hi * d..].as_ptr(),
                );
                // SAFETY: every operand is one of the blocks above (g's rows of this head at
                // stride H·D); each task writes only its own heads' columns of dqkv.
                unsafe {
                    // ∂v += pᵀ·g, ∂p = g·vᵀ
                    mm(
                        (l, d, l),
                        (ph.as_ptr(), 1, l),
                        (gh, hd, 1),
                        (dv.as_mut_ptr(), d),
                        true,
                    );
                    mm(
                        (l, l, d),
                        (gh, hd, 1),
                        (vg.as_ptr(), 1, d),
                        (ds.as_mut_ptr(), l),
                        false,
                    );
                }
                // ∂s = p ⊙ (∂p − Σ ∂p⊙p) · scale
                for (dsr, pr) in ds.chunks_mut(l).zip(ph.chunks(l)) {
                    let c = dot(dsr, pr);
                    for (x, &pv) in dsr.iter_mut().zip(pr) {
                        *x = pv * (*x - c) * a.scale;
                    }
                }
                unsafe {
                    // ∂q = ∂s·k, ∂k += ∂sᵀ·q
                    mm(
                        (l, d, l),
                        (ds.as_ptr(), l, 1),
                        (kg.as_ptr(), d, 1),
                        (dq.as_mut_ptr(), d),
                        false,
                    );
                    mm(
                        (l, d, l),
                        (ds.as_ptr(), 1, l),
                        (qh.as_ptr(), d, 1),
                        (dk.as_mut_ptr(), d),
                        true,
                    );
                    a.unrotate(&dq, out.at(bi * l * w + hi * d), w, true);
                }
            }
            unsafe {
                a.unrotate(&dk, out.at(bi * l * w + (h + gi) * d), w, true);
                a.unrotate(&dv, out.at(bi * l * w + (h + hkv + gi) * d), w, false);
            }
        });
        Ok((CpuStorage::F32(dqkv), Shape::from(self.qkv.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32, what: &str) -> Result<()> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err <= tol * scale,
            "{what}: max error {err} against max {scale}"
        );
        Ok(())
    }

    fn softmax(x: &Tensor) -> Result<Tensor> {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }

    /// The GPT's composed forms (as in `llamagen-train`), the references here.
    fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = x.dims4()?;
        let xs = x.reshape((b, l, h, d / 2, 2))?;
        let (x0, x1) = (xs.narrow(4, 0, 1)?, xs.narrow(4, 1, 1)?);
        let c = cos.reshape((1, l, 1, d / 2, 1))?;
        let s = sin.reshape((1, l, 1, d / 2, 1))?;
        let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
        let o1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
        Tensor::cat(&[o0, o1], 4)?.reshape((b, l, h, d))
    }

    fn attention_ref(
        qkv: &Tensor,
        rope: Option<Rope>,
        bias: &Tensor,
        hs: Heads,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, l, _) = qkv.dims3()?;
        let Heads {
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        } = hs;
        let q = qkv.narrow(2, 0, h * d)?.reshape((b, l, h, d))?;
        let k = qkv.narrow(2, h * d, hkv * d)?.reshape((b, l, hkv, d))?;
        let v = qkv
            .narrow(2, (h + hkv) * d, hkv * d)?
            .reshape((b, l, hkv, d))?;
        let (q, k) = match rope {
            Some(Rope { cos, sin }) => (rope_ref(&q, cos, sin)?, rope_ref(&k, cos, sin)?),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let r = h / hkv;
        let rep = |t: Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((b, hkv, r, l, d))?
                .reshape((b, h, l, d))
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let s = q.matmul(&k.t()?)?.affine(scale, 0.0)?.broadcast_add(bias)?;
        softmax(&s)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, h * d))
    }

    /// Values, and gradients of `Σ out ⊙ u` for a random `u`, of `f` against `reference`.
    fn check(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        what: &str,
    ) -> Result<()> {
        let v1: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let v2: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let t1: Vec<Tensor> = v1.iter().map(|v| v.as_tensor().clone()).collect();
        let t2: Vec<Tensor> = v2.iter().map(|v| v.as_tensor().clone()).collect();
        let (y1, y2) = (f(&t1)?, reference(&t2)?);
        close(&y1, &y2, 1e-5, &format!("{what} value"))?;
        let u = Tensor::randn(0f32, 1., y1.shape(), &Device::Cpu)?;
        let g1 = (&y1 * &u)?.sum_all()?.backward()?;
        let g2 = (&y2 * &u)?.sum_all()?.backward()?;
        for (i, (a, b)) in v1.iter().zip(&v2).enumerate() {
            let (a, b) = (g1.get(a).expect("gradient"), g2.get(b).expect("gradient"));
            close(a, b, 1e-4, &format!("{what} gradient of input {i}"))?;
            assert!(
                a.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                "{what}: zero gradient {i}"
            );
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![3usize, 40], vec![2, 37, 72]] {
            let d = *dims.last().unwrap();
            let x = Tensor::randn(0f32, 2., dims.as_slice(), &dev)?;
            let w = Tensor::randn(1f32, 0.5, d, &dev)?;
            check(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-5),
                |t| {
                    let inv = t[0]
                        .sqr()?
                        .mean_keepdim(D::Minus1)?
                        .affine(1.0, 1e-5)?
                        .sqrt()?
                        .recip()?;
                    t[0].broadcast_mul(&inv)?.broadcast_mul(&t[1])
                },
                "rms_norm",
            )?;
        }
        Ok(())
    }

    #[test]
    fn silu_mul_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 3., (5, 33_000), &dev)?;
        let b = Tensor::randn(0f32, 1., (5, 33_000), &dev)?;
        check(
            &[a, b],
            |t| silu_mul(&t[0], &t[1]),
            |t| t[0].silu()? * &t[1],
            "silu_mul",
        )
    }

    #[test]
    fn mul_constant_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        let c: Vec<f32> = (0..3 * 40_000).map(|i| [0.0, 1.25, -0.5][i % 3]).collect();
        let ct = Tensor::from_vec(c.clone(), (3, 40_000), &dev)?;
        let x = Tensor::randn(0f32, 1., (3, 40_000), &dev)?;
        check(
            &[x],
            |t| mul_constant(&t[0], c.clone()),
            |t| t[0].mul(&ct),
            "mul_constant",
        )
    }

    #[test]
    fn cross_entropy_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        let (n, v) = (19, 301);
        let x = Tensor::randn(0f32, 4., (n, v), &dev)?;
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
        let t = Tensor::new(t.as_slice(), &dev)?;
        let tc = t.reshape((n, 1))?;
        check(
            &[x],
            |x| cross_entropy(&x[0], &t),
            |x| {
                let m = x[0].max_keepdim(D::Minus1)?.detach();
                let diff = x[0].broadcast_sub(&m)?;
                let lp = diff.broadcast_sub(&diff.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
                lp.gather(&tc, 1)?.squeeze(1)?.neg()
            },
            "cross_entropy",
        )?;
        let bad = Tensor::new(&[0u32, v as u32], &dev)?;
        let err = cross_entropy(&Tensor::zeros((2, v), DType::F32, &dev)?, &bad).unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
        Ok(())
    }

    #[test]
    fn attention_matches_the_composed_form() -> Result<()> {
        let dev = Device::Cpu;
        // (B, L, H, Hkv, D, per-sample bias, RoPE): multi-head, grouped keys/values, a padded
        // batch; without RoPE, unscaled, with per-head biases (T5).
        for (b, l, h, hkv, d, per_sample, with_rope) in [
            (2, 13, 3, 3, 8, false, true),
            (1, 40, 4, 2, 16, false, true),
            (2, 9, 2, 1, 6, true, true),
            (2, 11, 3, 3, 5, true, false),
            (3, 7, 2, 2, 4, false, false),
        ] {
            let hs = Heads {
                heads: h,
                kv_heads: hkv,
                head_dim: d,
            };
            let qkv = Tensor::randn(0f32, 1., (b, l, (h + 2 * hkv) * d), &dev)?;
            let ang = Tensor::randn(0f32, 2., (l, d / 2), &dev)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            let rope = with_rope.then_some(Rope {
                cos: &cos,
                sin: &sin,
            });
            let nb = if per_sample { b } else { 1 };
            let mut bias: Vec<f32> = (0..nb * l * l)
                .map(|i| {
                    let (s, t, j) = (i / (l * l), i / l % l, i % l);
                    if j > t || (s == 1 && j < 2 && j != t) {
                        -1e30
                    } else {
                        0.0
                    }
                })
                .collect();
            let (nh, scale) = if with_rope {
                (1, 1.0 / (d as f64).sqrt())
            } else {
                (h, 1.0)
            };
            if nh > 1 {
                // A different bias per head (T5's relative positions), on top of the mask.
                bias = (0..nh)
                    .flat_map(|hi| bias.iter().map(move |&m| m + 0.25 * hi as f32))
                    .collect();
                let per = l * l;
                let heads_first: Vec<f32> = (0..nb)
                    .flat_map(|s| (0..nh).flat_map(move |hi| (0..per).map(move |i| (s, hi, i))))
                    .map(|(s, hi, i)| bias[hi * nb * per + s * per + i])
                    .collect();
                bias = heads_first;
            }
            let bias = Tensor::from_vec(bias, (nb, nh, l, l), &dev)?;
            check(
                &[qkv],
                |t| attention(&t[0], rope, &bias, hs, scale),
                |t| attention_ref(&t[0], rope, &bias, hs, scale),
                &format!("attention b{b} l{l} h{h}/{hkv} d{d} rope {with_rope}"),
            )?;
        }
        Ok(())
    }

    /// Without tracked inputs nothing is kept and the result is the same.
    #[test]
    fn untracked_forwards_agree() -> Result<()> {
        let dev = Device::Cpu;
        let hs = Heads {
            heads: 2,
            kv_heads: 2,
            head_dim: 4,
        };
        let qkv = Tensor::randn(0f32, 1., (1, 5, 24), &dev)?;
        let ang = Tensor::randn(0f32, 1., (5, 2), &dev)?;
        let bias = Tensor::zeros((1, 1, 5, 5), DType::F32, &dev)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let rope = Some(Rope {
            cos: &cos,
            sin: &sin,
        });
        let a = attention(&qkv, rope, &bias, hs, 0.5)?;
        let r = attention_ref(&qkv, rope, &bias, hs, 0.5)?;
        close(&a, &r, 1e-5, "untracked attention")
    }
}
