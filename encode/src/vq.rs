//! The LlamaGen VQ image tokenizer (`VQModel`): encoder, L2-normalised vector quantizer and
//! decoder, with the official state_dict key names.
//!
//! Invariants enforced here:
//! - Every normalisation is GroupNorm with [`GROUP_NORM_GROUPS`] groups, eps
//!   [`GROUP_NORM_EPS`] and affine weights; every nonlinearity is swish, `x·sigmoid(x)`.
//! - Downsample zero-pads by one pixel on the **right and bottom only**, then applies a 3×3
//!   convolution with stride 2 and no padding. Upsample is nearest-neighbour ×2, then a 3×3
//!   convolution with padding 1.
//! - With `codebook_l2_norm` (always on in the released models) the quantizer L2-normalises
//!   both z and the codebook rows (eps 1e-12) on **every** call; the stored codebook need not be
//!   unit-norm. The distance is `‖z‖² + ‖e‖² − 2·z·eᵀ`, the code is its argmin (the first index
//!   wins a tie) and `z_q` is the normalised codebook row, returned through the straight-through
//!   form `z + sg(z_q − z)` computed on the normalised z.
//! - Every operation is differentiable in candle (composed softmax, no fused kernel), and the
//!   stop-gradients are those of the official code: the straight-through output trains the
//!   encoder, `vq_loss = mean((z_q − sg(z))²)` the codebook and
//!   `commit_loss = β·mean((sg(z_q) − z)²)` the encoder.
//! - Tensor names are the official state_dict keys (`encoder.conv_blocks.{i}.res.{j}.norm1`,
//!   `quantize.embedding.weight`, `quant_conv`, …); tensors are requested in state_dict order.
//!   The `quantize.codebook_used` buffer ([`CODEBOOK_USED_LEN`] floats) is loaded, kept and
//!   saved like any other tensor.
//! - Codes are laid out in raster order: flat index `(b·h + row)·w + col`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Device, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
pub use crate::conv::Conv2d;
use crate::error::EncodeError;
pub use crate::norm::GroupNorm;

/// Number of groups of every GroupNorm in the model.
pub const GROUP_NORM_GROUPS: usize = 32;
/// Epsilon of every GroupNorm in the model.
pub const GROUP_NORM_EPS: f64 = 1e-6;
/// Length of the `quantize.codebook_used` ring buffer (fixed by the official code, independent of
/// the codebook size).
pub const CODEBOOK_USED_LEN: usize = 65536;
/// Epsilon of the L2 normalisation (`F.normalize`): rows are divided by `max(‖x‖, eps)`.
pub const L2_NORM_EPS: f64 = 1e-12;

type Result<T> = std::result::Result<T, EncodeError>;

/// Configuration of a VQ tokenizer; the fields and defaults are those of the official
/// `ModelArgs`, plus the two encoder/decoder constants the official `VQModel` does not expose
/// (`ch`, `num_res_blocks`). The default is VQ-16.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelArgs {
    /// Number of codebook entries. Default 16384.
    pub codebook_size: usize,
    /// Dimension of a codebook entry (channels of the quantizer input). Default 8.
    pub codebook_embed_dim: usize,
    /// L2-normalise z and the codebook on every quantizer call. Default true.
    pub codebook_l2_norm: bool,
    /// Track codebook usage in the `codebook_used` ring buffer during training calls.
    /// Default true.
    pub codebook_show_usage: bool,
    /// Weight β of the commitment loss. Default 0.25.
    pub commit_loss_beta: f64,
    /// Weight of the entropy loss. Default 0 (the term is then exactly 0).
    pub entropy_loss_ratio: f64,
    /// Channel multipliers of the encoder levels; the downsampling factor is
    /// `2^(len − 1)`. Default `[1, 1, 2, 2, 4]`.
    pub encoder_ch_mult: Vec<usize>,
    /// Channel multipliers of the decoder levels (listed from the highest resolution).
    /// Default `[1, 1, 2, 2, 4]`.
    pub decoder_ch_mult: Vec<usize>,
    /// Channels of the encoder output and the decoder input. Default 256.
    pub z_channels: usize,
    /// Dropout probability inside the ResnetBlocks; dropout is the identity at inference, so
    /// this only documents the checkpoint's training setting. Default 0.
    pub dropout_p: f64,
    /// Base channel count of encoder and decoder (hard-coded to 128 in the official
    /// `VQModel`). Default 128.
    pub ch: usize,
    /// ResnetBlocks per encoder level (the decoder has one more per level). Default 2.
    pub num_res_blocks: usize,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self::vq_16()
    }
}

