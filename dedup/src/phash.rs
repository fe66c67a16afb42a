//! The perceptual hash of PyPI's ImageHash (`imagehash.phash(PIL.Image.open(f))`, hash_size 8,
//! highfreq_factor 4), bit for bit.
//!
//! Invariants enforced here:
//! - Grey levels are Pillow's `convert("L")` of the image *as opened*: RGB and RGBA (alpha
//!   ignored, no compositing, as Pillow's `rgb2l`/`rgba2l`) give
//!   `L = (R·19595 + G·38470 + B·7471 + 0x8000) >> 16`; palette images (PNG `P`, GIF) give the
//!   same formula on the palette colour (transparency ignored); `L` and `LA` keep the grey level;
//!   16-bit grey (`I;16`, with or without a tRNS chunk) is clipped to 255 (not scaled); 16-bit
//!   RGB(A) and LA keep the high byte (Pillow opens them as 8-bit with the `;16B` raw modes).
//! - The 32×32 grey image is Pillow's `resize((32, 32), Image.Resampling.LANCZOS)` on 8 bits:
//!   [`llamagen_prep::resample::resize_window`] on the grey level replicated to RGB (Pillow
//!   resamples every 8-bit band with the same fixed-point kernels, so each RGB channel of the
//!   replicated image is byte for byte the L result).
//! - `scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)`: the unnormalised DCT-II
//!   (`2·Σ x[n]·cos(πk(2n+1)/2N)`) over the columns, then over the rows, in float64, computed
//!   with the same operations in the same order as SciPy's pocketfft (`T_dcst23` over a backward
//!   real FFT with radix-2/4 passes and the same twiddle factors), so every coefficient has the
//!   same rounding. A direct O(N²) sum would give the same values to about 1e-12 but not the
//!   same bits, and the hash compares coefficients with their median: on flat or symmetric
//!   images (exact zeros in SciPy, rounding noise in a direct sum) the bits would differ. No FFT
//!   library for this reason too: none reproduces pocketfft's rounding, and a 32-point transform
//!   is a few hundred flops.
//! - The top-left 8×8 coefficients, their median as `np.median` (mean of the 32nd and 33rd
//!   smallest, `(a + b) / 2`), the bits `coefficient > median`, row-major with the first bit the
//!   most significant: `format!("{:016x}", hash)` is `str(imagehash.phash(...))`.
//! - Decoding is the `image` crate's (zune-jpeg, image-webp, png, gif, ...): EXIF orientation is
//!   not applied (as `PIL.Image.open`); the first frame of animations and the first page of
//!   TIFFs. Lossy decoders may differ from libjpeg-turbo/libwebp by ±1 in a few pixels, which can
//!   flip a bit whose coefficient is near the median. CMYK JPEGs: Pillow converts inverted
//!   CMYK to RGB with its own formula (`cmyk2rgb`), the `image` crate with another, so their hashes
//!   are not exact. AVIF/HEIF are refused (no decoder in this build).

use std::f64::consts::{PI, SQRT_2};
use std::io::Cursor;
use std::sync::OnceLock;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use llamagen_prep::resample::{Filter, resize_window};

use crate::error::DedupError;

