//! LlamaGen's `center_crop_arr`, pixel for pixel.
//!
//! The official data loaders (ADM's `center_crop_arr`, on PIL images) do:
//! 1. while the shorter side is at least 2·S: halve both sides (integer division) with PIL's BOX filter;
//! 2. resize so the shorter side is S with PIL's BICUBIC filter, the other side `round(side·S/short)`
//!    with Python's round-half-to-even;
//! 3. cut the S×S window at ((W′−S)//2, (H′−S)//2).
//!
//! PIL resamples with a separable convolution: horizontal pass first, rounded to 8 bits, then the
//! vertical pass; the kernel is widened by the scale when downsampling (antialiasing); BICUBIC is
//! the a = −0.5 cubic with support 2, BOX the unit box with support ½; weights are normalised,
//! converted to 22-bit fixed point (rounded away from zero) and sums are rounded half-up and
//! clamped to 0–255. This module reproduces that arithmetic exactly, so the result equals PIL's
//! byte for byte (checked against the reference tensors of the official code in
//! `data/parity/augment_io.safetensors`).
//!
//! Reduced JPEG decoding (`decode.rs`) changes the input of step 1: it replaces some BOX halvings by
//! DCT-domain scaling. Its output stays within the tolerance checked in the tests of this crate
//! (mean absolute difference under 1.5 levels of 255, on real photos) and is used only when
//! `reduced_decode` is on.

use image::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

#[derive(Clone, Copy)]
enum Filter {
    Box,
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

/// Per output position: first input index, and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as isize).max(0) as usize;
        let xmax = ((center + support + 0.5) as isize).min(in_size as isize) as usize;
        let n = xmax - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = w * (1u64 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if f < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// PIL's `Image.resize((w, h), filter)` on an RGB image.
fn resample(src: &RgbImage, w: u32, h: u32, filter: Filter) -> RgbImage {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let horiz = precompute(sw, w, filter);
    let vert = precompute(sh, h, filter);
    // Rows of the source the vertical pass will read.
    let ybox_first = vert.bounds[0].0;
    let ybox_last = vert.bounds[h - 1].0 + vert.bounds[h - 1].1;
    let rows = ybox_last - ybox_first;
    let input = src.as_raw();
    let round = 1i32 << (PRECISION_BITS - 1);

    // Horizontal pass over the rows used, or a copy when the width does not change.
    let tmp: Vec<u8> = if w != sw {
        let mut tmp = vec![0u8; rows * w * 3];
        for y in 0..rows {
            let row = &input[(y + ybox_first) * sw * 3..(y + ybox_first + 1) * sw * 3];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                let (mut s0, mut s1, mut s2) = (round, round, round);
                for (x, &kx) in k.iter().enumerate() {
                    let p = (xmin + x) * 3;
                    s0 += row[p] as i32 * kx;
                    s1 += row[p + 1] as i32 * kx;
                    s2 += row[p + 2] as i32 * kx;
                }
                let o = (y * w + xx) * 3;
                tmp[o] = clip8(s0);
                tmp[o + 1] = clip8(s1);
                tmp[o + 2] = clip8(s2);
            }
        }
        tmp
    } else {
        input[ybox_first * sw * 3..ybox_last * sw * 3].to_vec()
    };

    if h == sh && ybox_first == 0 && rows == sh {
        return RgbImage::from_raw(w as u32, h as u32, tmp).expect("size");
    }
    let mut out = vec![0u8; w * h * 3];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let ymin = ymin - ybox_first;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        let orow = &mut out[yy * w * 3..(yy + 1) * w * 3];
        for (c, o) in orow.iter_mut().enumerate() {
            let mut s = round;
            for (y, &ky) in k.iter().enumerate() {
                s += tmp[(ymin + y) * w * 3 + c] as i32 * ky;
            }
            *o = clip8(s);
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("size")
}

/// Python's `round()` of a non-negative float: half to even.
fn round_half_even(x: f64) -> u32 {
    let f = x.floor();
    let diff = x - f;
    let r = if diff > 0.5 || (diff == 0.5 && (f as u64) % 2 == 1) {
        f + 1.0
    } else {
        f
    };
    r as u32
}

/// LlamaGen/ADM `center_crop_arr(pil_image, size)`.
pub fn center_crop_arr(img: &RgbImage, size: u32) -> RgbImage {
    let mut cur = std::borrow::Cow::Borrowed(img);
    while cur.width().min(cur.height()) >= 2 * size {
        let (w, h) = (cur.width() / 2, cur.height() / 2);
        cur = std::borrow::Cow::Owned(resample(&cur, w, h, Filter::Box));
    }
    let scale = size as f64 / cur.width().min(cur.height()) as f64;
    let w = round_half_even(cur.width() as f64 * scale);
    let h = round_half_even(cur.height() as f64 * scale);
    let resized = resample(&cur, w, h, Filter::Bicubic);
    let x0 = (w - size) / 2;
    let y0 = (h - size) / 2;
    image::imageops::crop_imm(&resized, x0, y0, size, size).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_even_like_python() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(280.49), 280);
        assert_eq!(round_half_even(0.5), 0);
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resample(&img, 7, 5, Filter::Bicubic), img);
    }
}