impl ModelArgs {
    /// VQ-16: downsampling 16, 16384 × 8 codebook (the tokenizer of the released models).
    pub fn vq_16() -> Self {
        Self {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            codebook_l2_norm: true,
            codebook_show_usage: true,
            commit_loss_beta: 0.25,
            entropy_loss_ratio: 0.0,
            encoder_ch_mult: vec![1, 1, 2, 2, 4],
            decoder_ch_mult: vec![1, 1, 2, 2, 4],
            z_channels: 256,
            dropout_p: 0.0,
            ch: 128,
            num_res_blocks: 2,
        }
    }

    /// VQ-8: downsampling 8, otherwise as VQ-16.
    pub fn vq_8() -> Self {
        Self {
            encoder_ch_mult: vec![1, 2, 2, 4],
            decoder_ch_mult: vec![1, 2, 2, 4],
            ..Self::vq_16()
        }
    }

    /// The reduced VQ of the bundled reference tensors: ch 32, ch_mult `[1, 2, 2]`,
    /// z_channels 16, a 64 × 8 codebook (32×32 images give 8×8 code grids).
    pub fn reduced() -> Self {
        Self {
            codebook_size: 64,
            encoder_ch_mult: vec![1, 2, 2],
            decoder_ch_mult: vec![1, 2, 2],
            z_channels: 16,
            ch: 32,
            ..Self::vq_16()
        }
    }

    /// Spatial downsampling factor of the encoder: `2^(len(encoder_ch_mult) − 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.encoder_ch_mult.len().saturating_sub(1)
    }

    /// Checks that the config describes a buildable model.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(EncodeError::InvalidConfig(msg));
        if self.encoder_ch_mult.is_empty() || self.decoder_ch_mult.is_empty() {
            return bad("encoder_ch_mult and decoder_ch_mult must not be empty".into());
        }
        if self.codebook_size == 0 || self.codebook_embed_dim == 0 || self.z_channels == 0 {
            return bad("codebook_size, codebook_embed_dim and z_channels must be positive".into());
        }
        if self.codebook_size > u32::MAX as usize {
            return bad(format!("codebook_size {} exceeds u32", self.codebook_size));
        }
        if self.num_res_blocks == 0 {
            return bad("num_res_blocks must be positive".into());
        }
        for (what, mults) in [
            ("encoder_ch_mult", &self.encoder_ch_mult),
            ("decoder_ch_mult", &self.decoder_ch_mult),
        ] {
            for &m in mults.iter() {
                let c = self.ch * m;
                if c == 0 || !c.is_multiple_of(GROUP_NORM_GROUPS) {
                    return bad(format!(
                        "{what}: ch·mult = {} is not a positive multiple of the {GROUP_NORM_GROUPS} GroupNorm groups",
                        c
                    ));
                }
            }
        }
        if !self.ch.is_multiple_of(GROUP_NORM_GROUPS) {
            return bad(format!(
                "ch {} is not a multiple of the {GROUP_NORM_GROUPS} GroupNorm groups",
                self.ch
            ));
        }
        Ok(())
    }
}

fn group_norm(channels: usize, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    GroupNorm::load(GROUP_NORM_GROUPS, channels, GROUP_NORM_EPS, vb)
}

fn conv(
    in_c: usize,
    out_c: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    // The tensors and their order are those of `candle_nn::conv2d` (weight, then bias).
    let init_ws = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", init_ws)?;
    let bound = 1. / (in_c as f64).sqrt();
    let init_bs = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let bias = vb.get_with_hints(out_c, "bias", init_bs)?;
    Ok(Conv2d::new(weight, Some(bias), padding, stride))
}

