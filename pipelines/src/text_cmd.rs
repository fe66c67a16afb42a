//! `llamagen text`: long/short captions and T5 caption features for the samples of a catalog.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::runs;
use llamagen_encode::captions::{CaptionFileOptions, CaptionIndex, CaptionKey, Fallback, JoinOn};
use llamagen_encode::text_encoder::{
    ModelPaths, StoreDtype, TextEncoder, TextEncoderConfig, device_and_dtype,
};
use llamagen_encode::text_stage::{self, StageRun};

use crate::catalog_cmd::RootArgs;

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
    Captions {
        /// Caption files (.jsonl / .json lines, or .parquet).
        #[arg(long = "captions", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// What records join on: key, url or image_path (file stem = sample key).
        #[arg(long, default_value = "key")]
        join: String,
        /// Record field with the join value (default: key, url or image_path).
        #[arg(long)]
        join_field: Option<String>,
        /// Record field with the caption (default: long_caption, caption or text).
        #[arg(long)]
        text_field: Option<String>,
        /// Which entry of a list-valued caption (LlamaGen's t2i `text: [blip, llava,
        /// llava_first]`): blip, llava, llava_first, an index, or first (first non-blank).
        #[arg(long, default_value = "llava")]
        caption_key: String,
        /// Fallback texts in order, comma-separated: top_caption, text (empty: none).
        #[arg(long, default_value = "top_caption,text")]
        fallback: String,
    },
    /// Encode long and short captions with a T5 encoder (FLAN-T5-XL for LlamaGen) and store the
    /// valid-token features.
    Embed {
        /// Model directory: config.json, model.safetensors or model.safetensors.index.json, and
        /// tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// tokenizer.json (default: MODEL/tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Model id recorded in provenance (default: the model directory name).
        #[arg(long)]
        model_id: Option<String>,
        /// Storage dtype: bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Run on the first CUDA GPU (build with the `cuda` feature).
        #[arg(long)]
        cuda: bool,
        /// Most tokens per caption, EOS included.
        #[arg(long, default_value_t = 120)]
        max_tokens: usize,
        /// Padded tokens per forward pass.
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
    },
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
        TextCommand::Captions {
            files,
            join,
            join_field,
            text_field,
            caption_key,
            fallback,
        } => {
            let list_entry = CaptionKey::parse(&caption_key).with_context(|| {
                format!(
                    "--caption-key {caption_key:?}: use blip, llava, llava_first, first or an index"
                )
            })?;
            let join = JoinOn::parse(&join)
                .with_context(|| format!("--join {join:?}: use key, url or image_path"))?;
            let fallbacks = fallback
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    Fallback::parse(s.trim())
                        .with_context(|| format!("--fallback {s:?}: use top_caption or text"))
                })
                .collect::<Result<Vec<_>>>()?;
            let paths: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
            let index = CaptionIndex::read(
                &paths,
                &CaptionFileOptions {
                    join,
                    join_field,
                    text_field,
                    list_entry,
                },
            )?;
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
            let r =
                text_stage::run_captions(&ds, Arc::new(index), fallbacks, part, |_, _| pb.inc(1))
                    .await?;
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
        TextCommand::Embed {
            model,
            tokenizer,
            model_id,
            dtype,
            cuda,
            max_tokens,
            batch_tokens,
        } => {
            let store = match dtype.as_str() {
                "bf16" => StoreDtype::Bf16,
                "f16" => StoreDtype::F16,
                _ => bail!("--dtype {dtype:?}: use bf16 or f16"),
            };
            let mut paths = ModelPaths::in_dir(&model);
            if let Some(t) = tokenizer {
                paths.tokenizer = t;
            }
            let (device, compute) = device_and_dtype(cuda)?;
            let mut enc = TextEncoder::load(
                &paths,
                &device,
                compute,
                TextEncoderConfig {
                    max_tokens,
                    batch_tokens,
                    ..Default::default()
                },
            )?;
            if let Some(id) = model_id {
                enc.model_id = id;
            }
            let model_report = serde_json::json!({
                "model": enc.model_id, "sha256": enc.weights_sha256, "dim": enc.dim(),
            });
            let pb = bar(shards, "t5");
            let r = text_stage::run_t5(&ds, Arc::new(enc), store, part, |_, _| pb.inc(1)).await?;
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
