//! One config struct per stage, shared by its CLI command and the pipeline config.
//!
//! Each struct derives both `clap::Args` (flattened into `llamagen ingest`, `llamagen filter
//! score`, `llamagen text captions`, `llamagen text embed`, `llamagen encode`) and `Deserialize`
//! (the `[ingest]`, `[filters]`, `[captions]`, `[t5]` and `[vq]` tables of a pipeline config), so
//! a flag and its config key have one default and one check, and `build` turns either into the
//! same stage. A key is its flag's name with `_` for `-`; where a flag reads better otherwise the
//! field names it (`--timeout` sets `timeout_s`, `--ignore-robots` clears `respect_robots`). The
//! defaults are written once, as constants; tests compare the CLI's and the config's field by
//! field.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use llamagen_dedup::DedupConfig;
use llamagen_encode::captions::{CaptionFileOptions, CaptionIndex, CaptionKey, Fallback, JoinOn};
use llamagen_encode::text_encoder::{
    ModelPaths, StoreDtype, TextEncoder, TextEncoderConfig, device_and_dtype,
};
use llamagen_encode::text_stage::{CaptionsStage, T5Stage};
use llamagen_encode::vq_stage::{CodeView, VqStage, VqStageConfig};
use llamagen_filters::model::ModelOptions;
use llamagen_filters::rules::Thresholds;
use llamagen_filters::runtime::Provider;
use llamagen_filters::scorer::{CaptionField, Scorer, ScorerConfig};
use llamagen_ingest::{IngestConfig, OutputFormat, PreFilter};
use serde::{Deserialize, Serialize};

const SCORE_BATCH: usize = 32;
const JOIN: &str = "key";
const CAPTION_KEY: &str = "llava";
const FALLBACK: &str = "top_caption,text";
const T5_DTYPE: &str = "bf16";
const T5_MAX_TOKENS: usize = 120;
const T5_BATCH_TOKENS: usize = 4096;
const VQ_MODEL: &str = "vq16";
const VQ_VIEW: &str = "center:256";
const VQ_BATCH: usize = 8;

fn exists(what: &str, p: &Path) -> Result<()> {
    if !p.exists() {
        bail!("{what}: {} does not exist", p.display());
    }
    Ok(())
}

/// The filter scores (`llamagen filter score`, the pipeline's `[filters]`).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// CLIP ViT-B/32 image encoder (ONNX); with clip_text gives score_clip_similarity.
    #[arg(long)]
    pub clip_image: Option<PathBuf>,
    /// CLIP ViT-B/32 text encoder (ONNX).
    #[arg(long)]
    pub clip_text: Option<PathBuf>,
    /// Caption the image is compared with: text (alt-text), top_caption or long_caption.
    #[arg(long, default_value = "text")]
    #[serde(default)]
    pub caption: CaptionField,
    /// CLIP ViT-L/14 image encoder (ONNX) for the aesthetic and NSFW heads.
    #[arg(long)]
    pub clip_l14_image: Option<PathBuf>,
    /// Aesthetic head (.pth LAION V1/V2 or .onnx); default: the bundled LAION-Aesthetics V2 head.
    #[arg(long)]
    pub aesthetic_head: Option<PathBuf>,
    /// Do not compute score_aesthetic even with a ViT-L/14 encoder.
    #[arg(long)]
    #[serde(default)]
    pub no_aesthetic: bool,
    /// NSFW head on the ViT-L/14 embedding (.onnx, [N,768] -> probability).
    #[arg(long)]
    pub nsfw_head: Option<PathBuf>,
    /// LAION watermark classifier (ONNX, [N,3,256,256] -> 2 logits).
    #[arg(long)]
    pub watermark: Option<PathBuf>,
    /// Softmax index meaning "watermark" (LAION's model: 0).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub watermark_class_index: usize,
    /// Rows per inference call (dynamic-batch models).
    #[arg(long, default_value_t = SCORE_BATCH)]
    #[serde(default = "score_batch")]
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub intra_threads: usize,
    /// Threads decoding and preprocessing images (0 = one per core).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub preprocess_threads: usize,
    /// Execution provider: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    #[serde(default)]
    pub provider: Provider,
    /// Pipeline only: keep/drop rules on the stored scores (the `llamagen filter apply`
    /// thresholds format, as a `[filters.thresholds]` table); absent: scores only, no verdicts.
    #[arg(skip)]
    #[serde(default)]
    pub thresholds: Option<Thresholds>,
}

fn score_batch() -> usize {
    SCORE_BATCH
}

