//! GPT configuration: the official `ModelArgs` fields, the named model sizes, and the
//! state-dict layout (key names, shapes and order) that a configuration implies.
//!
//! Invariants enforced here (by [`GptConfig::validate`]):
//! - `dim` is divisible by `n_head`, `n_head` by `n_kv_head`, and the head dimension is even
//!   and at least 4 (RoPE rotates pairs, half of them by row and half by column);
//! - `block_size` is a perfect square (the image token grid is `G x G`);
//! - `cls_token_num >= 1`;
//! - stochastic depth (`drop_path_rate`) is 0: it is not implemented.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Number of rows of the t2i null-caption buffer `cls_embedding.uncond_embedding`. It is
/// fixed at 120 whatever `cls_token_num` is.
pub const UNCOND_CAPTION_TOKENS: usize = 120;

/// Which condition the model is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    /// Class-conditional: one class embedding token (`cls_embedding.embedding_table`).
    C2i,
    /// Text-conditional: caption features projected by `cls_embedding.cap_proj`.
    T2i,
}

/// The named model sizes of the official constructors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptSize {
    /// 12 layers, 12 heads, dim 768 (111 M parameters, c2i).
    B,
    /// 24 layers, 16 heads, dim 1024 (343 M).
    L,
    /// 36 layers, 20 heads, dim 1280 (775 M).
    XL,
    /// 48 layers, 24 heads, dim 1536 (1.4 B).
    XXL,
    /// 48 layers, 40 heads, dim 2560 (3.9 B).
    XXXL,
    /// 22 layers, 32 heads, dim 2048 (1.2 B).
    B1,
    /// 24 layers, 32 heads, dim 3200, head_dim 100 (3.1 B).
    B3,
    /// 32 layers, 32 heads, dim 4096 (6.6 B).
    B7,
}

impl GptSize {
    /// `(n_layer, n_head, dim)` of the size.
    pub fn dims(self) -> (usize, usize, usize) {
        match self {
            GptSize::B => (12, 12, 768),
            GptSize::L => (24, 16, 1024),
            GptSize::XL => (36, 20, 1280),
            GptSize::XXL => (48, 24, 1536),
            GptSize::XXXL => (48, 40, 2560),
            GptSize::B1 => (22, 32, 2048),
            GptSize::B3 => (24, 32, 3200),
            GptSize::B7 => (32, 32, 4096),
        }
    }

    /// Official constructor name (`GPT-B`, ..., `GPT-7B`).
    pub fn name(self) -> &'static str {
        match self {
            GptSize::B => "GPT-B",
            GptSize::L => "GPT-L",
            GptSize::XL => "GPT-XL",
            GptSize::XXL => "GPT-XXL",
            GptSize::XXXL => "GPT-XXXL",
            GptSize::B1 => "GPT-1B",
            GptSize::B3 => "GPT-3B",
            GptSize::B7 => "GPT-7B",
        }
    }

    /// Every named size.
    pub const ALL: [GptSize; 8] = [
        GptSize::B,
        GptSize::L,
        GptSize::XL,
        GptSize::XXL,
        GptSize::XXXL,
        GptSize::B1,
        GptSize::B3,
        GptSize::B7,
    ];

    /// Parses an official constructor name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// GPT hyper-parameters with the official `ModelArgs` field names, so a JSON config written
