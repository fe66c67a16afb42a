//! The `llamagen` command.

mod catalog_cmd;
mod text_cmd;

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
    /// Captions (long, first-sentence short) and their T5 encoder features.
    Text(text_cmd::TextArgs),
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
            Command::Text(args) => text_cmd::run(args).await,
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
