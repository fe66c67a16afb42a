//! Image bytes to RGB pixels.
//!
//! Invariants:
//! - Supported: JPEG (baseline, progressive, CMYK/YCCK, 16-bit quantisation tables), PNG (palette,
//!   alpha, 16-bit), WebP, GIF (first frame), BMP, TIFF. Anything else (AVIF, HEIF, HTML, …) is a
//!   [`DecodeFailure::UnsupportedFormat`] or [`DecodeFailure::NotAnImage`], never a crash.
//! - Dimensions are read from the header and checked against [`DecodeLimits`] *before* pixels are
//!   allocated, so a decompression bomb (a 4-gigapixel GIF header) costs nothing.
//! - EXIF orientation is applied, so stored images are upright.
//! - Output is 8-bit RGB. Alpha is dropped, keeping the colour values under it, exactly as PIL's
//!   `Image.convert("RGB")` does in LlamaGen's data loaders, so training sees what the official
//!   pipeline sees; grey is expanded, 16-bit is reduced to 8-bit.
//! - JPEGs much larger than the target (shorter side ≥ 8× the target) are decoded at 1/4 or 1/8
//!   scale in the DCT domain ([`decode_rgb`] with `min_side_hint`, see [`MIN_REDUCTION`]); the
//!   scale is chosen so that the shorter side stays at least twice the target, so
//!   `center_crop_arr` still starts with a BOX halving. After the
//!   centre crop, the result stays within a mean absolute difference of 2.5 levels (of 255) from
//!   a full decode for targets of 128 px and more (tests/decode_corpus.rs, real photos at 1/4 and
//!   1/8 scale).

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// Why bytes could not become an image. `kind()` is the stable `error_kind` stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeFailure {
    #[error("not an image (starts with {0:?})")]
    NotAnImage(String),
    #[error("unsupported image format {0}")]
    UnsupportedFormat(String),
    #[error(
        "image of {width}x{height} ({pixels} pixels) exceeds the limits ({max_pixels} pixels, {max_side} per side)"
    )]
    TooManyPixels {
        width: u64,
        height: u64,
        pixels: u64,
        max_pixels: u64,
        max_side: u32,
    },
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
}

impl DecodeFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeFailure::NotAnImage(_) => "not_an_image",
            DecodeFailure::UnsupportedFormat(_) => "unsupported_format",
            DecodeFailure::TooManyPixels { .. } => "decompression_bomb",
            DecodeFailure::ZeroSize { .. } => "zero_size",
            DecodeFailure::Corrupt(_) => "decode_error",
        }
    }
}

/// Limits applied before decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest width × height accepted (default 178,956,970, PIL's bomb limit).
    pub max_pixels: u64,
    /// Largest width or height accepted (default 65,535).
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 178_956_970,
            max_side: 65_535,
        }
    }
}

/// A decoded, upright RGB image with what was learnt about the original.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub rgb: RgbImage,
    /// "jpeg", "png", "webp", "gif", "bmp", "tiff".
    pub format: &'static str,
    /// Size of the original image as displayed (after EXIF orientation), before any reduced decode.
    pub orig_width: u32,
    pub orig_height: u32,
    /// DCT-domain reduction applied (1 = full decode; 2, 4 or 8).
    pub reduced_by: u32,
}

fn format_name(f: ImageFormat) -> Option<&'static str> {
    Some(match f {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        ImageFormat::Gif => "gif",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        _ => return None,
    })
}

/// Recognises formats the decoder does not support, for a precise error.
fn sniff_unsupported(data: &[u8]) -> Option<String> {
    if data.len() >= 12 && &data[4..8] == b"ftyp" {
        let brand = String::from_utf8_lossy(&data[8..12]).to_string();
        let name = match brand.as_str() {
            "avif" | "avis" => "AVIF".to_string(),
            "heic" | "heix" | "hevc" | "heim" | "heis" | "mif1" | "msf1" => "HEIF".to_string(),
            _ => format!("ISO-BMFF ({brand})"),
        };
        return Some(name);
    }
    None
}

fn preview(data: &[u8]) -> String {
    let head: String = String::from_utf8_lossy(&data[..data.len().min(24)])
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    head
}

fn check_size(w: u32, h: u32, limits: &DecodeLimits) -> Result<(), DecodeFailure> {
    if w == 0 || h == 0 {
        return Err(DecodeFailure::ZeroSize {
            width: w,
            height: h,
        });
    }
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels || w > limits.max_side || h > limits.max_side {
        return Err(DecodeFailure::TooManyPixels {
            width: w as u64,
            height: h as u64,
            pixels,
            max_pixels: limits.max_pixels,
            max_side: limits.max_side,
        });
    }
    Ok(())
}

