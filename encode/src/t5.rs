//! The T5 text encoder (as in Hugging Face `T5EncoderModel`), inference only: FLAN-T5-XL
//! (d_model 2048, gated-GELU feed-forward) and any other T5 / T5 v1.1 encoder, loaded from
//! Hugging Face safetensors (one file, or shards listed by `model.safetensors.index.json`).
//!
//! Invariants:
//! - Only `shared.*` and `encoder.*` tensors are read; a full encoder–decoder checkpoint loads
//!   as its encoder. Every tensor the config implies must be present with the implied shape.
//! - Attention is unscaled (T5 folds the scale into its initialisation) and takes one relative
//!   position bias, computed by layer 0 and added in every layer. Relative-position buckets are
//!   computed in float32 exactly as `T5Attention._relative_position_bucket` (bidirectional).
//! - With a padding mask, the outputs at valid positions equal those of the unpadded sequence:
//!   padding keys get the dtype's most negative value, as in `transformers`.
//! - Layer norms are T5's RMS norms (no mean subtraction, no bias), computed in float32.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;

use llamagen_kernels::amx::Split;
use llamagen_kernels::fused;
use llamagen_kernels::linear::InferenceLinear;
use sha2::{Digest, Sha256};

use crate::error::EncodeError;

type Result<T> = std::result::Result<T, EncodeError>;

fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ffn() -> String {
    "relu".into()
}
fn default_buckets() -> usize {
    32
}

/// The encoder part of a Hugging Face T5 `config.json` (other keys are ignored).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
pub struct T5Config {
    /// Vocabulary size (rows of `shared.weight`). FLAN-T5: 32128.
    pub vocab_size: usize,
    /// Hidden size. FLAN-T5-XL: 2048; t5-base: 768.
    pub d_model: usize,
    /// Size of one attention head. FLAN-T5-XL: 64.
    pub d_kv: usize,
    /// Inner size of the feed-forward block. FLAN-T5-XL: 5120.
    pub d_ff: usize,
    /// Number of encoder blocks. FLAN-T5-XL: 24.
    pub num_layers: usize,
    /// Attention heads per block. FLAN-T5-XL: 32.
    pub num_heads: usize,
    /// Relative-position buckets. Default 32.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share the last bucket. Default 128.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Epsilon of the RMS layer norms. Default 1e-6.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Feed-forward kind: `"relu"` (T5 v1.0, the default), `"gated-gelu"` (T5 v1.1, FLAN-T5:
    /// tanh-approximated GELU, as `transformers` maps it), `"gated-silu"`, `"gelu"`, ...
    #[serde(default = "default_ffn")]
    pub feed_forward_proj: String,
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// tanh approximation (`gelu_new`).
    GeluTanh,
    /// exact erf GELU.
    GeluErf,
    Silu,
}

impl T5Config {
    /// Whether the feed-forward block is gated (`wi_0`, `wi_1`) and its activation.
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let s = self.feed_forward_proj.as_str();
        let (gated, act) = match s.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, s),
        };
        let act = match (gated, act) {
            (_, "relu") => Activation::Relu,
            // `transformers` turns "gated-gelu" into gelu_new.
            (true, "gelu") | (_, "gelu_new") => Activation::GeluTanh,
            (false, "gelu") => Activation::GeluErf,
            (_, "silu") => Activation::Silu,
            _ => {
                return Err(EncodeError::InvalidConfig(format!(
                    "unsupported T5 feed_forward_proj {s:?}"
                )));
            }
        };
        Ok((gated, act))
    }

    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| EncodeError::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| EncodeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a T5 config: {e}"),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.d_model == 0 || self.d_kv == 0 || self.num_heads == 0 || self.num_layers == 0 {
            return Err(EncodeError::InvalidConfig(format!(
                "T5 config has a zero size: {self:?}"
            )));
        }
        if self.relative_attention_num_buckets < 4 {
            return Err(EncodeError::InvalidConfig(
                "relative_attention_num_buckets must be at least 4".into(),
            ));
        }
        self.feed_forward().map(|_| ())
    }
}

/// The safetensors file(s) of one model, with their combined content hash.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    /// The files, in index order (one for an unsharded model).
    pub files: Vec<PathBuf>,
    /// Tensor name → index into `files` (from the index json; empty for one file).
    pub weight_map: HashMap<String, usize>,
}

