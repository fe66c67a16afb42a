//! The loss-curve PNG: loss against step, with the axis ranges written in a built-in 3x5 pixel
//! font (no font files needed).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};
use crate::run::MetricsLine;

const W: u32 = 800;
const H: u32 = 400;
const LEFT: u32 = 70;
const RIGHT: u32 = 20;
const TOP: u32 = 20;
const BOTTOM: u32 = 40;
const SCALE: u32 = 2;

/// Rows of a 3x5 glyph, 3 bits each (bit 2 = left column).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        's' => [0, 3, 6, 3, 6],
        't' => [2, 7, 2, 2, 3],
        'p' => [0, 7, 5, 7, 4],
        'l' => [6, 2, 2, 2, 7],
        'o' => [0, 7, 5, 5, 7],
        _ => [0; 5],
    }
}

fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, color: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        let gx = x + i as u32 * 4 * SCALE;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            let (px, py) = (gx + col * SCALE + dx, y + row as u32 * SCALE + dy);
                            if px < W && py < H {
                                img.put_pixel(px, py, color);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb<u8>) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for (dx, dy) in [(0i64, 0i64), (0, 1), (1, 0)] {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < W && (py as u32) < H {
                img.put_pixel(px as u32, py as u32, color);
            }
        }
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws the loss of `lines` against their step into a PNG at `path` (the y range is written
/// at the left, the step range below, "loss" and "steps" name the axes).
pub fn loss_curve(lines: &[MetricsLine], path: &Path) -> Result<()> {
    let white = Rgb([255, 255, 255]);
    let black = Rgb([0, 0, 0]);
    let grey = Rgb([200, 200, 200]);
    let blue = Rgb([31, 119, 180]);
    let mut img = RgbImage::from_pixel(W, H, white);
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    for x in x0..=x1 {
        img.put_pixel(x, y1, black);
        img.put_pixel(x, y0, grey);
    }
    for y in y0..=y1 {
        img.put_pixel(x0, y, black);
        img.put_pixel(x1, y, grey);
    }
    let pts: Vec<(f64, f64)> = lines
        .iter()
        .filter(|l| l.loss.is_finite())
        .map(|l| (l.step as f64, l.loss))
        .collect();
    if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
        let (smin, smax) = (first.0, last.0.max(first.0 + 1.0));
        let lmin = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let lmax = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (lmin, lmax) = if lmax - lmin < 1e-12 {
            (lmin - 0.5, lmax + 0.5)
        } else {
            (lmin, lmax)
        };
        let px = |s: f64| x0 as f64 + (s - smin) / (smax - smin) * (x1 - x0) as f64;
        let py = |l: f64| y1 as f64 - (l - lmin) / (lmax - lmin) * (y1 - y0) as f64;
        for w in pts.windows(2) {
            line(
                &mut img,
                (px(w[0].0), py(w[0].1)),
                (px(w[1].0), py(w[1].1)),
                blue,
            );
        }
        if pts.len() == 1 {
            line(
                &mut img,
                (px(first.0) - 2.0, py(first.1)),
                (px(first.0) + 2.0, py(first.1)),
                blue,
            );
        }
        text(&mut img, 4, y0, &fmt(lmax), black);
        text(&mut img, 4, y1 - 10, &fmt(lmin), black);
        text(&mut img, 4, (y0 + y1) / 2 - 5, "loss", black);
        text(&mut img, x0, y1 + 8, &format!("{}", smin as u64), black);
        let end = format!("{}", smax as u64);
        text(
            &mut img,
            x1.saturating_sub(end.len() as u32 * 8),
            y1 + 8,
            &end,
            black,
        );
        text(&mut img, (x0 + x1) / 2 - 20, y1 + 8, "steps", black);
    }
    img.save(path)
        .map_err(|e| TrainError::Data(format!("writing {}: {e}", path.display())))
}
