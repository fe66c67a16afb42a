//! Autoregressive generation with a KV cache and classifier-free guidance, following the
//! official `generate()`.
//!
//! Invariants enforced here:
//! - With CFG (`cfg_scale > 1`) the batch is doubled, conditional half first: c2i appends the
//!   null class `num_classes`; t2i appends `zeros_like(caption) + uncond_embedding`, which needs
//!   captions of exactly 120 tokens. Both halves use the same caption mask and are fed the same
//!   sampled token. Guided logits are `uncond + (cond - uncond) * cfg_scale`.
//! - Prefill runs only the condition positions `0..T` and its last position yields image token
//!   0; decode step `i` feeds token `i` at position `T + i` and yields token `i + 1`, so
//!   `max_new_tokens` tokens come out and the last one is never fed back.
//! - With `cfg_interval >= 0`, decode steps `i > cfg_interval` use the conditional logits only
//!   (the doubled batch is still run); the prefill token always uses CFG.
//! - Sampling order: last position, divide by `max(temperature, 1e-5)`, top-k (keep logits
//!   `>=` the k-th largest), top-p on the top-k-filtered logits (drop sorted tokens whose
//!   cumulative probability exceeds `top_p`, shifted right by one so the top token and the first
//!   one crossing the threshold survive), softmax, then a multinomial draw or argmax.

use candle_core::{DType, Tensor};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::config::{ModelType, UNCOND_CAPTION_TOKENS};
use crate::error::{Result, TrainError};
use crate::gpt::{Condition, Gpt, KvCache, caption_attention_mask};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Classifier-free guidance scale; CFG is on when > 1. Default 1.0 (off); the official
    /// sample scripts use 4.0 (c2i) and 7.5 (t2i).
    pub cfg_scale: f32,
    /// Last decode step (0-based) that uses CFG; -1 means every step. Default -1.
    pub cfg_interval: i64,
    /// Softmax temperature (clamped below at 1e-5). Default 1.0.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables. Default 0.
    pub top_k: usize,
    /// Nucleus threshold; 1.0 disables. Default 1.0.
    pub top_p: f32,
    /// Draw from the distribution (true) or take its argmax (false). Default true.
    pub sample_logits: bool,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            cfg_scale: 1.0,
            cfg_interval: -1,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            sample_logits: true,
        }
    }
}

