//! Image preprocessing of the scorers, bit-exact with PIL + torchvision on 8-bit RGB.
//!
//! Invariants enforced here:
//! - Resizing is Pillow's `Image.resize` for 8-bit images: separable, horizontal pass then
//!   vertical pass (vertical first when the height shrinks by more than twice as many pixels as
//!   the width, as Pillow 13 orders them), each rounded and clipped to u8; antialiased filters (support × max(1, in/out));
//!   coefficients normalised to sum 1, quantised to 22 fractional bits (rounded half away from
//!   zero); 32-bit accumulators starting at one half. BICUBIC is Keys with a = −0.5, BILINEAR the
//!   triangle; a pass whose size does not change is skipped. Computing only a window of the output
//!   gives the same values as resizing everything and cropping. On x86-64 CPUs with AVX2 the two
//!   passes run as vector kernels computing the same integer sums (tests compare them with the
//!   scalar loops byte for byte).
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

// Pillow-exact resampling, shared with the VQ preprocessing and ingest.
pub use llamagen_prep::resample::{Filter, resize_window};

/// CLIP's per-channel mean (RGB).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (RGB).
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// ImageNet mean (RGB), used by the watermark classifier.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Version tag of this preprocessing, stored with every score.
/// v2: Pillow 13's pass order (vertical first when the height shrinks by more than twice as many
/// pixels as the width; v1 always ran the horizontal pass first).
pub const CLIP_PREPROCESS_VERSION: &str = "clip-bicubic-shortside-centercrop-v2";
pub const WATERMARK_PREPROCESS_VERSION: &str = "squash256-bilinear-imagenet-v2";

/// Per-channel tables of `(v/255 − mean)/std` for every 8-bit value `v` (float32 arithmetic).
fn normalise_table(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, tc) in t.iter_mut().enumerate() {
        for (v, x) in tc.iter_mut().enumerate() {
            *x = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    t
}

/// Packed RGB → channel-first floats `(v/255 − mean)/std`, written to `dst` (3 planes of
/// `rgb.len() / 3` values).
pub fn normalise_chw_into(rgb: &[u8], mean: [f32; 3], std: [f32; 3], dst: &mut [f32]) {
    let plane = rgb.len() / 3;
    assert_eq!(dst.len(), 3 * plane, "destination size");
    let t = normalise_table(mean, std);
    let (r, gb) = dst.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (((p, r), g), b) in rgb.chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = t[0][p[0] as usize];
        *g = t[1][p[1] as usize];
        *b = t[2][p[2] as usize];
    }
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
    assert_eq!(rgb.len(), 3 * w * h, "pixel count");
    let base = out.len();
    out.resize(base + 3 * w * h, 0.0);
    normalise_chw_into(rgb, mean, std, &mut out[base..]);
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

/// [`clip_preprocess`] written to `dst` (`3·n·n` values).
pub fn clip_preprocess_into(img: &RgbImage, n: u32, dst: &mut [f32]) {
    normalise_chw_into(&clip_window(img, n), CLIP_MEAN, CLIP_STD, dst);
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

/// [`watermark_preprocess`] written to `dst` (`3·n·n` values).
pub fn watermark_preprocess_into(img: &RgbImage, n: u32, dst: &mut [f32]) {
    normalise_chw_into(&watermark_window(img, n), IMAGENET_MEAN, IMAGENET_STD, dst);
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
    fn normalisation_table_is_the_formula() {
        let rgb: Vec<u8> = (0..=255u8).flat_map(|v| [v, 255 - v, v / 2]).collect();
        let mut out = Vec::new();
        normalise_chw(&rgb, 256, 1, CLIP_MEAN, CLIP_STD, &mut out);
        for (i, p) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let want = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
                assert_eq!(out[c * 256 + i].to_bits(), want.to_bits());
            }
        }
    }
}
