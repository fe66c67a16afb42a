//! `llamagen text`: long/short captions and T5 caption features for the samples of a catalog.

use std::sync::Arc;

use anyhow::Result;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_encode::text_stage::{self, StageRun};

use crate::catalog_cmd::RootArgs;
use crate::stages::{CaptionsConfig, T5Config};

#[derive(Args, Debug)]
pub struct TextArgs {
    #[command(flatten)]
    pub root: RootArgs,
    /// This worker's share of the shards, as INDEX/COUNT. Default: JOB_COMPLETION_INDEX with
    /// WORKERS, or SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, else 0/1 (all shards).
    #[arg(long)]
    pub worker: Option<String>,
    #[command(subcommand)]
    pub command: TextCommand,
}

#[derive(Subcommand, Debug)]
pub enum TextCommand {
    /// Attach long captions from caption files (JSONL, Parquet, LlamaGen jsonl), fall back to
    /// top_caption / alt-text, and derive first-sentence short captions.
    Captions(CaptionsConfig),
    /// Encode long and short captions with a T5 encoder (FLAN-T5-XL for LlamaGen) and store the
    /// valid-token features.
    Embed(T5Config),
}

fn bar(shards: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(shards).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} shards, {elapsed} ({eta} left)")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub async fn run(args: TextArgs) -> Result<std::process::ExitCode> {
    let cat = args.root.open().await?;
    let ds = cat.dataset(&args.root.dataset);
    let part = llamagen_catalog::worker::worker_share(args.worker.as_deref())?;
    let shards = ds.snapshot().await?.shards.len() as u64;
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let (result, extra): (StageRun, serde_json::Value) = match args.command {
        TextCommand::Captions(c) => {
            let stage = c.build()?;
            let index = &stage.index;
            eprintln!(
                "caption files: {} records, {} captions, {} duplicates, skipped {:?}",
                index.records,
                index.captions.len(),
                index.duplicates,
                index.skipped
            );
            let files_report = serde_json::json!({
                "records": index.records,
                "captions": index.captions.len(),
                "duplicates": index.duplicates,
                "skipped": index.skipped,
            });
            let pb = bar(shards, "captions");
            let r = text_stage::run(&ds, Arc::new(stage), part, |_, _| pb.inc(1)).await?;
            pb.finish();
            let c = &r.counters;
            let long = c.extra.get("caption_source_long").copied().unwrap_or(0);
            eprintln!(
                "long-caption coverage: {long} of {} samples ({:.1}%)",
                c.received,
                100.0 * long as f64 / c.received.max(1) as f64
            );
            (r, serde_json::json!({ "caption_files": files_report }))
        }
        TextCommand::Embed(t) => {
            let stage = t.build()?;
            let enc = &stage.encoder;
            let model_report = serde_json::json!({
                "model": enc.model_id, "sha256": enc.weights_sha256, "dim": enc.dim(),
            });
            let pb = bar(shards, "t5");
            let r = text_stage::run(&ds, Arc::new(stage), part, |_, _| pb.inc(1)).await?;
            pb.finish();
            (r, model_report)
        }
    };
    let report = serde_json::json!({
        "shards": result.map,
        "counters": result.counters,
        "details": extra,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    run.finish(0, report);
    runs::record_run(cat.storage(), &run).await?;
    Ok(std::process::ExitCode::SUCCESS)
}
