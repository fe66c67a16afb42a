//! The commit protocol, shard checks and SQL registration, on the memory and local backends.

use std::sync::Arc;
use std::time::Duration;

use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float32Array, Int32Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use llamagen_catalog::arrow::buffer::OffsetBuffer;
use llamagen_catalog::arrow::datatypes::{DataType, Field, Int64Type};
use llamagen_catalog::schema::image_fields;
use llamagen_catalog::storage::{LocalStorage, MemoryStorage, Storage};
use llamagen_catalog::{Catalog, CatalogError, Dataset, ShardWriterOptions, Transaction, sql};

fn rows(prefix: &str, n: usize) -> RecordBatch {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    let status: Vec<&str> = (0..n)
        .map(|i| ["ok", "failed", "dropped", "pending"][i % 4])
        .collect();
    let score: Vec<Option<f32>> = (0..n)
        .map(|i| (i % 4 == 0).then_some(i as f32 / n as f32))
        .collect();
    RecordBatch::try_from_iter(vec![
        ("key", Arc::new(StringArray::from(keys)) as ArrayRef),
        ("status", Arc::new(StringArray::from(status)) as ArrayRef),
        (
            "score_aesthetic",
            Arc::new(Float32Array::from(score)) as ArrayRef,
        ),
    ])
    .unwrap()
}

async fn write_and_commit(
    ds: &Dataset,
    prefix: &str,
    n: usize,
    unit: Option<&str>,
) -> Result<u64, CatalogError> {
    let mut w = ds.writer(ShardWriterOptions {
        stage: "test".into(),
        ..Default::default()
    });
    w.write(&rows(prefix, n)).await?;
    let add = w.finish().await?;
    let m = ds
        .commit(Transaction {
            operation: "test".into(),
            add,
            units: unit.map(|u| vec![u.to_string()]).unwrap_or_default(),
            ..Default::default()
        })
        .await?;
    Ok(m.version)
}

async fn count(storage: Arc<dyn Storage>, q: &str) -> i64 {
    let ctx = sql::session(storage).await.unwrap();
    let (_, b) = sql::query(&ctx, q).await.unwrap();
    b[0].column(0)
        .as_primitive::<llamagen_catalog::arrow::datatypes::Int64Type>()
        .value(0)
}

#[tokio::test]
async fn commit_read_back_and_sql() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let cat = Catalog::from_storage(storage.clone());
    let ds = cat.samples();
    assert_eq!(ds.latest_version().await.unwrap(), 0);
    // An empty catalog still answers queries.
    assert_eq!(
        count(storage.clone(), "SELECT count(*) FROM samples").await,
        0
    );
    assert_eq!(write_and_commit(&ds, "a", 1000, None).await.unwrap(), 1);
    assert_eq!(write_and_commit(&ds, "b", 500, None).await.unwrap(), 2);
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.rows(), 1500);
    assert_eq!(snap.shards.len(), 2);
    let back = ds.read_shard(&snap.shards[0], None).await.unwrap();
    let got: usize = back.iter().map(|b| b.num_rows()).sum();
    assert_eq!(got, 1000);
    assert_eq!(back[0].schema(), llamagen_catalog::sample_schema());
    let keys = back[0].column_by_name("key").unwrap().as_string::<i32>();
    assert_eq!(keys.value(0), "a-00000");
    assert_eq!(
        count(
            storage.clone(),
            "SELECT count(*) FROM samples WHERE status = 'ok'"
        )
        .await,
        375
    );
    assert_eq!(
        count(storage.clone(), "SELECT count(DISTINCT key) FROM samples").await,
        1500
    );
    assert_eq!(
        count(
            storage.clone(),
            "SELECT CAST(sum(rows) AS BIGINT) FROM shards"
        )
        .await,
        1500
    );
}