impl ScoreConfig {
    fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        [
            &mut self.clip_image,
            &mut self.clip_text,
            &mut self.clip_l14_image,
            &mut self.aesthetic_head,
            &mut self.nsfw_head,
            &mut self.watermark,
        ]
        .into_iter()
        .flatten()
    }

    pub fn resolve_paths(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        for p in self.paths_mut() {
            *p = resolve(p);
        }
    }

    /// Everything checkable before loading a model.
    pub fn check(&self) -> Result<()> {
        for (k, p) in [
            ("clip_image", &self.clip_image),
            ("clip_text", &self.clip_text),
            ("clip_l14_image", &self.clip_l14_image),
            ("aesthetic_head", &self.aesthetic_head),
            ("nsfw_head", &self.nsfw_head),
            ("watermark", &self.watermark),
        ] {
            if let Some(p) = p {
                exists(k, p)?;
            }
        }
        if self.clip_image.is_some() != self.clip_text.is_some() {
            bail!("clip_image and clip_text go together");
        }
        if self.clip_image.is_none() && self.clip_l14_image.is_none() && self.watermark.is_none() {
            bail!("no model configured (clip_image/clip_text, clip_l14_image or watermark)");
        }
        if self.batch_size == 0 {
            bail!("batch_size must be positive");
        }
        Ok(())
    }

    /// Loads the models (blocking work, off the async threads).
    pub async fn load(&self) -> Result<Scorer> {
        self.check()?;
        let cfg = ScorerConfig {
            clip_image: self.clip_image.clone(),
            clip_text: self.clip_text.clone(),
            caption: self.caption,
            clip_l14_image: self.clip_l14_image.clone(),
            aesthetic_head: self.aesthetic_head.clone(),
            no_aesthetic: self.no_aesthetic,
            nsfw_head: self.nsfw_head.clone(),
            watermark: self.watermark.clone(),
            watermark_class_index: self.watermark_class_index,
            model: ModelOptions {
                intra_threads: self.intra_threads,
                provider: self.provider,
                batch_size: self.batch_size,
            },
            preprocess_threads: self.preprocess_threads,
            ..ScorerConfig::new()
        };
        Ok(tokio::task::spawn_blocking(move || Scorer::load(cfg)).await??)
    }
}

/// Long and short captions (`llamagen text captions`, the pipeline's `[captions]`).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionsConfig {
    /// Long-caption files (JSONL, Parquet, or LlamaGen's jsonl). Required on the command line; a
    /// config may list none (fallbacks only).
    #[arg(long = "captions", num_args = 1.., required = true)]
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// What records join on: key, url or image_path (file stem = sample key).
    #[arg(long, default_value = JOIN)]
    #[serde(default = "join")]
    pub join: String,
    /// Record field with the join value (default: key, url or image_path).
    #[arg(long)]
    pub join_field: Option<String>,
    /// Record field with the caption (default: long_caption, caption or text).
    #[arg(long)]
    pub text_field: Option<String>,
    /// Which entry of a list-valued caption (LlamaGen's t2i `text: [blip, llava,
    /// llava_first]`): blip, llava, llava_first, an index, or first (first non-blank).
    #[arg(long, default_value = CAPTION_KEY)]
    #[serde(default = "caption_key")]
    pub caption_key: String,
    /// Texts used when a sample has no long caption, in order: top_caption, text (none: empty).
    #[arg(long, value_delimiter = ',', default_value = FALLBACK)]
    #[serde(default = "fallback")]
    pub fallback: Vec<String>,
}

fn join() -> String {
    JOIN.into()
}
fn caption_key() -> String {
    CAPTION_KEY.into()
}
fn fallback() -> Vec<String> {
    FALLBACK.split(',').map(String::from).collect()
}

impl CaptionsConfig {
    pub fn resolve_paths(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        for p in &mut self.files {
            *p = resolve(p);
        }
    }

    fn parsed(&self) -> Result<(CaptionFileOptions, Vec<Fallback>)> {
        let join = JoinOn::parse(&self.join)
            .with_context(|| format!("join {:?}: use key, url or image_path", self.join))?;
        let list_entry = CaptionKey::parse(&self.caption_key).with_context(|| {
            format!(
                "caption_key {:?}: use blip, llava, llava_first, first or an index",
                self.caption_key
            )
        })?;
        let fallbacks = self
            .fallback
            .iter()
            .map(|f| f.trim())
            .filter(|f| !f.is_empty())
            .map(|f| {
                Fallback::parse(f)
                    .with_context(|| format!("fallback {f:?}: use top_caption or text"))
            })
            .collect::<Result<Vec<_>>>()?;
        let opts = CaptionFileOptions {
            join,
            join_field: self.join_field.clone(),
            text_field: self.text_field.clone(),
            list_entry,
        };
        Ok((opts, fallbacks))
    }

    pub fn check(&self) -> Result<()> {
        for p in &self.files {
            exists("files", p)?;
        }
        self.parsed().map(|_| ())
    }

