//! Captions to T5 features, as LlamaGen's `T5Embedder.get_text_embeddings`: clean twice, tokenise
//! (at most [`TextEncoderConfig::max_tokens`] tokens including EOS, truncating), encode, and keep
//! the valid tokens only.
//!
//! Invariants:
//! - A caption's features do not depend on which other captions share its batch: batches hold
//!   captions sorted by token count, padded to the longest with an attention mask, and only the
//!   valid rows are returned.
//! - Every caption gets an outcome: features, or a [`CaptionIssue`] saying why not (empty after
//!   cleaning, too long before cleaning). Issues never stop the other captions.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::clean::text_preprocessing;
use crate::error::EncodeError;
use crate::t5::{T5Config, T5Encoder, WeightFiles};

type Result<T> = std::result::Result<T, EncodeError>;

/// How captions become features.
#[derive(Debug, Clone)]
pub struct TextEncoderConfig {
    /// Most tokens per caption, EOS included (LlamaGen: 120).
    pub max_tokens: usize,
    /// Captions longer than this many characters are refused before cleaning (the cleaning
    /// regexes are linear but a megabyte caption is a data error). Default 20,000.
    pub max_chars: usize,
    /// Upper bound of padded tokens (batch rows × longest row) per forward pass. Default 4096.
    pub batch_tokens: usize,
    /// Apply LlamaGen's caption cleaning (clean_caption twice). Default true; without it the
    /// caption is lowercased and stripped, as LlamaGen does with `use_text_preprocessing=False`.
    pub clean: bool,
}

impl Default for TextEncoderConfig {
    fn default() -> Self {
        Self {
            max_tokens: 120,
            max_chars: 20_000,
            batch_tokens: 4096,
            clean: true,
        }
    }
}

/// Why a caption has no features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionIssue {
    /// Nothing left after cleaning (empty, whitespace-only or only removable noise).
    Empty,
    /// More characters than [`TextEncoderConfig::max_chars`].
    TooLong { chars: usize },
}

impl CaptionIssue {
    /// The catalog's `error_kind` for this issue.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty_caption",
            Self::TooLong { .. } => "caption_too_long",
        }
    }
}

impl std::fmt::Display for CaptionIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "caption is empty after cleaning"),
            Self::TooLong { chars } => write!(f, "caption has {chars} characters"),
        }
    }
}

/// One caption's features: `tokens` × `dim` float32, row-major.
#[derive(Debug, Clone)]
pub struct Features {
    pub tokens: usize,
    pub dim: usize,
    pub data: Vec<f32>,
    /// Whether the token ids were cut at `max_tokens`.
    pub truncated: bool,
}

/// Tokenizer + T5 encoder.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    model: T5Encoder,
    config: TextEncoderConfig,
    /// Model identifier recorded in provenance (the model directory name unless set).
    pub model_id: String,
    /// SHA-256 of the weight file(s).
    pub weights_sha256: String,
}

