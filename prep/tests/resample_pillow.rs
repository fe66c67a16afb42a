//! Pillow's `Image.resize` byte for byte: 8-bit RGB LANCZOS and one float32 channel (mode `F`,
//! as clean-fid resizes), against the SHA-256 of Pillow 13's outputs
//! (tests/fixtures/resample/make_expected.py).

use std::path::PathBuf;

use llamagen_prep::resample::{Filter, resize_f32, resize_window};
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/resample"
    ))
    .join(name)
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn filter(name: &str) -> Filter {
    match name {
        "bicubic" => Filter::Bicubic,
        "bilinear" => Filter::Bilinear,
        "lanczos" => Filter::Lanczos,
        other => panic!("filter {other}"),
    }
}

#[test]
fn resizes_equal_pillows_bytes() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let img = image::open(fixture(case["image"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let crop: Option<Vec<u32>> = case["crop"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_u64().unwrap() as u32).collect());
        let (l, t, r, b) = match &crop {
            Some(c) => (c[0], c[1], c[2], c[3]),
            None => (0, 0, img.width(), img.height()),
        };
        let src = image::imageops::crop_imm(&img, l, t, r - l, b - t).to_image();
        let size: Vec<u32> = case["size"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let (ow, oh) = (size[0], size[1]);
        let got = match case["kind"].as_str().unwrap() {
            "rgb8_lanczos" => sha(&resize_window(
                &src,
                ow,
                oh,
                Filter::Lanczos,
                (0, 0, ow, oh),
            )),
            "f32" => {
                let c = case["channel"].as_u64().unwrap() as usize;
                let ch: Vec<f32> = src.pixels().map(|p| p.0[c] as f32).collect();
                let out = resize_f32(
                    &ch,
                    src.width() as usize,
                    src.height() as usize,
                    ow as usize,
                    oh as usize,
                    filter(case["filter"].as_str().unwrap()),
                );
                assert_eq!(out.len(), (ow * oh) as usize);
                let sum: f64 = out.iter().map(|&v| v as f64).sum();
                let want_sum = case["sum"].as_f64().unwrap();
                assert!(
                    (sum - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0),
                    "{case}: sum {sum}"
                );
                sha(&out
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>())
            }
            k => panic!("kind {k}"),
        };
        if got != case["sha256"].as_str().unwrap() {
            failures.push(case.to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Pillow:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
