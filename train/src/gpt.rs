//! The LlamaGen GPT: a pre-norm Llama-style decoder over image tokens, conditioned on a class
//! label (c2i) or projected caption features (t2i), with 2D RoPE.
//!
//! Invariants enforced here:
//! - Every operation on the training path has a backward pass: a plain, differentiable candle op
//!   (matmul, elementwise, reductions, index_select/gather, cat/narrow), or, for CPU float32
//!   tensors, a fused op of `llamagen_kernels::fused` with its own backward (RMSNorm, the
//!   attention core, `silu(a)·b`, dropout, cross-entropy) that computes the same function.
//!   candle's fused kernels (`ops::rms_norm`, `ops::softmax_last_dim`, `rotary_emb::*`,
//!   `ops::sdpa`) have no backward pass and are not used.
//! - RoPE table row `p` (shape `(cls_token_num + block_size, head_dim/2)`): rows
//!   `0..cls_token_num` are all zero (cos = sin = 0), so q and k are zeroed at every condition
//!   position; image token `t` sits at row `cls_token_num + t` with angles `r*w_k` for the first
//!   `head_dim/4` entries (row `r = t / G`) and `c*w_k` for the next (column `c = t % G`),
//!   `w_k = base^(-2k/(head_dim/2))` computed in f32. Pairs `(2j, 2j+1)` are rotated (interleaved).
//! - Training-style forward returns `logits[:, cls_token_num-1:]` (position `t` predicts image
//!   token `t`); the cached forward used for sampling returns unsliced logits.
//! - Attention masks are "1 = may attend"; without a mask attention is causal.
//! - No biases; `output` is not tied to `tok_embeddings`; logits are f32.
//! - RMSNorm is computed in f32 and cast back before the weight multiply.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};

use llamagen_kernels::fused;
use llamagen_kernels::linear::Linear;
use rand::Rng;
use rand::rngs::StdRng;

use crate::config::{GptConfig, ModelType, UNCOND_CAPTION_TOKENS, UNCOND_KEY};
use crate::error::{Result, TrainError};

/// Large negative bias used for masked attention scores. `exp` of it (after the row max is
/// subtracted) is exactly 0 in f32, and, unlike -inf, it never produces NaN in gradients.
const MASKED_SCORE: f64 = -1e30;

/// The condition of a batch.
#[derive(Debug, Clone)]
pub enum Condition {
    /// Class labels `(B,)`, any integer dtype; `num_classes` selects the null class.
    Class(Tensor),
    /// Caption features `(B, T, caption_dim)` (left-padded, padding rows zero), `T >= cls_token_num`.
    Caption(Tensor),
}

impl Condition {
    /// Batch size of the condition.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(match self {
            Condition::Class(t) | Condition::Caption(t) => t.dim(0)?,
        })
    }
}

/// Intermediate tensors of one training-style forward, for parity checks.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// Input of layer 0: concat(condition embedding, token embeddings), `(B, L, dim)`.
    pub h_embed: Option<Tensor>,
    /// Output of each block, `(B, L, dim)`.
    pub h_layers: Vec<Tensor>,
    /// Output of the final RMSNorm, `(B, L, dim)`.
    pub h_final_norm: Option<Tensor>,
    /// Queries after RoPE of each layer, `(B, L, n_head, head_dim)`.
    pub q_rope: Vec<Tensor>,
    /// Keys after RoPE of each layer, `(B, L, n_kv_head, head_dim)`.
    pub k_rope: Vec<Tensor>,
}

/// The RoPE table, `(rows, head_dim/2)` cos and sin, rows as described at the top of the module.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// cos of the angles, f32.
    pub cos: Tensor,
    /// sin of the angles, f32.
    pub sin: Tensor,
}

impl RopeTable {
    /// Builds the table for `cfg` on `device`.
    pub fn new(cfg: &GptConfig, device: &Device) -> Result<Self> {
        let hd = cfg.head_dim();
        let half = hd / 2;
        let n = half / 2;
        let g = cfg.grid_size();
        let base = cfg.rope_base as f32;
        let freqs: Vec<f32> = (0..n)
            .map(|k| 1.0f32 / base.powf((2 * k) as f32 / half as f32))
            .collect();
        let rows = cfg.cls_token_num + cfg.block_size;
        let mut cos = vec![0f32; rows * half];
        let mut sin = vec![0f32; rows * half];
        for t in 0..cfg.block_size {
            let (r, c) = ((t / g) as f32, (t % g) as f32);
            let row = (cfg.cls_token_num + t) * half;
            for k in 0..n {
                let (a_r, a_c) = (r * freqs[k], c * freqs[k]);
                cos[row + k] = a_r.cos();
                sin[row + k] = a_r.sin();
                cos[row + n + k] = a_c.cos();
                sin[row + n + k] = a_c.sin();
            }
        }
        Ok(RopeTable {
            cos: Tensor::from_vec(cos, (rows, half), device)?,
            sin: Tensor::from_vec(sin, (rows, half), device)?,
        })
    }

    /// Number of rows (positions).
    pub fn rows(&self) -> Result<usize> {
        Ok(self.cos.dim(0)?)
    }

    /// Rows `start..start+len` as `(cos, sin)`.
    fn slice(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let rows = self.rows()?;
        if start + len > rows {
            return Err(TrainError::InvalidInput(format!(
                "positions {start}..{} exceed the RoPE table ({rows} rows = cls_token_num + block_size)",
                start + len
            )));
        }
        Ok((
            self.cos.narrow(0, start, len)?,
            self.sin.narrow(0, start, len)?,
        ))
    }
}

/// Applies interleaved RoPE to `x` `(B, L, H, D)` with `cos`/`sin` `(L, D/2)`, in f32.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, l, h, d) = x.dims4()?;
    let dtype = x.dtype();
    let xs = x.to_dtype(DType::F32)?.reshape((b, l, h, d / 2, 2))?;
    let x0 = xs.narrow(4, 0, 1)?;
    let x1 = xs.narrow(4, 1, 1)?;
    let c = cos.reshape((1, l, 1, d / 2, 1))?;
    let s = sin.reshape((1, l, 1, d / 2, 1))?;
    let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
    let o1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
    Ok(Tensor::cat(&[o0, o1], 4)?
        .reshape((b, l, h, d))?
        .to_dtype(dtype)?)
}

