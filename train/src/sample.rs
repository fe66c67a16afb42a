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
