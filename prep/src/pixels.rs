//! LlamaGen's image preprocessing: `center_crop_arr` (ADM), TenCrop, the horizontal flip and
//! torchvision's image grid, bit-exact with Pillow and torchvision.
//!
//! Invariants enforced here:
//! - Resizing is Pillow's `Image.resize` on 8-bit RGB, byte for byte ([`crate::resample`]).
//!   (Resizers with 16-bit coefficients, such as fast_image_resize's convolution, round
//!   differently and are off by up to tens of levels.)
//! - `center_crop_arr(img, S)`: halve with BOX (`(W//2, H//2)`) while `min(W, H) ≥ 2S`, then
//!   BICUBIC-resize to `(round(W·S/min), round(H·S/min))` rounding half to even, then take the
//!   S×S window at `((H′−S)//2, (W′−S)//2)`.
//! - TenCrop(S) of an image: tl, tr, bl, br, center, then the same five of the horizontally
//!   flipped image; the center offset is `round((dim − S)/2)` rounding half to even.

use std::path::Path;

use image::RgbImage;

use crate::error::PrepError;

type Result<T> = std::result::Result<T, PrepError>;

use crate::resample::resize_window;
pub use crate::resample::{Filter, PRECISION_BITS};

/// Pillow's `Image.resize((width, height), filter)` of an RGB image (see [`crate::resample`]).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    if img.width() == 0 || img.height() == 0 || width == 0 || height == 0 {
        return Err(PrepError::InvalidInput(format!(
            "cannot resize {}x{} to {width}x{height}: empty image",
            img.width(),
            img.height()
        )));
    }
    let out = resize_window(img, width, height, filter, (0, 0, width, height));
    RgbImage::from_raw(width, height, out)
        .ok_or_else(|| PrepError::InvalidInput("resized buffer has the wrong size".into()))
}

/// The crop ranges of LlamaGen's ten-crop code sets (`ten_crop` and `ten_crop_105`).
pub const CROP_RANGES: [f64; 2] = [1.1, 1.05];

/// Python's `round(x)` for the sizes of `center_crop_arr`: half to even.
fn round_half_even(x: f64) -> u32 {
    x.round_ties_even() as u32
}

/// The S×S window of `img` at (left, top).
pub fn crop(img: &RgbImage, left: u32, top: u32, width: u32, height: u32) -> Result<RgbImage> {
    if left + width > img.width() || top + height > img.height() {
        return Err(PrepError::InvalidInput(format!(
            "crop {width}x{height} at ({left}, {top}) exceeds the {}x{} image",
            img.width(),
            img.height()
        )));
    }
    Ok(image::imageops::crop_imm(img, left, top, width, height).to_image())
}

/// ADM's `center_crop_arr(img, image_size)` (see the module invariants).
pub fn center_crop_arr(img: &RgbImage, image_size: u32) -> Result<RgbImage> {
    let mut crops = center_crop_arr_multi(img, &[image_size])?;
    Ok(crops.pop().expect("one size, one crop"))
}

/// The last step of `center_crop_arr`, once no BOX halving is left: BICUBIC to the short side
/// `image_size`, then the centred S×S window.
fn bicubic_center_crop(cur: &RgbImage, image_size: u32) -> Result<RgbImage> {
    let (w, h) = (cur.width(), cur.height());
    let scale = image_size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        round_half_even(w as f64 * scale),
        round_half_even(h as f64 * scale),
    );
    if nw < image_size || nh < image_size {
        return Err(PrepError::InvalidInput(format!(
            "{w}x{h} resized to {nw}x{nh} is smaller than {image_size}"
        )));
    }
    // Only the S×S window of the BICUBIC resize is computed: the same bytes as resizing
    // everything and cropping.
    let (top, left) = ((nh - image_size) / 2, (nw - image_size) / 2);
    let out = resize_window(
        cur,
        nw,
        nh,
        Filter::Bicubic,
        (left, top, image_size, image_size),
    );
    RgbImage::from_raw(image_size, image_size, out)
        .ok_or_else(|| PrepError::InvalidInput("resized buffer has the wrong size".into()))
}

/// `center_crop_arr(img, s)` for each of `sizes`, sharing the BOX halvings between sizes (the
/// halving chain of a smaller size extends that of a larger one): same pixels as separate calls.
pub fn center_crop_arr_multi(img: &RgbImage, sizes: &[u32]) -> Result<Vec<RgbImage>> {
    let mut chain: Vec<RgbImage> = Vec::new();
    let mut out = Vec::with_capacity(sizes.len());
    for &size in sizes {
        if size == 0 {
            return Err(PrepError::InvalidInput(
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
        out.push(bicubic_center_crop(cur, size)?);
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
        return Err(PrepError::InvalidInput(format!(
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

/// torchvision's `make_grid(padding=2, pad_value=0)` over images of one size: `nrow` per row,
/// 2 px black padding around and between them; a single image comes back as it is, unpadded.
/// `None` leaves its cell empty.
pub fn make_grid(images: &[Option<RgbImage>], nrow: usize) -> Result<RgbImage> {
    if let [Some(only)] = images {
        return Ok(only.clone());
    }
    let first = images
        .iter()
        .flatten()
        .next()
        .ok_or_else(|| PrepError::InvalidInput("no images for a grid".into()))?;
    let (w, h) = (first.width(), first.height());
    let pad = 2u32;
    let nrow = nrow.clamp(1, images.len().max(1));
    let rows = images.len().div_ceil(nrow) as u32;
    let mut g = RgbImage::new(nrow as u32 * (w + pad) + pad, rows * (h + pad) + pad);
    for (i, img) in images.iter().enumerate() {
        let Some(img) = img else { continue };
        if (img.width(), img.height()) != (w, h) {
            return Err(PrepError::InvalidInput(format!(
                "grid images of different sizes: {}x{} and {w}x{h}",
                img.width(),
                img.height()
            )));
        }
        let (x, y) = ((i % nrow) as u32, (i / nrow) as u32);
        image::imageops::replace(
            &mut g,
            img,
            (pad + x * (w + pad)) as i64,
            (pad + y * (h + pad)) as i64,
        );
    }
    Ok(g)
}

/// Decodes an image file as RGB (alpha dropped, grey replicated, no EXIF rotation), as
/// `Image.open(path).convert("RGB")`.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| PrepError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| PrepError::io(path, e))?
        .decode()
        .map_err(|source| PrepError::ImageDecode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(img.to_rgb8())
}

/// An RGB image from an (H, W, 3) u8 buffer.
pub fn rgb_from_hwc(data: Vec<u8>, height: u32, width: u32) -> Result<RgbImage> {
    let n = data.len();
    RgbImage::from_raw(width, height, data).ok_or_else(|| {
        PrepError::InvalidInput(format!("{n} bytes do not hold a {height}x{width}x3 image"))
    })
}