#[tokio::test]
async fn shards_roll_over_at_max_rows_and_bytes() {
    let ds = Catalog::from_storage(Arc::new(MemoryStorage::unique())).samples();
    let mut w = ds.writer(ShardWriterOptions {
        stage: "test".into(),
        max_rows: 300,
        ..Default::default()
    });
    w.write(&rows("r", 1000)).await.unwrap();
    let shards = w.finish().await.unwrap();
    let sizes: Vec<u64> = shards.iter().map(|s| s.rows).collect();
    assert_eq!(sizes, vec![300, 300, 300, 100]);
    // Byte-bounded: tiny target forces one row group per shard.
    let mut w = ds.writer(ShardWriterOptions {
        stage: "test".into(),
        target_bytes: 1,
        ..Default::default()
    });
    w.write(&rows("s", 10)).await.unwrap();
    w.write(&rows("t", 10)).await.unwrap();
    assert_eq!(w.finish().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let ds = Catalog::from_storage(storage.clone()).samples();
    let mut tasks = Vec::new();
    for t in 0..6 {
        // Each writer has its own handle (as separate workers do), so all six race to create the
        // table and then to take each next version.
        let ds = if t % 2 == 0 {
            Catalog::from_storage(storage.clone()).samples()
        } else {
            ds.clone()
        };
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                write_and_commit(&ds, &format!("w{t}-{i}"), 50, None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.version, 24);
    assert_eq!(snap.shards.len(), 24);
    // Version 0 created the table; each commit wrote one version after it.
    assert_eq!(ds.versions().await.unwrap(), (0..=24).collect::<Vec<u64>>());
    assert_eq!(
        count(storage.clone(), "SELECT count(DISTINCT key) FROM samples").await,
        1200
    );
    assert_eq!(count(storage, "SELECT count(*) FROM samples").await, 1200);
}

#[tokio::test]
async fn work_units_commit_exactly_once() {
    let storage = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 10, Some("unit-a"))
        .await
        .unwrap();
    let err = write_and_commit(&ds, "a", 10, Some("unit-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::UnitAlreadyCommitted { ref unit, .. } if unit == "unit-a"),
        "{err}"
    );
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.rows(), 10);
    assert!(snap.units.contains("unit-a"));
    // The refused commit's shard was discarded, not left behind.
    let files = storage.list("samples/data/").await.unwrap();
    assert_eq!(files.len(), 1);
}

#[tokio::test]
async fn replace_and_shard_gone() {
    let ds = Catalog::from_storage(Arc::new(MemoryStorage::unique())).samples();
    write_and_commit(&ds, "a", 10, None).await.unwrap();
    let old = ds.snapshot().await.unwrap().shards[0].path.clone();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows("a2", 10)).await.unwrap();
    let add = w.finish().await.unwrap();
    let m = ds
        .commit(Transaction {
            operation: "rewrite".into(),
            add: add.clone(),
            remove: vec![old.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(m.version, 2);
    assert_eq!(ds.snapshot().await.unwrap().shards, add);
    let err = ds
        .commit(Transaction {
            operation: "rewrite".into(),
            remove: vec![old.clone()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::ShardGone { ref path, .. } if *path == old),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_and_unknown_version_log_entries_are_named() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 10, None).await.unwrap();
    // A log entry cut off mid-line, seen by a handle that already read version 1 and by a new one.
    storage
        .put(
            "samples/_delta_log/00000000000000000002.json",
            "{\"add\": {\"path\": \"data/x.parquet\", ".into(),
        )
        .await
        .unwrap();
    let e = ds.snapshot().await.unwrap_err().to_string();
    assert!(
        e.contains("malformed transaction log entry") && e.contains("00000000000000000002.json"),
        "{e}"
    );
    let fresh = Catalog::from_storage(storage.clone()).samples();
    let e = fresh.snapshot().await.unwrap_err().to_string();
    assert!(e.contains("samples"), "{e}");
    // A metadata change to a sample schema version this build does not know.
    let v0 = storage
        .get("samples/_delta_log/00000000000000000000.json")
        .await
        .unwrap();
    let meta = String::from_utf8(v0.to_vec())
        .unwrap()
        .lines()
        .find(|l| l.contains("\"metaData\""))
        .unwrap()
        .replace(
            "\"llamagen.schemaVersion\":\"3\"",
            "\"llamagen.schemaVersion\":\"99\"",
        );
    assert!(meta.contains("\"99\""), "{meta}");
    storage
        .put("samples/_delta_log/00000000000000000002.json", meta.into())
        .await
        .unwrap();
    let e = ds.snapshot().await.unwrap_err().to_string();
    assert!(
        e.contains("schema version 99") && e.contains("00000000000000000002.json"),
        "{e}"
    );
    let e = fresh.snapshot().await.unwrap_err().to_string();
    assert!(e.contains("schema version 99"), "{e}");
}

#[tokio::test]
async fn corrupt_and_truncated_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalStorage::new(dir.path()).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(local.clone());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 100, None).await.unwrap();
    let entry = ds.snapshot().await.unwrap().shards[0].clone();
    let file = local.path_of(&ds.shard_path(&entry));
    let good = std::fs::read(&file).unwrap();

    // A query reading a damaged shard fails naming it (opening a session reads no shard).
    async fn query_error(storage: Arc<dyn Storage>) -> String {
        let ctx = sql::session(storage).await.unwrap();
        sql::query(&ctx, "SELECT status, count(*) FROM samples GROUP BY status")
            .await
            .err()
            .expect("the query must fail")
            .to_string()
    }
    // Truncated: size differs from the table log.
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    let e = query_error(storage.clone()).await;
    assert!(e.contains(&entry.path), "{e}");
    let e = ds.read_shard(&entry, None).await.unwrap_err().to_string();
    assert!(e.contains(&entry.path), "{e}");

    // Same size, corrupt footer.
    let mut bad = good.clone();
    let n = bad.len();
    for b in &mut bad[n - 200..n - 8] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bad).unwrap();
    let e = query_error(storage.clone()).await;
    assert!(e.contains(&entry.path), "{e}");
    let problems = ds.verify().await.unwrap();
    assert_eq!(problems.len(), 1);

    // Same size, corrupt data page: the footer still parses, the hash check catches it.
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    std::fs::write(&file, &bad).unwrap();
    let problems = ds.verify().await.unwrap();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].problem.contains("SHA-256"),
        "{}",
        problems[0].problem
    );

    std::fs::write(&file, &good).unwrap();
    assert!(ds.verify().await.unwrap().is_empty());
}

