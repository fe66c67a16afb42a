//! `llamagen serve`: loads a GPT checkpoint, its VQ and (t2i) a T5 encoder as `llamagen sample`
//! does, and runs the HTTP generation server of `llamagen_serve` until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::Args;
use llamagen_encode::VqModel;
use llamagen_serve::engine::{EngineOptions, PromptEncoder, PromptFeatures};
use llamagen_serve::{ServeOptions, serve};
use llamagen_train::ModelType;
use llamagen_train::checkpoint::load_gpt;

use crate::eval_sampling::vq_model_args;
use crate::sample_cmd::{encode_prompts, load_t5, model_config};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// GPT checkpoint: a training checkpoint directory or a weights file with --config (as
    /// `llamagen sample`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Run config (TOML) whose [model] describes the GPT; needed when the checkpoint is a file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ checkpoint (safetensors or the official torch .pt).
    #[arg(long)]
    pub vq: PathBuf,
    /// VQ architecture: vq16, vq8, reduced, or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub vq_args: String,
    /// t2i: T5 encoder directory for prompts (the one the training features were made with).
    #[arg(long)]
    pub t5: Option<PathBuf>,
    /// tokenizer.json of the T5 encoder (default: T5/tokenizer.json).
    #[arg(long)]
    pub t5_tokenizer: Option<PathBuf>,
    /// Only `cpu`: the paged decoder is a CPU float32 kernel (CUDA serving is not implemented).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Address to listen on (port 0: any free port, printed on stderr).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,
    /// Most requests waiting for a slot; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Most images one request may ask for (`n`).
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    /// Most images generated at once (a CFG image is two KV rows); sizes the KV pool.
    #[arg(long, default_value_t = 32)]
    pub max_sequences: usize,
    /// Positions per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub kv_block_size: usize,
    /// Most finished images decoded by the VQ in one call.
    #[arg(long, default_value_t = 16)]
    pub vq_batch: usize,
    /// Worker threads of the HTTP runtime.
    #[arg(long, default_value_t = 2)]
    pub http_threads: usize,
}

struct T5Prompts(llamagen_encode::text_encoder::TextEncoder);

impl PromptEncoder for T5Prompts {
    fn encode(&mut self, prompts: &[String]) -> std::result::Result<Vec<PromptFeatures>, String> {
        // One call for the batch; a refused prompt fails alone (encoded again one by one).
        let labelled: Vec<(String, String)> = prompts
            .iter()
            .map(|p| ("prompt".to_string(), p.clone()))
            .collect();
        match encode_prompts(&self.0, &labelled) {
            Ok(f) => Ok(f.into_iter().map(Ok).collect()),
            Err(_) => Ok(labelled
                .iter()
                .map(|l| {
                    encode_prompts(&self.0, std::slice::from_ref(l))
                        .map(|mut v| v.remove(0))
                        .map_err(|e| format!("{e:#}"))
                })
                .collect()),
        }
    }
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    if args.device != "cpu" {
        bail!(
            "--device {}: llamagen serve runs on the CPU only for now (its paged decoder is a CPU float32 kernel); CUDA serving is not implemented",
            args.device
        );
    }
    let (cfg, weights) = model_config(&args.checkpoint, args.config.as_deref())?;
    let vq_args = vq_model_args(&args.vq_args)?;
    if vq_args.codebook_size != cfg.vocab_size {
        bail!(
            "the VQ codebook has {} codes, the GPT vocabulary {}",
            vq_args.codebook_size,
            cfg.vocab_size
        );
    }
    let vq = VqModel::from_file(&args.vq, &vq_args, &Device::Cpu)
        .with_context(|| format!("loading {}", args.vq.display()))?;
    let model = load_gpt(&weights, &cfg, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", weights.display()))?;
    let prompts: Option<Box<dyn PromptEncoder>> = match (cfg.model_type, &args.t5) {
        (ModelType::T2i, Some(dir)) => Some(Box::new(T5Prompts(load_t5(
            dir,
            args.t5_tokenizer.as_deref(),
            cfg.cls_token_num,
        )?))),
        (ModelType::T2i, None) => {
            eprintln!("warning: a t2i model without --t5: every prompt will be refused");
            None
        }
        (ModelType::C2i, Some(_)) => bail!("--t5 is for t2i models; this is a c2i model"),
        (ModelType::C2i, None) => None,
    };
    eprintln!(
        "serving a {:?} GPT ({} layers, dim {}, {} tokens per image) on the CPU",
        cfg.model_type, cfg.n_layer, cfg.dim, cfg.block_size
    );
    serve(
        model,
        vq,
        vq_args.codebook_embed_dim,
        prompts,
        ServeOptions {
            addr: args.addr,
            engine: EngineOptions {
                max_queue: args.max_queue,
                max_sequences: args.max_sequences,
                kv_block_size: args.kv_block_size,
                vq_batch: args.vq_batch,
            },
            max_images_per_request: args.max_images,
            http_threads: args.http_threads,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
