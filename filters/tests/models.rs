//! Stand-in ONNX models with the real signatures (tests/models/make_models.py) run through ONNX
//! Runtime from Rust, against the outputs Python onnxruntime gave for the same inputs.

use std::path::PathBuf;

use llamagen_filters::model::{ModelOptions, OnnxModel, Role, TokenType, l2_normalise};

fn model(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models")).join(name)
}

fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    let text = std::fs::read_to_string(model("reference_outputs.json")).expect("reference file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let o = &v["outputs"][name];
    let shape = o["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let data = o["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (shape, data)
}

/// make_models.py `pixel_input(n, size)`.
fn pixel_input(n: usize, size: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * 3 * size * size);
    for b in 0..n {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let t = 0.05 * (b as f64 + 1.0) * (x as f64 + 2.0 * y as f64) + c as f64;
                    v.push((t.sin() * 1.5) as f32);
                }
            }
        }
    }
    v
}

/// make_models.py `token_input()`.
fn token_input() -> Vec<u32> {
    let mut v = Vec::new();
    for (r, len) in [5u32, 20, 75].into_iter().enumerate() {
        let mut row = vec![49406u32];
        row.extend((0..len).map(|i| (1000 + 37 * i * (r as u32 + 1)) % 49000));
        row.push(49407);
        row.resize(77, 0);
        v.extend(row);
    }
    v
}

/// make_models.py `embedding_input(n)`.
fn embedding_input(n: usize) -> Vec<f32> {
    let mut v = Vec::new();
    for b in 0..n {
        let row: Vec<f64> = (0..768)
            .map(|i| (0.1 * i as f64 + b as f64).cos())
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.extend(row.iter().map(|x| (x / norm) as f32));
    }
    v
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn image_text_and_head_models_match_python_onnxruntime() {
    let o = ModelOptions {
        batch_size: 2,
        ..Default::default()
    };
    for (name, dim) in [("clip_b32_image.onnx", 512), ("clip_l14_image.onnx", 768)] {
        let m = OnnxModel::load(&model(name), Role::Image, None, &o).unwrap();
        assert_eq!(m.io_names(), ("pixel_values", "image_embeds"));
        assert_eq!(
            (m.image_size(0), m.fixed_batch(), m.output_dim()),
            (224, None, Some(dim))
        );
        let (got, w) = m.run_f32(&pixel_input(2, 224), 2, &[3, 224, 224]).unwrap();
        let (shape, want) = reference(name);
        assert_eq!(vec![2, w], shape);
        close(&got, &want, 1e-5, name);
    }
    let wm = OnnxModel::load(&model("watermark.onnx"), Role::Image, None, &o).unwrap();
    assert_eq!(
        (wm.io_names(), wm.image_size(0)),
        (("pixel_values", "logits"), 256)
    );
    let (got, _) = wm.run_f32(&pixel_input(2, 256), 2, &[3, 256, 256]).unwrap();
    close(&got, &reference("watermark.onnx").1, 1e-5, "watermark");

    let text = OnnxModel::load(&model("clip_b32_text.onnx"), Role::Text, None, &o).unwrap();
    assert_eq!(text.token_type(), Some(TokenType::I64));
    // Batch size 2 with 3 rows: two calls, the second with one row.
    let (got, _) = text.run_tokens(&token_input(), 3, 77).unwrap();
    close(&got, &reference("clip_b32_text.onnx").1, 1e-5, "text");

    for name in ["aesthetic_head.onnx", "nsfw_head.onnx"] {
        let m = OnnxModel::load(&model(name), Role::Head, None, &o).unwrap();
        assert_eq!(m.io_names(), ("embedding", "score"));
        let (got, _) = m.run_f32(&embedding_input(3), 3, &[768]).unwrap();
        close(&got, &reference(name).1, 1e-5, name);
    }
}

#[test]
fn fixed_batch_int32_normalised_exports_give_the_same_cosines() {
    let o = ModelOptions::default();
    let text32 = OnnxModel::load(
        &model("clip_b32_text_i32_fixed1.onnx"),
        Role::Text,
        None,
        &o,
    )
    .unwrap();
    assert_eq!(text32.token_type(), Some(TokenType::I32));
    assert_eq!(text32.fixed_batch(), Some(1));
    assert_eq!(text32.io_names(), ("text", "embedding"));
    let (got, _) = text32.run_tokens(&token_input(), 3, 77).unwrap();
    close(
        &got,
        &reference("clip_b32_text_i32_fixed1.onnx").1,
        1e-5,
        "text i32",
    );

    // The dynamic int64 export, re-normalised, equals the normalised fixed-batch export.
    let text64 = OnnxModel::load(&model("clip_b32_text.onnx"), Role::Text, None, &o).unwrap();
    let (mut a, w) = text64.run_tokens(&token_input(), 3, 77).unwrap();
    l2_normalise(&mut a, w);
    close(&a, &got, 1e-5, "normalised text");

    let img1 =
        OnnxModel::load(&model("clip_b32_image_fixed1.onnx"), Role::Image, None, &o).unwrap();
    assert_eq!(
        (img1.fixed_batch(), img1.io_names()),
        (Some(1), ("image", "embedding"))
    );
    let (b, _) = img1
        .run_f32(&pixel_input(2, 224), 2, &[3, 224, 224])
        .unwrap();
    let img = OnnxModel::load(&model("clip_b32_image.onnx"), Role::Image, None, &o).unwrap();
    let (mut c, w) = img
        .run_f32(&pixel_input(2, 224), 2, &[3, 224, 224])
        .unwrap();
    l2_normalise(&mut c, w);
    close(&b, &c, 1e-5, "normalised image");
}

#[test]
fn wrong_roles_and_outputs_are_refused_with_the_model_name() {
    let o = ModelOptions::default();
    let e = OnnxModel::load(&model("clip_b32_text.onnx"), Role::Image, None, &o)
        .err()
        .expect("a text model is not an image model");
    let msg = e.to_string();
    assert!(
        msg.contains("clip_b32_text.onnx") && msg.contains("input_ids"),
        "{msg}"
    );
    let e = OnnxModel::load(&model("watermark.onnx"), Role::Image, Some("nope"), &o)
        .err()
        .expect("no such output");
    assert!(e.to_string().contains("logits"), "{e}");
    let e = OnnxModel::load(&model("missing.onnx"), Role::Image, None, &o)
        .err()
        .expect("missing file");
    assert!(e.to_string().contains("missing.onnx"), "{e}");
}
