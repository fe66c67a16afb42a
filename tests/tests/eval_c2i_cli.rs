//! `llamagen eval c2i` and the evaluation outputs of `llamagen sample` (the real binary) with a
//! tiny random-weight c2i GPT (6x6 codes, vocabulary 64, 10 classes), the reference set's reduced
//! VQ (`data/parity`, 4x downsampling: 24 px images, resized to 16 px as the paper's 384 -> 256)
//! and the stand-in Inception model: the protocol end to end, balanced labels, resumption after
//! a partial run giving the same bytes, refusal of other settings, one PNG per sample equal to
//! the `.npz`, the bicubic resize equal to torch's `F.interpolate`; and `eval t2i` sampling its
//! prompts first.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

fn llamagen(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(llamagen_tests::llamagen())
        .args(args)
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    eprintln!("$ llamagen {}\n{o}{e}", args.join(" "));
    (out.status.success(), o, e)
}

/// A random-weight c2i GPT (`model.safetensors`) and its run config (`run.toml`) in `dir`.
fn tiny_c2i(dir: &Path) -> (PathBuf, PathBuf) {
    let (w, c) = tiny_gpt(
        dir,
        "c2i",
        "type = \"c2i\"\nimage_size = 96\nnum_classes = 10",
    );
    (w, c)
}

/// A random-weight GPT with `model` lines in `[model]`, as `<name>.safetensors` and
/// `<name>.toml` in `dir`.
fn tiny_gpt(dir: &Path, name: &str, model: &str) -> (PathBuf, PathBuf) {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[model]\n{model}\ndim = 32\nn_layer = 2\nn_head = 2\nvocab_size = 64\n\n[data]\nroot = \"unused\"\n\n[output]\ndir = \"unused\"\n"
        ),
    )
    .unwrap();
    let cfg = llamagen_train::run::RunConfig::from_file(&config)
        .unwrap()
        .model
        .gpt_config()
        .unwrap();
    // Deterministic pseudo-random weights (std about 0.2: peaked enough that the tokens, and the
    // images, differ between classes and seeds).
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.7
    };
    let tensors: Vec<(String, Tensor)> = cfg
        .state_dict_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| next()).collect()
            };
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect();
    let weights = dir.join(format!("{name}.safetensors"));
    llamagen_train::checkpoint::save_safetensors(&weights, &tensors).unwrap();
    (weights, config)
}

fn vq() -> PathBuf {
    llamagen_tests::workspace().join("data/parity/vq_weights.safetensors")
}

fn inception() -> PathBuf {
    llamagen_tests::workspace().join("eval/tests/fixtures/inception/standin.onnx")
}

fn reference() -> PathBuf {
    llamagen_tests::workspace().join("eval/tests/fixtures/inception/ref.npz")
}

/// Runs `llamagen eval c2i` of the tiny model into `out` with `extra` arguments.
fn eval_c2i(weights: &Path, config: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let (w, c, v, o, i, r) = (
        weights.display().to_string(),
        config.display().to_string(),
        vq().display().to_string(),
        out.display().to_string(),
        inception().display().to_string(),
        reference().display().to_string(),
    );
    let mut args = vec![
        "eval",
        "c2i",
        "--checkpoint",
        &w,
        "--config",
        &c,
        "--vq",
        &v,
        "--vq-args",
        "reduced",
        "--num-samples",
        "24",
        "--shard-size",
        "10",
        "--batch-size",
        "4",
        "--image-size-eval",
        "16",
        "--seed",
        "7",
        "--out",
        &o,
        "--ref",
        &r,
        "--inception",
        &i,
        "--eval-batch-size",
        "8",
    ];
    args.extend_from_slice(extra);
    llamagen(&args)
}

