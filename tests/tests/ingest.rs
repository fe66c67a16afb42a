//! `llamagen ingest` end to end against a real HTTP server on 127.0.0.1 serving the bundled real
//! images and the faults of the web.

use std::collections::BTreeMap;
use std::time::Duration;

use llamagen_tests::http::FaultServer;
use llamagen_tests::{llamagen, workspace};
use serde_json::Value;

async fn run(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(llamagen())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_list(path: &std::path::Path, rows: &[(String, Option<i64>)]) {
    let mut text = String::new();
    for (i, (url, width)) in rows.iter().enumerate() {
        let mut o =
            serde_json::json!({"URL": url, "TEXT": format!("caption {i}"), "LICENSE": "cc-by"});
        if let Some(w) = width {
            o["WIDTH"] = (*w).into();
        }
        text.push_str(&o.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// Rows of a `catalog sql` query over the catalog at `root`, as JSON objects.
async fn sql_rows(root: &str, query: &str) -> Vec<Value> {
    let (code, out, err) =
        run(&["catalog", "sql", query, "--root", root, "--format", "json"]).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn rows_of(root: &str) -> Vec<Value> {
    sql_rows(
        root,
        "SELECT source_row, url, status, error_kind, error, reject_reasons, duplicate_of, orig_width, orig_height, \
         http_status, content_sha256, extra, images FROM samples ORDER BY source_row",
    )
    .await
}

fn base_args<'a>(list: &'a str, root: &'a str) -> Vec<&'a str> {
    vec![
        "ingest",
        "--input",
        list,
        "--root",
        root,
        "--image-size",
        "64,128",
        "--timeout",
        "2",
        "--connect-timeout",
        "1",
        "--retries",
        "2",
        "--backoff",
        "0.05",
        "--max-bytes",
        "5000000",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_images_and_faults() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let u = |p: &str| server.url(p);
    // (url, metadata WIDTH, expected status, expected error kind or reason)
    let cases: Vec<(String, Option<i64>, &str, &str)> = vec![
        (u("/img/pillow/hopper.jpg"), None, "ok", ""),
        (u("/img/pillow/hopper.png"), None, "ok", ""),
        (u("/img/pillow/hopper.webp"), None, "ok", ""),
        (u("/img/pillow/hopper.gif"), None, "ok", ""),
        (u("/img/pillow/hopper.bmp"), None, "ok", ""),
        // 10x15 px: below both sizes, an invalid sample as in LlamaGen's t2i dataset.
        (
            u("/img/skimage/multipage.tif"),
            None,
            "dropped",
            "below_image_size_64",
        ),
        (u("/img/pillow/hopper_orientation_6.jpg"), None, "ok", ""),
        // 100x100 px: stored at 64 px only.
        (
            u("/img/pillow/pil_sample_cmyk.jpg"),
            None,
            "ok",
            "below_image_size_128",
        ),
        (u("/img/pillow/hopper_16bit_qtables.jpg"), None, "ok", ""),
        (u("/status/404"), None, "failed", "http_404"),
        (u("/status/403"), None, "failed", "http_403"),
        (u("/status/500"), None, "failed", "http_5xx"),
        (u("/html"), None, "failed", "not_an_image"),
        (u("/corrupt"), None, "failed", "not_an_image"),
        (
            u("/truncated/skimage/rocket.jpg"),
            None,
            "failed",
            "truncated",
        ),
        (u("/reset"), None, "failed", "connection_reset"),
        (u("/slow-headers"), None, "failed", "timeout"),
        (u("/drip/skimage/retina.jpg"), None, "failed", "timeout"),
        (u("/redirect/3/matplotlib/grace_hopper.jpg"), None, "ok", ""),
        (
            u("/redirect/9/matplotlib/grace_hopper.jpg"),
            None,
            "failed",
            "too_many_redirects",
        ),
        (
            u("/redirect-to/http%3A%2F%2F169.254.169.254%2Flatest%2Fmeta-data"),
            None,
            "failed",
            "ssrf_refused",
        ),
        (u("/noai/pillow/flower.jpg"), None, "dropped", "robots_noai"),
        (u("/huge"), None, "failed", "too_large"),
        (u("/huge-header"), None, "failed", "header_too_large"),
        (
            u("/img/pillow/decompression_bomb.gif"),
            None,
            "failed",
            "decompression_bomb",
        ),
        (u("/flaky/f1/2/skimage/coffee.png"), None, "ok", ""),
        (u("/retry-after/r1/skimage/chelsea.png"), None, "ok", ""),
        (
            u("/img/pillow/hopper.jpg"),
            None,
            "dropped",
            "duplicate_url",
        ),
        (
            u("/img/pillow/hopper.jpg?copy=1"),
            None,
            "dropped",
            "duplicate_content",
        ),
        (
            "ftp://example.com/x.jpg".to_string(),
            None,
            "failed",
            "invalid_url",
        ),
        (
            u("/img/pillow/flower2.jpg"),
            Some(10),
            "dropped",
            "width<64",
        ),
        (
            u("/img/pillow/hopper.heif"),
            None,
            "failed",
            "unsupported_format",
        ),
        (u("/img/pillow/broken.png"), None, "failed", "decode_error"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.jsonl");
    write_list(
        &list,
        &cases.iter().map(|c| (c.0.clone(), c.1)).collect::<Vec<_>>(),
    );
    let root = dir.path().join("cat").display().to_string();
    let list_s = list.display().to_string();
    let mut args = base_args(&list_s, &root);
    args.extend([
        "--allow-cidr",
        "127.0.0.0/8",
        "--min-width",
        "64",
        "--unit-rows",
        "100",
    ]);
    let (code, out, err) = run(&args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("received") && out.contains(&cases.len().to_string()),
        "{out}"
    );

    let rows = rows_of(&root).await;
    assert_eq!(rows.len(), cases.len());
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for (row, (url, _, status, what)) in rows.iter().zip(&cases) {
        *by_status.entry(status.to_string()).or_default() += 1;
        assert_eq!(row["url"], url.as_str());
        assert_eq!(row["status"], *status, "{url}: {row}");
        match *status {
            "failed" => assert_eq!(row["error_kind"], *what, "{url}: {row}"),
            "dropped" => assert!(
                row["reject_reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == what),
                "{url}: {row}"
            ),
            _ if !what.is_empty() => {
                let images = row["images"].as_array().unwrap();
                assert_eq!(images.len(), 1, "{url}");
                assert_eq!(images[0]["size"], 64);
                assert_eq!(row["reject_reasons"], serde_json::json!([what]), "{url}");
            }
            _ => {
                let images = row["images"].as_array().unwrap();
                assert_eq!(images.len(), 2, "{url}");
                assert_eq!(images[0]["size"], 64);
                assert_eq!(images[1]["size"], 128);
                assert_eq!(row["http_status"], 200);
                assert_eq!(row["content_sha256"].as_str().unwrap().len(), 64);
            }
        }
        assert_eq!(row["extra"], "{\"LICENSE\":\"cc-by\"}");
    }
    // EXIF orientation 6 stores the picture rotated: the upright size swaps width and height.
    let rot = &rows[6];
    assert_eq!(
        (rot["orig_width"].as_i64(), rot["orig_height"].as_i64()),
        (Some(128), Some(128))
    );
    // Duplicates point at the first copy.
    for dup in [27, 28] {
        let of = rows[dup]["duplicate_of"].as_str().unwrap_or_default();
        assert!(
            of.ends_with("-0000000000"),
            "row {dup} is a duplicate of {of:?}, not of row 0"
        );
    }
    // The pre-filtered row was never fetched; flaky and rate-limited URLs were retried.
    let requests = server.requests();
    assert!(
        !requests.iter().any(|r| r.contains("flower2.jpg")),
        "{requests:?}"
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.starts_with("/flaky/f1/"))
            .count(),
        3
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.starts_with("/retry-after/r1/"))
            .count(),
        2
    );
    // A non-retryable status, or a response head too large to read, is asked for once.
    assert_eq!(requests.iter().filter(|r| *r == "/status/404").count(), 1);
    assert_eq!(requests.iter().filter(|r| *r == "/huge-header").count(), 1);
    assert_eq!(requests.iter().filter(|r| *r == "/status/500").count(), 3);

    // The stored images are real JPEGs of the right sizes.
    let (code, out, _) = run(&[
        "catalog",
        "sql",
        "SELECT count(*) AS n FROM samples WHERE status = 'ok' AND images[1]['format'] = 'jpeg' \
         AND images[2]['width'] = 128",
        "--root",
        &root,
        "--format",
        "csv",
    ])
    .await;
    assert_eq!(code, 0);
    // (every ok row but the 100 px one, which has no 128 px crop)
    assert_eq!(out, format!("n\n{}\n", by_status["ok"] - 1));

    // Running again does nothing new: every unit is committed.
    let (code, out, _) = run(&args).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("units already done               1") || out.contains("units already done"),
        "{out}"
    );
    assert_eq!(rows_of(&root).await.len(), cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_without_an_allow_list() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let port = server.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.jsonl");
    let urls = [
        server.url("/img/pillow/hopper.jpg"),
        format!("http://localhost:{port}/img/pillow/hopper.png"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.1.2.3/x.jpg".to_string(),
        format!("http://[::1]:{port}/img/pillow/hopper.png"),
    ];
    write_list(
        &list,
        &urls.iter().map(|u| (u.clone(), None)).collect::<Vec<_>>(),
    );
    let root = dir.path().join("cat").display().to_string();
    let list_s = list.display().to_string();
    let (code, _, err) = run(&base_args(&list_s, &root)).await;
    assert_eq!(code, 0, "{err}");
    let rows = rows_of(&root).await;
    for r in &rows {
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["error_kind"], "ssrf_refused", "{r}");
    }
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

/// SIGKILL at a random point, then a re-run: exactly the samples of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_resume_gives_the_uninterrupted_result() {
    let server =
        FaultServer::start(workspace().join("data/images"), Duration::from_millis(40)).await;
    let imgs = [
        "pillow/hopper.jpg",
        "pillow/hopper.png",
        "skimage/coffee.png",
        "skimage/chelsea.png",
        "matplotlib/grace_hopper.jpg",
        "skimage/rocket.jpg",
    ];
    let rows: Vec<(String, Option<i64>)> = (0..60)
        .map(|i| {
            let url = if i % 9 == 4 {
                server.url("/status/404")
            } else {
                server.url(&format!("/img/{}?n={i}", imgs[i % imgs.len()]))
            };
            (url, None)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.jsonl");
    write_list(&list, &rows);
    let list_s = list.display().to_string();
    let reference = dir.path().join("ref").display().to_string();
    let killed = dir.path().join("killed").display().to_string();
    let (ref_wds, killed_wds) = (format!("{reference}-wds"), format!("{killed}-wds"));
    let extra = [
        "--allow-cidr",
        "127.0.0.0/8",
        "--unit-rows",
        "10",
        "--concurrency",
        "4",
    ];

    let mut args = base_args(&list_s, &reference);
    args.extend(extra);
    args.extend(["--webdataset", &ref_wds]);
    assert_eq!(run(&args).await.0, 0);

    let mut args = base_args(&list_s, &killed);
    args.extend(extra);
    args.extend(["--webdataset", &killed_wds]);
    let log_dir = dir.path().join("killed/samples/_delta_log");
    let mut child = tokio::process::Command::new(llamagen())
        .args(&args)
        .spawn()
        .unwrap();
    // Kill once two units are committed, mid-way through the third.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Log entries: version 0 (the table) and one per committed unit.
        let n = std::fs::read_dir(&log_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0);
        if n >= 3 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().await.unwrap();
    let partial = rows_of(&killed).await.len();
    assert!(
        partial < 60 && partial % 10 == 0,
        "{partial} rows visible after the kill"
    );
    assert_eq!(run(&args).await.0, 0);

    let strip = |rows: Vec<Value>| -> Vec<Value> {
        rows.into_iter()
            .map(|mut r| {
                // Content and status must match; timestamps and http details may not.
                for k in ["images"] {
                    r.as_object_mut().unwrap().remove(k);
                }
                r
            })
            .collect()
    };
    let a = strip(rows_of(&reference).await);
    let b = strip(rows_of(&killed).await);
    assert_eq!(a.len(), 60);
    assert_eq!(a, b);

    // The webdataset tars of the killed-and-resumed run equal those of the uninterrupted one,
    // and hold exactly the catalog's ok samples.
    let (wa, wb) = (
        read_webdataset(&ref_wds, &[]),
        read_webdataset(&killed_wds, &[]),
    );
    assert_eq!(wa, wb);
    let ok = ok_keys(&reference).await;
    assert!(ok.len() >= 6, "{ok:?}");
    assert_eq!(wds_keys(&wa, 64), ok);
    assert_eq!(wds_keys(&wa, 128), ok);
}

/// The webdataset tars under `location`, read by Python's tarfile (tests/python/read_webdataset.py).
fn read_webdataset(location: &str, env: &[(&str, String)]) -> Value {
    let out = std::process::Command::new(llamagen_tests::python())
        .arg(workspace().join("tests/python/read_webdataset.py"))
        .arg(location)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Keys of the samples in the tars of one size, in shard and member order, after checking each
/// sample's three members (a JPEG, its caption, its json record).
fn wds_keys(wds: &Value, size: u32) -> Vec<String> {
    let mut keys = Vec::new();
    let prefix = format!("{size}/");
    let mut shards = 0;
    for (name, shard) in wds.as_object().unwrap() {
        if !name.starts_with(&prefix) {
            continue;
        }
        shards += 1;
        let members = shard["members"].as_array().unwrap();
        assert_eq!(members.len() % 3, 0, "{name}: {members:?}");
        for (i, triple) in members.chunks(3).enumerate() {
            let n = |j: usize| triple[j][0].as_str().unwrap().to_string();
            let key = n(0).strip_suffix(".jpg").expect("image first").to_string();
            assert_eq!(triple[0][2], "ffd8ffe0", "{name}: {} is not a JPEG", n(0));
            assert_eq!(n(1), format!("{key}.txt"));
            assert_eq!(n(2), format!("{key}.json"));
            let rec = &shard["json"][i];
            assert_eq!(rec["key"], key.as_str());
            assert_eq!(rec["caption"], shard["txt"][i]);
            assert!(
                rec["url"]
                    .as_str()
                    .unwrap()
                    .starts_with("http://127.0.0.1:")
            );
            assert!(rec["original_width"].as_i64().unwrap() > 0);
            assert_eq!(rec["sha256"].as_str().unwrap().len(), 64);
            keys.push(key);
        }
        assert_eq!(shard["stats"]["size"], size);
        assert_eq!(shard["stats"]["samples_in_tar"], members.len() / 3);
        assert_eq!(shard["stats"]["successes"], members.len() / 3);
    }
    assert!(shards > 0, "no tars of size {size}");
    keys
}

async fn ok_keys(root: &str) -> Vec<String> {
    sql_rows(
        root,
        "SELECT key FROM samples WHERE status = 'ok' ORDER BY source, source_row",
    )
    .await
    .iter()
    .map(|r| r["key"].as_str().unwrap().to_string())
    .collect()
}

/// A URL list on S3 (Parquet, uploaded to a real S3-compatible server), the catalog and the
/// webdataset tars on S3 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_input_catalog_and_webdataset() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let s3 = llamagen_tests::S3Server::start();
    s3.create_bucket("lists").await;
    s3.create_bucket("out").await;
    let imgs = [
        "camera.png",
        "chelsea.png",
        "coffee.png",
        "flower.jpg",
        "grace_hopper.jpg",
        "hopper.jpg",
        "hopper_gray.jpg",
        "rocket.jpg",
        "laion5b_clear_example.png",
        "laion5b_watermark_example.png",
        "img2dataset_resize_test_image_123_456.jpg",
        "img2dataset_resize_test_image_456_123.jpg",
    ];
    let dir = tempfile::tempdir().unwrap();
    // The list as Parquet with LAION-COCO's column names, written by pyarrow.
    let rows: Vec<Value> = (0..12)
        .map(|i| {
            let url = if i == 5 {
                server.url("/status/404")
            } else {
                server.url(&format!("/img/{}?n={i}", imgs[i % imgs.len()]))
            };
            serde_json::json!({"URL": url, "TEXT": format!("alt text {i}"), "WIDTH": 512.0, "HEIGHT": null})
        })
        .collect();
    let parquet = dir.path().join("part-00000.parquet");
    let script = format!(
        "import json, sys, pyarrow as pa, pyarrow.parquet as pq\n\
         rows = json.loads(sys.argv[1])\n\
         t = pa.table({{'URL': [r['URL'] for r in rows], 'TEXT': [r['TEXT'] for r in rows], \
         'WIDTH': pa.array([r['WIDTH'] for r in rows], pa.float64()), \
         'HEIGHT': pa.array([r['HEIGHT'] for r in rows], pa.float64())}})\n\
         pq.write_table(t, {:?})\n",
        parquet.display().to_string()
    );
    let st = std::process::Command::new(llamagen_tests::python())
        .args(["-c", &script, &serde_json::to_string(&rows).unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let lists =
        llamagen_catalog::storage::S3Storage::connect(llamagen_catalog::storage::S3Config {
            bucket: "lists".into(),
            ..s3.storage_options().s3
        })
        .await
        .unwrap();
    use llamagen_catalog::Storage;
    lists
        .put(
            "laion-coco/part-00000.parquet",
            std::fs::read(&parquet).unwrap().into(),
        )
        .await
        .unwrap();

    let env = s3.env();
    let mut args = base_args(
        "s3://lists/laion-coco/part-00000.parquet",
        "s3://out/catalog",
    );
    args.extend([
        "--allow-cidr",
        "127.0.0.0/8",
        "--unit-rows",
        "5",
        "--webdataset",
        "s3://out/wds",
    ]);
    let (code, out, err) = llamagen_tests::run_llamagen(&args, &env);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = llamagen_tests::run_llamagen(
        &[
            "catalog",
            "sql",
            "SELECT key, status, error_kind, source, text, width, reject_reasons FROM samples \
             ORDER BY source_row",
            "--root",
            "s3://out/catalog",
            "--format",
            "json",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let got: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 12);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["source"], "part-00000.parquet", "{r}");
        assert_eq!(r["text"], format!("alt text {i}"), "{r}");
        assert_eq!(r["width"], 512, "{r}");
        let want = if i == 5 { "failed" } else { "ok" };
        assert_eq!(r["status"], want, "{r}");
    }
    let ok: Vec<String> = got
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    let wds = read_webdataset("s3://out/wds", &env);
    // Three units of 5, 5 and 2 rows: three tars per size.
    assert_eq!(
        wds.as_object().unwrap().len(),
        6,
        "{:?}",
        wds.as_object().unwrap().keys()
    );
    assert_eq!(wds_keys(&wds, 64), ok);
    // The 123 px wide picture has no 128 px crop (LlamaGen's invalid sample at that size).
    let ok128: Vec<String> = got
        .iter()
        .filter(|r| r["status"] == "ok" && r["reject_reasons"].is_null())
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert!(ok128.len() < ok.len() && !ok128.is_empty(), "{ok128:?}");
    assert_eq!(wds_keys(&wds, 128), ok128);
    let second = &wds["64/part-00000.parquet-0000000005.tar"];
    assert_eq!(second["stats"]["count"], 5);
    assert_eq!(second["stats"]["successes"], 4);
    assert_eq!(
        second["stats"]["failed_by_kind"]["http_404"], 1,
        "{}",
        second["stats"]
    );
}

/// Wall time of one `llamagen ingest` run with `args`.
async fn timed_run(args: &[&str]) -> f64 {
    let t = std::time::Instant::now();
    let (code, out, err) = run(args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    t.elapsed().as_secs_f64()
}

/// Issue 21: a URL that never answers delays only itself. Eight such URLs spread through a unit
/// of 120 good images add one deadline (2 s) to the run, not one deadline each: downloads are
/// handled as they finish, not in input order (in input order they added about 16 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_urls_delay_only_themselves() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let imgs = [
        "pillow/hopper.jpg",
        "skimage/coffee.png",
        "skimage/chelsea.png",
    ];
    let good: Vec<String> = (0..120)
        .map(|i| server.url(&format!("/img/{}?n={i}", imgs[i % imgs.len()])))
        .collect();
    let mut with_hangs = Vec::new();
    for (i, u) in good.iter().enumerate() {
        if i % 15 == 0 {
            with_hangs.push(server.url(&format!("/hang?n={i}")));
        }
        with_hangs.push(u.clone());
    }
    assert_eq!(with_hangs.len(), 128);
    let dir = tempfile::tempdir().unwrap();
    let extra = [
        "--allow-cidr",
        "127.0.0.0/8",
        "--unit-rows",
        "1000",
        "--concurrency",
        "8",
        "--per-host",
        "16",
        "--retries",
        "0",
        "--timeout",
        "2",
    ];
    let mut times = Vec::new();
    for (name, urls) in [("good", &good), ("hangs", &with_hangs)] {
        let list = dir.path().join(format!("{name}.jsonl"));
        write_list(
            &list,
            &urls.iter().map(|u| (u.clone(), None)).collect::<Vec<_>>(),
        );
        let (list_s, root) = (
            list.display().to_string(),
            dir.path().join(name).display().to_string(),
        );
        let mut args = vec![
            "ingest",
            "--input",
            &list_s,
            "--root",
            &root,
            "--image-size",
            "64,128",
        ];
        args.extend(extra);
        times.push(timed_run(&args).await);
        let rows = sql_rows(
            &root,
            "SELECT status, error_kind, count(*) AS n FROM samples GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .await;
        let count = |status: &str, kind: Option<&str>| {
            rows.iter()
                .find(|r| r["status"] == status && r["error_kind"].as_str() == kind)
                .map_or(0, |r| r["n"].as_i64().unwrap())
        };
        // Every good row came through (the same picture under new URLs is a content duplicate).
        assert_eq!(count("ok", None) + count("dropped", None), 120, "{rows:?}");
        assert_eq!(count("ok", None), 3, "{rows:?}");
        if name == "hangs" {
            assert_eq!(count("failed", Some("timeout")), 8, "{rows:?}");
        }
    }
    let added = times[1] - times[0];
    eprintln!(
        "without hangs {:.2} s, with 8 hangs {:.2} s",
        times[0], times[1]
    );
    assert!(
        added < 7.0,
        "8 never-answering URLs added {added:.1} s to a {:.1} s run (one 2 s deadline expected)",
        times[0]
    );
}

/// Peak resident memory of a child process, sampled from /proc while it runs (MB).
async fn peak_rss_mb(args: &[&str]) -> (i32, f64, String) {
    let mut child = tokio::process::Command::new(llamagen())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id().unwrap());
    let mut peak = 0f64;
    let out = loop {
        if let Ok(s) = std::fs::read_to_string(&status) {
            for l in s.lines() {
                if let Some(v) = l.strip_prefix("VmHWM:") {
                    let kb: f64 = v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse()
                        .unwrap_or(0.0);
                    peak = peak.max(kb / 1024.0);
                }
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    (out.code().unwrap_or(-1), peak, err)
}

/// Issue 22: bodies in memory are bounded by `--max-inflight-mib`, not by
/// `--concurrency × --max-bytes` (48 endless bodies with an 8 MiB limit held about 400 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_memory_is_bounded_by_the_inflight_budget() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let urls: Vec<(String, Option<i64>)> = (0..48)
        .map(|i| (server.url(&format!("/endless?n={i}")), None))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("endless.jsonl");
    write_list(&list, &urls);
    let root = dir.path().join("cat").display().to_string();
    let list_s = list.display().to_string();
    let args = [
        "ingest",
        "--input",
        &list_s,
        "--root",
        &root,
        "--allow-cidr",
        "127.0.0.0/8",
        "--concurrency",
        "48",
        "--per-host",
        "48",
        "--retries",
        "0",
        "--timeout",
        "8",
        "--max-bytes",
        &(8u64 << 20).to_string(),
        "--max-inflight-mib",
        "16",
    ];
    let (code, peak, err) = peak_rss_mb(&args).await;
    assert_eq!(code, 0, "{err}");
    let rows = sql_rows(
        &root,
        "SELECT error_kind, count(*) AS n FROM samples GROUP BY 1",
    )
    .await;
    let n: i64 = rows.iter().map(|r| r["n"].as_i64().unwrap()).sum();
    assert_eq!(n, 48, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["error_kind"] == "too_large" || r["error_kind"] == "timeout"),
        "{rows:?}"
    );
    assert!(
        peak < 250.0,
        "peak RSS {peak:.0} MB with a 16 MiB in-flight budget (48 × 8 MiB = 384 MiB unbounded)"
    );
}

/// Issue 23: member names over 100 bytes were a hard error of the hand-written ustar writer.
/// Samples with 150-byte keys go into a unit's tars and come back whole through Python's tarfile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webdataset_tars_hold_long_keys() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("wds").display().to_string();
    let storage = llamagen_catalog::storage::open(&loc, &Default::default())
        .await
        .unwrap();
    let mut tars =
        llamagen_ingest::webdataset::UnitTars::create(storage, "ingest:list.jsonl:0", &[64])
            .unwrap();
    let jpeg = std::fs::read(workspace().join("data/images/pillow/hopper.jpg")).unwrap();
    let keys: Vec<String> = (0..3).map(|i| format!("{i}-{}", "k".repeat(150))).collect();
    for k in &keys {
        let json = serde_json::json!({"key": k, "caption": "c", "url": "http://127.0.0.1:1/x",
            "original_width": 1, "sha256": "0".repeat(64)});
        tars.add(k, &[(64, &jpeg)], "c", &json, 1_700_000_000)
            .unwrap();
    }
    tars.finish(&serde_json::json!({"successes": 3}))
        .await
        .unwrap();
    let wds = read_webdataset(&loc, &[]);
    let shard = &wds["64/list.jsonl-0000000000.tar"];
    let names: Vec<&str> = shard["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    let expected: Vec<String> = keys
        .iter()
        .flat_map(|k| [format!("{k}.jpg"), format!("{k}.txt"), format!("{k}.json")])
        .collect();
    assert_eq!(names, expected);
    assert_eq!(shard["members"][0][1], jpeg.len());
    assert_eq!(shard["json"][2]["key"], keys[2].as_str());
}

/// `--upscale-small-images` keeps a 10x15 px picture at every size (the default drops it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_images_upscale_on_request() {
    let server = FaultServer::start(workspace().join("data/images"), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("small.jsonl");
    write_list(&list, &[(server.url("/img/skimage/multipage.tif"), None)]);
    let list_s = list.display().to_string();
    for (name, flag) in [
        ("default", None),
        ("upscaled", Some("--upscale-small-images")),
    ] {
        let root = dir.path().join(name).display().to_string();
        let mut args = base_args(&list_s, &root);
        args.extend(["--allow-cidr", "127.0.0.0/8"]);
        args.extend(flag);
        let (code, out, err) = run(&args).await;
        assert_eq!(code, 0, "{out}\n{err}");
        let rows = rows_of(&root).await;
        let sizes: Vec<i64> = rows[0]["images"]
            .as_array()
            .map(|a| a.iter().map(|i| i["size"].as_i64().unwrap()).collect())
            .unwrap_or_default();
        match flag {
            None => {
                assert_eq!(rows[0]["status"], "dropped", "{}", rows[0]);
                assert_eq!(
                    rows[0]["reject_reasons"],
                    serde_json::json!(["below_image_size_64", "below_image_size_128"])
                );
                assert!(sizes.is_empty());
            }
            Some(_) => {
                assert_eq!(rows[0]["status"], "ok", "{}", rows[0]);
                assert_eq!(sizes, vec![64, 128]);
            }
        }
    }
}
