//! A whole training run from a TOML config (`llamagen train --config run.toml`): model, data
//! from a catalog, AdamW with the official groups and an lr schedule, gradient accumulation,
//! dropout, checkpoints with exact resume, stage-II initialisation, a NaN/Inf guard, metrics
//! (JSON lines), a loss-curve PNG and a progress bar.
//!
//! Invariants enforced here:
//! - Unknown keys anywhere in the config are refused with their name.
//! - Step `s` (0-based) reads samples `(s * grad_accum + j) * batch_size ..` of the rank's stream
//!   for micro-batch `j`, draws its dropout from [`step_rng`]`(seed, s)` and uses lr
//!   `schedule.lr_at(s)`; with the weights and AdamW moments of a checkpoint nothing else
//!   carries state, so on CPU a resumed run repeats the losses of an uninterrupted one bit for bit.
//! - Fresh weights are drawn from a generator seeded by `train.seed` (the official
//!   initialisation: N(0, initializer_range) linears and embeddings, ones for norms, zeros for
//!   `output`, N(0, 1/caption_dim) for the t2i null caption), so two runs with one seed start equal.
//! - A non-finite loss or gradient norm stops the run before the optimiser sees it; the error
//!   names the step and the last good checkpoint, and no checkpoint is written after it.
//! - Checkpoints are `output_dir/checkpoints/{step:07}/` ([`save_training_checkpoint`]);
//!   `output_dir/metrics.jsonl` holds one JSON object per log interval (after a resume, lines past
//!   the resumed step are dropped first) and `output_dir/loss.png` is redrawn from it at every
//!   checkpoint and at the end.
//! - `output.init_from` (stage II from stage I, when not resuming) loads the weights of a
//!   checkpoint whose tensors have this model's shapes (its grid and dropouts may differ); with
//!   `output.init_optimizer` (default) and a training checkpoint directory it also restores the
//!   AdamW moments and step count and the run continues from that step, as the official
//!   `--gpt-ckpt` does, but without rounding the step down to an epoch of the new data. A
//!   checkpoint step >= `train.steps` is a config error (nothing would be trained).
//! - With `optim.ema`, an EMA of the parameters (the official `update_ema`) starts as a copy of
//!   the starting weights, is updated after every optimiser step, and is saved in every
//!   checkpoint with the model's buffers; a resume (or a stage II that continues stage I's
//!   optimiser) restores the checkpoint's EMA, or starts it from the checkpoint's weights when
//!   there is none, as the official script does; a resumed run's EMA equals an uninterrupted
//!   run's.
//! - Data parallel ([`run_with`] on a [`Comm`] of `W` ranks, see `train::train_step_with` for the
//!   step): every rank reads the table version rank 0 found and its own share of each epoch
//!   (`CatalogLoader` rank/world), starts from rank 0's parameters (broadcast after
//!   initialisation or loading), draws its dropout from `step_rng(seed·W + rank, s)` (the
//!   official `global_seed·world_size + rank`; `W = 1` gives the single-process stream), and
//!   resumes from the checkpoint rank 0 chose. Only rank 0 writes `config.toml`, metrics, the
//!   loss curve, checkpoints and progress; the checkpoint holds the whole optimiser state, so a
//!   run resumes on any world size. `train.batch_size` is per rank: the global batch is
//!   `W · batch_size · grad_accum`, and step `s` of rank `r` reads positions
//!   `((s·grad_accum + j)·batch_size + i)·W + r` of the epoch order, i.e. the same samples one
//!   process with `W` times the batch reads. Every rank returns only after rank 0 wrote the
//!   last checkpoint (a final barrier).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use crate::checkpoint::seeded_init;
use crate::checkpoint::{load_into_varmap, new_trainable, read_state_dict};
use crate::config::{GptConfig, GptSize, ModelType};
use crate::data::{CatalogLoader, DataConfig, SampleSpec};
use crate::dist::Comm;
use crate::error::{Result, TrainError};
use crate::gpt::Gpt;
use crate::optim::{AdamW, AdamWConfig, Ema, LrSchedule};
use crate::train::{
    EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, TrainState, broadcast_parameters,
    gather_optimizer_state, load_optimizer_state, load_training_checkpoint, parameter_digest,
    read_train_state, save_training_checkpoint_state, save_training_checkpoint_with, step_rng,
    train_step_with,
};

