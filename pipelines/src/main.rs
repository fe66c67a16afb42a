//! The `llamagen` command.

mod catalog_cmd;
mod ingest_cmd;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Catalog(args) => catalog_cmd::run(args).await,
            Command::Ingest(args) => ingest_cmd::run(*args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
