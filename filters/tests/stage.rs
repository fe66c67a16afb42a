//! The filter stages on a real catalog: the bundled real images (broken ones included) scored
//! with the stand-in models through `map_shards`, checked against the Python reference pipeline
//! (tests/pipeline/make_expected.py), the stored ViT-L/14 embeddings checked against the encoder
//! run directly, then thresholds applied, changed and re-applied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Builder, Int64Array, ListBuilder, RecordBatch,
    StringBuilder, StructBuilder,
};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Schema};
use llamagen_catalog::schema::{col, image_fields};
use llamagen_catalog::{Catalog, Dataset, ShardWriterOptions, StorageOptions, Transaction};
use llamagen_filters::model::{ModelOptions, OnnxModel, Role, l2_normalise};
use llamagen_filters::preprocess::{clip_preprocess, decode_rgb};
use llamagen_filters::report::DryRun;
use llamagen_filters::rules::Thresholds;
use llamagen_filters::scorer::{Scorer, ScorerConfig};
use llamagen_filters::stage::{self, VERDICT_COLUMNS};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn expected() -> serde_json::Value {
    let t = std::fs::read_to_string(manifest_dir().join("tests/pipeline/expected.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

struct Row {
    key: String,
    /// (bytes, width, height) per rendition.
    images: Option<Vec<(Vec<u8>, i32, i32)>>,
    text: Option<String>,
    orig: Option<(i32, i32)>,
    content_bytes: i64,
}

fn batch_of(rows: &[Row]) -> RecordBatch {
    let mut keys = StringBuilder::new();
    let mut status = StringBuilder::new();
    let mut text = StringBuilder::new();
    let mut ow = Int32Builder::new();
    let mut oh = Int32Builder::new();
    let item = Field::new("item", DataType::Struct(image_fields()), true);
    let mut images =
        ListBuilder::new(StructBuilder::from_fields(image_fields(), 0)).with_field(Arc::new(item));
    for r in rows {
        keys.append_value(&r.key);
        status.append_value("ok");
        text.append_option(r.text.as_deref());
        ow.append_option(r.orig.map(|o| o.0));
        oh.append_option(r.orig.map(|o| o.1));
        match &r.images {
            None => images.append(false),
            Some(list) => {
                for (bytes, w, h) in list {
                    let s = images.values();
                    s.field_builder::<Int32Builder>(0)
                        .unwrap()
                        .append_value((*w).max(*h));
                    s.field_builder::<Int32Builder>(1).unwrap().append_value(*w);
                    s.field_builder::<Int32Builder>(2).unwrap().append_value(*h);
                    s.field_builder::<StringBuilder>(3)
                        .unwrap()
                        .append_value("jpeg");
                    s.field_builder::<BinaryBuilder>(4)
                        .unwrap()
                        .append_value(bytes);
                    s.append(true);
                }
                images.append(true);
            }
        }
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        (col::KEY, Arc::new(keys.finish())),
        (col::STATUS, Arc::new(status.finish())),
        (col::TEXT, Arc::new(text.finish())),
        (col::ORIG_WIDTH, Arc::new(ow.finish())),
        (col::ORIG_HEIGHT, Arc::new(oh.finish())),
        (
            col::CONTENT_BYTES,
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.content_bytes).collect::<Vec<_>>(),
            )),
        ),
        (col::IMAGES, Arc::new(images.finish())),
    ];
    let schema = Schema::new(
        cols.iter()
            .map(|(n, a)| {
                Field::new(
                    *n,
                    a.data_type().clone(),
                    *n != col::KEY && *n != col::STATUS,
                )
            })
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect()).unwrap()
}