/// Loads `tokenizer.json` with LlamaGen's truncation (max tokens including special tokens).
pub fn load_tokenizer(path: &Path, max_tokens: usize) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(EncodeError::MissingFile {
            what: "tokenizer",
            path: path.to_path_buf(),
        });
    }
    let mut tok = Tokenizer::from_file(path).map_err(|e| EncodeError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    tok.with_truncation(Some(TruncationParams {
        max_length: max_tokens,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|e| EncodeError::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    tok.with_padding(None);
    Ok(tok)
}

/// Where the model files are: `dir/config.json`, weights per [`WeightFiles::resolve`] and
/// `dir/tokenizer.json` unless given.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

impl ModelPaths {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            config: dir.join("config.json"),
            weights: dir.to_path_buf(),
            tokenizer: dir.join("tokenizer.json"),
        }
    }
}

impl TextEncoder {
    /// Loads config, weights and tokenizer; a missing file is an error naming it.
    pub fn load(
        paths: &ModelPaths,
        device: &Device,
        dtype: DType,
        config: TextEncoderConfig,
    ) -> Result<Self> {
        if !paths.config.is_file() {
            return Err(EncodeError::MissingFile {
                what: "T5 config",
                path: paths.config.clone(),
            });
        }
        let cfg = T5Config::from_file(&paths.config)?;
        let tokenizer = load_tokenizer(&paths.tokenizer, config.max_tokens)?;
        let weights = WeightFiles::resolve(&paths.weights)?;
        let weights_sha256 = weights.sha256()?;
        let model = T5Encoder::load(&cfg, &weights, device, dtype)?;
        let model_id = paths
            .config
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "t5".into());
        Ok(Self {
            tokenizer,
            model,
            config,
            model_id,
            weights_sha256,
        })
    }

    pub fn dim(&self) -> usize {
        self.model.config().d_model
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.config
    }

    /// The text fed to the tokenizer for `caption`.
    pub fn preprocess(&self, caption: &str) -> String {
        if self.config.clean {
            text_preprocessing(caption)
        } else {
            caption.trim().to_lowercase()
        }
    }

    /// Token ids (EOS included, truncated) of an already preprocessed caption; None when empty.
    pub fn token_ids(&self, cleaned: &str) -> Result<Option<(Vec<u32>, bool)>> {
        if cleaned.trim().is_empty() {
            return Ok(None);
        }
        let enc = self
            .tokenizer
            .encode(cleaned, true)
            .map_err(|e| EncodeError::Tokenize(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let truncated = !enc.get_overflowing().is_empty();
        Ok(Some((ids, truncated)))
    }

    /// Features (or the reason there are none) for each caption, in input order.
    pub fn encode(
        &self,
        captions: &[&str],
    ) -> Result<Vec<std::result::Result<Features, CaptionIssue>>> {
        let mut out: Vec<Option<std::result::Result<Features, CaptionIssue>>> =
            vec![None; captions.len()];
        let mut rows: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, c) in captions.iter().enumerate() {
            let chars = c.chars().count();
            if chars > self.config.max_chars {
                out[i] = Some(Err(CaptionIssue::TooLong { chars }));
                continue;
            }
            match self.token_ids(&self.preprocess(c))? {
                Some((ids, truncated)) => rows.push((i, ids, truncated)),
                None => out[i] = Some(Err(CaptionIssue::Empty)),
            }
        }
        // Longest first, so every batch pads little.
        rows.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let dim = self.dim();
        let mut start = 0;
        while start < rows.len() {
            let longest = rows[start].1.len();
            let per_batch = (self.config.batch_tokens / longest.max(1)).max(1);
            let end = (start + per_batch).min(rows.len());
            let batch: Vec<&[u32]> = rows[start..end].iter().map(|r| r.1.as_slice()).collect();
            let feats = self.model.encode_rows(&batch)?;
            for (r, f) in rows[start..end].iter().zip(feats) {
                let data = f.flatten_all()?.to_vec1::<f32>()?;
                out[r.0] = Some(Ok(Features {
                    tokens: r.1.len(),
                    dim,
                    data,
                    truncated: r.2,
                }));
            }
            start = end;
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every caption has an outcome"))
            .collect())
    }
}

/// Storage dtype of features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    Bf16,
    F16,
}

impl StoreDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Little-endian bytes of `data` in this dtype.
    pub fn encode(self, data: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() * 2);
        for &v in data {
            let b = match self {
                Self::Bf16 => half::bf16::from_f32(v).to_le_bytes(),
                Self::F16 => half::f16::from_f32(v).to_le_bytes(),
            };
            out.extend_from_slice(&b);
        }
        out
    }

    /// Float32 values of little-endian bytes in this dtype.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(2)
            .map(|b| match self {
                Self::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                Self::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            })
            .collect()
    }
}

/// Left-pads stored features (`tokens` × `dim`) into `max_tokens` × `dim` with the mask LlamaGen's
/// dataset builds (`emb_mask[T − n:] = 1`), as the trainer does at load time.
pub fn left_pad(data: &[f32], tokens: usize, dim: usize, max_tokens: usize) -> (Vec<f32>, Vec<u8>) {
    let n = tokens.min(max_tokens);
    let mut out = vec![0f32; max_tokens * dim];
    let mut mask = vec![0u8; max_tokens];
    out[(max_tokens - n) * dim..].copy_from_slice(&data[..n * dim]);
    mask[max_tokens - n..].iter_mut().for_each(|m| *m = 1);
    (out, mask)
}

/// The device and compute dtype for a run: CPU in float32, or the first CUDA GPU in bf16 (as
/// LlamaGen runs the encoder). CUDA needs the crate's `cuda` feature.
pub fn device_and_dtype(cuda: bool) -> Result<(Device, DType)> {
    if cuda {
        Ok((Device::new_cuda(0)?, DType::BF16))
    } else {
        Ok((Device::Cpu, DType::F32))
    }
}
