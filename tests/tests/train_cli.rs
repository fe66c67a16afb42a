//! `llamagen train` and `llamagen sample` (the real binary) on tiny synthetic catalogs written
//! through the catalog writer: training, exact resume, the NaN guard, config errors, two-stage
//! t2i with stage II initialised from stage I, reading shards from S3, and sampling to a PNG.

use std::path::{Path, PathBuf};
use std::process::Command;

use llamagen_train::synthetic::{
    SyntheticSpec, write_synthetic_catalog, write_synthetic_catalog_with,
};

fn llamagen(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(llamagen_tests::llamagen());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    eprintln!("$ llamagen {}\n{o}{e}", args.join(" "));
    (out.status.success(), o, e)
}

/// `[optim]` lines of an EMA of the weights with decay 0.5.
const EMA: &str = "ema = true\nema_decay = 0.5";

fn c2i_catalog(root: &Path) {
    write_synthetic_catalog(
        &root.display().to_string(),
        &SyntheticSpec {
            shards: 3,
            rows_per_shard: 8,
            image_sizes: vec![64],
            failed_every: 6,
            ..SyntheticSpec::default()
        },
    )
    .unwrap();
}

/// A tiny c2i config: 4x4 codes, vocabulary 64, 10 classes, dropout on.
fn c2i_config(root: &Path, out: &Path, steps: u64, extra_optim: &str) -> String {
    format!(
        r#"
[model]
type = "c2i"
dim = 32
n_layer = 2
n_head = 2
image_size = 64
vocab_size = 64
num_classes = 10

[data]
root = "{root}"
shuffle_window = 2

[train]
steps = {steps}
batch_size = 3
grad_accum = 2
seed = 11

[optim]
lr = 1e-3
warmup_steps = 2
decay_steps = 8
{extra_optim}

[output]
dir = "{out}"
checkpoint_every = 3
log_every = 1
progress = false
"#,
        root = root.display(),
        out = out.display()
    )
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics(dir)
        .iter()
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}

