//! LlamaGen's image preprocessing for code extraction: `center_crop_arr` (ADM), TenCrop, the
//! horizontal flip and the `[−1, 1]` normalisation, bit-exact with Pillow and torchvision.
//!
//! Invariants enforced here:
//! - Resizing is Pillow's `Image.resize` on 8-bit RGB: a separable two-pass convolution
//!   (horizontal first unless the height shrinks by more than twice as many pixels as the
//!   width, as Pillow 13 orders them; each pass rounded and clipped to u8), with antialiased
//!   support-scaled filters (support × max(1, in/out)), coefficients normalised to sum 1 and
//!   then quantised to fixed point with [`PRECISION_BITS`] fractional bits (rounded half away
//!   from zero), accumulators starting at one half. BICUBIC is the Keys kernel with a = −0.5 and
//!   support 2; BOX has support ½ and covers (−½, ½]. A pass whose size does not change is
//!   skipped. (Resizers with 16-bit coefficients, such as fast_image_resize's convolution,
//!   round differently and are off by up to tens of levels, so the resampler lives here.)
//! - `center_crop_arr(img, S)`: halve with BOX (`(W//2, H//2)`) while `min(W, H) ≥ 2S`, then
//!   BICUBIC-resize to `(round(W·S/min), round(H·S/min))` rounding half to even, then take the
//!   S×S window at `((H′−S)//2, (W′−S)//2)`.
//! - TenCrop(S) of an image: tl, tr, bl, br, center, then the same five of the horizontally
//!   flipped image; the center offset is `round((dim − S)/2)` rounding half to even.
//! - Pixels become floats as `(v/255 − 0.5)/0.5` in float32 (ToTensor, then Normalize(0.5,
//!   0.5)), channel-first.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::EncodeError;

type Result<T> = std::result::Result<T, EncodeError>;

/// Fractional bits of Pillow's 8-bit resampling coefficients.
pub const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The crop ranges of LlamaGen's ten-crop code sets (`ten_crop` and `ten_crop_105`).
pub const CROP_RANGES: [f64; 2] = [1.1, 1.05];

/// A resampling filter of Pillow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BOX`: support ½, weight 1 on (−½, ½].
    Box,
    /// `Image.BICUBIC`: Keys cubic with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
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

/// Fixed-point coefficients of one resampling pass: for output pixel `i`, input pixels
/// `start[i] .. start[i] + len[i]` weighted by `coeffs[i·ksize ..]`.
struct Coeffs {
    ksize: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    coeffs: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Truncation toward zero, as C's (int) cast.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut coeffs[xx * ksize..(xx + 1) * ksize];
        for (x, c) in row.iter_mut().enumerate().take(n) {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let v = w * (1u32 << PRECISION_BITS) as f64;
            *c = if w < 0.0 {
                (-0.5 + v) as i32
            } else {
                (0.5 + v) as i32
            };
        }
        start.push(xmin);
        len.push(n);
    }
    Coeffs {
        ksize,
        start,
        len,
        coeffs,
    }
}

impl Coeffs {
    /// Whether the pass is an exact 2:1 average (BOX halving an even size): output `i` is
    /// `(in[2i]·w + in[2i+1]·w + half) >> PRECISION_BITS` with `w = half`, which is
    /// `(in[2i] + in[2i+1] + 1) >> 1` exactly.
    fn is_halving(&self) -> bool {
        let w = 1i32 << (PRECISION_BITS - 1);
        (0..self.start.len()).all(|i| {
            self.start[i] == 2 * i
                && self.len[i] == 2
                && self.coeffs[i * self.ksize] == w
                && self.coeffs[i * self.ksize + 1] == w
        })
    }
}

/// Pillow's clip8 on a 32-bit accumulator (Pillow's own type: coefficients and sums of 8-bit
/// passes stay below 2^31).
#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1i32 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((width, height), filter)` of an RGB image.
///
/// Pass order as Pillow 13 chooses it: horizontal first, unless the height shrinks by more
/// than twice as many pixels as the width does; the horizontal-first pass only resamples the
/// rows the vertical pass reads.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(EncodeError::InvalidInput(format!(
            "cannot resize {in_w}x{in_h} to {out_w}x{out_h}: empty image"
        )));
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let src = img.as_raw();
    let out = match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => {
            let horiz = precompute_coeffs(in_w, out_w, filter);
            horizontal_pass(src, in_w, 0..in_h, &horiz)
        }
        (false, true) => {
            let vert = precompute_coeffs(in_h, out_h, filter);
            vertical_pass(src, in_w, &vert)
        }
        (true, true) if horizontal_first => {
            let horiz = precompute_coeffs(in_w, out_w, filter);
            let mut vert = precompute_coeffs(in_h, out_h, filter);
            let first = vert.start[0];
            let last = vert.start[out_h - 1] + vert.len[out_h - 1];
            for s in vert.start.iter_mut() {
                *s -= first;
            }
            let tmp = horizontal_pass(src, in_w, first..last, &horiz);
            vertical_pass(&tmp, out_w, &vert)
        }
        (true, true) => {
            let vert = precompute_coeffs(in_h, out_h, filter);
            let horiz = precompute_coeffs(in_w, out_w, filter);
            let tmp = vertical_pass(src, in_w, &vert);
            horizontal_pass(&tmp, in_w, 0..out_h, &horiz)
        }
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out)
        .ok_or_else(|| EncodeError::InvalidInput("resized buffer has the wrong size".into()))
}

