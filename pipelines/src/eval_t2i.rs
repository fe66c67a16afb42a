//! `llamagen eval t2i`: the paper's text-to-image protocol (GigaGAN's evaluation, LlamaGen's
//! `evaluations/t2i/evaluation.py`): the CLIP score of a folder of generated images and their
//! captions, and clean-fid's FID of those images against a reference folder (COCO val2014) or
//! its saved statistics, both at `--eval-res` (see `llamagen_eval::clean` and
//! `llamagen_eval::clip_score` for what is reproduced and how).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use llamagen_eval::FidStats;
use llamagen_eval::clean::{self, CleanInception};
use llamagen_eval::clip_score::{self, CaptionMismatch, ClipModels};
use llamagen_filters::model::ModelOptions;

#[derive(Args, Debug)]
pub struct T2iArgs {
    /// Generated images in GigaGAN's layout: DIR/images/*.png and DIR/captions.txt (one caption
    /// per image, in the images' natural-sort order). With --checkpoint, the folder the prompts
    /// are sampled into first (resumable: a re-run continues).
    #[arg(long)]
    pub sample: PathBuf,
    #[command(flatten)]
    pub sampling: T2iSamplingArgs,
    /// Reference: a folder of images (e.g. COCO val2014; every image clean-fid finds, recursively)
    /// or a statistics `.npz` with `mu` and `sigma` (from --save-ref-stats or clean-fid).
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// clean-fid's Inception-v3 as ONNX (`scripts/export-inception.py --clean`).
    #[arg(long)]
    pub inception_clean: PathBuf,
    /// CLIP ViT-B/32 image encoder (ONNX, as the filters use); without it and --clip-text the
    /// CLIP score is skipped.
    #[arg(long)]
    pub clip_image: Option<PathBuf>,
    /// CLIP ViT-B/32 text encoder (ONNX).
    #[arg(long)]
    pub clip_text: Option<PathBuf>,
    /// Side the images are centre-cropped and LANCZOS-resized to before both metrics (0: crop
    /// only).
    #[arg(long, default_value_t = 256)]
    pub eval_res: u32,
    /// Pairs the CLIP score averages (the first ones in natural-sort order).
    #[arg(long, default_value_t = 30000)]
    pub how_many: usize,
    /// Pair captions and images as the official script's zip does when their numbers differ
    /// (the extra ones are left out of the CLIP score) instead of failing.
    #[arg(long)]
    pub allow_caption_mismatch: bool,
    /// Images per inference call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// ONNX Runtime threads inside one operator (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_threads: usize,
    /// Write the reference folder's mu/sigma to this `.npz`, to pass as --ref next time.
    #[arg(long)]
    pub save_ref_stats: Option<PathBuf>,
    /// Write the metrics as JSON (default: SAMPLE/score.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Sampling the prompts into `--sample` before evaluating (the paper's protocol in one command:
/// the 30,000 COCO captions of `coco_captions.csv`, the official `sample_t2i_ddp.py` settings).
#[derive(Args, Debug)]
pub struct T2iSamplingArgs {
    /// t2i GPT checkpoint to sample from first: a training checkpoint directory, or a weights
    /// file with --config.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Run config (TOML) whose [model] describes the GPT (for a weights file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ checkpoint.
    #[arg(long)]
    pub vq: Option<PathBuf>,
    /// VQ architecture: vq16, vq8, reduced, or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub vq_args: String,
    /// Prompts: a CSV/TSV with a header (`coco_captions.csv`: the Prompt/caption/text column).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// T5 encoder directory for the prompts (flan-t5-xl for the official models).
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// tokenizer.json of the T5 encoder (default: T5/tokenizer.json).
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// Sampling as `sample_t2i_ddp.py`: CFG 7.5, top-k 1000, top-p 1, temperature 1.
    #[arg(long, default_value_t = 7.5)]
    pub cfg_scale: f32,
    #[arg(long, default_value_t = 1000)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts generated together (one KV cache; the unit of resumption).
    #[arg(long, default_value_t = 32)]
    pub sample_batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What to evaluate, and with which models (the fields of [`T2iArgs`]).
#[derive(Debug, Clone)]
pub struct T2iEval {
    pub sample: PathBuf,
    pub reference: PathBuf,
    pub inception_clean: PathBuf,
    /// CLIP image and text encoders; `None` skips the CLIP score.
    pub clip: Option<(PathBuf, PathBuf)>,
    /// `None`: centre crop only.
    pub eval_res: Option<u32>,
    pub how_many: usize,
    pub caption_mismatch: CaptionMismatch,
    pub batch_size: usize,
    pub intra_threads: usize,
    pub save_ref_stats: Option<PathBuf>,
    /// Show progress bars on stderr.
    pub progress: bool,
}

/// The metrics, as written to the JSON report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct T2iReport {
    /// Mean cosine similarity (not ×100); `None` when no CLIP models were given.
    pub clip_score: Option<f64>,
    pub fid: f64,
    /// `FID_256px` as the official script prints it.
    pub fid_label: String,
    pub eval_res: Option<u32>,
    /// Pairs the CLIP score averaged.
    pub clip_pairs: usize,
    pub how_many: usize,
    /// Images of the sample folder in the FID (all of DIR/images, as clean-fid globs them).
    pub sample_images: usize,
    pub captions: usize,
    /// Reference images (0 when statistics were given).
    pub reference_images: usize,
    /// `images` (a folder) or `file` (a statistics `.npz`).
    pub reference_statistics: &'static str,
    pub reference: String,
    pub inception_model: String,
    pub inception_sha256: String,
    pub clip_image_model: Option<String>,
    pub clip_text_model: Option<String>,
    pub note: &'static str,
}

const NOTE: &str = "CLIP score from float32 ONNX CLIP models (the official script runs OpenAI CLIP in \
float16 on CUDA); JPEG files decoded with zune-jpeg (PIL: libjpeg-turbo, pixels a level or two apart)";

fn bar(show: bool, what: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{bar:30}} {{pos}}/{{len}} images [{{elapsed_precise}}]"
        ))
        .expect("progress template"),
    );
    bar
}

