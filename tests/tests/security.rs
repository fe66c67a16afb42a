//! The catalog's side of the security review: nothing deleted that is not a shard, no writes
//! through SQL, no dataset name or logged path that leaves the root. Each test reproduces a report
//! that held against the earlier catalog.

use llamagen_tests::{run_llamagen, workspace};

fn laion() -> String {
    workspace()
        .join("data/laion_meta/img2dataset_test_10000.parquet")
        .display()
        .to_string()
}

fn catalog() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("cat");
    let root = root_path.display().to_string();
    let (code, _, err) = run_llamagen(&["catalog", "import", &laion(), "--root", &root], &[]);
    assert_eq!(code, 0, "{err}");
    (dir, root_path, root)
}

/// Report 1: `catalog gc` on a folder that is not a table, or with `--dataset ..`, deleted files.
#[test]
fn gc_deletes_only_unreferenced_shards_of_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(plain.join("samples/data")).unwrap();
    std::fs::write(plain.join("samples/data/thesis.docx"), b"years of work").unwrap();
    let (code, _, err) = run_llamagen(
        &[
            "catalog",
            "gc",
            "--root",
            plain.to_str().unwrap(),
            "--grace-secs",
            "0",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    assert!(plain.join("samples/data/thesis.docx").exists());

    let (_dir, root_path, root) = catalog();
    std::fs::write(root_path.join("samples/data/thesis.docx"), b"years of work").unwrap();
    std::fs::create_dir_all(root_path.join("samples/data/sub")).unwrap();
    std::fs::write(root_path.join("samples/data/sub/nested.bin"), b"x").unwrap();
    std::fs::write(root_path.join("precious.txt"), b"x").unwrap();
    for dataset in ["..", "../cat", "/etc", "samples/..", ""] {
        let (code, _, err) = run_llamagen(
            &[
                "catalog",
                "gc",
                "--root",
                &root,
                "--dataset",
                dataset,
                "--grace-secs",
                "0",
            ],
            &[],
        );
        assert_ne!(code, 0, "--dataset {dataset:?}");
        assert!(err.contains("dataset name"), "{dataset:?}: {err}");
    }
    let (code, out, _) = run_llamagen(
        &["catalog", "gc", "--root", &root, "--grace-secs", "0"],
        &[],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("removed: 0 orphan shard(s)"), "{out}");
    assert!(root_path.join("samples/data/thesis.docx").exists());
    assert!(root_path.join("samples/data/sub/nested.bin").exists());
    assert!(root_path.join("precious.txt").exists());
}

/// Report 2: `catalog sql` wrote files (`COPY … TO` over a committed shard).
#[test]
fn catalog_sql_is_read_only() {
    let (dir, _root_path, root) = catalog();
    let target = dir.path().join("written.parquet");
    let t = target.display().to_string();
    for q in [
        format!("COPY (SELECT 1 AS x) TO '{t}' STORED AS PARQUET"),
        format!("CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '{t}'"),
        "CREATE TABLE y AS SELECT 1".to_string(),
        "INSERT INTO runs SELECT * FROM runs".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let (code, _, err) = run_llamagen(&["catalog", "sql", &q, "--root", &root], &[]);
        assert_eq!(code, 2, "{q}: {err}");
        assert!(err.contains("SQL error"), "{q}: {err}");
        assert!(!target.exists(), "{q} wrote {t}");
    }
    let (code, out, err) = run_llamagen(&["catalog", "verify", "--root", &root], &[]);
    assert_eq!(code, 0, "{out}{err}");
    // Results still leave through --output, streamed.
    let (code, _, err) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT key FROM samples",
            "--root",
            &root,
            "--format",
            "csv",
            "--output",
            &t,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap().lines().count(),
        10_001
    );
}

