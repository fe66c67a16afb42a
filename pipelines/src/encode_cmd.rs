//! `llamagen encode`: image shards → VQ code grids (`vq_codes`), the VQ stage on its own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_encode::vq_stage::{CodeView, VqStageConfig, run_vq};

use crate::catalog_cmd::RootArgs;
use crate::pipeline::config::VqModelSpec;

#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    pub root: RootArgs,
    /// VQ weights: the official .pt (its `model` dict) or safetensors with the official keys.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture: vq16, vq8, or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub model: String,
    /// Code sets, repeatable: center:SIZE (t2i; e.g. center:256, center:512) or
    /// tencrop:SIZE:CROP_RANGE (c2i; e.g. tencrop:256:1.1 reads the stored 281 px image).
    #[arg(long = "view", default_value = "center:256")]
    pub views: Vec<String>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// This worker's share of the shards, as INDEX/COUNT.
    #[arg(long)]
    pub worker: Option<String>,
    /// Run on CUDA device 0 (a --features cuda build).
    #[arg(long)]
    pub cuda: bool,
}

fn parse_view(s: &str) -> Result<CodeView> {
    let parts: Vec<&str> = s.split(':').collect();
    Ok(match parts.as_slice() {
        ["center", size] => CodeView::Center {
            image_size: size.parse().with_context(|| format!("--view {s}"))?,
        },
        ["tencrop", size, range] => CodeView::TenCrop {
            image_size: size.parse().with_context(|| format!("--view {s}"))?,
            crop_range: range.parse().with_context(|| format!("--view {s}"))?,
        },
        _ => bail!("--view {s:?}: use center:SIZE or tencrop:SIZE:CROP_RANGE"),
    })
}

pub async fn run(args: EncodeArgs) -> Result<ExitCode> {
    let views = args
        .views
        .iter()
        .map(|v| parse_view(v))
        .collect::<Result<Vec<_>>>()?;
    let model_args = VqModelSpec::Named(args.model.clone()).args()?;
    let device = if args.cuda {
        candle_core::Device::new_cuda(0)?
    } else {
        candle_core::Device::Cpu
    };
    let model = llamagen_encode::VqModel::from_file(&args.checkpoint, &model_args, &device)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let cfg = VqStageConfig {
        views,
        batch_size: args.batch_size,
        model_id: args
            .checkpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        weights_sha256: crate::pipeline::sha256_file(&args.checkpoint)?,
    };
    let stage = cfg.stage_name();
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
    pb.set_message(stage.clone());
    let t = std::time::Instant::now();
    let result = run_vq(&ds, Arc::new(model), cfg, partition, |_, _| pb.inc(1)).await;
    pb.finish_and_clear();
    let (code, report) = match &result {
        Ok(r) => (
            0,
            serde_json::json!({ "stage": stage, "shards": r.map, "counters": r.counters }),
        ),
        Err(e) => (
            1,
            serde_json::json!({ "stage": stage, "error": e.to_string() }),
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
