//! `llamagen ingest`: URL lists to image shards.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_ingest::{IngestConfig, Progress};

use crate::catalog_cmd::RootArgs;
use crate::stages::IngestOptions;

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// URL lists: Parquet, CSV or JSONL files, local or s3://.
    #[arg(long = "input", short = 'i', required = true)]
    pub inputs: Vec<String>,
    #[command(flatten)]
    pub root: RootArgs,
    /// Column holding the image URL.
    #[arg(long, default_value = "URL")]
    pub url_column: String,
    /// Column holding the alt-text caption.
    #[arg(long, default_value = "TEXT")]
    pub caption_column: String,
    /// This worker's share of the work, as INDEX/COUNT (e.g. 3/8). Default: JOB_COMPLETION_INDEX
    /// or SLURM_ARRAY_TASK_ID with WORKERS / SLURM_ARRAY_TASK_COUNT, else 0/1.
    #[arg(long)]
    pub worker: Option<String>,
    #[command(flatten)]
    pub options: IngestOptions,
}

impl IngestArgs {
    pub fn config(&self) -> Result<IngestConfig> {
        let mut cfg = self.options.build(&self.url_column, &self.caption_column)?;
        cfg.partition = llamagen_catalog::worker::worker_share(self.worker.as_deref())?;
        cfg.storage = self.root.storage_options();
        cfg.dataset = self.root.dataset.clone();
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