impl WeightFiles {
    /// Resolves `path`: a `.safetensors` file, a `*.safetensors.index.json`, or a directory holding
    /// `model.safetensors` or `model.safetensors.index.json`. Every referenced file must exist.
    pub fn resolve(path: &Path) -> Result<Self> {
        let missing = |p: &Path| EncodeError::MissingFile {
            what: "model weights",
            path: p.to_path_buf(),
        };
        if path.is_dir() {
            let single = path.join("model.safetensors");
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                return Self::from_index(&index);
            }
            if single.is_file() {
                return Ok(Self {
                    files: vec![single],
                    weight_map: HashMap::new(),
                });
            }
            return Err(missing(&single));
        }
        if !path.is_file() {
            return Err(missing(path));
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Self::from_index(path);
        }
        Ok(Self {
            files: vec![path.to_path_buf()],
            weight_map: HashMap::new(),
        })
    }

    fn from_index(index: &Path) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let bytes = std::fs::read(index).map_err(|e| EncodeError::io(index, e))?;
        let idx: Index = serde_json::from_slice(&bytes).map_err(|e| EncodeError::Checkpoint {
            path: index.to_path_buf(),
            reason: format!("not a safetensors index (weight_map): {e}"),
        })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = Vec::new();
        let mut weight_map = HashMap::new();
        for (name, file) in idx.weight_map {
            let p = dir.join(&file);
            let i = match files.iter().position(|f| f == &p) {
                Some(i) => i,
                None => {
                    if !p.is_file() {
                        return Err(EncodeError::MissingFile {
                            what: "model weight shard",
                            path: p,
                        });
                    }
                    files.push(p);
                    files.len() - 1
                }
            };
            weight_map.insert(name, i);
        }
        if files.is_empty() {
            return Err(EncodeError::Checkpoint {
                path: index.to_path_buf(),
                reason: "the index lists no tensors".into(),
            });
        }
        Ok(Self { files, weight_map })
    }

    /// SHA-256 of the weight files: the file's hex digest for one file, else the digest of the
    /// concatenated per-file hex digests (in file order).
    pub fn sha256(&self) -> Result<String> {
        let mut digests = Vec::new();
        for f in &self.files {
            digests.push(sha256_file(f)?);
        }
        if digests.len() == 1 {
            return Ok(digests.pop().expect("one"));
        }
        Ok(hex::encode(Sha256::digest(digests.concat().as_bytes())))
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| EncodeError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| EncodeError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Reads named tensors from [`WeightFiles`], checking shapes and naming the file on error.
struct TensorSource {
    files: Vec<PathBuf>,
    st: candle_core::safetensors::MmapedSafetensors,
    weight_map: HashMap<String, usize>,
    device: Device,
    dtype: DType,
}

impl TensorSource {
    fn open(w: &WeightFiles, device: &Device, dtype: DType) -> Result<Self> {
        // SAFETY: the files are mapped read-only; the model copies every tensor it keeps.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&w.files) }.map_err(
            |e| EncodeError::Checkpoint {
                path: w.files[0].clone(),
                reason: format!("unreadable safetensors: {e}"),
            },
        )?;
        Ok(Self {
            files: w.files.clone(),
            st,
            weight_map: w.weight_map.clone(),
            device: device.clone(),
            dtype,
        })
    }

    fn file_of(&self, name: &str) -> String {
        match self.weight_map.get(name) {
            Some(&i) => self.files[i].display().to_string(),
            None => self
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let view = self.st.get(name).map_err(|_| EncodeError::MissingTensor {
            file: self.file_of(name),
            name: name.to_string(),
            expected: shape.to_vec(),
        })?;
        if view.shape() != shape {
            return Err(EncodeError::TensorShape {
                file: self.file_of(name),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        Ok(self
            .st
            .load(name, &self.device)?
            .to_dtype(self.dtype)?
            .contiguous()?)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<InferenceLinear> {
        Ok(InferenceLinear::new(
            self.get(&format!("{name}.weight"), &[out, inp])?,
            Split::Two,
        )?)
    }
}

struct Attention {
    /// `q`, `k` and `v` as one product: their weights stacked `[3·inner, d_model]`.
    qkv: InferenceLinear,
    o: InferenceLinear,
    heads: usize,
    d_kv: usize,
}

enum FeedForward {
    Plain {
        wi: InferenceLinear,
        wo: InferenceLinear,
    },
    Gated {
        wi_0: InferenceLinear,
        wi_1: InferenceLinear,
        wo: InferenceLinear,
    },
}

struct Block {
    attn_norm: Tensor,
    attn: Attention,
    ff_norm: Tensor,
    ff: FeedForward,
}

/// A loaded T5 encoder.
pub struct T5Encoder {
    config: T5Config,
    act: Activation,
    embed: Embedding,
    /// `[num_buckets, num_heads]`, from block 0.
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
    device: Device,
    dtype: DType,
}

impl T5Encoder {
    /// Loads the encoder of `config` from `weights`, computing in `dtype` (float32 for parity on
    /// CPU; bf16/f16 on GPUs).
    pub fn load(
        config: &T5Config,
        weights: &WeightFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let (gated, act) = config.feed_forward()?;
        let src = TensorSource::open(weights, device, dtype)?;
        let (d, inner, ff) = (config.d_model, config.num_heads * config.d_kv, config.d_ff);
        let embed_name = if src.has("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            "shared.weight"
        };
        let embed = Embedding::new(src.get(embed_name, &[config.vocab_size, d])?, d);
        let relative_bias = src
            .get(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                &[config.relative_attention_num_buckets, config.num_heads],
            )?
            .to_dtype(DType::F32)?;
        let mut blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = format!("{p}.0.SelfAttention");
            let w = |n: &str| src.get(&format!("{a}.{n}.weight"), &[inner, d]);
            let attn = Attention {
                // Float32-level products: T5's scores are unscaled, so an error in q or k grows
                // through the softmax (two-piece AMX products here put the parity fixtures at
                // 1e-4 instead of 5e-5).
                qkv: InferenceLinear::new(
                    Tensor::cat(&[w("q")?, w("k")?, w("v")?], 0)?,
                    Split::Three,
                )?,
                o: src.linear(&format!("{a}.o"), d, inner)?,
                heads: config.num_heads,
                d_kv: config.d_kv,
            };
            let f = format!("{p}.1.DenseReluDense");
            let ffn = if gated {
                FeedForward::Gated {
                    wi_0: src.linear(&format!("{f}.wi_0"), ff, d)?,
                    wi_1: src.linear(&format!("{f}.wi_1"), ff, d)?,
                    wo: src.linear(&format!("{f}.wo"), d, ff)?,
                }
            } else {
                FeedForward::Plain {
                    wi: src.linear(&format!("{f}.wi"), ff, d)?,
                    wo: src.linear(&format!("{f}.wo"), d, ff)?,
                }
            };
            blocks.push(Block {
                attn_norm: src
                    .get(&format!("{p}.0.layer_norm.weight"), &[d])?
                    .to_dtype(DType::F32)?,
                attn,
                ff_norm: src
                    .get(&format!("{p}.1.layer_norm.weight"), &[d])?
                    .to_dtype(DType::F32)?,
                ff: ffn,
            });
        }
        let final_norm = src
            .get("encoder.final_layer_norm.weight", &[d])?
            .to_dtype(DType::F32)?;
        Ok(Self {
            config: config.clone(),
            act,
            embed,
            relative_bias,
            blocks,
            final_norm,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The bucket of each relative position `k − q` (bidirectional, as the T5 encoder).
    pub fn relative_position_bucket(&self, relative: i64) -> usize {
        let nb = self.config.relative_attention_num_buckets / 2;
        let max_distance = self.config.relative_attention_max_distance as f32;
        let mut bucket = if relative > 0 { nb } else { 0 };
        let rel = relative.unsigned_abs() as usize;
        let max_exact = nb / 2;
        if rel < max_exact {
            bucket += rel;
        } else {
            // float32, truncated toward zero, as torch's `.to(torch.long)`.
            let large = (rel as f32 / max_exact as f32).ln()
                / (max_distance / max_exact as f32).ln()
                * (nb - max_exact) as f32;
            let large = max_exact + large as usize;
            bucket += large.min(nb - 1);
        }
        bucket
    }

    /// The position bias `[1, heads, s, s]` (float32) for sequences of length `s`.
    fn position_bias(&self, s: usize) -> Result<Tensor> {
        let mut idx = Vec::with_capacity(s * s);
        for q in 0..s {
            for k in 0..s {
                idx.push(self.relative_position_bucket(k as i64 - q as i64) as u32);
            }
        }
        let idx = Tensor::from_vec(idx, s * s, &self.device)?;
        let bias = self.relative_bias.index_select(&idx, 0)?; // [s*s, heads]
        Ok(bias
            .reshape((s, s, self.config.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let y = candle_nn::ops::rms_norm(&xf, w, self.config.layer_norm_epsilon as f32)?;
        Ok(y.to_dtype(self.dtype)?)
    }

    fn activate(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.act {
            Activation::Relu => x.relu()?,
            Activation::GeluTanh => crate::activation::gelu_tanh_mul(x, None)?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Silu => x.silu()?,
        })
    }

    /// `last_hidden_state` `[b, s, d_model]` (in the compute dtype) for token ids `[b, s]` (u32)
    /// and an optional 0/1 mask `[b, s]` (1 = valid).
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let mut bias = self.position_bias(s)?; // [1, h, s, s] f32
        if let Some(m) = mask {
            // (1 − m) · finfo(dtype).min on the key axis.
            let min = match self.dtype {
                DType::F16 => f64::from(half::f16::MIN),
                DType::BF16 => f64::from(half::bf16::MIN),
                _ => f64::from(f32::MIN),
            };
            let add =
                ((m.to_dtype(DType::F32)?.affine(-1.0, 1.0)?) * min)?.reshape((b, 1, 1, s))?;
            bias = bias.broadcast_add(&add)?;
        }
        let bias = bias.to_dtype(self.dtype)?;
        let mut h = self.embed.forward(input_ids)?;
        let (heads, dkv) = (self.config.num_heads, self.config.d_kv);
        for blk in &self.blocks {
            let x = self.rms(&h, &blk.attn_norm)?;
            let a = &blk.attn;
            let qkv = a.qkv.forward(&x)?;
            let ctx = if fused::is_cpu_f32(&qkv) {
                // One op from the projection to the heads' outputs (unscaled scores, as T5).
                let heads = fused::Heads {
                    heads: a.heads,
                    kv_heads: a.heads,
                    head_dim: a.d_kv,
                };
                fused::attention(&qkv, None, &bias, heads, 1.0)?
            } else {
                let split = |i: usize| -> candle_core::Result<Tensor> {
                    qkv.narrow(2, i * heads * dkv, heads * dkv)?
                        .reshape((b, s, a.heads, a.d_kv))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                let scores = q.matmul(&k.t()?.contiguous()?)?.broadcast_add(&bias)?;
                let probs = if self.dtype == DType::F32 {
                    candle_nn::ops::softmax_last_dim(&scores)?
                } else {
                    candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                        .to_dtype(self.dtype)?
                };
                probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, s, heads * dkv))?
            };
            h = (h + a.o.forward(&ctx)?)?;
            let x = self.rms(&h, &blk.ff_norm)?;
            let y = match &blk.ff {
                FeedForward::Plain { wi, wo } => wo.forward(&self.activate(&wi.forward(&x)?)?)?,
                FeedForward::Gated { wi_0, wi_1, wo } => {
                    let (a, up) = (wi_0.forward(&x)?, wi_1.forward(&x)?);
                    let h = match self.act {
                        Activation::GeluTanh => crate::activation::gelu_tanh_mul(&a, Some(&up))?,
                        _ => (self.activate(&a)? * up)?,
                    };
                    wo.forward(&h)?
                }
            };
            h = (h + y)?;
        }
        self.rms(&h, &self.final_norm)
    }

    /// Encodes one batch of token-id rows of any lengths (right-padded to the longest with a
    /// mask) and returns each row's features at its valid positions, `[len_i, d_model]` float32.
    pub fn encode_rows(&self, rows: &[&[u32]]) -> Result<Vec<Tensor>> {
        let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.is_empty() || s == 0 {
            return Err(EncodeError::InvalidInput(
                "T5 encode needs at least one non-empty token row".into(),
            ));
        }
        let b = rows.len();
        let padded = rows.iter().any(|r| r.len() != s);
        let mut ids = vec![0u32; b * s];
        let mut mask = vec![0f32; b * s];
        for (i, r) in rows.iter().enumerate() {
            ids[i * s..i * s + r.len()].copy_from_slice(r);
            mask[i * s..i * s + r.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, (b, s), &self.device)?;
        let mask = if padded {
            Some(Tensor::from_vec(mask, (b, s), &self.device)?)
        } else {
            None
        };
        let out = self.forward(&ids, mask.as_ref())?.to_dtype(DType::F32)?;
        let mut res = Vec::with_capacity(b);
        for (i, r) in rows.iter().enumerate() {
            res.push(out.get(i)?.narrow(0, 0, r.len())?.contiguous()?);
        }
        Ok(res)
    }
}