/// One row per bundled image (the file itself as the stored rendition, plus a small decoy
/// rendition on one row), one row without images and one without a caption.
async fn make_catalog(root: &str, caption: &str) -> (Dataset, Vec<String>) {
    let cat = Catalog::open(root, &StorageOptions::default())
        .await
        .unwrap();
    let ds = cat.samples();
    let dir = manifest_dir().join("../data/images");
    // The top-level images (the subdirectories hold the wider ingest corpus).
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into())
        .collect();
    names.sort();
    let decoy = std::fs::read(dir.join("hopper.jpg")).unwrap();
    let mut rows = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let bytes = std::fs::read(dir.join(n)).unwrap();
        let size = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok());
        let (w, h) = size.map_or((0, 0), |(w, h)| (w as i32, h as i32));
        let mut renditions = vec![(bytes.clone(), w, h)];
        if n == "chelsea.png" {
            // A smaller rendition listed first: the largest must be used.
            renditions.insert(0, (decoy.clone(), 8, 8));
        }
        rows.push(Row {
            key: format!("img-{i:02}-{n}"),
            images: Some(renditions),
            text: Some(caption.to_string()),
            orig: size.map(|_| (w, h)),
            content_bytes: bytes.len() as i64,
        });
    }
    rows.push(Row {
        key: "no-image".into(),
        images: None,
        text: Some(caption.into()),
        orig: None,
        content_bytes: 0,
    });
    rows.push(Row {
        key: "no-caption".into(),
        images: Some(vec![(decoy.clone(), 128, 128)]),
        text: None,
        orig: Some((128, 128)),
        content_bytes: decoy.len() as i64,
    });
    // Two shards.
    let mid = rows.len() / 2;
    for part in [&rows[..mid], &rows[mid..]] {
        let mut w = ds.writer(ShardWriterOptions {
            stage: "ingest".into(),
            ..Default::default()
        });
        w.write(&batch_of(part)).await.unwrap();
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
    (ds, names)
}

fn models(name: &str) -> Option<PathBuf> {
    Some(manifest_dir().join("tests/models").join(name))
}

fn scorer() -> Scorer {
    Scorer::load(ScorerConfig {
        clip_image: models("clip_b32_image.onnx"),
        clip_text: models("clip_b32_text.onnx"),
        clip_l14_image: models("clip_l14_image.onnx"),
        nsfw_head: models("nsfw_head.onnx"),
        watermark: models("watermark.onnx"),
        model: ModelOptions {
            batch_size: 4,
            intra_threads: 1,
            ..Default::default()
        },
        preprocess_threads: 2,
        ..ScorerConfig::new()
    })
    .unwrap()
}

async fn read_all(ds: &Dataset, cols: &[&str]) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    for e in ds.snapshot().await.unwrap().shards {
        out.extend(ds.read_shard(&e, Some(cols)).await.unwrap());
    }
    out
}

type RowScores = BTreeMap<String, [Option<f32>; 4]>;

async fn scores(ds: &Dataset) -> RowScores {
    let cols = [
        col::KEY,
        col::SCORE_CLIP_SIMILARITY,
        col::SCORE_AESTHETIC,
        col::SCORE_WATERMARK,
        col::SCORE_NSFW,
    ];
    let mut m = BTreeMap::new();
    for b in read_all(ds, &cols).await {
        let k = b.column(0).as_string::<i32>().clone();
        let get = |i: usize, r: usize| {
            let a = b.column(i).as_primitive::<Float32Type>();
            a.is_valid(r).then(|| a.value(r))
        };
        for r in 0..b.num_rows() {
            m.insert(
                k.value(r).to_string(),
                [get(1, r), get(2, r), get(3, r), get(4, r)],
            );
        }
    }
    m
}

/// `clip_embedding` of every row: (tokens, dim, dtype, values decoded from little-endian f16).
async fn clip_embeddings(ds: &Dataset) -> BTreeMap<String, Option<(i32, i32, String, Vec<f32>)>> {
    let mut m = BTreeMap::new();
    for b in read_all(ds, &[col::KEY, col::CLIP_EMBEDDING]).await {
        let k = b.column(0).as_string::<i32>();
        let e = b.column(1).as_struct();
        assert_eq!(e.fields(), &llamagen_catalog::schema::embedding_fields());
        for r in 0..b.num_rows() {
            let v = e.is_valid(r).then(|| {
                let data = e.column(3).as_binary::<i32>().value(r);
                assert_eq!(data.len() % 2, 0);
                let values = data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
                (
                    e.column(0).as_primitive::<Int32Type>().value(r),
                    e.column(1).as_primitive::<Int32Type>().value(r),
                    e.column(2).as_string::<i32>().value(r).to_string(),
                    values,
                )
            });
            m.insert(k.value(r).to_string(), v);
        }
    }
    m
}

