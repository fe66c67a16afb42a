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

/// key → unit-length clip_embedding
async fn embeddings(ds: &Dataset) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for e in ds.snapshot().await.unwrap().shards {
        for b in ds
            .read_shard(&e, Some(&[col::KEY, col::CLIP_EMBEDDING]))
            .await
            .unwrap()
        {
            let k = b.column_by_name(col::KEY).unwrap().as_string::<i32>();
            let s = b.column_by_name(col::CLIP_EMBEDDING).unwrap().as_struct();
            for i in 0..b.num_rows() {
                if let Some(v) = llamagen_dedup::group::embedding_values(s, i) {
                    out.insert(k.value(i).to_string(), v);
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_dedup_with_the_stand_in_encoder_finds_exact_and_resized_copies() {
    use llamagen_filters::model::ModelOptions;
    use llamagen_filters::scorer::{Scorer, ScorerConfig};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let ds = Catalog::open(root, &StorageOptions::default())
        .await
        .unwrap()
        .samples();
    let all = files();
    add_shard(&ds, &all, &BTreeMap::new()).await;
    // The filters' scoring stage stores the ViT-L/14 embedding (a random-weight stand-in with the
    // real signature).
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../filters/tests/models");
    let scorer = Scorer::load(ScorerConfig {
        clip_l14_image: Some(models.join("clip_l14_image.onnx")),
        model: ModelOptions {
            batch_size: 8,
            intra_threads: 1,
            ..Default::default()
        },
        ..ScorerConfig::new()
    })
    .unwrap();
    llamagen_filters::stage::score_catalog(&ds, Arc::new(scorer), (0, 1), |_| {})
        .await
        .unwrap();
    let emb = embeddings(&ds).await;
    assert_eq!(emb.len(), all.len());
    let cos = |a: &str, b: &str| llamagen_dedup::kmeans::dot(&emb[a], &emb[b]);
    let mut distinct = f32::NEG_INFINITY;
    for i in 0..16 {
        for j in i + 1..16 {
            distinct = distinct.max(cos(&format!("o{i:02}"), &format!("o{j:02}")));
        }
    }
    let mut copies: BTreeMap<&str, f32> = BTreeMap::new();
    for o in 0..8 {
        for kind in ["resized", "recompressed", "cropped", "watermarked"] {
            let c = cos(&format!("o{o:02}"), &format!("o{o:02}_{kind}"));
            let e = copies.entry(kind).or_insert(f32::INFINITY);
            *e = e.min(c);
        }
    }
    eprintln!("max cosine of distinct originals {distinct}; min cosine of copies {copies:?}");
    let cfg = DedupConfig {
        exact: false,
        hamming: None,
        cosine: Some(0.999),
        clusters: Some(3),
        ..DedupConfig::default()
    };
    let rep = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &cfg,
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(rep.centroids_trained);
    assert_eq!(rep.grouping.clusters, 3);
    let st = state(&ds).await;
    // Each exact and resized copy is in its original's group: one of the two is marked as a
    // duplicate of a row of the same source (which row a group keeps is the keep rule's choice:
    // here the stand-in aesthetic head's highest score).
    let copies = ["o01_exact", "o12_exact"]
        .map(String::from)
        .into_iter()
        .chain((0..8).map(|o| format!("o{o:02}_resized")));
    let keeper = |x: &str| st[x].1.clone().unwrap_or_else(|| x.to_string());
    for k in copies {
        let o = source(&k);
        assert_eq!(keeper(&k), keeper(o), "{k} and {o} are not in one group");
        assert_eq!(source(&keeper(o)), o);
        for x in [k.as_str(), o] {
            if st[x].1.is_some() {
                assert_eq!(st[x].2.as_deref(), Some("semantic"), "{x}");
            }
        }
    }
    // Distinct originals never end up in one group.
    let kept: BTreeMap<&str, &str> = st
        .iter()
        .filter_map(|(k, (_, of, _))| of.as_deref().map(|of| (k.as_str(), of)))
        .collect();
    for (k, of) in &kept {
        assert_eq!(source(k), source(of), "{k} linked to {of}");
    }
    // The centroids are stored: a second run reuses them and assigns nothing again.
    let rep2 = dedup_dataset(
        ds.storage().clone(),
        "samples",
        &cfg,
        &RunOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(!rep2.centroids_trained);
    assert_eq!(rep2.cluster.unwrap().map.shards_rewritten, 0);
}