fn checkpoint_steps(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn c2i_training_resumes_exactly_and_samples_a_png_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    c2i_catalog(&root);

    // Uninterrupted: 6 steps.
    let full = tmp.path().join("full");
    let cfg = write(
        &tmp.path().join("full.toml"),
        &c2i_config(&root, &full, 6, EMA),
    );
    let (ok, out, _) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert!(ok);
    assert!(out.contains("final loss"), "{out}");
    let l_full = losses(&full);
    assert_eq!(
        l_full.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert!(l_full.iter().all(|l| l.1.is_finite()));
    let m = &metrics(&full)[5];
    for k in ["grad_norm", "lr", "tokens_per_s", "steps_per_s", "epoch"] {
        assert!(m.get(k).is_some(), "metrics line lacks {k}: {m}");
    }
    assert_eq!(checkpoint_steps(&full), ["0000003", "0000006"]);
    let png = image::open(full.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), (800, 400));

    // Interrupted after 3 steps, then resumed to 6: the same losses, bit for bit.
    let part = tmp.path().join("part");
    let cfg3 = write(
        &tmp.path().join("p3.toml"),
        &c2i_config(&root, &part, 3, EMA),
    );
    assert!(llamagen(&["train", "--config", cfg3.to_str().unwrap()], &[]).0);
    let cfg6 = write(
        &tmp.path().join("p6.toml"),
        &c2i_config(&root, &part, 6, EMA),
    );
    let (ok, out, _) = llamagen(
        &["train", "--config", cfg6.to_str().unwrap(), "--resume"],
        &[],
    );
    assert!(ok);
    assert!(out.contains("trained steps 3..6"), "{out}");
    assert_eq!(
        losses(&part),
        l_full,
        "losses after resume equal the uninterrupted run"
    );
    // The EMA of the weights (decay 0.5) is restored on resume: equal bit for bit, and not
    // the weights themselves.
    let load = |p: PathBuf| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (ea, eb, w) = (
        load(full.join("checkpoints/0000006/ema.safetensors")),
        load(part.join("checkpoints/0000006/ema.safetensors")),
        load(full.join("checkpoints/0000006/model.safetensors")),
    );
    assert_eq!(ea.len(), w.len());
    let max_diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for (k, t) in &ea {
        assert_eq!(max_diff(t, &eb[k]), 0.0, "EMA {k} differs after resume");
    }
    assert!(
        ea.iter().any(|(k, t)| max_diff(t, &w[k]) > 0.0),
        "the EMA equals the weights"
    );
    let b = load(part.join("checkpoints/0000006/model.safetensors"));
    for (k, t) in &w {
        assert_eq!(max_diff(t, &b[k]), 0.0, "{k}");
    }

    // Sampling: checkpoint (its train_state.json has the model) + the reference set's VQ
    // (codebook 64 x 8, downsampling 4): three 16x16 images in a row, 2 px padding.
    let png = tmp.path().join("grid.png");
    let toks = tmp.path().join("tokens.json");
    let vq = llamagen_tests::workspace().join("data/parity/vq_weights.safetensors");
    let (ok, out, err) = llamagen(
        &[
            "sample",
            "--checkpoint",
            full.join("checkpoints/0000006").to_str().unwrap(),
            "--vq",
            vq.to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--labels",
            "1,2,3",
            "--cfg-scale",
            "2.0",
            "--top-k",
            "10",
            "--top-p",
            "0.9",
            "--temperature",
            "0.8",
            "--seed",
            "4",
            "--out",
            png.to_str().unwrap(),
            "--tokens-out",
            toks.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok);
    assert!(out.contains("3 images of 16x16 px"), "{out}");
    assert!(err.contains("tokens/s"), "{err}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 18 + 2, 20));
    let t: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&toks).unwrap()).unwrap();
    assert_eq!(t.len(), 3);
    assert!(t.iter().all(|r| r.len() == 16 && r.iter().all(|&x| x < 64)));
    // Same seed, same tokens.
    let toks2 = tmp.path().join("tokens2.json");
    let ckpt = full.join("checkpoints/0000006");
    assert!(
        llamagen(
            &[
                "sample",
                "--checkpoint",
                ckpt.to_str().unwrap(),
                "--vq",
                vq.to_str().unwrap(),
                "--vq-args",
                "reduced",
                "--labels",
                "1,2,3",
                "--cfg-scale",
                "2.0",
                "--top-k",
                "10",
                "--top-p",
                "0.9",
                "--temperature",
                "0.8",
                "--seed",
                "4",
                "--out",
                png.to_str().unwrap(),
                "--tokens-out",
                toks2.to_str().unwrap()
            ],
            &[]
        )
        .0
    );
    assert_eq!(
        std::fs::read_to_string(&toks).unwrap(),
        std::fs::read_to_string(&toks2).unwrap()
    );
    // A label the model does not have.
    let (ok, _, err) = llamagen(
        &[
            "sample",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--vq",
            vq.to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--labels",
            "10",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok && err.contains("label 10"), "{err}");
    // A wrong --vq is reported before any token is generated.
    let missing = tmp_missing(&png);
    let (ok, _, err) = llamagen(
        &[
            "sample",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--vq",
            missing.to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--labels",
            "1",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok && err.contains("no-such-vq.safetensors"), "{err}");
    assert!(
        !err.contains("generated"),
        "the VQ was checked only after generating: {err}"
    );
}

/// A path beside `p` that does not exist.
fn tmp_missing(p: &std::path::Path) -> std::path::PathBuf {
    p.with_file_name("no-such-vq.safetensors")
}

#[test]
fn the_nan_guard_stops_at_the_offending_step_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    c2i_catalog(&root);
    let out = tmp.path().join("run");
    // An lr of 1e38 overflows the first update to infinity: step 2's loss is NaN.
    let mut text = c2i_config(&root, &out, 5, "").replace("lr = 1e-3", "lr = 1e38");
    text = text.replace("checkpoint_every = 3", "checkpoint_every = 1");
    let cfg = write(&tmp.path().join("nan.toml"), &text);
    let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(err.contains("at step 2"), "{err}");
    assert!(
        err.contains("last good checkpoint") && err.contains("0000001"),
        "{err}"
    );
    assert_eq!(checkpoint_steps(&out), ["0000001"]);
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    let out = tmp.path().join("run");
    let text = c2i_config(&root, &out, 2, "").replace("seed = 11", "seed = 11\nstepz = 3");
    let cfg = write(&tmp.path().join("bad.toml"), &text);
    let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("stepz"), "{err}");
    let text = c2i_config(&root, &out, 2, "").replace("[output]", "[outputs]");
    let cfg = write(&tmp.path().join("bad2.toml"), &text);
    let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("outputs"), "{err}");
    let text = c2i_config(&root, &out, 2, "").replace("image_size = 64", "image_size = 72");
    let cfg = write(&tmp.path().join("bad3.toml"), &text);
    let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("image_size 72"), "{err}");
}