/// Pillow's horizontal 8-bit pass over `rows` of an RGB buffer `in_w` pixels wide.
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    rows: std::ops::Range<usize>,
    horiz: &Coeffs,
) -> Vec<u8> {
    let out_w = horiz.start.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; out_w * rows.len() * 3];
    let halving = horiz.is_halving();
    for (y, out_row) in rows.zip(out.chunks_exact_mut(out_w * 3)) {
        let in_row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        if halving {
            for (o, i) in out_row.chunks_exact_mut(3).zip(in_row.chunks_exact(6)) {
                o[0] = ((i[0] as u16 + i[3] as u16 + 1) >> 1) as u8;
                o[1] = ((i[1] as u16 + i[4] as u16 + 1) >> 1) as u8;
                o[2] = ((i[2] as u16 + i[5] as u16 + 1) >> 1) as u8;
            }
            continue;
        }
        for (xx, o) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = (horiz.start[xx], horiz.len[xx]);
            let k = &horiz.coeffs[xx * horiz.ksize..xx * horiz.ksize + n];
            let px = &in_row[xmin * 3..(xmin + n) * 3];
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
    out
}

/// Pillow's vertical 8-bit pass of an RGB buffer `width` pixels wide.
fn vertical_pass(input: &[u8], width: usize, vert: &Coeffs) -> Vec<u8> {
    let out_h = vert.start.len();
    let stride = width * 3;
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; stride * out_h];
    if vert.is_halving() {
        for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
            let a = &input[2 * yy * stride..(2 * yy + 1) * stride];
            let b = &input[(2 * yy + 1) * stride..(2 * yy + 2) * stride];
            for ((o, &x), &y) in out_row.iter_mut().zip(a).zip(b) {
                *o = ((x as u16 + y as u16 + 1) >> 1) as u8;
            }
        }
        return out;
    }
    // Row-wise accumulation: the same integer sums as Pillow's per-pixel loop.
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let k = &vert.coeffs[yy * vert.ksize..];
        let ymin = vert.start[yy];
        acc.fill(half);
        for (y, &w) in k.iter().enumerate().take(vert.len[yy]) {
            let row = &input[(ymin + y) * stride..(ymin + y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Python's `round(x)` for the sizes of `center_crop_arr`: half to even.
fn round_half_even(x: f64) -> u32 {
    x.round_ties_even() as u32
}

/// The S×S window of `img` at (left, top).
pub fn crop(img: &RgbImage, left: u32, top: u32, width: u32, height: u32) -> Result<RgbImage> {
    if left + width > img.width() || top + height > img.height() {
        return Err(EncodeError::InvalidInput(format!(
            "crop {width}x{height} at ({left}, {top}) exceeds the {}x{} image",
            img.width(),
            img.height()
        )));
    }
    Ok(image::imageops::crop_imm(img, left, top, width, height).to_image())
}

/// ADM's `center_crop_arr(img, image_size)` (see the module invariants).
pub fn center_crop_arr(img: &RgbImage, image_size: u32) -> Result<RgbImage> {
    if image_size == 0 {
        return Err(EncodeError::InvalidInput(
            "image_size must be positive".into(),
        ));
    }
    let mut halved: Option<RgbImage> = None;
    loop {
        let cur = halved.as_ref().unwrap_or(img);
        if cur.width().min(cur.height()) < 2 * image_size {
            break;
        }
        halved = Some(resize(cur, cur.width() / 2, cur.height() / 2, Filter::Box)?);
    }
    let cur = halved.as_ref().unwrap_or(img);
    let (w, h) = (cur.width(), cur.height());
    let scale = image_size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        round_half_even(w as f64 * scale),
        round_half_even(h as f64 * scale),
    );
    let resized = resize(cur, nw, nh, Filter::Bicubic)?;
    let top = (resized.height() - image_size) / 2;
    let left = (resized.width() - image_size) / 2;
    crop(&resized, left, top, image_size, image_size)
}

/// `center_crop_arr(img, s)` for each of `sizes`, sharing the BOX halvings between sizes (the
/// halving chain of a smaller size extends that of a larger one): same pixels as separate calls.
pub fn center_crop_arr_multi(img: &RgbImage, sizes: &[u32]) -> Result<Vec<RgbImage>> {
    let mut chain: Vec<RgbImage> = Vec::new();
    let mut out = Vec::with_capacity(sizes.len());
    for &size in sizes {
        if size == 0 {
            return Err(EncodeError::InvalidInput(
                "image_size must be positive".into(),
            ));
        }
        let mut level = 0;
        loop {
            let cur = if level == 0 { img } else { &chain[level - 1] };
            if cur.width().min(cur.height()) < 2 * size {
                break;
            }
            if chain.len() < level + 1 {
                let next = resize(cur, cur.width() / 2, cur.height() / 2, Filter::Box)?;
                chain.push(next);
            }
            level += 1;
        }
        let cur = if level == 0 { img } else { &chain[level - 1] };
        out.push(center_crop_arr(cur, size)?);
    }
    Ok(out)
}

/// The mirror image (`hflip`).
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// torchvision's FiveCrop(size): tl, tr, bl, br, center.
pub fn five_crop(img: &RgbImage, size: u32) -> Result<[RgbImage; 5]> {
    let (w, h) = (img.width(), img.height());
    if size > w || size > h {
        return Err(EncodeError::InvalidInput(format!(
            "crop size {size} exceeds the {w}x{h} image"
        )));
    }
    let ct = round_half_even((h - size) as f64 / 2.0);
    let cl = round_half_even((w - size) as f64 / 2.0);
    Ok([
        crop(img, 0, 0, size, size)?,
        crop(img, w - size, 0, size, size)?,
        crop(img, 0, h - size, size, size)?,
        crop(img, w - size, h - size, size, size)?,
        crop(img, cl, ct, size, size)?,
    ])
}

/// torchvision's TenCrop(size): the five crops, then the five crops of the mirror image.
pub fn ten_crop(img: &RgbImage, size: u32) -> Result<Vec<RgbImage>> {
    let mut out = five_crop(img, size)?.to_vec();
    out.extend(five_crop(&hflip(img), size)?);
    Ok(out)
}

/// `int(image_size · crop_range)`: 281 for 256@1.1, 268 for 256@1.05, 422 for 384@1.1, 403 for
/// 384@1.05.
pub fn crop_size(image_size: u32, crop_range: f64) -> u32 {
    (image_size as f64 * crop_range) as u32
}

/// The ten augmentations of `extract_codes_c2i.py --ten-crop`:
/// `TenCrop(image_size)(center_crop_arr(img, int(image_size·crop_range)))`.
pub fn ten_crop_arr(img: &RgbImage, image_size: u32, crop_range: f64) -> Result<Vec<RgbImage>> {
    let big = center_crop_arr(img, crop_size(image_size, crop_range))?;
    ten_crop(&big, image_size)
}

/// The two augmentations of the plain path: `center_crop_arr(img, image_size)` and its mirror.
pub fn center_crop_and_flip(img: &RgbImage, image_size: u32) -> Result<[RgbImage; 2]> {
    let c = center_crop_arr(img, image_size)?;
    let f = hflip(&c);
    Ok([c, f])
}

/// One (3, H, W) image in [−1, 1] back to RGB, as LlamaGen saves samples:
/// `clamp(127.5·x + 128, 0, 255)` truncated to u8.
pub fn to_rgb_image(t: &Tensor) -> Result<RgbImage> {
    let (_, h, w) = t.dims3()?;
    let v: Vec<u8> = t
        .to_dtype(candle_core::DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| (127.5 * v + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, v)
        .ok_or_else(|| EncodeError::InvalidInput("image buffer size".into()))
}

/// ToTensor then Normalize(0.5, 0.5): images of one size → (N, 3, H, W) float32 in [−1, 1].
pub fn to_tensor(imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = imgs
        .first()
        .ok_or_else(|| EncodeError::InvalidInput("no images to stack".into()))?;
    let (w, h) = (first.width() as usize, first.height() as usize);
    let mut data = Vec::with_capacity(imgs.len() * 3 * h * w);
    for img in imgs {
        if (img.width() as usize, img.height() as usize) != (w, h) {
            return Err(EncodeError::InvalidInput(format!(
                "images of different sizes: {}x{} and {w}x{h}",
                img.width(),
                img.height()
            )));
        }
        let raw = img.as_raw();
        for c in 0..3 {
            data.extend(
                raw.iter()
                    .skip(c)
                    .step_by(3)
                    .map(|&v| (v as f32 / 255.0 - 0.5) / 0.5),
            );
        }
    }
    Ok(Tensor::from_vec(data, (imgs.len(), 3, h, w), device)?)
}

/// Decodes an image file as RGB (alpha dropped, grey replicated, no EXIF rotation), as
/// `Image.open(path).convert("RGB")`.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| EncodeError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| EncodeError::io(path, e))?
        .decode()
        .map_err(|source| EncodeError::ImageDecode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(img.to_rgb8())
}

/// An RGB image from an (H, W, 3) u8 buffer.
pub fn rgb_from_hwc(data: Vec<u8>, height: u32, width: u32) -> Result<RgbImage> {
    let n = data.len();
    RgbImage::from_raw(width, height, data).ok_or_else(|| {
        EncodeError::InvalidInput(format!("{n} bytes do not hold a {height}x{width}x3 image"))
    })
}