/// `norm1 → swish → conv1 → norm2 → swish → (dropout) → conv2`, plus the input (through a 1×1
/// `nin_shortcut` when the channel count changes).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
    ) -> candle_core::Result<Self> {
        let norm1 = group_norm(in_channels, vb.pp("norm1"))?;
        let conv1 = conv(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?;
        let norm2 = group_norm(out_channels, vb.pp("norm2"))?;
        let conv2 = conv(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?;
        let nin_shortcut = if in_channels != out_channels {
            Some(conv(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("nin_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            norm2,
            conv2,
            nin_shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_swish(x)?)?;
        let skip = match &self.nin_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        self.conv2
            .forward_add(&self.norm2.forward_swish(&h)?, &skip)
    }
}

/// Single-head self-attention over the h·w positions, with 1×1 convolutions for q, k, v and
/// the output projection, added residually.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    pub fn load(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm: group_norm(channels, vb.pp("norm"))?,
            q: conv(channels, channels, 1, 1, 0, vb.pp("q"))?,
            k: conv(channels, channels, 1, 1, 0, vb.pp("k"))?,
            v: conv(channels, channels, 1, 1, 0, vb.pp("v"))?,
            proj_out: conv(channels, channels, 1, 1, 0, vb.pp("proj_out"))?,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm.forward(x)?;
        let q = self.q.forward(&h)?;
        let k = self.k.forward(&h)?;
        let v = self.v.forward(&h)?;
        let (b, c, hh, ww) = q.dims4()?;
        let n = hh * ww;
        let q = q.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?; // (b, n, c)
        let k = k.reshape((b, c, n))?; // (b, c, n)
        let w = (q.matmul(&k)? * (c as f64).powf(-0.5))?; // (b, n_q, n_k)
        // The composed softmax (not the fused kernel, which has no backward pass) so that
        // training reaches the attention weights.
        let w = candle_nn::ops::softmax(&w, D::Minus1)?;
        let v = v.reshape((b, c, n))?;
        let h = v.matmul(&w.transpose(1, 2)?.contiguous()?)?; // (b, c, n_q)
        self.proj_out.forward_add(&h.reshape((b, c, hh, ww))?, x)
    }
}

/// Zero-pad right and bottom by one, then a 3×3 stride-2 convolution without padding.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn load(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv(channels, channels, 3, 2, 0, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward_padded(x, (0, 1))
    }
}

/// Nearest-neighbour ×2, then a 3×3 convolution with padding 1.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv.forward(&x.upsample_nearest2d(h * 2, w * 2)?)
    }
}

/// One resolution level (`conv_blocks.{i}`): ResnetBlocks, each followed by an AttnBlock on
/// the attention level, then an optional resampling step. The state_dict lists all `res.*`
/// before all `attn.*`.
#[derive(Debug, Clone)]
struct Level<R> {
    res: Vec<ResnetBlock>,
    attn: Vec<AttnBlock>,
    resample: Option<R>,
}

impl<R: Module> Level<R> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, res) in self.res.iter().enumerate() {
            h = res.forward(&h)?;
            if let Some(attn) = self.attn.get(i) {
                h = attn.forward(&h)?;
            }
        }
        match &self.resample {
            Some(r) => r.forward(&h),
            None => Ok(h),
        }
    }
}

/// `mid = [ResnetBlock, AttnBlock, ResnetBlock]` at the lowest resolution.
#[derive(Debug, Clone)]
struct Mid {
    res0: ResnetBlock,
    attn: AttnBlock,
    res1: ResnetBlock,
}

impl Mid {
    fn load(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            res0: ResnetBlock::load(vb.pp(0), channels, channels)?,
            attn: AttnBlock::load(vb.pp(1), channels)?,
            res1: ResnetBlock::load(vb.pp(2), channels, channels)?,
        })
    }
}

impl Module for Mid {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.res1
            .forward(&self.attn.forward(&self.res0.forward(x)?)?)
    }
}