/// The `[model]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Official size name (`GPT-B`, `GPT-L`, `GPT-XL`, `GPT-XXL`, `GPT-XXXL`, `GPT-1B`,
    /// `GPT-3B`, `GPT-7B`); `dim`, `n_layer` and `n_head` override it (all three are needed
    /// without a size).
    pub size: Option<String>,
    pub dim: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    /// `c2i` or `t2i`. Default c2i.
    #[serde(rename = "type")]
    pub model_type: ModelType,
    /// Image side in pixels; the code grid is `image_size / vq_downsample` (256 -> 16x16,
    /// 512 -> 32x32 with VQ-16). Default 256.
    pub image_size: u32,
    /// Downsampling factor of the VQ that made the codes. Default 16.
    pub vq_downsample: u32,
    /// Codebook size. Default 16384.
    pub vocab_size: usize,
    /// c2i classes. Default 1000.
    pub num_classes: usize,
    /// t2i caption feature width. Default 2048 (flan-t5-xl).
    pub caption_dim: usize,
    /// Condition positions (default: 1 for c2i, 120 for t2i).
    pub cls_token_num: Option<usize>,
    /// Dropouts (official defaults).
    pub token_dropout_p: f64,
    pub attn_dropout_p: f64,
    pub resid_dropout_p: f64,
    pub ffn_dropout_p: f64,
    /// Label / caption dropout for classifier-free guidance. Default 0.1.
    pub class_dropout_prob: f64,
}

impl Default for ModelSection {
    fn default() -> Self {
        let d = GptConfig::default();
        ModelSection {
            size: None,
            dim: None,
            n_layer: None,
            n_head: None,
            model_type: ModelType::C2i,
            image_size: 256,
            vq_downsample: 16,
            vocab_size: d.vocab_size,
            num_classes: d.num_classes,
            caption_dim: d.caption_dim,
            cls_token_num: None,
            token_dropout_p: d.token_dropout_p,
            attn_dropout_p: d.attn_dropout_p,
            resid_dropout_p: d.resid_dropout_p,
            ffn_dropout_p: d.ffn_dropout_p,
            class_dropout_prob: d.class_dropout_prob,
        }
    }
}