    /// Reads the caption files into the stage's index.
    pub fn build(&self) -> Result<CaptionsStage> {
        self.check()?;
        let (opts, fallbacks) = self.parsed()?;
        let paths: Vec<&Path> = self.files.iter().map(|p| p.as_path()).collect();
        let index = CaptionIndex::read(&paths, &opts)?;
        Ok(CaptionsStage {
            index: Arc::new(index),
            fallbacks,
        })
    }
}

/// T5 caption features (`llamagen text embed`, the pipeline's `[t5]`).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Config {
    /// Model directory: config.json, model.safetensors or model.safetensors.index.json, and
    /// tokenizer.json.
    #[arg(long)]
    pub model: PathBuf,
    /// tokenizer.json (default: MODEL/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Model id recorded in provenance (default: the model directory name).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Storage dtype: bf16 or f16.
    #[arg(long, default_value = T5_DTYPE)]
    #[serde(default = "t5_dtype")]
    pub dtype: String,
    /// Run on the first CUDA GPU (a `--features cuda` build).
    #[arg(long)]
    #[serde(default)]
    pub cuda: bool,
    /// Most tokens per caption, EOS included.
    #[arg(long, default_value_t = T5_MAX_TOKENS)]
    #[serde(default = "t5_max_tokens")]
    pub max_tokens: usize,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = T5_BATCH_TOKENS)]
    #[serde(default = "t5_batch_tokens")]
    pub batch_tokens: usize,
}

fn t5_dtype() -> String {
    T5_DTYPE.into()
}
fn t5_max_tokens() -> usize {
    T5_MAX_TOKENS
}
fn t5_batch_tokens() -> usize {
    T5_BATCH_TOKENS
}

impl T5Config {
    pub fn resolve_paths(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        self.model = resolve(&self.model);
        if let Some(t) = &mut self.tokenizer {
            *t = resolve(t);
        }
    }

    fn store_dtype(&self) -> Result<StoreDtype> {
        match self.dtype.as_str() {
            "bf16" => Ok(StoreDtype::Bf16),
            "f16" => Ok(StoreDtype::F16),
            d => bail!("dtype {d:?}: use bf16 or f16"),
        }
    }

    pub fn check(&self) -> Result<()> {
        exists("model", &self.model)?;
        if let Some(t) = &self.tokenizer {
            exists("tokenizer", t)?;
        }
        if self.max_tokens == 0 || self.batch_tokens == 0 {
            bail!("max_tokens and batch_tokens must be positive");
        }
        self.store_dtype().map(|_| ())
    }

    /// Loads the encoder.
    pub fn build(&self) -> Result<T5Stage> {
        self.check()?;
        let mut paths = ModelPaths::in_dir(&self.model);
        if let Some(t) = &self.tokenizer {
            paths.tokenizer = t.clone();
        }
        let (device, compute) = device_and_dtype(self.cuda)?;
        let mut enc = TextEncoder::load(
            &paths,
            &device,
            compute,
            TextEncoderConfig {
                max_tokens: self.max_tokens,
                batch_tokens: self.batch_tokens,
                ..Default::default()
            },
        )?;
        if let Some(id) = &self.model_id {
            enc.model_id = id.clone();
        }
        Ok(T5Stage {
            encoder: Arc::new(enc),
            dtype: self.store_dtype()?,
        })
    }
}

/// VQ code grids (`llamagen encode`, the pipeline's `[vq]`).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    /// VQ weights: the official .pt (its `model` dict) or safetensors with the official keys.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture: vq16, vq8, or a JSON file of ModelArgs (in a config also a table of
    /// ModelArgs fields).
    #[arg(long, default_value = VQ_MODEL, value_parser = parse_model)]
    #[serde(default = "vq_model")]
    pub model: VqModelSpec,
    /// Code sets, repeatable: center:SIZE (t2i; e.g. center:256, center:512) or
    /// tencrop:SIZE:CROP_RANGE (c2i; e.g. tencrop:256:1.1 reads the stored 281 px image); in a
    /// config, tables such as `{ kind = "ten_crop", image_size = 256, crop_range = 1.1 }`.
    #[arg(long = "view", default_value = VQ_VIEW, value_parser = parse_view)]
    #[serde(default = "vq_views")]
    pub views: Vec<CodeView>,
    /// Images per forward pass.
    #[arg(long, default_value_t = VQ_BATCH)]
    #[serde(default = "vq_batch")]
    pub batch_size: usize,
    /// Run on CUDA device 0 (a `--features cuda` build).
    #[arg(long)]
    #[serde(default)]
    pub cuda: bool,
    /// When set and the checkpoint does not exist, write random stand-in weights there made from
    /// this seed (demos and tests only: the codes mean nothing).
    #[arg(long)]
    pub standin_seed: Option<u64>,
}