/// Applies temperature, top-k and top-p to one row of logits and returns the probabilities
/// (removed tokens have probability 0).
pub fn filtered_probs(logits: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<f32> {
    let t = temperature.max(1e-5);
    let mut x: Vec<f32> = logits.iter().map(|&v| v / t).collect();
    let n = x.len();
    if top_k > 0 {
        let k = top_k.clamp(1, n);
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for v in x.iter_mut() {
            if *v < kth {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    if top_p < 1.0 {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
        let sorted: Vec<f32> = order.iter().map(|&i| x[i]).collect();
        let probs = softmax(&sorted);
        let mut cum = 0f32;
        let mut remove = vec![false; n];
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            remove[i] = cum > top_p;
        }
        for i in (1..n).rev() {
            remove[i] = remove[i - 1];
        }
        remove[0] = false;
        for (rank, &i) in order.iter().enumerate() {
            if remove[rank] {
                x[i] = f32::NEG_INFINITY;
            }
        }
    }
    softmax(&x)
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|&v| (v - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn draw(probs: &[f32], sample: bool, rng: &mut StdRng) -> u32 {
    if !sample {
        let mut best = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > probs[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let total: f32 = probs.iter().sum();
    let u = rng.random::<f32>() * total;
    let mut acc = 0f32;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last = i;
            acc += p;
            if u < acc {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Combines the (possibly doubled) last-position logits `(B2, V)` into `B` rows.
fn guide(rows: Vec<Vec<f32>>, b: usize, cfg: bool, use_cfg: bool, scale: f32) -> Vec<Vec<f32>> {
    if !cfg {
        return rows;
    }
    let (cond, uncond) = rows.split_at(b);
    if !use_cfg {
        return cond.to_vec();
    }
    cond.iter()
        .zip(uncond)
        .map(|(c, u)| {
            c.iter()
                .zip(u)
                .map(|(&c, &u)| u + (c - u) * scale)
                .collect()
        })
        .collect()
}

/// The doubled (or not) condition of a generation.
fn combined_condition(model: &Gpt, cond: &Condition, cfg: bool) -> Result<Condition> {
    if !cfg {
        return Ok(cond.clone());
    }
    Ok(match cond {
        Condition::Class(labels) => {
            let labels = labels.to_dtype(DType::U32)?;
            let null = Tensor::full(
                model.config().num_classes as u32,
                labels.dim(0)?,
                labels.device(),
            )?;
            Condition::Class(Tensor::cat(&[&labels, &null], 0)?)
        }
        Condition::Caption(caption) => {
            let uncond = model.uncond_embedding().ok_or_else(|| {
                TrainError::InvalidInput("caption condition for a c2i model".into())
            })?;
            let (b, t, c) = caption.dims3()?;
            if t != UNCOND_CAPTION_TOKENS {
                return Err(TrainError::InvalidInput(format!(
                    "t2i CFG needs {UNCOND_CAPTION_TOKENS}-token captions (the null caption has {UNCOND_CAPTION_TOKENS} rows); got {t}"
                )));
            }
            let null = uncond
                .to_dtype(caption.dtype())?
                .unsqueeze(0)?
                .broadcast_as((b, t, c))?
                .contiguous()?;
            Condition::Caption(Tensor::cat(&[caption, &null], 0)?)
        }
    })
}

/// Generates `max_new_tokens` image tokens per condition. `emb_mask` `(B, T)` marks the real
/// tokens of left-padded captions (t2i only; None = every caption token is real). Returns u32
/// tokens `(B, max_new_tokens)`.
pub fn generate(
    model: &Gpt,
    cond: &Condition,
    emb_mask: Option<&Tensor>,
    max_new_tokens: usize,
    sc: &SamplingConfig,
    rng: &mut StdRng,
) -> Result<Tensor> {
    let mcfg = model.config();
    let b = cond.batch_size()?;
    let cfg = sc.cfg_scale > 1.0;
    let t = match (mcfg.model_type, cond) {
        (ModelType::C2i, Condition::Class(_)) => mcfg.cls_token_num,
        (ModelType::T2i, Condition::Caption(c)) => c.dim(1)?,
        _ => {
            return Err(TrainError::InvalidInput(
                "condition kind does not match the model type".into(),
            ));
        }
    };
    if t != mcfg.cls_token_num {
        return Err(TrainError::InvalidInput(format!(
            "generation needs captions of cls_token_num = {} tokens, got {t}",
            mcfg.cls_token_num
        )));
    }
    if max_new_tokens == 0 || max_new_tokens > mcfg.block_size {
        return Err(TrainError::InvalidInput(format!(
            "max_new_tokens {max_new_tokens} must be in 1..={}",
            mcfg.block_size
        )));
    }
    let combined = combined_condition(model, cond, cfg)?;
    let b2 = if cfg { 2 * b } else { b };
    let seq = t + max_new_tokens;
    let full_mask = match (emb_mask, mcfg.model_type) {
        (Some(m), ModelType::T2i) => {
            let (mb, mt) = m.dims2()?;
            if (mb, mt) != (b, t) {
                return Err(TrainError::InvalidInput(format!(
                    "emb_mask shape {:?}, expected ({b}, {t})",
                    m.dims()
                )));
            }
            let m = if cfg {
                Tensor::cat(&[m, m], 0)?
            } else {
                m.clone()
            };
            Some(caption_attention_mask(&m, seq)?)
        }
        (Some(_), ModelType::C2i) => {
            return Err(TrainError::InvalidInput(
                "emb_mask is only meaningful for t2i".into(),
            ));
        }
        (None, _) => None,
    };
    let step_mask = |q0: usize, lq: usize| -> Result<Option<Tensor>> {
        Ok(match &full_mask {
            Some(m) => Some(m.narrow(2, q0, lq)?.narrow(3, 0, q0 + lq)?),
            None => None,
        })
    };

    let mut cache = KvCache::with_capacity(mcfg.n_layer, seq);
    let emb = model.embed_condition(&combined, &mut None)?;
    let logits = model.forward_cached(&emb, &mut cache, step_mask(0, t)?.as_ref())?;
    let last = |logits: &Tensor| -> Result<Vec<Vec<f32>>> {
        let l = logits.dim(1)?;
        Ok(logits.narrow(1, l - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?)
    };
    let pick = |rows: Vec<Vec<f32>>, rng: &mut StdRng| -> Vec<u32> {
        rows.iter()
            .map(|r| {
                let p = filtered_probs(r, sc.temperature, sc.top_k, sc.top_p);
                draw(&p, sc.sample_logits, rng)
            })
            .collect()
    };
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(max_new_tokens); b];
    let mut next = pick(guide(last(&logits)?, b, cfg, true, sc.cfg_scale), rng);
    for (row, &tok) in tokens.iter_mut().zip(&next) {
        row.push(tok);
    }
    for i in 0..max_new_tokens - 1 {
        let mut ids = next.clone();
        if cfg {
            ids.extend_from_slice(&next);
        }
        let x = model.embed_tokens(&Tensor::from_vec(ids, (b2, 1), model.device())?)?;
        let logits = model.forward_cached(&x, &mut cache, step_mask(t + i, 1)?.as_ref())?;
        let use_cfg = !(sc.cfg_interval > -1 && i as i64 > sc.cfg_interval);
        next = pick(guide(last(&logits)?, b, cfg, use_cfg, sc.cfg_scale), rng);
        for (row, &tok) in tokens.iter_mut().zip(&next) {
            row.push(tok);
        }
    }
    let flat: Vec<u32> = tokens.into_iter().flatten().collect();
    Ok(Tensor::from_vec(flat, (b, max_new_tokens), model.device())?.to_dtype(DType::U32)?)
}

/// Teacher-forced CFG logits of a full token sequence `(B, N)`: one full-sequence forward of
/// the (doubled) batch, combined as in generation (every position guided). Returns `(B, N, V)`.
pub fn teacher_forced_logits(
    model: &Gpt,
    cond: &Condition,
    emb_mask: Option<&Tensor>,
    tokens: &Tensor,
    cfg_scale: f32,
) -> Result<Tensor> {
    let cfg = cfg_scale > 1.0;
    let b = tokens.dim(0)?;
    let n = tokens.dim(1)?;
    let combined = combined_condition(model, cond, cfg)?;
    let toks = if cfg {
        Tensor::cat(&[tokens, tokens], 0)?
    } else {
        tokens.clone()
    };
    let idx = toks.narrow(1, 0, n - 1)?;
    let t = model.config().cls_token_num;
    let mask = match emb_mask {
        Some(m) => {
            let m = if cfg {
                Tensor::cat(&[m, m], 0)?
            } else {
                m.clone()
            };
            Some(caption_attention_mask(&m, t + n - 1)?)
        }
        None => None,
    };
    let logits = model.forward(&idx, &combined, mask.as_ref(), None)?;
    if !cfg {
        return Ok(logits);
    }
    let c = logits.narrow(0, 0, b)?;
    let u = logits.narrow(0, b, b)?;
    Ok((&u + ((c - &u)? * cfg_scale as f64)?)?)
}

// ---------------------------------------------------------------------------------------------
// Per-image generation with continuous batching.
//
// Invariants enforced here (by `BatchDecoder`):
// - Every image has its own generator, `StdRng::seed_from_u64(per_image_seed(seed, index))`,
//   and draws exactly one number per token from it, in token order, so its tokens depend only
//   on its condition, its settings and that seed: never on the other images decoded with it
//   (the decoder's rows are independent, `gpt::PagedDecoder`). `llamagen sample
//   --per-image-seeds` and `llamagen serve` both generate through this type.
// - A CFG image is two rows (conditional, unconditional) admitted, stepped and released
//   together; both are fed the same sampled token. Guidance, the CFG interval and the
//   sampling order are those of [`generate`] (see the top of this module).
// - An image is admitted only when the pool has blocks for its whole length
//   (`cls_token_num + max_new_tokens - 1` positions per row), so a running image never waits
//   for memory; its blocks return to the pool when it finishes or is cancelled.
// ---------------------------------------------------------------------------------------------

/// The seed of the generator of image `index` of a request (or an offline run) seeded `seed`
/// (SplitMix64 mixing: the same numbers on every platform).
pub fn per_image_seed(seed: u64, index: u64) -> u64 {
    fn mix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut s = seed;
    let a = mix(&mut s);
    let mut s = a ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    mix(&mut s)
}

/// The condition of one image.
#[derive(Debug, Clone)]
pub enum ImageCondition {
    /// A class label (c2i).
    Class(u32),
    /// Caption features `(T, caption_dim)` row-major, left-padded to `T = cls_token_num`, and
    /// the caption mask `(T)` (true = a real token) (t2i).
    Caption { features: Vec<f32>, mask: Vec<bool> },
}

/// One image to generate.
#[derive(Debug, Clone)]
pub struct ImageJob {
    pub condition: ImageCondition,
    pub sampling: SamplingConfig,
    /// The seed of this image's generator (see [`per_image_seed`]).
    pub seed: u64,
}

struct Active {
    id: u64,
    rows: Vec<crate::gpt::PagedSeq>,
    job: ImageJob,
    rng: StdRng,
    tokens: Vec<u32>,
}

/// Images being generated together by a [`crate::gpt::PagedDecoder`]: images join and leave
/// between steps (see the invariants above).
pub struct BatchDecoder {
    dec: crate::gpt::PagedDecoder,
    pool: crate::gpt::KvBlockPool,
    active: Vec<Active>,
    max_new_tokens: usize,
}

/// What a [`BatchDecoder::step`] did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// Images that got their last token: (id, tokens).
    pub finished: Vec<(u64, Vec<u32>)>,
    /// Rows (sequences) in the forward, and positions fed (prefill included).
    pub rows: usize,
    pub positions: usize,
    /// Tokens sampled.
    pub tokens: usize,
}

impl BatchDecoder {
    /// A decoder for `model` (CPU float32) whose pool holds `n_blocks` blocks of `block_size`
    /// positions; each image gets `model.config().block_size` tokens.
    pub fn new(model: &Gpt, block_size: usize, n_blocks: usize) -> Result<Self> {
        let dec = model.paged_decoder()?;
        let pool = crate::gpt::KvBlockPool::new(model.config(), block_size, n_blocks)?;
        Ok(BatchDecoder {
            max_new_tokens: model.config().block_size,
            dec,
            pool,
            active: Vec::new(),
        })
    }

    /// Blocks a pool needs for `images` CFG images at once (two rows each).
    pub fn blocks_for_images(cfg: &crate::GptConfig, block_size: usize, images: usize) -> usize {
        let positions = cfg.cls_token_num + cfg.block_size - 1;
        2 * images * positions.div_ceil(block_size.max(1))
    }

    /// The model configuration.
    pub fn config(&self) -> &crate::GptConfig {
        self.dec.config()
    }

    /// The decoder (condition checks).
    pub fn decoder(&self) -> &crate::gpt::PagedDecoder {
        &self.dec
    }

    /// Images in progress.
    pub fn active_images(&self) -> usize {
        self.active.len()
    }

    /// Rows (sequences) in progress.
    pub fn active_rows(&self) -> usize {
        self.active.iter().map(|a| a.rows.len()).sum()
    }

    /// Free and total pool blocks.
    pub fn pool_blocks(&self) -> (usize, usize) {
        (self.pool.free_blocks(), self.pool.n_blocks())
    }

    /// Checks that `job` can be generated by this model (condition kind, label range, CFG
    /// null class, caption shape, settings); the error names the offending field.
    pub fn check(&self, job: &ImageJob) -> Result<()> {
        let cfg = self.dec.config();
        let sc = &job.sampling;
        let bad = |m: String| Err(TrainError::InvalidInput(m));
        if !(sc.temperature.is_finite() && sc.temperature > 0.0) {
            return bad(format!("temperature {} must be > 0", sc.temperature));
        }
        if !(sc.top_p.is_finite() && sc.top_p > 0.0 && sc.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", sc.top_p));
        }
        if !sc.cfg_scale.is_finite() || sc.cfg_scale < 0.0 {
            return bad(format!("cfg_scale {} must be >= 0", sc.cfg_scale));
        }
        let cfg_on = sc.cfg_scale > 1.0;
        match (&job.condition, cfg.model_type) {
            (ImageCondition::Class(l), ModelType::C2i) => {
                if *l as usize >= cfg.num_classes {
                    return bad(format!(
                        "class_label {l} out of range (the model has {} classes)",
                        cfg.num_classes
                    ));
                }
                if cfg_on && !self.dec.has_class(cfg.num_classes as u32) {
                    return bad(
                        "cfg_scale > 1 needs the null class, which this model lacks (trained without class dropout)"
                            .into(),
                    );
                }
            }
            (ImageCondition::Caption { features, mask }, ModelType::T2i) => {
                let t = cfg.cls_token_num;
                if mask.len() != t || features.len() != t * cfg.caption_dim {
                    return bad(format!(
                        "caption of {} mask entries and {} floats, the model needs {t} x {}",
                        mask.len(),
                        features.len(),
                        cfg.caption_dim
                    ));
                }
                if cfg_on && t != UNCOND_CAPTION_TOKENS {
                    return bad(format!(
                        "t2i CFG needs {UNCOND_CAPTION_TOKENS}-token captions; the model has {t}"
                    ));
                }
            }
            (ImageCondition::Class(_), ModelType::T2i) => {
                return bad("class_label given to a t2i model: give a prompt".into());
            }
            (ImageCondition::Caption { .. }, ModelType::C2i) => {
                return bad("prompt given to a c2i model: give a class_label".into());
            }
        }
        Ok(())
    }

    /// Starts image `id` if the pool has blocks for it; returns false (nothing changed) when
    /// it does not. Errors when the job does not fit the model.
    pub fn admit(&mut self, id: u64, job: ImageJob) -> Result<bool> {
        self.check(&job)?;
        let cfg = self.dec.config();
        let positions = cfg.cls_token_num + self.max_new_tokens - 1;
        let n_rows = if job.sampling.cfg_scale > 1.0 { 2 } else { 1 };
        if self.pool.blocks_for(positions) * n_rows > self.pool.free_blocks() {
            return Ok(false);
        }
        let blocked: Vec<bool> = match &job.condition {
            ImageCondition::Caption { mask, .. } => mask.iter().map(|&m| !m).collect(),
            ImageCondition::Class(_) => Vec::new(),
        };
        let rows = (0..n_rows)
            .map(|_| {
                self.pool
                    .allocate(positions, blocked.clone())
                    .expect("free blocks counted above")
            })
            .collect();
        self.active.push(Active {
            id,
            rows,
            rng: StdRng::seed_from_u64(job.seed),
            job,
            tokens: Vec::with_capacity(self.max_new_tokens),
        });
        Ok(true)
    }

    /// Drops image `id` (a cancelled request), returning its blocks; false if it is not active.
    pub fn cancel(&mut self, id: u64) -> bool {
        let Some(i) = self.active.iter().position(|a| a.id == id) else {
            return false;
        };
        let a = self.active.remove(i);
        for r in a.rows {
            self.pool.release(r);
        }
        true
    }

    /// One forward over every active image: prefill for the images admitted since the last
    /// step, one token for the others. Images that got their last token leave.
    pub fn step(&mut self) -> Result<StepReport> {
        let cfg = self.dec.config().clone();
        let mut report = StepReport::default();
        if self.active.is_empty() {
            return Ok(report);
        }
        // Inputs: owned embeddings per item (prefill conditions), borrowed for tokens.
        let mut owned: Vec<Vec<f32>> = Vec::new();
        // (seq index, source, logits?) with source = owned index or token.
        enum Src {
            Owned(usize, usize),
            Token(u32),
        }
        let mut plan: Vec<(usize, Src, bool)> = Vec::new();
        let mut seq_of: Vec<(usize, usize)> = Vec::new();
        for (ai, a) in self.active.iter().enumerate() {
            for (ri, row) in a.rows.iter().enumerate() {
                let si = seq_of.len();
                seq_of.push((ai, ri));
                if row.is_empty() {
                    let emb = match (&a.job.condition, ri) {
                        (ImageCondition::Class(l), 0) => self.dec.class_embedding(*l)?.to_vec(),
                        (ImageCondition::Class(_), _) => {
                            self.dec.class_embedding(cfg.num_classes as u32)?.to_vec()
                        }
                        (ImageCondition::Caption { features, .. }, 0) => {
                            self.dec.caption_embeddings(Some(features))?
                        }
                        (ImageCondition::Caption { .. }, _) => self.dec.caption_embeddings(None)?,
                    };
                    let t = cfg.cls_token_num;
                    let k = owned.len();
                    owned.push(emb);
                    for p in 0..t {
                        plan.push((si, Src::Owned(k, p), p + 1 == t));
                    }
                } else {
                    let tok = *a.tokens.last().expect("a started image has a token");
                    plan.push((si, Src::Token(tok), true));
                }
            }
        }
        let d = cfg.dim;
        let items: Vec<crate::gpt::DecodeItem> = plan
            .iter()
            .map(|(si, src, want)| {
                Ok(crate::gpt::DecodeItem {
                    seq: *si,
                    embedding: match src {
                        Src::Owned(k, p) => &owned[*k][p * d..(p + 1) * d],
                        Src::Token(t) => self.dec.token_embedding(*t)?,
                    },
                    logits: *want,
                })
            })
            .collect::<Result<_>>()?;
        report.rows = seq_of.len();
        report.positions = items.len();
        let mut seqs: Vec<&mut crate::gpt::PagedSeq> = self
            .active
            .iter_mut()
            .flat_map(|a| a.rows.iter_mut())
            .collect();
        let logits = self.dec.forward(&mut self.pool, &mut seqs, &items)?;
        drop(seqs);
        // One logits row per sequence, in sequence order (each asks for exactly one).
        let mut li = 0;
        let mut done = Vec::new();
        for (ai, a) in self.active.iter_mut().enumerate() {
            let rows: Vec<Vec<f32>> = (0..a.rows.len())
                .map(|_| {
                    li += 1;
                    logits[li - 1].clone()
                })
                .collect();
            let sc = &a.job.sampling;
            let cfg_on = rows.len() == 2;
            // Token k is sampled from the forward that fed token k-1 (decode step i = k-1);
            // token 0 comes from the prefill, which always uses CFG.
            let k = a.tokens.len();
            let use_cfg = k == 0 || !(sc.cfg_interval > -1 && (k - 1) as i64 > sc.cfg_interval);
            let guided = guide(rows, 1, cfg_on, use_cfg, sc.cfg_scale);
            let p = filtered_probs(&guided[0], sc.temperature, sc.top_k, sc.top_p);
            a.tokens.push(draw(&p, sc.sample_logits, &mut a.rng));
            report.tokens += 1;
            if a.tokens.len() == self.max_new_tokens {
                done.push(ai);
            }
        }
        for ai in done.into_iter().rev() {
            let a = self.active.remove(ai);
            for r in a.rows {
                self.pool.release(r);
            }
            report.finished.push((a.id, a.tokens));
        }
        report.finished.reverse();
        Ok(report)
    }
}

/// Generates one image per job, `batch` images at a time, through a [`BatchDecoder`]: each
/// image's tokens depend only on its job (see the invariants above). Returns the tokens of each
/// image, in job order.
pub fn generate_per_image(model: &Gpt, jobs: &[ImageJob], batch: usize) -> Result<Vec<Vec<u32>>> {
    let block = 16;
    let per = batch.max(1).min(jobs.len().max(1));
    let blocks = BatchDecoder::blocks_for_images(model.config(), block, per);
    let mut dec = BatchDecoder::new(model, block, blocks)?;
    let mut out: Vec<Option<Vec<u32>>> = vec![None; jobs.len()];
    let mut next = 0;
    while next < jobs.len() || dec.active_images() > 0 {
        while next < jobs.len() && dec.admit(next as u64, jobs[next].clone())? {
            next += 1;
        }
        for (id, toks) in dec.step()?.finished {
            out[id as usize] = Some(toks);
        }
    }
    Ok(out
        .into_iter()
        .map(|t| t.expect("every job finishes"))
        .collect())
}

#[cfg(test)]
mod paged_tests {
    use super::*;
    use crate::GptConfig;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    /// A random model (every weight drawn, `output` included) of type `t`.
    fn random_model(t: ModelType, seed: u64) -> Gpt {
        let cfg = GptConfig {
            dim: 32,
            n_layer: 2,
            n_head: 4,
            n_kv_head: Some(2),
            multiple_of: 16,
            vocab_size: 48,
            num_classes: 5,
            block_size: 16,
            model_type: t,
            caption_dim: 8,
            cls_token_num: if t == ModelType::T2i { 6 } else { 1 },
            ..GptConfig::default()
        };
        let vm = VarMap::new();
        let model = crate::checkpoint::new_trainable(&vm, &cfg, &Device::Cpu).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        for v in vm.all_vars() {
            let n = v.elem_count();
            let x: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
            let x = Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap();
            Var::set(&v, &x).unwrap();
        }
        model
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The paged forward agrees with `forward_cached` (the offline sampler's) within float32
    /// summation order, for c2i and for t2i with a left-padded caption.
    #[test]
    fn paged_forward_matches_forward_cached() {
        for t in [ModelType::C2i, ModelType::T2i] {
            let model = random_model(t, 3);
            let cfg = model.config().clone();
            let dec = model.paged_decoder().unwrap();
            let mut pool = crate::gpt::KvBlockPool::new(&cfg, 4, 16).unwrap();
            let tn = cfg.cls_token_num;
            let (cond, mask, blocked, emb) = match t {
                ModelType::C2i => (
                    Condition::Class(Tensor::new(&[3u32], &Device::Cpu).unwrap()),
                    None,
                    vec![],
                    dec.class_embedding(3).unwrap().to_vec(),
                ),
                ModelType::T2i => {
                    let mut rng = StdRng::seed_from_u64(5);
                    let mut f: Vec<f32> = (0..tn * cfg.caption_dim)
                        .map(|_| rng.random::<f32>() - 0.5)
                        .collect();
                    f[..2 * cfg.caption_dim].fill(0.0);
                    let m: Vec<f32> = (0..tn).map(|i| if i < 2 { 0.0 } else { 1.0 }).collect();
                    let emb = dec.caption_embeddings(Some(&f)).unwrap();
                    (
                        Condition::Caption(
                            Tensor::from_vec(f, (1, tn, cfg.caption_dim), &Device::Cpu).unwrap(),
                        ),
                        Some(Tensor::from_vec(m, (1, tn), &Device::Cpu).unwrap()),
                        (0..tn).map(|i| i < 2).collect(),
                        emb,
                    )
                }
            };
            let mut seq = pool.allocate(tn + 8, blocked).unwrap();
            let seq_len = tn + 8;
            let full_mask = mask.map(|m| caption_attention_mask(&m, seq_len).unwrap());
            let mut cache = KvCache::new(cfg.n_layer);
            let e = model.embed_condition(&cond, &mut None).unwrap();
            let step_mask = |q0: usize, lq: usize| {
                full_mask
                    .as_ref()
                    .map(|m| m.narrow(2, q0, lq).unwrap().narrow(3, 0, q0 + lq).unwrap())
            };
            let want = model
                .forward_cached(&e, &mut cache, step_mask(0, tn).as_ref())
                .unwrap();
            let want: Vec<f32> = want.get(0).unwrap().get(tn - 1).unwrap().to_vec1().unwrap();
            let items: Vec<crate::gpt::DecodeItem> = (0..tn)
                .map(|p| crate::gpt::DecodeItem {
                    seq: 0,
                    embedding: &emb[p * cfg.dim..(p + 1) * cfg.dim],
                    logits: p + 1 == tn,
                })
                .collect();
            let got = dec.forward(&mut pool, &mut [&mut seq], &items).unwrap();
            assert_eq!(got.len(), 1);
            assert!(max_diff(&got[0], &want) < 1e-4, "{t:?} prefill");
            for (i, tok) in [7u32, 1, 40, 2, 2].into_iter().enumerate() {
                let x = model
                    .embed_tokens(&Tensor::new(&[[tok]], &Device::Cpu).unwrap())
                    .unwrap();
                let w = model
                    .forward_cached(&x, &mut cache, step_mask(tn + i, 1).as_ref())
                    .unwrap();
                let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                let it = [crate::gpt::DecodeItem {
                    seq: 0,
                    embedding: dec.token_embedding(tok).unwrap(),
                    logits: true,
                }];
                let g = dec.forward(&mut pool, &mut [&mut seq], &it).unwrap();
                assert!(max_diff(&g[0], &w) < 1e-4, "{t:?} step {i}");
            }
        }
    }

    /// An image's tokens depend only on its job: alone, in a batch of 5, in a batch of 3 with
    /// other jobs ahead of it (joining mid-way), the same tokens; other seeds give others.
    #[test]
    fn per_image_tokens_do_not_depend_on_the_batch() {
        let model = random_model(ModelType::C2i, 9);
        let job = |label: u32, cfg_scale: f32, seed: u64| ImageJob {
            condition: ImageCondition::Class(label),
            sampling: SamplingConfig {
                cfg_scale,
                cfg_interval: if cfg_scale > 2.0 { 5 } else { -1 },
                temperature: 0.9,
                top_k: 20,
                top_p: 0.95,
                sample_logits: true,
            },
            seed: per_image_seed(seed, 0),
        };
        let jobs: Vec<ImageJob> = vec![
            job(1, 3.0, 1),
            job(2, 1.0, 2),
            job(3, 1.5, 3),
            job(1, 3.0, 4),
            job(4, 4.0, 5),
        ];
        let alone: Vec<Vec<u32>> = jobs
            .iter()
            .map(|j| generate_per_image(&model, std::slice::from_ref(j), 1).unwrap()[0].clone())
            .collect();
        assert_eq!(generate_per_image(&model, &jobs, 5).unwrap(), alone);
        assert_eq!(generate_per_image(&model, &jobs, 3).unwrap(), alone);
        assert_ne!(alone[0], alone[3]);
        // Joining mid-way: image 0 runs 5 steps alone before the others join.
        let mut dec = BatchDecoder::new(&model, 4, 64).unwrap();
        assert!(dec.admit(0, jobs[0].clone()).unwrap());
        let mut out = vec![Vec::new(); 5];
        for _ in 0..5 {
            dec.step().unwrap();
        }
        for (i, j) in jobs.iter().enumerate().skip(1) {
            assert!(dec.admit(i as u64, j.clone()).unwrap());
        }
        while dec.active_images() > 0 {
            for (id, t) in dec.step().unwrap().finished {
                out[id as usize] = t;
            }
        }
        assert_eq!(out, alone);
        assert_eq!(dec.pool_blocks().0, 64, "every block returned");
    }
}
