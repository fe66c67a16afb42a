//! LlamaGen's image preprocessing for code extraction: `center_crop_arr` (ADM), TenCrop, the
//! horizontal flip and the `[−1, 1]` normalisation, bit-exact with Pillow and torchvision.
//!
//! Invariants enforced here:
//! - Resizing is Pillow's `Image.resize` on 8-bit RGB: a separable two-pass convolution
//!   (horizontal first, then vertical, each rounded and clipped to u8), with antialiased
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

#[inline]
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((width, height), filter)` of an RGB image.
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
    let horiz = precompute_coeffs(in_w, out_w, filter);
    let mut vert = precompute_coeffs(in_h, out_h, filter);
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);

    // Horizontal pass over the rows the vertical pass will read.
    let (mut cur, mut cur_w, mut cur_h) = (src.clone(), in_w, in_h);
    if need_h {
        let first = vert.start[0];
        let last = vert.start[out_h - 1] + vert.len[out_h - 1];
        for s in vert.start.iter_mut() {
            *s -= first;
        }
        let rows = last - first;
        let mut out = vec![0u8; out_w * rows * 3];
        for y in 0..rows {
            let in_row = &src[(y + first) * in_w * 3..(y + first + 1) * in_w * 3];
            let out_row = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
            for xx in 0..out_w {
                let k = &horiz.coeffs[xx * horiz.ksize..];
                let xmin = horiz.start[xx];
                let mut acc = [half; 3];
                for x in 0..horiz.len[xx] {
                    let p = &in_row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    let w = k[x] as i64;
                    acc[0] += p[0] as i64 * w;
                    acc[1] += p[1] as i64 * w;
                    acc[2] += p[2] as i64 * w;
                }
                out_row[xx * 3] = clip8(acc[0]);
                out_row[xx * 3 + 1] = clip8(acc[1]);
                out_row[xx * 3 + 2] = clip8(acc[2]);
            }
        }
        (cur, cur_w, cur_h) = (out, out_w, rows);
    }

    if need_v {
        let mut out = vec![0u8; cur_w * out_h * 3];
        for yy in 0..out_h {
            let k = &vert.coeffs[yy * vert.ksize..];
            let ymin = vert.start[yy];
            let out_row = &mut out[yy * cur_w * 3..(yy + 1) * cur_w * 3];
            for (xc, o) in out_row.iter_mut().enumerate() {
                let mut acc = half;
                for y in 0..vert.len[yy] {
                    acc += cur[(ymin + y) * cur_w * 3 + xc] as i64 * k[y] as i64;
                }
                *o = clip8(acc);
            }
        }
        (cur, cur_h) = (out, out_h);
    }
    debug_assert_eq!((cur_w, cur_h), (out_w, out_h));
    RgbImage::from_raw(out_w as u32, out_h as u32, cur)
        .ok_or_else(|| EncodeError::InvalidInput("resized buffer has the wrong size".into()))
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
    let mut cur = img.clone();
    while cur.width().min(cur.height()) >= 2 * image_size {
        cur = resize(&cur, cur.width() / 2, cur.height() / 2, Filter::Box)?;
    }
    let (w, h) = (cur.width(), cur.height());
    let scale = image_size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        round_half_even(w as f64 * scale),
        round_half_even(h as f64 * scale),
    );
    let resized = resize(&cur, nw, nh, Filter::Bicubic)?;
    let top = (resized.height() - image_size) / 2;
    let left = (resized.width() - image_size) / 2;
    crop(&resized, left, top, image_size, image_size)
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