/// The L2-normalised ViT-L/14 embedding of `bytes`, running the encoder directly.
fn l14_embedding(m: &OnnxModel, bytes: &[u8]) -> Vec<f32> {
    let img = decode_rgb(bytes, 178_956_970).unwrap();
    let s = m.image_size(224);
    let mut x = Vec::new();
    clip_preprocess(&img, s, &mut x);
    let (mut e, d) = m.run_f32(&x, 1, &[3, s as usize, s as usize]).unwrap();
    l2_normalise(&mut e, d);
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn scores_match_the_python_pipeline_and_broken_images_flow_through() {
    let exp = expected();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap();
    let (ds, names) = make_catalog(root, exp["caption"].as_str().unwrap()).await;
    let sc = Arc::new(scorer());
    let report = stage::score_catalog(&ds, sc.clone(), (0, 1), |_| {})
        .await
        .unwrap();
    assert_eq!(report.map.shards_rewritten, 2);
    assert_eq!(report.counters.received as usize, names.len() + 2);
    assert_eq!(report.counters.errors.get("no_image"), Some(&1));
    let got = scores(&ds).await;

    let mut compared = 0;
    let mut undecodable = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let row = got[&format!("img-{i:02}-{n}")];
        let rec = &exp["images"][n];
        if row[0].is_none() {
            undecodable.push(n.clone());
            assert!(row.iter().all(Option::is_none), "{n}: partial scores");
            continue;
        }
        if rec["pil_decodes"] != true || n == "transparent.png" || n == "pil_sample_cmyk.jpg" {
            // Decoded here but not by PIL (or colour-converted differently): scored, not compared.
            continue;
        }
        // PNGs decode to the same pixels as in PIL, so the scores agree to float rounding.
        // JPEG decoders (zune-jpeg here, libjpeg-turbo in PIL) differ by up to a few levels on
        // some pixels, which moves the stand-in models' scores by up to ~0.01.
        let tol = if n.ends_with(".png") { 2e-5 } else { 0.03 };
        let want = &rec["scores"];
        for (j, k) in ["clip_similarity", "aesthetic", "watermark", "nsfw"]
            .iter()
            .enumerate()
        {
            let w = want[k].as_f64().unwrap();
            let g = row[j].unwrap() as f64;
            eprintln!("{n} {k}: {g} vs Python {w} ({:+.2e})", g - w);
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{n} {k}: got {g}, Python {w}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 10, "compared {compared}");
    // Formats and files the decoder refuses are per-row failures, never shard failures.
    for must_fail in [
        "broken.png",
        "zero_width.gif",
        "decompression_bomb.gif",
        "hopper.avif",
    ] {
        assert!(
            undecodable.contains(&must_fail.to_string()),
            "{must_fail} scored: {undecodable:?}"
        );
    }
    assert_eq!(
        report
            .counters
            .errors
            .get("decode_error")
            .copied()
            .unwrap_or(0) as usize,
        undecodable.len()
    );
    // No caption: image scores but no similarity.
    let nc = got["no-caption"];
    assert!(nc[0].is_none() && nc[1].is_some() && nc[2].is_some() && nc[3].is_some());
    assert!(got["no-image"].iter().all(Option::is_none));

    // `clip_embedding`: the ViT-L/14 embedding the heads read, one f16 token, for every row with
    // a decoded image; null for the others.
    let emb = clip_embeddings(&ds).await;
    assert_eq!(emb.len(), got.len());
    let l14 = OnnxModel::load(
        models("clip_l14_image.onnx").as_ref().unwrap(),
        Role::Image,
        None,
        &ModelOptions::default(),
    )
    .unwrap();
    let dim = l14.output_dim().unwrap();
    assert_eq!(dim, 768);
    let dir = manifest_dir().join("../data/images");
    let decoy = std::fs::read(dir.join("hopper.jpg")).unwrap();
    let mut checked = 0;
    for (key, e) in &emb {
        if got[key][1].is_none() {
            assert!(e.is_none(), "{key}: an embedding without scores");
            continue;
        }
        let (tokens, d, dtype, values) = e.as_ref().unwrap_or_else(|| panic!("{key}: none"));
        assert_eq!(
            (*tokens, *d as usize, dtype.as_str()),
            (1, dim, "f16"),
            "{key}"
        );
        assert_eq!(values.len(), dim, "{key}");
        let norm = values
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((norm - 1.0).abs() < 2e-3, "{key}: norm {norm}");
        let bytes = match key.split_once('-').and_then(|(_, r)| r.split_once('-')) {
            Some((_, name)) if key.starts_with("img-") => std::fs::read(dir.join(name)).unwrap(),
            _ => decoy.clone(),
        };
        let want = l14_embedding(&l14, &bytes);
        let diff = values
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-3, "{key}: differs from the encoder's by {diff}");
        checked += 1;
    }
    assert_eq!(checked, names.len() + 1 - undecodable.len());
    assert!(emb["no-image"].is_none() && emb["no-caption"].is_some());
    for n in &undecodable {
        let i = names.iter().position(|x| x == n).unwrap();
        assert!(emb[&format!("img-{i:02}-{n}")].is_none(), "{n}");
    }

    // Provenance names every model with its hash and preprocessing version.
    let b = &read_all(&ds, &[col::KEY, col::PROVENANCE]).await[0];
    let prov = b.column(1).as_list::<i32>().value(0);
    let prov = prov.as_struct();
    let models: Vec<String> = (0..prov.len())
        .map(|i| prov.column(1).as_string::<i32>().value(i).to_string())
        .collect();
    for m in [
        "clip_b32_image.onnx",
        "clip_b32_text.onnx",
        "clip_l14_image.onnx",
        "sac+logos+ava1-l14-linearMSE.pth",
        "nsfw_head.onnx",
        "watermark.onnx",
    ] {
        assert!(models.iter().any(|x| x == m), "{m} missing from {models:?}");
    }
    let shas = prov.column(2).as_string::<i32>();
    assert!((0..shas.len()).all(|i| shas.value(i).len() == 64));
    let versions = prov.column(3).as_string::<i32>();
    let emb_prov: Vec<(&str, &str)> = (0..prov.len())
        .filter(|&i| versions.value(i).starts_with("clip_embedding/"))
        .map(|i| {
            (
                prov.column(1).as_string::<i32>().value(i),
                versions.value(i),
            )
        })
        .collect();
    assert_eq!(
        emb_prov,
        [(
            "clip_l14_image.onnx",
            "clip_embedding/clip-bicubic-shortside-centercrop-v2;l2-normalised-f16-v1"
        )]
    );

    // Same models again: nothing to do. The scores are unchanged.
    let again = stage::score_catalog(&ds, sc, (0, 1), |_| {}).await.unwrap();
    assert_eq!(
        (again.map.shards_rewritten, again.map.shards_skipped),
        (0, 2)
    );
    assert_eq!(scores(&ds).await, got);
}

