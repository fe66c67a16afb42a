//! `llamagen serve` (the real binary, on 127.0.0.1) driven by a real HTTP client: images served
//! under concurrent load have the codes of `llamagen sample --per-image-seeds` run offline with
//! the same seeds; limits (429, field-named 400s, 406); a client that disconnects frees its
//! slots; SIGTERM answers the requests in flight, then exits.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

/// A tiny c2i GPT (random weights, class dropout so CFG has its null class) whose 16x16 codes
/// the reference set's VQ (codebook 64 x 8, downsampling 4) decodes into 64x64 images.
fn tiny_c2i(dir: &Path, dim: usize, n_layer: usize) -> (PathBuf, PathBuf) {
    let model = format!(
        "type = \"c2i\"\ndim = {dim}\nn_layer = {n_layer}\nn_head = 2\nimage_size = 256\nvocab_size = 64\nnum_classes = 10\nclass_dropout_prob = 0.1"
    );
    let w = llamagen_serve::random_checkpoint(dir, &model, 7, 0.3).unwrap();
    (w, dir.join("run.toml"))
}

fn vq() -> PathBuf {
    llamagen_tests::workspace().join("data/parity/vq_weights.safetensors")
}

struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(weights: &Path, config: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(llamagen_tests::llamagen())
            .args(["serve", "--checkpoint"])
            .arg(weights)
            .arg("--config")
            .arg(config)
            .arg("--vq")
            .arg(vq())
            .args(["--vq-args", "reduced", "--addr", "127.0.0.1:0"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[serve] {line}");
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.to_string());
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the server did not start: {}", log.lock().unwrap()));
        Server { child, base, log }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

async fn post(c: &reqwest::Client, s: &Server, body: Value) -> (u16, Value) {
    let r = c
        .post(s.url("/v1/generate"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (
        st,
        r.bytes()
            .await
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
            .unwrap_or(Value::Null),
    )
}

async fn metric(c: &reqwest::Client, s: &Server, name: &str) -> f64 {
    let text = c
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Offline `llamagen sample --per-image-seeds` tokens of `n` images of `label`.
fn offline_tokens(
    w: &Path,
    cfg: &Path,
    label: u32,
    n: usize,
    req: &Value,
    out: &Path,
) -> Vec<Vec<u32>> {
    let toks = out.with_extension("json");
    let labels = vec![label.to_string(); n].join(",");
    let mut args: Vec<String> = vec![
        "sample".into(),
        "--checkpoint".into(),
        w.display().to_string(),
        "--config".into(),
        cfg.display().to_string(),
        "--vq".into(),
        vq().display().to_string(),
        "--vq-args".into(),
        "reduced".into(),
        "--labels".into(),
        labels,
        "--per-image-seeds".into(),
        "--batch-size".into(),
        "2".into(),
        "--out".into(),
        out.display().to_string(),
        "--tokens-out".into(),
        toks.display().to_string(),
    ];
    for (k, flag) in [
        ("cfg_scale", "--cfg-scale"),
        ("cfg_interval", "--cfg-interval"),
        ("temperature", "--temperature"),
        ("top_k", "--top-k"),
        ("top_p", "--top-p"),
        ("seed", "--seed"),
    ] {
        if let Some(v) = req.get(k) {
            args.push(flag.into());
            args.push(v.to_string());
        }
    }
    let o = Command::new(llamagen_tests::llamagen())
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(&toks).unwrap()).unwrap()
}

#[test]
fn served_codes_equal_offline_sampling_under_concurrent_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, cfg) = tiny_c2i(&tmp.path().join("m"), 32, 2);
    let server = Server::start(&w, &cfg, &["--max-sequences", "6", "--max-images", "3"]);
    let requests = vec![
        json!({"class_label": 1, "seed": 11, "n": 2, "cfg_scale": 2.0, "top_k": 20, "top_p": 0.9, "temperature": 0.8}),
        json!({"class_label": 4, "seed": 12, "cfg_scale": 1.0}),
        json!({"class_label": 4, "seed": 13, "n": 3, "cfg_scale": 3.0, "cfg_interval": 40}),
        json!({"class_label": 9, "seed": 14, "n": 2, "top_k": 0, "cfg_scale": 1.5}),
        json!({"class_label": 1, "seed": 11, "n": 1, "cfg_scale": 2.0, "top_k": 20, "top_p": 0.9, "temperature": 0.8}),
        json!({"class_label": 0, "seed": 15, "n": 3}),
        json!({"class_label": 7, "seed": 16, "n": 2, "temperature": 1.3, "cfg_scale": 4.0}),
        json!({"class_label": 2, "seed": 17}),
    ];
    let rt = rt();
    let c = client();
    let t0 = Instant::now();
    // All at once (8 requests, 16 images, 6 slots): they queue, join and leave mid-way.
    let served: Vec<(u16, Value)> = rt.block_on(async {
        let handles: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (c, u, r) = (c.clone(), server.url("/v1/generate"), r.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
                    let resp = c
                        .post(u)
                        .header("content-type", "application/json")
                        .body(serde_json::to_vec(&r).unwrap())
                        .send()
                        .await
                        .unwrap();
                    (
                        resp.status().as_u16(),
                        resp.bytes()
                            .await
                            .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
                            .unwrap(),
                    )
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    eprintln!("served {} requests in {:?}", served.len(), t0.elapsed());
    for ((st, v), r) in served.iter().zip(&requests) {
        assert_eq!(*st, 200, "{r} -> {v}");
        let n = r.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
        let images = v["images"].as_array().unwrap();
        assert_eq!(images.len(), n);
        for img in images {
            let png = base64::engine::general_purpose::STANDARD
                .decode(img["png_base64"].as_str().unwrap())
                .unwrap();
            let im = image::load_from_memory(&png).unwrap();
            assert_eq!((im.width(), im.height()), (64, 64));
        }
    }
    // The same request twice (requests 0 and 4) gives the same first image.
    assert_eq!(
        served[0].1["images"][0]["tokens"],
        served[4].1["images"][0]["tokens"]
    );
    // Every image equals the offline sampler's with the same seed.
    for (i, ((_, v), r)) in served.iter().zip(&requests).enumerate() {
        let n = r.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
        let label = r["class_label"].as_u64().unwrap() as u32;
        let offline = offline_tokens(&w, &cfg, label, n, r, &tmp.path().join(format!("o{i}.png")));
        let got: Vec<Vec<u32>> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|im| serde_json::from_value(im["tokens"].clone()).unwrap())
            .collect();
        assert_eq!(got, offline, "request {r}");
    }
    // One image as image/png.
    rt.block_on(async {
        let r = c
            .post(server.url("/v1/generate"))
            .header("accept", "image/png")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({"class_label": 3, "seed": 5})).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "image/png");
        let im = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(im.width(), 64);
        let h: Value = c
            .get(server.url("/health"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap())
            .unwrap();
        assert_eq!(h["status"], "ok");
        assert_eq!(metric(&c, &server, "llamagen_images_total").await, 16.0);
        assert!(metric(&c, &server, "llamagen_tokens_total").await >= 16.0 * 256.0);
        assert_eq!(
            metric(&c, &server, "llamagen_request_latency_seconds_count").await,
            9.0
        );
        assert!(metric(&c, &server, "llamagen_batch_occupancy_mean").await > 0.3);
    });
}

#[test]
fn limits_and_bad_input_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, cfg) = tiny_c2i(&tmp.path().join("m"), 64, 2);
    let server = Server::start(
        &w,
        &cfg,
        &[
            "--max-sequences",
            "1",
            "--max-queue",
            "1",
            "--max-images",
            "2",
        ],
    );
    let rt = rt();
    let c = client();
    rt.block_on(async {
        for (body, field) in [
            (json!({"class_label": 10}), "class_label"),
            (json!({"class_label": "cat"}), "class_label"),
            (json!({}), "class_label"),
            (json!({"class_label": 1, "n": 3}), "n"),
            (json!({"class_label": 1, "top_p": 1.5}), "top_p"),
            (json!({"class_label": 1, "temperature": 0}), "temperature"),
            (json!({"class_label": 1, "cfg_scale": -1}), "cfg_scale"),
            (json!({"class_label": 1, "top_k": -5}), "top_k"),
            (json!({"class_label": 1, "seed": "x"}), "seed"),
            (json!({"class_label": 1, "size": 512}), "size"),
            (json!({"prompt": "a corgi"}), "prompt"),
        ] {
            let (st, v) = post(&c, &server, body.clone()).await;
            assert_eq!(st, 400, "{body} -> {v}");
            assert_eq!(v["field"], field, "{body} -> {v}");
            assert!(v["error"].as_str().unwrap().starts_with(field), "{v}");
        }
        let r = c
            .post(server.url("/v1/generate"))
            .header("content-type", "application/json")
            .body("{\"class_label\": 1,")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
        let r = c
            .post(server.url("/v1/generate"))
            .header("accept", "image/png")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({"class_label": 1, "n": 2})).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 406);

        // One slot, a queue of one: the first request's first image runs, its second waits in
        // the queue (the request is queued until all its images have started), so the next
        // request is refused.
        let first = tokio::spawn({
            let (c, u) = (c.clone(), server.url("/v1/generate"));
            async move {
                c.post(u)
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&json!({"class_label": 1, "n": 2})).unwrap())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        });
        wait_for(&c, &server, "llamagen_active_images", 1.0).await;
        wait_for(&c, &server, "llamagen_queue_depth", 1.0).await;
        let r = c
            .post(server.url("/v1/generate"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({"class_label": 3})).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(first.await.unwrap(), 200);
        assert_eq!(
            metric(&c, &server, "llamagen_requests_total{status=\"429\"}").await,
            1.0
        );
        assert_eq!(
            metric(&c, &server, "llamagen_requests_total{status=\"400\"}").await,
            12.0
        );
    });
}