fn parse_model(s: &str) -> Result<VqModelSpec, String> {
    Ok(VqModelSpec::Named(s.to_string()))
}
fn parse_view(s: &str) -> Result<CodeView, String> {
    s.parse()
}
fn vq_model() -> VqModelSpec {
    VqModelSpec::Named(VQ_MODEL.into())
}
fn vq_views() -> Vec<CodeView> {
    vec![VQ_VIEW.parse().expect("default view")]
}
fn vq_batch() -> usize {
    VQ_BATCH
}

/// A VQ architecture: a name, a JSON file of `ModelArgs`, or the fields themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VqModelSpec {
    Named(String),
    Args(llamagen_encode::ModelArgs),
}

impl VqModelSpec {
    pub fn args(&self) -> Result<llamagen_encode::ModelArgs> {
        Ok(match self {
            VqModelSpec::Named(n) => match n.as_str() {
                "vq16" | "VQ-16" => llamagen_encode::ModelArgs::vq_16(),
                "vq8" | "VQ-8" => llamagen_encode::ModelArgs::vq_8(),
                path if path.ends_with(".json") => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("model: reading {path}"))?;
                    let a: llamagen_encode::ModelArgs =
                        serde_json::from_str(&text).with_context(|| format!("model: {path}"))?;
                    a.validate()?;
                    a
                }
                other => {
                    bail!("model = {other:?}: use vq16, vq8, a .json file or a table of ModelArgs")
                }
            },
            VqModelSpec::Args(a) => {
                a.validate()?;
                a.clone()
            }
        })
    }
}

impl VqConfig {
    pub fn resolve_paths(&mut self, resolve: impl Fn(&Path) -> PathBuf) {
        self.checkpoint = resolve(&self.checkpoint);
        if let VqModelSpec::Named(n) = &mut self.model
            && n.ends_with(".json")
        {
            *n = resolve(Path::new(n.as_str())).display().to_string();
        }
    }

    pub fn check(&self) -> Result<()> {
        let args = self.model.args()?;
        if self.standin_seed.is_none() {
            exists("checkpoint", &self.checkpoint)?;
        }
        if self.views.is_empty() || self.batch_size == 0 {
            bail!("views must not be empty and batch_size must be positive");
        }
        let f = args.downsample_factor() as u32;
        for view in &self.views {
            let size = match view {
                CodeView::Center { image_size } | CodeView::TenCrop { image_size, .. } => {
                    *image_size
                }
            };
            if size == 0 || size % f != 0 {
                bail!("view image_size {size} is not a multiple of the VQ's downsampling {f}");
            }
        }
        Ok(())
    }

    /// Loads the model (writing stand-in weights first when asked to).
    pub fn build(&self) -> Result<VqStage> {
        self.check()?;
        let args = self.model.args()?;
        if let (Some(seed), false) = (self.standin_seed, self.checkpoint.exists()) {
            eprintln!(
                "vq: writing STAND-IN random weights (seed {seed}) to {}: codes from them mean nothing",
                self.checkpoint.display()
            );
            crate::pipeline::write_standin_vq(&self.checkpoint, &args, seed)?;
        }
        let device = if self.cuda {
            candle_core::Device::new_cuda(0)?
        } else {
            candle_core::Device::Cpu
        };
        let model = llamagen_encode::VqModel::from_file(&self.checkpoint, &args, &device)
            .with_context(|| format!("loading {}", self.checkpoint.display()))?;
        let cfg = VqStageConfig {
            views: self.views.clone(),
            batch_size: self.batch_size,
            model_id: self
                .checkpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            weights_sha256: llamagen_encode::t5::sha256_file(&self.checkpoint)?,
        };
        VqStage::new(Arc::new(model), cfg).map_err(|e| anyhow!(e))
    }
}