fn corrupt(e: impl std::fmt::Display) -> DecodeFailure {
    DecodeFailure::Corrupt(e.to_string())
}

/// Decodes `data` to upright 8-bit RGB. With `min_side_hint = Some(s)`, a large JPEG may be
/// decoded at reduced scale, as long as its shorter side stays ≥ 2·s.
pub fn decode_rgb(
    data: &[u8],
    limits: &DecodeLimits,
    min_side_hint: Option<u32>,
) -> Result<Decoded, DecodeFailure> {
    let reader = ImageReader::new(Cursor::new(data))
        .with_guessed_format()
        .map_err(corrupt)?;
    let Some(format) = reader.format() else {
        if let Some(name) = sniff_unsupported(data) {
            return Err(DecodeFailure::UnsupportedFormat(name));
        }
        return Err(DecodeFailure::NotAnImage(preview(data)));
    };
    let Some(name) = format_name(format) else {
        return Err(DecodeFailure::UnsupportedFormat(format!("{format:?}")));
    };
    // GIF frames carry their own size, which the decoder reads only with the frame: check the
    // header's frame descriptors first, so a bomb's header never reaches the decoder.
    if format == ImageFormat::Gif {
        if let Some((w, h)) = gif_first_frame_size(data) {
            check_size(w, h, limits)?;
        }
    }
    let mut decoder = match reader.into_decoder() {
        Ok(d) => d,
        // A second, more lenient JPEG decoder for files with damaged markers that PIL still reads.
        Err(e) if format == ImageFormat::Jpeg => {
            return decode_jpeg_fallback(data, limits).map_err(|_| corrupt(e));
        }
        Err(e) => return Err(corrupt(e)),
    };
    let (w, h) = decoder.dimensions();
    check_size(w, h, limits)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let swaps = matches!(
        orientation,
        image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH
    );
    let (ow, oh) = if swaps { (h, w) } else { (w, h) };

    if format == ImageFormat::Jpeg {
        if let Some(target) = min_side_hint {
            let factor = reduction_factor(w.min(h), target);
            if factor >= MIN_REDUCTION {
                if let Ok(mut rgb) = decode_jpeg_scaled(data, w, h, factor) {
                    rgb = orient(DynamicImage::ImageRgb8(rgb), orientation).into_rgb8();
                    return Ok(Decoded {
                        rgb,
                        format: name,
                        orig_width: ow,
                        orig_height: oh,
                        reduced_by: factor,
                    });
                }
            }
        }
    }

    let mut lim = Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    decoder.set_limits(lim).map_err(corrupt)?;
    let img = match DynamicImage::from_decoder(decoder) {
        Ok(img) => img,
        // A second, more lenient JPEG decoder for files with damaged markers that PIL still reads.
        Err(e) if format == ImageFormat::Jpeg => match decode_jpeg_scaled(data, w, h, 1) {
            Ok(rgb) => DynamicImage::ImageRgb8(rgb),
            Err(_) => return Err(corrupt(e)),
        },
        Err(e) => return Err(corrupt(e)),
    };
    let img = orient(img, orientation);
    Ok(Decoded {
        rgb: to_rgb8(img),
        format: name,
        orig_width: ow,
        orig_height: oh,
        reduced_by: 1,
    })
}

fn orient(mut img: DynamicImage, o: image::metadata::Orientation) -> DynamicImage {
    img.apply_orientation(o);
    img
}

/// Alpha dropped (colour kept), grey expanded, 16-bit reduced: PIL's `convert("RGB")`.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        other => other.to_rgb8(),
    }
}

/// The smallest DCT reduction worth taking. At 1/2 the scaled decoder (jpeg-decoder, no SIMD)
/// costs more than a full SIMD decode (zune-jpeg) followed by the exact BOX halving that
/// `center_crop_arr` does anyway (measured on `bench/ingest_corpus.py` images: 9.0 against 7.4
/// CPU seconds for 600 images); from 1/4 on, the skipped IDCT work wins.
pub const MIN_REDUCTION: u32 = 4;

/// The largest DCT reduction (1, 2, 4 or 8) that keeps the shorter side ≥ 2·target.
pub fn reduction_factor(min_side: u32, target: u32) -> u32 {
    let mut f = 1;
    while f < 8 && min_side / (f * 2) >= 2 * target {
        f *= 2;
    }
    f
}

