//! PSNR and SSIM on closed-form cases, and LlamaGen's reconstruction metric conventions.

use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};
use llamagen_encode::metrics;

fn constant(h: usize, w: usize, c: usize, v: f32) -> Vec<f32> {
    vec![v; h * w * c]
}

fn noise(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 10_000) as f32 / 10_000.0 * amp
        })
        .collect()
}

#[test]
fn identical_images_are_perfect() -> Result<()> {
    let a = noise(16 * 12 * 3, 7, 1.0);
    ensure!(metrics::psnr(&a, &a, 1.0)?.is_infinite());
    let s = metrics::ssim(&a, &a, 16, 12, 3, 1.0)?;
    ensure!((s - 1.0).abs() < 1e-12, "{s}");
    Ok(())
}

#[test]
fn constant_images_match_the_closed_forms() -> Result<()> {
    let (a, b) = (constant(9, 10, 3, 0.25), constant(9, 10, 3, 0.75));
    let p = metrics::psnr(&a, &b, 1.0)?;
    let want = 10.0 * (1.0f64 / 0.25).log10();
    ensure!((p - want).abs() < 1e-9, "{p} vs {want}");
    for r in [1.0f64, 2.0] {
        let c1 = (0.01 * r).powi(2);
        let want = (2.0 * 0.25 * 0.75 + c1) / (0.25f64.powi(2) + 0.75f64.powi(2) + c1);
        let s = metrics::ssim(&a, &b, 9, 10, 3, r)?;
        ensure!((s - want).abs() < 1e-9, "range {r}: {s} vs {want}");
    }
    Ok(())
}

#[test]
fn more_noise_scores_lower_and_ssim_is_symmetric() -> Result<()> {
    let (h, w) = (20, 24);
    let base = noise(h * w * 3, 3, 1.0);
    let perturb = |amp: f32| -> Vec<f32> {
        base.iter()
            .zip(noise(h * w * 3, 11, amp))
            .map(|(x, n)| x + n - amp / 2.0)
            .collect()
    };
    let (small, large) = (perturb(0.05), perturb(0.5));
    ensure!(metrics::psnr(&base, &small, 1.0)? > metrics::psnr(&base, &large, 1.0)?);
    let s_small = metrics::ssim(&base, &small, h, w, 3, 1.0)?;
    let s_large = metrics::ssim(&base, &large, h, w, 3, 1.0)?;
    ensure!(s_small > s_large && s_small < 1.0, "{s_small} {s_large}");
    let rev = metrics::ssim(&small, &base, h, w, 3, 1.0)?;
    ensure!((rev - s_small).abs() < 1e-12);
    Ok(())
}

#[test]
fn bad_shapes_are_refused() {
    let a = constant(6, 6, 3, 0.5);
    assert!(metrics::ssim(&a, &a, 6, 6, 3, 1.0).is_err());
    assert!(metrics::ssim(&a, &a, 7, 6, 3, 1.0).is_err());
    assert!(metrics::psnr(&a, &a[1..], 1.0).is_err());
}

#[test]
fn llamagen_conventions_quantise_the_reconstruction() -> Result<()> {
    // A perfect reconstruction still loses the u8 rounding (127.5·x + 128, truncated): at
    // x = −1 + 2k/255 the restored value is (k + 0.5 truncated) / 255 = k/255, exact; at other
    // values it is off by less than 1/255.
    let vals: Vec<f32> = (0..3 * 8 * 8)
        .map(|i| -1.0 + 2.0 * (i % 256) as f32 / 255.0)
        .collect();
    let x = Tensor::from_vec(vals, (3, 8, 8), &Device::Cpu)?;
    let (p, s) = metrics::llamagen_reconstruction_metrics(&x, &x)?;
    ensure!(p > 60.0, "psnr {p}");
    ensure!((s - 1.0).abs() < 1e-6, "ssim {s}");
    let off = (x.clone() + 0.5)?;
    let (p2, s2) = metrics::llamagen_reconstruction_metrics(&x, &off)?;
    ensure!(p2 < p && s2 < s);
    Ok(())
}

/// SSIM and PSNR on real photographs against scikit-image (the reference run:
/// `fixtures/ssim/ssim_reference.py`, its output `fixtures/ssim/expected.json`). Unlike the
/// constant images above, these exercise the 7x7 window and the sample-covariance factor.
#[test]
fn real_images_match_scikit_image() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fixture = root.join("encode/tests/fixtures/ssim/expected.json");
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(fixture)?)?;
    ensure!(cases.len() == 4, "{} cases", cases.len());
    let load =
        |path: &serde_json::Value, c: &serde_json::Value| -> Result<(Vec<f32>, usize, usize)> {
            let img = image::open(root.join(path.as_str().unwrap()))?.to_rgb8();
            let c: Vec<usize> = c
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let (y, x, h, w) = (c[0], c[1], c[2], c[3]);
            let mut out = Vec::with_capacity(h * w * 3);
            for yy in y..y + h {
                for xx in x..x + w {
                    out.extend(
                        img.get_pixel(xx as u32, yy as u32)
                            .0
                            .iter()
                            .map(|&v| v as f32),
                    );
                }
            }
            Ok((out, h, w))
        };
    for (i, case) in cases.iter().enumerate() {
        let (a, h, w) = load(&case["a"], &case["a_crop"])?;
        let (mut b, _, _) = load(&case["b"], &case["b_crop"])?;
        if case["swap_b_channels"].as_bool().unwrap() {
            for px in b.chunks_mut(3) {
                px.swap(0, 2);
            }
        }
        let range = case["data_range"].as_f64().unwrap();
        let s = metrics::ssim(&a, &b, h, w, 3, range)?;
        let want = case["ssim"].as_f64().unwrap();
        ensure!(
            (s - want).abs() < 1e-9,
            "case {i}: ssim {s} vs scikit-image {want}"
        );
        let p = metrics::psnr(&a, &b, range)?;
        let want = case["psnr"].as_f64().unwrap();
        ensure!(
            (p - want).abs() < 1e-6,
            "case {i}: psnr {p} vs scikit-image {want}"
        );
    }
    Ok(())
}
