//! The `llamagen` command.

mod catalog_cmd;
mod filter_cmd;

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
    /// Score samples (CLIP similarity, aesthetic, watermark, NSFW) and apply thresholds.
    Filter(filter_cmd::FilterArgs),
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
            Command::Filter(args) => filter_cmd::run(args).await,
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
