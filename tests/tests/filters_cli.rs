//! `llamagen filter score` and `llamagen filter apply` on a local catalog of real images, with
//! the stand-in ONNX models of filters/tests/models and ONNX Runtime from the project venv.

use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, ListBuilder, RecordBatch, StringArray, StringBuilder,
    StructBuilder,
};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::schema::{col, image_fields};
use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};
use llamagen_tests::{run_llamagen, workspace};

async fn make_catalog(root: &str) {
    let names = [
        "hopper.jpg",
        "chelsea.png",
        "grace_hopper.jpg",
        "broken.png",
    ];
    let mut images = ListBuilder::new(StructBuilder::from_fields(image_fields(), 0)).with_field(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
    );
    let (mut ow, mut oh) = (Int32Builder::new(), Int32Builder::new());
    for n in names {
        let bytes = std::fs::read(workspace().join("data/images").join(n)).unwrap();
        let (w, h) = match n {
            "hopper.jpg" => (128, 128),
            "chelsea.png" => (451, 300),
            "grace_hopper.jpg" => (512, 600),
            _ => (0, 0),
        };
        let s = images.values();
        s.field_builder::<Int32Builder>(0)
            .unwrap()
            .append_value(w.max(h));
        s.field_builder::<Int32Builder>(1).unwrap().append_value(w);
        s.field_builder::<Int32Builder>(2).unwrap().append_value(h);
        s.field_builder::<StringBuilder>(3)
            .unwrap()
            .append_value("jpeg");
        s.field_builder::<BinaryBuilder>(4)
            .unwrap()
            .append_value(&bytes);
        s.append(true);
        images.append(true);
        ow.append_value(w);
        oh.append_value(h);
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        (col::KEY, Arc::new(StringArray::from(names.to_vec()))),
        (col::STATUS, Arc::new(StringArray::from(vec!["ok"; 4]))),
        (
            col::TEXT,
            Arc::new(StringArray::from(vec!["a photo of a person"; 4])),
        ),
        (col::ORIG_WIDTH, Arc::new(ow.finish())),
        (col::ORIG_HEIGHT, Arc::new(oh.finish())),
        (col::IMAGES, Arc::new(images.finish())),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch =
        RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap();
    let ds = Catalog::open(root, &StorageOptions::default())
        .await
        .unwrap()
        .samples();
    let mut w = ds.writer(ShardWriterOptions {
        stage: "ingest".into(),
        ..Default::default()
    });
    w.write(&batch).await.unwrap();
    let add = w.finish().await.unwrap();
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

fn model(n: &str) -> String {
    workspace()
        .join("filters/tests/models")
        .join(n)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn score_dry_run_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat").display().to_string();
    make_catalog(&root).await;
    let (code, out, err) = run_llamagen(
        &[
            "filter",
            "score",
            "--root",
            &root,
            "--clip-image",
            &model("clip_b32_image.onnx"),
            "--clip-text",
            &model("clip_b32_text_i32_fixed1.onnx"),
            "--clip-l14-image",
            &model("clip_l14_image.onnx"),
            "--watermark",
            &model("watermark.onnx"),
            "--batch-size",
            "2",
            "--intra-threads",
            "1",
            "--preprocess-threads",
            "2",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("decode_error") && out.contains("images_scored"),
        "{out}"
    );
    assert!(
        err.contains("sac+logos+ava1-l14-linearMSE.pth sha256 21dd590f"),
        "{err}"
    );

    let thresholds = dir.path().join("t.toml");
    std::fs::write(
        &thresholds,
        "[aesthetic]\nmin = 5.5\n[min_side]\nmin = 200\n",
    )
    .unwrap();
    let chart = dir.path().join("chart.html");
    let t = thresholds.display().to_string();
    let c = chart.display().to_string();
    let (code, out, err) = run_llamagen(
        &[
            "filter",
            "apply",
            "--root",
            &root,
            "--thresholds",
            &t,
            "--dry-run",
            "--chart",
            &c,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("min_side") && out.contains("aesthetic:missing"),
        "{out}"
    );
    assert!(std::fs::read_to_string(&chart).unwrap().contains("<svg"));
    // The dry run changed nothing.
    let (_, before, _) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT count(*) AS n FROM samples WHERE status = 'dropped'",
            "--root",
            &root,
            "--format",
            "csv",
        ],
        &[],
    );
    assert!(before.contains("\n0"), "{before}");

    let (code, out, err) = run_llamagen(
        &["filter", "apply", "--root", &root, "--thresholds", &t],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT key, status, array_to_string(reject_reasons, ',') AS r FROM samples ORDER BY key",
            "--root",
            &root,
            "--format",
            "csv",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    // broken.png: no scores and no size; hopper.jpg is 128 px. (CSV quotes the list with commas.)
    assert!(
        out.contains("broken.png,dropped,\"aesthetic:missing,min_side:missing\""),
        "{out}"
    );
    assert!(
        out.contains("hopper.jpg,dropped,") && out.contains("min_side<200"),
        "{out}"
    );
}

#[test]
fn a_missing_onnx_runtime_says_how_to_install_it() {
    let (code, out, err) = run_llamagen(
        &[
            "filter",
            "score",
            "--root",
            "/nonexistent",
            "--watermark",
            &model("watermark.onnx"),
        ],
        &[(
            "ORT_DYLIB_PATH",
            "/nonexistent/libonnxruntime.so".to_string(),
        )],
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("pip install onnxruntime"), "{err}");
}
