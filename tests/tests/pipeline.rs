//! `llamagen pipeline run` end to end: real HTTP server on 127.0.0.1 serving bundled real images,
//! the real ONNX Runtime with the stand-in filter models, the stand-in T5 and a random VQ, to a
//! local folder and to a real S3-compatible server; SIGKILL and resume; two runs contending for
//! the lease; partitioned worker processes producing the same dataset as one worker.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llamagen_tests::http::FaultServer;
use llamagen_tests::{S3Server, llamagen, workspace};
use serde_json::Value;

/// Bundled images: a mix of good ones and broken ones (truncated, AVIF, a decompression bomb).
fn images() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace().join("data/images_manifest.jsonl")).unwrap();
    let all: Vec<String> = manifest
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["relpath"]
                .as_str()
                .unwrap()
                .trim_start_matches("images/")
                .to_string()
        })
        .collect();
    // Every fourth image: 27 of the 107, spread over every source directory.
    all.into_iter().step_by(4).collect()
}

fn write_list(path: &Path, server: &FaultServer) -> usize {
    let mut text = String::new();
    let imgs = images();
    for (i, rel) in imgs.iter().enumerate() {
        let url = server.url(&format!(
            "/img/{}",
            rel.replace(' ', "%20")
                .replace('[', "%5B")
                .replace(']', "%5D")
        ));
        let o =
            serde_json::json!({"URL": url, "TEXT": format!("Picture number {i}. It shows {rel}.")});
        text.push_str(&o.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
    imgs.len()
}

const VQ_TINY: &str = r#"{"codebook_size": 64, "codebook_embed_dim": 8, "codebook_l2_norm": true,
  "codebook_show_usage": true, "commit_loss_beta": 0.25, "entropy_loss_ratio": 0.0,
  "encoder_ch_mult": [1, 1, 2, 2, 4], "decoder_ch_mult": [1, 1, 2, 2, 4], "z_channels": 32,
  "dropout_p": 0.0, "ch": 32, "num_res_blocks": 1}"#;

/// A config in `dir` with the stand-in models, 64 px images and 4-row units.
fn write_config(dir: &Path, root: &str, list: &Path, extra: &str) -> PathBuf {
    let ws = workspace();
    let m = ws.join("filters/tests/models");
    let t5 = ws.join("encode/tests/fixtures/t5");
    std::fs::write(dir.join("vq_tiny.json"), VQ_TINY).unwrap();
    let text = format!(
        r#"
[output]
root = "{root}"

[input]
files = ["{list}"]

[ingest]
image_sizes = [64]
format = "png"
unit_rows = 4
timeout_s = 10
retries = 1
allow_cidrs = ["127.0.0.0/8"]

[filters]
clip_image = "{m}/clip_b32_image.onnx"
clip_text = "{m}/clip_b32_text.onnx"
clip_l14_image = "{m}/clip_l14_image.onnx"
watermark = "{m}/watermark.onnx"
intra_threads = 1

[filters.thresholds.min_side]
min = 32

[captions]
fallback = ["text"]

[t5]
model = "{t5}/gated"
tokenizer = "{t5}/tokenizer.json"

[vq]
checkpoint = "vq_tiny.safetensors"
standin_seed = 3
model = "vq_tiny.json"
views = [{{ kind = "center", image_size = 64 }}]

{extra}
"#,
        list = list.display(),
        m = m.display(),
        t5 = t5.display(),
    );
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).unwrap();
    p
}

