//! `phash_bytes` against `str(imagehash.phash(PIL.Image.open(f)))` on every bundled real image
//! (fixtures written by `tests/phash_reference.py`).

use std::path::{Path, PathBuf};

use llamagen_dedup::phash::decode_luma;
use llamagen_dedup::{hamming, phash, phash_bytes};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn expected() -> serde_json::Value {
    let p = root().join("dedup/tests/fixtures/phash_expected.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Files whose hash differs only because the `image` crate decodes them differently from
/// Pillow (each checked on PIL's decoded pixels below, which match), with the Hamming distance.
/// hopper_bad_exif.jpg: a greyscale JPEG that zune-jpeg decodes to other pixels than
/// libjpeg-turbo (its PIL-decoded PNG hashes exactly).
const DECODER_DIFFERENCES: &[(&str, u32)] = &[("data/images/pillow/hopper_bad_exif.jpg", 24)];

#[test]
fn every_bundled_image_matches_imagehash() {
    let doc = expected();
    let (mut exact, mut hashed, mut lossless_ok) = (0, 0, 0);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for e in doc["images"].as_array().unwrap() {
        let path = e["path"].as_str().unwrap();
        let bytes = std::fs::read(root().join(path)).unwrap();
        let got = phash_bytes(&bytes);
        // PIL's decoded pixels (mode L, lossless PNG): must match exactly.
        if let Some(png) = e["decoded_l_png"].as_str() {
            let want = e["decoded_l_png_phash"].as_str().unwrap();
            let b = std::fs::read(root().join("dedup/tests/fixtures").join(png)).unwrap();
            let h = hex(phash_bytes(&b).unwrap());
            if h == want {
                lossless_ok += 1;
            } else {
                failures.push(format!("{path}: PIL-decoded PNG {png}: {h} != {want}"));
            }
        }
        match (e["phash"].as_str(), got) {
            (Some(want), Ok(h)) => {
                hashed += 1;
                let w = u64::from_str_radix(want, 16).unwrap();
                if h == w {
                    exact += 1;
                } else {
                    let d = hamming(h, w);
                    report.push(format!(
                        "{path} ({} {}): {} != {want}, distance {d}",
                        e["format"],
                        e["mode"],
                        hex(h)
                    ));
                    if !DECODER_DIFFERENCES.contains(&(path, d)) {
                        failures.push(format!("{path}: {} != {want} (distance {d})", hex(h)));
                    }
                }
            }
            (Some(want), Err(err)) => {
                report.push(format!("{path}: refused ({err}), imagehash gives {want}"));
            }
            (None, Ok(h)) => report.push(format!(
                "{path}: PIL refuses ({}), hashed here {}",
                e["error"],
                hex(h)
            )),
            (None, Err(err)) => {
                report.push(format!("{path}: refused by both ({err} / {})", e["error"]))
            }
        }
    }
    eprintln!(
        "{exact} of {hashed} hashed files exactly equal; {lossless_ok} PIL-decoded PNGs equal"
    );
    for r in &report {
        eprintln!("  {r}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn photo() -> image::RgbImage {
    let b = std::fs::read(root().join("data/images/skimage/astronaut.png")).unwrap();
    image::load_from_memory(&b).unwrap().to_rgb8()
}

#[test]
fn resized_and_recompressed_copy_is_near() {
    let img = photo();
    let h = phash(&img);
    let small = image::imageops::resize(&img, 200, 200, image::imageops::FilterType::Triangle);
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 70)
        .encode_image(&small)
        .unwrap();
    let h2 = phash_bytes(&jpeg).unwrap();
    assert!(hamming(h, h2) <= 6, "distance {}", hamming(h, h2));
}

#[test]
fn distinct_images_are_far_apart() {
    let names = [
        "data/images/skimage/astronaut.png",
        "data/images/skimage/coffee.png",
        "data/images/skimage/chelsea.png",
        "data/images/skimage/rocket.jpg",
        "data/images/skimage/horse.png",
        "data/images/skimage/moon.png",
    ];
    let hashes: Vec<u64> = names
        .iter()
        .map(|n| phash_bytes(&std::fs::read(root().join(n)).unwrap()).unwrap())
        .collect();
    for i in 0..hashes.len() {
        for j in i + 1..hashes.len() {
            let d = hamming(hashes[i], hashes[j]);
            assert!(d >= 16, "{} vs {}: {d}", names[i], names[j]);
        }
    }
}

#[test]
fn decode_luma_matches_rgb_path() {
    let b = std::fs::read(root().join("data/images/skimage/coffee.png")).unwrap();
    let (w, h, grey) = decode_luma(&b, u64::MAX).unwrap();
    let rgb = image::load_from_memory(&b).unwrap().to_rgb8();
    assert_eq!((w, h), rgb.dimensions());
    assert_eq!(llamagen_dedup::phash::phash_luma(w, h, &grey), phash(&rgb));
}
