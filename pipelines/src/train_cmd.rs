//! `llamagen train --config run.toml`: one training run (see `llamagen_train::run` and the
//! example configs in `configs/`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use llamagen_train::run::{RunConfig, run};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run config (TOML): [model], [data], [train], [optim], [output]; see configs/*.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Resume from the newest checkpoint of the output directory (the same as
    /// `output.resume_from = "latest"`).
    #[arg(long)]
    pub resume: bool,
}

pub fn run_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = RunConfig::from_file(&args.config)?;
    if args.resume {
        cfg.output.resume_from = Some("latest".into());
    }
    let summary = run(&cfg).with_context(|| format!("training with {}", args.config.display()))?;
    let last = summary.losses.last().map(|(_, l)| *l);
    println!(
        "trained steps {}..{}{}; last checkpoint: {}",
        summary.start_step,
        summary.steps,
        last.map(|l| format!(", final loss {l:.4}"))
            .unwrap_or_default(),
        summary
            .last_checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    Ok(ExitCode::SUCCESS)
}