/// by the official code (or the reference manifest) deserialises directly. Unknown fields
/// (`max_batch_size`, `max_seq_len`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GptConfig {
    /// Model width. Default 4096.
    pub dim: usize,
    /// Number of transformer blocks. Default 32.
    pub n_layer: usize,
    /// Number of query heads. Default 32.
    pub n_head: usize,
    /// Number of key/value heads; `None` means `n_head` (every released model). Default None.
    pub n_kv_head: Option<usize>,
    /// FFN hidden size is rounded up to a multiple of this. Default 256.
    pub multiple_of: usize,
    /// Optional FFN hidden multiplier (never set by the official scripts). Default None.
    pub ffn_dim_multiplier: Option<f64>,
    /// RoPE base. Default 10000.
    pub rope_base: f64,
    /// RMSNorm epsilon. Default 1e-5.
    pub norm_eps: f64,
    /// Std of the normal initialisation of linear and embedding weights. Default 0.02.
    pub initializer_range: f64,
    /// Dropout on the input embeddings in training. Default 0.1.
    pub token_dropout_p: f64,
    /// Dropout on attention probabilities in training. Default 0.0.
    pub attn_dropout_p: f64,
    /// Dropout on the attention output projection in training. Default 0.1.
    pub resid_dropout_p: f64,
    /// Dropout on the FFN output in training. Default 0.1.
    pub ffn_dropout_p: f64,
    /// Stochastic depth rate; must be 0 (not implemented). Default 0.0.
    pub drop_path_rate: f64,
    /// Number of classes (c2i). Default 1000.
    pub num_classes: usize,
    /// Width of the caption features (t2i). Default 2048 (flan-t5-xl).
    pub caption_dim: usize,
    /// Probability of replacing the label / caption by the null condition in training.
    /// When > 0 the class table has a `num_classes` "null class" row. Default 0.1.
    pub class_dropout_prob: f64,
    /// c2i or t2i. Default c2i.
    pub model_type: ModelType,
    /// Image token vocabulary. Default 16384.
    pub vocab_size: usize,
    /// Number of condition positions (1 for c2i, 120 for t2i). Default 1.
    pub cls_token_num: usize,
    /// Number of image tokens, `(image_size / 16)^2`. Default 256.
    pub block_size: usize,
}

impl Default for GptConfig {
    fn default() -> Self {
        GptConfig {
            dim: 4096,
            n_layer: 32,
            n_head: 32,
            n_kv_head: None,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            initializer_range: 0.02,
            token_dropout_p: 0.1,
            attn_dropout_p: 0.0,
            resid_dropout_p: 0.1,
            ffn_dropout_p: 0.1,
            drop_path_rate: 0.0,
            num_classes: 1000,
            caption_dim: 2048,
            class_dropout_prob: 0.1,
            model_type: ModelType::C2i,
            vocab_size: 16384,
            cls_token_num: 1,
            block_size: 256,
        }
    }
}

fn find_multiple(n: usize, k: usize) -> usize {
    if n.is_multiple_of(k) {
        n
    } else {
        n + k - n % k
    }
}

impl GptConfig {
    /// Class-conditional model of the given size for `image_size` px images (VQ downsample
    /// 16): 1000 classes, one condition token.
    pub fn c2i(size: GptSize, image_size: usize) -> Self {
        let (n_layer, n_head, dim) = size.dims();
        let g = image_size / 16;
        GptConfig {
            dim,
            n_layer,
            n_head,
            block_size: g * g,
            model_type: ModelType::C2i,
            cls_token_num: 1,
            ..GptConfig::default()
        }
    }

    /// Text-conditional model of the given size for `image_size` px images: 120 caption
    /// tokens of width 2048.
    pub fn t2i(size: GptSize, image_size: usize) -> Self {
        GptConfig {
            model_type: ModelType::T2i,
            cls_token_num: UNCOND_CAPTION_TOKENS,
            ..GptConfig::c2i(size, image_size)
        }
    }

