//! The pipeline config: one TOML file from URL lists to ready shards.
//!
//! Every table and key is optional unless marked required; unknown keys are refused with their
//! name. Paths may use `${NAME}` / `${NAME:-default}` environment variables. Relative local paths
//! (inputs, models, caption files, a local output root) are resolved against the directory of the
//! config file, so a scheduler may start the run from anywhere.
//! Sections that are absent are stages that do not run: `[filters]`, `[captions]`, `[t5]` and
//! `[vq]` each enable one stage.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llamagen_encode::vq_stage::CodeView;
use llamagen_filters::rules::Thresholds;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Where the catalog goes (required).
    pub output: OutputConfig,
    /// The URL lists (required).
    pub input: InputConfig,
    #[serde(default)]
    pub ingest: IngestSection,
    /// Scores and thresholds; absent: no filter stage.
    pub filters: Option<FiltersSection>,
    /// Long and short captions; absent: no caption stage (t5 then encodes nothing useful).
    pub captions: Option<CaptionsSection>,
    /// T5 caption features; absent: none.
    pub t5: Option<T5Section>,
    /// VQ codes; absent: none.
    pub vq: Option<VqSection>,
    #[serde(default)]
    pub lease: LeaseSection,
    #[serde(default)]
    pub report: ReportSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Catalog root: a local directory or `s3://bucket/prefix` (required).
    pub root: String,
    /// Dataset inside the root. Default `samples`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// S3-compatible endpoint (default: AWS, or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    /// S3 region (default: `AWS_REGION`, then us-east-1).
    pub s3_region: Option<String>,
    /// Path-style (true) or virtual-host (false) addressing (default: path style with an endpoint).
    pub s3_path_style: Option<bool>,
}

fn default_dataset() -> String {
    "samples".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// URL lists: Parquet, CSV or JSONL files, local or `s3://`; a local directory stands for the
    /// lists inside it (sorted). Required.
    pub files: Vec<String>,
    /// Column holding the image URL. Default `URL`.
    #[serde(default = "default_url")]
    pub url_column: String,
    /// Column holding the alt-text. Default `TEXT`.
    #[serde(default = "default_caption")]
    pub caption_column: String,
    /// Skip input files that an earlier successful run of this config's dataset completed
    /// (scheduled runs over a growing folder). Default false: every file is read, and work
    /// already committed is skipped unit by unit anyway.
    #[serde(default)]
    pub incremental: bool,
}