#[tokio::test]
async fn sql_errors_come_from_datafusion() {
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ctx = sql::session(storage).await.unwrap();
    let e = sql::query(&ctx, "SELECT nope FROM samples")
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::DataFusion(_)), "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    let e = sql::query(&ctx, "SELEC 1").await.unwrap_err();
    assert!(e.to_string().contains("SELEC"), "{e}");
}

#[tokio::test]
async fn gc_removes_only_unreferenced_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 10, None).await.unwrap();
    // An uncommitted shard (a crashed writer's).
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows("orphan", 10)).await.unwrap();
    let orphan = w.finish().await.unwrap();
    // Within the grace period nothing goes.
    let r = ds.gc(Duration::from_secs(3600), false).await.unwrap();
    assert!(r.orphan_shards.is_empty());
    let r = ds.gc(Duration::ZERO, true).await.unwrap();
    assert_eq!(r.orphan_shards, vec![ds.shard_path(&orphan[0])]);
    assert!(
        storage.get(&ds.shard_path(&orphan[0])).await.is_ok(),
        "dry run deleted"
    );
    // Files that are not the shard writer's are never touched, and neither is the log.
    storage
        .put("samples/data/thesis.docx", "mine".into())
        .await
        .unwrap();
    storage
        .put("samples/data/part-notauuid.parquet", "mine".into())
        .await
        .unwrap();
    ds.gc(Duration::ZERO, false).await.unwrap();
    assert!(storage.get(&ds.shard_path(&orphan[0])).await.is_err());
    assert!(storage.get("samples/data/thesis.docx").await.is_ok());
    assert!(
        storage
            .get("samples/data/part-notauuid.parquet")
            .await
            .is_ok()
    );
    // A folder that is not a table: gc refuses and deletes nothing.
    storage
        .put("other/data/precious.txt", "mine".into())
        .await
        .unwrap();
    let e = Catalog::from_storage(storage.clone())
        .dataset("other")
        .gc(Duration::ZERO, false)
        .await
        .unwrap_err();
    assert!(matches!(e, CatalogError::NoSuchDataset { .. }), "{e}");
    assert!(storage.get("other/data/precious.txt").await.is_ok());
    assert_eq!(count(storage, "SELECT count(*) FROM samples").await, 10);
}

