//! `llamagen eval c2i`: the paper's class-conditional ImageNet protocol in one command.
//!
//! As the official `autoregressive/sample/sample_c2i_ddp.py` FID runs: `--num-samples` images
//! (50,000) sampled with the per-size CFG scale of the paper (2.0 for GPT-B and GPT-L, 1.75 for
//! GPT-XL and GPT-XXL, 1.65 for GPT-3B; `--cfg-scale` is required for any other model), top-k 0,
//! top-p 1.0, temperature 1.0, CFG on every step (cfg_interval -1), decoded by the VQ, resized
//! to `--image-size-eval` (256) with torch's bicubic `F.interpolate` when the model samples at
//! another size (384), converted with `clamp(127.5·x + 128, 0, 255)` to uint8 and gathered into
//! one ADM batch `DIR/samples.npz` (`arr_0`), whose evaluator metrics against `--ref` go to
//! `DIR/metrics.json`.
//!
//! Labels: the official script draws every label uniformly at random (`torch.randint(0,
//! num_classes, …)`); here they are class-balanced (`num_samples / num_classes` of each class,
//! the remainder one more for the lowest classes) in an order shuffled by `--seed`, as later
//! evaluations sample ImageNet (MAR's draws 50 of every class), which removes the label draw's
//! share of the variance of FID between runs. The labels are kept beside the images
//! (`arr_1`, int64, as ADM's labelled batches).
//!
//! Resumable: the samples are written in shards `DIR/samples/shard-00000.npz` (`arr_0` uint8
//! N×H×W×3, `arr_1` labels) of `--shard-size`, each written atomically (tmp + rename) and
//! generated with its own generator seeded from `(seed, shard index)`, so a shard's images do not
//! depend on which shards were done before; a re-run after a kill skips the complete shards and,
//! on the same kind of device, gives the same `samples.npz` as an uninterrupted run (a changed
//! `--device` is reported, not refused: CPU and CUDA samples differ in their rounding). `DIR/protocol.json` records the settings
//! at the start; a re-run with other settings is refused.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use clap::Args;
use llamagen_eval::batch;
use llamagen_eval::inception::Activations;
use llamagen_train::sample::SamplingConfig;
use llamagen_train::{Condition, ModelType};
use rand::SeedableRng;

use crate::eval_sampling::{
    NpzWriter, Sampler, balanced_labels, check_settings, derived_seed, fingerprint, images_u8,
    official_eval_cfg, partial_path, progress, resize_images, vq_model_args, write_npz,
};

#[derive(Args, Debug)]
pub struct C2iArgs {
    /// GPT checkpoint: a training checkpoint directory (its train_state.json gives the model
    /// config), a safetensors file, or an official torch checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Run config (TOML) whose [model] describes the GPT; needed when the checkpoint is a file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ checkpoint (safetensors or the official torch .pt).
    #[arg(long)]
    pub vq: PathBuf,
    /// VQ architecture: vq16, vq8, reduced (the reference set's), or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub vq_args: String,
    /// Images sampled (the paper: 50,000).
    #[arg(long, default_value_t = 50_000)]
    pub num_samples: usize,
    /// Output directory: protocol.json, samples/shard-*.npz, samples.npz, metrics.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Reference batch: an ADM `.npz` (`VIRTUAL_imagenet256_labeled.npz`: images and/or `mu`,
    /// `sigma`, `mu_s`, `sigma_s`) or a folder of images.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// Inception-v3 ONNX model with the evaluator's outputs (`scripts/export-inception.py`).
    #[arg(long)]
    pub inception: PathBuf,
    /// Classifier-free guidance scale. Default: the paper's for the model size (2.0 GPT-B/L,
    /// 1.75 GPT-XL/XXL, 1.65 GPT-3B); required for other models.
    #[arg(long)]
    pub cfg_scale: Option<f32>,
    /// Keep the k most likely tokens (0: all, as the official FID runs).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Seed of the label order and of every shard's generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated together (one KV cache of twice this many sequences with CFG).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Side of the evaluated images; samples of another size are resized (torch bicubic).
    #[arg(long, default_value_t = 256)]
    pub image_size_eval: usize,
    /// Images per shard (the unit of resumption).
    #[arg(long, default_value_t = 1000)]
    pub shard_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per Inception call.
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// ONNX Runtime threads inside one operator (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_threads: usize,
}