async fn verdicts(ds: &Dataset) -> BTreeMap<String, (String, Vec<String>)> {
    let mut m = BTreeMap::new();
    for b in read_all(ds, &[col::KEY, col::STATUS, col::REJECT_REASONS]).await {
        let k = b.column(0).as_string::<i32>().clone();
        for (i, s) in stage::row_states(&b).unwrap().into_iter().enumerate() {
            m.insert(k.value(i).to_string(), s);
        }
    }
    m
}

async fn dry_run(ds: &Dataset, t: &Thresholds) -> llamagen_filters::report::DryRunReport {
    let mut dr = DryRun::new(t, "x");
    for b in read_all(ds, VERDICT_COLUMNS).await {
        let v = stage::row_values(&b).unwrap();
        for ((s, r), v) in stage::row_states(&b).unwrap().iter().zip(&v) {
            dr.add(s, r, v);
        }
    }
    dr.finish()
}

#[tokio::test(flavor = "multi_thread")]
async fn thresholds_apply_change_and_reapply_without_rescoring() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_str().unwrap();
    let (ds, _) = make_catalog(root, "a photo of a cat sitting on a wooden table").await;
    stage::score_catalog(&ds, Arc::new(scorer()), (0, 1), |_| {})
        .await
        .unwrap();
    let before = scores(&ds).await;

    let strict = Thresholds::from_toml(
        "strict",
        "[aesthetic]\nmin = 5.5\n[pwatermark]\nmax = 0.6\nmax_inclusive = false\n[min_side]\nmin = 256\n",
    )
    .unwrap();
    let loose =
        Thresholds::from_toml("loose", "on_missing = \"keep\"\n[aesthetic]\nmin = 4.0\n").unwrap();

    // The dry run predicts exactly what applying does.
    let dr = dry_run(&ds, &strict).await;
    let (_, map, counters) = stage::apply_catalog(&ds, &strict, (0, 1), |_| {})
        .await
        .unwrap();
    assert_eq!(map.shards_rewritten, 2);
    let v1 = verdicts(&ds).await;
    let dropped = v1.values().filter(|(s, _)| s == "dropped").count() as u64;
    assert_eq!(dr.would_drop, dropped);
    assert!(dropped > 0 && dr.would_keep > 0, "{dr:?}");
    assert_eq!(counters.received as usize, v1.len());
    assert!(!dr.histograms.is_empty() && dr.to_html().contains("<svg"));
    // Every failed rule is listed, in the threshold's own terms.
    for (k, (s, reasons)) in &v1 {
        let sc = before[k];
        if let Some(a) = sc[1] {
            assert_eq!(
                a < 5.5,
                reasons.contains(&"aesthetic<5.5".to_string()),
                "{k}"
            );
        } else {
            assert!(
                reasons.contains(&"aesthetic:missing".to_string()),
                "{k}: {reasons:?}"
            );
        }
        if let Some(w) = sc[2] {
            assert_eq!(
                w >= 0.6,
                reasons.contains(&"pwatermark>=0.6".to_string()),
                "{k}"
            );
        }
        assert_eq!(s == "dropped", !reasons.is_empty(), "{k}");
    }
    assert!(
        v1.values()
            .any(|(_, r)| r.contains(&"min_side<256".to_string()))
    );

    // Same thresholds again: nothing to do.
    let (_, map, _) = stage::apply_catalog(&ds, &strict, (0, 1), |_| {})
        .await
        .unwrap();
    assert_eq!(map.shards_rewritten, 0);

    // Looser thresholds: recomputed from the stored scores.
    stage::apply_catalog(&ds, &loose, (0, 1), |_| {})
        .await
        .unwrap();
    let v2 = verdicts(&ds).await;
    for (k, (s, reasons)) in &v2 {
        let keep = before[k][1].is_none_or(|a| a >= 4.0);
        assert_eq!(s == "ok", keep, "{k}: {reasons:?}");
    }
    assert!(
        v2.values().filter(|(s, _)| s == "ok").count()
            > v1.values().filter(|(s, _)| s == "ok").count()
    );

    // Back to the strict ones: the same verdicts as the first time.
    let (_, map, _) = stage::apply_catalog(&ds, &strict, (0, 1), |_| {})
        .await
        .unwrap();
    assert_eq!(map.shards_rewritten, 2);
    assert_eq!(verdicts(&ds).await, v1);
    // Scores never changed.
    assert_eq!(scores(&ds).await, before);
}
