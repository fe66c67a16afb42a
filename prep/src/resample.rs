//! Pillow's `Image.resize` on 8-bit RGB, byte for byte, with scalar and AVX2 kernels.
//!
//! Invariants enforced here:
//! - Separable two-pass convolution, each pass rounded and clipped to u8. Pass order as Pillow 13
//!   chooses it: horizontal first, unless the height shrinks by more than twice as many pixels as
//!   the width does; the horizontal-first pass only resamples the rows the vertical pass reads.
//!   A pass whose size does not change is skipped.
//! - Antialiased filters (support × max(1, in/out)); coefficients normalised to sum 1, quantised
//!   to [`PRECISION_BITS`] fractional bits (rounded half away from zero); 32-bit accumulators
//!   starting at one half. BOX has support ½ and covers (−½, ½]; BILINEAR is the triangle;
//!   BICUBIC is Keys with a = −0.5; LANCZOS is `sinc(x)·sinc(x/3)` on [−3, 3).
//! - Mode `F` (one float32 channel, [`resize_f32`]): the same coefficients unquantised, float64
//!   sums stored as float32, the same pass order.
//! - Computing only a window of the output gives the same bytes as resizing everything and
//!   cropping. On x86-64 CPUs with AVX2 the two passes run as vector kernels computing the same
//!   integer sums (tests compare them with the scalar loops byte for byte).
//! - A pass that is an exact halving (BOX from 2n to n: every output reads two neighbouring
//!   inputs with weight ½ each) is `(a + b + 1) >> 1` per byte, since the sum starts at one half:
//!   the vector kernels compute it as a rounding byte average (`center_crop_arr`'s BOX halvings
//!   of the full-size image).

use image::RgbImage;