impl ModelSection {
    /// The GPT configuration this section describes.
    pub fn gpt_config(&self) -> Result<GptConfig> {
        let bad = |m: String| TrainError::InvalidConfig(m);
        let (mut n_layer, mut n_head, mut dim) = (self.n_layer, self.n_head, self.dim);
        if let Some(name) = &self.size {
            let size = GptSize::from_name(name).ok_or_else(|| {
                bad(format!(
                    "model.size {name:?} is not one of GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-XXXL, GPT-1B, GPT-3B, GPT-7B"
                ))
            })?;
            let (l, h, d) = size.dims();
            n_layer = n_layer.or(Some(l));
            n_head = n_head.or(Some(h));
            dim = dim.or(Some(d));
        }
        let (Some(n_layer), Some(n_head), Some(dim)) = (n_layer, n_head, dim) else {
            return Err(bad(
                "model: give `size` or all of `dim`, `n_layer`, `n_head`".into(),
            ));
        };
        if self.vq_downsample == 0 || !self.image_size.is_multiple_of(self.vq_downsample) {
            return Err(bad(format!(
                "model.image_size {} is not a multiple of vq_downsample {}",
                self.image_size, self.vq_downsample
            )));
        }
        let g = (self.image_size / self.vq_downsample) as usize;
        let cfg = GptConfig {
            dim,
            n_layer,
            n_head,
            vocab_size: self.vocab_size,
            num_classes: self.num_classes,
            caption_dim: self.caption_dim,
            model_type: self.model_type,
            cls_token_num: self.cls_token_num.unwrap_or(match self.model_type {
                ModelType::C2i => 1,
                ModelType::T2i => crate::config::UNCOND_CAPTION_TOKENS,
            }),
            block_size: g * g,
            token_dropout_p: self.token_dropout_p,
            attn_dropout_p: self.attn_dropout_p,
            resid_dropout_p: self.resid_dropout_p,
            ffn_dropout_p: self.ffn_dropout_p,
            class_dropout_prob: self.class_dropout_prob,
            ..GptConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Numeric precision of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// bf16 compute with f32 master weights and AdamW state (the official autocast recipe);
    /// meant for CUDA (on the CPU it works but is slow).
    Bf16,
}

/// The `[train]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Optimiser steps in total (a resumed run continues up to this). Default 1000.
    pub steps: u64,
    /// Samples per micro-batch on each rank. Default 2.
    pub batch_size: usize,
    /// Micro-batches per optimiser step. Default 1.
    pub grad_accum: usize,
    /// Run seed: weights, data order, crops, caption choice, dropout. Default 0.
    pub seed: u64,
    /// Gradient clipping norm. Default 1.0.
    pub max_grad_norm: f64,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with the `cuda` feature). Default cpu.
    pub device: String,
    /// `f32` or `bf16`. Default f32.
    pub precision: Precision,
    /// Data parallel: seconds a rank waits for another (rendezvous, each collective, rank 0
    /// writing a checkpoint) before failing. Default 1800 (PyTorch's 30 minutes).
    pub dist_timeout_s: u64,
    /// Data parallel: check every this many steps that all ranks hold bit-identical
    /// parameters (a digest compared at rank 0; a mismatch stops the run). 0: never. Default 0.
    pub check_replicas_every: u64,
    /// Data parallel: ZeRO-1, the AdamW moments sharded across the ranks (each rank updates its
    /// share of the parameters, then they are all-gathered). Default: on from 1e9 parameters
    /// (GPT-XXL and up), off below.
    pub zero: Option<bool>,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 1000,
            batch_size: 2,
            grad_accum: 1,
            seed: 0,
            max_grad_norm: 1.0,
            device: "cpu".into(),
            precision: Precision::F32,
            dist_timeout_s: 1800,
            check_replicas_every: 0,
            zero: None,
        }
    }
}

/// The `[optim]` table: AdamW and the lr schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    /// Peak learning rate. Default 1e-4 (constant, as the official recipe).
    pub lr: f64,
    /// Linear warm-up steps. Default 0.
    pub warmup_steps: u64,
    /// Cosine decay to `min_lr` ending at this step; 0 keeps the lr constant. Default 0.
    pub decay_steps: u64,
    pub min_lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Weight decay of every rank >= 2 parameter. Default 0.05.
    pub weight_decay: f64,
    /// Keep an EMA of the weights (the official `--ema`), saved as `ema.safetensors` in each
    /// checkpoint. Default false.
    pub ema: bool,
    /// EMA decay (the official 0.9999). Default 0.9999.
    pub ema_decay: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        let a = AdamWConfig::default();
        OptimSection {
            lr: a.lr,
            warmup_steps: 0,
            decay_steps: 0,
            min_lr: 0.0,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            ema: false,
            ema_decay: 0.9999,
        }
    }
}

impl OptimSection {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            decay_steps: self.decay_steps,
            min_lr: self.min_lr,
        }
    }
}

