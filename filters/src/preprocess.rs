//! Image preprocessing of the scorers, bit-exact with PIL + torchvision on 8-bit RGB.
//!
//! Invariants enforced here:
//! - Resizing is Pillow's `Image.resize` for 8-bit images: separable, horizontal pass then
//!   vertical pass, each rounded and clipped to u8; antialiased filters (support × max(1, in/out));
//!   coefficients normalised to sum 1, quantised to 22 fractional bits (rounded half away from
//!   zero); 32-bit accumulators starting at one half. BICUBIC is Keys with a = −0.5, BILINEAR the
//!   triangle; a pass whose size does not change is skipped. Computing only a window of the output
//!   gives the same values as resizing everything and cropping.
//! - CLIP (`openai/CLIP` `_transform(n)`): the shorter side becomes n and the longer
//!   `int(n·long/short)` (truncated; no resize when the short side is already n), then the n×n
//!   window at `(round((h−n)/2), round((w−n)/2))` with Python's round-half-to-even, then `v/255`,
//!   then `(x − mean)/std` with CLIP's mean and std, all in float32, channel-first.
//! - Watermark (LAION-5B-WatermarkDetection): squash to 256×256 with BILINEAR (no crop), then
//!   ImageNet mean/std.
//! - Decoding converts to RGB first: grey is replicated, alpha is dropped (PIL resizes RGBA in
//!   premultiplied form, so transparent pixels of RGBA inputs may differ), EXIF orientation is not
//!   applied (as `PIL.Image.open`).

use std::io::Cursor;

use image::{ImageReader, Limits, RgbImage};

use crate::error::{FilterError, Result};

/// CLIP's per-channel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// ImageNet mean (RGB), used by the watermark classifier.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Version tag of this preprocessing, stored with every score.
pub const CLIP_PREPROCESS_VERSION: &str = "clip-bicubic-shortside-centercrop-v1";
pub const WATERMARK_PREPROCESS_VERSION: &str = "squash256-bilinear-imagenet-v1";

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR`: triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC`: Keys cubic, a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
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

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Coeffs {
        ksize,
        start,
        len,
        k,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    let s = v >> PRECISION_BITS;
    s.clamp(0, 255) as u8
}

/// The `cw`×`ch` window at (`left`, `top`) of Pillow's `img.resize((out_w, out_h), filter)`,
/// as packed RGB.
pub fn resize_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    filter: Filter,
    (left, top, cw, ch): (u32, u32, u32, u32),
) -> Vec<u8> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (out_w as usize, out_h as usize);
    let (left, top, cw, ch) = (left as usize, top as usize, cw as usize, ch as usize);
    assert!(
        left + cw <= out_w && top + ch <= out_h,
        "window inside output"
    );
    let src = img.as_raw();
    let half = 1i32 << (PRECISION_BITS - 1);

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
        for y in 0..rows {
            let in_row = &src[(row0 + y) * in_w * 3..(row0 + y + 1) * in_w * 3];
            let out_row = &mut mid[y * cw * 3..(y + 1) * cw * 3];
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
    let stride = cw * 3;
    let mut out = vec![0u8; ch * stride];
    let mut acc = vec![0i32; stride];
    for oy in 0..ch {
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
        for (o, &a) in out[oy * stride..(oy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Packed RGB (`w`×`h`) → channel-first floats `(v/255 − mean)/std`, appended to `out`.
pub fn normalise_chw(
    rgb: &[u8],
    w: usize,
    h: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut Vec<f32>,
) {
    let base = out.len();
    out.resize(base + 3 * w * h, 0.0);
    let plane = w * h;
    let dst = &mut out[base..];
    for (i, p) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            dst[c * plane + i] = (p[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
}

/// Output size of torchvision `Resize(n)` on a `w`×`h` image (shorter side → n).
pub fn short_side_size(w: u32, h: u32, n: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (n as u64 * long as u64) as f64 / short as f64;
    let new_long = new_long as u32; // Python int(): truncation
    if w <= h { (n, new_long) } else { (new_long, n) }
}

/// The `n`×`n` RGB pixels CLIP's Resize + CenterCrop produce (before float conversion).
pub fn clip_window(img: &RgbImage, n: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let (rw, rh) = if w.min(h) == n {
        (w, h)
    } else {
        short_side_size(w, h, n)
    };
    let top = ((rh as f64 - n as f64) / 2.0).round_ties_even() as u32;
    let left = ((rw as f64 - n as f64) / 2.0).round_ties_even() as u32;
    resize_window(img, rw, rh, Filter::Bicubic, (left, top, n, n))
}

/// CLIP's `_transform(n)` of an RGB image, appended to `out` as `[3,n,n]` floats.
pub fn clip_preprocess(img: &RgbImage, n: u32, out: &mut Vec<f32>) {
    let window = clip_window(img, n);
    normalise_chw(&window, n as usize, n as usize, CLIP_MEAN, CLIP_STD, out);
}

/// The `n`×`n` RGB pixels of the watermark classifier's squash resize.
pub fn watermark_window(img: &RgbImage, n: u32) -> Vec<u8> {
    resize_window(img, n, n, Filter::Bilinear, (0, 0, n, n))
}

/// The watermark classifier's preprocessing (squash to `n`×`n`), appended as `[3,n,n]`.
pub fn watermark_preprocess(img: &RgbImage, n: u32, out: &mut Vec<f32>) {
    let window = watermark_window(img, n);
    normalise_chw(
        &window,
        n as usize,
        n as usize,
        IMAGENET_MEAN,
        IMAGENET_STD,
        out,
    );
}

/// Decodes image bytes to RGB (see the module invariants). Images over `max_pixels` are refused
/// before their pixels are allocated.
pub fn decode_rgb(data: &[u8], max_pixels: u64) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| FilterError::Decode(e.to_string()))?;
    if reader.format().is_none() {
        return Err(FilterError::Decode("unrecognised image format".into()));
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| FilterError::Decode(e.to_string()))?;
    use image::ImageDecoder;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(FilterError::Decode(format!(
            "image has a zero side ({w}x{h})"
        )));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(FilterError::Decode(format!(
            "{w}x{h} image exceeds the limit of {max_pixels} pixels"
        )));
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    decoder
        .set_limits(limits)
        .map_err(|e| FilterError::Decode(e.to_string()))?;
    let img = image::DynamicImage::from_decoder(decoder)
        .map_err(|e| FilterError::Decode(e.to_string()))?;
    Ok(match img {
        image::DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_follow_torchvision() {
        assert_eq!(short_side_size(640, 480, 224), (298, 224));
        assert_eq!(short_side_size(480, 640, 224), (224, 298));
        assert_eq!(short_side_size(100, 100, 224), (224, 224));
    }

    #[test]
    fn window_equals_full_resize_then_crop() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x * y) as u8, (255 - x * 2) as u8])
        });
        for f in [Filter::Bicubic, Filter::Bilinear] {
            let full = resize_window(&img, 150, 40, f, (0, 0, 150, 40));
            let win = resize_window(&img, 150, 40, f, (30, 5, 60, 30));
            for y in 0..30 {
                for x in 0..60 * 3 {
                    assert_eq!(win[y * 180 + x], full[(y + 5) * 450 + 90 + x]);
                }
            }
        }
    }
}