    /// Checks the invariants listed at the top of this module.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::InvalidConfig(m));
        if self.n_head == 0 || !self.dim.is_multiple_of(self.n_head) {
            return bad(format!(
                "dim {} is not divisible by n_head {}",
                self.dim, self.n_head
            ));
        }
        let kv = self.n_kv_head();
        if kv == 0 || !self.n_head.is_multiple_of(kv) {
            return bad(format!(
                "n_head {} is not divisible by n_kv_head {kv}",
                self.n_head
            ));
        }
        let hd = self.head_dim();
        if hd < 4 || !hd.is_multiple_of(2) {
            return bad(format!("head_dim {hd} must be even and >= 4"));
        }
        let g = self.grid_size();
        if g * g != self.block_size || self.block_size == 0 {
            return bad(format!(
                "block_size {} is not a perfect square",
                self.block_size
            ));
        }
        if self.cls_token_num == 0 {
            return bad("cls_token_num must be >= 1".into());
        }
        if self.drop_path_rate != 0.0 {
            return bad(format!(
                "drop_path_rate {} is not supported (only 0)",
                self.drop_path_rate
            ));
        }
        if self.multiple_of == 0 {
            return bad("multiple_of must be >= 1".into());
        }
        Ok(())
    }

    /// Per-head width, `dim / n_head`.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    /// Key/value heads (`n_kv_head` or `n_head`).
    pub fn n_kv_head(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// SwiGLU hidden size: `int(2*4*dim/3)`, times the multiplier if set, rounded up to a
    /// multiple of `multiple_of`.
    pub fn ffn_hidden(&self) -> usize {
        let mut h = 2 * 4 * self.dim / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            h = (m * h as f64) as usize;
        }
        find_multiple(h, self.multiple_of)
    }

    /// Side of the image token grid, `sqrt(block_size)`.
    pub fn grid_size(&self) -> usize {
        let mut g = (self.block_size as f64).sqrt() as usize;
        while g * g > self.block_size {
            g -= 1;
        }
        while (g + 1) * (g + 1) <= self.block_size {
            g += 1;
        }
        g
    }

    /// Rows of the class table: `num_classes + 1` when class dropout is on (the extra row is
    /// the CFG null class), else `num_classes`.
    pub fn class_table_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }

    /// The state-dict entries (official key names, shapes, in official order), including the
    /// t2i `cls_embedding.uncond_embedding` buffer.
    pub fn state_dict_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.dim;
        let h = self.ffn_hidden();
        let hd = self.head_dim();
        let qkv = (self.n_head + 2 * self.n_kv_head()) * hd;
        let mut out = Vec::new();
        match self.model_type {
            ModelType::C2i => out.push((
                "cls_embedding.embedding_table.weight".to_string(),
                vec![self.class_table_rows(), d],
            )),
            ModelType::T2i => {
                out.push((
                    UNCOND_KEY.to_string(),
                    vec![UNCOND_CAPTION_TOKENS, self.caption_dim],
                ));
                out.push((
                    "cls_embedding.cap_proj.fc1.weight".to_string(),
                    vec![d, self.caption_dim],
                ));
                out.push(("cls_embedding.cap_proj.fc2.weight".to_string(), vec![d, d]));
            }
        }
        out.push((
            "tok_embeddings.weight".to_string(),
            vec![self.vocab_size, d],
        ));
        for i in 0..self.n_layer {
            let p = format!("layers.{i}.");
            out.push((format!("{p}attention.wqkv.weight"), vec![qkv, d]));
            out.push((format!("{p}attention.wo.weight"), vec![d, d]));
            out.push((format!("{p}feed_forward.w1.weight"), vec![h, d]));
            out.push((format!("{p}feed_forward.w3.weight"), vec![h, d]));
            out.push((format!("{p}feed_forward.w2.weight"), vec![d, h]));
            out.push((format!("{p}attention_norm.weight"), vec![d]));
            out.push((format!("{p}ffn_norm.weight"), vec![d]));
        }
        out.push(("norm.weight".to_string(), vec![d]));
        out.push(("output.weight".to_string(), vec![self.vocab_size, d]));
        out
    }

    /// Names of the trainable parameters (the state dict without buffers), in state-dict order.
    pub fn parameter_names(&self) -> Vec<String> {
        self.state_dict_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n != UNCOND_KEY)
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.state_dict_shapes()
            .into_iter()
            .filter(|(n, _)| n != UNCOND_KEY)
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// State-dict key of the t2i null-caption buffer.
pub const UNCOND_KEY: &str = "cls_embedding.uncond_embedding";

/// Whether a state-dict key is one the official code may leave in a checkpoint that is not
/// model state: the recomputed RoPE table and KV-cache buffers. Such keys are ignored on load.
pub fn is_ignorable_key(name: &str) -> bool {
    name == "freqs_cis"
        || name.ends_with(".freqs_cis")
        || name.ends_with(".kv_cache.k_cache")
        || name.ends_with(".kv_cache.v_cache")
        || name == "causal_mask"
}
