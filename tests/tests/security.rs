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

/// Report 9: `http://user:pass@host/x.jpg` was sent as Basic auth and stored verbatim in shards and
/// in the webdataset `.json`. Now credentials are stripped before the request unless
/// `--allow-url-credentials`, and never stored (not in `url`, `error`, the log or the tars).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_are_not_sent_or_stored() {
    use llamagen_tests::http::FaultServer;
    let server =
        FaultServer::start(workspace().join("data/images"), std::time::Duration::ZERO).await;
    let with_creds = |path: &str| format!("http://alice:s3cr3tpw@{}{path}", server.addr);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.jsonl");
    let lines: Vec<String> = ["/img/matplotlib/grace_hopper.jpg", "/reset", "/status/404"]
        .iter()
        .map(|p| serde_json::json!({"URL": with_creds(p), "TEXT": "x"}).to_string())
        .collect();
    std::fs::write(&list, lines.join("\n") + "\n").unwrap();
    for (name, allow) in [("stripped", false), ("allowed", true)] {
        let root = dir.path().join(name).display().to_string();
        let wds = dir.path().join(format!("{name}-wds")).display().to_string();
        let before = server.heads().len();
        let mut args = vec![
            "ingest",
            "--input",
            list.to_str().unwrap(),
            "--root",
            &root,
            "--allow-cidr",
            "127.0.0.0/8",
            "--retries",
            "0",
            "--webdataset",
            &wds,
        ];
        if allow {
            args.push("--allow-url-credentials");
        }
        let (code, out, err) = run_llamagen(&args, &[]);
        assert_eq!(code, 0, "{err}");
        assert!(
            !out.contains("s3cr3tpw") && !err.contains("s3cr3tpw"),
            "{out}{err}"
        );
        let heads = server.heads()[before..].to_vec();
        assert_eq!(heads.len(), 3, "{heads:?}");
        let sent = heads
            .iter()
            .filter(|h| h.to_ascii_lowercase().contains("\nauthorization: basic "))
            .count();
        assert_eq!(sent, if allow { 3 } else { 0 }, "{heads:?}");
        let (code, out, err) = run_llamagen(
            &[
                "catalog",
                "sql",
                "SELECT url, status, error_kind, error FROM samples ORDER BY source_row",
                "--root",
                &root,
                "--format",
                "json",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        let rows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["status"], "ok", "{out}");
        assert_eq!(
            rows[0]["url"],
            format!("http://{}/img/matplotlib/grace_hopper.jpg", server.addr)
        );
        assert_eq!(rows[1]["error_kind"], "connection_reset", "{out}");
        assert!(!out.contains("s3cr3tpw") && !out.contains("alice"), "{out}");
        // Nothing written anywhere holds the password: shards, log, tars.
        for top in [&root, &wds] {
            for entry in walk(std::path::Path::new(top)) {
                let bytes = std::fs::read(&entry).unwrap();
                assert!(
                    !bytes.windows(8).any(|w| w == b"s3cr3tpw"),
                    "{} holds the password",
                    entry.display()
                );
            }
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Reports 5 and 6: a 617-byte torch zip declaring a 64 GiB tensor made the GPT loader allocate
/// it and abort (another shape: a `capacity overflow` panic), and a 2 KB pickle that doubles a list
/// through the memo grew to 7.6 GB. Each hostile file of `tests/python/hostile_checkpoints.py`
/// must now give an error naming the file, from the GPT and the VQ loader alike, quickly and
/// without a large allocation.
#[test]
fn hostile_checkpoints_give_errors_not_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(llamagen_tests::python())
        .arg(workspace().join("tests/python/hostile_checkpoints.py"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = candle_core::Device::Cpu;
    for (file, expect) in [
        ("huge_tensor.pt", "needs 68719476736 bytes"),
        ("overflow_shape.pt", "overflows"),
        ("short_storage.pt", "does not fit its storage"),
        ("memo_bomb.pt", "through its memo"),
        ("bad_tuple.pt", "takes 4 or more arguments"),
    ] {
        let path = dir.path().join(file);
        let started = std::time::Instant::now();
        // The GPT loader (`sample`, `conformance`, `train --init-from`).
        let gpt = llamagen_train::checkpoint::read_state_dict(&path, &dev);
        // The VQ loader (`encode vq`, `sample --vq`).
        let vq = llamagen_encode::VqModel::from_file(
            &path,
            &llamagen_encode::ModelArgs::reduced(),
            &dev,
        );
        assert!(started.elapsed().as_secs_f64() < 10.0, "{file}");
        let gpt = match gpt {
            Ok(sd) => format!("read {} tensors", sd.tensors.len()),
            Err(e) => e.to_string(),
        };
        let vq = match vq {
            Ok(_) => "loaded".to_string(),
            Err(e) => e.to_string(),
        };
        // The aesthetic-head loader (`filter score --aesthetic-head`).
        let head =
            llamagen_filters::heads::TorchHead::from_pth(file, &std::fs::read(&path).unwrap())
                .map(|_| "loaded".to_string())
                .unwrap_or_else(|e| e.to_string());
        assert!(head.contains(expect), "head loader on {file}: {head}");
        for (loader, msg) in [("GPT", &gpt), ("VQ", &vq), ("head", &head)] {
            assert!(msg.contains(file), "{loader} loader on {file}: {msg}");
        }
        // The GPT loader reads every tensor and says why it cannot; the VQ loader compares names
        // and shapes with the model first, so it may stop at a missing tensor instead.
        assert!(gpt.contains(expect), "GPT loader on {file}: {gpt}");
        assert!(
            vq.contains(expect) || vq.contains("missing") || vq.contains("not found"),
            "VQ loader on {file}: {vq}"
        );
    }
    // Views at an offset into a shared storage are read from the right bytes.
    let head = llamagen_filters::heads::TorchHead::from_pth(
        "offset_head.pt",
        &std::fs::read(dir.path().join("offset_head.pt")).unwrap(),
    )
    .unwrap();
    for j in 0..4 {
        let mut x = [0f32; 4];
        x[j] = 1.0;
        // weight = storage[2..6] = 3, 4.5, 6, 7.5; bias = storage[6] = 9.
        assert_eq!(
            head.forward(&x, 1),
            vec![1.5 * (2 + j) as f32 + 9.0],
            "input {j}"
        );
    }
    // Peak memory stayed small (the 64 GiB tensor and the memo bomb were never expanded).
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kb < 4 << 20, "peak RSS {} MB", hwm_kb >> 10);
}

/// Also reported: `verify` accepted a shard that the reader rejects (a list column whose element
/// is named `element`, as pyarrow writes it, where the sample schema says `item`): verify read
/// one column only. The shard here is a committed shard rewritten by pyarrow and committed with
/// its true size and SHA-256.
#[test]
fn verify_rejects_what_the_reader_rejects() {
    let (_dir, root_path, root) = catalog();
    let data = root_path.join("samples/data");
    let shard = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .unwrap();
    let renamed = data.join("part-00000000-0000-7000-8000-000000000001.parquet");
    let script = "import sys, pyarrow.parquet as pq\n\
                  t = pq.read_table(sys.argv[1])\n\
                  pq.write_table(t, sys.argv[2], use_compliant_nested_type=True)\n";
    let out = std::process::Command::new(llamagen_tests::python())
        .args(["-c", script])
        .arg(&shard)
        .arg(&renamed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&renamed).unwrap();
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let rel = |p: &std::path::Path| format!("data/{}", p.file_name().unwrap().to_str().unwrap());
    let log = root_path.join("samples/_delta_log");
    let next = (0..)
        .map(|v| log.join(format!("{v:020}.json")))
        .find(|p| !p.exists())
        .unwrap();
    let add = serde_json::json!({"add": {
        "path": rel(&renamed), "partitionValues": {}, "size": bytes.len(),
        "modificationTime": 0, "dataChange": true, "stats": "{\"numRecords\":10000}",
        "tags": {"llamagen.sha256": sha, "llamagen.stage": "import"}}});
    let remove = serde_json::json!({"remove": {
        "path": rel(&shard), "deletionTimestamp": 0, "dataChange": true}});
    std::fs::write(&next, format!("{add}\n{remove}\n")).unwrap();
    let (code, out, err) = run_llamagen(&["catalog", "verify", "--root", &root], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        (out.contains("does not have the sample schema")
            || err.contains("does not have the sample schema"))
            && (out.contains(renamed.file_name().unwrap().to_str().unwrap())
                || err.contains(renamed.file_name().unwrap().to_str().unwrap())),
        "{out}\n{err}"
    );
}