/// The `[output]` table: where checkpoints and logs go, what to start from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (checkpoints/, metrics.jsonl, loss.png). Required.
    pub dir: PathBuf,
    /// Write a checkpoint every this many steps (and always at the last step). Default 5000.
    pub checkpoint_every: u64,
    /// Log (metrics line, progress message) every this many steps. Default 10.
    pub log_every: u64,
    /// Show a progress bar on a terminal. Default true.
    pub progress: bool,
    /// Resume: `"latest"` (the newest checkpoint under `dir/checkpoints`, or a fresh start if
    /// there is none) or a checkpoint directory. Default: no resume.
    pub resume_from: Option<String>,
    /// Initialise the weights from a checkpoint (a training checkpoint directory or a weights
    /// file, safetensors or torch): stage II from stage I. Its tensors must have this model's
    /// shapes; the RoPE table is built for this run's grid. Ignored when resuming.
    pub init_from: Option<PathBuf>,
    /// With `init_from` a training checkpoint directory (`optimizer.safetensors` and
    /// `train_state.json`), also restore its AdamW moments and step count and continue the
    /// step counter from its step (the official `--gpt-ckpt`); `train.steps` is then the total
    /// and must exceed that step. False, or a plain weights file: weights only, fresh AdamW,
    /// step 0. Default true.
    pub init_optimizer: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: PathBuf::new(),
            checkpoint_every: 5000,
            log_every: 10,
            progress: true,
            resume_from: None,
            init_from: None,
            init_optimizer: true,
        }
    }
}

/// A training run config (see `configs/*.toml`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    pub optim: OptimSection,
    pub output: OutputSection,
}

