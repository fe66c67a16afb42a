//! `llamagen pipeline run`: URL lists → image shards → scores and verdicts → captions → T5
//! features and VQ codes → dataset-wide duplicates, from one config file (see [`config`]).
//!
//! Resume and concurrency rules (every stage commits through the catalog's protocol):
//! - Ingest commits one work unit (a row range of one input file) at a time; a unit already in
//!   the table is skipped. Later stages rewrite shard by shard, committing in groups, and record
//!   themselves in the shard's `applied` list; a shard that lists a stage is not processed by it
//!   again. So a re-run
//!   after SIGKILL at any point does only the missing work, and the final dataset holds every
//!   input row exactly once.
//! - A stage only takes shards that carry every earlier enabled stage (its `requires`), so with
//!   several workers no stage sees rows an earlier stage has not processed.
//! - Workers (`--worker I/N`, or `JOB_COMPLETION_INDEX`/`WORKERS`, or Slurm's array variables)
//!   ingest the input units whose hash falls to them, then run each stage on their share of the
//!   shards, then sweep every shard still missing a stage (a rewritten shard's share can move to
//!   another worker; two workers racing for one shard is safe: the loser's commit is refused and
//!   its output discarded). Every worker's sweep starts after its own ingest, so each shard is
//!   finished by at least the worker that wrote it.
//! - A lease per (dataset, worker share) keeps two runs of the same share from working at once
//!   (a scheduler that starts tonight's run while last night's is still going gets exit code 75).
//! - Exit codes: 0 done; 1 a stage failed (the run record and report say which; a re-run
//!   resumes); 2 the config or arguments are invalid; 75 the lease is held by another live run.

pub mod config;
mod report;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::lease::Lease;
use llamagen_catalog::stage::{ShardSelection, Stage, run_stage};
use llamagen_catalog::storage::S3Config;
use llamagen_catalog::{Catalog, CatalogError, StageCounters, StorageOptions, runs};
use llamagen_ingest::{IngestConfig, Progress};
use serde::Serialize;

pub use config::PipelineConfig;

/// Exit code when another live run holds the lease (EX_TEMPFAIL: try again later).
pub const EXIT_LEASE_HELD: u8 = 75;
/// Exit code of an invalid config or arguments.
pub const EXIT_CONFIG: u8 = 2;

/// How a run was asked to go.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub config: PathBuf,
    /// `INDEX/COUNT`; default from the environment, else 0/1.
    pub worker: Option<String>,
    /// Replaces `[output] root`.
    pub root: Option<String>,
    /// Replaces `[input] files`.
    pub inputs: Vec<String>,
}

/// What one stage did in this run.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutcome {
    pub stage: String,
    pub pass: &'static str,
    pub shards_rewritten: u64,
    pub shards_skipped: u64,
    pub shards_lost_race: u64,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub counters: StageCounters,
}

/// The machine-readable run report (also stored in the catalog's `runs` table).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub config: String,
    pub root: String,
    pub dataset: String,
    pub worker: (usize, usize),
    pub status: String,
    pub exit_code: u8,
    pub error: Option<String>,
    pub inputs: Vec<String>,
    pub inputs_skipped_incremental: Vec<String>,
    /// Inputs whose every unit is committed (this run's and earlier runs' of the same share).
    pub inputs_completed: Vec<String>,
    pub stages: Vec<StageOutcome>,
    pub seconds: f64,
    pub dataset_version: Option<u64>,
    pub dataset_rows: Option<u64>,
    pub report_html: Option<String>,
}

/// A config error (exit 2) as opposed to a run failure (exit 1).
#[derive(Debug)]
pub struct ConfigError(pub anyhow::Error);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}
impl std::error::Error for ConfigError {}

fn storage_options(cfg: &PipelineConfig) -> StorageOptions {
    StorageOptions {
        s3: S3Config {
            endpoint: cfg.output.s3_endpoint.clone(),
            region: cfg.output.s3_region.clone(),
            path_style: cfg.output.s3_path_style,
            ..Default::default()
        },
    }
}

/// Loads the config with the command-line overrides applied and checks it.
pub fn load_config(opts: &RunOptions) -> Result<PipelineConfig> {
    let mut cfg = PipelineConfig::load(&opts.config)?;
    if let Some(r) = &opts.root {
        cfg.output.root = r.clone();
    }
    if !opts.inputs.is_empty() {
        cfg.input.files = opts.inputs.clone();
    }
    cfg.check()?;
    Ok(cfg)
}

