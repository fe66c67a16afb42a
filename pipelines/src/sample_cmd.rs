//! `llamagen sample`: generate image tokens with a trained GPT (KV cache, CFG, temperature,
//! top-k, top-p) and decode them with the VQ decoder into a PNG grid, and optionally the
//! evaluation outputs (an ADM `.npz`, one PNG per image, resized as the official evaluation
//! sampling does), or a GigaGAN-layout folder of prompts ([`sample_t2i_folder`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use llamagen_encode::augment;
use llamagen_train::data::{DataConfig, caption_features, left_pad_captions};
use llamagen_train::run::RunConfig;
use llamagen_train::sample::SamplingConfig;
use llamagen_train::train::{MODEL_FILE, STATE_FILE, TrainState};
use llamagen_train::{Condition, GptConfig, ModelType};
use rand::SeedableRng;

use crate::eval_sampling::{
    Sampler, check_settings, derived_seed, fingerprint, images_u8, progress, resize_images,
    vq_model_args, write_atomic, write_png,
};

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// GPT checkpoint: a training checkpoint directory (its train_state.json gives the model
    /// config), a safetensors file, or an official torch checkpoint.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Run config (TOML) whose [model] describes the GPT; needed when the checkpoint is a file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ checkpoint (safetensors or the official torch .pt).
    #[arg(long)]
    pub vq: PathBuf,
    /// VQ architecture: vq16, vq8, reduced (the reference set's), or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub vq_args: String,
    /// c2i: class labels, one image each (e.g. 207,360,387).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<u32>,
    /// t2i: caption features as .npy ([1, L, caption_dim] or [L, caption_dim], as the official
    /// extract_t5_feature.py writes them); repeat for several images.
    #[arg(long)]
    pub caption_npy: Vec<PathBuf>,
    /// t2i: catalog root to read caption features (t5_long) of --keys from.
    #[arg(long)]
    pub catalog: Option<String>,
    /// t2i: sample keys in --catalog.
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<String>,
    /// t2i: read t5_short instead of t5_long.
    #[arg(long)]
    pub short: bool,
    /// t2i: a prompt, encoded with the T5 encoder of --t5 (repeat for several images).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// t2i: a CSV or TSV file of prompts with a header row (`coco_captions.csv`,
    /// `PartiPrompts.tsv`): the column named Prompt, prompt, caption or text, else the first.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// t2i: T5 encoder directory for --prompt/--prompts (config.json, weights, tokenizer.json),
    /// the one the training features were made with (flan-t5-xl for the official models).
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// tokenizer.json of the T5 encoder (default: T5/tokenizer.json).
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// Classifier-free guidance scale (on when > 1). Default as the official scripts: 4.0 for
    /// c2i, 7.5 for t2i.
    #[arg(long)]
    pub cfg_scale: Option<f32>,
    /// Last decode step that uses CFG (-1: all).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub cfg_interval: i64,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all). Default as the official scripts: 2000 for c2i,
    /// 1000 for t2i.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Give image `i` its own generator seeded from (--seed, i) and decode through the paged
    /// batch decoder, so each image depends only on its condition, the settings and the seed,
    /// never on --batch-size or the other images: the tokens `llamagen serve` returns for a
    /// request with the same seed (image `i` of its `n`). CPU only. Default: one generator for
    /// the whole run, as the official scripts.
    #[arg(long)]
    pub per_image_seeds: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per row of the grid (default: all in one row up to 8).
    #[arg(long)]
    pub nrow: Option<usize>,
    /// Output PNG.
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,
    /// Also write the generated tokens as JSON (one array per image).
    #[arg(long)]
    pub tokens_out: Option<PathBuf>,
    /// Images generated (and decoded) together: one KV cache of this many sequences (twice
    /// that with CFG) at a time.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// t2i: write the caption features of the prompts as `<i>.npy` (float32 (1, L, D), as the
    /// official extract_t5_feature.py and `export llamagen` write them) into this folder.
    #[arg(long)]
    pub features_out: Option<PathBuf>,
    /// Also write the images as an ADM sample batch (`.npz` with `arr_0`: uint8 N×H×W×3), the
    /// input of the official evaluator.
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// Also write one PNG per image into this folder, `000000.png`, `000001.png`, … in sample
    /// order, as the official `sample_c2i_ddp.py` / `sample_t2i_ddp.py` save them
    /// (`Image.fromarray` of the uint8 conversion of --npz). `sample` holds all its images in
    /// memory until the end: for the 50,000-sample evaluation use `llamagen eval c2i`, which
    /// writes shards as it goes.
    #[arg(long)]
    pub png_dir: Option<PathBuf>,
    /// Resize the --npz, --png-dir and --float-npy images to N×N as `sample_c2i_ddp.py` does
    /// for evaluation (torch `F.interpolate(mode='bicubic')` on the decoder output, e.g. 384 ->
    /// 256); not the grid. Nothing changes when the images already have that size.
    #[arg(long)]
    pub image_size_eval: Option<usize>,
    /// Also write the decoder's float32 images (N×3×H×W `.npy`, after --image-size-eval, before
    /// the uint8 conversion).
    #[arg(long)]
    pub float_npy: Option<PathBuf>,
    /// t2i: instead of a grid, sample the --prompt/--prompts into this folder in GigaGAN's
    /// evaluation layout (`images/000000.png`…, `captions.txt`), resumable: a re-run skips the
    /// images already there and refuses other settings.
    #[arg(long)]
    pub folder: Option<PathBuf>,
}

