//! `llamagen ingest`: URL lists to image shards.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_ingest::{IngestConfig, OutputFormat, PreFilter, Progress};

use crate::catalog_cmd::RootArgs;

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// URL lists: Parquet, CSV or JSONL files, local or s3://.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub root: RootArgs,
    /// Sizes of the stored centre crops, comma-separated (LlamaGen's stages: 256,512).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub image_size: Vec<u32>,
    /// Stored image encoding: jpeg, png or webp (lossless).
    #[arg(long, default_value = "jpeg")]
    pub format: String,
    /// JPEG quality.
    #[arg(long, default_value_t = 95)]
    pub quality: u8,
    /// Keep JPEG chroma at full resolution (4:4:4) instead of 4:2:0 (PIL's and OpenCV's default).
    #[arg(long)]
    pub jpeg_444: bool,
    /// Column holding the image URL.
    #[arg(long, default_value = "URL")]
    pub url_column: String,
    /// Column holding the alt-text caption.
    #[arg(long, default_value = "TEXT")]
    pub caption_column: String,
    /// Rows per work unit (one commit each; the granularity of resume).
    #[arg(long, default_value_t = 10_000)]
    pub unit_rows: usize,
    /// Units processed at once: a unit's slowest downloads overlap the next unit's work.
    #[arg(long, default_value_t = 2)]
    pub units_in_flight: usize,
    /// This worker's share of the work, as INDEX/COUNT (e.g. 3/8). Default: JOB_COMPLETION_INDEX
    /// or SLURM_ARRAY_TASK_ID with WORKERS / SLURM_ARRAY_TASK_COUNT, else 0/1.
    #[arg(long)]
    pub worker: Option<String>,
    /// Downloads in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Downloads in flight per host.
    #[arg(long, default_value_t = 8)]
    pub per_host: usize,
    /// Connect timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Deadline of one download attempt (headers and body), seconds.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// Retries of transient failures (connect errors, resets, 429, 5xx).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// First retry backoff, seconds (doubles each retry, with jitter).
    #[arg(long, default_value_t = 0.5)]
    pub backoff: f64,
    /// Largest accepted body, bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_bytes: u64,
    /// Redirect hops followed.
    #[arg(long, default_value_t = 5)]
    pub max_redirects: usize,
    /// Body bytes held in memory at once over all downloads, MiB (a download waits for room).
    #[arg(long, default_value_t = 256)]
    pub max_inflight_mib: u64,
    /// Send `user:pass@` credentials found in URLs as Basic auth (default: stripped before the
    /// request). They are never stored either way.
    #[arg(long)]
    pub allow_url_credentials: bool,
    /// User-Agent header.
    #[arg(long)]
    pub user_agent: Option<String>,
    /// Ignore X-Robots-Tag noai/noimageai/noindex/noimageindex (honoured by default).
    #[arg(long)]
    pub ignore_robots: bool,
    /// Allow downloads from these address ranges even though they are private or loopback
    /// (CIDR, repeatable), e.g. 127.0.0.0/8 for a local mirror.
    #[arg(long = "allow-cidr")]
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
    /// Decode large JPEGs at full resolution (default: reduced DCT-domain decoding when the
    /// image is at least 4x the largest target size).
    #[arg(long)]
    pub full_decode: bool,
    /// Upscale images whose shorter side is below an --image-size (default: as LlamaGen's t2i
    /// dataset, no crop of that size; the row records below_image_size_<size>, and is dropped
    /// when no size is left).
    #[arg(long)]
    pub upscale_small_images: bool,
    /// Threads for decoding and resizing (default: available cores).
    #[arg(long)]
    pub cpu_workers: Option<usize>,
    /// Also write img2dataset's webdataset layout here (local directory or s3:// prefix): per
    /// size, one tar of <key>.jpg/.txt/.json per work unit, plus its _stats.json.
    #[arg(long)]
    pub webdataset: Option<String>,
}

