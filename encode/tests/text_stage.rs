//! The `captions` and `t5` stages on a catalog: joins, fallbacks, bad input per sample, stored
//! features and provenance, resumability.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device};
use llamagen_catalog::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use llamagen_catalog::storage::{MemoryStorage, Storage};
use llamagen_catalog::{Catalog, Dataset, ShardWriterOptions, Transaction};
use llamagen_encode::captions::{CaptionFileOptions, CaptionIndex, Fallback, JoinOn};
use llamagen_encode::sentence::first_sentence;
use llamagen_encode::text_encoder::{ModelPaths, StoreDtype, TextEncoder, TextEncoderConfig};
use llamagen_encode::text_stage::{run_captions, run_t5};

fn s(v: Vec<Option<&str>>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}

async fn samples(ds: &Dataset) -> Result<()> {
    let batch = RecordBatch::try_from_iter(vec![
        (
            "key",
            s(vec![
                Some("k1"),
                Some("k2"),
                Some("k3"),
                Some("k4"),
                Some("k5"),
                Some("k6"),
            ]),
        ),
        (
            "url",
            s(vec![
                Some("http://a/1.jpg"),
                Some("http://a/2.jpg"),
                Some("http://a/3.jpg"),
                Some("http://a/4.jpg"),
                Some("http://a/5.jpg"),
                Some("http://a/6.jpg"),
            ]),
        ),
        (
            "text",
            s(vec![
                Some("alt one"),
                Some("alt two"),
                Some("alt three"),
                None,
                Some("  "),
                Some("alt six"),
            ]),
        ),
        (
            "top_caption",
            s(vec![
                None,
                Some("A top caption. Second."),
                None,
                None,
                None,
                None,
            ]),
        ),
        (
            "status",
            s(vec![
                Some("ok"),
                Some("ok"),
                Some("ok"),
                Some("ok"),
                Some("ok"),
                Some("dropped"),
            ]),
        ),
    ])?;
    let mut w = ds.writer(ShardWriterOptions {
        stage: "ingest".into(),
        ..Default::default()
    });
    w.write(&batch).await?;
    let add = w.finish().await?;
    ds.commit(Transaction {
        operation: "ingest".into(),
        add,
        ..Default::default()
    })
    .await?;
    Ok(())
}

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5")
}

async fn read_all(ds: &Dataset) -> Result<RecordBatch> {
    let snap = ds.snapshot().await?;
    let mut batches = Vec::new();
    for e in &snap.shards {
        batches.extend(ds.read_shard(e, None).await?);
    }
    Ok(llamagen_catalog::arrow::compute::concat_batches(
        &batches[0].schema(),
        &batches,
    )?)
}

