//! The `llamagen catalog` command on local roots: import, SQL output formats, stats, verify, gc,
//! and the errors users see on bad input.

use llamagen_tests::{python, run_llamagen, workspace};

fn laion() -> String {
    workspace()
        .join("data/laion_meta/img2dataset_test_10000.parquet")
        .display()
        .to_string()
}

fn import(root: &str, files: &[&str]) -> (i32, String, String) {
    let mut args = vec!["catalog", "import"];
    args.extend_from_slice(files);
    args.extend_from_slice(&["--root", root]);
    run_llamagen(&args, &[])
}

fn sql(root: &str, q: &str, format: &str) -> (i32, String, String) {
    run_llamagen(
        &["catalog", "sql", q, "--root", root, "--format", format],
        &[],
    )
}

#[test]
fn import_query_and_reimport() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat").display().to_string();
    let (code, out, err) = import(&root, &[&laion()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("received") && out.contains("10000"), "{out}");
    // Re-running is a no-op that says so.
    let (code, _, err) = import(&root, &[&laion()]);
    assert_eq!(code, 0);
    assert!(
        err.contains("already imported, skipped") || err.is_empty(),
        "{err}"
    );
    let (_, out, _) = sql(
        &root,
        "SELECT count(*) AS n, count(DISTINCT key) AS k FROM samples",
        "csv",
    );
    assert_eq!(out, "n,k\n10000,10000\n");
    let (_, out, _) = sql(
        &root,
        "SELECT count(*) AS n FROM runs WHERE status = 'succeeded'",
        "csv",
    );
    assert_eq!(out, "n\n2\n");

    // Formats: table, json lines, parquet (read back by pyarrow).
    let (code, out, _) = sql(
        &root,
        "SELECT status, count(*) AS n FROM samples GROUP BY status ORDER BY n",
        "table",
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("| pending | 9999 |") && out.contains("| failed  | 1    |"),
        "{out}"
    );
    let (_, out, _) = sql(
        &root,
        "SELECT key, error_kind FROM samples WHERE status = 'failed'",
        "json",
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["error_kind"], "invalid_url");
    let pq = dir.path().join("out.parquet");
    let (code, _, err) = run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT key, url FROM samples WHERE status = 'pending' ORDER BY key LIMIT 123",
            "--root",
            &root,
            "--format",
            "parquet",
            "--output",
            pq.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); print(t.num_rows, t.schema.names)",
            pq.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "123 ['key', 'url']"
    );

    let (code, out, _) = run_llamagen(&["catalog", "stats", "--root", &root], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("| invalid_url | 1       |"), "{out}");
}

