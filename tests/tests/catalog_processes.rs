//! Writers as separate processes: concurrent commits, and a writer killed with SIGKILL mid-shard.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use llamagen_catalog::arrow::array::AsArray;
use llamagen_catalog::arrow::datatypes::Int64Type;
use llamagen_catalog::storage::{LocalStorage, Storage};
use llamagen_catalog::{Catalog, sql};

const WRITER: &str = env!("CARGO_BIN_EXE_catalog_writer");

async fn counts(root: &std::path::Path) -> (i64, i64) {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(root).unwrap());
    let ctx = sql::session(storage).await.unwrap();
    let (_, b) = sql::query(&ctx, "SELECT count(*), count(DISTINCT key) FROM samples")
        .await
        .unwrap();
    (
        b[0].column(0).as_primitive::<Int64Type>().value(0),
        b[0].column(1).as_primitive::<Int64Type>().value(0),
    )
}

#[tokio::test]
async fn two_writer_processes_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat");
    let spawn = |prefix: &str| {
        Command::new(WRITER)
            .args([root.to_str().unwrap(), prefix, "8", "400"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("committed")
                .count(),
            8
        );
    }
    let cat = Catalog::open(root.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let snap = cat.samples().snapshot().await.unwrap();
    assert_eq!(snap.version, 16);
    assert_eq!(snap.shards.len(), 16);
    assert_eq!(snap.units.len(), 16);
    assert_eq!(counts(&root).await, (6400, 6400));
    // Running writer "a" again commits nothing new: every unit is already in.
    let out = Command::new(WRITER)
        .args([root.to_str().unwrap(), "a", "8", "400"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("skipped")
            .count(),
        8
    );
    assert_eq!(counts(&root).await, (6400, 6400));
}

#[tokio::test]
async fn writer_killed_mid_shard_leaves_no_visible_partial_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat");
    let mut child = Command::new(WRITER)
        .args([root.to_str().unwrap(), "k", "3", "1000", "50"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Let the first shard commit, then kill the writer halfway through the second.
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line == "wrote k-1 rows 500" {
            break;
        }
    }
    assert!(seen.contains(&"committed k-0 v1".to_string()), "{seen:?}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let cat = Catalog::open(root.to_str().unwrap(), &Default::default())
        .await
        .unwrap();
    let ds = cat.samples();
    let snap = ds.snapshot().await.unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.units.iter().collect::<Vec<_>>(), vec!["k-0"]);
    assert_eq!(counts(&root).await, (1000, 1000));
    assert!(ds.verify().await.unwrap().is_empty());
    // The half-written shard is on disk as a scratch file, and gc finds it.
    let report = ds.gc(Duration::ZERO, true).await.unwrap();
    assert_eq!(report.temp_files.len(), 1, "{report:?}");
    assert!(report.orphan_shards.is_empty(), "{report:?}");

    // A re-run completes the rest: same keys as an uninterrupted run, none twice.
    let out = Command::new(WRITER)
        .args([root.to_str().unwrap(), "k", "3", "1000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("skipped k-0") && stdout.contains("committed k-2 v3"),
        "{stdout}"
    );
    assert_eq!(counts(&root).await, (3000, 3000));
    ds.gc(Duration::ZERO, false).await.unwrap();
    assert_eq!(counts(&root).await, (3000, 3000));
}
