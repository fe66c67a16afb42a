//! `llamagen eval` end to end with the stand-in Inception model: the metrics of a sample batch
//! against a reference batch equal those of the ADM evaluator's formulas on the activations
//! Python's onnxruntime computes (`eval/tests/fixtures/inception/make_standin.py`, which wrote the
//! batches, the model and `expected.json`), for every way of giving the batches.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    llamagen_tests::workspace().join("eval/tests/fixtures/inception")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// Runs `llamagen eval`; returns success, the JSON report and the output.
fn eval(
    sample: &Path,
    reference: &Path,
    model: &Path,
    out: &Path,
) -> (bool, serde_json::Value, String) {
    let o = Command::new(llamagen_tests::llamagen())
        .args(["eval", "--sample"])
        .arg(sample)
        .arg("--ref")
        .arg(reference)
        .arg("--inception")
        .arg(model)
        .args(["--batch-size", "16", "--out"])
        .arg(out)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}");
    let json = std::fs::read_to_string(out)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    (o.status.success(), json, text)
}

fn close(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!(((g - w) / w).abs() <= 1e-4, "{what}: {g} vs reference {w}");
}

/// Runs Python (the project venv's numpy) on `code` with `args`.
fn python(code: &str, args: &[&Path]) {
    let o = Command::new(llamagen_tests::python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn metrics_match_the_evaluator_formulas() {
    let tmp = tempfile::tempdir().unwrap();
    let (f, want) = (fixtures(), expected());
    let model = f.join("standin.onnx");

    // Precomputed reference statistics in the batch (as VIRTUAL_imagenet256_labeled.npz).
    let (ok, got, text) = eval(
        &f.join("sample.npz"),
        &f.join("ref.npz"),
        &model,
        &tmp.path().join("a.json"),
    );
    assert!(ok, "{text}");
    for k in ["inception_score", "fid", "sfid"] {
        close(&got[k], &want[k], k);
    }
    // Equal decisions: shares of 40 and 48 points.
    assert_eq!(got["precision"], want["precision"]);
    assert_eq!(got["recall"], want["recall"]);
    assert_eq!(got["reference_statistics"], "file");
    assert!(
        text.contains("FID: ") && text.contains("Recall: "),
        "{text}"
    );

    // The reference's images only: statistics from their activations.
    let images_only = tmp.path().join("ref_images.npz");
    python(
        "import sys, numpy as np\nnp.savez(sys.argv[2], arr_0=np.load(sys.argv[1])['arr_0'])",
        &[&f.join("ref.npz"), &images_only],
    );
    let (ok, got, text) = eval(
        &f.join("sample.npz"),
        &images_only,
        &model,
        &tmp.path().join("b.json"),
    );
    assert!(ok, "{text}");
    close(
        &got["fid"],
        &want["fid_from_images"],
        "FID from reference images",
    );
    close(
        &got["sfid"],
        &want["sfid_from_images"],
        "sFID from reference images",
    );
    assert_eq!(got["reference_statistics"], "images");

    // Statistics only: FID and sFID as before, no precision/recall.
    let stats_only = tmp.path().join("ref_stats.npz");
    python(
        "import sys, numpy as np\nr = np.load(sys.argv[1])\nnp.savez(sys.argv[2], **{k: r[k] for k in ['mu', 'sigma', 'mu_s', 'sigma_s']})",
        &[&f.join("ref.npz"), &stats_only],
    );
    let (ok, got, text) = eval(
        &f.join("sample.npz"),
        &stats_only,
        &model,
        &tmp.path().join("c.json"),
    );
    assert!(ok, "{text}");
    close(&got["fid"], &want["fid"], "FID from statistics only");
    assert!(got["precision"].is_null(), "{got}");
    assert!(text.contains("not computed"), "{text}");

    // np.savez_compressed batches (deflated entries) read the same.
    let compressed = tmp.path().join("sample_compressed.npz");
    python(
        "import sys, numpy as np\nnp.savez_compressed(sys.argv[2], arr_0=np.load(sys.argv[1])['arr_0'])",
        &[&f.join("sample.npz"), &compressed],
    );
    let (ok, got, text) = eval(
        &compressed,
        &f.join("ref.npz"),
        &model,
        &tmp.path().join("e.json"),
    );
    assert!(ok, "{text}");
    close(&got["fid"], &want["fid"], "FID of the compressed batch");

    // A folder of PNGs holds the same pixels as the .npz batch: the same metrics.
    let dir = tmp.path().join("samples");
    std::fs::create_dir_all(&dir).unwrap();
    let batch = llamagen_eval::batch::npz_images(&f.join("sample.npz")).unwrap();
    let item = batch.height * batch.width * 3;
    for (i, px) in batch.pixels.chunks(item).enumerate() {
        image::RgbImage::from_raw(batch.width as u32, batch.height as u32, px.to_vec())
            .unwrap()
            .save(dir.join(format!("{i:03}.png")))
            .unwrap();
    }
    let (ok, got, text) = eval(&dir, &f.join("ref.npz"), &model, &tmp.path().join("d.json"));
    assert!(ok, "{text}");
    close(&got["fid"], &want["fid"], "FID of the folder");
    assert_eq!(got["precision"], want["precision"]);
    assert_eq!(got["samples"], 40);
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    // A model without the evaluator's outputs.
    let clip = llamagen_tests::workspace().join("filters/tests/models/clip_b32_image.onnx");
    let (ok, _, text) = eval(
        &f.join("sample.npz"),
        &f.join("ref.npz"),
        &clip,
        &tmp.path().join("x.json"),
    );
    assert!(!ok);
    assert!(text.contains("clip_b32_image.onnx"), "{text}");
    // A batch without images.
    let empty = tmp.path().join("empty.npz");
    python(
        "import sys, numpy as np\nnp.savez(sys.argv[1], other=np.zeros(3))",
        &[&empty],
    );
    let (ok, _, text) = eval(
        &empty,
        &f.join("ref.npz"),
        &f.join("standin.onnx"),
        &tmp.path().join("y.json"),
    );
    assert!(!ok);
    assert!(
        text.contains("empty.npz") && text.contains("arr_0"),
        "{text}"
    );
}

/// The stand-in's pool features through our ONNX Runtime session equal Python onnxruntime's.
#[test]
fn activations_equal_python_onnxruntime() {
    use llamagen_eval::inception::Inception;
    let f = fixtures();
    let model = Inception::load(
        &f.join("standin.onnx"),
        &llamagen_filters::model::ModelOptions::default(),
    )
    .unwrap();
    let batch = llamagen_eval::batch::npz_images(&f.join("sample.npz")).unwrap();
    let a = model.activations(&batch, |_| {}).unwrap();
    assert_eq!(
        (a.n, a.pool_dim, a.spatial_dim, a.classes),
        (40, 32, 112, 10)
    );
    let want: Vec<f64> = expected()["pool_3_first_row"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (i, (&g, &w)) in a.pool[..32].iter().zip(&want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "pool_3[0][{i}]: {g} vs {w}"
        );
    }
    // Probabilities are a softmax per image.
    for row in a.probs.chunks(10) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

/// `tokenizer reconstruct --inception` reports rFID: the FID of the reconstructions against the
/// original crops, equal to `llamagen eval` on the two batches it writes with `--npz-dir`.
#[test]
fn tokenizer_reconstruct_reports_rfid() {
    let tmp = tempfile::tempdir().unwrap();
    let ws = llamagen_tests::workspace();
    let npz = tmp.path().join("npz");
    let json = tmp.path().join("r.json");
    let args = tmp.path().join("reduced.json");
    std::fs::write(
        &args,
        serde_json::to_string(&llamagen_encode::ModelArgs::reduced()).unwrap(),
    )
    .unwrap();
    let mut cmd = Command::new(llamagen_tests::llamagen());
    cmd.args(["tokenizer", "reconstruct", "--checkpoint"])
        .arg(ws.join("data/parity/vq_weights.safetensors"))
        .arg("--model")
        .arg(&args)
        .args(["--image-size", "32", "--images"]);
    for f in [
        "camera.png",
        "chelsea.png",
        "coffee.png",
        "flower.jpg",
        "hopper.jpg",
    ] {
        cmd.arg(ws.join("data/images").join(f));
    }
    let o = cmd
        .arg("--inception")
        .arg(fixtures().join("standin.onnx"))
        .arg("--npz-dir")
        .arg(&npz)
        .arg("--out")
        .arg(tmp.path().join("grid.png"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["images"], 5);
    let rfid = r["rfid"].as_f64().unwrap();
    assert!(rfid.is_finite() && rfid > 0.0, "{r}");
    let (ok, got, text) = eval(
        &npz.join("reconstructions.npz"),
        &npz.join("originals.npz"),
        &fixtures().join("standin.onnx"),
        &tmp.path().join("e.json"),
    );
    assert!(ok, "{text}");
    close(&got["fid"], &serde_json::json!(rfid), "rFID against eval");
}