fn shard_path(dir: &Path, k: usize) -> PathBuf {
    dir.join(format!("shard-{k:05}.npz"))
}

/// Whether shard `k` is complete: it exists (it is renamed into place only once written) and
/// holds the images and labels.
fn shard_done(dir: &Path, k: usize) -> bool {
    let p = shard_path(dir, k);
    p.exists()
        && batch::npz_names(&p)
            .is_ok_and(|n| n.iter().any(|x| x == "arr_0") && n.iter().any(|x| x == "arr_1"))
}

pub fn run(args: C2iArgs) -> Result<ExitCode> {
    if args.num_samples == 0 || args.shard_size == 0 || args.batch_size == 0 {
        bail!("--num-samples, --shard-size and --batch-size must be positive");
    }
    if args.image_size_eval == 0 {
        bail!("--image-size-eval must be positive");
    }
    // The evaluation's inputs are checked before any sampling, so a wrong path fails at once,
    // not after hours of sampling.
    if !args.inception.is_file() {
        bail!(
            "--inception {}: no such model file",
            args.inception.display()
        );
    }
    if !args.reference.exists() {
        bail!("--ref {}: no such batch", args.reference.display());
    }
    let (cfg, weights) = crate::sample_cmd::model_config(&args.checkpoint, args.config.as_deref())?;
    if cfg.model_type != ModelType::C2i {
        bail!(
            "{} is a t2i model; eval c2i needs a class-conditional one",
            args.checkpoint.display()
        );
    }
    let (size, paper_cfg) = official_eval_cfg(&cfg);
    let cfg_scale = match (args.cfg_scale, paper_cfg) {
        (Some(s), _) => s,
        (None, Some(s)) => s,
        (None, None) => bail!(
            "the model ({} layers, {} heads, width {}) is {}: give --cfg-scale (the paper's are 2.0 for GPT-B/L, 1.75 for GPT-XL/XXL, 1.65 for GPT-3B)",
            cfg.n_layer,
            cfg.n_head,
            cfg.dim,
            size.map_or("no official size".to_string(), |s| format!(
                "{} (no evaluation CFG scale in the paper)",
                s.name()
            ))
        ),
    };
    let sc = SamplingConfig {
        cfg_scale,
        cfg_interval: -1,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        sample_logits: true,
    };
    let n = args.num_samples;
    let settings = serde_json::json!({
        "protocol": "llamagen eval c2i",
        "checkpoint": fingerprint(&weights)?,
        "model": serde_json::to_value(&cfg)?,
        "model_size": size.map(|s| s.name()),
        "vq": fingerprint(&args.vq)?,
        "vq_args": serde_json::to_value(vq_model_args(&args.vq_args)?)?,
        "num_samples": n,
        "num_classes": cfg.num_classes,
        "labels": "balanced, shuffled by seed",
        "cfg_scale": sc.cfg_scale,
        "cfg_interval": sc.cfg_interval,
        "top_k": sc.top_k,
        "top_p": sc.top_p,
        "temperature": sc.temperature,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "image_size_eval": args.image_size_eval,
        "resize": "torch F.interpolate bicubic (a=-0.75, align_corners=False, no antialias) on float32",
        "dtype": "float32",
        "device": args.device,
    });
    let dir = &args.out;
    let shards_dir = dir.join("samples");
    std::fs::create_dir_all(&shards_dir).with_context(|| shards_dir.display().to_string())?;
    check_settings(
        &dir.join("protocol.json"),
        &settings,
        &["checkpoint.path", "vq.path", "device"],
    )?;
    eprintln!(
        "eval c2i: {n} samples of {} classes, cfg scale {}, top-k {}, top-p {}, temperature {}, seed {}, shards of {}",
        cfg.num_classes,
        sc.cfg_scale,
        sc.top_k,
        sc.top_p,
        sc.temperature,
        args.seed,
        args.shard_size
    );

    // Sampling: the missing shards.
    let labels = balanced_labels(n, cfg.num_classes, args.seed);
    let shards = n.div_ceil(args.shard_size);
    let range = |k: usize| k * args.shard_size..n.min((k + 1) * args.shard_size);
    for k in 0..shards {
        let _ = std::fs::remove_file(partial_path(&shard_path(&shards_dir, k)));
    }
    let todo: Vec<usize> = (0..shards)
        .filter(|&k| !shard_done(&shards_dir, k))
        .collect();
    if !todo.is_empty() {
        let missing: usize = todo.iter().map(|&k| range(k).len()).sum();
        if missing < n {
            eprintln!(
                "resuming: {} of {shards} shards ({} samples) already in {}",
                shards - todo.len(),
                n - missing,
                shards_dir.display()
            );
        }
        let sampler = Sampler::load(
            &args.checkpoint,
            args.config.as_deref(),
            &args.vq,
            &args.vq_args,
            &args.device,
        )?;
        let bar = progress(n as u64, (n - missing) as u64, "samples");
        let start = std::time::Instant::now();
        for &k in &todo {
            let r = range(k);
            let mut rng = rand::rngs::StdRng::seed_from_u64(derived_seed(args.seed, 0, k as u64));
            let mut pixels = Vec::with_capacity(r.len() * args.image_size_eval.pow(2) * 3);
            let mut shape = vec![0, 0, 0, 3];
            for b0 in r.clone().step_by(args.batch_size) {
                let b1 = r.end.min(b0 + args.batch_size);
                let cond = Condition::Class(Tensor::from_vec(
                    labels[b0..b1].to_vec(),
                    b1 - b0,
                    &sampler.device,
                )?);
                let (images, _) = sampler.sample(&cond, None, &sc, args.batch_size, &mut rng)?;
                let images = resize_images(&images, args.image_size_eval)?;
                let (s, bytes) = images_u8(&images)?;
                shape = vec![shape[0] + s[0], s[1], s[2], s[3]];
                pixels.extend(bytes);
                bar.inc((b1 - b0) as u64);
            }
            write_npz(
                &shard_path(&shards_dir, k),
                &shape,
                &pixels,
                Some(&labels[r.clone()]),
            )?;
        }
        bar.finish_and_clear();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "sampled {missing} images in {secs:.1} s ({:.2} images/s)",
            missing as f64 / secs.max(1e-9)
        );
    }

    // The evaluator's batch: every shard's images, in order, and their labels.
    let samples = dir.join("samples.npz");
    let side = args.image_size_eval;
    if !samples.exists() {
        let item = side * side * 3;
        let mut w = NpzWriter::create(&samples)?;
        w.begin("arr_0", "|u1", &[n, side, side, 3], (n * item) as u64)?;
        for k in 0..shards {
            let p = shard_path(&shards_dir, k);
            let im = batch::npz_images(&p)?;
            if (im.n, im.height, im.width) != (range(k).len(), side, side) {
                bail!(
                    "{}: {} images of {}x{} px, expected {} of {side}x{side}: delete it to sample it again",
                    p.display(),
                    im.n,
                    im.width,
                    im.height,
                    range(k).len()
                );
            }
            w.write(&im.pixels)?;
        }
        let bytes: Vec<u8> = labels
            .iter()
            .flat_map(|&x| (x as i64).to_le_bytes())
            .collect();
        w.array("arr_1", "<i8", &[n], &bytes)?;
        w.finish()?;
        eprintln!(
            "wrote {} (arr_0: uint8 [{n}, {side}, {side}, 3], arr_1: labels)",
            samples.display()
        );
    }

    // Metrics: the samples' activations shard by shard (one shard in memory at a time).
    let model =
        crate::eval_cmd::load_inception(&args.inception, args.eval_batch_size, args.intra_threads)?;
    let bar = progress(n as u64, 0, "sample activations");
    let mut acts = Activations::default();
    for k in 0..shards {
        let im = batch::npz_images(&shard_path(&shards_dir, k))?;
        let base = range(k).start as u64;
        acts.append(model.activations(&im, |done| bar.set_position(base + done as u64))?);
    }
    bar.finish_and_clear();
    let mut json = crate::eval_cmd::metrics_against(&model, &acts, &args.reference)?;
    json["sampling"] = settings;
    json["samples_path"] = samples.display().to_string().into();
    json["reference_path"] = args.reference.display().to_string().into();
    let out = dir.join("metrics.json");
    crate::eval_sampling::write_atomic(
        &out,
        (serde_json::to_string_pretty(&json)? + "\n").as_bytes(),
    )?;
    eprintln!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
