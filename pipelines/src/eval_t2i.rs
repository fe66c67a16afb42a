//! `llamagen eval t2i`: the paper's text-to-image protocol (GigaGAN's evaluation).

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct T2iArgs {}

pub fn run(_args: T2iArgs) -> Result<ExitCode> {
    bail!("llamagen eval t2i is not implemented yet")
}
