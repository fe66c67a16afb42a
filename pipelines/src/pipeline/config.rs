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

use crate::stages::{CaptionsConfig, DedupArgs, IngestOptions, ScoreConfig, T5Config, VqConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Where the catalog goes (required).
    pub output: OutputConfig,
    /// The URL lists (required).
    pub input: InputConfig,
    /// Downloads and stored images (the `llamagen ingest` flags).
    #[serde(default)]
    pub ingest: IngestOptions,
    /// Scores and thresholds (the `llamagen filter score` flags, plus `thresholds`); absent: no
    /// filter stage.
    pub filters: Option<ScoreConfig>,
    /// Long and short captions (the `llamagen text captions` flags); absent: no caption stage.
    pub captions: Option<CaptionsConfig>,
    /// T5 caption features (the `llamagen text embed` flags); absent: none.
    pub t5: Option<T5Config>,
    /// VQ codes (the `llamagen encode` flags); absent: none.
    pub vq: Option<VqConfig>,
    /// Dataset-wide duplicates (the `llamagen dedup` flags), after every other stage; absent:
    /// none.
    pub dedup: Option<DedupArgs>,
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
        let r = |p: &Path| resolve(base, p);
        if let Some(f) = &mut self.filters {
            f.resolve_paths(r);
        }
        if let Some(c) = &mut self.captions {
            c.resolve_paths(r);
        }
        if let Some(t) = &mut self.t5 {
            t.resolve_paths(r);
        }
        if let Some(v) = &mut self.vq {
            v.resolve_paths(r);
        }
    }

    /// Checks everything that can be checked without running: values, and that every model and
    /// caption file exists.
    pub fn check(&self) -> Result<()> {
        llamagen_catalog::dataset::check_name(&self.output.dataset)?;
        if self.input.files.is_empty() {
            bail!("[input] files is empty");
        }
        self.ingest.check().context("[ingest]")?;
        if let Some(f) = &self.filters {
            f.check().context("[filters]")?;
        }
        if let Some(c) = &self.captions {
            c.check().context("[captions]")?;
        }
        if let Some(t) = &self.t5 {
            t.check().context("[t5]")?;
            if self.captions.is_none() {
                bail!("[t5] needs [captions] (it encodes the long and short captions)");
            }
        }
        if let Some(v) = &self.vq {
            v.check().context("[vq]")?;
            for view in &v.views {
                let src = view.source_size();
                if !self.ingest.image_sizes.contains(&src) {
                    bail!(
                        "[vq] view {view:?} is computed from the stored {src} px image: add {src} to [ingest] image_sizes"
                    );
                }
            }
        }
        if let Some(d) = &self.dedup {
            d.config().context("[dedup]")?;
            if d.kinds.iter().any(|k| k == "semantic")
                && self
                    .filters
                    .as_ref()
                    .is_none_or(|f| f.clip_l14_image.is_none())
            {
                bail!(
                    "[dedup] semantic needs the CLIP ViT-L/14 embeddings of [filters] clip_l14_image (or drop \"semantic\" from kinds)"
                );
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