/// Downloading and storing images (`llamagen ingest`, the pipeline's `[ingest]`). The URL lists,
/// their columns and the output are the command's own flags (`[input]` and `[output]` in a
/// config).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestOptions {
    /// Sizes of the stored centre crops (LlamaGen's stages: 256 and 512; a ten-crop VQ view needs
    /// its crop size too, e.g. 281).
    #[arg(long = "image-size", value_delimiter = ',', default_value = "256")]
    #[serde(default = "image_sizes")]
    pub image_sizes: Vec<u32>,
    /// Stored image encoding: jpeg, png or webp (lossless).
    #[arg(long, default_value = FORMAT)]
    #[serde(default = "format")]
    pub format: String,
    /// JPEG quality.
    #[arg(long, default_value_t = QUALITY)]
    #[serde(default = "quality")]
    pub quality: u8,
    /// Keep JPEG chroma at full resolution (4:4:4) instead of 4:2:0 (PIL's and OpenCV's default).
    #[arg(long)]
    #[serde(default)]
    pub jpeg_444: bool,
    /// Rows per work unit (one commit each; the granularity of resume).
    #[arg(long, default_value_t = UNIT_ROWS)]
    #[serde(default = "unit_rows")]
    pub unit_rows: usize,
    /// Units processed at once: a unit's slowest downloads overlap the next unit's work.
    #[arg(long, default_value_t = UNITS_IN_FLIGHT)]
    #[serde(default = "units_in_flight")]
    pub units_in_flight: usize,
    /// Downloads in flight.
    #[arg(long, default_value_t = CONCURRENCY)]
    #[serde(default = "concurrency")]
    pub concurrency: usize,
    /// Downloads in flight per host.
    #[arg(long, default_value_t = PER_HOST)]
    #[serde(default = "per_host")]
    pub per_host: usize,
    /// Connect timeout, seconds.
    #[arg(long = "connect-timeout", default_value_t = CONNECT_TIMEOUT_S)]
    #[serde(default = "connect_timeout_s")]
    pub connect_timeout_s: f64,
    /// Deadline of one download attempt (headers and body), seconds.
    #[arg(long = "timeout", default_value_t = TIMEOUT_S)]
    #[serde(default = "timeout_s")]
    pub timeout_s: f64,
    /// Retries of transient failures (connect errors, resets, 429, 5xx).
    #[arg(long, default_value_t = RETRIES)]
    #[serde(default = "retries")]
    pub retries: u32,
    /// First retry backoff, seconds (doubles each retry, with jitter).
    #[arg(long = "backoff", default_value_t = BACKOFF_S)]
    #[serde(default = "backoff_s")]
    pub backoff_s: f64,
    /// Largest accepted body, bytes.
    #[arg(long, default_value_t = MAX_BYTES)]
    #[serde(default = "max_bytes")]
    pub max_bytes: u64,
    /// Redirect hops followed.
    #[arg(long, default_value_t = MAX_REDIRECTS)]
    #[serde(default = "max_redirects")]
    pub max_redirects: usize,
    /// Body bytes held in memory at once over all downloads, MiB (a download waits for room).
    #[arg(long, default_value_t = MAX_INFLIGHT_MIB)]
    #[serde(default = "max_inflight_mib")]
    pub max_inflight_mib: u64,
    /// Send `user:pass@` credentials found in URLs as Basic auth (default: stripped before the
    /// request). They are never stored either way.
    #[arg(long)]
    #[serde(default)]
    pub allow_url_credentials: bool,
    /// User-Agent header (default: llamagen's).
    #[arg(long)]
    pub user_agent: Option<String>,
    /// Honour X-Robots-Tag noai/noimageai/noindex/noimageindex (default; the flag
    /// --ignore-robots turns it off).
    #[arg(
        long = "ignore-robots",
        action = clap::ArgAction::SetFalse,
        help = "Ignore X-Robots-Tag noai/noimageai/noindex/noimageindex (honoured by default)"
    )]
    #[serde(default = "yes")]
    pub respect_robots: bool,
    /// Allow downloads from these address ranges even though they are private or loopback
    /// (CIDR, repeatable), e.g. 127.0.0.0/8 for a local mirror.
    #[arg(long = "allow-cidr")]
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    /// Drop rows whose metadata WIDTH is below this, before downloading.
    #[arg(long)]
    pub min_width: Option<i64>,
    /// Drop rows whose metadata HEIGHT is below this, before downloading.
    #[arg(long)]
    pub min_height: Option<i64>,
    /// Drop rows whose metadata pwatermark is above this, before downloading.
    #[arg(long)]
    pub max_pwatermark: Option<f64>,
    /// Drop rows whose metadata similarity is below this, before downloading.
    #[arg(long)]
    pub min_similarity: Option<f64>,
    /// Decode large JPEGs in the DCT domain at a reduced size when the image is at least 4x the
    /// largest target size (default; the flag --full-decode turns it off).
    #[arg(
        long = "full-decode",
        action = clap::ArgAction::SetFalse,
        help = "Decode large JPEGs at full resolution (default: reduced DCT-domain decoding when the image is at least 4x the largest target size)"
    )]
    #[serde(default = "yes")]
    pub reduced_decode: bool,
    /// Upscale images whose shorter side is below an image size (default: as LlamaGen's t2i
    /// dataset, no crop of that size; the row records below_image_size_<size>, and is dropped
    /// when no size is left).
    #[arg(long = "upscale-small-images")]
    #[serde(default)]
    pub upscale_small: bool,
    /// Threads for decoding and resizing (default: available cores).
    #[arg(long)]
    pub cpu_workers: Option<usize>,
    /// Also write img2dataset's webdataset layout here (local directory or s3:// prefix): per
    /// size, one tar of <key>.jpg/.txt/.json per work unit, plus its _stats.json.
    #[arg(long)]
    pub webdataset: Option<String>,
}