/// Wide columns (here 64 KiB images) are not read by a query that does not project them.
#[tokio::test]
async fn wide_columns_are_not_read_unless_projected() {
    use llamagen_catalog::datafusion::physical_plan::{ExecutionPlan, collect};
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    let n = 100;
    let mut seed = 7u64;
    let blobs: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            (0..65536)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 56) as u8
                })
                .collect()
        })
        .collect();
    let images = StructArray::new(
        image_fields(),
        vec![
            Arc::new(Int32Array::from(vec![256; n])) as ArrayRef,
            Arc::new(Int32Array::from(vec![256; n])),
            Arc::new(Int32Array::from(vec![256; n])),
            Arc::new(StringArray::from(vec!["jpeg"; n])),
            Arc::new(BinaryArray::from_iter_values(blobs.iter())),
        ],
        None,
    );
    let list = ListArray::new(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
        OffsetBuffer::from_lengths(vec![1; n]),
        Arc::new(images),
        None,
    );
    let mut b = rows("w", n);
    let mut cols = b.columns().to_vec();
    let mut fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("images", list.data_type().clone(), true));
    cols.push(Arc::new(list));
    b = RecordBatch::try_new(
        Arc::new(llamagen_catalog::arrow::datatypes::Schema::new(fields)),
        cols,
    )
    .unwrap();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&b).await.unwrap();
    let add = w.finish().await.unwrap();
    // The images are in the shard's column file of group "images", not in its base file.
    let base_bytes = add[0].bytes;
    assert!(base_bytes < 64 * 1024, "{base_bytes}");
    let column_bytes = add[0].columns["images"].bytes;
    assert!(column_bytes > 6_000_000, "{column_bytes}");
    ds.commit(Transaction {
        operation: "t".into(),
        add,
        ..Default::default()
    })
    .await
    .unwrap();

    async fn scanned(storage: Arc<dyn Storage>, q: &str) -> usize {
        let ctx = sql::session(storage).await.unwrap();
        let plan = ctx
            .sql(q)
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        collect(plan.clone(), ctx.task_ctx()).await.unwrap();
        fn walk(p: &Arc<dyn ExecutionPlan>) -> usize {
            let own = p
                .metrics()
                .and_then(|m| m.sum_by_name("bytes_scanned"))
                .map(|v| v.as_usize())
                .unwrap_or(0);
            own + p.children().iter().map(|c| walk(c)).sum::<usize>()
        }
        walk(&plan)
    }
    let narrow = scanned(
        storage.clone(),
        "SELECT status, count(*) FROM samples GROUP BY status",
    )
    .await;
    assert!(
        narrow > 0 && narrow < 64 * 1024,
        "narrow query scanned {narrow} bytes"
    );
    // A query that projects a wide column reads it from the column file.
    let ctx = sql::session(storage).await.unwrap();
    let (_, out) = sql::query(
        &ctx,
        "SELECT max(images[1]['data']) AS m, count(images) AS n FROM samples",
    )
    .await
    .unwrap();
    let m = out[0].column(0);
    let m = llamagen_catalog::arrow::compute::cast(m, &DataType::Binary).unwrap();
    assert_eq!(
        m.as_binary::<i32>().value(0),
        blobs.iter().max().unwrap().as_slice()
    );
    let count = llamagen_catalog::arrow::compute::cast(out[0].column(1), &DataType::Int64).unwrap();
    assert_eq!(count.as_primitive::<Int64Type>().value(0), n as i64);
}