async fn wait_for(c: &reqwest::Client, s: &Server, name: &str, v: f64) {
    let t = Instant::now();
    while metric(c, s, name).await != v {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{name} never reached {v}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_client_that_disconnects_frees_its_slots() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, cfg) = tiny_c2i(&tmp.path().join("m"), 64, 2);
    let server = Server::start(&w, &cfg, &["--max-sequences", "4", "--max-images", "4"]);
    let rt = rt();
    let c = client();
    rt.block_on(async {
        let total = metric(&c, &server, "llamagen_kv_blocks_total").await;
        let req = c
            .post(server.url("/v1/generate"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({"class_label": 1, "n": 4})).unwrap())
            .send();
        let watcher = async {
            wait_for(&c, &server, "llamagen_active_images", 4.0).await;
            assert!(metric(&c, &server, "llamagen_kv_blocks_free").await < total);
        };
        // The client gives up (drops its connection) once its images are running.
        tokio::select! {
            _ = req => panic!("the request finished before the client left"),
            _ = watcher => {}
        }
        wait_for(&c, &server, "llamagen_requests_cancelled_total", 1.0).await;
        wait_for(&c, &server, "llamagen_active_images", 0.0).await;
        assert_eq!(metric(&c, &server, "llamagen_kv_blocks_free").await, total);
        assert_eq!(metric(&c, &server, "llamagen_images_total").await, 0.0);
        // The slots serve the next request.
        let (st, v) = post(&c, &server, json!({"class_label": 2, "n": 4})).await;
        assert_eq!(st, 200, "{v}");
    });
}