/// Side of the grey image the DCT runs on (`hash_size · highfreq_factor`).
pub const IMG_SIZE: usize = 32;
/// Side of the kept low-frequency block (`hash_size`).
pub const HASH_SIZE: usize = 8;
/// Default pixel limit of [`phash_bytes`] (Pillow's `MAX_IMAGE_PIXELS` error threshold is twice
/// 89,478,485; this refuses earlier, before allocating).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Number of differing bits (`imagehash`'s `h1 - h2`).
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Pillow's `rgb2l`.
#[inline]
fn rgb2l(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// pHash of an 8-bit RGB image (Pillow mode `RGB`).
pub fn phash(img: &RgbImage) -> u64 {
    let grey: Vec<u8> = img
        .as_raw()
        .chunks_exact(3)
        .map(|p| rgb2l(p[0], p[1], p[2]))
        .collect();
    phash_luma(img.width(), img.height(), &grey)
}

/// pHash of an 8-bit grey image (Pillow mode `L`), `width`×`height`, row-major.
pub fn phash_luma(width: u32, height: u32, grey: &[u8]) -> u64 {
    assert_eq!(
        grey.len(),
        width as usize * height as usize,
        "grey buffer size"
    );
    let px = resize_luma_32(width, height, grey);
    hash_from_pixels(&px)
}

/// pHash of encoded image bytes, as `imagehash.phash(PIL.Image.open(io.BytesIO(encoded)))`.
pub fn phash_bytes(encoded: &[u8]) -> Result<u64, DedupError> {
    phash_bytes_limited(encoded, DEFAULT_MAX_PIXELS)
}

/// [`phash_bytes`] refusing images over `max_pixels` before decoding them.
pub fn phash_bytes_limited(encoded: &[u8], max_pixels: u64) -> Result<u64, DedupError> {
    let (w, h, grey) = decode_luma(encoded, max_pixels)?;
    Ok(phash_luma(w, h, &grey))
}

/// Decodes to Pillow's `Image.open(...).convert("L")` (see the module invariants).
pub fn decode_luma(encoded: &[u8], max_pixels: u64) -> Result<(u32, u32, Vec<u8>), DedupError> {
    let reader = ImageReader::new(Cursor::new(encoded)).with_guessed_format()?;
    let Some(format) = reader.format() else {
        return Err(DedupError::UnsupportedFormat(
            "unrecognised image format".into(),
        ));
    };
    let mut decoder = reader.into_decoder().map_err(|e| image_error(e, format))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(DedupError::EmptyImage {
            width: w,
            height: h,
        });
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(DedupError::TooLarge {
            width: w,
            height: h,
            max_pixels,
        });
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    decoder
        .set_limits(limits)
        .map_err(|e| image_error(e, format))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(e, format))?;
    // A 16-bit grey PNG with a tRNS chunk decodes to LumaA16 here, but Pillow opens it as
    // `I;16` (clipped to L), not as `LA` (high byte).
    let png_grey16 = encoded.len() > 25
        && encoded.starts_with(b"\x89PNG\r\n\x1a\n")
        && &encoded[12..16] == b"IHDR"
        && encoded[24] == 16
        && encoded[25] == 0;
    let img = match img {
        DynamicImage::ImageLumaA16(i) if png_grey16 => {
            let luma: Vec<u16> = i.as_raw().chunks_exact(2).map(|p| p[0]).collect();
            DynamicImage::ImageLuma16(image::ImageBuffer::from_raw(w, h, luma).expect("size"))
        }
        other => other,
    };
    Ok((w, h, to_pillow_l(img)?))
}

fn image_error(e: image::ImageError, format: image::ImageFormat) -> DedupError {
    match e {
        image::ImageError::Decoding(d) => DedupError::Decode(d.to_string()),
        image::ImageError::Unsupported(u) => {
            DedupError::UnsupportedFormat(format!("{format:?}: {u}"))
        }
        other => DedupError::External {
            context: "decoding an image".into(),
            source: Box::new(other),
        },
    }
}