fn fid_label(eval_res: Option<u32>) -> String {
    match eval_res {
        Some(r) => format!("FID_{r}px"),
        None => "FID".into(),
    }
}

/// Where `--save-ref-stats` records how the statistics were made: `STATS.npz.json`.
fn provenance_path(stats: &Path) -> PathBuf {
    let mut p = stats.as_os_str().to_owned();
    p.push(".json");
    PathBuf::from(p)
}

/// Refuses statistics saved at another `--eval-res` or with another Inception model (their FID
/// would be meaningless); statistics without a record (clean-fid's own) are used with a note.
fn check_stats_provenance(stats: &Path, eval_res: Option<u32>, inception: &str) -> Result<()> {
    let side = provenance_path(stats);
    let Ok(text) = std::fs::read_to_string(&side) else {
        eprintln!(
            "note: {} has no record of its --eval-res and Inception model ({} is missing): they are assumed to match",
            stats.display(),
            side.display()
        );
        return Ok(());
    };
    let meta: serde_json::Value =
        serde_json::from_str(&text).with_context(|| side.display().to_string())?;
    if meta["eval_res"] != serde_json::json!(eval_res) {
        bail!(
            "{}: the statistics were computed at --eval-res {}, this run uses {}",
            stats.display(),
            meta["eval_res"],
            eval_res.map_or("0".to_string(), |r| r.to_string())
        );
    }
    if meta["inception_sha256"] != serde_json::json!(inception) {
        bail!(
            "{}: the statistics were computed with another Inception model ({}, SHA-256 {})",
            stats.display(),
            meta["inception_model"],
            meta["inception_sha256"]
        );
    }
    Ok(())
}

