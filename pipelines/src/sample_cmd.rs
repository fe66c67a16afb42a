//! `llamagen sample`: generate image tokens with a trained GPT (KV cache, CFG, temperature,
//! top-k, top-p) and decode them with the VQ decoder into a PNG grid.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use llamagen_encode::{ModelArgs, VqModel, augment};
use llamagen_train::checkpoint::load_gpt;
use llamagen_train::data::{DataConfig, caption_features, left_pad_captions};
use llamagen_train::run::{RunConfig, parse_device};
use llamagen_train::sample::{SamplingConfig, generate};
use llamagen_train::train::{MODEL_FILE, STATE_FILE, TrainState};
use llamagen_train::{Condition, GptConfig, ModelType};
use rand::SeedableRng;

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
/// that names it in errors.
fn read_prompts(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let delimiter = if path.extension().is_some_and(|e| e == "tsv") {
        b'\t'
    } else {
        b','
    };
    let mut r = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
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

/// Caption features of `prompts` from the T5 encoder at `dir`, rounded to bfloat16 as the
/// pipeline stores training features (and as the official scripts run T5), `(tokens, dim,
/// values)` each.
fn prompt_features(
    dir: &Path,
    tokenizer: Option<&Path>,
    prompts: &[(String, String)],
    max_tokens: usize,
) -> Result<Vec<(usize, usize, Vec<f32>)>> {
    use llamagen_encode::text_encoder::{ModelPaths, StoreDtype, TextEncoder, TextEncoderConfig};
    let mut paths = ModelPaths::in_dir(dir);
    if let Some(t) = tokenizer {
        paths.tokenizer = t.to_path_buf();
    }
    let enc = TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig {
            max_tokens,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the T5 encoder {}", dir.display()))?;
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

/// Images `(B, 3, H, W)` in about [-1, 1] as uint8 `B×H×W×3`, as the official sampling scripts
/// convert them for the evaluator: `clamp(127.5·x + 128, 0, 255)`, truncated to uint8.
fn images_u8(images: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, c, h, w) = images.dims4()?;
    let x = images
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = x
        .iter()
        .map(|&v| (127.5 * v + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    Ok((vec![b, h, w, c], bytes))
}

/// Writes `arr_0` as an `.npz` (a zip of `arr_0.npy`), as `np.savez` does.
pub fn write_npz(path: &Path, shape: &[usize], data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("npz.partial");
    let file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let npy = crate::export_cmd::npy_bytes("|u1", shape, data);
    zip.start_file(
        "arr_0.npy",
        zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(npy.len() as u64 >= u32::MAX as u64),
    )?;
    zip.write_all(&npy)?;
    zip.finish()?.flush()?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

fn model_config(args: &SampleArgs) -> Result<(GptConfig, PathBuf)> {
    let (weights, state) = if args.checkpoint.is_dir() && args.checkpoint.join(MODEL_FILE).exists()
    {
        (
            args.checkpoint.join(MODEL_FILE),
            Some(args.checkpoint.join(STATE_FILE)),
        )
    } else {
        (args.checkpoint.clone(), None)
    };
    if let Some(cfg) = &args.config {
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
            args.checkpoint.display()
        ),
    }
}

fn vq_args(name: &str) -> Result<ModelArgs> {
    Ok(match name {
        "vq16" => ModelArgs::vq_16(),
        "vq8" => ModelArgs::vq_8(),
        "reduced" => ModelArgs::reduced(),
        path => serde_json::from_str(
            &std::fs::read_to_string(path).with_context(|| format!("--vq-args {path}"))?,
        )
        .with_context(|| format!("--vq-args {path}"))?,
    })
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
    let device = parse_device(&args.device)?;
    let (cfg, weights) = model_config(&args)?;
    let model = load_gpt(&weights, &cfg, DType::F32, &device)
        .with_context(|| format!("loading {}", weights.display()))?;
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
                Condition::Class(Tensor::from_vec(args.labels.clone(), n, &device)?),
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
            let (t, c) = (cfg.cls_token_num, cfg.caption_dim);
            if let Some((_, dim, _)) = feats.iter().find(|(_, d, _)| *d != c) {
                bail!("caption features of width {dim}, the model has caption_dim {c}");
            }
            let caps: Vec<(usize, Vec<f32>)> = feats.into_iter().map(|(l, _, v)| (l, v)).collect();
            let refs: Vec<Option<&(usize, Vec<f32>)>> = caps.iter().map(Some).collect();
            let (cap, mask) = left_pad_captions(&refs, t, c)?;
            let b = caps.len();
            (
                Condition::Caption(Tensor::from_vec(cap, (b, t, c), &device)?),
                Some(Tensor::from_vec(mask, (b, t), &device)?),
            )
        }
    };
    let (cfg_default, top_k_default) = official_defaults(cfg.model_type);
    let sc = SamplingConfig {
        cfg_scale: args.cfg_scale.unwrap_or(cfg_default),
        cfg_interval: args.cfg_interval,
        temperature: args.temperature,
        top_k: args.top_k.unwrap_or(top_k_default),
        top_p: args.top_p,
        sample_logits: true,
    };
    eprintln!(
        "sampling: cfg scale {}, top-k {}, top-p {}, temperature {}, seed {}",
        sc.cfg_scale, sc.top_k, sc.top_p, sc.temperature, args.seed
    );
    // The decoder is checked and loaded before any token is generated, so a wrong --vq fails at
    // once instead of after the whole generation.
    let vq_args = vq_args(&args.vq_args)?;
    if vq_args.codebook_size != cfg.vocab_size {
        bail!(
            "the VQ codebook has {} codes, the GPT vocabulary {}",
            vq_args.codebook_size,
            cfg.vocab_size
        );
    }
    let vq = VqModel::from_file(&args.vq, &vq_args, &device)
        .with_context(|| format!("loading {}", args.vq.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let start = std::time::Instant::now();
    // Generated and decoded in batches of --batch-size (a KV cache per batch, as the official
    // scripts' per-process batches), the generator running on across batches.
    let n = match &cond {
        Condition::Class(t) | Condition::Caption(t) => t.dim(0)?,
    };
    let per = args.batch_size.max(1);
    let g = cfg.grid_size();
    let (mut token_rows, mut decoded) = (Vec::<Vec<u32>>::new(), Vec::<Tensor>::new());
    for b0 in (0..n).step_by(per) {
        let m = per.min(n - b0);
        let c = match &cond {
            Condition::Class(t) => Condition::Class(t.narrow(0, b0, m)?),
            Condition::Caption(t) => Condition::Caption(t.narrow(0, b0, m)?),
        };
        let mask = emb_mask.as_ref().map(|t| t.narrow(0, b0, m)).transpose()?;
        let tokens = generate(&model, &c, mask.as_ref(), cfg.block_size, &sc, &mut rng)?;
        token_rows.extend(tokens.to_vec2::<u32>()?);
        let images = vq.decode_code(&tokens, (m, vq_args.codebook_embed_dim, g, g))?;
        decoded.push(images.to_device(&Device::Cpu)?);
        if n > per {
            eprintln!("{} of {n} images", b0 + m);
        }
    }
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
    let images = Tensor::cat(&decoded, 0)?;
    if let Some(p) = &args.npz {
        let (shape, bytes) = images_u8(&images)?;
        write_npz(p, &shape, &bytes)?;
        eprintln!("wrote {} (arr_0: uint8 {shape:?})", p.display());
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