/// Runs Python (`python`) on `code` with `args`; returns its stdout.
fn python(python: &Path, code: &str, args: &[&Path]) -> String {
    let o = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn eval_c2i_samples_in_resumable_shards_and_reports_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (weights, config) = tiny_c2i(tmp.path());
    assert_eq!(
        std::fs::read_to_string(&config).unwrap().lines().nth(2),
        Some("image_size = 96")
    );

    // A model of no official size needs --cfg-scale.
    let a = tmp.path().join("a");
    let (ok, _, err) = eval_c2i(&weights, &config, &a, &[]);
    assert!(!ok && err.contains("--cfg-scale"), "{err}");

    // End to end: 24 samples in shards of 10, 10, 4.
    let t0 = std::time::Instant::now();
    let (ok, out, err) = eval_c2i(&weights, &config, &a, &["--cfg-scale", "2.0"]);
    assert!(ok, "{err}");
    eprintln!(
        "eval c2i of 24 samples: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(out.contains("FID: ") && out.contains("Recall: "), "{out}");
    let mut shards: Vec<String> = std::fs::read_dir(a.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("metrics.json")).unwrap()).unwrap();
    for k in ["inception_score", "fid", "sfid", "precision", "recall"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k}: {m}");
    }
    assert_eq!(m["samples"], 24);
    assert_eq!(m["sampling"]["cfg_scale"], 2.0);
    assert_eq!(m["sampling"]["top_k"], 0);
    assert_eq!(m["sampling"]["num_samples"], 24);
    let batch = llamagen_eval::batch::npz_images(&a.join("samples.npz")).unwrap();
    assert_eq!((batch.n, batch.height, batch.width), (24, 16, 16));
    // The images are not all alike.
    let item = 16 * 16 * 3;
    assert_ne!(batch.pixels[..item], batch.pixels[item..2 * item]);

    // Balanced labels (arr_1): 24 = 2 of each of the 10 classes and one more of classes 0-3,
    // shuffled; the shards' labels are the batch's, in order.
    let py = llamagen_tests::python();
    let counts = python(
        &py,
        "import sys, numpy as np\n\
         z = np.load(sys.argv[1]); l = z['arr_1']\n\
         parts = [np.load(f'{sys.argv[2]}/shard-0000{k}.npz')['arr_1'] for k in range(3)]\n\
         assert (np.concatenate(parts) == l).all() and l.dtype == np.int64\n\
         assert (np.concatenate([np.load(f'{sys.argv[2]}/shard-0000{k}.npz')['arr_0'] for k in range(3)]) == z['arr_0']).all()\n\
         assert list(l) != sorted(l)\n\
         print(np.bincount(l, minlength=10).tolist())",
        &[&a.join("samples.npz"), &a.join("samples")],
    );
    assert_eq!(counts.trim(), "[3, 3, 3, 3, 2, 2, 2, 2, 2, 2]");

    // `llamagen eval` on samples.npz gives the same metrics.
    let (ok, _, err) = llamagen(&[
        "eval",
        "--sample",
        a.join("samples.npz").to_str().unwrap(),
        "--ref",
        reference().to_str().unwrap(),
        "--inception",
        inception().to_str().unwrap(),
        "--out",
        tmp.path().join("direct.json").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("direct.json")).unwrap())
            .unwrap();
    for k in ["inception_score", "fid", "sfid"] {
        let (x, y) = (m[k].as_f64().unwrap(), d[k].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{k}: {x} vs {y}");
    }

    // A partial run (shard 1 missing, shard 2 left as .partial by a kill, no samples.npz yet):
    // resumed, it samples only what is missing and gives the same bytes.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(b.join("samples")).unwrap();
    std::fs::copy(a.join("protocol.json"), b.join("protocol.json")).unwrap();
    std::fs::copy(
        a.join("samples/shard-00000.npz"),
        b.join("samples/shard-00000.npz"),
    )
    .unwrap();
    std::fs::write(b.join("samples/shard-00002.npz.partial"), b"half a shard").unwrap();
    let (ok, _, err) = eval_c2i(&weights, &config, &b, &["--cfg-scale", "2.0"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming: 1 of 3 shards (10 samples)"),
        "{err}"
    );
    assert!(!b.join("samples/shard-00002.npz.partial").exists());
    assert!(
        std::fs::read(a.join("samples.npz")).unwrap()
            == std::fs::read(b.join("samples.npz")).unwrap(),
        "the resumed run's samples.npz differs from the uninterrupted run's"
    );
    let mb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["fid"], mb["fid"]);

    // Other settings for the same directory are refused, naming what differs.
    let (ok, _, err) = eval_c2i(&weights, &config, &b, &["--cfg-scale", "1.5"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("protocol.json") && err.contains("cfg_scale: 2.0 then, 1.5 now"),
        "{err}"
    );
    let (ok, _, err) = eval_c2i(
        &weights,
        &config,
        &b,
        &["--cfg-scale", "2.0", "--top-k", "5"],
    );
    assert!(!ok && err.contains("top_k"), "{err}");
}

/// Reads an `.npy` of float32 values.
fn npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = Tensor::read_npy(path)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (
        t.dims().to_vec(),
        t.flatten_all().unwrap().to_vec1().unwrap(),
    )
}