#[test]
fn csv_and_jsonl_url_lists_with_laion_quirks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat").display().to_string();
    let csv = dir.path().join("list.csv");
    std::fs::write(
        &csv,
        "URL,TEXT,WIDTH,HEIGHT,similarity,pwatermark,LICENSE\n\
         https://a.example/1.jpg,a cat,640.0,480.0,0.31,0.1,cc-by\n\
         https://a.example/2.jpg,\"a dog, running\",,,0.29,0.9,cc0\n\
         ,no url,10,10,0.1,0.1,?\n",
    )
    .unwrap();
    let jsonl = dir.path().join("list.jsonl");
    std::fs::write(
        &jsonl,
        "{\"url\": \"https://b.example/x.png\", \"caption\": \"x\", \"WIDTH\": 300, \"note\": \"keep me\"}\n\
         {\"url\": \"file:///etc/passwd\", \"caption\": \"y\", \"WIDTH\": null, \"note\": null}\n",
    )
    .unwrap();
    let (code, out, err) = import(&root, &[csv.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run_llamagen(
        &[
            "catalog",
            "import",
            jsonl.to_str().unwrap(),
            "--root",
            &root,
            "--url-column",
            "url",
            "--caption-column",
            "caption",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (_, out, _) = sql(
        &root,
        "SELECT source, source_row, status, text, width, height, pwatermark, extra, error FROM samples ORDER BY source, source_row",
        "json",
    );
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0]["width"], 640);
    assert_eq!(rows[0]["height"], 480);
    assert_eq!(rows[0]["extra"], "{\"LICENSE\":\"cc-by\"}");
    assert_eq!(rows[1]["text"], "a dog, running");
    assert!(rows[1].get("width").is_none(), "{}", rows[1]);
    assert_eq!(rows[2]["status"], "failed");
    assert!(
        rows[2]["error"]
            .as_str()
            .unwrap()
            .contains("list.csv row 2: empty URL"),
        "{}",
        rows[2]
    );
    assert_eq!(rows[3]["source"], "list.jsonl");
    assert_eq!(rows[3]["extra"], "{\"note\":\"keep me\"}");
    assert_eq!(rows[4]["status"], "failed");
    assert!(
        rows[4]["error"]
            .as_str()
            .unwrap()
            .contains("not an http(s) URL"),
        "{}",
        rows[4]
    );
}

#[test]
fn bad_input_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("cat");
    let root = root_path.display().to_string();

    // A URL list without the URL column.
    let csv = dir.path().join("nourl.csv");
    std::fs::write(&csv, "link,TEXT\nhttps://x/1.jpg,a\n").unwrap();
    let (code, _, err) = import(&root, &[csv.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("nourl.csv") && err.contains("no URL column \"URL\"") && err.contains("link"),
        "{err}"
    );

    // Two inputs with the same file name would collide on keys.
    let other = dir.path().join("sub");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(&csv, other.join("nourl.csv")).unwrap();
    let (code, _, err) = import(
        &root,
        &[
            csv.to_str().unwrap(),
            other.join("nourl.csv").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("same file name"), "{err}");

    // SQL errors: DataFusion's words, exit code 2, no panic.
    assert_eq!(import(&root, &[&laion()]).0, 0);
    let (code, _, err) = sql(&root, "SELECT no_such_column FROM samples", "table");
    assert_eq!(code, 2);
    assert!(
        err.starts_with("SQL error:") && err.contains("no_such_column"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, err) = sql(&root, "SELECT * FROM nope", "table");
    assert_eq!(code, 2);
    assert!(err.contains("nope") && err.contains("not found"), "{err}");

    // A truncated shard is named.
    let data = root_path.join("samples/data");
    let shard = std::fs::read_dir(&data)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &good[..good.len() - 100]).unwrap();
    // count(*) comes from the table log's row counts and reads no shard; a query that reads the
    // shard fails naming it.
    let (code, out, _) = sql(&root, "SELECT count(*) AS n FROM samples", "csv");
    assert_eq!(code, 0);
    assert!(out.contains("n\n"), "{out}");
    let (code, _, err) = sql(
        &root,
        "SELECT status, count(*) FROM samples GROUP BY status",
        "table",
    );
    assert_ne!(code, 0);
    let name = shard.file_name().unwrap().to_str().unwrap();
    assert!(err.contains(name), "{err}");
    let (code, out, _) = run_llamagen(&["catalog", "verify", "--root", &root], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL") && out.contains(name) && out.contains("0 ok, 1 bad"),
        "{out}"
    );
    std::fs::write(&shard, &good).unwrap();

    // A malformed log entry is named.
    let log = root_path.join("samples/_delta_log");
    let next = (0..)
        .map(|v| log.join(format!("{v:020}.json")))
        .find(|p| !p.exists())
        .unwrap();
    std::fs::write(&next, "{ not json").unwrap();
    let (code, _, err) = sql(&root, "SELECT count(*) FROM samples", "table");
    assert_eq!(code, 1);
    let name = next.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains("malformed transaction log entry") && err.contains(name),
        "{err}"
    );

    // A table from a future schema version is refused clearly.
    let v0 = std::fs::read_to_string(log.join("00000000000000000000.json")).unwrap();
    let meta = v0
        .lines()
        .find(|l| l.contains("\"metaData\""))
        .unwrap()
        .replace(
            "\"llamagen.schemaVersion\":\"3\"",
            "\"llamagen.schemaVersion\":\"7\"",
        );
    std::fs::write(&next, meta).unwrap();
    let (code, _, err) = sql(&root, "SELECT count(*) FROM samples", "table");
    assert_eq!(code, 1);
    assert!(
        err.contains("sample schema version 7") && err.contains("reads version 3"),
        "{err}"
    );
}

#[test]
fn gc_cleans_what_a_crashed_writer_left() {
    let dir = tempfile::tempdir().unwrap();
    let root_path = dir.path().join("cat");
    let root = root_path.display().to_string();
    assert_eq!(import(&root, &[&laion()]).0, 0);
    // What a crashed writer leaves: an uncommitted shard and a scratch file.
    std::fs::write(
        root_path.join("samples/data/part-0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b.parquet"),
        b"partial",
    )
    .unwrap();
    std::fs::write(root_path.join("_tmp/shard-crashed.parquet.tmp"), b"partial").unwrap();
    let (code, out, _) = sql(&root, "SELECT count(*) AS n FROM samples", "csv");
    assert_eq!((code, out.as_str()), (0, "n\n10000\n"));
    let (code, out, _) = run_llamagen(&["catalog", "gc", "--root", &root, "--dry-run"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("would remove: 0 orphan shard(s)"), "{out}");
    let (code, out, _) = run_llamagen(
        &["catalog", "gc", "--root", &root, "--grace-secs", "0"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("removed: 1 orphan shard(s) (7 bytes)") && out.contains("1 temporary file(s)"),
        "{out}"
    );
    assert!(
        !root_path
            .join("samples/data/part-0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b.parquet")
            .exists()
    );
    let (_, out, _) = sql(&root, "SELECT count(*) AS n FROM samples", "csv");
    assert_eq!(out, "n\n10000\n");
}

/// Issue 23: every command reads its share from `--worker` or from an Indexed Job's
/// `JOB_COMPLETION_INDEX`/`WORKERS` (earlier, `text` and `filter` took every shard in every pod).
/// Two pods of a two-pod Job split the ten shards of a catalog between them, each shard once.
#[test]
fn indexed_job_pods_split_a_stage_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cat").display().to_string();
    let laion = llamagen_tests::workspace()
        .join("data/laion_meta/img2dataset_test_10000.parquet")
        .display()
        .to_string();
    let (code, _, err) = llamagen_tests::run_llamagen(
        &[
            "catalog",
            "import",
            &laion,
            "--root",
            &root,
            "--shard-rows",
            "1000",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let caps = dir.path().join("caps.jsonl");
    std::fs::write(&caps, "{\"key\":\"none\",\"long_caption\":\"x\"}\n").unwrap();
    let mut rewritten = Vec::new();
    for pod in ["0", "1"] {
        let (code, out, err) = llamagen_tests::run_llamagen(
            &[
                "text",
                "--root",
                &root,
                "captions",
                "--captions",
                caps.to_str().unwrap(),
            ],
            &[
                ("JOB_COMPLETION_INDEX", pod.to_string()),
                ("WORKERS", "2".to_string()),
            ],
        );
        assert_eq!(code, 0, "{err}");
        let report: serde_json::Value =
            serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        rewritten.push(report["shards"]["shards_rewritten"].as_u64().unwrap());
    }
    assert!(rewritten.iter().all(|&n| n > 0 && n < 10), "{rewritten:?}");
    assert_eq!(rewritten.iter().sum::<u64>(), 10, "{rewritten:?}");
    // A pod index without the pod count is an error, not "all shards".
    let (code, _, err) = llamagen_tests::run_llamagen(
        &[
            "text",
            "--root",
            &root,
            "captions",
            "--captions",
            caps.to_str().unwrap(),
        ],
        &[("JOB_COMPLETION_INDEX", "0".to_string())],
    );
    assert_ne!(code, 0);
    assert!(err.contains("WORKERS"), "{err}");
}