/// Fractional bits of Pillow's 8-bit resampling coefficients.
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX`: support ½, weight 1 on (−½, ½].
    Box,
    /// `Image.BILINEAR`: triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC`: Keys cubic, a = −0.5, support 2.
    Bicubic,
    /// `Image.LANCZOS`: `sinc(x)·sinc(x/3)` on [−3, 3), support 3.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        if self == Filter::Box {
            // Asymmetric: −½ is out, ½ is in.
            return if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 };
        }
        if self == Filter::Lanczos {
            // Asymmetric too: −3 is in, 3 is out.
            let sinc = |x: f64| {
                if x == 0.0 {
                    1.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x
                }
            };
            return if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            };
        }
        let x = x.abs();
        match self {
            Filter::Box | Filter::Lanczos => unreachable!("handled above"),
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point coefficients of one pass: output `i` reads inputs `start[i] .. start[i]+len[i]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
}

/// Normalised coefficients of one pass, as Pillow's `precompute_coeffs`: output `i` reads inputs
/// `start[i] .. start[i]+len[i]` with weights `k[i·ksize ..]`.
struct CoeffsF64 {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<f64>,
}

fn coeffs_f64(in_size: usize, out_size: usize, filter: Filter) -> CoeffsF64 {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut k = vec![0f64; out_size * ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let w = &mut k[xx * ksize..xx * ksize + n];
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate() {
            *wx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        if ww != 0.0 {
            for wx in w.iter_mut() {
                *wx /= ww;
            }
        }
        start.push(xmin);
        len.push(n);
    }
    CoeffsF64 {
        ksize,
        start,
        len,
        k,
    }
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let c = coeffs_f64(in_size, out_size, filter);
    let k =
        c.k.iter()
            .map(|&v| {
                let f = v * (1u32 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                }
            })
            .collect();
    Coeffs {
        ksize: c.ksize,
        start: c.start,
        len: c.len,
        k,
    }
}

/// Pillow's `Image.resize((out_w, out_h), filter)` of a mode-`F` image (one float32 channel,
/// `in_w`×`in_h`, row-major), as clean-fid resizes each channel: the same coefficients as the
/// 8-bit path without quantisation, each output a float64 sum of `pixel · weight` stored as
/// float32, pass order as [`resize_window`].
pub fn resize_f32(
    src: &[f32],
    in_w: usize,
    in_h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<f32> {
    assert_eq!(src.len(), in_w * in_h, "source size");
    let horizontal = |img: &[f32], w: usize, h: usize| -> Vec<f32> {
        let c = coeffs_f64(w, out_w, filter);
        let mut out = Vec::with_capacity(out_w * h);
        for row in img.chunks_exact(w) {
            for xx in 0..out_w {
                let k = &c.k[xx * c.ksize..xx * c.ksize + c.len[xx]];
                let px = &row[c.start[xx]..c.start[xx] + c.len[xx]];
                let ss: f64 = px.iter().zip(k).fold(0.0, |s, (&p, &w)| s + p as f64 * w);
                out.push(ss as f32);
            }
        }
        out
    };
    let vertical = |img: &[f32], w: usize, h: usize| -> Vec<f32> {
        let c = coeffs_f64(h, out_h, filter);
        let mut out = Vec::with_capacity(w * out_h);
        for yy in 0..out_h {
            let k = &c.k[yy * c.ksize..yy * c.ksize + c.len[yy]];
            for x in 0..w {
                let ss: f64 = k.iter().enumerate().fold(0.0, |s, (j, &wt)| {
                    s + img[(c.start[yy] + j) * w + x] as f64 * wt
                });
                out.push(ss as f32);
            }
        }
        out
    };
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    match (out_w != in_w, out_h != in_h) {
        (false, false) => src.to_vec(),
        (true, false) => horizontal(src, in_w, in_h),
        (false, true) => vertical(src, in_w, in_h),
        (true, true) if dh > 0 && dh > 2 * dw => {
            let mid = vertical(src, in_w, in_h);
            horizontal(&mid, in_w, out_h)
        }
        (true, true) => {
            let mid = horizontal(src, in_w, in_h);
            vertical(&mid, out_w, in_h)
        }
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    let s = v >> PRECISION_BITS;
    s.clamp(0, 255) as u8
}

/// Which kernels run the two passes: portable scalar loops, or AVX2 (x86-64 only, chosen at
/// run time). Both compute the same integer sums, so they give the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Kernels::Avx2;
        }
        Kernels::Scalar
    }

    /// The horizontal pass with these kernels (see [`horizontal_scalar`]).
    fn horizontal(
        self,
        block: &[u8],
        in_w: usize,
        h: &Coeffs,
        left: usize,
        cw: usize,
        mid: &mut [u8],
    ) {
        match self {
            Kernels::Scalar => horizontal_scalar(block, in_w, h, left, cw, mid),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 if halving(h, left, cw) => {
                let base = h.start[left] * 3;
                for (in_row, out_row) in block
                    .chunks_exact(in_w * 3)
                    .zip(mid.chunks_exact_mut(cw * 3))
                {
                    halve_pairs(&in_row[base..base + cw * 6], out_row);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2.
            Kernels::Avx2 => unsafe { avx2::horizontal(block, in_w, h, left, cw, mid) },
        }
    }

    /// The vertical pass with these kernels (see [`vertical_scalar`]).
    fn vertical(
        self,
        mid: &[u8],
        stride: usize,
        v: &Coeffs,
        row0: usize,
        top: usize,
        out: &mut [u8],
    ) {
        match self {
            Kernels::Scalar => vertical_scalar(mid, stride, v, row0, top, out),
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 if halving(v, top, out.len() / stride.max(1)) => {
                for (oy, out_row) in out.chunks_exact_mut(stride).enumerate() {
                    let r = v.start[top + oy] - row0;
                    let (a, b) = (
                        &mid[r * stride..][..stride],
                        &mid[(r + 1) * stride..][..stride],
                    );
                    for ((o, &a), &b) in out_row.iter_mut().zip(a).zip(b) {
                        *o = ((a as u16 + b as u16 + 1) >> 1) as u8;
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::Avx2` is only chosen when the CPU has AVX2.
            Kernels::Avx2 => unsafe { avx2::vertical(mid, stride, v, row0, top, out) },
        }
    }
}