#[test]
fn sigterm_answers_requests_in_flight_then_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, cfg) = tiny_c2i(&tmp.path().join("m"), 64, 2);
    let mut server = Server::start(&w, &cfg, &["--max-sequences", "2", "--max-images", "2"]);
    let rt = rt();
    let c = client();
    rt.block_on(async {
        let a = tokio::spawn({
            let (c, u) = (c.clone(), server.url("/v1/generate"));
            async move {
                let r = c
                    .post(u)
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&json!({"class_label": 1, "n": 2})).unwrap())
                    .send()
                    .await
                    .unwrap();
                (
                    r.status().as_u16(),
                    r.bytes()
                        .await
                        .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
                        .unwrap(),
                )
            }
        });
        let b = tokio::spawn({
            let (c, u) = (c.clone(), server.url("/v1/generate"));
            async move {
                let r = c
                    .post(u)
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&json!({"class_label": 5})).unwrap())
                    .send()
                    .await
                    .unwrap();
                (
                    r.status().as_u16(),
                    r.bytes()
                        .await
                        .map(|b| serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null))
                        .unwrap(),
                )
            }
        });
        wait_for(&c, &server, "llamagen_queue_depth", 1.0).await;
        server.sigterm();
        // Both the running and the queued request are answered.
        let (sa, va) = a.await.unwrap();
        let (sb, vb) = b.await.unwrap();
        assert_eq!((sa, sb), (200, 200), "{va} {vb}");
        assert_eq!(va["images"].as_array().unwrap().len(), 2);
        // Nothing new is taken once draining: refused (503) or the listener is closed.
        match c
            .post(server.url("/v1/generate"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&json!({"class_label": 1})).unwrap())
            .send()
            .await
        {
            Ok(r) => assert_eq!(r.status().as_u16(), 503),
            Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
        }
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    std::thread::sleep(Duration::from_millis(100));
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.contains("draining") && log.contains("drained; exiting"),
        "{log}"
    );
}

