//! `llamagen eval`: the metrics LlamaGen reports for class-conditional ImageNet (OpenAI's ADM
//! evaluator: Inception Score, FID, sFID, precision, recall) of a sample batch against a
//! reference batch, through an Inception-v3 ONNX model (see `llamagen_eval`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use llamagen_eval::batch::{self, Images};
use llamagen_eval::inception::{Activations, Inception};
use llamagen_eval::{FidStats, Reference, evaluate};
use llamagen_filters::model::ModelOptions;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub protocol: Option<Protocol>,
    #[command(flatten)]
    pub batch: BatchArgs,
}

/// The paper's evaluation protocols, each one command.
#[derive(Subcommand, Debug)]
pub enum Protocol {
    /// Class-conditional ImageNet as the paper reports it: class-balanced samples from a
    /// checkpoint (written in resumable shards), then the ADM evaluator's metrics.
    C2i(Box<crate::eval_c2i::C2iArgs>),
    /// Text-to-image as the paper reports it (GigaGAN's evaluation): clean-fid FID and CLIP score
    /// of a folder of generated images and their captions.
    T2i(Box<crate::eval_t2i::T2iArgs>),
}

/// `llamagen eval` without a protocol: the ADM metrics of a sample batch.
#[derive(Args, Debug)]
pub struct BatchArgs {
    /// Sample batch: an ADM `.npz` (`arr_0`: uint8 N×H×W×3, as `llamagen sample --npz` writes)
    /// or a folder of images.
    #[arg(long, required_unless_present = "sample_query")]
    pub sample: Option<PathBuf>,
    /// Sample batch from the catalog at --root: a read-only SQL query over `samples` returning
    /// the stored `images` column (e.g. `SELECT key, images FROM samples WHERE status = 'ok'`);
    /// the rendition of --image-size px is taken, in the query's row order.
    #[arg(long, conflicts_with = "sample")]
    pub sample_query: Option<String>,
    /// Reference batch: an ADM `.npz` (`arr_0` images and/or precomputed `mu`, `sigma`, `mu_s`,
    /// `sigma_s`, as `VIRTUAL_imagenet256_labeled.npz`) or a folder of images.
    #[arg(long = "ref", required_unless_present = "ref_query")]
    pub reference: Option<PathBuf>,
    /// Reference batch from the catalog at --root, as --sample-query.
    #[arg(long, conflicts_with = "reference")]
    pub ref_query: Option<String>,
    /// The stored rendition (px) that --sample-query and --ref-query take.
    #[arg(long, default_value_t = 256)]
    pub image_size: u32,
    #[command(flatten)]
    pub catalog: crate::catalog_cmd::RootArgs,
    /// Inception-v3 ONNX model with the evaluator's outputs (`scripts/export-inception.py`).
    #[arg(long, required = true)]
    pub inception: Option<PathBuf>,
    /// Images per inference call.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// ONNX Runtime threads inside one operator (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub intra_threads: usize,
    /// Write the metrics as JSON (default: the sample path with `.json`, `eval.json` for a
    /// query).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub(crate) fn activations(model: &Inception, what: &str, images: &Images) -> Result<Activations> {
    let bar = indicatif::ProgressBar::new(images.n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} activations {{bar:30}} {{pos}}/{{len}} images [{{elapsed_precise}}]"
        ))
        .expect("progress template"),
    );
    let acts = model.activations(images, |done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    eprintln!(
        "{what}: {} images of {}x{} px",
        images.n, images.width, images.height
    );
    Ok(acts)
}

/// Images read at once from a batch file or folder (see [`activations_at`]).
const CHUNK: usize = 1024;

/// The activations of the batch at `path` (an `.npz` or a folder), read [`CHUNK`] images at a
/// time, so memory holds one chunk of pixels whatever the batch's size.
pub(crate) fn activations_at(model: &Inception, what: &str, path: &Path) -> Result<Activations> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} activations {{bar:30}} {{pos}}/{{len}} images [{{elapsed_precise}}]"
        ))
        .expect("progress template"),
    );
    let mut acts = Activations::default();
    let mut size = (0, 0);
    batch::for_each_chunk(path, CHUNK, |images, first, total| {
        bar.set_length(total as u64);
        size = (images.width, images.height);
        let a = model.activations(images, |done| bar.set_position((first + done) as u64))?;
        acts.append(a);
        Ok(())
    })?;
    bar.finish_and_clear();
    eprintln!("{what}: {} images of {}x{} px", acts.n, size.0, size.1);
    Ok(acts)
}