/// Expands local directories into the URL lists inside them (sorted); other entries stay.
fn expand_inputs(files: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for f in files {
        let p = Path::new(f);
        if !f.contains("://") && p.is_dir() {
            let mut inner: Vec<String> = std::fs::read_dir(p)
                .with_context(|| format!("listing input directory {f}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("parquet" | "csv" | "jsonl" | "json" | "tsv")
                        )
                })
                .map(|p| p.display().to_string())
                .collect();
            inner.sort();
            out.extend(inner);
        } else {
            out.push(f.clone());
        }
    }
    Ok(out)
}

fn ingest_config(
    cfg: &PipelineConfig,
    partition: (usize, usize),
    run_id: &str,
) -> Result<IngestConfig> {
    let mut c = cfg
        .ingest
        .build(&cfg.input.url_column, &cfg.input.caption_column)?;
    c.partition = partition;
    c.storage = storage_options(cfg);
    c.dataset = cfg.output.dataset.clone();
    c.run_id = Some(run_id.to_string());
    Ok(c)
}

fn spinner(msg: &str) -> ProgressBar {
    let b = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed_precise}]")
            .expect("template"),
    );
    b.set_prefix(msg.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

struct IngestBar {
    bar: ProgressBar,
    rows: AtomicU64,
    ok: AtomicU64,
}

impl Progress for IngestBar {
    fn rows_done(&self, n: u64, ok: u64) {
        let rows = self.rows.fetch_add(n, Ordering::Relaxed) + n;
        let ok = self.ok.fetch_add(ok, Ordering::Relaxed) + ok;
        self.bar.set_message(format!("{rows} rows, {ok} ok"));
    }
    fn message(&self, _msg: &str) {}
}

/// Random stand-in VQ weights (demos and tests: the codes mean nothing), a pure function of
/// the architecture and `seed`: norms 1/0, biases 0, convolutions N(0, 1/fan_in), the codebook
/// uniform in ±1/codebook_size as the official init.
pub fn write_standin_vq(path: &Path, args: &llamagen_encode::ModelArgs, seed: u64) -> Result<()> {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in llamagen_encode::VqModel::tensor_specs(args)? {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("codebook_used") || name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("norm") && shape.len() == 1 {
            vec![1.0; n]
        } else if name.contains("quantize.embedding") {
            let b = 1.0 / args.codebook_size as f32;
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        } else {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let std = (1.0 / fan_in as f32).sqrt();
            (0..n)
                .map(|_| {
                    // Box-Muller
                    let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Runs a config; returns the report (its `exit_code` says how it ended).
pub async fn run(opts: &RunOptions) -> Result<RunReport> {
    let cfg = load_config(opts).map_err(|e| anyhow!(ConfigError(e)))?;
    let partition = llamagen_catalog::worker::worker_share(opts.worker.as_deref())
        .map_err(|e| anyhow!(ConfigError(e.into())))?;
    let started = Instant::now();
    let cat = Catalog::open(&cfg.output.root, &storage_options(&cfg))
        .await
        .with_context(|| format!("opening catalog root {}", cfg.output.root))?;
    let ds = cat.dataset(&cfg.output.dataset);
    let mut record = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    let mut report = RunReport {
        run_id: record.run_id.clone(),
        config: opts.config.display().to_string(),
        root: cfg.output.root.clone(),
        dataset: cfg.output.dataset.clone(),
        worker: partition,
        status: "running".into(),
        exit_code: 0,
        error: None,
        inputs: Vec::new(),
        inputs_skipped_incremental: Vec::new(),
        inputs_completed: Vec::new(),
        stages: Vec::new(),
        seconds: 0.0,
        dataset_version: None,
        dataset_rows: None,
        report_html: None,
    };

    // The lease of this (dataset, share).
    let lease_name = format!(
        "pipeline-{}-w{}of{}",
        cfg.output.dataset, partition.0, partition.1
    );
    let lease = if cfg.lease.enabled {
        match Lease::acquire(
            cat.storage().clone(),
            &lease_name,
            &record.run_id,
            Duration::from_secs(cfg.lease.ttl_s),
        )
        .await
        {
            Ok(l) => Some(Arc::new(tokio::sync::Mutex::new(Some(l)))),
            Err(e @ CatalogError::LeaseHeld { .. }) => {
                report.status = "lease_held".into();
                report.exit_code = EXIT_LEASE_HELD;
                report.error = Some(e.to_string());
                return Ok(report);
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = lease.clone().map(|l| {
        let lost = lost.clone();
        let every = Duration::from_secs(cfg.lease.ttl_s).div_f64(3.0);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let mut g = l.lock().await;
                let Some(lease) = g.as_mut() else { return };
                if let Err(e) = lease.renew().await {
                    eprintln!("lease: {e}");
                    if matches!(e, CatalogError::LeaseLost { .. }) {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        })
    });

    runs::record_run(cat.storage(), &record).await?;
    let result = run_inner(
        &cfg,
        &cat,
        &ds,
        partition,
        &record.run_id,
        &mut report,
        &lost,
    )
    .await;
    if let Some(r) = renewer {
        r.abort();
    }
    report.seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok(()) => {
            report.status = "succeeded".into();
            report.exit_code = 0;
        }
        Err(e) => {
            report.status = "failed".into();
            report.exit_code = 1;
            report.error = Some(format!("{e:#}"));
        }
    }
    if let Ok(m) = ds.snapshot().await {
        report.dataset_version = Some(m.version);
        report.dataset_rows = Some(m.rows());
    }
    if cfg.report.html {
        match report::write_html(&cat, &ds, &cfg, &report).await {
            Ok(p) => report.report_html = Some(p),
            Err(e) => eprintln!("report: {e:#}"),
        }
    }
    let json = serde_json::to_value(&report)?;
    let path = format!("{}/_reports/{}.json", cfg.output.dataset, report.run_id);
    cat.storage()
        .put(&path, serde_json::to_vec_pretty(&json)?.into())
        .await?;
    record.finish(report.exit_code as i32, json);
    runs::record_run(cat.storage(), &record).await?;
    if let Some(l) = lease {
        if let Some(l) = l.lock().await.take() {
            if let Err(e) = l.release().await {
                eprintln!("lease: {e}");
            }
        }
    }
    Ok(report)
}

/// Inputs an earlier successful run of the same dataset and share completed.
async fn completed_inputs(
    cat: &Catalog,
    dataset: &str,
    partition: (usize, usize),
) -> Result<BTreeSet<String>> {
    let mut done = BTreeSet::new();
    for r in runs::list_runs(cat.storage()).await? {
        if r.status != "succeeded" {
            continue;
        }
        let rep = &r.report;
        let same = rep.get("dataset").and_then(|d| d.as_str()) == Some(dataset)
            && rep.get("worker") == Some(&serde_json::json!([partition.0, partition.1]));
        if !same {
            continue;
        }
        if let Some(list) = rep.get("inputs_completed").and_then(|l| l.as_array()) {
            done.extend(list.iter().filter_map(|v| v.as_str().map(str::to_string)));
        }
    }
    Ok(done)
}

#[allow(clippy::too_many_arguments)]
async fn run_inner(
    cfg: &PipelineConfig,
    cat: &Catalog,
    ds: &llamagen_catalog::Dataset,
    partition: (usize, usize),
    run_id: &str,
    report: &mut RunReport,
    lost: &AtomicBool,
) -> Result<()> {
    let check_lease = || -> Result<()> {
        if lost.load(Ordering::SeqCst) {
            bail!("the lease was lost (it expired and another run took it); stopping");
        }
        Ok(())
    };
    // 1. Ingest.
    let mut inputs = expand_inputs(&cfg.input.files)?;
    if cfg.input.incremental {
        let done = completed_inputs(cat, &cfg.output.dataset, partition).await?;
        let (skip, todo): (Vec<String>, Vec<String>) =
            inputs.into_iter().partition(|i| done.contains(i));
        report.inputs_skipped_incremental = skip;
        inputs = todo;
    }
    report.inputs = inputs.clone();
    if !inputs.is_empty() {
        let icfg = ingest_config(cfg, partition, run_id)?;
        let bar = IngestBar {
            bar: spinner("ingest"),
            rows: AtomicU64::new(0),
            ok: AtomicU64::new(0),
        };
        let t = Instant::now();
        let r = llamagen_ingest::run(cat, &inputs, &icfg, &bar)
            .await
            .context("ingest")?;
        bar.bar.finish_and_clear();
        let secs = t.elapsed().as_secs_f64();
        let mut counters = r.counters.clone();
        counters.add_extra("units_committed", r.units_committed);
        counters.add_extra("units_skipped", r.units_skipped);
        report.stages.push(StageOutcome {
            stage: "ingest".into(),
            pass: "share",
            shards_rewritten: r.units_committed,
            shards_skipped: r.units_skipped,
            shards_lost_race: 0,
            rows: r.counters.received,
            seconds: secs,
            rows_per_s: r.counters.received as f64 / secs.max(1e-9),
            counters,
        });
    }
    report.inputs_completed = inputs.clone();
    report
        .inputs_completed
        .extend(report.inputs_skipped_incremental.iter().cloned());
    check_lease()?;

    // 2. The shard stages, in order, each built once from its config (models loaded here) and
    // listed with the earlier stages whose columns it reads: this worker's share first, then
    // (with several workers) a sweep.
    let mut stages: Vec<(&str, Arc<dyn Stage>, Vec<String>)> = Vec::new();
    let mut filtered: Vec<String> = Vec::new();
    let mut scored: Vec<String> = Vec::new();
    if let Some(f) = &cfg.filters {
        let scorer = f.load().await.context("[filters]")?;
        let s = Arc::new(llamagen_filters::stage::ScoreStage::new(Arc::new(scorer))?);
        stages.push(("filters: score", s.clone(), Vec::new()));
        filtered.push(s.name());
        scored.push(s.name());
    }
    if let Some(th) = cfg.filters.as_ref().and_then(|f| f.thresholds.clone()) {
        let s = Arc::new(llamagen_filters::stage::ApplyStage { thresholds: th });
        stages.push(("filters: apply", s.clone(), filtered.clone()));
        filtered.push(s.name());
    }
    let mut captioned = filtered.clone();
    if let Some(c) = &cfg.captions {
        let s = Arc::new(c.build().context("[captions]")?);
        stages.push(("captions", s.clone(), filtered.clone()));
        captioned.push(s.name());
    }
    if let Some(t) = &cfg.t5 {
        stages.push(("t5", Arc::new(t.build().context("[t5]")?), captioned));
    }
    if let Some(v) = &cfg.vq {
        stages.push(("vq", Arc::new(v.build().context("[vq]")?), filtered.clone()));
    }
    let passes: &[(&'static str, (usize, usize))] = if partition.1 > 1 {
        &[("share", partition), ("sweep", (0, 1))]
    } else {
        &[("all", (0, 1))]
    };
    for &(pass, part) in passes {
        for (label, stage, requires) in &stages {
            let t = Instant::now();
            let pb = spinner(label);
            let selection = ShardSelection {
                partition: part,
                requires: requires.clone(),
            };
            let r = run_stage(ds, stage.clone(), selection, Default::default(), |_, _| {
                pb.inc(1)
            })
            .await
            .with_context(|| label.to_string())?;
            pb.finish_and_clear();
            push(report, &r.stage, pass, &r.map, r.counters, t);
            check_lease()?;
        }
    }
    // 3. Dedup: over the whole dataset, once every stage has run on this worker's shards.
    if let Some(d) = &cfg.dedup {
        let dcfg = d.config().context("[dedup]")?;
        let t = Instant::now();
        let pb = spinner("dedup");
        let r = llamagen_dedup::dedup_dataset(
            cat.storage().clone(),
            &cfg.output.dataset,
            &dcfg,
            &llamagen_dedup::RunOptions {
                cluster_requires: scored,
                ..Default::default()
            },
            |_, _| pb.inc(1),
        )
        .await
        .context("dedup")?;
        pb.finish_and_clear();
        push(
            report,
            &r.hash.stage,
            "all",
            &r.hash.map,
            r.hash.counters.clone(),
            t,
        );
        if let Some(c) = &r.cluster {
            push(report, &c.stage, "all", &c.map, c.counters.clone(), t);
        }
        let mut counters = StageCounters::new("dedup: group");
        counters.received = r.grouping.rows;
        counters.written = r.grouping.rows;
        counters.add_extra("groups", r.grouping.groups);
        for (k, n) in &r.grouping.duplicates {
            counters.add_extra(&format!("duplicates_{k}"), *n);
        }
        let map = llamagen_catalog::stage::MapReport {
            rows: r.grouping.rows,
            ..Default::default()
        };
        push(report, "dedup: group", "all", &map, counters, t);
        if let Some(a) = r.apply {
            push(report, &a.stage, "all", &a.map, a.counters, t);
        }
        check_lease()?;
    }
    Ok(())
}

fn push(
    report: &mut RunReport,
    stage: &str,
    pass: &'static str,
    map: &llamagen_catalog::stage::MapReport,
    counters: StageCounters,
    t: Instant,
) {
    let secs = t.elapsed().as_secs_f64();
    report.stages.push(StageOutcome {
        stage: stage.to_string(),
        pass,
        shards_rewritten: map.shards_rewritten,
        shards_skipped: map.shards_skipped,
        shards_lost_race: map.shards_lost_race,
        rows: map.rows,
        seconds: secs,
        rows_per_s: map.rows as f64 / secs.max(1e-9),
        counters,
    });
}