const FORMAT: &str = "jpeg";
const QUALITY: u8 = 95;
const UNIT_ROWS: usize = 10_000;
const UNITS_IN_FLIGHT: usize = 2;
const CONCURRENCY: usize = 64;
const PER_HOST: usize = 8;
const CONNECT_TIMEOUT_S: f64 = 10.0;
const TIMEOUT_S: f64 = 30.0;
const RETRIES: u32 = 2;
const BACKOFF_S: f64 = 0.5;
const MAX_BYTES: u64 = 32 << 20;
const MAX_REDIRECTS: usize = 5;
const MAX_INFLIGHT_MIB: u64 = 256;

fn image_sizes() -> Vec<u32> {
    vec![256]
}
fn format() -> String {
    FORMAT.into()
}
fn quality() -> u8 {
    QUALITY
}
fn unit_rows() -> usize {
    UNIT_ROWS
}
fn units_in_flight() -> usize {
    UNITS_IN_FLIGHT
}
fn concurrency() -> usize {
    CONCURRENCY
}
fn per_host() -> usize {
    PER_HOST
}
fn connect_timeout_s() -> f64 {
    CONNECT_TIMEOUT_S
}
fn timeout_s() -> f64 {
    TIMEOUT_S
}
fn retries() -> u32 {
    RETRIES
}
fn backoff_s() -> f64 {
    BACKOFF_S
}
fn max_bytes() -> u64 {
    MAX_BYTES
}
fn max_redirects() -> usize {
    MAX_REDIRECTS
}
fn max_inflight_mib() -> u64 {
    MAX_INFLIGHT_MIB
}
fn yes() -> bool {
    true
}

impl Default for IngestOptions {
    fn default() -> Self {
        toml::from_str("").expect("every ingest key has a default")
    }
}

impl IngestOptions {
    pub fn check(&self) -> Result<()> {
        if self.image_sizes.is_empty() || self.image_sizes.contains(&0) {
            bail!("image_sizes must be positive sizes");
        }
        if self.unit_rows == 0
            || self.units_in_flight == 0
            || self.concurrency == 0
            || self.per_host == 0
        {
            bail!("unit_rows, units_in_flight, concurrency and per_host must be positive");
        }
        self.output_format()?;
        for c in &self.allow_cidrs {
            c.parse::<ipnet::IpNet>()
                .with_context(|| format!("allow_cidrs: {c:?} is not a CIDR"))?;
        }
        Ok(())
    }

    fn output_format(&self) -> Result<OutputFormat> {
        Ok(match self.format.as_str() {
            "jpeg" | "jpg" => OutputFormat::Jpeg {
                quality: self.quality,
                full_chroma: self.jpeg_444,
            },
            "png" => OutputFormat::Png,
            "webp" => OutputFormat::Webp,
            other => bail!("format {other:?}: use jpeg, png or webp"),
        })
    }

    /// The ingest config for the given input columns (output, dataset, worker share and run id
    /// are the caller's).
    pub fn build(&self, url_column: &str, caption_column: &str) -> Result<IngestConfig> {
        self.check()?;
        let mut c = IngestConfig::default();
        c.sizes = self.image_sizes.clone();
        c.format = self.output_format()?;
        c.reduced_decode = self.reduced_decode;
        c.upscale_small = self.upscale_small;
        c.unit_rows = self.unit_rows;
        c.units_in_flight = self.units_in_flight;
        if let Some(n) = self.cpu_workers {
            c.cpu_workers = n;
        }
        let f = &mut c.fetch;
        f.concurrency = self.concurrency;
        f.per_host = self.per_host;
        f.connect_timeout = Duration::from_secs_f64(self.connect_timeout_s);
        f.deadline = Duration::from_secs_f64(self.timeout_s);
        f.max_retries = self.retries;
        f.backoff = Duration::from_secs_f64(self.backoff_s);
        f.max_body_bytes = self.max_bytes;
        f.max_redirects = self.max_redirects;
        f.max_inflight_bytes = self.max_inflight_mib << 20;
        f.allow_url_credentials = self.allow_url_credentials;
        if let Some(ua) = &self.user_agent {
            f.user_agent = ua.clone();
        }
        f.respect_robots = self.respect_robots;
        for a in &self.allow_cidrs {
            f.allow_cidrs.push(a.parse()?);
        }
        c.prefilter = PreFilter {
            min_width: self.min_width,
            min_height: self.min_height,
            max_pwatermark: self.max_pwatermark,
            min_similarity: self.min_similarity,
        };
        c.source.url_column = url_column.to_string();
        c.source.caption_column = caption_column.to_string();
        c.webdataset = self.webdataset.clone();
        Ok(c)
    }
}

