//! A whole tokenizer training run from a TOML config: data, training loop, checkpoints with
//! resume, metrics file, held-out evaluation (PSNR, SSIM, codebook usage, reconstruction grid)
//! and the export of the trained VQ model in the official key layout.
//!
//! Invariants enforced here:
//! - Step `s` (0-based) trains on samples `s·B .. (s+1)·B` of the image stream (see
//!   [`super::data`]), so a resumed run reads exactly what an uninterrupted one would.
//! - Checkpoints live in `out_dir/checkpoints/{steps:07}/` and are written every `ckpt_every`
//!   steps and at the end; a run whose `out_dir` holds checkpoints resumes from the newest one,
//!   and refuses to if the checkpoint's step configuration differs from the config's.
//! - `out_dir/metrics.jsonl` gets one line per `log_every` steps (every loss term, gradient
//!   norms, codebook usage, steps per second); lines past the resumed step are dropped.
//! - Evaluation centre-crops (`center_crop_arr`) the first `num_images` held-out images, runs
//!   the model in inference mode and reports LlamaGen's PSNR/SSIM, and the share of the
//!   codebook its codes use; it writes `out_dir/eval/{steps:07}.json` and
//!   `out_dir/eval/{steps:07}.png` (top row originals, bottom row reconstructions, up to
//!   `grid_images` columns).
//! - At the end the model is exported as `out_dir/vq.safetensors` (and `out_dir/vq_ema.safetensors`
//!   with EMA), loadable by `VqModel::from_file`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use image::RgbImage;
use llamagen_encode::augment::{center_crop_arr, to_tensor};
use llamagen_encode::metrics::llamagen_reconstruction_metrics;
use llamagen_encode::vq::ModelArgs;
use serde::{Deserialize, Serialize};

use super::{
    DiscConfig, ImageSource, ImageSourceConfig, LossConfig, Lpips, VqOptimConfig, VqStepConfig,
    VqStepStats, VqTrainer,
};
use crate::error::{Result, TrainError};

/// `[train]`: the loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoopConfig {
    /// Output directory (checkpoints, metrics, evaluation, export).
    pub out_dir: PathBuf,
    /// Official VQ checkpoint (`.pt`/`.pth` or safetensors) to fine-tune; none: from scratch.
    pub init: Option<PathBuf>,
    /// Training image side. Default 256.
    pub image_size: u32,
    /// Images per step. Default 8.
    pub batch_size: usize,
    /// Total steps. Default 1000.
    pub steps: u64,
    /// Random crop fraction range (`random_crop_arr`). Default 0.8..1.0.
    pub crop_min: f64,
    pub crop_max: f64,
    /// Checkpoint interval in steps. Default 1000.
    pub ckpt_every: u64,
    /// Metrics line interval in steps. Default 10.
    pub log_every: u64,
    /// Evaluation interval in steps (0: only at the end). Default 0.
    pub eval_every: u64,
    /// `cpu`, `cuda` or `cuda:N`. Default cpu.
    pub device: String,
    /// Draw a progress bar on stderr. Default true.
    pub progress: bool,
    /// Seed of initialisation, data order, crops, flips and dropout. Default 0.
    pub seed: u64,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            out_dir: PathBuf::from("runs/tokenizer"),
            init: None,
            image_size: 256,
            batch_size: 8,
            steps: 1000,
            crop_min: 0.8,
            crop_max: 1.0,
            ckpt_every: 1000,
            log_every: 10,
            eval_every: 0,
            device: "cpu".into(),
            progress: true,
            seed: 0,
        }
    }
}

/// `[lpips]`: the perceptual loss's networks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LpipsConfig {
    /// torchvision `vgg16` ImageNet state_dict (`vgg16-397923af.pth` or a safetensors copy).
    pub vgg16: PathBuf,
    /// LPIPS linear heads; none: the bundled LPIPS v0.1 VGG heads.
    pub lin: Option<PathBuf>,
}

/// `[eval]`: held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Held-out images; none: no evaluation.
    pub data: Option<ImageSourceConfig>,
    /// Images evaluated. Default 16.
    pub num_images: usize,
    /// Columns of the reconstruction grid. Default 8.
    pub grid_images: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            data: None,
            num_images: 16,
            grid_images: 8,
        }
    }
}

