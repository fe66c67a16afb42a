//! The tensor side of LlamaGen's image preprocessing: pixels to the model's `[−1, 1]` input and
//! back. The pixel operations themselves (crops, resizes, grids) are `llamagen_prep::pixels`,
//! re-exported here.
//!
//! Invariants enforced here:
//! - Pixels become floats as `(v/255 − 0.5)/0.5` in float32 (ToTensor, then Normalize(0.5,
//!   0.5)), channel-first.
//! - Floats become pixels as `trunc(clamp(127.5·x + 128, 0, 255))` (torchvision's `save_image`
//!   of `(x + 1)/2`).

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::EncodeError;

pub use llamagen_prep::pixels::*;

type Result<T> = std::result::Result<T, EncodeError>;

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