impl IngestArgs {
    pub fn config(&self) -> Result<IngestConfig> {
        let mut cfg = IngestConfig::default();
        cfg.sizes = self.image_size.clone();
        cfg.format = match self.format.as_str() {
            "jpeg" | "jpg" => OutputFormat::Jpeg {
                quality: self.quality,
                full_chroma: self.jpeg_444,
            },
            "png" => OutputFormat::Png,
            "webp" => OutputFormat::Webp,
            other => bail!("--format {other:?}: use jpeg, png or webp"),
        };
        cfg.reduced_decode = !self.full_decode;
        cfg.upscale_small = self.upscale_small_images;
        cfg.unit_rows = self.unit_rows;
        cfg.units_in_flight = self.units_in_flight;
        cfg.partition = llamagen_catalog::worker::worker_share(self.worker.as_deref())?;
        if let Some(n) = self.cpu_workers {
            cfg.cpu_workers = n;
        }
        cfg.fetch.concurrency = self.concurrency;
        cfg.fetch.per_host = self.per_host;
        cfg.fetch.connect_timeout = Duration::from_secs_f64(self.connect_timeout);
        cfg.fetch.deadline = Duration::from_secs_f64(self.timeout);
        cfg.fetch.max_retries = self.retries;
        cfg.fetch.backoff = Duration::from_secs_f64(self.backoff);
        cfg.fetch.max_body_bytes = self.max_bytes;
        cfg.fetch.max_redirects = self.max_redirects;
        cfg.fetch.max_inflight_bytes = self.max_inflight_mib << 20;
        cfg.fetch.allow_url_credentials = self.allow_url_credentials;
        if let Some(ua) = &self.user_agent {
            cfg.fetch.user_agent = ua.clone();
        }
        cfg.fetch.respect_robots = !self.ignore_robots;
        for c in &self.allow_cidrs {
            cfg.fetch.allow_cidrs.push(
                c.parse()
                    .with_context(|| format!("--allow-cidr {c:?} is not a CIDR"))?,
            );
        }
        cfg.prefilter = PreFilter {
            min_width: self.min_width,
            min_height: self.min_height,
            max_pwatermark: self.max_pwatermark,
            min_similarity: self.min_similarity,
        };
        cfg.source.url_column = self.url_column.clone();
        cfg.source.caption_column = self.caption_column.clone();
        cfg.storage = self.root.storage_options();
        cfg.dataset = self.root.dataset.clone();
        cfg.webdataset = self.webdataset.clone();
        Ok(cfg)
    }
}

/// Progress bar: rows, images/s, success rate, ETA (when the inputs' row count is known).
struct Bar {
    bar: ProgressBar,
    ok: AtomicU64,
    done: AtomicU64,
}

impl Progress for Bar {
    fn rows_done(&self, n: u64, ok: u64) {
        let ok = self.ok.fetch_add(ok, Ordering::Relaxed) + ok;
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.bar.inc(n);
        self.bar
            .set_message(format!("{:.1}% ok", 100.0 * ok as f64 / done.max(1) as f64));
    }
    fn message(&self, msg: &str) {
        self.bar.set_prefix(msg.to_string());
    }
}

/// Rows of local Parquet inputs (from their footers), for the ETA; None if any is unknown.
fn known_rows(inputs: &[String]) -> Option<u64> {
    let mut total = 0;
    for i in inputs {
        if !i.ends_with(".parquet") || i.starts_with("s3://") {
            return None;
        }
        let f = std::fs::File::open(i).ok()?;
        let r = llamagen_catalog::parquet_rows(f)?;
        total += r;
    }
    Some(total)
}

pub async fn run(args: IngestArgs) -> Result<ExitCode> {
    let cfg = args.config()?;
    let cat = args.root.open().await?;
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let cfg = IngestConfig {
        run_id: Some(run.run_id.clone()),
        ..cfg
    };
    let bar = match known_rows(&args.inputs) {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} rows, {per_sec}, {msg}, ETA {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} {pos} rows, {per_sec}, {msg} [{elapsed}]",
            )
            .expect("template"),
        ),
    };
    let progress = Bar {
        bar,
        ok: AtomicU64::new(0),
        done: AtomicU64::new(0),
    };
    let result = llamagen_ingest::run(&cat, &args.inputs, &cfg, &progress).await;
    progress.bar.finish_and_clear();
    let code = match &result {
        Ok(_) => 0,
        Err(_) => 1,
    };
    let report = match &result {
        Ok(r) => serde_json::to_value(r)?,
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    run.finish(code, report);
    runs::record_run(cat.storage(), &run).await?;
    let r = result?;
    print!("{}", r.counters);
    println!(
        "  {:<24}  {:>12}\n  {:<24}  {:>12}\n  {:<24}  {:>12.1}\n  {:<24}  {:>12.1}",
        "units committed",
        r.units_committed,
        "units already done",
        r.units_skipped,
        "seconds",
        r.seconds,
        "rows/s",
        r.counters.received as f64 / r.seconds.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}