/// The `cw`×`ch` window at (`left`, `top`) of Pillow's `img.resize((out_w, out_h), filter)`,
/// as packed RGB.
pub fn resize_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Filter,
    window: (u32, u32, u32, u32),
) -> Vec<u8> {
    resize_window_with(img, out_w, out_h, filter, window, Kernels::detect())
}

fn resize_window_with(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Filter,
    (left, top, cw, ch): (u32, u32, u32, u32),
    kernels: Kernels,
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let (left, top, cw, ch) = (left as usize, top as usize, cw as usize, ch as usize);
    assert!(
        left + cw <= out_w && top + ch <= out_h,
        "window inside output"
    );
    let src = img.as_raw();

    // Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    // pixels as the width does (both passes needed).
    let (dh, dw) = (in_h as i64 - out_h as i64, in_w as i64 - out_w as i64);
    if out_w != in_w && dh > 0 && dh > 2 * dw {
        let v = coeffs(in_h, out_h, filter);
        let mut h = coeffs(in_w, out_w, filter);
        // Source columns the horizontal pass reads for the window columns, and source rows the
        // vertical pass reads for the window rows.
        let col0 = h.start[left];
        let col1 = (left..left + cw)
            .map(|x| h.start[x] + h.len[x])
            .max()
            .unwrap_or(col0);
        let row0 = v.start[top];
        let row1 = (top..top + ch)
            .map(|y| v.start[y] + v.len[y])
            .max()
            .unwrap_or(row0);
        let ncols = col1 - col0;
        let mut block = Vec::with_capacity((row1 - row0) * ncols * 3);
        for y in row0..row1 {
            block.extend_from_slice(&src[(y * in_w + col0) * 3..(y * in_w + col1) * 3]);
        }
        let mut mid = vec![0u8; ch * ncols * 3];
        kernels.vertical(&block, ncols * 3, &v, row0, top, &mut mid);
        for s in h.start.iter_mut() {
            *s = s.saturating_sub(col0);
        }
        let mut out = vec![0u8; ch * cw * 3];
        kernels.horizontal(&mid, ncols, &h, left, cw, &mut out);
        return out;
    }

    // Rows of the source the vertical pass reads for the window rows.
    let vert = (out_h != in_h).then(|| coeffs(in_h, out_h, filter));
    let (row0, row1) = match &vert {
        Some(v) => (
            v.start[top],
            (top..top + ch)
                .map(|y| v.start[y] + v.len[y])
                .max()
                .unwrap_or(v.start[top]),
        ),
        None => (top, top + ch),
    };

    // Horizontal pass over those rows, window columns only: rows × cw × 3.
    let rows = row1 - row0;
    let mut mid = vec![0u8; rows * cw * 3];
    if out_w != in_w {
        let h = coeffs(in_w, out_w, filter);
        let block = &src[row0 * in_w * 3..row1 * in_w * 3];
        kernels.horizontal(block, in_w, &h, left, cw, &mut mid);
    } else {
        for y in 0..rows {
            let s = (row0 + y) * in_w * 3 + left * 3;
            mid[y * cw * 3..(y + 1) * cw * 3].copy_from_slice(&src[s..s + cw * 3]);
        }
    }

    // Vertical pass for the window rows.
    let Some(v) = vert else {
        return mid;
    };
    let mut out = vec![0u8; ch * cw * 3];
    kernels.vertical(&mid, cw * 3, &v, row0, top, &mut out);
    out
}

/// Whether outputs `from .. from + count` of a pass each read two neighbouring inputs with
/// weight ½, the pairs side by side (an exact BOX halving).
fn halving(c: &Coeffs, from: usize, count: usize) -> bool {
    let half = 1i32 << (PRECISION_BITS - 1);
    count > 0
        && (from..from + count).all(|i| {
            c.len[i] == 2
                && c.start[i] == c.start[from] + 2 * (i - from)
                && c.k[i * c.ksize] == half
                && c.k[i * c.ksize + 1] == half
        })
}

