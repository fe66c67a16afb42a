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

/// A catalog whose rows hold the images of `npz` (keys `s000`, ...) as stored renditions of their
/// size and of half their size, in shards of 7 rows.
async fn catalog_of(root: &Path, npz: &Path) {
    use llamagen_catalog::arrow::array::{
        ArrayRef, BinaryBuilder, Int32Builder, ListBuilder, RecordBatch, StringArray,
        StringBuilder, StructBuilder,
    };
    use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
    use llamagen_catalog::schema::{col, image_fields};
    use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};
    use std::sync::Arc;

    let imgs = llamagen_eval::batch::npz_images(npz).unwrap();
    let (h, w) = (imgs.height as u32, imgs.width as u32);
    let item = imgs.height * imgs.width * 3;
    let ds = Catalog::open(root.to_str().unwrap(), &StorageOptions::default())
        .await
        .unwrap()
        .samples();
    for first in (0..imgs.n).step_by(7) {
        let rows: Vec<usize> = (first..imgs.n.min(first + 7)).collect();
        let mut images =
            ListBuilder::new(StructBuilder::from_fields(image_fields(), 0)).with_field(Arc::new(
                Field::new("item", DataType::Struct(image_fields()), true),
            ));
        for &i in &rows {
            let img =
                image::RgbImage::from_raw(w, h, imgs.pixels[i * item..][..item].to_vec()).unwrap();
            let half = image::imageops::resize(&img, w / 2, h / 2, image::imageops::Triangle);
            for (side, im) in [(h / 2, half), (h, img)] {
                let mut png = Vec::new();
                im.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .unwrap();
                let s = images.values();
                s.field_builder::<Int32Builder>(0)
                    .unwrap()
                    .append_value(side as i32);
                s.field_builder::<Int32Builder>(1)
                    .unwrap()
                    .append_value(side as i32);
                s.field_builder::<Int32Builder>(2)
                    .unwrap()
                    .append_value(side as i32);
                s.field_builder::<StringBuilder>(3)
                    .unwrap()
                    .append_value("png");
                s.field_builder::<BinaryBuilder>(4)
                    .unwrap()
                    .append_value(&png);
                s.append(true);
            }
            images.append(true);
        }
        let keys: Vec<String> = rows.iter().map(|i| format!("s{i:03}")).collect();
        let cols: Vec<(&str, ArrayRef)> = vec![
            (col::KEY, Arc::new(StringArray::from(keys))),
            (
                col::STATUS,
                Arc::new(StringArray::from(vec!["ok"; rows.len()])),
            ),
            (col::IMAGES, Arc::new(images.finish())),
        ];
        let schema = Schema::new(
            cols.iter()
                .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        );
        let batch =
            RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect())
                .unwrap();
        let mut wr = ds.writer(ShardWriterOptions {
            stage: "ingest".into(),
            ..Default::default()
        });
        wr.write(&batch).await.unwrap();
        let add = wr.finish().await.unwrap();
        ds.commit(Transaction {
            operation: "ingest".into(),
            run_id: None,
            add,
            remove: vec![],
            units: vec![],
        })
        .await
        .unwrap();
    }
}

/// A sample batch selected by a catalog query gives the metrics of the same images as an `.npz`;
/// a query without the images, or without the asked size, says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_catalog_query_is_a_sample_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog_of(&root, &fixtures().join("sample.npz")).await;
    let (ok, want, text) = eval(
        &fixtures().join("sample.npz"),
        &fixtures().join("ref.npz"),
        &fixtures().join("standin.onnx"),
        &tmp.path().join("npz.json"),
    );
    assert!(ok, "{text}");
    let size = llamagen_eval::batch::npz_images(&fixtures().join("sample.npz"))
        .unwrap()
        .height
        .to_string();
    let run = |query: &str, size: &str, out: &Path| {
        let o = Command::new(llamagen_tests::llamagen())
            .args(["eval", "--root"])
            .arg(&root)
            .args(["--sample-query", query, "--image-size", size, "--ref"])
            .arg(fixtures().join("ref.npz"))
            .arg("--inception")
            .arg(fixtures().join("standin.onnx"))
            .args(["--batch-size", "16", "--out"])
            .arg(out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let out = tmp.path().join("catalog.json");
    let (ok, err) = run("SELECT key, images FROM samples ORDER BY key", &size, &out);
    assert!(ok, "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for m in [
        "inception_score",
        "fid",
        "sfid",
        "precision",
        "recall",
        "samples",
    ] {
        assert_eq!(got[m], want[m], "{m}");
    }
    let (ok, err) = run("SELECT key FROM samples", &size, &tmp.path().join("x.json"));
    assert!(!ok && err.contains("no `images` column"), "{err}");
    let (ok, err) = run(
        "SELECT key, images FROM samples",
        "999",
        &tmp.path().join("x.json"),
    );
    assert!(
        !ok && err.contains("no 999 px image") && err.contains("key \"s0"),
        "{err}"
    );
}