#[tokio::test]
async fn map_shards_rewrites_each_shard_once() {
    use llamagen_catalog::stage::map_shards;
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 100, None).await.unwrap();
    write_and_commit(&ds, "b", 50, None).await.unwrap();
    let score = |b: RecordBatch| async move {
        let n = b.num_rows();
        Ok(RecordBatch::try_from_iter(vec![
            ("key", b.column_by_name("key").unwrap().clone()),
            (
                "score_watermark",
                Arc::new(Float32Array::from(vec![0.25f32; n])) as ArrayRef,
            ),
        ])
        .unwrap())
    };
    let r = map_shards(
        &ds,
        "watermark",
        (0, 1),
        ShardWriterOptions::default(),
        score,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((r.shards_rewritten, r.rows), (2, 150));
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.rows(), 150);
    for s in &snap.shards {
        assert_eq!(s.applied, vec!["test".to_string(), "watermark".to_string()]);
    }
    assert_eq!(
        count(
            storage.clone(),
            "SELECT count(*) FROM samples WHERE score_watermark = 0.25"
        )
        .await,
        150
    );
    // Earlier columns survive the rewrite.
    assert_eq!(
        count(
            storage.clone(),
            "SELECT count(score_aesthetic) FROM samples"
        )
        .await,
        25 + 13
    );
    // A second run has nothing to do.
    let r = map_shards(
        &ds,
        "watermark",
        (0, 1),
        ShardWriterOptions::default(),
        score,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((r.shards_rewritten, r.shards_skipped), (0, 2));
    // Keys must not change.
    let bad = |b: RecordBatch| async move {
        let n = b.num_rows();
        Ok(RecordBatch::try_from_iter(vec![(
            "key",
            Arc::new(StringArray::from(vec!["x"; n])) as ArrayRef,
        )])
        .unwrap())
    };
    let e = map_shards(
        &ds,
        "bad",
        (0, 1),
        ShardWriterOptions::default(),
        bad,
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("keys"), "{e}");
}

#[tokio::test]
async fn stage_passes_commit_in_groups() {
    use llamagen_catalog::stage::map_shards;
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    for i in 0..7 {
        write_and_commit(&ds, &format!("s{i}"), 5, Some(&format!("unit-{i}")))
            .await
            .unwrap();
    }
    let before = ds.latest_version().await.unwrap();
    let label = |b: RecordBatch| async move {
        let n = b.num_rows();
        Ok(RecordBatch::try_from_iter(vec![
            ("key", b.column_by_name("key").unwrap().clone()),
            ("label", Arc::new(Int32Array::from(vec![3; n])) as ArrayRef),
        ])
        .unwrap())
    };
    let mut seen = 0;
    let r = map_shards(
        &ds,
        "label",
        (0, 1),
        ShardWriterOptions {
            commit_shards: 3,
            ..Default::default()
        },
        label,
        |_, _| seen += 1,
    )
    .await
    .unwrap();
    assert_eq!((r.shards_rewritten, r.rows, seen), (7, 35, 7));
    // 7 shards in groups of 3: three commits, each replacing its shards in one version.
    let after = ds.latest_version().await.unwrap();
    assert_eq!(after - before, 3);
    let h = ds.history().await.unwrap();
    let last: Vec<(u64, u64)> = h[h.len() - 3..]
        .iter()
        .map(|e| (e.shards_added, e.shards_removed))
        .collect();
    assert_eq!(last, vec![(3, 3), (3, 3), (1, 1)]);
    assert_eq!(h.last().unwrap().stage.as_deref(), Some("label"));
    // Work units travel with the rewritten shards, so they stay done.
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.units.len(), 7);
    let err = write_and_commit(&ds, "again", 5, Some("unit-4"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::UnitAlreadyCommitted { .. }),
        "{err}"
    );
    // A fresh handle (cold load from the log) sees the same table.
    let fresh = Catalog::from_storage(storage.clone()).samples();
    assert_eq!(fresh.snapshot().await.unwrap(), snap);
    assert_eq!(
        count(storage, "SELECT count(*) FROM samples WHERE label = 3").await,
        35
    );
}

