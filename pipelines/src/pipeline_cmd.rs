//! `llamagen pipeline run|check <config.toml>`: the whole data pipeline from one config file
//! (see `pipeline/mod.rs` for the resume, worker and exit-code rules).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::pipeline::{self, ConfigError, EXIT_CONFIG, RunOptions};

#[derive(Args, Debug)]
pub struct PipelineArgs {
    #[command(subcommand)]
    command: PipelineCommand,
}

#[derive(Subcommand, Debug)]
enum PipelineCommand {
    /// Run every configured stage; a re-run does only the missing work.
    Run {
        /// The pipeline config (TOML; see configs/pipeline/ and README "Pipelines").
        config: PathBuf,
        /// This worker's share as INDEX/COUNT (default: JOB_COMPLETION_INDEX with WORKERS, or
        /// SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT, else 0/1).
        #[arg(long)]
        worker: Option<String>,
        /// Replace the config's [output] root (a local directory or s3://bucket/prefix).
        #[arg(long)]
        root: Option<String>,
        /// Replace the config's [input] files (repeatable).
        #[arg(long = "input")]
        inputs: Vec<String>,
        /// Also write the JSON run report to this local file.
        #[arg(long)]
        report_json: Option<PathBuf>,
    },
    /// Validate a config (keys, values, model and caption files) without running anything.
    Check {
        config: PathBuf,
        #[arg(long)]
        root: Option<String>,
        #[arg(long = "input")]
        inputs: Vec<String>,
    },
}

pub async fn run(args: PipelineArgs) -> Result<ExitCode> {
    match args.command {
        PipelineCommand::Check {
            config,
            root,
            inputs,
        } => {
            let opts = RunOptions {
                config,
                root,
                inputs,
                ..Default::default()
            };
            match pipeline::load_config(&opts) {
                Ok(cfg) => {
                    let stages: Vec<&str> = [
                        Some("ingest"),
                        cfg.filters.as_ref().map(|_| "filters"),
                        cfg.captions.as_ref().map(|_| "captions"),
                        cfg.t5.as_ref().map(|_| "t5"),
                        cfg.vq.as_ref().map(|_| "vq"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    println!(
                        "{}: ok; stages {}; output {} (dataset {})",
                        opts.config.display(),
                        stages.join(" → "),
                        cfg.output.root,
                        cfg.output.dataset
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Ok(ExitCode::from(EXIT_CONFIG))
                }
            }
        }
        PipelineCommand::Run {
            config,
            worker,
            root,
            inputs,
            report_json,
        } => {
            let opts = RunOptions {
                config,
                worker,
                root,
                inputs,
            };
            let report = match pipeline::run(&opts).await {
                Ok(r) => r,
                Err(e) if e.downcast_ref::<ConfigError>().is_some() => {
                    eprintln!("error: {e:#}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
                Err(e) => return Err(e),
            };
            let json = serde_json::to_string_pretty(&report)?;
            if let Some(p) = &report_json {
                std::fs::write(p, &json)?;
            }
            for s in &report.stages {
                let errors: u64 = s.counters.errors.values().sum();
                let dropped: u64 = s.counters.dropped.values().sum();
                eprintln!(
                    "  {:<28} {:<5} shards {:>4} rewritten {:>4} skipped  rows {:>7}  dropped {:>6}  errors {:>6}  {:>8.1} rows/s",
                    s.stage,
                    s.pass,
                    s.shards_rewritten,
                    s.shards_skipped,
                    s.rows,
                    dropped,
                    errors,
                    s.rows_per_s
                );
            }
            eprintln!(
                "run {} {} in {:.1}s: dataset version {} with {} rows{}",
                report.run_id,
                report.status,
                report.seconds,
                report.dataset_version.unwrap_or(0),
                report.dataset_rows.unwrap_or(0),
                report
                    .report_html
                    .as_ref()
                    .map(|p| format!("; report {p}"))
                    .unwrap_or_default()
            );
            if let Some(e) = &report.error {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::from(report.exit_code))
        }
    }
}