/// t2i: prompts of concurrent requests are encoded by the stand-in T5 (in batches) and the
/// served codes equal `llamagen sample --per-image-seeds --prompt …` offline.
#[test]
fn t2i_prompts_served_under_load_equal_offline_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let model = "type = \"t2i\"\ndim = 32\nn_layer = 2\nn_head = 2\nimage_size = 256\nvocab_size = 64\ncaption_dim = 64\ncls_token_num = 120";
    let w = llamagen_serve::random_checkpoint(&dir, model, 3, 0.3).unwrap();
    let cfg = dir.join("run.toml");
    let ws = llamagen_tests::workspace();
    let t5 = ws.join("encode/tests/fixtures/t5/gated");
    let tok = ws.join("encode/tests/fixtures/t5/tokenizer.json");
    let server = Server::start(
        &w,
        &cfg,
        &[
            "--t5",
            t5.to_str().unwrap(),
            "--t5-tokenizer",
            tok.to_str().unwrap(),
            "--max-sequences",
            "4",
        ],
    );
    let requests = vec![
        json!({"prompt": "a red bicycle", "seed": 1, "n": 2, "top_k": 20}),
        json!({"prompt": "two dogs, playing in the snow", "seed": 2, "cfg_scale": 3.0, "cfg_interval": 30}),
        json!({"prompt": "a bowl of soup", "seed": 3, "top_p": 0.8}),
    ];
    let rt = rt();
    let c = client();
    let served: Vec<(u16, Value)> = rt.block_on(async {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let (c, u, r) = (c.clone(), server.url("/v1/generate"), r.clone());
                tokio::spawn(async move {
                    let resp = c
                        .post(u)
                        .header("content-type", "application/json")
                        .body(serde_json::to_vec(&r).unwrap())
                        .send()
                        .await
                        .unwrap();
                    let st = resp.status().as_u16();
                    (
                        st,
                        serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap(),
                    )
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    for (i, ((st, v), r)) in served.iter().zip(&requests).enumerate() {
        assert_eq!(*st, 200, "{r} -> {v}");
        let n = r.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
        let toks = tmp.path().join(format!("t{i}.json"));
        let mut args: Vec<String> = vec![
            "sample".into(),
            "--checkpoint".into(),
            w.display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
            "--vq".into(),
            vq().display().to_string(),
            "--vq-args".into(),
            "reduced".into(),
            "--t5".into(),
            t5.display().to_string(),
            "--t5-tokenizer".into(),
            tok.display().to_string(),
            "--per-image-seeds".into(),
            "--out".into(),
            tmp.path().join(format!("t{i}.png")).display().to_string(),
            "--tokens-out".into(),
            toks.display().to_string(),
        ];
        for _ in 0..n {
            args.push("--prompt".into());
            args.push(r["prompt"].as_str().unwrap().into());
        }
        for (k, flag) in [
            ("cfg_scale", "--cfg-scale"),
            ("cfg_interval", "--cfg-interval"),
            ("top_k", "--top-k"),
            ("top_p", "--top-p"),
            ("seed", "--seed"),
        ] {
            if let Some(v) = r.get(k) {
                args.push(flag.into());
                args.push(v.to_string());
            }
        }
        let o = Command::new(llamagen_tests::llamagen())
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let offline: Vec<Vec<u32>> =
            serde_json::from_str(&std::fs::read_to_string(&toks).unwrap()).unwrap();
        let got: Vec<Vec<u32>> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|im| serde_json::from_value(im["tokens"].clone()).unwrap())
            .collect();
        assert_eq!(got, offline, "request {r}");
    }
}