/// Sampling defaults of the official scripts (`sample_c2i.py`, `sample_t2i.py`): CFG scale and
/// top-k.
fn official_defaults(t: ModelType) -> (f32, usize) {
    match t {
        ModelType::C2i => (4.0, 2000),
        ModelType::T2i => (7.5, 1000),
    }
}

/// The prompts of a CSV/TSV file with a header row (see `--prompts`), each with the file and row
/// that names it in errors. The delimiter is a tab when the header has one or has no comma (the
/// official `coco_captions.csv` is a one-column file read with `delimiter='\t'`, its prompts
/// full of commas), else a comma; a row with more fields than the header is an error.
pub(crate) fn read_prompts(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let first = text.lines().next().unwrap_or("");
    let delimiter = if first.contains('\t') || !first.contains(',') {
        b'\t'
    } else {
        b','
    };
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_reader(text.as_bytes());
    let header = r
        .headers()
        .with_context(|| format!("{}: header row", path.display()))?
        .clone();
    let col = header
        .iter()
        .position(|h| {
            matches!(
                h.trim().to_lowercase().as_str(),
                "prompt" | "caption" | "text"
            )
        })
        .unwrap_or(0);
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        let p = rec.get(col).unwrap_or("").to_string();
        let row = rec.position().map_or(i as u64 + 2, |p| p.line());
        out.push((format!("{} line {row}", path.display()), p));
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// The T5 encoder at `dir` (its tokenizer from `tokenizer` when given), on the CPU.
pub(crate) fn load_t5(
    dir: &Path,
    tokenizer: Option<&Path>,
    max_tokens: usize,
) -> Result<llamagen_encode::text_encoder::TextEncoder> {
    use llamagen_encode::text_encoder::{ModelPaths, TextEncoder, TextEncoderConfig};
    let mut paths = ModelPaths::in_dir(dir);
    if let Some(t) = tokenizer {
        paths.tokenizer = t.to_path_buf();
    }
    TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig {
            max_tokens,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the T5 encoder {}", dir.display()))
}

/// Caption features of `prompts` (each with the label naming it in errors) from `enc`, rounded
/// to bfloat16 as the pipeline stores training features (and as the official scripts run T5),
/// `(tokens, dim, values)` each.
pub(crate) fn encode_prompts(
    enc: &llamagen_encode::text_encoder::TextEncoder,
    prompts: &[(String, String)],
) -> Result<Vec<(usize, usize, Vec<f32>)>> {
    use llamagen_encode::text_encoder::StoreDtype;
    let refs: Vec<&str> = prompts.iter().map(|(_, p)| p.as_str()).collect();
    enc.encode(&refs)?
        .into_iter()
        .zip(prompts)
        .map(|(f, (label, p))| match f {
            Ok(f) => {
                let v = StoreDtype::Bf16.decode(&StoreDtype::Bf16.encode(&f.data));
                Ok((f.tokens, f.dim, v))
            }
            Err(issue) => bail!("prompt {label} ({p:?}): {issue}"),
        })
        .collect()
}

/// Caption features of `prompts` from the T5 encoder at `dir` (see [`encode_prompts`]).
fn prompt_features(
    dir: &Path,
    tokenizer: Option<&Path>,
    prompts: &[(String, String)],
    max_tokens: usize,
) -> Result<Vec<(usize, usize, Vec<f32>)>> {
    encode_prompts(&load_t5(dir, tokenizer, max_tokens)?, prompts)
}

/// Caption features `(tokens, dim, values)` as the model's condition: left-padded to its
/// `cls_token_num` tokens, with the caption mask.
fn caption_condition(
    cfg: &GptConfig,
    feats: Vec<(usize, usize, Vec<f32>)>,
    device: &Device,
) -> Result<(Condition, Tensor)> {
    let (t, c) = (cfg.cls_token_num, cfg.caption_dim);
    if let Some((_, dim, _)) = feats.iter().find(|(_, d, _)| *d != c) {
        bail!("caption features of width {dim}, the model has caption_dim {c}");
    }
    let caps: Vec<(usize, Vec<f32>)> = feats.into_iter().map(|(l, _, v)| (l, v)).collect();
    let refs: Vec<Option<&(usize, Vec<f32>)>> = caps.iter().map(Some).collect();
    let (cap, mask) = left_pad_captions(&refs, t, c)?;
    let b = caps.len();
    Ok((
        Condition::Caption(Tensor::from_vec(cap, (b, t, c), device)?),
        Tensor::from_vec(mask, (b, t), device)?,
    ))
}

/// Writes `arr_0` as an `.npz` (a zip of `arr_0.npy`), as `np.savez` does.
pub fn write_npz(path: &Path, shape: &[usize], data: &[u8]) -> Result<()> {
    crate::eval_sampling::write_npz(path, shape, data, None)
}

/// The GPT config and weights file of `checkpoint`: a training checkpoint directory (its
/// train_state.json has the model) or a weights file whose model `config` (a run config) gives.
pub(crate) fn model_config(
    checkpoint: &Path,
    config: Option<&Path>,
) -> Result<(GptConfig, PathBuf)> {
    let (weights, state) = if checkpoint.is_dir() && checkpoint.join(MODEL_FILE).exists() {
        (
            checkpoint.join(MODEL_FILE),
            Some(checkpoint.join(STATE_FILE)),
        )
    } else {
        (checkpoint.to_path_buf(), None)
    };
    if let Some(cfg) = config {
        return Ok((RunConfig::from_file(cfg)?.model.gpt_config()?, weights));
    }
    match state.filter(|s| s.exists()) {
        Some(s) => {
            let st: TrainState = serde_json::from_str(
                &std::fs::read_to_string(&s).with_context(|| s.display().to_string())?,
            )
            .with_context(|| s.display().to_string())?;
            Ok((st.model, weights))
        }
        None => bail!(
            "{} is not a training checkpoint directory: give --config with the model",
            checkpoint.display()
        ),
    }
}

fn read_npy(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let t = Tensor::read_npy(path).with_context(|| path.display().to_string())?;
    let t = match t.rank() {
        3 if t.dim(0)? == 1 => t.squeeze(0)?,
        2 => t,
        _ => bail!(
            "{}: caption features of shape {:?}, expected [1, L, C] or [L, C]",
            path.display(),
            t.dims()
        ),
    };
    let (l, c) = t.dims2()?;
    Ok((l, c, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
}

/// Images `(B, 3, H, W)` in about [-1, 1] to one RGB grid, `nrow` per row, as the official
/// scripts' `save_image(..., nrow, normalize=True, value_range=(-1, 1))`.
fn grid(images: &Tensor, nrow: usize) -> Result<image::RgbImage> {
    let images = images.to_device(&Device::Cpu)?;
    let cells = (0..images.dim(0)?)
        .map(|i| Ok(Some(augment::to_rgb_image(&images.get(i)?)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(augment::make_grid(&cells, nrow)?)
}

pub fn run(args: SampleArgs) -> Result<ExitCode> {
    if args.image_size_eval == Some(0) {
        bail!("--image-size-eval must be positive");
    }
    if args.per_image_seeds && args.folder.is_some() {
        bail!("--per-image-seeds does not apply to --folder (which seeds each batch of prompts)");
    }
    if let Some(dir) = &args.folder {
        return run_folder(&args, dir);
    }
    let sampler = Sampler::load(
        &args.checkpoint,
        args.config.as_deref(),
        &args.vq,
        &args.vq_args,
        &args.device,
    )?;
    let (cfg, device) = (&sampler.cfg, &sampler.device);
    let (cond, emb_mask) = match cfg.model_type {
        ModelType::C2i => {
            if args.labels.is_empty() {
                bail!("a c2i model needs --labels");
            }
            if let Some(bad) = args.labels.iter().find(|&&l| l as usize >= cfg.num_classes) {
                bail!(
                    "label {bad} is out of range (the model has {} classes)",
                    cfg.num_classes
                );
            }
            let n = args.labels.len();
            (
                Condition::Class(Tensor::from_vec(args.labels.clone(), n, device)?),
                None,
            )
        }
        ModelType::T2i => {
            let mut feats = Vec::new();
            for p in &args.caption_npy {
                feats.push(read_npy(p)?);
            }
            let mut prompts: Vec<(String, String)> = args
                .prompt
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("--prompt {}", i + 1), p.clone()))
                .collect();
            if let Some(f) = &args.prompts {
                prompts.extend(read_prompts(f)?);
            }
            if !prompts.is_empty() {
                let dir = args
                    .t5
                    .as_deref()
                    .context("--prompt/--prompts need --t5 (the T5 encoder directory)")?;
                let pf = prompt_features(
                    dir,
                    args.t5_tokenizer.as_deref(),
                    &prompts,
                    cfg.cls_token_num,
                )?;
                if let Some(out) = &args.features_out {
                    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
                    for (i, (l, d, v)) in pf.iter().enumerate() {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        crate::export_cmd::write_npy(
                            &out.join(format!("{i}.npy")),
                            "<f4",
                            &[1, *l, *d],
                            &bytes,
                        )?;
                    }
                }
                feats.extend(pf);
            }
            if !args.keys.is_empty() {
                let root = args.catalog.clone().context("--keys needs --catalog")?;
                let dc = DataConfig {
                    root,
                    ..DataConfig::default()
                };
                feats.extend(caption_features(&dc, &args.keys, args.short)?);
            }
            if feats.is_empty() {
                bail!(
                    "a t2i model needs --prompt, --prompts, --caption-npy or --catalog with --keys"
                );
            }
            let (c, mask) = caption_condition(cfg, feats, device)?;
            (c, Some(mask))
        }
    };
    let sc = sampling_config(&args, cfg.model_type);
    eprintln!(
        "sampling: cfg scale {}, top-k {}, top-p {}, temperature {}, seed {}",
        sc.cfg_scale, sc.top_k, sc.top_p, sc.temperature, args.seed
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let start = std::time::Instant::now();
    let n = cond.batch_size()?;
    // Generated and decoded in batches of --batch-size (a KV cache per batch, as the official
    // scripts' per-process batches), the generator running on across batches.
    let (images, token_rows) = if args.per_image_seeds {
        sampler.sample_per_image(&cond, emb_mask.as_ref(), &sc, args.batch_size, args.seed)?
    } else {
        sampler.sample(&cond, emb_mask.as_ref(), &sc, args.batch_size, &mut rng)?
    };
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "generated {n} x {} tokens in {secs:.2} s ({:.1} tokens/s)",
        cfg.block_size,
        (n * cfg.block_size) as f64 / secs.max(1e-9)
    );
    if let Some(p) = &args.tokens_out {
        std::fs::write(p, serde_json::to_string(&token_rows)?)
            .with_context(|| p.display().to_string())?;
    }
    if args.npz.is_some() || args.png_dir.is_some() || args.float_npy.is_some() {
        // The evaluation outputs: resized as sample_c2i_ddp.py does for a model sampling at
        // another size than the evaluation's, then converted as it converts them.
        let eval_images = match args.image_size_eval {
            Some(s) => resize_images(&images, s)?,
            None => images.clone(),
        };
        if let Some(p) = &args.float_npy {
            let (b, c, h, w) = eval_images.dims4()?;
            let v = eval_images.flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            crate::export_cmd::write_npy(p, "<f4", &[b, c, h, w], &bytes)?;
            eprintln!("wrote {} (float32 {:?})", p.display(), [b, c, h, w]);
        }
        let (shape, bytes) = images_u8(&eval_images)?;
        if let Some(p) = &args.npz {
            write_npz(p, &shape, &bytes)?;
            eprintln!("wrote {} (arr_0: uint8 {shape:?})", p.display());
        }
        if let Some(dir) = &args.png_dir {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
            let item = shape[1] * shape[2] * 3;
            for (i, px) in bytes.chunks(item).enumerate() {
                write_png(&dir.join(format!("{i:06}.png")), shape[1], shape[2], px)?;
            }
            eprintln!(
                "wrote {} PNGs of {}x{} px into {}",
                shape[0],
                shape[2],
                shape[1],
                dir.display()
            );
        }
    }
    let img = grid(&images, args.nrow.unwrap_or(n.min(8)))?;
    img.save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {} ({n} images of {}x{} px)",
        args.out.display(),
        images.dim(3)?,
        images.dim(2)?
    );
    Ok(ExitCode::SUCCESS)
}

/// The sampling settings of `args` for a model of type `t` (the official scripts' defaults
/// where not given).
fn sampling_config(args: &SampleArgs, t: ModelType) -> SamplingConfig {
    let (cfg_default, top_k_default) = official_defaults(t);
    SamplingConfig {
        cfg_scale: args.cfg_scale.unwrap_or(cfg_default),
        cfg_interval: args.cfg_interval,
        temperature: args.temperature,
        top_k: args.top_k.unwrap_or(top_k_default),
        top_p: args.top_p,
        sample_logits: true,
    }
}

/// `llamagen sample --folder DIR`: the prompts of --prompt/--prompts into a GigaGAN-layout folder.
fn run_folder(args: &SampleArgs, dir: &Path) -> Result<ExitCode> {
    let mut prompts = args.prompt.clone();
    if let Some(f) = &args.prompts {
        prompts.extend(read_prompts(f)?.into_iter().map(|(_, p)| p));
    }
    if prompts.is_empty()
        || !args.labels.is_empty()
        || !args.caption_npy.is_empty()
        || !args.keys.is_empty()
    {
        bail!(
            "--folder samples text prompts: give --prompt or --prompts (and --t5), not --labels, --caption-npy or --keys"
        );
    }
    let opts = T2iFolderSampling {
        checkpoint: args.checkpoint.clone(),
        config: args.config.clone(),
        vq: args.vq.clone(),
        vq_args: args.vq_args.clone(),
        t5: args
            .t5
            .clone()
            .context("--folder needs --t5 (the T5 encoder directory)")?,
        t5_tokenizer: args.t5_tokenizer.clone(),
        sampling: sampling_config(args, ModelType::T2i),
        seed: args.seed,
        batch_size: args.batch_size,
        device: args.device.clone(),
        image_size_eval: args.image_size_eval,
        progress: true,
    };
    let done = sample_t2i_folder(&opts, &prompts, dir)?;
    println!(
        "{}: {} images ({} generated now, {} already there)",
        dir.display(),
        done.images,
        done.generated,
        done.images - done.generated
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether a sample PNG is there and readable (its header decodes), so that a file left empty
/// by a crash is sampled again.
fn png_complete(path: &Path) -> bool {
    image::image_dimensions(path).is_ok()
}

/// The identity of a T5 encoder directory (config, tokenizer and weight files), so that a
/// resumed folder is refused another encoder.
fn t5_fingerprint(dir: &Path, tokenizer: Option<&Path>) -> Result<serde_json::Value> {
    let paths = llamagen_encode::text_encoder::ModelPaths::in_dir(dir);
    let tokenizer = tokenizer.map_or(paths.tokenizer.clone(), Path::to_path_buf);
    let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("--t5 {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "safetensors" || e == "bin" || e == "pt")
        })
        .collect();
    weights.sort();
    Ok(serde_json::json!({
        "config": fingerprint(&paths.config)?,
        "tokenizer": fingerprint(&tokenizer)?,
        "weights": {
            "path": dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).display().to_string(),
            "files": weights
                .iter()
                .map(|w| {
                    let f = fingerprint(w)?;
                    Ok(serde_json::json!({
                        "name": w.file_name().map(|n| n.to_string_lossy().to_string()),
                        "bytes": f["bytes"],
                        "fnv64": f["fnv64"],
                    }))
                })
                .collect::<Result<Vec<_>>>()?,
        },
    }))
}

/// Settings of [`sample_t2i_folder`]: the models and the sampling settings of `llamagen sample`.
#[derive(Debug, Clone)]
pub struct T2iFolderSampling {
    /// GPT checkpoint: a training checkpoint directory, or a weights file with `config`.
    pub checkpoint: PathBuf,
    /// Run config (TOML) whose [model] describes the GPT (for a weights file).
    pub config: Option<PathBuf>,
    /// VQ checkpoint and its architecture (`vq16`, `vq8`, `reduced` or a ModelArgs JSON file).
    pub vq: PathBuf,
    pub vq_args: String,
    /// T5 encoder directory (the one the training features were made with) and its tokenizer
    /// (default: `<t5>/tokenizer.json`).
    pub t5: PathBuf,
    pub t5_tokenizer: Option<PathBuf>,
    /// CFG scale, interval, temperature, top-k, top-p (the official t2i defaults: cfg 7.5,
    /// top-k 1000, top-p 1, temperature 1).
    pub sampling: SamplingConfig,
    pub seed: u64,
    /// Prompts generated together (one KV cache); also the unit of resumption and of seeding.
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// Resize the images to this square size (torch bicubic) before saving; None keeps the
    /// decoder's size.
    pub image_size_eval: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// What [`sample_t2i_folder`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct T2iFolderSummary {
    /// Images in the folder now (= the number of prompts).
    pub images: usize,
    /// Images generated by this call (the others were there from an earlier call).
    pub generated: usize,
}

/// Samples one image per prompt of `prompts` into `dir` in the layout of GigaGAN's evaluation
/// (and of `llamagen eval t2i`): `dir/images/000000.png`, `000001.png`, … in prompt order and
/// `dir/captions.txt` with one caption per line in the same order (newlines and tabs in a
/// prompt become spaces). The PNGs are the official `sample_t2i_ddp.py` conversion of the
/// decoder output: `Image.fromarray(clamp(127.5·x + 128, 0, 255).uint8 HWC)`, after the
/// `image_size_eval` bicubic resize when given.
///
/// Resumable and deterministic: prompts are generated in fixed batches of `opts.batch_size`
/// (batch `k` = prompts `k·B .. (k+1)·B`), each with its own generator seeded from
/// `(opts.seed, k)`; a batch whose PNGs all exist is skipped, every PNG is written atomically
/// (tmp + rename), so a run killed at any point and called again gives the images of an
/// uninterrupted run. `dir/sampling.json` records the settings at the first call; a later call
/// with other settings is refused, as is one whose prompts disagree with an existing
/// `captions.txt` (more prompts than before are fine: the folder grows).
pub fn sample_t2i_folder(
    opts: &T2iFolderSampling,
    prompts: &[String],
    dir: &Path,
) -> Result<T2iFolderSummary> {
    if prompts.is_empty() {
        bail!("no prompts to sample into {}", dir.display());
    }
    if opts.image_size_eval == Some(0) {
        bail!("image_size_eval must be positive");
    }
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir).with_context(|| images_dir.display().to_string())?;
    let (cfg, weights) = model_config(&opts.checkpoint, opts.config.as_deref())?;
    if cfg.model_type != ModelType::T2i {
        bail!(
            "{} is a {:?} model; a caption folder needs a t2i model",
            opts.checkpoint.display(),
            cfg.model_type
        );
    }
    let sc = &opts.sampling;
    let settings = serde_json::json!({
        "checkpoint": fingerprint(&weights)?,
        "model": serde_json::to_value(&cfg)?,
        "vq": fingerprint(&opts.vq)?,
        "vq_args": serde_json::to_value(vq_model_args(&opts.vq_args)?)?,
        "t5": t5_fingerprint(&opts.t5, opts.t5_tokenizer.as_deref())?,
        "cfg_scale": sc.cfg_scale,
        "cfg_interval": sc.cfg_interval,
        "temperature": sc.temperature,
        "top_k": sc.top_k,
        "top_p": sc.top_p,
        "seed": opts.seed,
        "batch_size": opts.batch_size.max(1),
        "image_size_eval": opts.image_size_eval,
        "dtype": "float32",
        "device": opts.device,
    });
    check_settings(
        &dir.join("sampling.json"),
        &settings,
        &[
            "checkpoint.path",
            "vq.path",
            "t5.config.path",
            "t5.tokenizer.path",
            "t5.weights.path",
            "device",
        ],
    )?;
    // captions.txt: the existing lines must be the prompts' first lines.
    let captions: Vec<String> = prompts
        .iter()
        // Every separator of Python's `str.splitlines` (what the evaluator splits captions.txt
        // on), and tabs, become spaces: one caption per line whatever the prompt holds.
        .map(|p| {
            p.replace(
                [
                    '\r', '\n', '\t', '\x0b', '\x0c', '\x1c', '\x1d', '\x1e', '\u{85}', '\u{2028}',
                    '\u{2029}',
                ],
                " ",
            )
        })
        .collect();
    let cap_path = dir.join("captions.txt");
    if cap_path.exists() {
        let old =
            std::fs::read_to_string(&cap_path).with_context(|| cap_path.display().to_string())?;
        let old: Vec<String> = llamagen_eval::clip_score::splitlines(&old);
        if let Some(i) = (0..old.len().min(captions.len())).find(|&i| old[i] != captions[i]) {
            bail!(
                "{} line {} is {:?}, the prompt is {:?}: another prompt list (use another folder)",
                cap_path.display(),
                i + 1,
                old[i],
                captions[i]
            );
        }
        if old.len() > captions.len() {
            bail!(
                "{} has {} captions, more than the {} prompts given: another prompt list",
                cap_path.display(),
                old.len(),
                captions.len()
            );
        }
    }
    write_atomic(&cap_path, (captions.join("\n") + "\n").as_bytes())?;

    let n = prompts.len();
    let per = opts.batch_size.max(1);
    let png = |i: usize| images_dir.join(format!("{i:06}.png"));
    let todo: Vec<usize> = (0..n.div_ceil(per))
        .filter(|&k| (k * per..n.min((k + 1) * per)).any(|i| !png_complete(&png(i))))
        .collect();
    let missing: usize = todo.iter().map(|&k| n.min((k + 1) * per) - k * per).sum();
    if todo.is_empty() {
        return Ok(T2iFolderSummary {
            images: n,
            generated: 0,
        });
    }
    let sampler = Sampler::load(
        &opts.checkpoint,
        opts.config.as_deref(),
        &opts.vq,
        &opts.vq_args,
        &opts.device,
    )?;
    let t5 = load_t5(&opts.t5, opts.t5_tokenizer.as_deref(), cfg.cls_token_num)?;
    let bar = progress((n) as u64, (n - missing) as u64, "images");
    if !opts.progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    for k in todo {
        let range = k * per..n.min((k + 1) * per);
        let labelled: Vec<(String, String)> = range
            .clone()
            .map(|i| (format!("prompt {}", i + 1), prompts[i].clone()))
            .collect();
        let feats = encode_prompts(&t5, &labelled)?;
        let (cond, mask) = caption_condition(&sampler.cfg, feats, &sampler.device)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(derived_seed(opts.seed, 2, k as u64));
        let (images, _) = sampler.sample(&cond, Some(&mask), sc, per, &mut rng)?;
        let images = match opts.image_size_eval {
            Some(s) => resize_images(&images, s)?,
            None => images,
        };
        let (shape, bytes) = images_u8(&images)?;
        let item = shape[1] * shape[2] * 3;
        for (i, px) in range.clone().zip(bytes.chunks(item)) {
            write_png(&png(i), shape[1], shape[2], px)?;
        }
        bar.inc(range.len() as u64);
    }
    bar.finish_and_clear();
    Ok(T2iFolderSummary {
        images: n,
        generated: missing,
    })
}