/// A tokenizer training config (TOML): `[train]`, `[model]` (VQ `ModelArgs`, default VQ-16),
/// `[disc]`, `[loss]`, `[optim]`, `[lpips]`, `[data]`, `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerTrainConfig {
    #[serde(default)]
    pub train: LoopConfig,
    #[serde(default)]
    pub model: ModelArgs,
    #[serde(default)]
    pub disc: DiscConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub optim: VqOptimConfig,
    #[serde(default)]
    pub lpips: LpipsConfig,
    pub data: ImageSourceConfig,
    #[serde(default)]
    pub eval: EvalConfig,
}

impl TokenizerTrainConfig {
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| TrainError::InvalidConfig(e.to_string()))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml(&text)
            .map_err(|e| TrainError::InvalidConfig(format!("{}: {e}", path.display())))
    }

    /// The settings a training step depends on.
    pub fn step_config(&self) -> VqStepConfig {
        VqStepConfig {
            model: self.model.clone(),
            disc: self.disc.clone(),
            loss: self.loss.clone(),
            optim: self.optim.clone(),
            seed: self.train.seed,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VqMetricsLine {
    /// Steps completed.
    pub step: u64,
    #[serde(flatten)]
    pub stats: VqStepStats,
    pub steps_per_s: f64,
}

/// Held-out evaluation results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub step: u64,
    pub images: usize,
    pub psnr: f64,
    pub ssim: f64,
    /// Distinct codes over the evaluated images / codebook size.
    pub codebook_usage: f64,
    pub grid: PathBuf,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct VqRunSummary {
    pub start_step: u64,
    pub steps: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub exported: PathBuf,
    pub last_stats: Option<VqStepStats>,
    pub eval: Option<EvalReport>,
}

fn checkpoints(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = out.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for e in rd {
        let e = e.map_err(|e| TrainError::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Ok(step) = name.parse::<u64>()
            && e.path().join(super::CKPT_STATE).exists()
        {
            found.push((step, e.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Evaluates `trainer`'s model on the first `n` images of `src` (module invariants).
pub fn evaluate(
    trainer: &VqTrainer,
    src: &mut ImageSource,
    cfg: &EvalConfig,
    image_size: u32,
    out_dir: &Path,
) -> Result<EvalReport> {
    let n = cfg.num_images.min(src.len());
    let device = trainer.device().clone();
    let model = trainer.model();
    let (mut psnr, mut ssim) = (0.0, 0.0);
    let mut codes = std::collections::BTreeSet::new();
    let mut originals = Vec::new();
    let mut recons = Vec::new();
    for i in 0..n {
        let img = center_crop_arr(&src.image(i)?, image_size)?;
        let x = to_tensor(std::slice::from_ref(&img), &device)?;
        let q = model.encode(&x)?;
        let rec = model.decode(&q.quant)?;
        for c in q.indices.to_vec1::<u32>()? {
            codes.insert(c);
        }
        let (p, s) = llamagen_reconstruction_metrics(&x.get(0)?, &rec.get(0)?)?;
        psnr += p;
        ssim += s;
        if originals.len() < cfg.grid_images {
            originals.push(img);
            recons.push(to_rgb(&rec.get(0)?)?);
        }
    }
    let step = trainer.steps();
    let dir = out_dir.join("eval");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let grid = dir.join(format!("{step:07}.png"));
    write_grid(&grid, &originals, &recons, image_size)?;
    let report = EvalReport {
        step,
        images: n,
        psnr: psnr / n.max(1) as f64,
        ssim: ssim / n.max(1) as f64,
        codebook_usage: codes.len() as f64 / model.args().codebook_size as f64,
        grid,
    };
    let path = dir.join(format!("{step:07}.json"));
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Json {
        path: path.clone(),
        source: e,
    })?;
    std::fs::write(&path, json).map_err(|e| TrainError::io(&path, e))?;
    Ok(report)
}

fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    llamagen_encode::augment::to_rgb_image(t)
        .map_err(|e| TrainError::InvalidInput(format!("reconstruction image: {e}")))
}

fn write_grid(path: &Path, top: &[RgbImage], bottom: &[RgbImage], size: u32) -> Result<()> {
    let cols = top.len().max(1) as u32;
    let mut grid = RgbImage::new(cols * size, 2 * size);
    for (row, imgs) in [top, bottom].iter().enumerate() {
        for (i, img) in imgs.iter().enumerate() {
            image::imageops::replace(
                &mut grid,
                img,
                (i as u32 * size) as i64,
                (row as u32 * size) as i64,
            );
        }
    }
    grid.save(path)
        .map_err(|e| TrainError::Data(format!("writing {}: {e}", path.display())))
}

/// Trains as `cfg` says (module invariants).
pub fn run(cfg: &TokenizerTrainConfig) -> Result<VqRunSummary> {
    let lc = &cfg.train;
    if lc.batch_size == 0 || lc.log_every == 0 || lc.ckpt_every == 0 {
        return Err(TrainError::InvalidConfig(
            "train.batch_size, train.log_every and train.ckpt_every must be positive".into(),
        ));
    }
    let device = crate::run::parse_device(&lc.device)?;
    let step_cfg = cfg.step_config();
    let lpips = Lpips::load(
        &cfg.lpips.vgg16,
        cfg.lpips.lin.as_deref(),
        cfg.loss.lpips_dropout,
        &device,
    )?;
    let out = &lc.out_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let mut trainer = match checkpoints(out)?.last() {
        Some((_, dir)) => {
            let t = VqTrainer::load_checkpoint(dir, lpips, &device)?;
            if t.config() != &step_cfg {
                return Err(TrainError::InvalidConfig(format!(
                    "checkpoint {} was written with another [model]/[disc]/[loss]/[optim]/seed \
                     configuration; use a new train.out_dir",
                    dir.display()
                )));
            }
            t
        }
        None => VqTrainer::new(&step_cfg, lc.init.as_deref(), lpips, &device)?,
    };
    let start_step = trainer.steps();
    let mut src = ImageSource::open(&cfg.data, lc.seed)?;
    let mut eval_src = match &cfg.eval.data {
        Some(d) => Some(ImageSource::open(d, lc.seed)?),
        None => None,
    };
    let metrics_path = out.join("metrics.jsonl");
    let mut kept: Vec<String> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= start_step)
        })
        .map(str::to_string)
        .collect();
    let bar = if lc.progress {
        let b = indicatif::ProgressBar::new(lc.steps);
        b.set_position(start_step.min(lc.steps));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        Some(b)
    } else {
        None
    };
    let mut last_ckpt = None;
    let mut last_stats = None;
    let mut last_eval = None;
    let mut tick = Instant::now();
    let mut since = 0u64;
    while trainer.steps() < lc.steps {
        let s = trainer.steps();
        let imgs = (0..lc.batch_size as u64)
            .map(|i| {
                src.sample(
                    s * lc.batch_size as u64 + i,
                    lc.image_size,
                    (lc.crop_min, lc.crop_max),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let x = to_tensor(&imgs, &device)?;
        let stats = trainer.step(&x)?;
        since += 1;
        let done = trainer.steps();
        if done % lc.log_every == 0 || done == lc.steps {
            let line = VqMetricsLine {
                step: done,
                stats: stats.clone(),
                steps_per_s: since as f64 / tick.elapsed().as_secs_f64().max(1e-9),
            };
            kept.push(serde_json::to_string(&line).expect("metrics serialise"));
            let mut text = kept.join("\n");
            text.push('\n');
            std::fs::write(&metrics_path, text).map_err(|e| TrainError::io(&metrics_path, e))?;
            tick = Instant::now();
            since = 0;
        }
        if let Some(b) = &bar {
            b.set_position(done);
            b.set_message(format!(
                "loss {:.4} rec {:.4} lpips {:.4} d {:.4} usage {:.3}",
                stats.loss_gen,
                stats.rec_loss,
                stats.perceptual_loss,
                stats.loss_disc,
                stats.codebook_usage.unwrap_or(0.0)
            ));
        }
        if done % lc.ckpt_every == 0 || done == lc.steps {
            let dir = out.join("checkpoints").join(format!("{done:07}"));
            trainer.save_checkpoint(&dir)?;
            last_ckpt = Some(dir);
        }
        if let Some(e) = eval_src.as_mut()
            && lc.eval_every > 0
            && done % lc.eval_every == 0
            && done != lc.steps
        {
            last_eval = Some(evaluate(&trainer, e, &cfg.eval, lc.image_size, out)?);
        }
        last_stats = Some(stats);
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some(e) = eval_src.as_mut() {
        last_eval = Some(evaluate(&trainer, e, &cfg.eval, lc.image_size, out)?);
    }
    let exported = out.join("vq.safetensors");
    trainer.export_vq(&exported, false)?;
    if cfg.optim.ema {
        trainer.export_vq(&out.join("vq_ema.safetensors"), true)?;
    }
    Ok(VqRunSummary {
        start_step,
        steps: trainer.steps(),
        last_checkpoint: last_ckpt,
        exported,
        last_stats,
        eval: last_eval,
    })
}