impl RunConfig {
    /// Parses a TOML config; unknown keys are refused with their name.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| TrainError::InvalidConfig(e.to_string()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Reads and parses a TOML config file. Relative paths in it (data root, output dir,
    /// resume and init checkpoints) stay relative to the working directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml(&text).map_err(|e| match e {
            TrainError::InvalidConfig(m) => {
                TrainError::InvalidConfig(format!("{}: {m}", path.display()))
            }
            other => other,
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::InvalidConfig(m.into()));
        if self.output.dir.as_os_str().is_empty() {
            return bad("output.dir is required");
        }
        if self.data.root.is_empty() {
            return bad("data.root is required");
        }
        if self.train.batch_size == 0 || self.train.grad_accum == 0 {
            return bad("train.batch_size and train.grad_accum must be >= 1");
        }
        if self.output.checkpoint_every == 0 || self.output.log_every == 0 {
            return bad("output.checkpoint_every and output.log_every must be >= 1");
        }
        if self.train.dist_timeout_s == 0 {
            return bad("train.dist_timeout_s must be >= 1");
        }

        self.model.gpt_config()?;
        Ok(())
    }

    /// What the data loader must produce for this model.
    pub fn sample_spec(&self) -> Result<SampleSpec> {
        let g = self.model.gpt_config()?;
        Ok(SampleSpec {
            model_type: g.model_type,
            image_size: self.model.image_size,
            grid: g.grid_size(),
            caption_tokens: g.cls_token_num,
            caption_dim: g.caption_dim,
        })
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).map_err(|e| {
            TrainError::InvalidConfig(format!(
                "device {name:?} is not available ({e}); CUDA needs a build with `--features cuda` and a GPU"
            ))
        })
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(TrainError::InvalidConfig(format!(
                "train.device {name:?}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// A model whose weights are the bf16 casts of the f32 variables, so the forward and backward
/// run in bf16 while gradients reach the f32 master weights through the casts.
pub fn compute_view(
    varmap: &VarMap,
    cfg: &GptConfig,
    dtype: DType,
    device: &Device,
) -> Result<Gpt> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let tensors = data
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(dtype)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    drop(data);
    Gpt::load(VarBuilder::from_tensors(tensors, dtype, device), cfg)
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimiser steps completed.
    pub step: u64,
    /// Mean loss over the steps of this interval (of the global batch).
    pub loss: f64,
    /// Gradient norm (before clipping) of the last step of the interval.
    pub grad_norm: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Image tokens (targets) per second over the interval, all ranks together.
    pub tokens_per_s: f64,
    pub steps_per_s: f64,
    /// Epoch of the last sample read (rank 0).
    pub epoch: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Steps completed in total (including those before a resume).
    pub steps: u64,
    /// Step the run started from (0, the resumed checkpoint's, or the `init_from` checkpoint's
    /// when its optimiser state was restored).
    pub start_step: u64,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
    /// Per-step losses of this invocation, `(step, loss)`, 1-based steps.
    pub losses: Vec<(u64, f32)>,
}

/// Checkpoint directories under `dir/checkpoints`, ascending by step.
pub fn checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let cdir = dir.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&cdir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(|e| TrainError::io(&cdir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Ok(step) = name.parse::<u64>()
            && e.path().join(STATE_FILE).exists()
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn read_metrics(path: &Path) -> Vec<MetricsLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn write_metrics(path: &Path, lines: &[MetricsLine]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l).expect("metrics serialise"));
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| TrainError::io(path, e))
}

/// Whether `path` is a training checkpoint directory with optimiser state (what
/// [`save_training_checkpoint`] writes), as opposed to a plain weights file or directory.
pub fn is_training_checkpoint(path: &Path) -> bool {
    path.join(OPTIMIZER_FILE).is_file() && path.join(STATE_FILE).is_file()
}

/// The state of the `init_from` checkpoint whose optimiser state and step a fresh run continues
/// from (module invariants), or None when only its weights are loaded.
fn init_from_state(cfg: &RunConfig) -> Result<Option<TrainState>> {
    let Some(init) = &cfg.output.init_from else {
        return Ok(None);
    };
    if !cfg.output.init_optimizer {
        return Ok(None);
    }
    // A training checkpoint missing its optimiser state is an error, not a silent fallback to
    // weights only (set init_optimizer = false for that).
    if init.join(STATE_FILE).is_file() && !init.join(OPTIMIZER_FILE).is_file() {
        return Err(TrainError::InvalidConfig(format!(
            "output.init_from checkpoint {} has {STATE_FILE} but no {OPTIMIZER_FILE}: with \
             output.init_optimizer = true its AdamW state is restored; set init_optimizer = \
             false to load only its weights",
            init.display()
        )));
    }
    if !is_training_checkpoint(init) {
        return Ok(None);
    }
    let state = read_train_state(init)?;
    if state.step >= cfg.train.steps {
        return Err(TrainError::InvalidConfig(format!(
            "output.init_from checkpoint {} is at step {}, not below train.steps = {}: with \
             output.init_optimizer = true the run continues from the checkpoint's step and \
             train.steps is the total, so set train.steps above {} (or init_optimizer = false to \
             load only the weights and start at step 0)",
            init.display(),
            state.step,
            cfg.train.steps,
            state.step
        )));
    }
    Ok(Some(state))
}

/// The config as every rank must see it (the rendezvous compares its fingerprint).
pub fn config_fingerprint(cfg: &RunConfig) -> u64 {
    crate::dist::fingerprint(toml::to_string(cfg).expect("config serialises").as_bytes())
}

/// Trains as `cfg` says (module invariants), as a single process.
pub fn run(cfg: &RunConfig) -> Result<RunSummary> {
    run_with(cfg, &Comm::single())
}

/// Trains as `cfg` says as one rank of `comm` (module invariants); every rank of the job calls
/// it with the same config.
pub fn run_with(cfg: &RunConfig, comm: &Comm) -> Result<RunSummary> {
    let gpt_cfg = cfg.model.gpt_config()?;
    let (rank, world) = (comm.rank(), comm.world());
    let main = comm.is_main();
    // One GPU per process: `cuda` means this rank's local GPU.
    let device_name = match cfg.train.device.as_str() {
        "cuda" if world > 1 => format!("cuda:{}", comm.local_rank()),
        d => d.to_string(),
    };
    let device = parse_device(&device_name)?;
    let out = &cfg.output.dir;
    // Where to start: rank 0 decides (it writes the checkpoints), the others follow.
    let mut chosen = match cfg.output.resume_from.as_deref() {
        None => None,
        Some("latest") if main => checkpoints(out)?.pop().map(|(_, p)| p),
        Some("latest") => None,
        Some(p) => Some(PathBuf::from(p)),
    }
    .map(|p| p.to_string_lossy().into_owned().into_bytes())
    .unwrap_or_default();
    comm.broadcast_bytes(&mut chosen)?;
    let resume =
        (!chosen.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&chosen).into_owned()));
    if let Some(ckpt) = &resume
        && !ckpt.join(STATE_FILE).is_file()
    {
        return Err(TrainError::InvalidConfig(format!(
            "rank {rank}: resume checkpoint {} has no {STATE_FILE}{}",
            ckpt.display(),
            if world > 1 {
                " (every rank reads the checkpoint rank 0 chose: the output directory must be on storage every node sees)"
            } else {
                ""
            }
        )));
    }
    let init_state = match resume {
        None => init_from_state(cfg)?,
        Some(_) => None,
    };
    if main {
        std::fs::create_dir_all(out.join("checkpoints")).map_err(|e| TrainError::io(out, e))?;
        std::fs::write(
            out.join("config.toml"),
            toml::to_string_pretty(cfg).expect("config serialises"),
        )
        .map_err(|e| TrainError::io(out.join("config.toml"), e))?;
    }

    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &gpt_cfg, &device)?;
    let mut opt = AdamW::for_gpt(&varmap, &gpt_cfg, cfg.optim.adamw())?;
    // ZeRO-1 before any state is loaded: each rank then loads only its share.
    let zero = cfg
        .train
        .zero
        .unwrap_or(gpt_cfg.num_parameters() as f64 >= 1e9);
    if zero && world > 1 {
        opt.shard(rank, world)?;
    }
    let seed = cfg.train.seed;

    let mut last_checkpoint = None;
    let mut init_note = String::new();
    let start_step = if let Some(ckpt) = &resume {
        let state = load_training_checkpoint(ckpt, &varmap, &gpt_cfg, &mut opt)?;
        if state.seed != seed {
            return Err(TrainError::InvalidConfig(format!(
                "checkpoint {} was trained with seed {}, the config says {seed}",
                ckpt.display(),
                state.seed
            )));
        }
        last_checkpoint = Some(ckpt.clone());
        state.step
    } else {
        seeded_init(&varmap, &gpt_cfg, seed)?;
        if let Some(init) = &cfg.output.init_from {
            let file = if init.join(MODEL_FILE).exists() {
                init.join(MODEL_FILE)
            } else {
                init.clone()
            };
            // Shapes are checked tensor by tensor; the grid (block_size) and dropouts of the
            // checkpoint's model may differ from this run's. Its seed is not checked: stage II
            // may draw its data order and dropout from another seed.
            let sd = read_state_dict(&file, &device)?;
            load_into_varmap(&varmap, &gpt_cfg, &sd)?;
            init_note = format!(", weights from {}", init.display());
            if let Some(state) = &init_state {
                load_optimizer_state(init, &mut opt)?;
                if opt.step_count() != state.step {
                    return Err(TrainError::UnreadableCheckpoint {
                        path: init.join(OPTIMIZER_FILE),
                        reason: format!(
                            "optimizer step {} disagrees with step {} of {STATE_FILE}",
                            opt.step_count(),
                            state.step
                        ),
                    });
                }
                init_note.push_str(" with its AdamW state");
            }
        }
        init_state.as_ref().map_or(0, |s| s.step)
    };

    // The EMA starts as a copy of the starting weights (fresh, stage II), or is restored from
    // the resumed checkpoint, so a resumed run's EMA equals an uninterrupted run's.
    // Only rank 0 keeps the EMA: it alone writes checkpoints.
    let mut ema = match cfg.optim.ema && main {
        false => None,
        true => {
            let mut e = Ema::new(&opt, cfg.optim.ema_decay)?;
            // As the official `--gpt-ckpt`: the checkpoint's EMA when it has one, else its
            // weights (what the EMA was just initialised from). Stage II takes stage I's EMA
            // only when it continues stage I's optimiser state too.
            let from = match (&resume, &init_state, &cfg.output.init_from) {
                (Some(ckpt), _, _) => Some(ckpt),
                (None, Some(_), Some(init)) => Some(init),
                _ => None,
            };
            if let Some(dir) = from {
                let file = dir.join(EMA_FILE);
                if file.is_file() {
                    let state = candle_core::safetensors::load(&file, &device).map_err(|e| {
                        TrainError::UnreadableCheckpoint {
                            path: file.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    e.load(&state, &file)?;
                } else {
                    init_note.push_str(&format!(
                        "; {} has no {EMA_FILE}, the EMA starts from its weights",
                        dir.display()
                    ));
                }
            }
            Some(e)
        }
    };

    // Every replica starts from rank 0's parameters (as DDP does), and every rank must have
    // reached the same step.
    broadcast_parameters(&opt, comm)?;
    let mut steps = (start_step as u64).to_le_bytes().to_vec();
    comm.broadcast_bytes(&mut steps)?;
    let root_step = steps
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    if root_step != Some(start_step as u64) {
        return Err(TrainError::DistProtocol(format!(
            "rank {rank} starts at step {start_step}, rank 0 at step {root_step:?}"
        )));
    }

    let metrics_path = out.join("metrics.jsonl");
    // A resumed run keeps its own lines up to the checkpoint; a fresh run (even one continuing
    // a stage I step count) starts an empty history.
    let mut history: Vec<MetricsLine> = match resume {
        Some(_) if main => read_metrics(&metrics_path)
            .into_iter()
            .filter(|l| l.step <= start_step)
            .collect(),
        _ => Vec::new(),
    };
    if main {
        write_metrics(&metrics_path, &history)?;
    }

    let spec = cfg.sample_spec()?;
    // Every rank reads the table version rank 0 found.
    let mut loader = if main {
        CatalogLoader::open(&cfg.data, spec, seed, rank, world)?
    } else {
        let mut v = Vec::new();
        comm.broadcast_bytes(&mut v)?;
        let version = u64::from_le_bytes(v[..].try_into().map_err(|_| {
            TrainError::DistProtocol(format!("rank {rank}: malformed table version from rank 0"))
        })?);
        CatalogLoader::open_version(&cfg.data, spec, seed, rank, world, Some(version))?
    };
    if main && world > 1 {
        comm.broadcast_bytes(&mut loader.version().to_le_bytes().to_vec())?;
    }
    let (bs, accum) = (cfg.train.batch_size, cfg.train.grad_accum);
    let schedule = cfg.optim.schedule();
    // Tokens of the global batch.
    let tokens_per_step = (bs * accum * world * gpt_cfg.block_size) as f64;
    let dropout_seed = seed.wrapping_mul(world as u64).wrapping_add(rank as u64);

    let bar = if cfg.output.progress && main {
        indicatif::ProgressBar::new(cfg.train.steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("progress template"),
    );
    bar.set_position(start_step);
    let say = |msg: String| {
        if !main {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            bar.println(msg);
        }
    };
    say(format!(
        "training {} {:?} ({} parameters, {}x{} codes) on {} rows of {} (version {}), from step {start_step}{init_note}{}",
        cfg.model.size.as_deref().unwrap_or("custom"),
        gpt_cfg.model_type,
        gpt_cfg.num_parameters(),
        gpt_cfg.grid_size(),
        gpt_cfg.grid_size(),
        loader.num_samples(),
        cfg.data.root,
        loader.version(),
        if world > 1 {
            format!(
                "; {world} ranks, global batch {} ({world} x {bs} x {accum}){}",
                world * bs * accum,
                if opt.is_sharded() { ", ZeRO-1" } else { "" }
            )
        } else {
            String::new()
        }
    ));

    let mut losses = Vec::new();
    let (mut interval_loss, mut interval_steps) = (0f64, 0u64);
    let mut interval_start = Instant::now();
    for step in start_step..cfg.train.steps {
        let lr = schedule.lr_at(step);
        opt.set_lr(lr);
        let first = step * accum as u64 * bs as u64;
        let micro = (0..accum)
            .map(|j| loader.batch(first + (j * bs) as u64, bs, &device))
            .collect::<Result<Vec<_>>>()?;
        let mut rng = step_rng(dropout_seed, step);
        let stats = match cfg.train.precision {
            Precision::F32 => train_step_with(
                &model,
                &mut opt,
                &micro,
                cfg.train.max_grad_norm,
                Some(&mut rng),
                step + 1,
                comm,
            ),
            Precision::Bf16 => {
                let view = compute_view(&varmap, &gpt_cfg, DType::BF16, &device)?;
                train_step_with(
                    &view,
                    &mut opt,
                    &micro,
                    cfg.train.max_grad_norm,
                    Some(&mut rng),
                    step + 1,
                    comm,
                )
            }
        };
        let stats = match stats {
            Ok(s) => s,
            Err(e @ (TrainError::NonFiniteLoss { .. } | TrainError::NonFiniteGradient { .. })) => {
                bar.abandon();
                return Err(TrainError::Diverged {
                    reason: e.to_string(),
                    last_checkpoint: last_checkpoint.clone(),
                });
            }
            Err(e) => return Err(e),
        };
        if let Some(e) = &mut ema {
            e.update()?;
        }
        let done = step + 1;
        let every = cfg.train.check_replicas_every;
        if world > 1 && every > 0 && (done.is_multiple_of(every) || done == cfg.train.steps) {
            let differ = comm.differing_ranks(parameter_digest(&opt)?)?;
            if !differ.is_empty() {
                bar.abandon();
                return Err(TrainError::ReplicasDiverged {
                    step: done,
                    ranks: differ,
                });
            }
        }
        losses.push((done, stats.loss));
        interval_loss += stats.loss as f64;
        interval_steps += 1;
        bar.set_position(done);
        if main && (done.is_multiple_of(cfg.output.log_every) || done == cfg.train.steps) {
            let secs = interval_start.elapsed().as_secs_f64().max(1e-9);
            let line = MetricsLine {
                step: done,
                loss: interval_loss / interval_steps as f64,
                grad_norm: stats.grad_norm as f64,
                lr,
                tokens_per_s: tokens_per_step * interval_steps as f64 / secs,
                steps_per_s: interval_steps as f64 / secs,
                epoch: loader.locate(first + (accum * bs) as u64 - 1).0,
            };
            bar.set_message(format!(
                "loss {:.4} | grad {:.3} | lr {:.2e} | {:.0} tok/s | {:.2} steps/s",
                line.loss, line.grad_norm, line.lr, line.tokens_per_s, line.steps_per_s
            ));
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&metrics_path)
                .map_err(|e| TrainError::io(&metrics_path, e))?;
            writeln!(
                f,
                "{}",
                serde_json::to_string(&line).expect("metrics serialise")
            )
            .map_err(|e| TrainError::io(&metrics_path, e))?;
            if bar.is_hidden() {
                say(format!(
                    "step {done}/{}: loss {:.4}, grad norm {:.3}, lr {:.2e}, {:.0} tokens/s, {:.2} steps/s",
                    cfg.train.steps,
                    line.loss,
                    line.grad_norm,
                    line.lr,
                    line.tokens_per_s,
                    line.steps_per_s
                ));
            }
            history.push(line);
            interval_loss = 0.0;
            interval_steps = 0;
            interval_start = Instant::now();
        }
        if done.is_multiple_of(cfg.output.checkpoint_every) || done == cfg.train.steps {
            // ZeRO-1: every rank sends its moments to rank 0, which writes the whole state.
            let sharded_state = match opt.is_sharded() {
                true => gather_optimizer_state(&opt, comm)?,
                false => None,
            };
            if main {
                last_checkpoint = Some(match &sharded_state {
                    Some(state) => save_training_checkpoint_state(
                        &out.join("checkpoints"),
                        &model,
                        &opt,
                        state,
                        seed,
                        ema.as_ref(),
                    )?,
                    None => save_training_checkpoint_with(
                        &out.join("checkpoints"),
                        &model,
                        &opt,
                        seed,
                        ema.as_ref(),
                    )?,
                });
                crate::plot::loss_curve(&history, &out.join("loss.png"))?;
            } else {
                last_checkpoint = Some(out.join("checkpoints").join(format!("{done:07}")));
            }
        }
    }
    // No rank reports success before rank 0 has written the last checkpoint.
    comm.barrier()?;
    bar.finish();
    Ok(RunSummary {
        steps: cfg.train.steps.max(start_step),
        start_step,
        last_checkpoint,
        losses,
    })
}