const DEDUP_KINDS: &str = "exact,perceptual,semantic";
const DEDUP_KEEP: &str = "aesthetic,pixels,key";

fn dedup_kinds() -> Vec<String> {
    DEDUP_KINDS.split(',').map(str::to_string).collect()
}
fn dedup_hamming() -> u32 {
    llamagen_dedup::group::DEFAULT_HAMMING
}
fn dedup_cosine() -> f32 {
    llamagen_dedup::group::DEFAULT_COSINE
}
fn dedup_sample() -> usize {
    DedupConfig::default().sample
}
fn dedup_iterations() -> usize {
    DedupConfig::default().iterations
}
fn dedup_keep() -> Vec<String> {
    DEDUP_KEEP.split(',').map(str::to_string).collect()
}

/// Dataset-wide dedup (`llamagen dedup`, the pipeline's `[dedup]`).
#[derive(Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupArgs {
    /// Kinds of duplicate to look for: exact (content bytes), perceptual (pHash), semantic
    /// (CLIP embeddings, needs the filters' ViT-L/14 encoder).
    #[arg(long, value_delimiter = ',', default_value = DEDUP_KINDS)]
    #[serde(default = "dedup_kinds")]
    pub kinds: Vec<String>,
    /// Perceptual: pHashes within this many bits are duplicates (exact search; the cost grows
    /// quickly above 6, see README "Deduplication").
    #[arg(long, default_value_t = dedup_hamming())]
    #[serde(default = "dedup_hamming")]
    pub hamming: u32,
    /// Perceptual: LSH blocks (default: the fewest whose band keys keep 24 bits).
    #[arg(long)]
    #[serde(default)]
    pub blocks: Option<u32>,
    /// Semantic: cosine similarity at or above which two embeddings are duplicates.
    #[arg(long, default_value_t = dedup_cosine())]
    #[serde(default = "dedup_cosine")]
    pub cosine: f32,
    /// Semantic: k-means clusters (default: one per 10,000 rows with an embedding).
    #[arg(long)]
    #[serde(default)]
    pub clusters: Option<usize>,
    /// Semantic: rows k-means trains on.
    #[arg(long, default_value_t = dedup_sample())]
    #[serde(default = "dedup_sample")]
    pub sample: usize,
    /// Semantic: Lloyd iterations at most.
    #[arg(long, default_value_t = dedup_iterations())]
    #[serde(default = "dedup_iterations")]
    pub iterations: usize,
    /// Keep rule: which row of a group is kept, by aesthetic, pixels, bytes, key in this order.
    #[arg(long, value_delimiter = ',', default_value = DEDUP_KEEP)]
    #[serde(default = "dedup_keep")]
    pub keep: Vec<String>,
}

impl Default for DedupArgs {
    fn default() -> Self {
        DedupArgs {
            kinds: dedup_kinds(),
            hamming: dedup_hamming(),
            blocks: None,
            cosine: dedup_cosine(),
            clusters: None,
            sample: dedup_sample(),
            iterations: dedup_iterations(),
            keep: dedup_keep(),
        }
    }
}