/// Image (B, 3, H, W) in [−1, 1] → (B, z_channels, H/f, W/f).
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    conv_blocks: Vec<Level<Downsample>>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn load(vb: VarBuilder, args: &ModelArgs) -> candle_core::Result<Self> {
        let ch = args.ch;
        let mults = &args.encoder_ch_mult;
        let n = mults.len();
        let conv_in = conv(3, ch, 3, 1, 1, vb.pp("conv_in"))?;
        let mut conv_blocks = Vec::with_capacity(n);
        let mut block_in = ch;
        for (i, &m) in mults.iter().enumerate() {
            // The input of level i is the output of level i − 1 (ch for level 0).
            let vb_l = vb.pp("conv_blocks").pp(i);
            let block_out = ch * m;
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..args.num_res_blocks {
                res.push(ResnetBlock::load(
                    vb_l.pp("res").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
            }
            if i == n - 1 {
                for j in 0..args.num_res_blocks {
                    attn.push(AttnBlock::load(vb_l.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if i != n - 1 {
                Some(Downsample::load(vb_l.pp("downsample"), block_in)?)
            } else {
                None
            };
            conv_blocks.push(Level {
                res,
                attn,
                resample,
            });
        }
        let mid = Mid::load(vb.pp("mid"), block_in)?;
        let norm_out = group_norm(block_in, vb.pp("norm_out"))?;
        let conv_out = conv(block_in, args.z_channels, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            conv_blocks,
            mid,
            norm_out,
            conv_out,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.conv_blocks {
            h = level.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_swish(&h)?)
    }
}

/// (B, z_channels, h, w) → image (B, 3, h·f, w·f). `conv_blocks.k` is level `n − 1 − k`
/// (lowest resolution first), with `num_res_blocks + 1` ResnetBlocks each.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    conv_blocks: Vec<Level<Upsample>>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn load(vb: VarBuilder, args: &ModelArgs) -> candle_core::Result<Self> {
        let ch = args.ch;
        let mults = &args.decoder_ch_mult;
        let n = mults.len();
        let mut block_in = ch * mults[n - 1];
        let conv_in = conv(args.z_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = Mid::load(vb.pp("mid"), block_in)?;
        let mut conv_blocks = Vec::with_capacity(n);
        for (k, level) in (0..n).rev().enumerate() {
            let vb_l = vb.pp("conv_blocks").pp(k);
            let block_out = ch * mults[level];
            let mut res = Vec::new();
            let mut attn = Vec::new();
            for j in 0..args.num_res_blocks + 1 {
                res.push(ResnetBlock::load(
                    vb_l.pp("res").pp(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
            }
            if level == n - 1 {
                for j in 0..args.num_res_blocks + 1 {
                    attn.push(AttnBlock::load(vb_l.pp("attn").pp(j), block_in)?);
                }
            }
            let resample = if level != 0 {
                Some(Upsample::load(vb_l.pp("upsample"), block_in)?)
            } else {
                None
            };
            conv_blocks.push(Level {
                res,
                attn,
                resample,
            });
        }
        let norm_out = group_norm(block_in, vb.pp("norm_out"))?;
        let conv_out = conv(block_in, 3, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            mid,
            conv_blocks,
            norm_out,
            conv_out,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for level in &self.conv_blocks {
            h = level.forward(&h)?;
        }
        self.conv_out.forward(&self.norm_out.forward_swish(&h)?)
    }
}

/// Row-wise L2 normalisation over the last dimension: `x / max(‖x‖, 1e-12)`.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&norm.clamp(L2_NORM_EPS, f64::INFINITY)?)
}

/// What one quantizer call produces.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// z_q through the straight-through form, channel-first (B, C, h, w).
    pub quant: Tensor,
    /// Codes (B·h·w,) as u32, raster order per image.
    pub indices: Tensor,
    /// Squared distances (B·h·w, codebook_size) between the (normalised) z and codebook rows.
    pub distances: Tensor,
}

/// The training-mode quantizer terms.
#[derive(Debug, Clone)]
pub struct QuantizerLosses {
    /// `mean((z_q − sg(z))²)` on the normalised vectors (scalar tensor).
    pub vq_loss: Tensor,
    /// `β·mean((sg(z_q) − z)²)` (scalar tensor).
    pub commit_loss: Tensor,
    /// `entropy_loss_ratio · entropy term` (scalar tensor; exactly 0 when the ratio is 0).
    pub entropy_loss: Tensor,
    /// `#unique(codebook_used) / codebook_size` after this call, when usage tracking is on.
    pub codebook_usage: Option<f64>,
}

/// The vector quantizer (`quantize.*`): `embedding.weight` (codebook_size, embed_dim) and the
/// `codebook_used` ring buffer.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
    codebook_used: Tensor,
    l2_norm: bool,
    show_usage: bool,
    beta: f64,
    entropy_loss_ratio: f64,
}

impl VectorQuantizer {
    pub fn load(vb: VarBuilder, args: &ModelArgs) -> candle_core::Result<Self> {
        let codebook_used = vb.get(CODEBOOK_USED_LEN, "codebook_used")?;
        let embedding = vb.get(
            (args.codebook_size, args.codebook_embed_dim),
            "embedding.weight",
        )?;
        Ok(Self {
            embedding,
            codebook_used,
            l2_norm: args.codebook_l2_norm,
            show_usage: args.codebook_show_usage,
            beta: args.commit_loss_beta,
            entropy_loss_ratio: args.entropy_loss_ratio,
        })
    }

    /// The stored codebook (not normalised).
    pub fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// The `codebook_used` ring buffer (65536 floats).
    pub fn codebook_used(&self) -> &Tensor {
        &self.codebook_used
    }

    /// The codebook the quantizer compares against: L2-normalised rows when `l2_norm` is on.
    pub fn codebook(&self) -> candle_core::Result<Tensor> {
        if self.l2_norm {
            l2_normalize(&self.embedding)
        } else {
            Ok(self.embedding.clone())
        }
    }

    /// Inference call (`eval()` mode): z (B, C, h, w) → [`Quantized`].
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Quantized> {
        Ok(self.quantize(z)?.0)
    }

    /// Training-mode call: as [`Self::forward`], plus the loss terms, and the `codebook_used`
    /// ring buffer shifted left by B·h·w with the new codes written at its end (when usage
    /// tracking is on). Its initial zeros count as code 0 until the buffer has been filled; a
    /// call with more than 65536 codes keeps the last 65536.
    pub fn forward_train(
        &mut self,
        z: &Tensor,
    ) -> candle_core::Result<(Quantized, QuantizerLosses)> {
        let (out, z_flat, zq_flat) = self.quantize(z)?;
        // Same value, different gradients: the vq loss trains the codebook only, the
        // commitment loss the encoder only.
        let vq_loss = (&zq_flat - &z_flat.detach())?.sqr()?.mean_all()?;
        let commit_loss = ((&zq_flat.detach() - &z_flat)?.sqr()?.mean_all()? * self.beta)?;
        let entropy_loss = if self.entropy_loss_ratio == 0.0 {
            Tensor::zeros((), z.dtype(), z.device())?
        } else {
            (entropy_loss(&out.distances.neg()?)? * self.entropy_loss_ratio)?
        };
        let codebook_usage = if self.show_usage {
            Some(self.record_usage(&out.indices)?)
        } else {
            None
        };
        Ok((
            out,
            QuantizerLosses {
                vq_loss,
                commit_loss,
                entropy_loss,
                codebook_usage,
            },
        ))
    }

    fn record_usage(&mut self, indices: &Tensor) -> candle_core::Result<f64> {
        let new: Vec<u32> = indices.to_vec1()?;
        let mut used: Vec<f32> = self.codebook_used.to_dtype(DType::F32)?.to_vec1()?;
        let n = new.len().min(CODEBOOK_USED_LEN);
        used.rotate_left(n);
        for (slot, &code) in used[CODEBOOK_USED_LEN - n..]
            .iter_mut()
            .zip(&new[new.len() - n..])
        {
            *slot = code as f32;
        }
        let mut distinct: Vec<u32> = used.iter().map(|v| v.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let usage = distinct.len() as f64 / self.embedding.dim(0)? as f64;
        self.codebook_used =
            Tensor::from_vec(used, CODEBOOK_USED_LEN, self.codebook_used.device())?
                .to_dtype(self.codebook_used.dtype())?;
        Ok(usage)
    }

    /// Returns the output, the flattened (normalised) z and the flattened z_q.
    fn quantize(&self, z: &Tensor) -> candle_core::Result<(Quantized, Tensor, Tensor)> {
        let (b, c, h, w) = z.dims4()?;
        let z_flat = z
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((b * h * w, c))?;
        let z_flat = if self.l2_norm {
            l2_normalize(&z_flat)?
        } else {
            z_flat
        };
        let codebook = self.codebook()?;
        let z_sq = z_flat.sqr()?.sum_keepdim(1)?; // (N, 1)
        let e_sq = codebook.sqr()?.sum(1)?.unsqueeze(0)?; // (1, K)
        let dot = z_flat.matmul(&codebook.t()?)?; // (N, K)
        let distances = z_sq.broadcast_add(&e_sq)?.broadcast_sub(&(dot * 2.0)?)?;
        let indices = distances.argmin(1)?;
        let zq_flat = codebook.index_select(&indices, 0)?;
        // Straight-through on the normalised z: z + sg(z_q − z) (gradients reach the encoder,
        // not the codebook; the codebook learns from the vq loss).
        let st = (&z_flat + (&zq_flat - &z_flat)?.detach())?;
        let quant = st
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok((
            Quantized {
                quant,
                indices,
                distances,
            },
            z_flat,
            zq_flat,
        ))
    }

    /// Codebook rows for `indices` (any shape holding B·h·w codes, u32 or i64), reshaped to
    /// channel-first (B, C, h, w) from `shape = (B, C, h, w)`.
    pub fn get_codebook_entry(
        &self,
        indices: &Tensor,
        shape: (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = shape;
        let flat = indices.flatten_all()?;
        let rows = self.codebook()?.index_select(&flat, 0)?;
        rows.reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// LlamaGen's entropy term on an affinity matrix (N, K): softmax at temperature 0.01,
/// `mean_n(H(p_n)) − H(mean_n p_n)`, with the official 1e-5 offsets.
pub fn entropy_loss(affinity: &Tensor) -> candle_core::Result<Tensor> {
    let flat = (affinity.flatten_to(D::Minus2)? / 0.01)?;
    let probs = candle_nn::ops::softmax(&flat, D::Minus1)?;
    let log_probs = candle_nn::ops::log_softmax(&(&flat + 1e-5)?, D::Minus1)?;
    let avg_probs = probs.mean(0)?;
    let avg_entropy = (&avg_probs * (&avg_probs + 1e-5)?.log()?)?
        .sum_all()?
        .neg()?;
    let sample_entropy = (&probs * &log_probs)?.sum(D::Minus1)?.mean_all()?.neg()?;
    sample_entropy - avg_entropy
}

/// Intermediate tensors of one encode call, in pipeline order.
#[derive(Debug, Clone)]
pub struct EncodeTrace {
    /// `encoder(x)`: (B, z_channels, h, w).
    pub encoder_out: Tensor,
    /// `quant_conv(encoder(x))`: the quantizer input (B, embed_dim, h, w).
    pub pre_quant: Tensor,
    /// The quantizer's output.
    pub quantized: Quantized,
}

/// A backend that forwards every request to an inner [`VarBuilder`] and records the
/// (name, tensor) pairs in request order.
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    seen: Arc<Mutex<Vec<(String, Tensor)>>>,
}

impl Recorder<'_> {
    fn record(&self, name: &str, t: &Tensor) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.push((name.to_string(), t.clone()));
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        self.record(name, &t);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.record(name, &t);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A backend that hands out zero-strided zeros of the requested shape: building a model on it
/// allocates nothing and lists the model's tensors.
struct ShapeOnly;

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only backend cannot serve {name} without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The LlamaGen `VQModel`: encoder → quant_conv → quantize → post_quant_conv → decoder.
#[derive(Debug, Clone)]
pub struct VqModel {
    args: ModelArgs,
    encoder: Encoder,
    decoder: Decoder,
    quantize: VectorQuantizer,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// Every loaded tensor under its official key, in state_dict order.
    tensors: Vec<(String, Tensor)>,
}

impl VqModel {
    /// Builds the model from `vb` (official key names relative to `vb`'s prefix).
    pub fn load(vb: VarBuilder, args: &ModelArgs) -> Result<Self> {
        args.validate()?;
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder {
            inner: vb,
            seen: seen.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(rec), dtype, device);
        let encoder = Encoder::load(vb.pp("encoder"), args)?;
        let decoder = Decoder::load(vb.pp("decoder"), args)?;
        let quantize = VectorQuantizer::load(vb.pp("quantize"), args)?;
        let quant_conv = conv(
            args.z_channels,
            args.codebook_embed_dim,
            1,
            1,
            0,
            vb.pp("quant_conv"),
        )?;
        let post_quant_conv = conv(
            args.codebook_embed_dim,
            args.z_channels,
            1,
            1,
            0,
            vb.pp("post_quant_conv"),
        )?;
        drop(vb);
        let tensors = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(Self {
            args: args.clone(),
            encoder,
            decoder,
            quantize,
            quant_conv,
            post_quant_conv,
            tensors,
        })
    }

    /// The official state_dict keys of a model with `args` and their shapes, in state_dict
    /// order.
    pub fn tensor_specs(args: &ModelArgs) -> Result<Vec<(String, Vec<usize>)>> {
        let vb = VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
        let model = Self::load(vb, args)?;
        Ok(model
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect())
    }

    /// Loads a checkpoint file: a safetensors file with the official keys, or an official torch
    /// `.pt`/`.pth` zip checkpoint (its `model` state_dict; the optimizer, `args` and other
    /// entries are not read). The file must hold exactly the model's tensors, with the model's
    /// shapes. Tensors are converted to float32.
    pub fn from_file(path: &Path, args: &ModelArgs, device: &Device) -> Result<Self> {
        args.validate()?;
        let specs = Self::tensor_specs(args)?;
        let tensors = checkpoint::load_checked(path, &specs, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::load(vb, args)
    }

    /// Every tensor under its official key, in state_dict order (`quantize.codebook_used`
    /// reflects training-mode calls).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(name, t)| {
                if name == "quantize.codebook_used" {
                    (name.clone(), self.quantize.codebook_used.clone())
                } else {
                    (name.clone(), t.clone())
                }
            })
            .collect()
    }

    /// Saves every tensor (including `quantize.codebook_used`) to a safetensors file under the
    /// official key names.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .named_tensors()
            .into_iter()
            .map(|(n, t)| t.contiguous().map(|t| (n, t)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&map, path).map_err(|e| match e {
            candle_core::Error::Io(source) => EncodeError::io(path, source),
            other => EncodeError::Tensor(other),
        })
    }

    pub fn args(&self) -> &ModelArgs {
        &self.args
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.quantize.embedding.device()
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn quantize(&self) -> &VectorQuantizer {
        &self.quantize
    }

    pub fn quantize_mut(&mut self) -> &mut VectorQuantizer {
        &mut self.quantize
    }

    pub fn quant_conv(&self) -> &Conv2d {
        &self.quant_conv
    }

    pub fn post_quant_conv(&self) -> &Conv2d {
        &self.post_quant_conv
    }

    /// Spatial downsampling factor of the encoder.
    pub fn downsample_factor(&self) -> usize {
        self.args.downsample_factor()
    }

    /// Checks that an image of `height` × `width` pixels maps onto a whole code grid.
    pub fn check_image_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let f = self.downsample_factor();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            return Err(EncodeError::ImageSize {
                width,
                height,
                factor: f,
            });
        }
        Ok((height / f, width / f))
    }

    /// Encoder, quant_conv and quantizer on images (B, 3, H, W) in [−1, 1], keeping every
    /// intermediate tensor.
    pub fn encode_trace(&self, x: &Tensor) -> Result<EncodeTrace> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 {
            return Err(EncodeError::InvalidInput(format!(
                "expected images with 3 channels, got {c}"
            )));
        }
        self.check_image_size(h, w)?;
        let encoder_out = self.encoder.forward(x)?;
        let pre_quant = self.quant_conv.forward(&encoder_out)?;
        let quantized = self.quantize.forward(&pre_quant)?;
        Ok(EncodeTrace {
            encoder_out,
            pre_quant,
            quantized,
        })
    }

    /// Images (B, 3, H, W) in [−1, 1] → quantized latents and codes.
    pub fn encode(&self, x: &Tensor) -> Result<Quantized> {
        Ok(self.encode_trace(x)?.quantized)
    }

    /// Images (B, 3, H, W) in [−1, 1] → codes (B, H/f, W/f), u32, raster order.
    pub fn encode_indices(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let f = self.downsample_factor();
        let q = self.encode(x)?;
        Ok(q.indices.reshape((b, h / f, w / f))?)
    }

    /// Quantized latents (B, embed_dim, h, w) → images (B, 3, h·f, w·f).
    pub fn decode(&self, quant: &Tensor) -> Result<Tensor> {
        let h = self.post_quant_conv.forward(quant)?;
        Ok(self.decoder.forward(&h)?)
    }

    /// Codes (B·h·w codes in raster order, any shape) → images, with `shape = (B, C, h, w)`
    /// the latent shape (C = codebook_embed_dim).
    pub fn decode_code(
        &self,
        indices: &Tensor,
        shape: (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let (b, c, h, w) = shape;
        if c != self.args.codebook_embed_dim {
            return Err(EncodeError::InvalidInput(format!(
                "latent channels {c} differ from codebook_embed_dim {}",
                self.args.codebook_embed_dim
            )));
        }
        if indices.elem_count() != b * h * w {
            return Err(EncodeError::InvalidInput(format!(
                "{} codes do not fill a latent of shape {shape:?}",
                indices.elem_count()
            )));
        }
        let quant = self.quantize.get_codebook_entry(indices, shape)?;
        self.decode(&quant)
    }

    /// Reconstruction `decode(encode(x).quant)` (the model's forward in eval mode).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.encode(x)?;
        self.decode(&q.quant)
    }

    /// Training-mode forward of the quantizer path: reconstruction and quantizer losses, with
    /// the `codebook_used` buffer updated.
    pub fn forward_train(&mut self, x: &Tensor) -> Result<(Tensor, Quantized, QuantizerLosses)> {
        let (_, _, h, w) = x.dims4()?;
        self.check_image_size(h, w)?;
        let pre_quant = self.quant_conv.forward(&self.encoder.forward(x)?)?;
        let (q, losses) = self.quantize.forward_train(&pre_quant)?;
        let dec = self.decode(&q.quant)?;
        Ok((dec, q, losses))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_loss_closed_forms() -> candle_core::Result<()> {
        // Equal affinities: every row is uniform over K codes, so the sample entropy is ln K and
        // the mean-distribution entropy is −ln(1/K + 1e-5): loss = ln(1 + 1e-5·K).
        let k = 4usize;
        let flat = Tensor::zeros((6, k), DType::F32, &Device::Cpu)?;
        let got = entropy_loss(&flat)?.to_scalar::<f32>()? as f64;
        let want = (1.0 + 1e-5 * k as f64).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // One confident row per code: sample entropy ≈ 0, mean distribution uniform.
        let eye = Tensor::eye(k, DType::F32, &Device::Cpu)?;
        let got = entropy_loss(&eye)?.to_scalar::<f32>()? as f64;
        let want = (0.25f64 + 1e-5).ln();
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn configs_validate() {
        assert!(ModelArgs::vq_16().validate().is_ok());
        assert!(ModelArgs::vq_8().validate().is_ok());
        assert!(ModelArgs::reduced().validate().is_ok());
        let bad = ModelArgs {
            ch: 48,
            ..ModelArgs::reduced()
        };
        assert!(bad.validate().is_err());
        let bad = ModelArgs {
            encoder_ch_mult: vec![],
            ..ModelArgs::reduced()
        };
        assert!(bad.validate().is_err());
        assert_eq!(ModelArgs::reduced().downsample_factor(), 4);
    }
}
