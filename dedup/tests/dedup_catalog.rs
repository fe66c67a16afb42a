//! Dataset-wide dedup on a catalog built from the planted test set (`fixtures/dupset`, made by
//! `make_dupset.py` beside this file from the bundled photos): 16 distinct originals; for eight of
//! them a copy resized to 60 %, one recompressed at JPEG quality 25, one cropped by 5 % and one
//! watermarked with text; two byte-for-byte copies. `expected.json` holds imagehash 4.3.2's
//! pHash of every file and the distances the script measured.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Float32Array, Int32Builder, ListBuilder, RecordBatch,
    StringArray, StringBuilder, StructBuilder,
};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use llamagen_catalog::schema::{col, image_fields};
use llamagen_catalog::{Catalog, Dataset, ShardWriterOptions, StorageOptions, Transaction};
use llamagen_dedup::{DedupConfig, RunOptions, dedup_dataset};
use sha2::{Digest, Sha256};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dupset")
}

/// (key, bytes): every original and copy; the key is the file stem (`o03`, `o03_cropped`).
fn files() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["originals", "copies"] {
        let mut names: Vec<_> = std::fs::read_dir(fixture().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let stem = p.file_stem().unwrap().to_string_lossy().to_string();
            out.push((stem, std::fs::read(&p).unwrap()));
        }
    }
    out
}

/// The original a file derives from (`o03_cropped` → `o03`).
fn source(key: &str) -> &str {
    key.split('_').next().unwrap()
}