async fn llamagen_run(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = tokio::process::Command::new(llamagen())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every sample's final state, by key, as JSON lines.
async fn dataset(root: &str, env: &[(&str, String)]) -> Vec<Value> {
    let (code, out, err) = llamagen_run(
        &[
            "catalog",
            "sql",
            "--root",
            root,
            "--format",
            "json",
            "SELECT key, status, error_kind, reject_reasons, short_caption, caption_source, \
             vq_codes, t5_long['tokens'] AS t5_tokens, score_clip_similarity IS NOT NULL AS scored \
             FROM samples ORDER BY key",
        ],
        env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn report(stderr_path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(stderr_path).unwrap()).unwrap()
}

async fn serve() -> FaultServer {
    FaultServer::start(workspace().join("data/images"), Duration::ZERO).await
}

fn check_complete(rows: &[Value], n: usize) {
    assert_eq!(
        rows.len(),
        n,
        "every input row is in the dataset exactly once"
    );
    let ok: Vec<&Value> = rows.iter().filter(|r| r["status"] == "ok").collect();
    assert!(ok.len() >= n / 2, "{} of {n} ok", ok.len());
    for r in &ok {
        let codes = r["vq_codes"].as_array().expect("ok rows have codes");
        assert_eq!(codes.len(), 1);
        assert_eq!(codes[0]["grid"], 4);
        assert_eq!(codes[0]["codes"].as_array().unwrap().len(), 16);
        assert!(r["t5_tokens"].as_i64().unwrap() > 0, "{r}");
        assert_eq!(r["scored"], true);
        assert!(
            r["short_caption"]
                .as_str()
                .unwrap()
                .starts_with("Picture number"),
            "{r}"
        );
        assert!(
            !r["short_caption"].as_str().unwrap().contains("It shows"),
            "{r}"
        );
    }
    assert!(
        rows.iter().any(|r| r["status"] == "failed"),
        "broken images are recorded as failed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_to_a_local_folder_then_rerun_does_nothing() {
    let server = serve().await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    let n = write_list(&list, &server);
    let root = d.path().join("out").display().to_string();
    let cfg = write_config(d.path(), &root, &list, "");
    let (code, _, err) = llamagen_run(&["pipeline", "check", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let rep = d.path().join("r1.json");
    let (code, _, err) = llamagen_run(
        &[
            "pipeline",
            "run",
            cfg.to_str().unwrap(),
            "--report-json",
            rep.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let r1 = report(&rep);
    assert_eq!(r1["status"], "succeeded");
    let stages: Vec<&str> = r1["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages[0], "ingest");
    assert!(stages.iter().any(|s| s.starts_with("filters-score-")));
    assert!(stages.iter().any(|s| s.starts_with("filters-apply-")));
    assert!(stages.contains(&"captions") && stages.contains(&"t5"));
    assert!(stages.iter().any(|s| s.starts_with("vq-")));
    let html = std::fs::read_to_string(r1["report_html"].as_str().unwrap()).unwrap();
    assert!(html.contains("Score histograms") && html.contains("data:image/jpeg;base64,"));
    assert!(html.contains("<svg"), "a score histogram is drawn");
    let first = dataset(&root, &[]).await;
    check_complete(&first, n);

    // A second run finds every unit and every shard stage done.
    let rep2 = d.path().join("r2.json");
    let (code, _, err) = llamagen_run(
        &[
            "pipeline",
            "run",
            cfg.to_str().unwrap(),
            "--report-json",
            rep2.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let r2 = report(&rep2);
    for s in r2["stages"].as_array().unwrap() {
        assert_eq!(s["shards_rewritten"], 0, "{s}");
    }
    assert_eq!(r2["dataset_version"], r1["dataset_version"]);
    assert_eq!(dataset(&root, &[]).await, first);

    // The runs table records both.
    let (code, out, err) = llamagen_run(
        &["catalog", "sql", "--root", &root, "--format", "csv",
          "SELECT count(*) AS n FROM runs WHERE status = 'succeeded' AND command LIKE '%pipeline run%'"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().nth(1).unwrap().trim() == "2", "{out}");

    // Export to the official LlamaGen layout; numpy reads it back.
    let exp = d.path().join("llamagen_layout");
    let (code, out, err) = llamagen_run(
        &[
            "export",
            "llamagen",
            "--root",
            &root,
            "--out",
            exp.to_str().unwrap(),
            "--image-size",
            "64",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("exported"), "{out}");
    let ok = first.iter().filter(|r| r["status"] == "ok").count();
    let check = std::process::Command::new(llamagen_tests::python())
        .arg("-c")
        .arg(
            "import json, sys, numpy as np, os\n\
             d = sys.argv[1]\n\
             lines = [json.loads(l) for l in open(os.path.join(d, 'captions.jsonl'))]\n\
             for l in lines:\n\
             \x20   c = np.load(os.path.join(d, 'codes64', l['code_name'] + '.npy'))\n\
             \x20   assert c.dtype == np.int64 and c.shape == (1, 16), c.shape\n\
             \x20   t = np.load(os.path.join(d, 't5_long', l['code_name'] + '.npy'))\n\
             \x20   assert t.dtype == np.float32 and t.ndim == 3 and t.shape[0] == 1 and t.shape[2] == 64, t.shape\n\
             \x20   assert os.path.exists(os.path.join(d, l['image_path']))\n\
             \x20   assert len(l['text']) == 2\n\
             print(len(lines))",
        )
        .arg(&exp)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        ok.to_string()
    );

    // The code grids decode back to images through the same VQ.
    let key = first.iter().find(|r| r["status"] == "ok").unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let png = d.path().join("decoded.png");
    let (code, out, err) = llamagen_run(
        &[
            "tokenizer",
            "reconstruct",
            "--checkpoint",
            d.path().join("vq_tiny.safetensors").to_str().unwrap(),
            "--model",
            d.path().join("vq_tiny.json").to_str().unwrap(),
            "--catalog",
            &root,
            "--keys",
            &key,
            "--image-size",
            "64",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"decoded\": 1"), "{out}");
    // torchvision's make_grid returns a single image unpadded.
    assert_eq!(image::image_dimensions(&png).unwrap(), (64, 64));

    // Prompts in, images out: a t2i GPT trained one step on these shards samples the same
    // tokens from a typed prompt (encoded by the same T5 at sampling time) as from the stored
    // features of the sample whose long caption it is.
    let run = d.path().join("t2i");
    let train_cfg = d.path().join("t2i.toml");
    std::fs::write(
        &train_cfg,
        format!(
            "[model]\ntype = \"t2i\"\ndim = 32\nn_layer = 1\nn_head = 2\nimage_size = 64\n\
             vq_downsample = 16\nvocab_size = 64\ncaption_dim = 64\ncls_token_num = 120\n\
             [data]\nroot = \"{root}\"\n[train]\nsteps = 1\nbatch_size = 2\n\
             [output]\ndir = \"{}\"\nprogress = false\n",
            run.display()
        ),
    )
    .unwrap();
    let (code, _, err) =
        llamagen_run(&["train", "--config", train_cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = llamagen_run(
        &[
            "catalog",
            "sql",
            "--root",
            &root,
            "--format",
            "json",
            &format!("SELECT long_caption FROM samples WHERE key = '{key}'"),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let row: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let caption = row["long_caption"].as_str().unwrap().to_string();
    let t5 = llamagen_tests::workspace().join("encode/tests/fixtures/t5");
    let ck = run.join("checkpoints/0000001");
    let vq = d.path().join("vq_tiny.safetensors");
    let vq_args = d.path().join("vq_tiny.json");
    let sample = |how: Vec<String>, tag: &str| {
        let mut a: Vec<String> = [
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--vq",
            vq.to_str().unwrap(),
            "--vq-args",
            vq_args.to_str().unwrap(),
            "--seed",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(how);
        for (flag, ext) in [("--tokens-out", "json"), ("--out", "png"), ("--npz", "npz")] {
            a.push(flag.into());
            a.push(d.path().join(format!("{tag}.{ext}")).display().to_string());
        }
        a
    };
    let from_catalog = sample(
        vec![
            "--catalog".into(),
            root.clone(),
            "--keys".into(),
            key.clone(),
        ],
        "catalog",
    );
    let from_prompt = sample(
        vec![
            "--t5".into(),
            t5.join("gated").display().to_string(),
            "--t5-tokenizer".into(),
            t5.join("tokenizer.json").display().to_string(),
            "--prompt".into(),
            caption.clone(),
        ],
        "prompt",
    );
    for a in [&from_catalog, &from_prompt] {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, _, err) = llamagen_run(&a, &[]).await;
        assert_eq!(code, 0, "{err}");
        // The official t2i defaults apply.
        assert!(err.contains("cfg scale 7.5, top-k 1000"), "{err}");
    }
    let tokens = |tag: &str| std::fs::read_to_string(d.path().join(format!("{tag}.json"))).unwrap();
    assert_eq!(tokens("catalog"), tokens("prompt"), "prompt {caption:?}");
    // The features themselves: the prompt's, written by `sample --features-out`, are the bytes
    // `export llamagen` wrote for the sample's stored t5_long.
    let feats = d.path().join("prompt_features");
    let mut with_out = from_prompt.clone();
    with_out.extend(["--features-out".to_string(), feats.display().to_string()]);
    let with_out: Vec<&str> = with_out.iter().map(String::as_str).collect();
    let (code, _, err) = llamagen_run(&with_out, &[]).await;
    assert_eq!(code, 0, "{err}");
    let stored = std::fs::read(exp.join("t5_long").join(format!("{key}.npy"))).unwrap();
    let typed = std::fs::read(feats.join("0.npy")).unwrap();
    assert!(stored.len() > 1000, "{} bytes", stored.len());
    assert_eq!(stored, typed, "features of {caption:?}");
    // The ADM sample batch: arr_0, uint8, 1 x 64 x 64 x 3, the PNG's pixels.
    let raw = d.path().join("prompt.raw");
    let check = std::process::Command::new(llamagen_tests::python())
        .arg("-c")
        .arg(
            "import sys, numpy as np\n\
             a = np.load(sys.argv[1])['arr_0']\n\
             assert a.dtype == np.uint8 and a.shape == (1, 64, 64, 3), (a.dtype, a.shape)\n\
             a[0].tofile(sys.argv[2])",
        )
        .arg(d.path().join("prompt.npz"))
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let npz = std::fs::read(&raw).unwrap();
    let png = image::open(d.path().join("prompt.png")).unwrap().to_rgb8();
    assert_eq!(npz.len(), png.as_raw().len());
    // The grid rounds (+0.5) where the evaluator's batch truncates: at most one level apart.
    let diff = npz
        .iter()
        .zip(png.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(diff <= 1, "npz and PNG differ by {diff}");
    // A prompt that cleans to nothing is refused, naming it.
    let mut empty = from_prompt.clone();
    let last = empty.iter().rposition(|a| a == "--prompt").unwrap();
    empty[last + 1] = "   ".into();
    let empty: Vec<&str> = empty.iter().map(String::as_str).collect();
    let (code, _, err) = llamagen_run(&empty, &[]).await;
    assert_ne!(code, 0);
    assert!(err.contains("--prompt 1") && err.contains("empty"), "{err}");

    // Config errors exit 2 and name the key.
    std::fs::write(
        d.path().join("bad.toml"),
        "[output]\nroot = \"x\"\n[input]\nfiles = [\"a\"]\n[ingest]\nimage_sizez = [1]\n",
    )
    .unwrap();
    let (code, _, err) = llamagen_run(
        &[
            "pipeline",
            "run",
            d.path().join("bad.toml").to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("image_sizez"), "{err}");
}

/// Commits made after the table was created (its log entries past version 0).
async fn manifest_versions(root: &Path) -> usize {
    std::fs::read_dir(root.join("samples/_delta_log"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
        .saturating_sub(1)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_then_rerun_gives_the_same_dataset() {
    let server = serve().await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    let n = write_list(&list, &server);
    // Reference: one uninterrupted run.
    let ref_root = d.path().join("ref").display().to_string();
    let ref_dir = d.path().join("refcfg");
    std::fs::create_dir_all(&ref_dir).unwrap();
    let cfg = write_config(&ref_dir, &ref_root, &list, "");
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let reference = dataset(&ref_root, &[]).await;

    // Killed runs: at increasing points (after 2, 9 and 16 commits), then a final run.
    let root_path = d.path().join("killed");
    let root = root_path.display().to_string();
    let cfg = write_config(d.path(), &root, &list, "");
    for kill_after in [2usize, 9, 16] {
        let mut child = tokio::process::Command::new(llamagen())
            .args(["pipeline", "run", cfg.to_str().unwrap()])
            // A commit per shard, so the kill points fall between as many commits as possible.
            .env("LLAMAGEN_COMMIT_SHARDS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            if manifest_versions(&root_path).await >= kill_after {
                break;
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "run did not progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.start_kill().unwrap(); // SIGKILL
        let _ = child.wait().await;
    }
    // The killed run's lease names a dead process on this host: the re-run takes it over.
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let resumed = dataset(&root, &[]).await;
    check_complete(&resumed, n);
    assert_eq!(
        resumed, reference,
        "resumed dataset differs from an uninterrupted run"
    );
    let (code, out, err) = llamagen_run(&["catalog", "verify", "--root", &root], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_run_is_refused_while_the_first_holds_the_lease() {
    // A slow server keeps the first run busy.
    let server =
        FaultServer::start(workspace().join("data/images"), Duration::from_millis(400)).await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    write_list(&list, &server);
    let root_path = d.path().join("out");
    let root = root_path.display().to_string();
    let cfg = write_config(d.path(), &root, &list, "");
    let first = tokio::process::Command::new(llamagen())
        .args(["pipeline", "run", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !root_path.join("_leases").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "first run took no lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(
        code, 75,
        "second run while the first holds the lease: {err}"
    );
    assert!(err.contains("held by"), "{err}");
    let out = first.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Released: a third run starts (and finds nothing to do).
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_workers_produce_the_dataset_of_one_worker() {
    let server = serve().await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    let n = write_list(&list, &server);
    let one = d.path().join("one").display().to_string();
    let one_dir = d.path().join("onecfg");
    std::fs::create_dir_all(&one_dir).unwrap();
    let cfg1 = write_config(&one_dir, &one, &list, "");
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg1.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");

    let many = d.path().join("many").display().to_string();
    let cfg = write_config(d.path(), &many, &list, "");
    let c = cfg.to_str().unwrap().to_string();
    // Three workers as separate processes at once: one by flag, two as a Kubernetes Indexed Job.
    let (a0, a1) = (
        ["pipeline", "run", &c, "--worker", "0/3"],
        ["pipeline", "run", &c],
    );
    let (e1, e2) = (
        [
            ("JOB_COMPLETION_INDEX", "1".to_string()),
            ("WORKERS", "3".to_string()),
        ],
        [
            ("JOB_COMPLETION_INDEX", "2".to_string()),
            ("WORKERS", "3".to_string()),
        ],
    );
    let w0 = llamagen_run(&a0, &[]);
    let w1 = llamagen_run(&a1, &e1);
    let w2 = llamagen_run(&a1, &e2);
    let (a, b, e) = tokio::join!(w0, w1, w2);
    for (code, _, err) in [a, b, e] {
        assert_eq!(code, 0, "{err}");
    }
    let many_rows = dataset(&many, &[]).await;
    check_complete(&many_rows, n);
    assert_eq!(many_rows, dataset(&one, &[]).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_to_s3_matches_the_local_run() {
    let server = serve().await;
    let s3 = S3Server::start();
    s3.create_bucket("ready").await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    let n = write_list(&list, &server);
    let local = d.path().join("local").display().to_string();
    let ldir = d.path().join("lcfg");
    std::fs::create_dir_all(&ldir).unwrap();
    let cfg = write_config(&ldir, &local, &list, "");
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let cfg = write_config(d.path(), "s3://ready/shards", &list, "");
    let env = s3.env();
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &env).await;
    assert_eq!(code, 0, "{err}");
    let on_s3 = dataset("s3://ready/shards", &env).await;
    check_complete(&on_s3, n);
    assert_eq!(on_s3, dataset(&local, &[]).await);
    // The lease and the run report live next to the data.
    let (code, out, err) = llamagen_run(
        &[
            "catalog",
            "sql",
            "--root",
            "s3://ready/shards",
            "--format",
            "csv",
            "SELECT status FROM runs",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_server_stopped_during_a_run_then_a_rerun_completes() {
    // Slow downloads keep the run busy while the S3 server goes away.
    let server =
        FaultServer::start(workspace().join("data/images"), Duration::from_millis(300)).await;
    let mut s3 = S3Server::start();
    s3.create_bucket("ready").await;
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.jsonl");
    let n = write_list(&list, &server);
    let local = d.path().join("local").display().to_string();
    let ldir = d.path().join("lcfg");
    std::fs::create_dir_all(&ldir).unwrap();
    let cfg = write_config(&ldir, &local, &list, "");
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &[]).await;
    assert_eq!(code, 0, "{err}");
    let reference = dataset(&local, &[]).await;

    let cfg = write_config(d.path(), "s3://ready/shards", &list, "");
    let env = s3.env();
    let child = tokio::process::Command::new(llamagen())
        .args(["pipeline", "run", cfg.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s3.stop();
    let t = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(420), child.wait_with_output())
        .await
        .expect("the run neither finished nor gave up while S3 was down")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "the run cannot succeed without its store: {err}"
    );
    eprintln!(
        "run gave up {:.1} s after the store went away",
        t.elapsed().as_secs_f64()
    );
    // The server comes back (moto keeps no state across restarts: the bucket is recreated empty),
    // and a re-run writes the whole dataset.
    let s3 = S3Server::start_on(s3.port);
    s3.create_bucket("ready").await;
    let (code, _, err) = llamagen_run(&["pipeline", "run", cfg.to_str().unwrap()], &env).await;
    assert_eq!(code, 0, "{err}");
    let on_s3 = dataset("s3://ready/shards", &env).await;
    check_complete(&on_s3, n);
    assert_eq!(on_s3, reference);
}

#[tokio::test(flavor = "multi_thread")]
async fn incremental_runs_take_only_new_lists() {
    let server = serve().await;
    let d = tempfile::tempdir().unwrap();
    let lists = d.path().join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    let a = lists.join("a.jsonl");
    let n = write_list(&a, &server);
    let root = d.path().join("out").display().to_string();
    let cfg = write_config(d.path(), &root, &lists, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[input]\n", "[input]\nincremental = true\n");
    std::fs::write(&cfg, text).unwrap();
    let rep = d.path().join("r1.json");
    let (code, _, err) = llamagen_run(
        &[
            "pipeline",
            "run",
            cfg.to_str().unwrap(),
            "--report-json",
            rep.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(report(&rep)["inputs"].as_array().unwrap().len(), 1);
    // A new list arrives in the folder; the next scheduled run reads only it.
    let b = lists.join("b.jsonl");
    let text = std::fs::read_to_string(&a).unwrap();
    std::fs::write(
        &b,
        text.lines().take(5).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    let rep = d.path().join("r2.json");
    let (code, _, err) = llamagen_run(
        &[
            "pipeline",
            "run",
            cfg.to_str().unwrap(),
            "--report-json",
            rep.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let r2 = report(&rep);
    assert_eq!(r2["inputs"], serde_json::json!([b.display().to_string()]));
    assert_eq!(
        r2["inputs_skipped_incremental"],
        serde_json::json!([a.display().to_string()])
    );
    let rows = dataset(&root, &[]).await;
    assert_eq!(rows.len(), n + 5);
}
