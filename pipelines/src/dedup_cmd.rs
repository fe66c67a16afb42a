//! `llamagen dedup`: exact, perceptual and semantic duplicates over a whole dataset (see
//! `llamagen_dedup`), with a dry run that reports groups and distance histograms.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_dedup::{RunOptions, dedup_dataset, report};

use crate::catalog_cmd::RootArgs;
use crate::stages::DedupArgs;

#[derive(Args, Debug)]
pub struct DedupCmdArgs {
    #[command(flatten)]
    root: RootArgs,
    #[command(flatten)]
    config: DedupArgs,
    /// Compute hashes, clusters and groups, print and chart them, write no verdict.
    #[arg(long)]
    dry_run: bool,
    /// Train new k-means centroids even if the dataset has stored ones (re-assigns every shard).
    #[arg(long)]
    retrain: bool,
    /// Write the report (groups, duplicates by kind, distance histograms) as HTML here.
    #[arg(long, default_value = "dedup-report.html")]
    chart: PathBuf,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub async fn run(a: DedupCmdArgs) -> Result<ExitCode> {
    let cfg = a.config.config()?;
    let cat = a.root.open().await?;
    let mut record = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &record).await?;
    let pb = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} rows [{elapsed_precise}]")
            .expect("template"),
    );
    let opts = RunOptions {
        dry_run: a.dry_run,
        retrain: a.retrain,
        memory_limit: None,
        cluster_requires: Vec::new(),
    };
    let result = dedup_dataset(
        cat.storage().clone(),
        &a.root.dataset,
        &cfg,
        &opts,
        |stage, rows| {
            pb.set_message(stage.to_string());
            pb.inc(rows)
        },
    )
    .await;
    pb.finish_and_clear();
    let (code, json) = match &result {
        Ok(r) => (0, serde_json::to_value(r)?),
        Err(e) => (1, serde_json::json!({ "error": e.to_string() })),
    };
    record.finish(code, json.clone());
    runs::record_run(cat.storage(), &record).await?;
    let r = result.with_context(|| format!("dedup of dataset {}", a.root.dataset))?;
    // Each stage's counters, when it had shards to process.
    for c in std::iter::once(&r.hash)
        .chain(r.cluster.as_ref())
        .chain(r.apply.as_ref())
        .filter(|c| c.counters.received > 0)
    {
        print!("{}", c.counters);
    }
    print!("{}", report::text(&r.grouping, &cfg, a.dry_run));
    std::fs::write(
        &a.chart,
        report::html(&r.grouping, &cfg, a.dry_run, &a.root.dataset),
    )
    .with_context(|| format!("writing {}", a.chart.display()))?;
    println!("report written to {}", a.chart.display());
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