/// RMSNorm: `x * rsqrt(mean(x^2) + eps)` in f32, cast back, times `weight`. One fused op with
/// its own backward on the CPU in f32 (`llamagen_kernels::fused`), plain ops elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::is_cpu_f32(x) && fused::is_cpu_f32(weight) {
        return Ok(fused::rms_norm(x, weight, eps)?);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = xf
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    Ok(xf
        .broadcast_mul(&inv)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?)
}

/// Softmax over the last dimension with plain ops (the row max is a constant shift).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension with plain ops.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(diff.broadcast_sub(&lse)?)
}

/// Randomness of a training forward: dropout masks and label/caption dropout are drawn from
/// this generator on the host, so a seeded run is reproducible on every device.
pub struct Dropout<'a> {
    rng: &'a mut StdRng,
}

impl<'a> Dropout<'a> {
    /// Training-mode randomness from `rng`.
    pub fn new(rng: &'a mut StdRng) -> Self {
        Dropout { rng }
    }

    /// Inverted dropout of `x` with probability `p` (no-op for `p == 0`).
    fn apply(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let scale = (1.0 / (1.0 - p)) as f32;
        // One u32 per element, dropped below p·2³².
        let below = (p * 4294967296.0) as u64;
        let mut draws = vec![0u32; n];
        self.rng.fill(&mut draws[..]);
        let mask: Vec<f32> = draws
            .iter()
            .map(|&r| if (r as u64) < below { 0.0 } else { scale })
            .collect();
        if fused::is_cpu_f32(x) {
            return Ok(fused::mul_constant(x, mask)?);
        }
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok(x.mul(&mask)?)
    }

    /// `B` independent draws `rand < p`.
    fn drops(&mut self, b: usize, p: f64) -> Vec<bool> {
        (0..b).map(|_| self.rng.random::<f64>() < p).collect()
    }
}

fn linear(vb: &VarBuilder, name: &str, out_dim: usize, in_dim: usize, std: f64) -> Result<Linear> {
    let w = vb.pp(name).get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    Ok(Linear::new(w))
}

fn norm_weight(vb: &VarBuilder, name: &str, dim: usize) -> Result<Tensor> {
    Ok(vb
        .pp(name)
        .get_with_hints(dim, "weight", Init::Const(1.0))?)
}

/// Converts a "1 = may attend" mask `(B|1, 1, Lq, Lk)` of any dtype to an additive f32 bias.
pub fn mask_to_bias(mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.ne(0f64)?.to_dtype(DType::F32)?;
    Ok(m.affine(-MASKED_SCORE, MASKED_SCORE)?)
}

/// The t2i attention mask of §1.5 for left-padded captions: `emb_mask` `(B, T)` (1 = real
/// caption token) and total length `seq_len >= T`. Causal, caption columns `j < T` with
/// `emb_mask[b, j] == 0` blocked for every row, then the diagonal set to 1 (so a padding row
/// attends only to itself). Returns u8 `(B, 1, seq_len, seq_len)`, 1 = may attend.
pub fn caption_attention_mask(emb_mask: &Tensor, seq_len: usize) -> Result<Tensor> {
    let (b, t) = emb_mask.dims2()?;
    if seq_len < t {
        return Err(TrainError::InvalidInput(format!(
            "sequence length {seq_len} is shorter than the caption ({t})"
        )));
    }
    let m = emb_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = vec![0u8; b * seq_len * seq_len];
    for (bi, row_mask) in m.iter().enumerate() {
        let base = bi * seq_len * seq_len;
        for i in 0..seq_len {
            for j in 0..=i {
                let allowed = i == j || j >= t || row_mask[j] != 0.0;
                out[base + i * seq_len + j] = u8::from(allowed);
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (b, 1, seq_len, seq_len),
        emb_mask.device(),
    )?)
}

/// Additive causal bias for queries at positions `q0..q0+lq` over keys `0..lk`, `(1,1,lq,lk)`.
fn causal_bias(q0: usize, lq: usize, lk: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..lq)
        .flat_map(|i| {
            (0..lk).map(move |j| {
                if j <= q0 + i {
                    0.0
                } else {
                    MASKED_SCORE as f32
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, lq, lk), device)?)
}

/// Per-layer key/value cache for incremental decoding.
///
/// Each layer's keys and values live in one preallocated `(B, H_kv, capacity, head_dim)`
/// buffer; a step writes its positions in place and attends to a view of the first `len`
/// positions, so a step costs no copy of the cache. The buffers grow (doubling, one copy) only
/// when more positions arrive than were reserved. A cache is not `Clone`: two owners of the same
/// buffers would overwrite each other's positions.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions reserved when a layer's buffers are first allocated.
    reserve: usize,
}

/// One layer's buffers and the number of valid positions in them.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Appends `k`, `v` `(B, H_kv, L, D)` and returns views of all cached positions.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        reserve: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, hkv, l, d) = k.dims4()?;
        if let Some(c) = slot.as_ref() {
            if (c.k.dim(0)?, c.k.dim(1)?, c.k.dim(3)?) != (b, hkv, d) {
                return Err(TrainError::InvalidInput(format!(
                    "KV cache holds batch {} × {} heads × {}, the step brings {b} × {hkv} × {d}",
                    c.k.dim(0)?,
                    c.k.dim(1)?,
                    c.k.dim(3)?
                )));
            }
        }
        let len = slot.as_ref().map_or(0, |c| c.len);
        let cap = slot.as_ref().map_or(0, |c| c.k.dims()[2]);
        if len + l > cap {
            let new_cap = (len + l).max(reserve).max(2 * cap);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((b, hkv, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| len > 0) {
                    t.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(t)
            };
            let (nk, nv) = (
                grow(slot.as_ref().map(|c| &c.k))?,
                grow(slot.as_ref().map(|c| &c.v))?,
            );
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k.contiguous()?, 2, len)?;
        c.v.slice_set(&v.contiguous()?, 2, len)?;
        c.len = len + l;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

impl KvCache {
    /// An empty cache for `n_layer` layers.
    pub fn new(n_layer: usize) -> Self {
        Self::with_capacity(n_layer, 0)
    }

    /// An empty cache for `n_layer` layers that reserves `positions` positions per layer.
    pub fn with_capacity(n_layer: usize, positions: usize) -> Self {
        KvCache {
            layers: (0..n_layer).map(|_| None).collect(),
            reserve: positions,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> Result<usize> {
        Ok(self
            .layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.len))
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

struct Attention {
    wqkv: Linear,
    wo: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

struct AttnCtx<'c> {
    cos: &'c Tensor,
    sin: &'c Tensor,
    bias: Option<&'c Tensor>,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        ctx: &AttnCtx,
        cache: Option<(&mut Option<LayerKv>, usize)>,
        trace: Option<&mut Trace>,
        dropout: &mut Option<Dropout>,
        cfg: &GptConfig,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, hkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let qkv = self.wqkv.forward(x)?;
        // A training (or uncached) forward on the CPU in f32: one fused op from the projection
        // to the heads' outputs, with its own backward (attention dropout needs the plain ops).
        let no_attn_dropout = dropout.is_none() || cfg.attn_dropout_p <= 0.0;
        if let (None, None, Some(bias), true) = (&cache, &trace, ctx.bias, no_attn_dropout)
            && fused::is_cpu_f32(&qkv)
        {
            let heads = fused::Heads {
                heads: h,
                kv_heads: hkv,
                head_dim: hd,
            };
            let rope = fused::Rope {
                cos: ctx.cos,
                sin: ctx.sin,
            };
            let scale = 1.0 / (hd as f64).sqrt();
            let y = fused::attention(&qkv, Some(rope), bias, heads, scale)?;
            let mut y = self.wo.forward(&y)?;
            if let Some(d) = dropout.as_mut() {
                y = d.apply(&y, cfg.resid_dropout_p)?;
            }
            return Ok(y);
        }
        let q = qkv.narrow(2, 0, h * hd)?.reshape((b, l, h, hd))?;
        let k = qkv.narrow(2, h * hd, hkv * hd)?.reshape((b, l, hkv, hd))?;
        let v = qkv
            .narrow(2, (h + hkv) * hd, hkv * hd)?
            .reshape((b, l, hkv, hd))?;
        let q = apply_rope(&q, ctx.cos, ctx.sin)?;
        let k = apply_rope(&k, ctx.cos, ctx.sin)?;
        if let Some(t) = trace {
            t.q_rope.push(q.clone());
            t.k_rope.push(k.clone());
        }
        let q = q.transpose(1, 2)?.contiguous()?;
        let mut k = k.transpose(1, 2)?.contiguous()?;
        let mut v = v.transpose(1, 2)?.contiguous()?;
        if let Some((slot, reserve)) = cache {
            (k, v) = LayerKv::append(slot, &k, &v, reserve)?;
        }
        if hkv != h {
            let r = h / hkv;
            let lk = k.dim(2)?;
            k = k
                .unsqueeze(2)?
                .broadcast_as((b, hkv, r, lk, hd))?
                .reshape((b, h, lk, hd))?;
            v = v
                .unsqueeze(2)?
                .broadcast_as((b, hkv, r, lk, hd))?
                .reshape((b, h, lk, hd))?;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?;
        let scores = match ctx.bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let mut probs = softmax_last(&scores)?.to_dtype(v.dtype())?;
        if let Some(d) = dropout.as_mut() {
            probs = d.apply(&probs, cfg.attn_dropout_p)?;
        }
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h * hd))?;
        let mut y = self.wo.forward(&y)?;
        if let Some(d) = dropout.as_mut() {
            y = d.apply(&y, cfg.resid_dropout_p)?;
        }
        Ok(y)
    }
}

struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.w1.forward(x)?, self.w3.forward(x)?);
        let h = if fused::is_cpu_f32(&gate) {
            fused::silu_mul(&gate, &up)?
        } else {
            (gate.silu()? * up)?
        };
        Ok(self.w2.forward(&h)?)
    }
}

struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm: Tensor,
    ffn_norm: Tensor,
}

/// The condition embedding (`cls_embedding.*`).
enum CondEmbedding {
    /// `embedding_table.weight` `(class_table_rows, dim)`.
    Class(Tensor),
    /// `cap_proj.fc1`, `cap_proj.fc2` and the `uncond_embedding` buffer `(120, caption_dim)`.
    Caption {
        fc1: Linear,
        fc2: Linear,
        uncond: Tensor,
    },
}

/// The LlamaGen GPT.
pub struct Gpt {
    cfg: GptConfig,
    cls_embedding: CondEmbedding,
    tok_embeddings: Embedding,
    layers: Vec<Block>,
    norm: Tensor,
    output: Linear,
    rope: RopeTable,
    device: Device,
    dtype: DType,
}

fn to_u32_ids(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::U32)?)
}

impl Gpt {
    /// Builds the model from `vb`, whose paths are the official state-dict keys. With a
    /// `VarBuilder::from_varmap` this creates fresh parameters initialised like the official
    /// code (normal(0, initializer_range) linears and embeddings, ones for norms, zeros for
    /// `output`, randn/sqrt(caption_dim) for the null caption); with a tensor-backed builder it
    /// loads them.
    pub fn load(vb: VarBuilder, cfg: &GptConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.dim;
        let std = cfg.initializer_range;
        let randn = Init::Randn {
            mean: 0.0,
            stdev: std,
        };
        let cvb = vb.pp("cls_embedding");
        let cls_embedding = match cfg.model_type {
            ModelType::C2i => CondEmbedding::Class(cvb.pp("embedding_table").get_with_hints(
                (cfg.class_table_rows(), d),
                "weight",
                randn,
            )?),
            ModelType::T2i => {
                let uncond = cvb.get_with_hints(
                    (UNCOND_CAPTION_TOKENS, cfg.caption_dim),
                    UNCOND_KEY.trim_start_matches("cls_embedding."),
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0 / (cfg.caption_dim as f64).sqrt(),
                    },
                )?;
                let pvb = cvb.pp("cap_proj");
                CondEmbedding::Caption {
                    fc1: linear(&pvb, "fc1", d, cfg.caption_dim, std)?,
                    fc2: linear(&pvb, "fc2", d, d, std)?,
                    uncond,
                }
            }
        };
        let tok = vb
            .pp("tok_embeddings")
            .get_with_hints((cfg.vocab_size, d), "weight", randn)?;
        let tok_embeddings = Embedding::new(tok, d);
        let h = cfg.ffn_hidden();
        let hd = cfg.head_dim();
        let qkv = (cfg.n_head + 2 * cfg.n_kv_head()) * hd;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let lvb = vb.pp("layers").pp(i);
            let avb = lvb.pp("attention");
            let fvb = lvb.pp("feed_forward");
            layers.push(Block {
                attention: Attention {
                    wqkv: linear(&avb, "wqkv", qkv, d, std)?,
                    wo: linear(&avb, "wo", d, d, std)?,
                    n_head: cfg.n_head,
                    n_kv_head: cfg.n_kv_head(),
                    head_dim: hd,
                },
                feed_forward: FeedForward {
                    w1: linear(&fvb, "w1", h, d, std)?,
                    w2: linear(&fvb, "w2", d, h, std)?,
                    w3: linear(&fvb, "w3", h, d, std)?,
                },
                attention_norm: norm_weight(&lvb, "attention_norm", d)?,
                ffn_norm: norm_weight(&lvb, "ffn_norm", d)?,
            });
        }
        let norm = norm_weight(&vb, "norm", d)?;
        let output = Linear::new(vb.pp("output").get_with_hints(
            (cfg.vocab_size, d),
            "weight",
            Init::Const(0.0),
        )?);
        let device = vb.device().clone();
        Ok(Gpt {
            cfg: cfg.clone(),
            cls_embedding,
            tok_embeddings,
            layers,
            norm,
            output,
            rope: RopeTable::new(cfg, &device)?,
            device,
            dtype: vb.dtype(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The RoPE table.
    pub fn rope(&self) -> &RopeTable {
        &self.rope
    }

    /// The state dict: official key names and tensors, in official order.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        match &self.cls_embedding {
            CondEmbedding::Class(t) => {
                out.push(("cls_embedding.embedding_table.weight".into(), t.clone()))
            }
            CondEmbedding::Caption { fc1, fc2, uncond } => {
                out.push((UNCOND_KEY.into(), uncond.clone()));
                out.push((
                    "cls_embedding.cap_proj.fc1.weight".into(),
                    fc1.weight().clone(),
                ));
                out.push((
                    "cls_embedding.cap_proj.fc2.weight".into(),
                    fc2.weight().clone(),
                ));
            }
        }
        out.push((
            "tok_embeddings.weight".into(),
            self.tok_embeddings.embeddings().clone(),
        ));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("layers.{i}.");
            out.push((
                format!("{p}attention.wqkv.weight"),
                l.attention.wqkv.weight().clone(),
            ));
            out.push((
                format!("{p}attention.wo.weight"),
                l.attention.wo.weight().clone(),
            ));
            out.push((
                format!("{p}feed_forward.w1.weight"),
                l.feed_forward.w1.weight().clone(),
            ));
            out.push((
                format!("{p}feed_forward.w3.weight"),
                l.feed_forward.w3.weight().clone(),
            ));
            out.push((
                format!("{p}feed_forward.w2.weight"),
                l.feed_forward.w2.weight().clone(),
            ));
            out.push((
                format!("{p}attention_norm.weight"),
                l.attention_norm.clone(),
            ));
            out.push((format!("{p}ffn_norm.weight"), l.ffn_norm.clone()));
        }
        out.push(("norm.weight".into(), self.norm.clone()));
        out.push(("output.weight".into(), self.output.weight().clone()));
        out
    }

    /// The t2i null-caption buffer `(120, caption_dim)` (None for c2i).
    pub fn uncond_embedding(&self) -> Option<&Tensor> {
        match &self.cls_embedding {
            CondEmbedding::Caption { uncond, .. } => Some(uncond),
            CondEmbedding::Class(_) => None,
        }
    }

    /// Condition embeddings `(B, cls_token_num, dim)`. With `dropout`, labels are replaced by
    /// the null class and captions by the null caption with probability `class_dropout_prob`.
    pub fn embed_condition(
        &self,
        cond: &Condition,
        dropout: &mut Option<Dropout>,
    ) -> Result<Tensor> {
        let p = self.cfg.class_dropout_prob;
        let emb = match (&self.cls_embedding, cond) {
            (CondEmbedding::Class(table), Condition::Class(labels)) => {
                let b = labels.dim(0)?;
                let mut labels = to_u32_ids(labels)?;
                if let (Some(d), true) = (dropout.as_mut(), p > 0.0) {
                    let drops = d.drops(b, p);
                    let mut v = labels.to_vec1::<u32>()?;
                    for (l, dr) in v.iter_mut().zip(drops) {
                        if dr {
                            *l = self.cfg.num_classes as u32;
                        }
                    }
                    labels = Tensor::from_vec(v, b, &self.device)?;
                }
                let rows = table.dim(0)? as u32;
                if let Some(bad) = labels.to_vec1::<u32>()?.into_iter().find(|&l| l >= rows) {
                    return Err(TrainError::InvalidInput(format!(
                        "class label {bad} out of range (table has {rows} rows)"
                    )));
                }
                table.index_select(&labels, 0)?.unsqueeze(1)?
            }
            (CondEmbedding::Caption { fc1, fc2, uncond }, Condition::Caption(caption)) => {
                let (b, t, c) = caption.dims3()?;
                if c != self.cfg.caption_dim || t < self.cfg.cls_token_num {
                    return Err(TrainError::InvalidInput(format!(
                        "caption shape {:?}: need (B, T >= {}, {})",
                        caption.dims(),
                        self.cfg.cls_token_num,
                        self.cfg.caption_dim
                    )));
                }
                let mut caption = caption.to_dtype(self.dtype)?;
                if let (Some(d), true) = (dropout.as_mut(), p > 0.0) {
                    let drops = d.drops(b, p);
                    if drops.iter().any(|&x| x) {
                        if t != UNCOND_CAPTION_TOKENS {
                            return Err(TrainError::InvalidInput(format!(
                                "caption dropout replaces the caption by the {UNCOND_CAPTION_TOKENS}-token null caption; captions have {t} tokens"
                            )));
                        }
                        let sel: Vec<u8> = drops.iter().map(|&x| u8::from(x)).collect();
                        let sel = Tensor::from_vec(sel, (b, 1, 1), &self.device)?
                            .broadcast_as((b, t, c))?;
                        let un = uncond.unsqueeze(0)?.broadcast_as((b, t, c))?;
                        caption = sel.where_cond(&un, &caption)?;
                    }
                }
                let x = fc1.forward(&caption)?.gelu()?;
                fc2.forward(&x)?.narrow(1, 0, self.cfg.cls_token_num)?
            }
            _ => {
                return Err(TrainError::InvalidInput(format!(
                    "a {:?} model needs a {} condition",
                    self.cfg.model_type,
                    match self.cfg.model_type {
                        ModelType::C2i => "class",
                        ModelType::T2i => "caption",
                    }
                )));
            }
        };
        Ok(emb)
    }

    /// Token embeddings `(B, L, dim)` of image token ids `(B, L)`.
    pub fn embed_tokens(&self, idx: &Tensor) -> Result<Tensor> {
        let ids = to_u32_ids(idx)?;
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&t| t >= vocab)
        {
            return Err(TrainError::InvalidInput(format!(
                "image token {bad} out of range (vocab_size {vocab})"
            )));
        }
        Ok(self.tok_embeddings.forward(&ids)?)
    }

    fn run_blocks(
        &self,
        mut h: Tensor,
        ctx: &AttnCtx,
        mut cache: Option<&mut KvCache>,
        mut trace: Option<&mut Trace>,
        dropout: &mut Option<Dropout>,
    ) -> Result<Tensor> {
        let eps = self.cfg.norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| (&mut c.layers[i], c.reserve));
            let a = layer.attention.forward(
                &rms_norm(&h, &layer.attention_norm, eps)?,
                ctx,
                slot,
                trace.as_deref_mut(),
                dropout,
                &self.cfg,
            )?;
            h = (h + a)?;
            let mut f = layer
                .feed_forward
                .forward(&rms_norm(&h, &layer.ffn_norm, eps)?)?;
            if let Some(d) = dropout.as_mut() {
                f = d.apply(&f, self.cfg.ffn_dropout_p)?;
            }
            h = (h + f)?;
            if let Some(t) = trace.as_deref_mut() {
                t.h_layers.push(h.clone());
            }
        }
        let h = rms_norm(&h, &self.norm, eps)?;
        if let Some(t) = trace {
            t.h_final_norm = Some(h.clone());
        }
        Ok(self.output.forward(&h)?.to_dtype(DType::F32)?)
    }

    /// Training-style forward: `idx` `(B, L)` image tokens (normally `z[:, :-1]`), the
    /// condition, and an optional "1 = may attend" mask `(B|1, 1, S, S)` with
    /// `S = cls_token_num + L` (causal when None). With `dropout` the configured dropouts and
    /// label/caption dropout are applied. Returns f32 logits `(B, L + 1, vocab)`, i.e. the full
    /// logits sliced at `cls_token_num - 1`.
    pub fn forward(
        &self,
        idx: &Tensor,
        cond: &Condition,
        mask: Option<&Tensor>,
        dropout: Option<Dropout>,
    ) -> Result<Tensor> {
        self.forward_impl(idx, cond, mask, dropout, None)
    }

    /// [`Gpt::forward`] without dropout that also returns the intermediate tensors.
    pub fn forward_traced(
        &self,
        idx: &Tensor,
        cond: &Condition,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Trace)> {
        let mut trace = Trace::default();
        let logits = self.forward_impl(idx, cond, mask, None, Some(&mut trace))?;
        Ok((logits, trace))
    }

    fn forward_impl(
        &self,
        idx: &Tensor,
        cond: &Condition,
        mask: Option<&Tensor>,
        dropout: Option<Dropout>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let mut dropout = dropout;
        let (b, _) = idx.dims2()?;
        if cond.batch_size()? != b {
            return Err(TrainError::InvalidInput(format!(
                "condition batch {} != token batch {b}",
                cond.batch_size()?
            )));
        }
        let c = self.embed_condition(cond, &mut dropout)?;
        let t = self.embed_tokens(idx)?;
        let mut h = Tensor::cat(&[&c, &t], 1)?;
        if let Some(d) = dropout.as_mut() {
            h = d.apply(&h, self.cfg.token_dropout_p)?;
        }
        let s = h.dim(1)?;
        if let Some(tr) = trace.as_deref_mut() {
            tr.h_embed = Some(h.clone());
        }
        let (cos, sin) = self.rope.slice(0, s)?;
        let bias = match mask {
            Some(m) => {
                let dims = m.dims();
                if dims.len() != 4 || dims[2] != s || dims[3] != s || (dims[0] != b && dims[0] != 1)
                {
                    return Err(TrainError::InvalidInput(format!(
                        "attention mask shape {dims:?}, expected ({b}|1, 1, {s}, {s})"
                    )));
                }
                mask_to_bias(m)?
            }
            None => causal_bias(0, s, s, &self.device)?,
        };
        let ctx = AttnCtx {
            cos: &cos,
            sin: &sin,
            bias: Some(&bias),
        };
        let logits = self.run_blocks(h, &ctx, None, trace, &mut dropout)?;
        Ok(logits.narrow(
            1,
            self.cfg.cls_token_num - 1,
            s - self.cfg.cls_token_num + 1,
        )?)
    }

    /// Cached (inference) forward of embeddings `x` `(B, L, dim)` at positions
    /// `cache.len()..cache.len()+L`, appending their keys and values to `cache`. `mask` is a
    /// "1 = may attend" mask `(B|1, 1, L, cache.len()+L)`; None means causal. Returns unsliced
    /// f32 logits `(B, L, vocab)`.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut KvCache,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::with_capacity(self.layers.len(), cache.reserve);
        }
        let start = cache.len()?;
        let l = x.dim(1)?;
        let (cos, sin) = self.rope.slice(start, l)?;
        let bias = match mask {
            Some(m) => Some(mask_to_bias(m)?),
            None if l > 1 => Some(causal_bias(start, l, start + l, &self.device)?),
            None => None,
        };
        let ctx = AttnCtx {
            cos: &cos,
            sin: &sin,
            bias: bias.as_ref(),
        };
        self.run_blocks(x.to_dtype(self.dtype)?, &ctx, Some(cache), None, &mut None)
    }
}

