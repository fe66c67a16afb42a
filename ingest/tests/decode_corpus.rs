//! Every image of the bundled real edge-case corpus (`data/images`, described by
//! `data/images_manifest.jsonl`) goes through decode → centre crop → encode without a panic, and
//! each one either succeeds or fails with the kind its content calls for.

use std::path::PathBuf;

use llamagen_ingest::decode::{DecodeLimits, decode_rgb};
use llamagen_ingest::{IngestConfig, process_image_bytes};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data")
}

#[test]
fn corpus_decodes_or_fails_cleanly() {
    let manifest = std::fs::read_to_string(data().join("images_manifest.jsonl")).unwrap();
    let cfg = IngestConfig {
        sizes: vec![64, 128],
        ..Default::default()
    };
    let mut ok = 0;
    let mut failures = Vec::new();
    for line in manifest.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let rel = m["relpath"].as_str().unwrap();
        let bytes = std::fs::read(data().join(rel)).unwrap();
        let pil_ok = m["pillow_full_decode"] == "ok";
        match process_image_bytes(&bytes, &cfg) {
            Ok((decoded, images)) => {
                ok += 1;
                assert_eq!(images.len(), 2, "{rel}");
                for (size, data) in &images {
                    let back = image::load_from_memory(data).unwrap();
                    assert_eq!((back.width(), back.height()), (*size, *size), "{rel}");
                }
                // Upright size: EXIF orientations 5–8 swap width and height.
                let (w, h) = (
                    m["width"].as_u64().unwrap() as u32,
                    m["height"].as_u64().unwrap() as u32,
                );
                let swapped = matches!(m["exif_orientation"].as_u64(), Some(5..=8));
                let expect = if swapped { (h, w) } else { (w, h) };
                assert_eq!((decoded.orig_width, decoded.orig_height), expect, "{rel}");
            }
            Err(e) => failures.push((rel.to_string(), e.kind(), pil_ok, e.to_string())),
        }
    }
    for f in &failures {
        eprintln!("{f:?}");
    }
    // Images PIL decodes fully must decode here too, except formats we do not support (AVIF).
    for (rel, kind, pil_ok, msg) in &failures {
        if *pil_ok {
            assert_eq!(*kind, "unsupported_format", "{rel}: {msg}");
        }
    }
    let kind_of = |name: &str| failures.iter().find(|f| f.0.ends_with(name)).map(|f| f.1);
    assert_eq!(
        kind_of("decompression_bomb.gif"),
        Some("decompression_bomb")
    );
    assert_eq!(kind_of("hopper.heif"), Some("unsupported_format"));
    assert_eq!(kind_of("hopper.avif"), Some("unsupported_format"));
    assert_eq!(kind_of("broken.png"), Some("decode_error"));
    assert!(
        ok >= 90,
        "only {ok} images decoded; failures: {failures:#?}"
    );
}

#[test]
fn exif_orientation_is_applied() {
    // hopper_orientation_N.jpg are the same picture stored rotated/flipped with EXIF tag N; once
    // oriented they must all look like hopper.jpg.
    let base = image::open(data().join("images/pillow/hopper.jpg"))
        .unwrap()
        .to_rgb8();
    for n in 2..=8 {
        let bytes = std::fs::read(data().join(format!("images/pillow/hopper_orientation_{n}.jpg")))
            .unwrap();
        let d = decode_rgb(&bytes, &DecodeLimits::default(), None).unwrap();
        assert_eq!(d.rgb.dimensions(), base.dimensions(), "orientation {n}");
        let diff: f64 = d
            .rgb
            .as_raw()
            .iter()
            .zip(base.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / base.as_raw().len() as f64;
        assert!(diff < 8.0, "orientation {n}: mean abs difference {diff}");
    }
}

#[test]
fn bombs_are_refused_before_allocation() {
    let bytes = std::fs::read(data().join("images/pillow/decompression_bomb.gif")).unwrap();
    let e = decode_rgb(&bytes, &DecodeLimits::default(), None).unwrap_err();
    assert_eq!(e.kind(), "decompression_bomb", "{e}");
    assert!(e.to_string().contains("pixels"), "{e}");
    let html = b"<!DOCTYPE html><html><body>not found</body></html>";
    assert_eq!(
        decode_rgb(html, &DecodeLimits::default(), None)
            .unwrap_err()
            .kind(),
        "not_an_image"
    );
}

/// Reduced (DCT-domain) JPEG decoding stays close to the full decode after the centre crop.
#[test]
fn reduced_decode_is_within_tolerance() {
    use llamagen_prep::pixels::center_crop_arr;
    let mut checked = 0;
    for rel in [
        "images/skimage/chelsea.png",
        "images/laion_repos/aesthetic_predictor_cat_aesthetic.png",
        "images/skimage/astronaut.png",
        "images/skimage/coffee.png",
    ] {
        // Make large JPEGs out of real photos: upscale 4x, then encode at quality 95.
        let img = image::open(data().join(rel)).unwrap().to_rgb8();
        let big = image::imageops::resize(
            &img,
            img.width() * 4,
            img.height() * 4,
            image::imageops::FilterType::Triangle,
        );
        let jpeg = llamagen_ingest::encode_image(
            &big,
            llamagen_ingest::OutputFormat::Jpeg {
                quality: 95,
                full_chroma: true,
            },
        )
        .unwrap();
        for size in [256u32, 128] {
            let full = decode_rgb(&jpeg, &DecodeLimits::default(), None).unwrap();
            let reduced = decode_rgb(&jpeg, &DecodeLimits::default(), Some(size)).unwrap();
            let factor = llamagen_ingest::decode::reduction_factor(
                full.orig_width.min(full.orig_height),
                size,
            );
            if factor < llamagen_ingest::decode::MIN_REDUCTION {
                assert_eq!(reduced.reduced_by, 1, "{rel} @ {size}: reduced by {factor}");
                continue;
            }
            assert!(
                reduced.reduced_by >= llamagen_ingest::decode::MIN_REDUCTION,
                "{rel} @ {size}: not reduced ({}x{})",
                full.orig_width,
                full.orig_height
            );
            assert_eq!(
                (reduced.orig_width, reduced.orig_height),
                (full.orig_width, full.orig_height)
            );
            let a = center_crop_arr(&full.rgb, size).unwrap();
            let b = center_crop_arr(&reduced.rgb, size).unwrap();
            let mad: f64 = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| (*x as f64 - *y as f64).abs())
                .sum::<f64>()
                / a.as_raw().len() as f64;
            assert!(
                mad < 2.5,
                "{rel} @ {size} (1/{}): mean abs difference {mad}",
                reduced.reduced_by
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "{checked} reduced cases");
}
