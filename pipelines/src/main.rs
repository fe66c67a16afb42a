//! The `llamagen` command.

mod catalog_cmd;
mod conformance_cmd;
mod dedup_cmd;
mod encode_cmd;
mod eval_c2i;
mod eval_catalog;
mod eval_cmd;
mod eval_sampling;
mod eval_t2i;
mod export_cmd;
mod filter_cmd;
mod ingest_cmd;
mod pipeline;
mod pipeline_cmd;
mod reconstruct_cmd;
mod sample_cmd;
mod serve_cmd;
mod stages;
mod text_cmd;
mod tokenizer_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llamagen", version, about = "LlamaGen data pipelines and training", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Query and maintain a catalog: SQL, stats, URL-list import, verification, garbage collection.
    Catalog(catalog_cmd::CatalogArgs),
    /// Download, decode, crop and store the images of URL lists (Parquet/CSV/JSONL) as image shards.
    Ingest(Box<ingest_cmd::IngestArgs>),
    /// Run every GPT, sampling, training, VQ and augmentation check of a reference directory
    /// (the format of data/parity/); exits non-zero on any failure.
    Conformance(conformance_cmd::ConformanceArgs),
    /// Train a GPT from a run config (TOML) on the code and caption shards of a catalog.
    Train(train_cmd::TrainArgs),
    /// Sample images from a trained GPT (KV cache, CFG) and decode them with the VQ into a PNG grid.
    Sample(sample_cmd::SampleArgs),
    /// Serve image generation over HTTP (continuous batching, paged KV cache).
    Serve(Box<serve_cmd::ServeArgs>),
    /// Metrics of a sample batch against a reference (ADM evaluator: IS, FID, sFID, precision,
    /// recall) through an Inception-v3 ONNX model.
    Eval(eval_cmd::EvalArgs),
    /// Score samples (CLIP similarity, aesthetic, watermark, NSFW) and apply thresholds.
    Filter(filter_cmd::FilterArgs),
    /// Find exact, perceptual and semantic duplicates across a whole dataset and mark all but one
    /// row of each group (`duplicate_of`, `dup_kind`); `--dry-run` reports without writing.
    Dedup(dedup_cmd::DedupCmdArgs),
    /// Captions (long, first-sentence short) and their T5 encoder features.
    Text(text_cmd::TextArgs),
    /// The whole data pipeline from one config: ingest, filters, captions, T5 and VQ codes.
    Pipeline(pipeline_cmd::PipelineArgs),
    /// Encode the stored images of a catalog into VQ code grids (centre crops, ten-crop sets).
    Encode(Box<encode_cmd::EncodeArgs>),
    /// Export ready shards to another layout (the official LlamaGen npy/jsonl layout).
    Export(export_cmd::ExportArgs),
    /// Train or fine-tune the VQ image tokenizer (reconstruction, LPIPS and PatchGAN losses).
    Tokenizer(tokenizer_cmd::TokenizerArgs),
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: large tensors come from one heap that keeps freed memory,
    // rather than a fresh mapping (and a page fault per page) each (llamagen_kernels::alloc).
    llamagen_kernels::alloc::reuse_freed_memory();
    let cli = Cli::parse();
    // Catalog and data commands are async (object stores, HTTP); model commands are synchronous
    // (candle) and start their own runtime where they read a catalog.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
    };
    let result = match cli.command {
        Command::Catalog(args) => runtime().and_then(|rt| rt.block_on(catalog_cmd::run(args))),
        Command::Ingest(args) => runtime().and_then(|rt| rt.block_on(ingest_cmd::run(*args))),
        Command::Filter(args) => runtime().and_then(|rt| rt.block_on(filter_cmd::run(args))),
        Command::Dedup(args) => runtime().and_then(|rt| rt.block_on(dedup_cmd::run(args))),
        Command::Text(args) => runtime().and_then(|rt| rt.block_on(text_cmd::run(args))),
        Command::Pipeline(args) => runtime().and_then(|rt| rt.block_on(pipeline_cmd::run(args))),
        Command::Encode(args) => runtime().and_then(|rt| rt.block_on(encode_cmd::run(*args))),
        Command::Export(args) => runtime().and_then(|rt| rt.block_on(export_cmd::run(args))),
        Command::Tokenizer(tokenizer_cmd::TokenizerArgs {
            command: tokenizer_cmd::TokenizerCommand::Reconstruct(a),
        }) => runtime()
            .and_then(|rt| rt.block_on(reconstruct_cmd::run(*a)))
            .map(|()| std::process::ExitCode::SUCCESS),
        Command::Conformance(args) => conformance_cmd::run(args),
        Command::Train(args) => train_cmd::run_cmd(args),
        Command::Sample(args) => sample_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(*args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Tokenizer(args) => tokenizer_cmd::run_cmd(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