fn batch_of(rows: &[(String, Vec<u8>)], aesthetic: &BTreeMap<String, f32>) -> RecordBatch {
    let mut images = ListBuilder::new(StructBuilder::from_fields(image_fields(), 0)).with_field(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
    );
    let mut sha = StringBuilder::new();
    let mut ow = Int32Builder::new();
    let mut oh = Int32Builder::new();
    for (_, bytes) in rows {
        let (w, h) = image::load_from_memory(bytes)
            .map(|i| (i.width() as i32, i.height() as i32))
            .unwrap();
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
            .append_value(bytes);
        s.append(true);
        images.append(true);
        sha.append_value(hex::encode(Sha256::digest(bytes)));
        ow.append_value(w);
        oh.append_value(h);
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            col::KEY,
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
        ),
        (
            col::STATUS,
            Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "ok"))),
        ),
        (col::CONTENT_SHA256, Arc::new(sha.finish())),
        (col::ORIG_WIDTH, Arc::new(ow.finish())),
        (col::ORIG_HEIGHT, Arc::new(oh.finish())),
        (
            col::SCORE_AESTHETIC,
            Arc::new(Float32Array::from_iter(
                rows.iter().map(|r| aesthetic.get(&r.0).copied()),
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

async fn add_shard(ds: &Dataset, rows: &[(String, Vec<u8>)], aesthetic: &BTreeMap<String, f32>) {
    let mut w = ds.writer(ShardWriterOptions {
        stage: "ingest".into(),
        ..Default::default()
    });
    w.write(&batch_of(rows, aesthetic)).await.unwrap();
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

/// key → (phash, duplicate_of, dup_kind)
async fn state(ds: &Dataset) -> BTreeMap<String, (Option<u64>, Option<String>, Option<String>)> {
    let mut out = BTreeMap::new();
    for e in ds.snapshot().await.unwrap().shards {
        for b in ds
            .read_shard(
                &e,
                Some(&[col::KEY, col::PHASH, col::DUPLICATE_OF, col::DUP_KIND]),
            )
            .await
            .unwrap()
        {
            let k = b.column_by_name(col::KEY).unwrap().as_string::<i32>();
            let p = b
                .column_by_name(col::PHASH)
                .unwrap()
                .as_primitive::<Int64Type>();
            let of = b
                .column_by_name(col::DUPLICATE_OF)
                .unwrap()
                .as_string::<i32>();
            let kind = b.column_by_name(col::DUP_KIND).unwrap().as_string::<i32>();
            for i in 0..b.num_rows() {
                out.insert(
                    k.value(i).to_string(),
                    (
                        p.is_valid(i).then(|| p.value(i) as u64),
                        of.is_valid(i).then(|| of.value(i).to_string()),
                        kind.is_valid(i).then(|| kind.value(i).to_string()),
                    ),
                );
            }
        }
    }
    out
}

fn perceptual(hamming: u32, blocks: Option<u32>) -> DedupConfig {
    DedupConfig {
        hamming: Some(hamming),
        blocks,
        cosine: None,
        ..DedupConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_copies_are_found_and_distinct_photos_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let ds = Catalog::open(root, &StorageOptions::default())
        .await
        .unwrap()
        .samples();
    let all = files();
    // The watermarked copy of o02 scores highest in its group: the keep rule keeps it.
    let aesthetic = BTreeMap::from([("o02_watermarked".to_string(), 9.0f32)]);
    // Everything but o05's copies now; those arrive later, as a new shard.
    let (later, now): (Vec<_>, Vec<_>) = all
        .iter()
        .cloned()
        .partition(|(k, _)| k.starts_with("o05_"));
    let mid = now.len() / 2;
    add_shard(&ds, &now[..mid], &aesthetic).await;
    add_shard(&ds, &now[mid..], &aesthetic).await;

    // Crops move pHash by up to 12 bits here, distinct photos are 20 or more apart: threshold 12
    // (14 blocks, so the LSH search stays exact for it).
    let cfg = perceptual(12, Some(14));
    let rep = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &cfg,
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(rep.hash.map.shards_rewritten, 2);
    let st = state(&ds).await;

    // pHash: imagehash's bits on every file (Pillow and the image crate decode these JPEGs alike).
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).unwrap()).unwrap();
    let mut mismatched = Vec::new();
    for (path, h) in expected["phash"].as_object().unwrap() {
        let key = path.rsplit('/').next().unwrap().split('.').next().unwrap();
        if let Some((Some(ours), _, _)) = st.get(key) {
            if *ours != h["int"].as_u64().unwrap() {
                mismatched.push(key.to_string());
            }
        }
    }
    assert!(
        mismatched.is_empty(),
        "pHash differs from imagehash: {mismatched:?}"
    );

    // Every copy (and only copies) is a duplicate of a row of its own source; o02's group keeps
    // the watermarked copy.
    for (key, (_, of, kind)) in &st {
        let copy = key.contains('_');
        let keeper_o02 = key == "o02_watermarked";
        if (copy && !keeper_o02) || key == "o02" {
            let of = of.as_deref().unwrap_or_else(|| panic!("{key} not marked"));
            assert_eq!(source(of), source(key), "{key} marked as a copy of {of}");
            let want_of = if source(key) == "o02" {
                "o02_watermarked"
            } else {
                source(key)
            };
            assert_eq!(of, want_of, "{key}");
            let kind = kind.as_deref().unwrap();
            if key.ends_with("_exact") {
                assert_eq!(kind, "exact", "{key}");
            } else {
                assert_eq!(kind, "perceptual", "{key}");
            }
        } else {
            assert!(
                of.is_none() && kind.is_none(),
                "{key} wrongly marked: {of:?}"
            );
        }
    }
    let g = &rep.grouping;
    assert_eq!(g.groups, 8, "{g:?}");
    assert_eq!(g.duplicates["exact"], 2);

    // A new shard (o05's copies): only it is hashed; its copies join o05's group.
    let rep2 = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &cfg,
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(rep2.hash.map.shards_rewritten, 0, "nothing new yet");
    assert_eq!(
        rep2.apply.as_ref().unwrap().map.shards_rewritten,
        0,
        "same verdicts"
    );
    add_shard(&ds, &later, &aesthetic).await;
    let rep3 = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &cfg,
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(
        rep3.hash.map.shards_rewritten, 1,
        "only the new shard is hashed"
    );
    let st = state(&ds).await;
    for k in later.iter().map(|(k, _)| k) {
        assert_eq!(st[k].1.as_deref(), Some("o05"), "{k}");
    }

    // Retuned to the default threshold without rehashing: the crops and the heavier watermarks
    // are no longer linked; resized and recompressed copies still are.
    let dry = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &DedupConfig {
            cosine: None,
            ..DedupConfig::default()
        },
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(dry.apply.is_none());
    assert_eq!(dry.hash.map.shards_rewritten, 0);
    let before = state(&ds).await;
    assert!(
        before["o03_cropped"].1.is_some(),
        "a dry run writes nothing"
    );
    let rep4 = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &DedupConfig {
            cosine: None,
            ..DedupConfig::default()
        },
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(rep4.grouping.duplicates, dry.grouping.duplicates);
    let st = state(&ds).await;
    for o in 0..8 {
        for kind in ["resized", "recompressed"] {
            let k = format!("o{o:02}_{kind}");
            assert!(
                st[&k].1.is_some(),
                "{k} not linked at the default threshold"
            );
        }
    }
    // Distances from the fixture's own measurement: crops above 4 bits are cleared.
    let planted = &expected["planted"];
    let mut cleared = 0;
    for v in planted.as_array().unwrap() {
        let path = v["copy"].as_str().unwrap();
        let key = path.rsplit('/').next().unwrap().split('.').next().unwrap();
        let d = v["distance"].as_u64().unwrap();
        if d > 4 && key != "o02_watermarked" {
            // linked only if it is within 4 bits of another row of its source
            let linked = st[key].1.is_some();
            let near_any = st
                .iter()
                .filter(|(k2, _)| source(k2) == source(key) && *k2 != key)
                .any(|(_, (h, _, _))| (h.unwrap() ^ st[key].0.unwrap()).count_ones() <= 4);
            assert_eq!(linked, near_any, "{key} at {d} bits");
            cleared += usize::from(!linked);
        }
    }
    assert!(cleared > 0, "some crops are beyond 4 bits");
}