fn default_url() -> String {
    "URL".into()
}
fn default_caption() -> String {
    "TEXT".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSection {
    /// Sizes of the stored centre crops. Default `[256]` (LlamaGen's stages: 256 and 512; a
    /// ten-crop VQ view needs its crop size too, e.g. 281).
    pub image_sizes: Vec<u32>,
    /// Stored encoding: `jpeg`, `png` or `webp` (lossless). Default `jpeg`.
    pub format: String,
    /// JPEG quality. Default 95.
    pub quality: u8,
    /// Rows per work unit (one commit each; the granularity of resume). Default 10,000.
    pub unit_rows: usize,
    /// Units processed at once (a unit's slowest downloads overlap the next unit's). Default 2.
    pub units_in_flight: usize,
    /// Downloads in flight. Default 64.
    pub concurrency: usize,
    /// Downloads in flight per host. Default 8.
    pub per_host: usize,
    /// Connect timeout, seconds. Default 10.
    pub connect_timeout_s: f64,
    /// Deadline of one download attempt, seconds. Default 30.
    pub timeout_s: f64,
    /// Retries of transient failures. Default 2.
    pub retries: u32,
    /// First retry backoff, seconds (doubling, with jitter). Default 0.5.
    pub backoff_s: f64,
    /// Largest accepted body, bytes. Default 32 MiB.
    pub max_bytes: u64,
    /// Redirect hops followed. Default 5.
    pub max_redirects: usize,
    /// Body bytes held in memory at once over all downloads, MiB. Default 256.
    pub max_inflight_mib: u64,
    /// Send `user:pass@` credentials found in URLs as Basic auth. Default false (stripped before
    /// the request; never stored either way).
    pub allow_url_credentials: bool,
    /// User-Agent header (default: llamagen's).
    pub user_agent: Option<String>,
    /// Honour X-Robots-Tag noai/noimageai/noindex/noimageindex. Default true.
    pub respect_robots: bool,
    /// Address ranges allowed although private or loopback (CIDRs), e.g. `127.0.0.0/8` for a
    /// local mirror. Default none.
    pub allow_cidrs: Vec<String>,
    /// Pre-download filter on metadata: rows below/above are recorded as dropped, never fetched.
    pub min_width: Option<i64>,
    pub min_height: Option<i64>,
    pub max_pwatermark: Option<f64>,
    pub min_similarity: Option<f64>,
    /// Decode large JPEGs in the DCT domain at a reduced size. Default true.
    pub reduced_decode: bool,
    /// Upscale images whose shorter side is below an image size. Default false: as LlamaGen's
    /// t2i dataset, no crop of that size (`below_image_size_<size>`; dropped if no size is left).
    pub upscale_small: bool,
    /// Threads decoding and resizing (default: available cores).
    pub cpu_workers: Option<usize>,
    /// Keep JPEG chroma at full resolution (4:4:4) instead of 4:2:0. Default false.
    pub jpeg_444: bool,
    /// Also write img2dataset's webdataset layout (tar shards, one folder per size) to this local
    /// directory or `s3://` prefix. Default: none.
    pub webdataset: Option<String>,
}

impl Default for IngestSection {
    fn default() -> Self {
        IngestSection {
            image_sizes: vec![256],
            format: "jpeg".into(),
            quality: 95,
            unit_rows: 10_000,
            units_in_flight: 2,
            concurrency: 64,
            per_host: 8,
            connect_timeout_s: 10.0,
            timeout_s: 30.0,
            retries: 2,
            backoff_s: 0.5,
            max_bytes: 32 << 20,
            max_redirects: 5,
            max_inflight_mib: 256,
            allow_url_credentials: false,
            user_agent: None,
            respect_robots: true,
            allow_cidrs: Vec::new(),
            min_width: None,
            min_height: None,
            max_pwatermark: None,
            min_similarity: None,
            reduced_decode: true,
            upscale_small: false,
            cpu_workers: None,
            webdataset: None,
            jpeg_444: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FiltersSection {
    /// CLIP ViT-B/32 image and text encoders (ONNX): `score_clip_similarity`.
    pub clip_image: Option<PathBuf>,
    pub clip_text: Option<PathBuf>,
    /// Caption compared with the image: `text`, `top_caption` or `long_caption`. Default `text`.
    #[serde(default = "default_clip_caption")]
    pub caption: String,
    /// CLIP ViT-L/14 image encoder (ONNX) for the aesthetic and NSFW heads.
    pub clip_l14_image: Option<PathBuf>,
    /// Aesthetic head (.pth or .onnx); default the bundled LAION-Aesthetics V2 head.
    pub aesthetic_head: Option<PathBuf>,
    #[serde(default)]
    pub no_aesthetic: bool,
    /// NSFW head (.onnx) on the ViT-L/14 embedding.
    pub nsfw_head: Option<PathBuf>,
    /// LAION watermark classifier (ONNX).
    pub watermark: Option<PathBuf>,
    #[serde(default)]
    pub watermark_class_index: usize,
    /// Rows per inference call. Default 32.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[serde(default)]
    pub intra_threads: usize,
    /// Threads preprocessing images (0: one per core).
    #[serde(default)]
    pub preprocess_threads: usize,
    /// Keep/drop rules on the stored scores (the `llamagen filter apply` thresholds format);
    /// absent: scores only, no verdicts.
    pub thresholds: Option<Thresholds>,
}

fn default_clip_caption() -> String {
    "text".into()
}
fn default_batch() -> usize {
    32
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionsSection {
    /// Long-caption files (JSONL, Parquet, or LlamaGen's jsonl); may be empty (fallbacks only).
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Join on `key`, `url` or `image_path`. Default `key`.
    #[serde(default = "default_join")]
    pub join: String,
    pub join_field: Option<String>,
    pub text_field: Option<String>,
    /// Entry of a list-valued caption (LlamaGen's t2i `text: [blip, llava, llava_first]`):
    /// `blip`, `llava`, `llava_first`, an index, or `first` (first non-blank). Default `llava`.
    #[serde(default = "default_caption_key")]
    pub caption_key: String,
    /// Texts used when a sample has no long caption, in order. Default `["top_caption", "text"]`.
    #[serde(default = "default_fallback")]
    pub fallback: Vec<String>,
}

fn default_caption_key() -> String {
    "llava".into()
}

fn default_join() -> String {
    "key".into()
}
fn default_fallback() -> Vec<String> {
    vec!["top_caption".into(), "text".into()]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Section {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json). Required.
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub model_id: Option<String>,
    /// Stored dtype: `bf16` or `f16`. Default `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Tokens including EOS. Default 120.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Tokens per batch. Default 4096.
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    /// Run on CUDA (a `--features cuda` build). Default false.
    #[serde(default)]
    pub cuda: bool,
}

fn default_dtype() -> String {
    "bf16".into()
}
fn default_max_tokens() -> usize {
    120
}
fn default_batch_tokens() -> usize {
    4096
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqSection {
    /// VQ weights: official `.pt` (its `model` dict) or safetensors with official keys. Required.
    pub checkpoint: PathBuf,
    /// Architecture: `vq16` (default), `vq8`, a JSON file of `ModelArgs` (as `llamagen sample
    /// --vq-args` takes), or a table of `ModelArgs` fields.
    #[serde(default = "default_vq_model")]
    pub model: VqModelSpec,
    /// Code sets per image. Default: one 256 px centre crop.
    #[serde(default = "default_views")]
    pub views: Vec<CodeView>,
    /// Images per forward pass. Default 8.
    #[serde(default = "default_vq_batch")]
    pub batch_size: usize,
    /// When set and `checkpoint` does not exist, write random stand-in weights there made from
    /// this seed (demos and tests only: the codes mean nothing). Default: unset.
    pub standin_seed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
                        .with_context(|| format!("[vq] model: reading {path}"))?;
                    let a: llamagen_encode::ModelArgs = serde_json::from_str(&text)
                        .with_context(|| format!("[vq] model: {path}"))?;
                    a.validate()?;
                    a
                }
                other => bail!(
                    "[vq] model = {other:?}: use vq16, vq8, a .json file or a table of ModelArgs"
                ),
            },
            VqModelSpec::Args(a) => {
                a.validate()?;
                a.clone()
            }
        })
    }
}

fn default_vq_model() -> VqModelSpec {
    VqModelSpec::Named("vq16".into())
}
fn default_views() -> Vec<CodeView> {
    vec![CodeView::Center { image_size: 256 }]
}
fn default_vq_batch() -> usize {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSection {
    /// Take a lease so two runs of the same dataset and worker never write at once. Default true.
    pub enabled: bool,
    /// Lease time-to-live, seconds; renewed every third of it while the run works. Default 600.
    pub ttl_s: u64,
}

impl Default for LeaseSection {
    fn default() -> Self {
        LeaseSection {
            enabled: true,
            ttl_s: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSection {
    /// Write `report.html` (counts, drop reasons, score histograms, thumbnails) and
    /// `report.json` under `<root>/<dataset>/_reports/`. Default true.
    pub html: bool,
    /// Thumbnails in the HTML grid. Default 24.
    pub thumbnails: usize,
}

impl Default for ReportSection {
    fn default() -> Self {
        ReportSection {
            html: true,
            thumbnails: 24,
        }
    }
}

/// Expands `${NAME}` and `${NAME:-default}` from the environment (an unset `${NAME}` is empty).
pub fn expand_env(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match std::env::var(name).ok().filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&v),
            None => out.push_str(default.unwrap_or("")),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    let p = PathBuf::from(expand_env(&p.to_string_lossy()));
    if p.is_absolute() { p } else { base.join(p) }
}

fn resolve_str(base: &Path, s: &str) -> String {
    let s = expand_env(s);
    if s.contains("://") {
        s
    } else {
        resolve(base, Path::new(&s)).display().to_string()
    }
}

impl PipelineConfig {
    /// Reads, parses and checks a config file; relative paths become relative to its directory.
    pub fn load(path: &Path) -> Result<PipelineConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline config {}", path.display()))?;
        let mut cfg: PipelineConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        cfg.resolve_paths(&base);
        cfg.check().with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.output.root = resolve_str(base, &self.output.root);
        if let Some(w) = &mut self.ingest.webdataset {
            *w = resolve_str(base, w);
        }
        for f in &mut self.input.files {
            *f = resolve_str(base, f);
        }
        if let Some(f) = &mut self.filters {
            for p in [
                &mut f.clip_image,
                &mut f.clip_text,
                &mut f.clip_l14_image,
                &mut f.aesthetic_head,
                &mut f.nsfw_head,
                &mut f.watermark,
            ]
            .into_iter()
            .flatten()
            {
                *p = resolve(base, p);
            }
        }
        if let Some(c) = &mut self.captions {
            for p in &mut c.files {
                *p = resolve(base, p);
            }
        }
        if let Some(t) = &mut self.t5 {
            t.model = resolve(base, &t.model);
            if let Some(tk) = &mut t.tokenizer {
                *tk = resolve(base, tk);
            }
        }
        if let Some(v) = &mut self.vq {
            v.checkpoint = resolve(base, &v.checkpoint);
            if let VqModelSpec::Named(n) = &mut v.model
                && n.ends_with(".json")
            {
                *n = resolve_str(base, n);
            }
        }
    }

    /// Checks everything that can be checked without running: values, and that every model and
    /// caption file exists.
    pub fn check(&self) -> Result<()> {
        llamagen_catalog::dataset::check_name(&self.output.dataset)?;
        if self.input.files.is_empty() {
            bail!("[input] files is empty");
        }
        let i = &self.ingest;
        if i.image_sizes.is_empty() || i.image_sizes.contains(&0) {
            bail!("[ingest] image_sizes must be positive sizes");
        }
        if !matches!(i.format.as_str(), "jpeg" | "jpg" | "png" | "webp") {
            bail!("[ingest] format = {:?}: use jpeg, png or webp", i.format);
        }
        if i.unit_rows == 0 || i.units_in_flight == 0 || i.concurrency == 0 || i.per_host == 0 {
            bail!("[ingest] unit_rows, units_in_flight, concurrency and per_host must be positive");
        }
        for c in &i.allow_cidrs {
            c.parse::<ipnet::IpNet>()
                .with_context(|| format!("[ingest] allow_cidrs: {c:?} is not a CIDR"))?;
        }
        let exists = |what: &str, p: &Path| -> Result<()> {
            if !p.exists() {
                bail!("{what}: {} does not exist", p.display());
            }
            Ok(())
        };
        if let Some(f) = &self.filters {
            f.caption
                .parse::<llamagen_filters::scorer::CaptionField>()
                .map_err(|e| anyhow::anyhow!("[filters] caption: {e}"))?;
            for (k, p) in [
                ("clip_image", &f.clip_image),
                ("clip_text", &f.clip_text),
                ("clip_l14_image", &f.clip_l14_image),
                ("aesthetic_head", &f.aesthetic_head),
                ("nsfw_head", &f.nsfw_head),
                ("watermark", &f.watermark),
            ] {
                if let Some(p) = p {
                    exists(&format!("[filters] {k}"), p)?;
                }
            }
            if f.clip_image.is_some() != f.clip_text.is_some() {
                bail!("[filters] clip_image and clip_text go together");
            }
            if f.clip_image.is_none() && f.clip_l14_image.is_none() && f.watermark.is_none() {
                bail!(
                    "[filters] configures no model (clip_image/clip_text, clip_l14_image or watermark)"
                );
            }
        }
        if let Some(c) = &self.captions {
            for p in &c.files {
                exists("[captions] files", p)?;
            }
            if !matches!(c.join.as_str(), "key" | "url" | "image_path") {
                bail!("[captions] join = {:?}: use key, url or image_path", c.join);
            }
            if llamagen_encode::captions::CaptionKey::parse(&c.caption_key).is_none() {
                bail!(
                    "[captions] caption_key = {:?}: use blip, llava, llava_first, first or an index",
                    c.caption_key
                );
            }
            for f in &c.fallback {
                if !matches!(f.as_str(), "top_caption" | "text") {
                    bail!("[captions] fallback {f:?}: use top_caption or text");
                }
            }
        }
        if let Some(t) = &self.t5 {
            exists("[t5] model", &t.model)?;
            if let Some(tk) = &t.tokenizer {
                exists("[t5] tokenizer", tk)?;
            }
            if !matches!(t.dtype.as_str(), "bf16" | "f16") {
                bail!("[t5] dtype = {:?}: use bf16 or f16", t.dtype);
            }
            if self.captions.is_none() {
                bail!("[t5] needs [captions] (it encodes the long and short captions)");
            }
        }
        if let Some(v) = &self.vq {
            let args = v.model.args()?;
            if v.standin_seed.is_none() {
                exists("[vq] checkpoint", &v.checkpoint)?;
            }
            if v.views.is_empty() || v.batch_size == 0 {
                bail!("[vq] views must not be empty and batch_size must be positive");
            }
            let f = args.downsample_factor() as u32;
            for view in &v.views {
                let (size, src) = match view {
                    CodeView::Center { image_size } => (*image_size, *image_size),
                    CodeView::TenCrop { image_size, .. } => (*image_size, view.source_size()),
                };
                if size == 0 || size % f != 0 {
                    bail!(
                        "[vq] view image_size {size} is not a multiple of the VQ's downsampling {f}"
                    );
                }
                if !self.ingest.image_sizes.contains(&src) {
                    bail!(
                        "[vq] view {view:?} is computed from the stored {src} px image: add {src} to [ingest] image_sizes"
                    );
                }
            }
        }
        if self.lease.ttl_s < 3 {
            bail!("[lease] ttl_s must be at least 3 seconds");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("p.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "[output]\nroot = \"out\"\n[input]\nfiles = [\"a.jsonl\"]\n[ingest]\nimage_size = [256]\n",
        );
        let e = format!("{:#}", PipelineConfig::load(&p).unwrap_err());
        assert!(e.contains("image_size"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_config_file_and_missing_models_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "[output]\nroot = \"out\"\n[input]\nfiles = [\"lists\"]\n[vq]\ncheckpoint = \"vq.safetensors\"\n",
        );
        let e = format!("{:#}", PipelineConfig::load(&p).unwrap_err());
        assert!(
            e.contains(&d.path().join("vq.safetensors").display().to_string()),
            "{e}"
        );
        let p = write(
            d.path(),
            "[output]\nroot = \"out\"\n[input]\nfiles = [\"lists\", \"s3://b/l.parquet\"]\n",
        );
        let c = PipelineConfig::load(&p).unwrap();
        assert_eq!(c.output.root, d.path().join("out").display().to_string());
        assert_eq!(
            c.input.files[0],
            d.path().join("lists").display().to_string()
        );
        assert_eq!(c.input.files[1], "s3://b/l.parquet");
    }

    #[test]
    fn environment_variables_expand_in_paths() {
        // SAFETY: no other thread of this test reads or writes this variable.
        unsafe { std::env::set_var("LLAMAGEN_TEST_OUT_DIR", "/data/x") };
        assert_eq!(expand_env("${LLAMAGEN_TEST_OUT_DIR}/a"), "/data/x/a");
        assert_eq!(expand_env("${LLAMAGEN_TEST_UNSET_VAR:-out}/a"), "out/a");
        assert_eq!(expand_env("s3://b/${LLAMAGEN_TEST_UNSET_VAR}p"), "s3://b/p");
        assert_eq!(expand_env("plain"), "plain");
    }

    #[test]
    fn a_vq_view_needs_its_stored_size() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "[output]\nroot = \"out\"\n[input]\nfiles = [\"l\"]\n[vq]\ncheckpoint = \"x\"\nstandin_seed = 0\nviews = [{ kind = \"ten_crop\", image_size = 256, crop_range = 1.1 }]\n",
        );
        let e = format!("{:#}", PipelineConfig::load(&p).unwrap_err());
        assert!(e.contains("add 281 to [ingest] image_sizes"), "{e}");
    }
}
