//! `llamagen tokenizer train --config tokenizer.toml`: VQ tokenizer training or fine-tuning (see
//! `llamagen_train::vq_train::run` and `configs/tokenizer_finetune.toml`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use llamagen_train::vq_train::run::{TokenizerTrainConfig, run};

#[derive(Args, Debug)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

#[derive(Subcommand, Debug)]
pub enum TokenizerCommand {
    /// Train the VQ tokenizer from scratch or fine-tune an official checkpoint (L2 + LPIPS +
    /// PatchGAN losses); resumes from the newest checkpoint of train.out_dir.
    Train {
        /// Tokenizer config (TOML): [train], [model], [disc], [loss], [optim], [lpips], [data],
        /// [eval].
        #[arg(long)]
        config: PathBuf,
    },
    /// Round-trip images through a VQ (or decode stored codes) to a PNG grid; report PSNR, SSIM
    /// and codebook usage.
    Reconstruct(Box<crate::reconstruct_cmd::ReconstructArgs>),
}

pub fn run_cmd(args: TokenizerArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TokenizerCommand::Reconstruct(_) => {
            anyhow::bail!("tokenizer reconstruct is dispatched by main")
        }
        TokenizerCommand::Train { config } => {
            let cfg = TokenizerTrainConfig::from_file(&config)?;
            let s = run(&cfg).with_context(|| format!("training with {}", config.display()))?;
            println!(
                "trained steps {}..{}; exported {}; last checkpoint: {}",
                s.start_step,
                s.steps,
                s.exported.display(),
                s.last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into())
            );
            if let Some(e) = &s.eval {
                println!(
                    "held-out: {} images, PSNR {:.3}, SSIM {:.4}, codebook usage {:.4}, grid {}",
                    e.images,
                    e.psnr,
                    e.ssim,
                    e.codebook_usage,
                    e.grid.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