#[test]
fn sample_png_dir_and_the_bicubic_resize_match_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let (weights, config) = tiny_c2i(tmp.path());
    let run = |tag: &str, size: Option<&str>| {
        let dir = tmp.path().join(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args: Vec<String> = [
            "sample",
            "--checkpoint",
            weights.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--vq",
            vq().to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--labels",
            "0,3,3,9,5",
            "--cfg-scale",
            "2.0",
            "--seed",
            "5",
            "--batch-size",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (flag, name) in [
            ("--out", "grid.png"),
            ("--npz", "s.npz"),
            ("--png-dir", "png"),
            ("--float-npy", "f.npy"),
        ] {
            args.push(flag.into());
            args.push(dir.join(name).display().to_string());
        }
        if let Some(s) = size {
            args.extend(["--image-size-eval".to_string(), s.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = llamagen(&refs);
        assert!(ok, "{err}");
        dir
    };
    let raw = run("raw", None);
    let down = run("down", Some("16"));
    let up = run("up", Some("37"));

    // One PNG per sample, named in sample order, equal to the npz rows.
    for (dir, side) in [(&raw, 24), (&down, 16), (&up, 37)] {
        let batch = llamagen_eval::batch::npz_images(&dir.join("s.npz")).unwrap();
        assert_eq!((batch.n, batch.height, batch.width), (5, side, side));
        let mut names: Vec<String> = std::fs::read_dir(dir.join("png"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "000000.png",
                "000001.png",
                "000002.png",
                "000003.png",
                "000004.png"
            ]
        );
        let item = side * side * 3;
        for (i, name) in names.iter().enumerate() {
            let png = image::open(dir.join("png").join(name)).unwrap();
            assert!(matches!(png, image::DynamicImage::ImageRgb8(_)));
            assert_eq!(
                png.to_rgb8().into_raw(),
                batch.pixels[i * item..(i + 1) * item],
                "{name}"
            );
        }
        // The grid is never resized: 5 images of 24 px in a row.
        let g = image::open(dir.join("grid.png")).unwrap();
        assert_eq!((g.width(), g.height()), (5 * 26 + 2, 28));
    }
    // The decoded images are the same in the three runs (same seed), only the resize differs.
    let (shape, _) = npy_f32(&raw.join("f.npy"));
    assert_eq!(shape, [5, 3, 24, 24]);

    // torch's F.interpolate(mode='bicubic') of the raw decoder output, and its uint8 conversion
    // (sample_c2i_ddp.py), against ours.
    let torch = llamagen_tests::torch_python();
    let script = r#"
import sys, numpy as np, torch, torch.nn.functional as F
raw = torch.from_numpy(np.load(sys.argv[1]))
for path, npz in ((sys.argv[2], sys.argv[3]), (sys.argv[4], sys.argv[5])):
    ours = np.load(path)
    size = ours.shape[-1]
    ref = F.interpolate(raw, size=(size, size), mode='bicubic')
    diff = np.abs(ref.numpy() - ours).max()
    assert diff <= 1e-5, (size, diff)
    u8 = torch.clamp(127.5 * torch.from_numpy(ours) + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    assert (u8 == np.load(npz)['arr_0']).all(), size
    print(size, diff)
"#;
    let out = python(
        &torch,
        script,
        &[
            &raw.join("f.npy"),
            &down.join("f.npy"),
            &down.join("s.npz"),
            &up.join("f.npy"),
            &up.join("s.npz"),
        ],
    );
    eprintln!("torch comparison (size, max abs diff):\n{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
}

/// `llamagen sample --folder` (`sample_t2i_folder`): prompts into GigaGAN's layout, resumable
/// with the same bytes, refusing other settings and other prompts.
#[test]
fn t2i_prompts_sample_into_a_resumable_caption_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (weights, config) = tiny_gpt(
        tmp.path(),
        "t2i",
        "type = \"t2i\"\nimage_size = 64\ncaption_dim = 64\ncls_token_num = 120",
    );
    let ws = llamagen_tests::workspace();
    let prompts = tmp.path().join("prompts.csv");
    std::fs::write(
        &prompts,
        "id,caption\n1,a red bicycle\n2,\"two dogs, playing\"\n3,a bowl of soup\n4,a lighthouse\n5,snow on a roof\n",
    )
    .unwrap();
    let dir = tmp.path().join("folder");
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "sample",
            "--checkpoint",
            weights.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--vq",
            vq().to_str().unwrap(),
            "--vq-args",
            "reduced",
            "--t5",
            ws.join("encode/tests/fixtures/t5/gated").to_str().unwrap(),
            "--t5-tokenizer",
            ws.join("encode/tests/fixtures/t5/tokenizer.json")
                .to_str()
                .unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--top-k",
            "20",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--folder",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        llamagen(&refs)
    };
    let (ok, out, err) = run(&[]);
    assert!(ok, "{err}");
    assert!(out.contains("5 images (5 generated now"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("captions.txt")).unwrap(),
        "a red bicycle\ntwo dogs, playing\na bowl of soup\na lighthouse\nsnow on a roof\n"
    );
    let png = |i: usize| dir.join(format!("images/{i:06}.png"));
    let first: Vec<Vec<u8>> = (0..5).map(|i| std::fs::read(png(i)).unwrap()).collect();
    let img = image::open(png(0)).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    assert!(!png(5).exists());

    // Killed in the middle: one image of the second batch lost, a .partial left behind.
    std::fs::remove_file(png(3)).unwrap();
    std::fs::write(dir.join("images/000003.png.partial"), b"x").unwrap();
    let (ok, out, err) = run(&[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("5 images (2 generated now, 3 already there)"),
        "{out}"
    );
    for (i, bytes) in first.iter().enumerate() {
        assert!(
            &std::fs::read(png(i)).unwrap() == bytes,
            "image {i} differs after resuming"
        );
    }

    // Other settings, or other prompts, for the same folder are refused.
    let (ok, _, err) = run(&["--cfg-scale", "3"]);
    assert!(
        !ok && err.contains("sampling.json") && err.contains("cfg_scale"),
        "{err}"
    );
    std::fs::write(&prompts, "caption\na red bicycle\na green bicycle\n").unwrap();
    let (ok, _, err) = run(&[]);
    assert!(!ok && err.contains("captions.txt line 2"), "{err}");
}

/// `llamagen eval t2i --checkpoint … --prompts …`: the paper's t2i protocol in one command:
/// the prompts sampled into the caption folder, then its CLIP score and FID, equal to
/// `eval t2i` on the folder alone; a second run samples nothing and gives the same numbers.
#[test]
fn eval_t2i_samples_the_prompts_then_reports_clip_score_and_fid() {
    let tmp = tempfile::tempdir().unwrap();
    let (weights, config) = tiny_gpt(
        tmp.path(),
        "t2i",
        "type = \"t2i\"\nimage_size = 64\ncaption_dim = 64\ncls_token_num = 120",
    );
    let ws = llamagen_tests::workspace();
    let t2i = ws.join("eval/tests/fixtures/t2i");
    let models = ws.join("filters/tests/models");
    let prompts = tmp.path().join("coco_captions.csv");
    std::fs::write(
        &prompts,
        // As the official coco_captions.csv: one column, prompts with commas, read as TSV.
        "Prompt\na red bicycle, leaning on a wall\na bowl of soup\na lighthouse at dusk\nsnow on a roof, at night\n",
    )
    .unwrap();
    let dir = tmp.path().join("gen");
    let metrics = |sample_too: bool, out: &Path| {
        let mut args: Vec<String> = vec!["eval".into(), "t2i".into()];
        if sample_too {
            for a in [
                "--checkpoint",
                weights.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--vq",
                vq().to_str().unwrap(),
                "--vq-args",
                "reduced",
                "--t5",
                ws.join("encode/tests/fixtures/t5/gated").to_str().unwrap(),
                "--t5-tokenizer",
                ws.join("encode/tests/fixtures/t5/tokenizer.json")
                    .to_str()
                    .unwrap(),
                "--prompts",
                prompts.to_str().unwrap(),
                "--top-k",
                "20",
                "--sample-batch-size",
                "3",
            ] {
                args.push(a.into());
            }
        }
        for (flag, path) in [
            ("--sample", dir.clone()),
            ("--ref", t2i.join("ref")),
            (
                "--inception-clean",
                t2i.join("clean_inception_standin.onnx"),
            ),
            ("--clip-image", models.join("clip_b32_image.onnx")),
            ("--clip-text", models.join("clip_b32_text.onnx")),
            ("--out", out.to_path_buf()),
        ] {
            args.push(flag.into());
            args.push(path.display().to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, text, err) = llamagen(&refs);
        assert!(ok, "{err}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        (text, err, json)
    };
    let (text, err, first) = metrics(true, &tmp.path().join("a.json"));
    assert!(err.contains("4 images (4 generated now)"), "{err}");
    assert!(
        text.contains("CLIP score: ") && text.contains("FID_256px: "),
        "{text}"
    );
    assert_eq!(first["sample_images"], 4);
    assert_eq!(first["clip_pairs"], 4);
    let (fid, clip) = (
        first["fid"].as_f64().unwrap(),
        first["clip_score"].as_f64().unwrap(),
    );
    assert!(fid.is_finite() && fid > 0.0 && clip.is_finite(), "{first}");
    assert_eq!(
        std::fs::read_to_string(dir.join("captions.txt")).unwrap(),
        "a red bicycle, leaning on a wall\na bowl of soup\na lighthouse at dusk\nsnow on a roof, at night\n"
    );
    // Resumed: nothing left to sample, the same metrics; and the folder alone gives them too.
    let (_, err, again) = metrics(true, &tmp.path().join("b.json"));
    assert!(err.contains("4 images (0 generated now)"), "{err}");
    let (_, _, folder) = metrics(false, &tmp.path().join("c.json"));
    for m in ["fid", "clip_score"] {
        assert_eq!(again[m], first[m], "{m} after resuming");
        assert_eq!(folder[m], first[m], "{m} of the folder alone");
    }
    // A sampling flag without --checkpoint is refused before anything runs.
    let (ok, _, err) = llamagen(&[
        "eval",
        "t2i",
        "--sample",
        dir.to_str().unwrap(),
        "--ref",
        t2i.join("ref").to_str().unwrap(),
        "--inception-clean",
        t2i.join("clean_inception_standin.onnx").to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("give --checkpoint"), "{err}");
}
