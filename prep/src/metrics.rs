//! Reconstruction metrics as LlamaGen's tokenizer evaluation computes them (PSNR and SSIM of
//! scikit-image, on images scaled to [0, 1]).
//!
//! Invariants enforced here:
//! - Images are height × width × channels, interleaved (HWC), as f32 slices.
//! - PSNR is `10·log10(data_range² / MSE)` with the MSE accumulated in f64; identical images give
//!   +∞.
//! - SSIM is scikit-image's default `structural_similarity`: a 7×7 uniform window, sample
//!   covariance (×49/48), K1 = 0.01, K2 = 0.03, C1 = (K1·R)², C2 = (K2·R)², the map averaged
//!   over the pixels at least 3 away from the border, then averaged over channels.

use crate::error::PrepError;

type Result<T> = std::result::Result<T, PrepError>;

/// Side of the SSIM window.
pub const SSIM_WINDOW: usize = 7;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

fn same_len(a: &[f32], b: &[f32]) -> Result<()> {
    if a.len() != b.len() || a.is_empty() {
        return Err(PrepError::InvalidInput(format!(
            "images of {} and {} values cannot be compared",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// Peak signal-to-noise ratio in dB.
pub fn psnr(a: &[f32], b: &[f32], data_range: f64) -> Result<f64> {
    same_len(a, b)?;
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x - y) as f64;
            d * d
        })
        .sum::<f64>()
        / a.len() as f64;
    Ok(10.0 * (data_range * data_range / mse).log10())
}

/// Mean of a `SSIM_WINDOW`² window at every interior position of one channel (summed-area
/// table); returns (h − 6) × (w − 6) values.
fn window_means(plane: &[f64], h: usize, w: usize) -> Vec<f64> {
    let mut sat = vec![0f64; (h + 1) * (w + 1)];
    for y in 0..h {
        let mut row = 0.0;
        for x in 0..w {
            row += plane[y * w + x];
            sat[(y + 1) * (w + 1) + x + 1] = sat[y * (w + 1) + x + 1] + row;
        }
    }
    let n = (SSIM_WINDOW * SSIM_WINDOW) as f64;
    let (oh, ow) = (h - SSIM_WINDOW + 1, w - SSIM_WINDOW + 1);
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        for x in 0..ow {
            let (y1, x1) = (y + SSIM_WINDOW, x + SSIM_WINDOW);
            let s = sat[y1 * (w + 1) + x1] - sat[y * (w + 1) + x1] - sat[y1 * (w + 1) + x]
                + sat[y * (w + 1) + x];
            out.push(s / n);
        }
    }
    out
}

/// Structural similarity of two HWC images.
pub fn ssim(
    a: &[f32],
    b: &[f32],
    height: usize,
    width: usize,
    channels: usize,
    data_range: f64,
) -> Result<f64> {
    same_len(a, b)?;
    if a.len() != height * width * channels {
        return Err(PrepError::InvalidInput(format!(
            "{} values do not hold a {height}x{width}x{channels} image",
            a.len()
        )));
    }
    if height < SSIM_WINDOW || width < SSIM_WINDOW {
        return Err(PrepError::InvalidInput(format!(
            "SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}"
        )));
    }
    let np = (SSIM_WINDOW * SSIM_WINDOW) as f64;
    let cov_norm = np / (np - 1.0);
    let c1 = (K1 * data_range).powi(2);
    let c2 = (K2 * data_range).powi(2);
    let mut total = 0.0;
    for c in 0..channels {
        let x: Vec<f64> = a
            .iter()
            .skip(c)
            .step_by(channels)
            .map(|&v| v as f64)
            .collect();
        let y: Vec<f64> = b
            .iter()
            .skip(c)
            .step_by(channels)
            .map(|&v| v as f64)
            .collect();
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
        let xy: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p * q).collect();
        let (ux, uy) = (
            window_means(&x, height, width),
            window_means(&y, height, width),
        );
        let (uxx, uyy, uxy) = (
            window_means(&xx, height, width),
            window_means(&yy, height, width),
            window_means(&xy, height, width),
        );
        // The interior positions whose window lies inside the image are exactly the ones
        // scikit-image keeps after cropping the 3-pixel border.
        let mut sum = 0.0;
        for i in 0..ux.len() {
            let vx = cov_norm * (uxx[i] - ux[i] * ux[i]);
            let vy = cov_norm * (uyy[i] - uy[i] * uy[i]);
            let vxy = cov_norm * (uxy[i] - ux[i] * uy[i]);
            let num = (2.0 * ux[i] * uy[i] + c1) * (2.0 * vxy + c2);
            let den = (ux[i] * ux[i] + uy[i] * uy[i] + c1) * (vx + vy + c2);
            sum += num / den;
        }
        total += sum / ux.len() as f64;
    }
    Ok(total / channels as f64)
}