#[tokio::test]
async fn captions_then_t5_features() -> Result<()> {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage).samples();
    samples(&ds).await?;

    // LlamaGen-style caption file joined on the image path stem, with a bad line, a non-UTF-8
    // line and a blank caption.
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("long.jsonl");
    let mut body = Vec::new();
    body.extend_from_slice(
        br#"{"image_path": "00000/k1.jpg", "text": ["a bridge over a river", "A full shot of St. Louis, Missouri. The bridge is rusted.", "A full shot of St. Louis, Missouri."]}"#,
    );
    body.extend_from_slice(b"\n{not json\n");
    body.extend_from_slice(b"{\"image_path\": \"00000/k3.jpg\", \"text\": \"caf\xff\"}\n");
    // The LLaVA entry (index 1) is blank: skipped, though the BLIP one is not.
    body.extend_from_slice(br#"{"image_path": "00000/k4.jpg", "text": ["a dog", "   ", "x"]}"#);
    body.extend_from_slice(b"\n");
    body.extend_from_slice(
        br#"{"image_path": "00001/k5.png", "text": ["blip", "<b>&amp;</b> ###", "x"]}"#,
    );
    body.extend_from_slice(b"\n");
    std::fs::write(&f, body)?;
    let index = CaptionIndex::read(
        &[f.as_path()],
        &CaptionFileOptions {
            join: JoinOn::ImagePath,
            ..Default::default()
        },
    )?;
    assert_eq!(index.records, 5);
    assert_eq!(index.captions.len(), 2);
    assert_eq!(index.skipped.get("bad_json"), Some(&1));
    assert_eq!(index.skipped.get("not_utf8"), Some(&1));
    assert_eq!(index.skipped.get("blank_caption"), Some(&1));

    let r = run_captions(
        &ds,
        Arc::new(index),
        vec![Fallback::TopCaption, Fallback::Text],
        (0, 1),
        |_, _| {},
    )
    .await?;
    assert_eq!(r.map.shards_rewritten, 1);
    assert_eq!(r.counters.received, 5);
    assert_eq!(r.counters.extra.get("caption_source_long"), Some(&2));
    assert_eq!(r.counters.errors.get("no_caption"), Some(&1));

    let b = read_all(&ds).await?;
    let col = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
    let (long, short, src, status, kind) = (
        col("long_caption"),
        col("short_caption"),
        col("caption_source"),
        col("status"),
        col("error_kind"),
    );
    let keys = col("key");
    let row = |k: &str| (0..b.num_rows()).find(|&i| keys.value(i) == k).unwrap();
    let k1 = row("k1");
    assert_eq!(src.value(k1), "long");
    assert_eq!(short.value(k1), "A full shot of St. Louis, Missouri.");
    assert_eq!(short.value(k1), first_sentence(long.value(k1)));
    let k2 = row("k2");
    assert_eq!(
        (src.value(k2), short.value(k2)),
        ("top_caption", "A top caption.")
    );
    assert_eq!(src.value(row("k3")), "text");
    let k4 = row("k4");
    assert_eq!((status.value(k4), kind.value(k4)), ("failed", "no_caption"));
    assert_eq!(src.value(row("k5")), "long");
    let k6 = row("k6");
    assert_eq!(status.value(k6), "dropped");
    assert!(long.is_null(k6));

    // T5 stage with the tiny random encoder.
    let mut paths = ModelPaths::in_dir(&fixtures().join("gated"));
    paths.tokenizer = fixtures().join("tokenizer.json");
    let enc = TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig::default(),
    )?;
    let sha = enc.weights_sha256.clone();
    let dim = enc.dim();
    let expect_k1 = enc.encode(&[long.value(k1)])?.remove(0).unwrap();
    let r = run_t5(&ds, Arc::new(enc), StoreDtype::F16, (0, 1), |_, _| {}).await?;
    assert_eq!(r.counters.received, 4);
    assert_eq!(r.counters.written, 3);
    assert_eq!(r.counters.errors.get("empty_caption"), Some(&1));

    let b = read_all(&ds).await?;
    let key = b.column_by_name("key").unwrap().as_string::<i32>().clone();
    let row = |k: &str| (0..b.num_rows()).find(|&i| key.value(i) == k).unwrap();
    let status = b
        .column_by_name("status")
        .unwrap()
        .as_string::<i32>()
        .clone();
    let kind = b
        .column_by_name("error_kind")
        .unwrap()
        .as_string::<i32>()
        .clone();
    let t5l = b.column_by_name("t5_long").unwrap().as_struct().clone();
    let t5s = b.column_by_name("t5_short").unwrap().as_struct().clone();
    // k5's caption is only markup and punctuation: empty after cleaning.
    let k5 = row("k5");
    assert_eq!(
        (status.value(k5), kind.value(k5)),
        ("failed", "empty_caption")
    );
    assert!(t5l.is_null(k5));
    let k1 = row("k1");
    assert_eq!(status.value(k1), "ok");
    let tokens = t5l
        .column(0)
        .as_primitive::<llamagen_catalog::arrow::datatypes::Int32Type>();
    let dims = t5l
        .column(1)
        .as_primitive::<llamagen_catalog::arrow::datatypes::Int32Type>();
    assert_eq!(tokens.value(k1) as usize, expect_k1.tokens);
    assert_eq!(dims.value(k1) as usize, dim);
    assert_eq!(t5l.column(2).as_string::<i32>().value(k1), "f16");
    let data = t5l.column(3).as_binary::<i32>().value(k1);
    assert_eq!(data.len(), expect_k1.tokens * dim * 2);
    let back = StoreDtype::F16.decode(data);
    for (a, b) in back.iter().zip(&expect_k1.data) {
        assert!((a - b).abs() <= 1e-2 * b.abs().max(1.0), "{a} vs {b}");
    }
    assert!(!t5s.is_null(k1));
    let short_tokens = t5s
        .column(0)
        .as_primitive::<llamagen_catalog::arrow::datatypes::Int32Type>()
        .value(k1);
    assert!(short_tokens < tokens.value(k1));
    assert!(t5l.is_null(row("k4")) && t5l.is_null(row("k6")));
    // Provenance: captions, then t5 with the weight hash.
    let prov = b
        .column_by_name("provenance")
        .unwrap()
        .as_list::<i32>()
        .value(k1);
    let prov = prov.as_struct();
    let stages: Vec<&str> = (0..prov.len())
        .map(|i| prov.column(0).as_string::<i32>().value(i))
        .collect();
    assert_eq!(stages, vec!["captions", "t5"]);
    assert_eq!(prov.column(1).as_string::<i32>().value(1), "gated");
    assert_eq!(prov.column(2).as_string::<i32>().value(1), sha);

    // Resumable: a second run has nothing to do.
    let enc = TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig::default(),
    )?;
    let r = run_t5(&ds, Arc::new(enc), StoreDtype::F16, (0, 1), |_, _| {}).await?;
    assert_eq!((r.map.shards_rewritten, r.map.shards_skipped), (0, 1));
    Ok(())
}