/// Per-token cross-entropy `(B*L,)` of f32 logits `(B, L, V)` against targets `(B, L)`.
pub fn cross_entropy_per_token(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, l, v) = logits.dims3()?;
    let (tb, tl) = targets.dims2()?;
    if (b, l) != (tb, tl) {
        return Err(TrainError::InvalidInput(format!(
            "logits {:?} do not match targets {:?}",
            logits.dims(),
            targets.dims()
        )));
    }
    if fused::is_cpu_f32(logits) {
        let t = targets.to_dtype(DType::U32)?.reshape(b * l)?;
        return Ok(fused::cross_entropy(&logits.reshape((b * l, v))?, &t)?);
    }
    let lp = log_softmax_last(&logits.reshape((b * l, v))?)?;
    let t = targets.to_dtype(DType::U32)?.reshape((b * l, 1))?;
    Ok(lp.gather(&t, 1)?.squeeze(1)?.neg()?)
}

/// The training loss: mean cross-entropy over all `B*L` targets, or with `valid` `(B,)`:
/// `sum(CE * valid_tok) / max(sum(valid_tok), 1)` where `valid_tok` repeats `valid[b]` over the
/// tokens of sample `b`.
pub fn loss(logits: &Tensor, targets: &Tensor, valid: Option<&Tensor>) -> Result<Tensor> {
    let ce = cross_entropy_per_token(logits, targets)?;
    match valid {
        None => Ok(ce.mean_all()?),
        Some(valid) => {
            let (b, l) = targets.dims2()?;
            let vv = valid.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            if vv.len() != b {
                return Err(TrainError::InvalidInput(format!(
                    "valid has {} entries for a batch of {b}",
                    vv.len()
                )));
            }
            let tok: Vec<f32> = vv.iter().flat_map(|&x| std::iter::repeat_n(x, l)).collect();
            let denom = tok.iter().sum::<f32>().max(1.0);
            let w = Tensor::from_vec(tok, b * l, ce.device())?;
            Ok((ce * w)?.sum_all()?.affine(1.0 / denom as f64, 0.0)?)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paged decoding for continuous batching.
//
// Invariants enforced here (by `KvBlockPool`, `PagedSeq` and `PagedDecoder`):
// - Keys and values live in one pool preallocated at start: `n_blocks` blocks of `block_size`
//   positions, each holding every layer's keys and values of its positions. A sequence owns a
//   list of blocks (its block table) taken from the pool's free list when it is admitted, enough
//   for its whole length, and gives them back when it finishes or is cancelled; blocks of
//   sequences at different progress interleave freely in the pool, so finished sequences leave
//   no holes that a new one cannot use.
// - A row's result never depends on the other rows of a forward: every linear product runs in
//   chunks of at most `DECODE_CHUNK` rows (the matrix multiply's per-row dot-product path, whose
//   summation order is the same for every row whatever the chunk), and normalisation, RoPE and
//   attention are computed row by row. So a sequence decoded alone, in an offline batch or among
//   any other sequences of a server gives bit-identical logits.
// - Positions follow `Gpt::forward_cached`: a sequence's `len` is the number of positions cached;
//   an item fed to it sits at position `len` (then `len + 1`, … for several items of the same
//   sequence in one forward) and attends causally to positions `0..=p` of its own sequence, minus
//   the caption positions its mask blocks (always keeping itself), as `caption_attention_mask`.
// - CPU float32 only: `Gpt::paged_decoder` refuses other devices and dtypes.
// ---------------------------------------------------------------------------------------------

/// Rows per linear product in [`PagedDecoder`] (see the invariants above).
pub const DECODE_CHUNK: usize = 4;

/// A pool of fixed-size KV blocks shared by every sequence of a [`PagedDecoder`].
#[derive(Debug)]
pub struct KvBlockPool {
    block_size: usize,
    n_layer: usize,
    /// Floats of one position of one layer: `n_kv_head * head_dim`.
    row: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    free: Vec<u32>,
    n_blocks: usize,
}

/// The KV state of one sequence (one row of a CFG pair): its blocks, cached positions, and the
/// caption positions it may not attend to.
#[derive(Debug, Default)]
pub struct PagedSeq {
    blocks: Vec<u32>,
    len: usize,
    /// `blocked[j]`: caption position `j` is padding (t2i left-padded captions).
    blocked: Vec<bool>,
}

impl PagedSeq {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this sequence has blocks for.
    pub fn capacity(&self, pool: &KvBlockPool) -> usize {
        self.blocks.len() * pool.block_size
    }
}

impl KvBlockPool {
    /// A pool of `n_blocks` blocks of `block_size` positions for the model `cfg`, allocated now.
    pub fn new(cfg: &GptConfig, block_size: usize, n_blocks: usize) -> Result<Self> {
        if block_size == 0 || n_blocks == 0 {
            return Err(TrainError::InvalidInput(
                "a KV block pool needs block_size >= 1 and n_blocks >= 1".into(),
            ));
        }
        let row = cfg.n_kv_head() * cfg.head_dim();
        let floats = n_blocks * cfg.n_layer * block_size * row;
        Ok(KvBlockPool {
            block_size,
            n_layer: cfg.n_layer,
            row,
            k: vec![0f32; floats],
            v: vec![0f32; floats],
            free: (0..n_blocks as u32).rev().collect(),
            n_blocks,
        })
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `positions` positions needs.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// A new sequence with blocks for `positions` positions, or None when the pool has too few
    /// free blocks. `blocked` marks caption positions it may not attend to (t2i padding).
    pub fn allocate(&mut self, positions: usize, blocked: Vec<bool>) -> Option<PagedSeq> {
        let n = self.blocks_for(positions);
        if n > self.free.len() {
            return None;
        }
        let blocks = self.free.split_off(self.free.len() - n);
        Some(PagedSeq {
            blocks,
            len: 0,
            blocked,
        })
    }

    /// Gives the blocks of `seq` back to the pool.
    pub fn release(&mut self, seq: PagedSeq) {
        self.free.extend(seq.blocks);
    }

    /// Offset of (block, layer, position in block) in `k`/`v`.
    fn offset(&self, block: u32, layer: usize, pos: usize) -> usize {
        ((block as usize * self.n_layer + layer) * self.block_size + pos) * self.row
    }

    fn at(&self, seq: &PagedSeq, layer: usize, p: usize) -> usize {
        self.offset(seq.blocks[p / self.block_size], layer, p % self.block_size)
    }
}

/// One input of a [`PagedDecoder::forward`]: an embedding fed to sequence `seq` (an index into
/// the sequences passed along), and whether its logits are wanted.
#[derive(Debug, Clone, Copy)]
pub struct DecodeItem<'a> {
    pub seq: usize,
    pub embedding: &'a [f32],
    pub logits: bool,
}

/// A bias-free linear weight `(out, in)`, row-major.
struct DenseW {
    w: Vec<f32>,
    out: usize,
    inp: usize,
}

impl DenseW {
    fn from(t: &Tensor) -> Result<Self> {
        let (out, inp) = t.dims2()?;
        Ok(DenseW {
            w: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            out,
            inp,
        })
    }

    /// `y = x·Wᵀ` of `rows` rows, in chunks of [`DECODE_CHUNK`] rows: one chunk uses every
    /// thread (they split the columns), several run in parallel, one thread each.
    fn apply(&self, x: &[f32], rows: usize) -> Vec<f32> {
        use rayon::prelude::*;
        debug_assert_eq!(x.len(), rows * self.inp);
        let mut y = vec![0f32; rows * self.out];
        let (inp, out) = (self.inp, self.out);
        let chunk = |xc: &[f32], yc: &mut [f32], threads: usize| {
            let m = xc.len() / inp;
            // SAFETY: xc holds m × inp floats (rows contiguous), w holds out × inp (so Wᵀ has
            // contiguous columns), yc holds m × out; the ranges do not overlap.
            unsafe {
                llamagen_kernels::sgemm::sgemm(
                    (m, out, inp),
                    (xc.as_ptr(), inp as isize, 1),
                    (self.w.as_ptr(), 1, inp as isize),
                    (yc.as_mut_ptr(), out as isize),
                    false,
                    threads,
                );
            }
        };
        if rows <= DECODE_CHUNK {
            chunk(x, &mut y, rayon::current_num_threads());
        } else {
            x.par_chunks(DECODE_CHUNK * inp)
                .zip(y.par_chunks_mut(DECODE_CHUNK * out))
                .for_each(|(xc, yc)| chunk(xc, yc, 1));
        }
        y
    }
}

struct DecoderLayer {
    wqkv: DenseW,
    wo: DenseW,
    w1: DenseW,
    w2: DenseW,
    w3: DenseW,
    attention_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

/// The condition embedding of a [`PagedDecoder`].
enum DecoderCond {
    Class(Vec<f32>),
    Caption {
        fc1: DenseW,
        fc2: DenseW,
        uncond: Vec<f32>,
    },
}

/// A CPU float32 copy of a GPT's weights that runs cached forwards over many sequences at once,
/// each at its own position, with keys and values in a [`KvBlockPool`] (see the invariants
/// above).
pub struct PagedDecoder {
    cfg: GptConfig,
    cond: DecoderCond,
    tok: Vec<f32>,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    output: DenseW,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

fn gelu_tanh(v: f32) -> f32 {
    // candle's `gelu` (the tanh approximation, as the official caption MLP).
    0.5 * v * (1.0 + ((2.0f32 / std::f32::consts::PI).sqrt() * v * (1.0 + 0.044715 * v * v)).tanh())
}

impl Gpt {
    /// A [`PagedDecoder`] with a copy of this model's weights (CPU float32 models only).
    pub fn paged_decoder(&self) -> Result<PagedDecoder> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Err(TrainError::InvalidInput(format!(
                "paged decoding runs on the CPU in float32; the model is {:?} on {:?}",
                self.dtype, self.device
            )));
        }
        let vec = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let cond = match &self.cls_embedding {
            CondEmbedding::Class(t) => DecoderCond::Class(vec(t)?),
            CondEmbedding::Caption { fc1, fc2, uncond } => DecoderCond::Caption {
                fc1: DenseW::from(fc1.weight())?,
                fc2: DenseW::from(fc2.weight())?,
                uncond: vec(uncond)?,
            },
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(DecoderLayer {
                    wqkv: DenseW::from(l.attention.wqkv.weight())?,
                    wo: DenseW::from(l.attention.wo.weight())?,
                    w1: DenseW::from(l.feed_forward.w1.weight())?,
                    w2: DenseW::from(l.feed_forward.w2.weight())?,
                    w3: DenseW::from(l.feed_forward.w3.weight())?,
                    attention_norm: vec(&l.attention_norm)?,
                    ffn_norm: vec(&l.ffn_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PagedDecoder {
            cfg: self.cfg.clone(),
            cond,
            tok: vec(self.tok_embeddings.embeddings())?,
            layers,
            norm: vec(&self.norm)?,
            output: DenseW::from(self.output.weight())?,
            cos: vec(&self.rope.cos)?,
            sin: vec(&self.rope.sin)?,
        })
    }
}

impl PagedDecoder {
    /// The model configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// Whether class `label` has an embedding row (`num_classes` is the CFG null class, present
    /// when the model was trained with class dropout).
    pub fn has_class(&self, label: u32) -> bool {
        match &self.cond {
            DecoderCond::Class(t) => (label as usize + 1) * self.cfg.dim <= t.len(),
            DecoderCond::Caption { .. } => false,
        }
    }

    /// The embedding of class `label` (c2i).
    pub fn class_embedding(&self, label: u32) -> Result<&[f32]> {
        let d = self.cfg.dim;
        match &self.cond {
            DecoderCond::Class(t) if self.has_class(label) => {
                Ok(&t[label as usize * d..(label as usize + 1) * d])
            }
            DecoderCond::Class(t) => Err(TrainError::InvalidInput(format!(
                "class label {label} out of range (table has {} rows)",
                t.len() / d
            ))),
            DecoderCond::Caption { .. } => Err(TrainError::InvalidInput(
                "class condition for a t2i model".into(),
            )),
        }
    }

    /// The embedding of image token `token`.
    pub fn token_embedding(&self, token: u32) -> Result<&[f32]> {
        let (d, v) = (self.cfg.dim, self.cfg.vocab_size);
        if token as usize >= v {
            return Err(TrainError::InvalidInput(format!(
                "image token {token} out of range (vocab_size {v})"
            )));
        }
        Ok(&self.tok[token as usize * d..(token as usize + 1) * d])
    }

    /// The condition embeddings `(cls_token_num, dim)` of caption features `(T, caption_dim)`
    /// (`T >= cls_token_num`), or of the null caption when `caption` is None (t2i).
    pub fn caption_embeddings(&self, caption: Option<&[f32]>) -> Result<Vec<f32>> {
        let DecoderCond::Caption { fc1, fc2, uncond } = &self.cond else {
            return Err(TrainError::InvalidInput(
                "caption condition for a c2i model".into(),
            ));
        };
        let c = self.cfg.caption_dim;
        let x = caption.unwrap_or(uncond);
        if !x.len().is_multiple_of(c) || x.len() / c < self.cfg.cls_token_num {
            return Err(TrainError::InvalidInput(format!(
                "caption features of {} floats: need T >= {} rows of {c}",
                x.len(),
                self.cfg.cls_token_num
            )));
        }
        let t = self.cfg.cls_token_num;
        let mut h = fc1.apply(&x[..t * c], t);
        for v in h.iter_mut() {
            *v = gelu_tanh(*v);
        }
        Ok(fc2.apply(&h, t))
    }

    /// One cached forward of `items` (each fed to `seqs[item.seq]` at its next position, items
    /// of one sequence in order) through every layer, writing their keys and values into
    /// `pool`. Returns the f32 logits `(vocab)` of the items that asked for them, in item order.
    pub fn forward(
        &self,
        pool: &mut KvBlockPool,
        seqs: &mut [&mut PagedSeq],
        items: &[DecodeItem],
    ) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (d, n) = (cfg.dim, items.len());
        let (h, hkv, hd) = (cfg.n_head, cfg.n_kv_head(), cfg.head_dim());
        let half = hd / 2;
        let eps = cfg.norm_eps as f32;
        let rope_rows = self.cos.len() / half;
        // Positions of the items.
        let mut next: Vec<usize> = seqs.iter().map(|s| s.len).collect();
        let mut pos = Vec::with_capacity(n);
        for it in items {
            let s = seqs.get(it.seq).ok_or_else(|| {
                TrainError::InvalidInput(format!("item for sequence {} of {}", it.seq, next.len()))
            })?;
            let p = next[it.seq];
            if p >= s.capacity(pool) || p >= rope_rows {
                return Err(TrainError::InvalidInput(format!(
                    "position {p} beyond the sequence's {} cached positions (RoPE rows {rope_rows})",
                    s.capacity(pool)
                )));
            }
            if it.embedding.len() != d {
                return Err(TrainError::InvalidInput(format!(
                    "embedding of {} floats, the model has dim {d}",
                    it.embedding.len()
                )));
            }
            pos.push(p);
            next[it.seq] += 1;
        }
        let mut x: Vec<f32> = items
            .iter()
            .flat_map(|it| it.embedding.iter().copied())
            .collect();
        let mut xn = vec![0f32; n * d];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            for r in 0..n {
                rms_norm_row(
                    &x[r * d..(r + 1) * d],
                    &layer.attention_norm,
                    eps,
                    &mut xn[r * d..(r + 1) * d],
                );
            }
            let mut qkv = layer.wqkv.apply(&xn, n);
            let w = (h + 2 * hkv) * hd;
            // RoPE on q and k, then k and v into the pool.
            for r in 0..n {
                let p = pos[r];
                let (cos, sin) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                let row = &mut qkv[r * w..r * w + (h + hkv) * hd];
                for head in row.chunks_mut(hd) {
                    for j in 0..half {
                        let (a, b) = (head[2 * j], head[2 * j + 1]);
                        head[2 * j] = a * cos[j] - b * sin[j];
                        head[2 * j + 1] = b * cos[j] + a * sin[j];
                    }
                }
                let off = pool.at(seqs[items[r].seq], li, p);
                let kr = r * w + h * hd;
                let vr = kr + hkv * hd;
                pool.k[off..off + hkv * hd].copy_from_slice(&qkv[kr..kr + hkv * hd]);
                pool.v[off..off + hkv * hd].copy_from_slice(&qkv[vr..vr + hkv * hd]);
            }
            // Attention, row by row.
            let mut att = vec![0f32; n * h * hd];
            {
                let pool = &*pool;
                let seqs = &*seqs;
                let work = |(r, out): (usize, &mut [f32])| {
                    let s = &*seqs[items[r].seq];
                    let p = pos[r];
                    let mut scores = vec![0f32; p + 1];
                    for hh in 0..h {
                        let kvh = hh / (h / hkv);
                        let q = &qkv[r * w + hh * hd..r * w + (hh + 1) * hd];
                        let mut max = f32::NEG_INFINITY;
                        for (j, sc) in scores.iter_mut().enumerate() {
                            if j != p && s.blocked.get(j).copied().unwrap_or(false) {
                                *sc = f32::NEG_INFINITY;
                                continue;
                            }
                            let o = pool.at(s, li, j) + kvh * hd;
                            let k = &pool.k[o..o + hd];
                            let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                            *sc = dot * scale;
                            max = max.max(*sc);
                        }
                        let mut total = 0f32;
                        for sc in scores.iter_mut() {
                            *sc = if sc.is_finite() {
                                (*sc - max).exp()
                            } else {
                                0.0
                            };
                            total += *sc;
                        }
                        let o_h = &mut out[hh * hd..(hh + 1) * hd];
                        o_h.fill(0.0);
                        for (j, &pj) in scores.iter().enumerate() {
                            if pj == 0.0 {
                                continue;
                            }
                            let o = pool.at(s, li, j) + kvh * hd;
                            let v = &pool.v[o..o + hd];
                            let pj = pj / total;
                            for (a, &b) in o_h.iter_mut().zip(v) {
                                *a += pj * b;
                            }
                        }
                    }
                };
                use rayon::prelude::*;
                att.par_chunks_mut(h * hd).enumerate().for_each(work);
            }
            let a = layer.wo.apply(&att, n);
            for (xv, av) in x.iter_mut().zip(&a) {
                *xv += av;
            }
            for r in 0..n {
                rms_norm_row(
                    &x[r * d..(r + 1) * d],
                    &layer.ffn_norm,
                    eps,
                    &mut xn[r * d..(r + 1) * d],
                );
            }
            let mut g = layer.w1.apply(&xn, n);
            let u = layer.w3.apply(&xn, n);
            for (gv, &uv) in g.iter_mut().zip(&u) {
                *gv = *gv / (1.0 + (-*gv).exp()) * uv;
            }
            let f = layer.w2.apply(&g, n);
            for (xv, fv) in x.iter_mut().zip(&f) {
                *xv += fv;
            }
        }
        for (s, &nx) in seqs.iter_mut().zip(&next) {
            s.len = nx;
        }
        let want: Vec<usize> = (0..n).filter(|&r| items[r].logits).collect();
        let mut hn = vec![0f32; want.len() * d];
        for (i, &r) in want.iter().enumerate() {
            rms_norm_row(
                &x[r * d..(r + 1) * d],
                &self.norm,
                eps,
                &mut hn[i * d..(i + 1) * d],
            );
        }
        let logits = self.output.apply(&hn, want.len());
        Ok(logits
            .chunks(cfg.vocab_size.max(1))
            .map(<[f32]>::to_vec)
            .collect())
    }
}