/// `dst` pixel `x` = the rounded average of `src` pixels `2x` and `2x + 1` (RGB), with AVX-512
/// byte permutes where the CPU has them.
fn halve_pairs(src: &[u8], dst: &mut [u8]) {
    assert_eq!(src.len(), 2 * dst.len());
    #[cfg(target_arch = "x86_64")]
    {
        static VBMI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *VBMI.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512vbmi")
                && std::arch::is_x86_feature_detected!("avx512bw")
        }) {
            // SAFETY: the CPU has the features; lengths checked above.
            return unsafe { halve_pairs_vbmi(src, dst) };
        }
    }
    for (o, p) in dst.chunks_exact_mut(3).zip(src.chunks_exact(6)) {
        for c in 0..3 {
            o[c] = ((p[c] as u16 + p[c + 3] as u16 + 1) >> 1) as u8;
        }
    }
}

/// [`halve_pairs`], ten output pixels (60 source bytes) per step: masked loads of the bytes and
/// of the bytes three on, a rounding byte average, then one permute picking 3 of every 6.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn halve_pairs_vbmi(src: &[u8], dst: &mut [u8]) {
    use std::arch::x86_64::*;
    let mut idx = [0u8; 64];
    for (j, v) in idx.iter_mut().enumerate().take(30) {
        *v = (6 * (j / 3) + j % 3) as u8;
    }
    // SAFETY (whole body): every load and store is masked to the bytes of `src` / `dst` it
    // covers: `6·m` bytes from `6x`, `6·m − 3` from `6x + 3`, `3·m` to `3x`.
    unsafe {
        let perm = _mm512_loadu_si512(idx.as_ptr().cast());
        let mask = |n: usize| -> u64 { if n >= 64 { u64::MAX } else { (1u64 << n) - 1 } };
        let n = dst.len() / 3;
        let mut x = 0;
        while x < n {
            let m = (n - x).min(10);
            let p = src.as_ptr().add(6 * x);
            let a = _mm512_maskz_loadu_epi8(mask(6 * m), p.cast());
            let b = _mm512_maskz_loadu_epi8(mask(6 * m - 3), p.add(3).cast());
            let r = _mm512_permutexvar_epi8(perm, _mm512_avg_epu8(a, b));
            _mm512_mask_storeu_epi8(dst.as_mut_ptr().add(3 * x).cast(), mask(3 * m), r);
            x += m;
        }
    }
}

/// Horizontal pass: `block` holds whole source rows (`in_w` pixels each); `mid` receives the
/// output columns `left .. left + cw` of each.
fn horizontal_scalar(
    block: &[u8],
    in_w: usize,
    h: &Coeffs,
    left: usize,
    cw: usize,
    mid: &mut [u8],
) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for (in_row, out_row) in block
        .chunks_exact(in_w * 3)
        .zip(mid.chunks_exact_mut(cw * 3))
    {
        for (ox, o) in out_row.chunks_exact_mut(3).enumerate() {
            let xx = left + ox;
            let k = &h.k[xx * h.ksize..xx * h.ksize + h.len[xx]];
            let px = &in_row[h.start[xx] * 3..(h.start[xx] + h.len[xx]) * 3];
            let (mut a0, mut a1, mut a2) = (half, half, half);
            for (p, &w) in px.chunks_exact(3).zip(k) {
                a0 += p[0] as i32 * w;
                a1 += p[1] as i32 * w;
                a2 += p[2] as i32 * w;
            }
            o[0] = clip8(a0);
            o[1] = clip8(a1);
            o[2] = clip8(a2);
        }
    }
}

