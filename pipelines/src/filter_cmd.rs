//! `llamagen filter …`: score samples (CLIP similarity, aesthetic, watermark, NSFW) and apply
//! re-tunable thresholds to the stored scores.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::{StageCounters, runs};
use llamagen_filters::report::DryRun;
use llamagen_filters::rules::Thresholds;
use llamagen_filters::stage::{self, VERDICT_COLUMNS};

use crate::catalog_cmd::RootArgs;
use crate::stages::ScoreConfig;

#[derive(Args, Debug)]
pub struct FilterArgs {
    #[command(subcommand)]
    command: FilterCommand,
}

#[derive(Subcommand, Debug)]
enum FilterCommand {
    /// Compute scores for every committed sample (stored as columns; no verdicts).
    Score(ScoreArgs),
    /// Turn stored scores into keep/drop verdicts with a thresholds file (TOML).
    Apply(ApplyArgs),
}

#[derive(Args, Debug)]
struct ScoreArgs {
    #[command(flatten)]
    root: RootArgs,
    #[command(flatten)]
    config: ScoreConfig,
    /// This worker's share of the shards, as INDEX/COUNT (e.g. 0/4). Default: JOB_COMPLETION_INDEX
    /// with WORKERS, or SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, else 0/1 (all shards).
    #[arg(long)]
    worker: Option<String>,
}

#[derive(Args, Debug)]
struct ApplyArgs {
    #[command(flatten)]
    root: RootArgs,
    /// Thresholds file (TOML; see README "Filters").
    #[arg(long)]
    thresholds: PathBuf,
    /// Print histograms and drop counts without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: write the histograms as an HTML chart here.
    #[arg(long, default_value = "filter-dry-run.html")]
    chart: PathBuf,
    /// With --dry-run: also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// This worker's share of the shards, as INDEX/COUNT. Default: JOB_COMPLETION_INDEX with
    /// WORKERS, or SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, else 0/1 (all shards).
    #[arg(long)]
    worker: Option<String>,
}

fn bar(msg: &str) -> ProgressBar {
    let b = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} rows [{elapsed_precise}, {per_sec}]")
            .expect("template"),
    );
    b.set_message(msg.to_string());
    b
}

pub async fn run(args: FilterArgs) -> Result<ExitCode> {
    match args.command {
        FilterCommand::Score(a) => score(a).await,
        FilterCommand::Apply(a) => apply(a).await,
    }
}

async fn score(a: ScoreArgs) -> Result<ExitCode> {
    let partition = llamagen_catalog::worker::worker_share(a.worker.as_deref())?;
    let scorer = a.config.load().await?;
    for id in scorer.model_ids() {
        eprintln!(
            "{}: {} sha256 {} ({})",
            id.score, id.model, id.sha256, id.version
        );
    }
    let cat = a.root.open().await?;
    let ds = cat.dataset(&a.root.dataset);
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let started = Instant::now();
    let pb = bar("scoring");
    let pb2 = pb.clone();
    let result =
        stage::score_catalog(&ds, Arc::new(scorer), partition, move |rows| pb2.inc(rows)).await;
    pb.finish_and_clear();
    let (code, report) = match &result {
        Ok(r) => (0, serde_json::to_value(r)?),
        Err(e) => (1, serde_json::json!({ "error": e.to_string() })),
    };
    run.finish(code, report);
    runs::record_run(cat.storage(), &run).await?;
    let r = result?;
    print!("{}", r.counters);
    let t = r.timings;
    if t.images > 0 {
        println!(
            "  {} images in {:.1}s ({:.1} images/s): decode {:.2} ms/image, preprocess {:.2} ms/image (thread time), inference {:.1}s wall",
            t.images,
            started.elapsed().as_secs_f64(),
            t.images as f64 / started.elapsed().as_secs_f64(),
            1e3 * t.decode_s / t.images as f64,
            1e3 * t.preprocess_s / t.images as f64,
            t.inference_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply(a: ApplyArgs) -> Result<ExitCode> {
    let partition = llamagen_catalog::worker::worker_share(a.worker.as_deref())?;
    let text = std::fs::read_to_string(&a.thresholds)
        .with_context(|| format!("reading {}", a.thresholds.display()))?;
    let t = Thresholds::from_toml(&a.thresholds.display().to_string(), &text)?;
    let cat = a.root.open().await?;
    let ds = cat.dataset(&a.root.dataset);
    let name = stage::apply_stage_name(&t);
    if a.dry_run {
        let snap = ds.snapshot().await?;
        let mut dr = DryRun::new(&t, &name);
        let pb = bar("reading scores");
        for entry in &snap.shards {
            for b in ds.read_shard(entry, Some(VERDICT_COLUMNS)).await? {
                let vals = stage::row_values(&b)?;
                let states = stage::row_states(&b)?;
                for ((st, rs), v) in states.iter().zip(&vals) {
                    dr.add(st, rs, v);
                }
                pb.inc(b.num_rows() as u64);
            }
        }
        pb.finish_and_clear();
        let report = dr.finish();
        print!("{}", report.to_text());
        std::fs::write(&a.chart, report.to_html())
            .with_context(|| format!("writing {}", a.chart.display()))?;
        println!("\nchart written to {}", a.chart.display());
        if let Some(j) = &a.json {
            std::fs::write(j, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", j.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let pb = bar("applying thresholds");
    let pb2 = pb.clone();
    let result = stage::apply_catalog(&ds, &t, partition, move |rows| pb2.inc(rows)).await;
    pb.finish_and_clear();
    let (code, report) = match &result {
        Ok((stage, map, counters)) => (
            0,
            serde_json::json!({ "stage": stage, "map": map, "counters": counters, "thresholds": t }),
        ),
        Err(e) => (1, serde_json::json!({ "error": e.to_string() })),
    };
    run.finish(code, report);
    runs::record_run(cat.storage(), &run).await?;
    let (stage, map, mut counters): (String, _, StageCounters) = result?;
    counters.add_extra("shards_rewritten", map.shards_rewritten);
    counters.add_extra("shards_skipped", map.shards_skipped);
    println!("{stage}");
    print!("{counters}");
    Ok(ExitCode::SUCCESS)
}
