//! Images → code grids: the augmentations of LlamaGen's code extraction, encoded in batches.
//!
//! Invariants enforced here:
//! - A code grid is `height × width` codes in raster order (row by row), stored as u16; models
//!   whose codebook does not fit u16 are refused.
//! - Images are encoded only when both sides are multiples of the model's downsampling factor;
//!   other sizes are refused with the size and the factor, never padded or cropped silently.
//! - Batching does not change codes: each image's codes are those of encoding it alone.

use candle_core::DType;
use image::RgbImage;

use crate::augment;
use crate::error::EncodeError;
use crate::vq::VqModel;

type Result<T> = std::result::Result<T, EncodeError>;

/// The codes of one image (augmentation), in raster order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeGrid {
    pub height: usize,
    pub width: usize,
    /// `height · width` codes, `codes[row · width + col]`.
    pub codes: Vec<u16>,
}

/// Default number of images per forward pass.
pub const DEFAULT_BATCH_SIZE: usize = 8;

/// Encodes RGB images of one size, `batch_size` at a time, on the model's device.
pub fn encode_images(
    model: &VqModel,
    imgs: &[RgbImage],
    batch_size: usize,
) -> Result<Vec<CodeGrid>> {
    if batch_size == 0 {
        return Err(EncodeError::InvalidInput(
            "batch_size must be positive".into(),
        ));
    }
    if model.args().codebook_size > u16::MAX as usize + 1 {
        return Err(EncodeError::InvalidInput(format!(
            "a codebook of {} entries does not fit u16 codes",
            model.args().codebook_size
        )));
    }
    let Some(first) = imgs.first() else {
        return Ok(Vec::new());
    };
    let (w, h) = (first.width() as usize, first.height() as usize);
    let (gh, gw) = model.check_image_size(h, w)?;
    let mut out = Vec::with_capacity(imgs.len());
    for chunk in imgs.chunks(batch_size) {
        for img in chunk {
            if (img.width() as usize, img.height() as usize) != (w, h) {
                model.check_image_size(img.height() as usize, img.width() as usize)?;
                return Err(EncodeError::InvalidInput(format!(
                    "images in one call must share a size: {}x{} and {w}x{h}",
                    img.width(),
                    img.height()
                )));
            }
        }
        let x = augment::to_tensor(chunk, model.device())?;
        let codes: Vec<u32> = model
            .encode_indices(&x)?
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        for per_image in codes.chunks(gh * gw) {
            out.push(CodeGrid {
                height: gh,
                width: gw,
                codes: per_image.iter().map(|&c| c as u16).collect(),
            });
        }
    }
    Ok(out)
}

/// `center_crop_arr(img, image_size)` encoded: the t2i path (256 or 512).
pub fn center_crop_codes(
    model: &VqModel,
    imgs: &[RgbImage],
    image_size: u32,
    batch_size: usize,
) -> Result<Vec<CodeGrid>> {
    let crops = imgs
        .iter()
        .map(|img| augment::center_crop_arr(img, image_size))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    encode_images(model, &crops, batch_size)
}

/// The c2i path without ten-crop: codes of `[x, hflip(x)]` with `x = center_crop_arr(img,
/// image_size)`.
pub fn center_crop_flip_codes(
    model: &VqModel,
    img: &RgbImage,
    image_size: u32,
) -> Result<[CodeGrid; 2]> {
    let pair = augment::center_crop_and_flip(img, image_size)?;
    let mut grids = encode_images(model, &pair, 2)?.into_iter();
    match (grids.next(), grids.next()) {
        (Some(a), Some(b)) => Ok([a, b]),
        _ => Err(EncodeError::InvalidInput("expected two code grids".into())),
    }
}

/// The c2i `--ten-crop` path: codes of the ten crops of
/// `center_crop_arr(img, int(image_size·crop_range))`, in TenCrop order.
pub fn ten_crop_codes(
    model: &VqModel,
    img: &RgbImage,
    image_size: u32,
    crop_range: f64,
    batch_size: usize,
) -> Result<Vec<CodeGrid>> {
    let crops = augment::ten_crop_arr(img, image_size, crop_range)?;
    encode_images(model, &crops, batch_size)
}