fn t2i_config(root: &str, out: &Path, image_size: u32, steps: u64, extra: &str) -> String {
    format!(
        r#"
[model]
type = "t2i"
dim = 32
n_layer = 2
n_head = 2
image_size = {image_size}
vocab_size = 64
caption_dim = 16
cls_token_num = 120

[data]
root = "{root}"

[train]
steps = {steps}
batch_size = 2
seed = 3

[optim]
{extra}

[output]
dir = "{out}"
checkpoint_every = 100
log_every = 1
progress = false
"#,
        out = out.display()
    )
}

fn load_st(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

fn train_state(ckpt: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("train_state.json")).unwrap()).unwrap()
}

fn values(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Elements where one AdamW step from moments `(m1, v1)` to `(m2, v2)` is not explained by a
/// single gradient: `g = (m2 − b1·m1)/(1 − b1)` must satisfy `g² = (v2 − b2·v1)/(1 − b2)` to a
/// relative 1e-3, plus a floor for the f32 rounding of the moments.
fn adamw_identity_failures(
    m1: &[f64],
    v1: &[f64],
    m2: &[f64],
    v2: &[f64],
    b1: f64,
    b2: f64,
) -> usize {
    (0..m2.len())
        .filter(|&i| {
            let g = (m2[i] - b1 * m1[i]) / (1.0 - b1);
            let (lhs, rhs) = (g * g, (v2[i] - b2 * v1[i]) / (1.0 - b2));
            let m_scale = (m1[i].abs() + m2[i].abs()) / (1.0 - b1);
            let floor = 1e-5 * ((v1[i] + v2[i]) / (1.0 - b2) + m_scale * m_scale) + 1e-30;
            (lhs - rhs).abs() > 1e-3 * lhs.max(rhs) + floor
        })
        .count()
}

#[test]
fn two_stage_t2i_initialises_stage_two_from_stage_one() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog").display().to_string();
    write_synthetic_catalog(
        &root,
        &SyntheticSpec {
            shards: 2,
            rows_per_shard: 6,
            image_sizes: vec![64, 128],
            num_classes: None,
            caption_dim: 16,
            no_caption_every: 5,
            ..SyntheticSpec::default()
        },
    )
    .unwrap();
    let s1 = tmp.path().join("stage1");
    let c1 = write(
        &tmp.path().join("s1.toml"),
        &t2i_config(&root, &s1, 64, 2, "lr = 1e-3\nema = true"),
    );
    assert!(llamagen(&["train", "--config", c1.to_str().unwrap()], &[]).0);
    let ck1 = s1.join("checkpoints/0000002");
    // The EMA file is a whole state dict (the t2i null-caption buffer included), loadable as
    // weights: the same names and shapes as the model's.
    {
        let load = |f: &str| {
            candle_core::safetensors::load(ck1.join(f), &candle_core::Device::Cpu).unwrap()
        };
        let (ema, model) = (load("ema.safetensors"), load("model.safetensors"));
        assert!(ema.contains_key("cls_embedding.uncond_embedding"));
        assert_eq!(ema.len(), model.len());
        for (k, t) in &model {
            assert_eq!(ema[k].dims(), t.dims(), "{k}");
        }
    }
    // Stage II at twice the resolution; lr 0 and no weight decay keep the loaded weights, so the
    // checkpoint after one step must hold stage I's weights exactly.
    let stage2 = |name: &str, steps: u64, init_optimizer: bool| {
        let dir = tmp.path().join(name);
        let text = t2i_config(&root, &dir, 128, steps, "lr = 0.0\nweight_decay = 0.0").replace(
            "progress = false",
            &format!(
                "progress = false\ninit_from = \"{}\"\ninit_optimizer = {init_optimizer}",
                ck1.display()
            ),
        );
        let cfg = write(&tmp.path().join(format!("{name}.toml")), &text);
        let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &[]);
        (dir, ok, err)
    };
    let same_weights = |ck: &Path| {
        let a = load_st(&ck1.join("model.safetensors"));
        let b = load_st(&ck.join("model.safetensors"));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            assert!(values(t) == values(&b[k]), "{k} differs after init_from");
        }
    };

    // Weights only (init_optimizer = false): fresh AdamW, steps from 0.
    let (s2, ok, err) = stage2("stage2", 1, false);
    assert!(ok, "{err}");
    let ck2 = s2.join("checkpoints/0000001");
    let st = train_state(&ck2);
    assert_eq!(st["model"]["block_size"], 64, "stage II trains 8x8 grids");
    assert_eq!(st["step"], 1);
    same_weights(&ck2);
    // A stage II loss on 8x8 grids was logged.
    assert_eq!(losses(&s2).len(), 1);

    // The default (init_optimizer = true), as the official --gpt-ckpt: AdamW moments and step
    // restored, the step counter continues from stage I's 2, train.steps = 3 is the total.
    let (s2b, ok, err) = stage2("stage2b", 3, true);
    assert!(ok, "{err}");
    assert!(err.contains("from step 2"), "{err}");
    assert_eq!(checkpoint_steps(&s2b), ["0000003"]);
    let ck2b = s2b.join("checkpoints/0000003");
    let st = train_state(&ck2b);
    assert_eq!(
        (st["step"].as_u64(), st["model"]["block_size"].as_u64()),
        (Some(3), Some(64))
    );
    assert_eq!(losses(&s2b).iter().map(|l| l.0).collect::<Vec<_>>(), [3]);
    same_weights(&ck2b);
    let o1 = load_st(&ck1.join("optimizer.safetensors"));
    let o2 = load_st(&ck2b.join("optimizer.safetensors"));
    assert_eq!(values(&o1["step"]), [2.0]);
    assert_eq!(
        values(&o2["step"]),
        [3.0],
        "AdamW's step continues from stage I's"
    );
    // m2 = b1·m1 + (1 − b1)·g and v2 = b2·v1 + (1 − b2)·g² for the one stage II gradient g:
    // with the restored moments g from m must square to g² from v, for every parameter; with
    // moments started from zero (a fresh AdamW) the identity breaks.
    let (b1, b2) = (0.9, 0.95);
    let (mut params, mut broken_from_zero) = (0, 0);
    for (k, m2) in &o2 {
        let Some(name) = k.strip_prefix("exp_avg.") else {
            continue;
        };
        params += 1;
        let v2 = values(&o2[&format!("exp_avg_sq.{name}")]);
        let m1 = values(&o1[k]);
        let v1 = values(&o1[&format!("exp_avg_sq.{name}")]);
        let m2 = values(m2);
        let bad = adamw_identity_failures(&m1, &v1, &m2, &v2, b1, b2);
        assert_eq!(
            bad,
            0,
            "{name}: {bad} of {} moments not continued",
            m2.len()
        );
        let zeros = vec![0.0; m2.len()];
        if adamw_identity_failures(&zeros, &zeros, &m2, &v2, b1, b2) > 0 {
            broken_from_zero += 1;
        }
    }
    assert!(params > 10, "{params} parameters");
    assert!(
        broken_from_zero > 0,
        "the check tells restored moments from fresh ones"
    );

    // A stage I checkpoint at or past train.steps trains nothing: refused, naming both.
    let (_, ok, err) = stage2("stage2c", 2, true);
    assert!(!ok);
    assert!(
        err.contains("at step 2")
            && err.contains("train.steps = 2")
            && err.contains(&ck1.display().to_string()),
        "{err}"
    );

    // t2i sampling with CFG 7.5 from caption features in the catalog and from an .npy file.
    let vq = llamagen_tests::workspace().join("data/parity/vq_weights.safetensors");
    let npy = tmp.path().join("cap.npy");
    candle_core::Tensor::ones(
        (1, 5, 16),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .write_npy(&npy)
    .unwrap();
    let png = tmp.path().join("t2i.png");
    let (ok, out, _) = llamagen(
        &[
            "sample",
            "--checkpoint",
            ck2.to_str().unwrap(),
            "--vq",
            vq.to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--catalog",
            &root,
            "--keys",
            "synthetic-0000-000000,synthetic-0001-000002",
            "--caption-npy",
            npy.to_str().unwrap(),
            "--cfg-scale",
            "7.5",
            "--top-k",
            "5",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok);
    assert!(out.contains("3 images of 32x32 px"), "{out}");
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (3 * 34 + 2, 36));
    let (ok, _, err) = llamagen(
        &[
            "sample",
            "--checkpoint",
            ck2.to_str().unwrap(),
            "--vq",
            vq.to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--catalog",
            &root,
            "--keys",
            "nope",
            "--out",
            png.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok && err.contains("nope"), "{err}");
}

#[test]
fn training_reads_shards_from_s3() {
    let s3 = llamagen_tests::S3Server::start();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.create_bucket("train"));
    let root = "s3://train/cat";
    write_synthetic_catalog_with(
        root,
        &s3.storage_options(),
        &SyntheticSpec {
            image_sizes: vec![64],
            ..SyntheticSpec::default()
        },
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = write(
        &tmp.path().join("s3.toml"),
        &c2i_config(Path::new(root), &out, 2, ""),
    );
    let (ok, _, err) = llamagen(&["train", "--config", cfg.to_str().unwrap()], &s3.env());
    assert!(ok, "{err}");
    assert!(err.contains("32 rows of s3://train/cat"), "{err}");
    assert_eq!(losses(&out).len(), 2);
}