/// Pillow's `convert("L")` of the mode Pillow opens each decoded layout as.
fn to_pillow_l(img: DynamicImage) -> Result<Vec<u8>, DedupError> {
    Ok(match img {
        DynamicImage::ImageLuma8(i) => i.into_raw(),
        DynamicImage::ImageLumaA8(i) => i.as_raw().chunks_exact(2).map(|p| p[0]).collect(),
        DynamicImage::ImageRgb8(i) => i
            .as_raw()
            .chunks_exact(3)
            .map(|p| rgb2l(p[0], p[1], p[2]))
            .collect(),
        DynamicImage::ImageRgba8(i) => i
            .as_raw()
            .chunks_exact(4)
            .map(|p| rgb2l(p[0], p[1], p[2]))
            .collect(),
        // `I;16` → `L` clips (no scaling).
        DynamicImage::ImageLuma16(i) => i.as_raw().iter().map(|&v| v.min(255) as u8).collect(),
        // `LA;16B`, `RGB;16B`, `RGBA;16B` raw modes: the high byte.
        DynamicImage::ImageLumaA16(i) => i
            .as_raw()
            .chunks_exact(2)
            .map(|p| (p[0] >> 8) as u8)
            .collect(),
        DynamicImage::ImageRgb16(i) => i
            .as_raw()
            .chunks_exact(3)
            .map(|p| rgb2l((p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8))
            .collect(),
        DynamicImage::ImageRgba16(i) => i
            .as_raw()
            .chunks_exact(4)
            .map(|p| rgb2l((p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8))
            .collect(),
        other => {
            return Err(DedupError::UnsupportedPixelType(format!(
                "{:?}",
                other.color()
            )));
        }
    })
}

/// `Image.resize((32, 32), LANCZOS)` of a grey image.
fn resize_luma_32(width: u32, height: u32, grey: &[u8]) -> [u8; IMG_SIZE * IMG_SIZE] {
    let n = IMG_SIZE as u32;
    let mut out = [0u8; IMG_SIZE * IMG_SIZE];
    if width == n && height == n {
        out.copy_from_slice(grey);
        return out;
    }
    let rgb: Vec<u8> = grey.iter().flat_map(|&v| [v, v, v]).collect();
    let rgb = RgbImage::from_raw(width, height, rgb).expect("buffer size");
    let small = resize_window(&rgb, n, n, Filter::Lanczos, (0, 0, n, n));
    for (o, p) in out.iter_mut().zip(small.chunks_exact(3)) {
        *o = p[0];
    }
    out
}

/// The hash of the 32×32 grey pixels: DCT, 8×8 block, median, bits.
pub fn hash_from_pixels(px: &[u8; IMG_SIZE * IMG_SIZE]) -> u64 {
    let plan = plan();
    let mut m = [0f64; IMG_SIZE * IMG_SIZE];
    // axis=0: every column.
    let mut col = [0f64; IMG_SIZE];
    for x in 0..IMG_SIZE {
        for y in 0..IMG_SIZE {
            col[y] = px[y * IMG_SIZE + x] as f64;
        }
        plan.dct2(&mut col);
        for y in 0..HASH_SIZE {
            m[y * IMG_SIZE + x] = col[y];
        }
    }
    // axis=1: the rows the 8×8 block reads (a row's transform reads only that row).
    let mut low = [0f64; HASH_SIZE * HASH_SIZE];
    for y in 0..HASH_SIZE {
        let row: &mut [f64; IMG_SIZE] = (&mut m[y * IMG_SIZE..(y + 1) * IMG_SIZE])
            .try_into()
            .unwrap();
        plan.dct2(row);
        low[y * HASH_SIZE..(y + 1) * HASH_SIZE].copy_from_slice(&row[..HASH_SIZE]);
    }
    let mut sorted = low;
    sorted.sort_unstable_by(f64::total_cmp);
    let half = sorted.len() / 2;
    let med = (sorted[half - 1] + sorted[half]) / 2.0;
    low.iter().fold(0u64, |h, &v| (h << 1) | u64::from(v > med))
}

// ---------------------------------------------------------------------------------------------
// SciPy's pocketfft (`pocketfft_hdronly.h`), the DCT-II of length 32 only: `T_dcst23::exec`
// (type 2, cosine, not ortho, fct 1) over `rfftp::exec` backward with factors [2, 4, 4].

/// `sincos_2pibyn<double>`: e^(2πi·k/n) from two tables, as pocketfft computes them.
struct SinCos2PiByN {
    n: usize,
    mask: usize,
    shift: usize,
    v1: Vec<(f64, f64)>,
    v2: Vec<(f64, f64)>,
}

impl SinCos2PiByN {
    fn calc(x: usize, n: usize, ang: f64) -> (f64, f64) {
        let (c, s) = (
            |v: usize| (v as f64 * ang).cos(),
            |v: usize| (v as f64 * ang).sin(),
        );
        let mut x = x << 3;
        if x < 4 * n {
            if x < 2 * n {
                if x < n {
                    return (c(x), s(x));
                }
                return (s(2 * n - x), c(2 * n - x));
            }
            x -= 2 * n;
            if x < n {
                return (-s(x), c(x));
            }
            (-c(2 * n - x), s(2 * n - x))
        } else {
            x = 8 * n - x;
            if x < 2 * n {
                if x < n {
                    return (c(x), -s(x));
                }
                return (s(2 * n - x), -c(2 * n - x));
            }
            x -= 2 * n;
            if x < n {
                return (-s(x), -c(x));
            }
            (-c(2 * n - x), -s(2 * n - x))
        }
    }

    fn new(n: usize) -> Self {
        assert!(
            n.is_power_of_two(),
            "0.25L·π/n is exact in double only for powers of two"
        );
        // `Thigh(0.25L*pi/n)`: the long-double π rounds to `PI`, the scalings are exact.
        let ang = 0.25 * PI / n as f64;
        let nval = (n + 2) / 2;
        let mut shift = 1;
        while (1usize << shift) * (1usize << shift) < nval {
            shift += 1;
        }
        let mask = (1usize << shift) - 1;
        let mut v1 = vec![(1.0, 0.0); mask + 1];
        for (i, v) in v1.iter_mut().enumerate().skip(1) {
            *v = Self::calc(i, n, ang);
        }
        let mut v2 = vec![(1.0, 0.0); nval.div_ceil(mask + 1)];
        for (i, v) in v2.iter_mut().enumerate().skip(1) {
            *v = Self::calc(i * (mask + 1), n, ang);
        }
        SinCos2PiByN {
            n,
            mask,
            shift,
            v1,
            v2,
        }
    }

    fn get(&self, idx: usize) -> (f64, f64) {
        let (idx, sign) = if 2 * idx <= self.n {
            (idx, 1.0)
        } else {
            (self.n - idx, -1.0)
        };
        let (x1, x2) = (self.v1[idx & self.mask], self.v2[idx >> self.shift]);
        let im = x1.0 * x2.1 + x1.1 * x2.0;
        (x1.0 * x2.0 - x1.1 * x2.1, if sign < 0.0 { -im } else { im })
    }
}

struct Plan {
    /// Real-FFT factors in pocketfft's order ([2, 4, 4] for 32).
    factors: Vec<usize>,
    /// Twiddles of each factor but the last (`rfftp::comp_twiddle`).
    tw: Vec<Vec<f64>>,
    /// `T_dcst23::twiddle`: cos(π(i+1)/2N).
    twiddle: [f64; IMG_SIZE],
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| {
        let n = IMG_SIZE;
        // rfftp::factorize: fours, then a two moved to the front.
        let mut factors = Vec::new();
        let mut len = n;
        while len.is_multiple_of(4) {
            factors.push(4);
            len >>= 2;
        }
        if len.is_multiple_of(2) {
            len >>= 1;
            factors.push(2);
            let last = factors.len() - 1;
            factors.swap(0, last);
        }
        assert_eq!(len, 1, "only radix-2/4 lengths");
        let twid = SinCos2PiByN::new(n);
        let mut tw = Vec::new();
        let mut l1 = 1;
        for (k, &ip) in factors.iter().enumerate() {
            let ido = n / (l1 * ip);
            let mut t = vec![0f64; (ip - 1) * (ido.max(1) - 1)];
            if k < factors.len() - 1 {
                for j in 1..ip {
                    for i in 1..=(ido - 1) / 2 {
                        let w = twid.get(j * l1 * i);
                        t[(j - 1) * (ido - 1) + 2 * i - 2] = w.0;
                        t[(j - 1) * (ido - 1) + 2 * i - 1] = w.1;
                    }
                }
            }
            tw.push(t);
            l1 *= ip;
        }
        let t4 = SinCos2PiByN::new(4 * n);
        let mut twiddle = [0f64; IMG_SIZE];
        for (i, t) in twiddle.iter_mut().enumerate() {
            *t = t4.get(i + 1).0;
        }
        Plan {
            factors,
            tw,
            twiddle,
        }
    })
}

impl Plan {
    /// `T_dcst23::exec(c, 1.0, ortho=false, type=2, cosine=true)`.
    fn dct2(&self, c: &mut [f64; IMG_SIZE]) {
        const N: usize = IMG_SIZE;
        const NS2: usize = N.div_ceil(2);
        c[0] *= 2.0;
        c[N - 1] *= 2.0;
        let mut k = 1;
        while k < N - 1 {
            // MPINPLACE(c[k+1], c[k])
            let t = c[k + 1];
            c[k + 1] = t - c[k];
            c[k] += t;
            k += 2;
        }
        self.rfft_backward(c);
        let tw = &self.twiddle;
        for k in 1..NS2 {
            let kc = N - k;
            let t1 = tw[k - 1] * c[kc] + tw[kc - 1] * c[k];
            let t2 = tw[k - 1] * c[k] - tw[kc - 1] * c[kc];
            c[k] = 0.5 * (t1 + t2);
            c[kc] = 0.5 * (t1 - t2);
        }
        c[NS2] *= tw[NS2 - 1];
    }

    /// `rfftp::exec(c, 1.0, r2hc=false)`.
    fn rfft_backward(&self, c: &mut [f64; IMG_SIZE]) {
        let n = IMG_SIZE;
        let mut a = *c;
        let mut b = [0f64; IMG_SIZE];
        let (mut p1, mut p2) = (&mut a, &mut b);
        let mut l1 = 1;
        for (k, &ip) in self.factors.iter().enumerate() {
            let ido = n / (ip * l1);
            match ip {
                4 => radb4(ido, l1, p1, p2, &self.tw[k]),
                2 => radb2(ido, l1, p1, p2, &self.tw[k]),
                _ => unreachable!("factors are 2 and 4"),
            }
            std::mem::swap(&mut p1, &mut p2);
            l1 *= ip;
        }
        *c = *p1;
    }
}

fn radb2(ido: usize, l1: usize, cc: &[f64], ch: &mut [f64], wa: &[f64]) {
    let cci = |a: usize, b: usize, c: usize| a + ido * (b + 2 * c);
    let chi = |a: usize, b: usize, c: usize| a + ido * (b + l1 * c);
    for k in 0..l1 {
        let (x, y) = (cc[cci(0, 0, k)], cc[cci(ido - 1, 1, k)]);
        ch[chi(0, k, 0)] = x + y;
        ch[chi(0, k, 1)] = x - y;
    }
    if ido & 1 == 0 {
        for k in 0..l1 {
            ch[chi(ido - 1, k, 0)] = 2.0 * cc[cci(ido - 1, 0, k)];
            ch[chi(ido - 1, k, 1)] = -2.0 * cc[cci(0, 1, k)];
        }
    }
    if ido <= 2 {
        return;
    }
    for k in 0..l1 {
        for i in (2..ido).step_by(2) {
            let ic = ido - i;
            let (a, b) = (cc[cci(i - 1, 0, k)], cc[cci(ic - 1, 1, k)]);
            ch[chi(i - 1, k, 0)] = a + b;
            let tr2 = a - b;
            let (a, b) = (cc[cci(i, 0, k)], cc[cci(ic, 1, k)]);
            let ti2 = a + b;
            ch[chi(i, k, 0)] = a - b;
            let (wr, wi) = (wa[i - 2], wa[i - 1]);
            ch[chi(i, k, 1)] = wr * ti2 + wi * tr2;
            ch[chi(i - 1, k, 1)] = wr * tr2 - wi * ti2;
        }
    }
}

fn radb4(ido: usize, l1: usize, cc: &[f64], ch: &mut [f64], wa: &[f64]) {
    let cci = |a: usize, b: usize, c: usize| a + ido * (b + 4 * c);
    let chi = |a: usize, b: usize, c: usize| a + ido * (b + l1 * c);
    let w = |x: usize, i: usize| wa[i + x * (ido - 1)];
    for k in 0..l1 {
        let (a, b) = (cc[cci(0, 0, k)], cc[cci(ido - 1, 3, k)]);
        let (tr2, tr1) = (a + b, a - b);
        let tr3 = 2.0 * cc[cci(ido - 1, 1, k)];
        let tr4 = 2.0 * cc[cci(0, 2, k)];
        ch[chi(0, k, 0)] = tr2 + tr3;
        ch[chi(0, k, 2)] = tr2 - tr3;
        ch[chi(0, k, 3)] = tr1 + tr4;
        ch[chi(0, k, 1)] = tr1 - tr4;
    }
    if ido & 1 == 0 {
        for k in 0..l1 {
            let (a, b) = (cc[cci(0, 3, k)], cc[cci(0, 1, k)]);
            let (ti1, ti2) = (a + b, a - b);
            let (a, b) = (cc[cci(ido - 1, 0, k)], cc[cci(ido - 1, 2, k)]);
            let (tr2, tr1) = (a + b, a - b);
            ch[chi(ido - 1, k, 0)] = tr2 + tr2;
            ch[chi(ido - 1, k, 1)] = SQRT_2 * (tr1 - ti1);
            ch[chi(ido - 1, k, 2)] = ti2 + ti2;
            ch[chi(ido - 1, k, 3)] = -SQRT_2 * (tr1 + ti1);
        }
    }
    if ido <= 2 {
        return;
    }
    for k in 0..l1 {
        for i in (2..ido).step_by(2) {
            let ic = ido - i;
            let pm = |a: f64, b: f64| (a + b, a - b);
            let (tr2, tr1) = pm(cc[cci(i - 1, 0, k)], cc[cci(ic - 1, 3, k)]);
            let (ti1, ti2) = pm(cc[cci(i, 0, k)], cc[cci(ic, 3, k)]);
            let (tr4, ti3) = pm(cc[cci(i, 2, k)], cc[cci(ic, 1, k)]);
            let (tr3, ti4) = pm(cc[cci(i - 1, 2, k)], cc[cci(ic - 1, 1, k)]);
            let cr3;
            (ch[chi(i - 1, k, 0)], cr3) = pm(tr2, tr3);
            let ci3;
            (ch[chi(i, k, 0)], ci3) = pm(ti2, ti3);
            let (cr4, cr2) = pm(tr1, tr4);
            let (ci2, ci4) = pm(ti1, ti4);
            for (j, (ci, cr)) in [(ci2, cr2), (ci3, cr3), (ci4, cr4)].into_iter().enumerate() {
                let (wr, wi) = (w(j, i - 2), w(j, i - 1));
                ch[chi(i, k, j + 1)] = wr * ci + wi * cr;
                ch[chi(i - 1, k, j + 1)] = wr * cr - wi * ci;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unnormalised DCT-II by definition, to check the pocketfft port to rounding.
    fn dct2_direct(x: &[f64; IMG_SIZE]) -> [f64; IMG_SIZE] {
        let n = IMG_SIZE as f64;
        let mut out = [0f64; IMG_SIZE];
        for (k, o) in out.iter_mut().enumerate() {
            *o = 2.0
                * x.iter()
                    .enumerate()
                    .map(|(i, &v)| v * (PI * k as f64 * (2.0 * i as f64 + 1.0) / (2.0 * n)).cos())
                    .sum::<f64>();
        }
        out
    }

    #[test]
    fn dct_port_is_the_dct() {
        let mut x = [0f64; IMG_SIZE];
        for (i, v) in x.iter_mut().enumerate() {
            *v = ((i * 37 + 11) % 256) as f64;
        }
        let want = dct2_direct(&x);
        let mut got = x;
        plan().dct2(&mut got);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9 * 8192.0, "{g} vs {w}");
        }
    }

    #[test]
    fn flat_images_have_exact_zero_ac() {
        let mut x = [128f64; IMG_SIZE];
        plan().dct2(&mut x);
        assert_eq!(x[0], 8192.0);
        assert!(x[1..].iter().all(|&v| v == 0.0), "{x:?}");
        // imagehash: 8000000000000000 for any flat non-black image, 0 for black.
        assert_eq!(phash_luma(5, 7, &[128; 35]), 0x8000_0000_0000_0000);
        assert_eq!(phash_luma(5, 7, &[0; 35]), 0);
    }

    #[test]
    fn hamming_counts_bits() {
        assert_eq!(hamming(0, 0), 0);
        assert_eq!(hamming(0, u64::MAX), 64);
        assert_eq!(hamming(0b1011, 0b0110), 3);
    }

    #[test]
    fn rgb2l_is_pillows() {
        assert_eq!(rgb2l(255, 255, 255), 255);
        assert_eq!(rgb2l(0, 0, 0), 0);
        // Pillow 13: Image.new("RGB", (1, 1), (216, 181, 49)).convert("L") == 176.
        assert_eq!(rgb2l(216, 181, 49), 176);
    }
}