/// Vertical pass: `mid` holds the horizontally resized rows from source row `row0` on
/// (`stride` bytes each); `out` receives output rows `top ..`.
fn vertical_scalar(mid: &[u8], stride: usize, v: &Coeffs, row0: usize, top: usize, out: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; stride];
    for (oy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let yy = top + oy;
        let k = &v.k[yy * v.ksize..yy * v.ksize + v.len[yy]];
        acc.fill(half);
        for (j, &w) in k.iter().enumerate() {
            let r = v.start[yy] - row0 + j;
            let line = &mid[r * stride..(r + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 versions of the two passes: the same 32-bit products and sums as the scalar loops
    //! (integer addition is exact, so the order of the sums does not matter).

    use std::arch::x86_64::*;

    use super::{Coeffs, PRECISION_BITS, clip8};

    /// Taps one step of [`horizontal`] covers (4 pixels, 12 of the 16 bytes it loads).
    const TAPS: usize = 4;
    /// Weights are split as `w = hi·2^SPLIT + lo` with `0 <= lo < 2^SPLIT`, so that both parts
    /// fit 16-bit lanes and the 16×16→32-bit multiply-adds give `Σ p·hi` and `Σ p·lo` exactly;
    /// `(Σ p·hi)·2^SPLIT + Σ p·lo` is then `Σ p·w`.
    const SPLIT: i32 = 11;

    /// See [`super::horizontal_scalar`]. Per output pixel and step of 4 taps: the 4 source
    /// pixels' bytes are spread into 16-bit lanes as (R of tap t, R of tap t+1, G…, B…, 0, 0)
    /// for taps (0,1) in the low half and (2,3) in the high half, then multiplied and summed in
    /// pairs against the matching weight parts.
    ///
    /// Callers must make sure the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) fn horizontal(
        block: &[u8],
        in_w: usize,
        h: &Coeffs,
        left: usize,
        cw: usize,
        mid: &mut [u8],
    ) {
        // Steps per column: enough for the longest support among the window's columns.
        let longest = h.len[left..left + cw].iter().copied().max().unwrap_or(0);
        let groups = longest.div_ceil(TAPS).max(1);
        // Weight parts per output column and step: `hi`, then `lo` (16 i16 lanes each).
        let mut kk = vec![_mm256_setzero_si256(); cw * groups * 2];
        let mut lanes = [[0i16; 16]; 2];
        for (ox, kc) in kk.chunks_exact_mut(groups * 2).enumerate() {
            let xx = left + ox;
            let k = &h.k[xx * h.ksize..xx * h.ksize + h.len[xx]];
            for (g, kg) in kc.chunks_exact_mut(2).enumerate() {
                let [hi, lo] = &mut lanes;
                for (lane, (hi, lo)) in hi.iter_mut().zip(lo).enumerate() {
                    // Lane: half (taps 0-1 or 2-3 of the step), channel, tap within the pair.
                    let (half, c, t) = (lane / 8, lane % 8 / 2, lane % 2);
                    let w = if c < 3 {
                        k.get(g * TAPS + 2 * half + t).copied().unwrap_or(0)
                    } else {
                        0
                    };
                    *hi = (w >> SPLIT) as i16;
                    *lo = (w & ((1 << SPLIT) - 1)) as i16;
                }
                for (v, l) in kg.iter_mut().zip(&lanes) {
                    // SAFETY: `l` is 32 bytes long.
                    *v = unsafe { _mm256_lddqu_si256(l.as_ptr() as *const __m256i) };
                }
            }
        }
        // Byte offset of each column's first source pixel in a row.
        let firsts: Vec<usize> = h.start[left..left + cw].iter().map(|&x| 3 * x).collect();
        const Z: i8 = -1; // a shuffle index that yields 0
        #[rustfmt::skip]
        let spread = _mm256_setr_epi8(
            0, Z, 3, Z, 1, Z, 4, Z, 2, Z, 5, Z, Z, Z, Z, Z,
            6, Z, 9, Z, 7, Z, 10, Z, 8, Z, 11, Z, Z, Z, Z, Z,
        );
        let half = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
        let row_bytes = in_w * 3;
        // A step loads 16 bytes from its first pixel; the last step of a column may start up
        // to TAPS − 1 pixels before the support's end and read past the row: rows too close
        // to the end of `block` are read from a copy with that much padding.
        let pad = 3 * TAPS * groups + 16;
        let mut padded = vec![0u8; row_bytes + pad];
        for (y, out_row) in mid.chunks_exact_mut(cw * 3).enumerate() {
            let base = y * row_bytes;
            let row: &[u8] = if base + row_bytes + pad <= block.len() {
                &block[base..base + row_bytes + pad]
            } else {
                padded[..row_bytes].copy_from_slice(&block[base..base + row_bytes]);
                &padded
            };
            for ((o, &first), kc) in out_row
                .chunks_exact_mut(3)
                .zip(&firsts)
                .zip(kk.chunks_exact(groups * 2))
            {
                let px = &row[first..][..3 * TAPS * groups + 16];
                let mut acc_hi = _mm256_setzero_si256();
                let mut acc_lo = _mm256_setzero_si256();
                // Step g loads bytes 12g .. 12g + 16 of `px`.
                for (step, kg) in px.windows(16).step_by(3 * TAPS).zip(kc.chunks_exact(2)) {
                    // SAFETY: `step` is 16 bytes long.
                    let v = unsafe { _mm_lddqu_si128(step.as_ptr() as *const __m128i) };
                    let v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), spread);
                    acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(v, kg[0]));
                    acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(v, kg[1]));
                }
                let acc = _mm256_add_epi32(_mm256_slli_epi32::<SPLIT>(acc_hi), acc_lo);
                let acc = _mm_add_epi32(
                    _mm_add_epi32(_mm256_castsi256_si128(acc), half),
                    _mm256_extracti128_si256::<1>(acc),
                );
                // Shift, then saturate to i16 and to u8: the clamp to 0..=255 of `clip8`.
                let s = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
                let bytes = _mm_packus_epi16(_mm_packs_epi32(s, s), s);
                let [r, g, b, _] = _mm_cvtsi128_si32(bytes).to_le_bytes();
                (o[0], o[1], o[2]) = (r, g, b);
            }
        }
    }

    /// See [`super::vertical_scalar`]: 32 bytes of a row at a time, accumulated in registers.
    ///
    /// Callers must make sure the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) fn vertical(
        mid: &[u8],
        stride: usize,
        v: &Coeffs,
        row0: usize,
        top: usize,
        out: &mut [u8],
    ) {
        let half = 1i32 << (PRECISION_BITS - 1);
        let vec_end = stride / 32 * 32;
        // After packing, the 4-byte groups are in the order 0 2 4 6 1 3 5 7: put them back.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (oy, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let yy = top + oy;
            let k = &v.k[yy * v.ksize..yy * v.ksize + v.len[yy]];
            let first = v.start[yy] - row0;
            let mut x = 0;
            while x < vec_end {
                let mut a = [_mm256_set1_epi32(half); 4];
                for (j, &w) in k.iter().enumerate() {
                    let wv = _mm256_set1_epi32(w);
                    let line = &mid[(first + j) * stride + x..(first + j) * stride + x + 32];
                    // SAFETY: `line` is 32 bytes long.
                    let b = unsafe { _mm256_lddqu_si256(line.as_ptr() as *const __m256i) };
                    let b0 = _mm256_castsi256_si128(b);
                    let b1 = _mm256_extracti128_si256::<1>(b);
                    let px = [
                        _mm256_cvtepu8_epi32(b0),
                        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b0)),
                        _mm256_cvtepu8_epi32(b1),
                        _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b1)),
                    ];
                    for (ai, pi) in a.iter_mut().zip(px) {
                        *ai = _mm256_add_epi32(*ai, _mm256_mullo_epi32(pi, wv));
                    }
                }
                // Shift, then saturate to i16 and to u8: the clamp to 0..=255 of `clip8`.
                let mut s = a;
                for si in &mut s {
                    *si = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(*si);
                }
                let w01 = _mm256_packs_epi32(s[0], s[1]);
                let w23 = _mm256_packs_epi32(s[2], s[3]);
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w01, w23), order);
                let dst = &mut out_row[x..x + 32];
                // SAFETY: `dst` is 32 bytes long.
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, bytes) };
                x += 32;
            }
            for (x, o) in out_row.iter_mut().enumerate().skip(vec_end) {
                let mut a = half;
                for (j, &w) in k.iter().enumerate() {
                    a += mid[(first + j) * stride + x] as i32 * w;
                }
                *o = clip8(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_equals_full_resize_then_crop() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x * y) as u8, (255 - x * 2) as u8])
        });
        for f in [
            Filter::Bicubic,
            Filter::Bilinear,
            Filter::Box,
            Filter::Lanczos,
        ] {
            let full = resize_window(&img, 150, 40, f, (0, 0, 150, 40));
            let win = resize_window(&img, 150, 40, f, (30, 5, 60, 30));
            for y in 0..30 {
                for x in 0..60 * 3 {
                    assert_eq!(win[y * 180 + x], full[(y + 5) * 450 + 90 + x]);
                }
            }
        }
    }

    /// A deterministic pseudo-random image (every byte value occurs; neighbouring pixels differ).
    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        RgbImage::from_fn(w, h, |_, _| {
            let mut px = [0u8; 3];
            for p in &mut px {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *p = (x >> 24) as u8;
            }
            image::Rgb(px)
        })
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_kernels_give_the_scalar_bytes() {
        let kernels = Kernels::detect();
        assert_eq!(
            kernels,
            Kernels::Avx2,
            "this x86-64 CPU has no AVX2: the vector kernels cannot be checked here"
        );
        // Down- and upscales, odd sizes, strides that are and are not multiples of 32 bytes,
        // windows at the edges (loads near the end of the image).
        type Case = ((u32, u32), (u32, u32), (u32, u32, u32, u32));
        let cases: &[Case] = &[
            ((512, 384), (298, 224), (37, 0, 224, 224)),
            ((384, 512), (224, 298), (0, 37, 224, 224)),
            ((512, 384), (256, 256), (0, 0, 256, 256)),
            ((97, 61), (224, 224), (0, 0, 224, 224)),
            ((1999, 1003), (446, 224), (111, 0, 224, 224)),
            ((3000, 40), (11, 7), (0, 0, 11, 7)),
            ((5, 700), (300, 3), (290, 1, 10, 2)),
            ((224, 300), (224, 224), (0, 0, 224, 224)),
            ((300, 224), (224, 224), (0, 0, 224, 224)),
            // Exact halvings (the BOX fast path): both axes, a window at the edges, the
            // vertical-first order, one axis odd (only the other halves), few pixels.
            ((512, 384), (256, 192), (0, 0, 256, 192)),
            ((1000, 602), (500, 301), (13, 5, 487, 296)),
            ((64, 3000), (32, 1500), (3, 700, 29, 800)),
            ((2000, 1001), (1000, 500), (0, 0, 1000, 500)),
            ((6, 4), (3, 2), (0, 0, 3, 2)),
        ];
        assert!(halving(&coeffs(512, 256, Filter::Box), 0, 256));
        assert!(halving(&coeffs(1000, 500, Filter::Box), 13, 487));
        assert!(!halving(&coeffs(1001, 500, Filter::Box), 0, 500));
        assert!(!halving(&coeffs(512, 256, Filter::Bilinear), 0, 256));
        for (i, &((w, h), (ow, oh), win)) in cases.iter().enumerate() {
            let img = noise(w, h, i as u32);
            for f in [
                Filter::Bicubic,
                Filter::Bilinear,
                Filter::Box,
                Filter::Lanczos,
            ] {
                let a = resize_window_with(&img, ow, oh, f, win, Kernels::Scalar);
                let b = resize_window_with(&img, ow, oh, f, win, kernels);
                assert_eq!(a.len(), (win.2 * win.3 * 3) as usize);
                assert!(a == b, "{w}x{h} -> {ow}x{oh} {win:?} {f:?}");
            }
        }
    }

    #[test]
    fn extreme_pixels_clamp_like_pillow() {
        // Black/white edges make bicubic overshoot below 0 and above 255: both kernels clamp.
        let img = RgbImage::from_fn(301, 203, |x, y| {
            let v = if (x / 3 + y / 5) % 2 == 0 { 255 } else { 0 };
            image::Rgb([v, 255 - v, v])
        });
        for kernels in [Kernels::Scalar, Kernels::detect()] {
            let out =
                resize_window_with(&img, 1000, 700, Filter::Bicubic, (0, 0, 1000, 700), kernels);
            assert!(out.contains(&0) && out.contains(&255));
            let reference = resize_window_with(
                &img,
                1000,
                700,
                Filter::Bicubic,
                (0, 0, 1000, 700),
                Kernels::Scalar,
            );
            assert!(out == reference);
        }
    }
}
