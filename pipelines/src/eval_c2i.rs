//! `llamagen eval c2i`: the paper's class-conditional ImageNet protocol in one command.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args, Debug)]
pub struct C2iArgs {}

pub fn run(_args: C2iArgs) -> Result<ExitCode> {
    bail!("llamagen eval c2i is not implemented yet")
}