/// The CLIP score and FID of `cfg.sample` (see the module docs).
pub fn evaluate_t2i(cfg: &T2iEval) -> Result<T2iReport> {
    let opts = ModelOptions {
        intra_threads: cfg.intra_threads,
        batch_size: cfg.batch_size.max(1),
        ..ModelOptions::default()
    };
    // CLIP score (the captions are read only for it: FID needs the images alone).
    let mut captions = 0;
    let (clip, clip_pairs, names) = match &cfg.clip {
        Some((image, text)) => {
            let sample = clip_score::load_sample(&cfg.sample, cfg.caption_mismatch)?;
            captions = sample.captions.len();
            let models = ClipModels::load(image, text, &opts)?;
            let n = sample.pairs.min(cfg.how_many);
            let b = bar(cfg.progress, "CLIP score");
            b.set_length(n as u64);
            let cos = models.cosines(&sample, cfg.eval_res, cfg.how_many, |d| {
                b.set_position(d as u64)
            })?;
            b.finish_and_clear();
            let score = clip_score::clip_score(&cos, cfg.how_many)?;
            (
                Some(score),
                cos.len(),
                (
                    Some(models.image.name.clone()),
                    Some(models.text.name.clone()),
                ),
            )
        }
        None => (None, 0, (None, None)),
    };

    // FID.
    let model = CleanInception::load(&cfg.inception_clean, &opts)?;
    let features = |dir: &Path, what: &str| -> Result<clean::Features> {
        let b = bar(cfg.progress, what);
        let f = model.folder_features(dir, cfg.eval_res, |d, t| {
            b.set_length(t as u64);
            b.set_position(d as u64)
        })?;
        b.finish_and_clear();
        Ok(f)
    };
    let (ref_stats, reference_images, source): (FidStats, usize, &'static str) =
        if cfg.reference.is_dir() {
            let f = features(&cfg.reference, "reference features")?;
            (f.stats()?, f.n, "images")
        } else {
            if cfg.save_ref_stats.is_some() {
                bail!(
                    "--save-ref-stats needs a reference folder; {} is a statistics file already",
                    cfg.reference.display()
                );
            }
            check_stats_provenance(&cfg.reference, cfg.eval_res, &model.sha256)?;
            (clean::read_stats_npz(&cfg.reference)?, 0, "file")
        };
    if let Some(path) = &cfg.save_ref_stats {
        clean::write_stats_npz(path, &ref_stats)?;
        let meta = serde_json::json!({
            "eval_res": cfg.eval_res,
            "inception_model": model.name,
            "inception_sha256": model.sha256,
            "reference": cfg.reference.display().to_string(),
            "images": reference_images,
        });
        let side = provenance_path(path);
        std::fs::write(&side, serde_json::to_string_pretty(&meta)? + "\n")
            .with_context(|| side.display().to_string())?;
        eprintln!(
            "wrote the reference statistics to {} (and how they were made to {})",
            path.display(),
            side.display()
        );
    }
    let smp = features(&cfg.sample.join("images"), "sample features")?;
    if ref_stats.dim != smp.dim {
        bail!(
            "{}: statistics of width {}, the model's features are {} wide",
            cfg.reference.display(),
            ref_stats.dim,
            smp.dim
        );
    }
    let fid = smp.stats()?.frechet_distance(&ref_stats)?;
    Ok(T2iReport {
        clip_score: clip,
        fid,
        fid_label: fid_label(cfg.eval_res),
        eval_res: cfg.eval_res,
        clip_pairs,
        how_many: cfg.how_many,
        sample_images: smp.n,
        captions,
        reference_images,
        reference_statistics: source,
        reference: cfg.reference.display().to_string(),
        inception_model: model.name.clone(),
        inception_sha256: model.sha256.clone(),
        clip_image_model: names.0,
        clip_text_model: names.1,
        note: NOTE,
    })
}

/// Samples the prompts of `--prompts` into `--sample` when `--checkpoint` is given.
fn sample_first(args: &T2iArgs) -> Result<()> {
    let a = &args.sampling;
    let Some(checkpoint) = &a.checkpoint else {
        if a.prompts.is_some() || a.vq.is_some() || a.t5.is_some() {
            bail!("--prompts, --vq and --t5 sample from a model: give --checkpoint too");
        }
        return Ok(());
    };
    let need = |v: &Option<PathBuf>, flag: &str| -> Result<PathBuf> {
        v.clone()
            .with_context(|| format!("sampling from --checkpoint needs {flag}"))
    };
    let prompts: Vec<String> = crate::sample_cmd::read_prompts(&need(&a.prompts, "--prompts")?)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let opts = crate::sample_cmd::T2iFolderSampling {
        checkpoint: checkpoint.clone(),
        config: a.config.clone(),
        vq: need(&a.vq, "--vq")?,
        vq_args: a.vq_args.clone(),
        t5: need(&a.t5, "--t5")?,
        t5_tokenizer: a.t5_tokenizer.clone(),
        sampling: llamagen_train::sample::SamplingConfig {
            cfg_scale: a.cfg_scale,
            cfg_interval: -1,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            sample_logits: true,
        },
        seed: a.seed,
        batch_size: a.sample_batch_size,
        device: a.device.clone(),
        // GigaGAN's evaluation crops and resizes (LANCZOS) to --eval-res itself.
        image_size_eval: None,
        progress: true,
    };
    let done = crate::sample_cmd::sample_t2i_folder(&opts, &prompts, &args.sample)?;
    eprintln!(
        "{}: {} images ({} generated now)",
        args.sample.display(),
        done.images,
        done.generated
    );
    Ok(())
}

pub fn run(args: T2iArgs) -> Result<ExitCode> {
    let clip = match (&args.clip_image, &args.clip_text) {
        (Some(i), Some(t)) => Some((i.clone(), t.clone())),
        (None, None) => None,
        _ => bail!("the CLIP score needs both --clip-image and --clip-text"),
    };
    // The models are checked before any sampling, so a wrong path fails at once, not after it.
    for m in [
        Some(&args.inception_clean),
        args.clip_image.as_ref(),
        args.clip_text.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if !m.is_file() {
            bail!("{}: no such model file", m.display());
        }
    }
    sample_first(&args)?;
    if clip.is_none() {
        println!("CLIP score: skipped (no --clip-image/--clip-text)");
    }
    let cfg = T2iEval {
        sample: args.sample.clone(),
        reference: args.reference.clone(),
        inception_clean: args.inception_clean.clone(),
        clip,
        eval_res: (args.eval_res > 0).then_some(args.eval_res),
        how_many: args.how_many,
        caption_mismatch: if args.allow_caption_mismatch {
            CaptionMismatch::Truncate
        } else {
            CaptionMismatch::Error
        },
        batch_size: args.batch_size,
        intra_threads: args.intra_threads,
        save_ref_stats: args.save_ref_stats.clone(),
        progress: true,
    };
    let report = evaluate_t2i(&cfg)?;
    if let Some(s) = report.clip_score {
        println!("CLIP score: {s}");
    }
    println!("{}: {}", report.fid_label, report.fid);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.sample.join("score.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