/// The precomputed statistics of an ADM reference batch, when it has them.
fn file_statistics(path: &Path) -> Result<Option<(FidStats, FidStats)>> {
    if path.is_dir() {
        return Ok(None);
    }
    let names = batch::npz_names(path)?;
    let has = |n: &str| names.iter().any(|x| x == n);
    if !has("mu") {
        return Ok(None);
    }
    let get = |n: &str| -> Result<Vec<f64>> {
        if !has(n) {
            bail!("{}: has mu but no {n}", path.display());
        }
        Ok(batch::read_npz(path, n)?.to_f64())
    };
    let pool = FidStats::new(get("mu")?, get("sigma")?)
        .with_context(|| format!("{}: mu/sigma", path.display()))?;
    let spatial = FidStats::new(get("mu_s")?, get("sigma_s")?)
        .with_context(|| format!("{}: mu_s/sigma_s", path.display()))?;
    Ok(Some((pool, spatial)))
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    match args.protocol {
        Some(Protocol::C2i(a)) => crate::eval_c2i::run(*a),
        Some(Protocol::T2i(a)) => crate::eval_t2i::run(*a),
        None => run_batch(args.batch),
    }
}

/// The Inception model of `path` with `batch_size` images per call and `intra_threads` ONNX
/// Runtime threads (0: one per core).
pub(crate) fn load_inception(
    path: &Path,
    batch_size: usize,
    intra_threads: usize,
) -> Result<Inception> {
    Ok(Inception::load(
        path,
        &ModelOptions {
            intra_threads,
            batch_size,
            ..ModelOptions::default()
        },
    )?)
}

/// The evaluator's metrics of the samples' activations against the reference batch at
/// `reference` (its statistics when it has them, its images' activations when it has images),
/// printed as the evaluator prints them; the report as JSON with the Inception model's name and
/// SHA-256.
pub(crate) fn metrics_against(
    model: &Inception,
    sample: &Activations,
    reference: &Path,
) -> Result<serde_json::Value> {
    let statistics = file_statistics(reference)?;
    let has_images =
        reference.is_dir() || batch::npz_names(reference)?.iter().any(|n| n == "arr_0");
    if !has_images && statistics.is_none() {
        bail!(
            "{}: the reference has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)",
            reference.display()
        );
    }
    let reference_acts = match has_images {
        true => Some(activations_at(model, "reference", reference)?),
        false => None,
    };
    metrics_of(
        model,
        sample,
        &reference.display().to_string(),
        statistics,
        reference_acts.as_ref(),
    )
}

/// [`metrics_against`] a reference given as its statistics and/or images; `label` names it in
/// errors.
fn metrics_of(
    model: &Inception,
    sample: &Activations,
    label: &str,
    statistics: Option<(FidStats, FidStats)>,
    reference_acts: Option<&Activations>,
) -> Result<serde_json::Value> {
    if let Some((pool, spatial)) = &statistics
        && (pool.dim != sample.pool_dim || spatial.dim != sample.spatial_dim)
    {
        bail!(
            "{label}: statistics of width {}/{}, the model's features are {}/{} wide",
            pool.dim,
            spatial.dim,
            sample.pool_dim,
            sample.spatial_dim
        );
    }
    let report = evaluate(
        sample,
        Reference {
            activations: reference_acts,
            statistics,
        },
    )?;
    println!("Inception Score: {}", report.inception_score);
    println!("FID: {}", report.fid);
    println!("sFID: {}", report.sfid);
    match (report.precision, report.recall) {
        (Some(p), Some(r)) => {
            println!("Precision: {p}");
            println!("Recall: {r}");
        }
        _ => println!("Precision/Recall: not computed (the reference has no images, arr_0)"),
    }
    let mut json = serde_json::to_value(&report)?;
    json["inception_model"] = model.name.clone().into();
    json["inception_sha256"] = model.sha256.clone().into();
    Ok(json)
}

fn run_batch(args: BatchArgs) -> Result<ExitCode> {
    let Some(inception) = &args.inception else {
        bail!("llamagen eval needs --inception (or a protocol: c2i, t2i)");
    };
    let query = |q: &str| -> Result<Images> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(crate::eval_catalog::query_images(
            &args.catalog,
            q,
            args.image_size,
        ))
    };
    let model = load_inception(inception, args.batch_size, args.intra_threads)?;
    let sample = match (&args.sample, &args.sample_query) {
        (Some(p), _) => activations_at(&model, "sample", p)?,
        (None, Some(q)) => activations(&model, "sample", &query(q)?)?,
        (None, None) => bail!("llamagen eval needs --sample or --sample-query"),
    };
    let json = match (&args.reference, &args.ref_query) {
        (Some(r), _) => metrics_against(&model, &sample, r)?,
        (None, Some(q)) => {
            let reference = activations(&model, "reference", &query(q)?)?;
            metrics_of(&model, &sample, q, None, Some(&reference))?
        }
        (None, None) => bail!("llamagen eval needs --ref or --ref-query"),
    };
    let out = match (&args.out, &args.sample) {
        (Some(o), _) => o.clone(),
        (None, Some(p)) => p.with_extension("json"),
        (None, None) => PathBuf::from("eval.json"),
    };
    std::fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}
