//! `llamagen encode`: image shards → VQ code grids (`vq_codes`), the VQ stage on its own.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_catalog::stage::Stage;
use llamagen_encode::text_stage;

use crate::catalog_cmd::RootArgs;
use crate::stages::VqConfig;

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub root: RootArgs,
    #[command(flatten)]
    pub vq: VqConfig,
    /// This worker's share of the shards, as INDEX/COUNT.
    #[arg(long)]
    pub worker: Option<String>,
}

pub async fn run(args: EncodeArgs) -> Result<ExitCode> {
    let stage = Arc::new(args.vq.build()?);
    let name = stage.name();
    let partition = llamagen_catalog::worker::worker_share(args.worker.as_deref())?;
    let cat = args.root.open().await?;
    let ds = cat.dataset(&args.root.dataset);
    let shards = ds.snapshot().await?.shards.len() as u64;
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let pb = ProgressBar::new(shards).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} shards, {elapsed} ({eta} left)")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(name.clone());
    let t = std::time::Instant::now();
    let result = text_stage::run(&ds, stage, partition, |_, _| pb.inc(1)).await;
    pb.finish_and_clear();
    let (code, report) = match &result {
        Ok(r) => (
            0,
            serde_json::json!({ "stage": name, "shards": r.map, "counters": r.counters }),
        ),
        Err(e) => (
            1,
            serde_json::json!({ "stage": name, "error": e.to_string() }),
        ),
    };
    run.finish(code, report);
    runs::record_run(cat.storage(), &run).await?;
    let r = result?;
    print!("{}", r.counters);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  {} shards rewritten, {} skipped; {:.1} rows/s",
        r.map.shards_rewritten,
        r.map.shards_skipped,
        r.map.rows as f64 / secs.max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}