/// Full decode with jpeg-decoder, for JPEGs the primary decoder refuses.
fn decode_jpeg_fallback(data: &[u8], limits: &DecodeLimits) -> Result<Decoded, DecodeFailure> {
    let mut d = jpeg_decoder::Decoder::new(Cursor::new(data));
    d.read_info().map_err(corrupt)?;
    let info = d.info().ok_or_else(|| corrupt("no JPEG info"))?;
    let (w, h) = (info.width as u32, info.height as u32);
    check_size(w, h, limits)?;
    let rgb = decode_jpeg_scaled(data, w, h, 1)?;
    Ok(Decoded {
        rgb,
        format: "jpeg",
        orig_width: w,
        orig_height: h,
        reduced_by: 1,
    })
}

/// Far corner of the first frame of a GIF, walking the header and extension blocks.
fn gif_first_frame_size(data: &[u8]) -> Option<(u32, u32)> {
    let mut p = 13; // "GIF8?a" + logical screen descriptor
    let flags = *data.get(10)?;
    if flags & 0x80 != 0 {
        p += 3 << ((flags & 7) + 1);
    }
    loop {
        match *data.get(p)? {
            0x21 => {
                // extension: label, then sub-blocks ended by a zero length
                p += 2;
                loop {
                    let len = *data.get(p)? as usize;
                    p += 1 + len;
                    if len == 0 {
                        break;
                    }
                }
            }
            0x2c => {
                let u16_at = |i: usize| {
                    Some(u16::from_le_bytes([*data.get(p + i)?, *data.get(p + i + 1)?]) as u32)
                };
                // The canvas must reach the frame's far corner (left + width, top + height).
                return Some((u16_at(1)? + u16_at(5)?, u16_at(3)? + u16_at(7)?));
            }
            _ => return None,
        }
    }
}

/// Decodes a JPEG at 1/`factor` scale in the DCT domain (jpeg-decoder's scaled IDCT); `factor`
/// 1 is a plain full decode.
fn decode_jpeg_scaled(data: &[u8], w: u32, h: u32, factor: u32) -> Result<RgbImage, DecodeFailure> {
    let mut d = jpeg_decoder::Decoder::new(Cursor::new(data));
    d.read_info().map_err(corrupt)?;
    let (sw, sh) = if factor > 1 {
        d.scale((w / factor).max(1) as u16, (h / factor).max(1) as u16)
            .map_err(corrupt)?
    } else {
        (w as u16, h as u16)
    };
    let pixels = d.decode().map_err(corrupt)?;
    let info = d.info().ok_or_else(|| corrupt("no JPEG info"))?;
    let (sw, sh) = (sw as u32, sh as u32);
    let n = (sw * sh) as usize;
    let rgb: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => pixels,
        jpeg_decoder::PixelFormat::L8 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::L16 => pixels
            .chunks_exact(2)
            .flat_map(|c| {
                let v = c[0];
                [v, v, v]
            })
            .collect(),
        // CMYK goes through the full decoder, whose colour conversion is the reference.
        jpeg_decoder::PixelFormat::CMYK32 => return Err(corrupt("CMYK: use the full decoder")),
    };
    if rgb.len() != n * 3 {
        return Err(corrupt(format!(
            "scaled decode gave {} bytes for {sw}x{sh}",
            rgb.len()
        )));
    }
    RgbImage::from_raw(sw, sh, rgb).ok_or_else(|| corrupt("scaled decode size mismatch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_jpeg_decode() {
        let img = RgbImage::from_fn(800, 600, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
            .encode_image(&img)
            .unwrap();
        let d = decode_rgb(&buf, &DecodeLimits::default(), Some(50)).unwrap();
        assert_eq!(
            d.reduced_by,
            4,
            "{:?}",
            decode_jpeg_scaled(&buf, 800, 600, 4).err()
        );
        assert_eq!(d.rgb.dimensions(), (200, 150));
        assert_eq!((d.orig_width, d.orig_height), (800, 600));
        // A 1/2 reduction is not worth it: full decode.
        let d = decode_rgb(&buf, &DecodeLimits::default(), Some(100)).unwrap();
        assert_eq!(d.reduced_by, 1);
        assert_eq!(d.rgb.dimensions(), (800, 600));
        assert_eq!(
            decode_jpeg_scaled(&buf, 800, 600, 2).unwrap().dimensions(),
            (400, 300)
        );
    }

    #[test]
    fn gif_frame_size_from_header() {
        let bomb = include_bytes!("../../data/images/pillow/decompression_bomb.gif");
        let (w, h) = gif_first_frame_size(bomb).unwrap();
        assert_eq!((w, h), (65535, 65280 + 1321));
    }
}
