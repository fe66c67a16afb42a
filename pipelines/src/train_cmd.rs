//! `llamagen train --config run.toml`: one training run (see `llamagen_train::run` and the
//! example configs in `configs/`), as a single process, as one rank of a data-parallel job
//! whose launcher set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! (`torchrun`, Slurm, PyTorchJob; see `llamagen_train::dist`), or as the launcher of
//! `--nproc-per-node N` local ranks.
//!
//! Invariants enforced here:
//! - The launcher starts every local rank with the same arguments (less the launcher's own) and
//!   the torchrun variables; when one rank fails it gives the others [`GRACE`] to stop on their
//!   own (they see the lost peer at once) and then ends them, so the job never hangs; it fails
//!   with an error naming the first failing rank and its exit status.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use llamagen_train::dist::{Comm, DistEnv, free_port};
use llamagen_train::run::{RunConfig, config_fingerprint, run, run_with};

/// How long the launcher waits for the other ranks to stop on their own after one failed.
const GRACE: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Run config (TOML): [model], [data], [train], [optim], [output]; see configs/*.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Resume from the newest checkpoint of the output directory (the same as
    /// `output.resume_from = "latest"`).
    #[arg(long)]
    pub resume: bool,
    /// Start this many ranks on this node (data parallel, one process per rank, as torchrun's
    /// option); each gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
    #[arg(long)]
    pub nproc_per_node: Option<usize>,
    /// With --nproc-per-node: number of nodes (each runs this launcher). Default 1.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// With --nproc-per-node: this node's index, 0..nnodes. Default 0.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// With --nproc-per-node: host of rank 0 (default: MASTER_ADDR, else 127.0.0.1 on one node).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// With --nproc-per-node: rendezvous port (default: MASTER_PORT, else a free port on one
    /// node, 29500 on several).
    #[arg(long)]
    pub master_port: Option<u16>,
}

pub fn run_cmd(args: TrainArgs) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.nproc_per_node {
        return launch(&args, n);
    }
    let mut cfg = RunConfig::from_file(&args.config)?;
    if args.resume {
        cfg.output.resume_from = Some("latest".into());
    }
    let env = DistEnv::from_env()?;
    let summary = match &env {
        None => run(&cfg).with_context(|| format!("training with {}", args.config.display()))?,
        Some(env) => {
            let timeout = Duration::from_secs(cfg.train.dist_timeout_s);
            let comm = Comm::connect(env, config_fingerprint(&cfg), timeout)?;
            run_with(&cfg, &comm).with_context(|| {
                format!(
                    "rank {} of {}: training with {}",
                    env.rank,
                    env.world,
                    args.config.display()
                )
            })?
        }
    };
    if env.as_ref().is_some_and(|e| e.rank != 0) {
        return Ok(ExitCode::SUCCESS);
    }
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

/// Starts `nproc` local ranks of this node and waits for them (module invariants).
fn launch(args: &TrainArgs, nproc: usize) -> anyhow::Result<ExitCode> {
    if nproc == 0 || args.nnodes == 0 || args.node_rank >= args.nnodes {
        bail!(
            "--nproc-per-node {nproc} --nnodes {} --node-rank {}: need nproc >= 1, nnodes >= 1 \
             and node-rank below nnodes",
            args.nnodes,
            args.node_rank
        );
    }
    if std::env::var_os("RANK").is_some() {
        bail!(
            "--nproc-per-node inside a process that already has RANK set: use either a launcher \
             (torchrun, srun) or --nproc-per-node, not both"
        );
    }
    // Read the config once here, so a mistake is reported once rather than by every rank.
    RunConfig::from_file(&args.config)?;
    let world = nproc * args.nnodes;
    let env_or = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let master_addr = match (args.master_addr.clone(), env_or("MASTER_ADDR")) {
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) if args.nnodes == 1 => "127.0.0.1".into(),
        (None, None) => bail!("--nnodes > 1 needs --master-addr (or MASTER_ADDR): rank 0's host"),
    };
    let master_port = match (args.master_port, env_or("MASTER_PORT")) {
        (Some(p), _) => p,
        (None, Some(p)) => p
            .parse()
            .with_context(|| format!("MASTER_PORT={p:?} is not a port"))?,
        (None, None) if args.nnodes == 1 => free_port()?,
        (None, None) => llamagen_train::dist::DEFAULT_MASTER_PORT,
    };
    // The CPU kernels use every core by default; share the node's cores between its ranks
    // (as torchrun sets OMP_NUM_THREADS), unless the user chose.
    let threads = std::env::var_os("RAYON_NUM_THREADS").is_none().then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / nproc).max(1)
    });
    let exe = std::env::current_exe().context("locating the llamagen binary")?;
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for local in 0..nproc {
        let rank = args.node_rank * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.arg("train").arg("--config").arg(&args.config);
        if args.resume {
            cmd.arg("--resume");
        }
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", master_port.to_string());
        if let Some(t) = threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    let mut failed: Option<(usize, String, Instant)> = None;
    let mut running: Vec<bool> = vec![true; children.len()];
    loop {
        let mut wait_error = None;
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            let waited = match child.try_wait() {
                Ok(w) => w,
                Err(e) => {
                    wait_error = Some(e);
                    break;
                }
            };
            if let Some(status) = waited {
                running[i] = false;
                if !status.success() && failed.is_none() {
                    eprintln!("llamagen train: rank {rank} exited with {status}; stopping the job");
                    failed = Some((*rank, status.to_string(), Instant::now()));
                }
            }
        }
        if let Some(e) = wait_error {
            // Never leave ranks behind.
            stop(&mut children);
            return Err(anyhow::Error::from(e).context("waiting for a rank"));
        }
        if running.iter().all(|r| !r) {
            break;
        }
        if let Some((_, _, at)) = &failed
            && at.elapsed() > GRACE
        {
            for (i, (rank, child)) in children.iter_mut().enumerate() {
                if running[i] {
                    eprintln!(
                        "llamagen train: rank {rank} still running {}s after the failure; ending it",
                        GRACE.as_secs()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    running[i] = false;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        None => Ok(ExitCode::SUCCESS),
        Some((rank, status, _)) => bail!("rank {rank} of {world} failed ({status})"),
    }
}

/// Ends the ranks started so far (each by its own handle).
fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}