impl DedupArgs {
    /// The dedup crate's config, checked.
    pub fn config(&self) -> Result<DedupConfig> {
        for k in &self.kinds {
            if llamagen_dedup::DupKind::parse(k).is_none() {
                bail!("dedup kinds: unknown kind {k:?} (exact, perceptual, semantic)");
            }
        }
        let has = |k: &str| self.kinds.iter().any(|x| x == k);
        let cfg = DedupConfig {
            exact: has("exact"),
            hamming: has("perceptual").then_some(self.hamming),
            blocks: self.blocks,
            cosine: has("semantic").then_some(self.cosine),
            clusters: self.clusters,
            sample: self.sample,
            iterations: self.iterations,
            seed: 0,
            keep: self.keep.clone(),
        };
        cfg.check()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli<T: Args> {
        #[command(flatten)]
        config: T,
    }

    fn cli<T: Args>(args: &[&str]) -> T {
        let argv = std::iter::once("llamagen").chain(args.iter().copied());
        Cli::<T>::try_parse_from(argv).unwrap().config
    }

    #[test]
    fn flags_and_config_keys_have_the_same_defaults() {
        let a: ScoreConfig = cli(&["--watermark", "w.onnx"]);
        let b: ScoreConfig = toml::from_str("watermark = \"w.onnx\"").unwrap();
        assert_eq!(a, b);
        let a: CaptionsConfig = cli(&["--captions", "c.jsonl"]);
        let b: CaptionsConfig = toml::from_str("files = [\"c.jsonl\"]").unwrap();
        assert_eq!(a, b);
        // The command line needs caption files; a config may list none (fallbacks only).
        assert!(Cli::<CaptionsConfig>::try_parse_from(["llamagen"]).is_err());
        assert!(
            toml::from_str::<CaptionsConfig>("")
                .unwrap()
                .files
                .is_empty()
        );
        assert_eq!(a.fallback, ["top_caption", "text"]);
        let a: T5Config = cli(&["--model", "m"]);
        let b: T5Config = toml::from_str("model = \"m\"").unwrap();
        assert_eq!(a, b);
        let a: VqConfig = cli(&["--checkpoint", "c"]);
        let b: VqConfig = toml::from_str("checkpoint = \"c\"").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.views, [CodeView::Center { image_size: 256 }]);
        let a: IngestOptions = cli(&[]);
        assert_eq!(a, IngestOptions::default());
        assert!(a.respect_robots && a.reduced_decode && a.image_sizes == [256]);
        let a: DedupArgs = cli(&[]);
        let b: DedupArgs = toml::from_str("").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, DedupArgs::default());
        assert_eq!(a.config().unwrap(), DedupConfig::default());
        let a: DedupArgs = cli(&["--kinds", "exact,perceptual", "--hamming", "6"]);
        let b: DedupArgs =
            toml::from_str("kinds = [\"exact\", \"perceptual\"]\nhamming = 6").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.config().unwrap().cosine, None);
        for (bad, says) in [
            (["--kinds", "exact,fuzzy"], "\"fuzzy\""),
            (["--keep", "newest"], "\"newest\""),
            (["--hamming", "70"], "threshold 70"),
            (["--cosine", "1.5"], "cosine = 1.5"),
        ] {
            let e = cli::<DedupArgs>(&bad).config().unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn flags_and_config_keys_give_the_same_values() {
        let a: VqConfig = cli(&[
            "--checkpoint",
            "c",
            "--model",
            "vq8",
            "--view",
            "center:512",
            "--view",
            "tencrop:256:1.1",
            "--batch-size",
            "4",
        ]);
        let b: VqConfig = toml::from_str(
            "checkpoint = \"c\"\nmodel = \"vq8\"\nbatch_size = 4\nviews = [{ kind = \"center\", image_size = 512 }, { kind = \"ten_crop\", image_size = 256, crop_range = 1.1 }]",
        )
        .unwrap();
        assert_eq!(a, b);
        let a: CaptionsConfig = cli(&[
            "--captions",
            "a.jsonl",
            "--fallback",
            "text",
            "--caption-key",
            "blip",
        ]);
        let b: CaptionsConfig =
            toml::from_str("files = [\"a.jsonl\"]\nfallback = [\"text\"]\ncaption_key = \"blip\"")
                .unwrap();
        assert_eq!(a, b);
        let a: ScoreConfig = cli(&[
            "--watermark",
            "w",
            "--caption",
            "top_caption",
            "--provider",
            "cuda",
        ]);
        let b: ScoreConfig =
            toml::from_str("watermark = \"w\"\ncaption = \"top_caption\"\nprovider = \"cuda\"")
                .unwrap();
        assert_eq!(a, b);
        let a: IngestOptions = cli(&[
            "--image-size",
            "256,512",
            "--ignore-robots",
            "--full-decode",
            "--timeout",
            "5",
            "--allow-cidr",
            "127.0.0.0/8",
        ]);
        let b: IngestOptions = toml::from_str(
            "image_sizes = [256, 512]\nrespect_robots = false\nreduced_decode = false\ntimeout_s = 5.0\nallow_cidrs = [\"127.0.0.0/8\"]",
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn one_check_refuses_bad_values_from_either_side() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let c: CaptionsConfig = cli(&["--captions", file, "--fallback", "alt"]);
        let e = format!("{:#}", c.check().unwrap_err());
        assert!(e.contains("fallback \"alt\""), "{e}");
        let c: ScoreConfig = cli(&["--clip-image", "/nonexistent/clip.onnx"]);
        let e = format!("{:#}", c.check().unwrap_err());
        assert!(
            e.contains("clip_image: /nonexistent/clip.onnx does not exist"),
            "{e}"
        );
        let c: VqConfig = toml::from_str(
            "checkpoint = \"c\"\nstandin_seed = 1\nviews = [{ kind = \"center\", image_size = 250 }]",
        )
        .unwrap();
        let e = format!("{:#}", c.check().unwrap_err());
        assert!(
            e.contains("not a multiple of the VQ's downsampling 16"),
            "{e}"
        );
        assert!(toml::from_str::<T5Config>("model = \"m\"\nbatch = 1").is_err());
    }
}