#[tokio::test]
async fn a_rewrite_group_survives_a_concurrent_rewrite_of_one_shard() {
    use llamagen_catalog::stage::map_shards;
    let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::unique());
    let ds = Catalog::from_storage(storage.clone()).samples();
    for i in 0..4 {
        write_and_commit(&ds, &format!("s{i}"), 5, None)
            .await
            .unwrap();
    }
    // Another worker (its own handle) rewrites the second shard while this one works.
    let other = Catalog::from_storage(storage.clone()).samples();
    let victim = other.snapshot().await.unwrap().shards[1].path.clone();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let f = |b: RecordBatch| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let other = other.clone();
        let victim = victim.clone();
        async move {
            if n == 2 {
                let mut w = other.writer(ShardWriterOptions::default());
                w.write(&rows("s1", 5)).await.unwrap();
                let add = w.finish().await.unwrap();
                other
                    .commit(Transaction {
                        operation: "other".into(),
                        add,
                        remove: vec![victim],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            let n = b.num_rows();
            Ok(RecordBatch::try_from_iter(vec![
                ("key", b.column_by_name("key").unwrap().clone()),
                ("label", Arc::new(Int32Array::from(vec![1; n])) as ArrayRef),
            ])
            .unwrap())
        }
    };
    let r = map_shards(
        &ds,
        "label",
        (0, 1),
        ShardWriterOptions::default(),
        f,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((r.shards_rewritten, r.shards_lost_race), (3, 1));
    assert_eq!(
        count(storage.clone(), "SELECT count(*) FROM samples").await,
        20
    );
    assert_eq!(
        count(
            storage.clone(),
            "SELECT count(*) FROM samples WHERE label = 1"
        )
        .await,
        15
    );
    // The lost rewrite's output was deleted: on storage are the 4 first shards (replaced, kept for
    // time travel until gc), this pass's 3 rewrites and the other worker's 1; not a 9th.
    let files = storage.list("samples/data/").await.unwrap();
    assert_eq!(files.len(), 8);
}

/// Past 100 versions a checkpoint is written; a cold read starts from it and sees the same table
/// (shard tags, work units) as the writer that advanced commit by commit.
#[tokio::test]
async fn checkpoints_keep_cold_reads_exact() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let ds = Catalog::from_storage(storage.clone()).samples();
    for i in 0..104 {
        write_and_commit(&ds, &format!("c{i}"), 2, Some(&format!("u{i}")))
            .await
            .unwrap();
    }
    // Replace one shard, so the checkpoint's state differs from the sum of the adds.
    let first = ds.snapshot().await.unwrap().shards[0].clone();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows("c0", 2)).await.unwrap();
    let mut add = w.finish().await.unwrap();
    add[0].units = first.units.clone();
    ds.commit(Transaction {
        operation: "rewrite".into(),
        add,
        remove: vec![first.path.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let warm = ds.snapshot().await.unwrap();
    assert_eq!(warm.version, 105);
    assert!(
        storage
            .get("samples/_delta_log/00000000000000000100.checkpoint.parquet")
            .await
            .is_ok(),
        "no checkpoint at version 100"
    );
    let cold = Catalog::from_storage(storage.clone()).samples();
    let snap = cold.snapshot().await.unwrap();
    assert_eq!(snap, warm);
    assert_eq!(snap.units.len(), 104);
    assert!(snap.shards.iter().all(|s| s.sha256.len() == 64));
    // Exactly-once still holds for a unit committed before the checkpoint.
    let err = write_and_commit(&cold, "again", 2, Some("u7"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::UnitAlreadyCommitted { .. }),
        "{err}"
    );
    // Time travel to before the replacement.
    let before = cold.snapshot_at(104).await.unwrap();
    assert!(before.shards.iter().any(|s| s.path == first.path));
    assert_eq!(before.shards.len(), 104);
    assert_eq!(count(storage, "SELECT count(*) FROM samples").await, 208);
}

/// A `t5_long` column of `n` feature matrices, every byte `fill`.
fn t5_column(n: usize, fill: u8) -> ArrayRef {
    Arc::new(StructArray::new(
        llamagen_catalog::schema::embedding_fields(),
        vec![
            Arc::new(Int32Array::from(vec![2; n])) as ArrayRef,
            Arc::new(Int32Array::from(vec![4; n])),
            Arc::new(StringArray::from(vec!["f16"; n])),
            Arc::new(BinaryArray::from_iter_values(
                (0..n).map(|_| vec![fill; 16]),
            )),
        ],
        None,
    ))
}

/// [`rows`] with a `t5_long` column, every byte `fill`.
fn rows_with_t5(prefix: &str, n: usize, fill: u8) -> RecordBatch {
    let b = rows(prefix, n);
    RecordBatch::try_from_iter(
        b.schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .zip(b.columns().iter().cloned())
            .chain([("t5_long".to_string(), t5_column(n, fill))]),
    )
    .unwrap()
}

/// The live file paths of a dataset's column-group table.
async fn group_files(ds: &Dataset, group: &str) -> Vec<String> {
    let t = ds.group_table(group).unwrap();
    t.snapshot()
        .await
        .unwrap()
        .shards
        .into_iter()
        .map(|s| s.path)
        .collect()
}

#[tokio::test]
async fn column_groups_are_written_once_and_gc_repairs_their_tables() {
    use llamagen_catalog::stage::{map_shards, map_shards_where};
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let ds = Catalog::from_storage(storage.clone()).samples();
    write_and_commit(&ds, "a", 10, None).await.unwrap();
    let set_t5 = |fill: u8| {
        move |b: RecordBatch| async move {
            Ok(RecordBatch::try_from_iter(vec![
                ("key", b.column_by_name("key").unwrap().clone()),
                ("t5_long", t5_column(b.num_rows(), fill)),
            ])?)
        }
    };
    map_shards(
        &ds,
        "t5",
        (0, 1),
        ShardWriterOptions::default(),
        set_t5(1),
        |_, _| {},
    )
    .await
    .unwrap();
    let first = ds.snapshot().await.unwrap().shards[0].columns["t5"].clone();
    assert_eq!(group_files(&ds, "t5").await, vec![first.path.clone()]);

    // A later stage copies the narrow base file only; the column file is carried over.
    let score = |b: RecordBatch| async move {
        Ok(RecordBatch::try_from_iter(vec![
            ("key", b.column_by_name("key").unwrap().clone()),
            (
                "score_nsfw",
                Arc::new(Float32Array::from(vec![0.5f32; b.num_rows()])) as ArrayRef,
            ),
        ])?)
    };
    map_shards(
        &ds,
        "score",
        (0, 1),
        ShardWriterOptions::default(),
        score,
        |_, _| {},
    )
    .await
    .unwrap();
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.shards[0].columns["t5"], first);
    let back = ds.read_shard(&snap.shards[0], None).await.unwrap();
    let t5 = back[0].column_by_name("t5_long").unwrap().as_struct();
    assert_eq!(t5.column(3).as_binary::<i32>().value(9), &[1u8; 16]);
    assert_eq!(
        back[0]
            .column_by_name("score_nsfw")
            .unwrap()
            .as_primitive::<llamagen_catalog::arrow::datatypes::Float32Type>()
            .value(0),
        0.5
    );
    assert_eq!(
        count(storage.clone(), "SELECT count(t5_long) FROM samples").await,
        10
    );

    // Setting the group again writes a new column file and replaces the old in the group table.
    map_shards_where(
        &ds,
        "t5",
        (0, 1),
        ShardWriterOptions::default(),
        |_| true,
        set_t5(2),
        |_, _| {},
    )
    .await
    .unwrap();
    let second = ds.snapshot().await.unwrap().shards[0].columns["t5"].clone();
    assert_ne!(second, first);
    assert_eq!(group_files(&ds, "t5").await, vec![second.path.clone()]);
    let ctx = sql::session(storage.clone()).await.unwrap();
    let (_, out) = sql::query(&ctx, "SELECT min(t5_long['data']) AS d FROM samples")
        .await
        .unwrap();
    let d = llamagen_catalog::arrow::compute::cast(out[0].column(0), &DataType::Binary).unwrap();
    assert_eq!(d.as_binary::<i32>().value(0), &[2u8; 16]);

    // A group table that lags its dataset (a writer killed between the two commits), and a
    // column file nobody committed: gc brings the table back and deletes only the orphans.
    ds.group_table("t5")
        .unwrap()
        .commit(Transaction {
            operation: "lag".into(),
            remove: vec![second.path.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(group_files(&ds, "t5").await.is_empty());
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows_with_t5("orphan", 3, 9)).await.unwrap();
    let orphan = w.finish().await.unwrap();
    let orphan_file = format!("samples.t5/{}", orphan[0].columns["t5"].path);
    let r = ds.gc(Duration::ZERO, false).await.unwrap();
    assert_eq!(r.column_entries_added, 1);
    assert_eq!(group_files(&ds, "t5").await, vec![second.path.clone()]);
    assert!(
        r.orphan_shards.contains(&orphan_file),
        "{:?}",
        r.orphan_shards
    );
    assert!(
        r.orphan_shards
            .contains(&format!("samples.t5/{}", first.path)),
        "{:?}",
        r.orphan_shards
    );
    assert!(storage.get(&orphan_file).await.is_err());
    assert!(
        storage
            .get(&format!("samples.t5/{}", second.path))
            .await
            .is_ok()
    );
    let snap = ds.snapshot().await.unwrap();
    assert!(ds.verify().await.unwrap().is_empty());
    let back = ds
        .read_shard(&snap.shards[0], Some(&["t5_long"]))
        .await
        .unwrap();
    assert_eq!(back[0].num_columns(), 1);
    assert_eq!(
        back[0]
            .column(0)
            .as_struct()
            .column(3)
            .as_binary::<i32>()
            .value(0),
        &[2u8; 16]
    );
}

#[tokio::test]
async fn a_column_file_that_does_not_match_its_base_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let ds = Catalog::from_storage(storage.clone()).samples();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows_with_t5("a", 4, 1)).await.unwrap();
    let mut a = w.finish().await.unwrap();
    let mut w = ds.writer(ShardWriterOptions::default());
    w.write(&rows_with_t5("b", 4, 1)).await.unwrap();
    let b = w.finish().await.unwrap();
    // Shard a naming shard b's column file: same rows, other keys.
    a[0].columns = b[0].columns.clone();
    ds.commit(Transaction {
        operation: "t".into(),
        add: a,
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = ds.snapshot().await.unwrap();
    let e = ds
        .read_shard(&snap.shards[0], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("samples.t5/data/part-") && e.contains("row 0 has key \"b-00000\""),
        "{e}"
    );
    let problems = ds.verify().await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
}