/// Report 3: a dataset name with `..` wrote tables outside `--root`.
#[test]
fn dataset_names_cannot_leave_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let r = root.display().to_string();
    for name in [
        "../../escaped",
        "../x",
        "a/b",
        "/abs",
        ".hidden",
        "_delta_log",
    ] {
        let (code, _, err) = run_llamagen(
            &[
                "catalog",
                "import",
                &laion(),
                "--root",
                &r,
                "--dataset",
                name,
            ],
            &[],
        );
        assert_ne!(code, 0, "{name}");
        assert!(err.contains("dataset name"), "{name}: {err}");
    }
    assert!(!dir.path().join("escaped").exists());
    assert!(!dir.path().join("x").exists());
    // A pipeline config naming such a dataset is refused by `pipeline check`, as by `run`.
    let cfg = std::fs::read_to_string(workspace().join("configs/pipeline/sample.toml")).unwrap();
    let bad = cfg.replace("dataset = \"samples\"", "dataset = \"../../../X\"");
    assert_ne!(bad, cfg);
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let (code, _, err) = run_llamagen(&["pipeline", "check", path.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("dataset name"), "{err}");
}

/// Also reported: a shard path in the log outside the dataset (`../../etc/passwd`) was read.
#[test]
fn logged_paths_outside_the_table_are_refused() {
    let (_dir, root_path, root) = catalog();
    let log = root_path.join("samples/_delta_log");
    let next = (0..)
        .map(|v| log.join(format!("{v:020}.json")))
        .find(|p| !p.exists())
        .unwrap();
    std::fs::write(
        &next,
        r#"{"add":{"path":"../../etc/passwd","partitionValues":{},"size":10,"modificationTime":0,"dataChange":true,"stats":"{\"numRecords\":1}","tags":{"llamagen.sha256":"00"}}}"#,
    )
    .unwrap();
    let (code, _, err) = run_llamagen(&["catalog", "verify", "--root", &root], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("leaves the table's folder")
            && err.contains(next.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

/// Report 4: sample keys such as `../../x` or `/abs/x` made `export llamagen` write outside `--out`.
#[tokio::test]
async fn export_refuses_keys_that_are_not_file_names() {
    use llamagen_catalog::arrow::array::{ArrayRef, RecordBatch, StringArray};
    use llamagen_catalog::{Catalog, ShardWriterOptions, Transaction};
    use std::sync::Arc;
    for key in ["../../x", "/abs/x", "a/b", ".hidden", ""] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cat");
        let cat = Catalog::open(root.to_str().unwrap(), &Default::default())
            .await
            .unwrap();
        let ds = cat.samples();
        let mut w = ds.writer(ShardWriterOptions::default());
        w.write(
            &RecordBatch::try_from_iter(vec![
                (
                    "key",
                    Arc::new(StringArray::from(vec!["good-0001", key])) as ArrayRef,
                ),
                ("status", Arc::new(StringArray::from(vec!["ok", "ok"]))),
            ])
            .unwrap(),
        )
        .await
        .unwrap();
        let add = w.finish().await.unwrap();
        ds.commit(Transaction {
            operation: "t".into(),
            add,
            ..Default::default()
        })
        .await
        .unwrap();
        let out = dir.path().join("deep/er/out");
        for kind in ["t2i", "c2i"] {
            let (code, _, err) = run_llamagen(
                &[
                    "export",
                    "llamagen",
                    "--root",
                    root.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                    "--kind",
                    kind,
                ],
                &[],
            );
            assert_ne!(code, 0, "{key:?} {kind}");
            assert!(
                err.contains(&format!("{key:?}")) && err.contains("row 1"),
                "{key:?} {kind}: {err}"
            );
        }
        assert!(!dir.path().join("deep/x.npy").exists());
        assert!(!std::path::Path::new("/abs/x.npy").exists());
    }
}

/// Report 7: SQL results and operators were held in memory without bound. Now results stream to
/// the output and operators run under a memory limit: a join that needs more fails with a clear
/// error (no abort), and the same query fits under the default limit.
#[test]
fn catalog_sql_runs_under_a_memory_limit() {
    let (dir, _root_path, root) = catalog();
    let q = "SELECT a.url, b.url FROM samples a JOIN samples b ON a.text = b.text";
    let out = dir.path().join("pairs.csv");
    let o = out.display().to_string();
    let (code, _, err) = run_llamagen(
        &[
            "catalog",
            "sql",
            q,
            "--root",
            &root,
            "--format",
            "csv",
            "--output",
            &o,
            "--memory-mib",
            "1",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Resources exhausted"), "{err}");
    assert!(!out.exists(), "a failed query left a partial output");
    let (code, _, err) = run_llamagen(
        &[
            "catalog", "sql", q, "--root", &root, "--format", "csv", "--output", &o,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read_to_string(&out).unwrap().lines().count() > 10_000);
}
