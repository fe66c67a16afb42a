//! Scoring samples: one decode per image, one embedding pass per encoder, every head on it.
//!
//! Invariants enforced here:
//! - Each row's image is decoded once; the CLIP tensor is computed once per input size and
//!   shared by the ViT-B/32 and ViT-L/14 encoders when their sizes agree; the ViT-L/14 embedding
//!   is computed once and feeds both the aesthetic and the NSFW head.
//! - Embeddings are always L2-normalised after the encoder (idempotent for exports that already
//!   normalise) before the cosine and before any head.
//! - That L2-normalised ViT-L/14 embedding is also returned per row ([`Scores::l14_embedding`])
//!   whenever the ViT-L/14 encoder is configured, heads or not; the scoring stage stores it as
//!   `clip_embedding` (f16, one token). Rows without a decoded image get none.
//! - `pwatermark` = softmax of the classifier's logits at [`ScorerConfig::watermark_class_index`].
//! - A row whose image is missing or cannot be decoded gets null scores and a per-row error; it
//!   never fails the batch. A row without the configured caption gets a null similarity.
//! - Decoding and preprocessing of batch k+1 run (on a thread pool) while batch k is in
//!   inference; results are identical to running the steps one after the other.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rayon::prelude::*;

use crate::error::{FilterError, Result};
use crate::heads::Head;
use crate::model::{ModelOptions, OnnxModel, Role, l2_normalise};
use crate::preprocess::{
    CLIP_PREPROCESS_VERSION, WATERMARK_PREPROCESS_VERSION, clip_preprocess_into, decode_rgb,
    watermark_preprocess_into,
};
use crate::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};

/// Which caption the CLIP similarity compares the image with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionField {
    /// The original alt-text (`text`, LAION's `TEXT`): what LAION's `similarity` scores.
    #[default]
    Text,
    /// LAION-COCO's synthetic caption (`top_caption`).
    TopCaption,
    /// A long generated caption (`long_caption`).
    LongCaption,
}

impl CaptionField {
    /// The catalog column holding the caption.
    pub fn column(self) -> &'static str {
        use llamagen_catalog::schema::col;
        match self {
            CaptionField::Text => col::TEXT,
            CaptionField::TopCaption => col::TOP_CAPTION,
            CaptionField::LongCaption => col::LONG_CAPTION,
        }
    }
}

impl std::str::FromStr for CaptionField {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(CaptionField::Text),
            "top_caption" => Ok(CaptionField::TopCaption),
            "long_caption" => Ok(CaptionField::LongCaption),
            o => Err(FilterError::Config(format!(
                "unknown caption field {o:?} (text, top_caption or long_caption)"
            ))),
        }
    }
}

/// What to score and with which models. Every model is optional; a score whose models are not
/// configured is not computed (its column is left as it was).
#[derive(Debug, Clone, Default)]
pub struct ScorerConfig {
    /// CLIP ViT-B/32 image encoder (ONNX, `[N,3,224,224]` → `[N,512]`). With `clip_text`: the
    /// image–text similarity. Default: none.
    pub clip_image: Option<PathBuf>,
    /// CLIP ViT-B/32 text encoder (ONNX, int32/int64 `[N,77]` → `[N,512]`). Default: none.
    pub clip_text: Option<PathBuf>,
    /// Caption compared with the image (default: the alt-text, `text`).
    pub caption: CaptionField,
    /// CLIP ViT-L/14 image encoder (ONNX, → `[N,768]`) feeding the aesthetic and NSFW heads.
    /// Default: none.
    pub clip_l14_image: Option<PathBuf>,
    /// Aesthetic head (`.pth` LAION V1/V2 or `.onnx`). Default (when `clip_l14_image` is set):
    /// the bundled LAION-Aesthetics V2 head `sac+logos+ava1-l14-linearMSE.pth`.
    pub aesthetic_head: Option<PathBuf>,
    /// Turn the aesthetic score off even when `clip_l14_image` is set (default false).
    pub no_aesthetic: bool,
    /// NSFW head on the ViT-L/14 embedding (`.onnx`, `[N,768]` → probability `[N,1]`).
    /// Default: none (no `score_nsfw`).
    pub nsfw_head: Option<PathBuf>,
    /// LAION's watermark classifier (ONNX, `[N,3,256,256]` → logits `[N,2]`). Default: none.
    pub watermark: Option<PathBuf>,
    /// Softmax index that means "watermark" (LAION's model: 0, the default).
    pub watermark_class_index: usize,
    /// Session options: intra-op threads, provider, batch size (see [`ModelOptions`]).
    pub model: ModelOptions,
    /// Threads decoding and preprocessing images (0 = one per core, the default).
    pub preprocess_threads: usize,
    /// Largest image accepted, in pixels (default 178,956,970, PIL's bomb limit).
    pub max_pixels: u64,
}

impl ScorerConfig {
    /// Default limits with no models.
    pub fn new() -> ScorerConfig {
        ScorerConfig {
            max_pixels: 178_956_970,
            ..Default::default()
        }
    }
}

/// One row to score.
#[derive(Debug, Clone, Copy)]
pub struct SampleInput<'a> {
    /// Encoded image (the largest stored rendition).
    pub image: Option<&'a [u8]>,
    /// The configured caption.
    pub caption: Option<&'a str>,
}

/// Scores of a batch (one entry per input row; `None` = not computed or not computable).
#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub clip_similarity: Vec<Option<f32>>,
    pub aesthetic: Vec<Option<f32>>,
    pub watermark: Vec<Option<f32>>,
    pub nsfw: Vec<Option<f32>>,
    /// The L2-normalised ViT-L/14 image embedding (the aesthetic and NSFW heads' input); `None`
    /// without a ViT-L/14 encoder or a decoded image.
    pub l14_embedding: Vec<Option<Vec<f32>>>,
    /// Why a row's image gave no scores (`no_image`, `decode_error: …`).
    pub errors: Vec<Option<String>>,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    /// Thread-seconds spent decoding images.
    pub decode_s: f64,
    /// Thread-seconds spent resizing, cropping, normalising and tokenizing.
    pub preprocess_s: f64,
    /// Wall seconds in model inference (and heads).
    pub inference_s: f64,
    /// Wall seconds of the whole call.
    pub total_s: f64,
    pub images: u64,
}

impl Timings {
    pub fn add(&mut self, o: &Timings) {
        self.decode_s += o.decode_s;
        self.preprocess_s += o.preprocess_s;
        self.inference_s += o.inference_s;
        self.total_s += o.total_s;
        self.images += o.images;
    }
}

/// How `clip_embedding` stores the ViT-L/14 embedding (after the preprocessing version in its
/// `provenance` entry).
pub const CLIP_EMBEDDING_VERSION: &str = "l2-normalised-f16-v1";

/// One model's identity as stored in `provenance`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelId {
    /// Column the model contributes to (a score column or `clip_embedding`).
    pub score: &'static str,
    pub model: String,
    pub sha256: String,
    /// Preprocessing version (plus caption field for the text encoder).
    pub version: String,
}

/// Loaded models, ready to score.
pub struct Scorer {
    cfg: ScorerConfig,
    clip_image: Option<OnnxModel>,
    clip_text: Option<OnnxModel>,
    l14: Option<OnnxModel>,
    aesthetic: Option<Head>,
    nsfw: Option<Head>,
    watermark: Option<OnnxModel>,
    pool: rayon::ThreadPool,
}

/// A preprocessed chunk of rows.
struct Prepared {
    /// Row indices (within the call) whose image decoded.
    rows: Vec<usize>,
    /// CLIP tensors per distinct input size: (size, [rows.len(),3,s,s]).
    clip: Vec<(u32, Vec<f32>)>,
    watermark: Vec<f32>,
    /// Token rows for `rows` that have a caption (index into rows, tokens).
    tokens: Vec<(usize, [u32; CONTEXT_LENGTH])>,
    errors: Vec<(usize, String)>,
    decode_s: f64,
    preprocess_s: f64,
}

impl Scorer {
    /// Loads every configured model (see [`ScorerConfig`]).
    pub fn load(cfg: ScorerConfig) -> Result<Scorer> {
        let o = &cfg.model;
        let load = |p: &Option<PathBuf>, role| -> Result<Option<OnnxModel>> {
            p.as_ref()
                .map(|p| OnnxModel::load(p, role, None, o))
                .transpose()
        };
        let clip_image = load(&cfg.clip_image, Role::Image)?;
        let clip_text = load(&cfg.clip_text, Role::Text)?;
        if clip_image.is_some() != clip_text.is_some() {
            return Err(FilterError::Config(
                "the CLIP similarity needs both an image and a text encoder".into(),
            ));
        }
        let l14 = load(&cfg.clip_l14_image, Role::Image)?;
        let aesthetic = match (&l14, cfg.no_aesthetic, &cfg.aesthetic_head) {
            (None, _, Some(_)) => {
                return Err(FilterError::Config(
                    "an aesthetic head needs the ViT-L/14 image encoder (clip_l14_image)".into(),
                ));
            }
            (Some(_), false, Some(p)) => Some(Head::load(p, o)?),
            (Some(_), false, None) => Some(Head::aesthetic_v2()),
            _ => None,
        };
        let nsfw = match (&l14, &cfg.nsfw_head) {
            (None, Some(_)) => {
                return Err(FilterError::Config(
                    "an NSFW head needs the ViT-L/14 image encoder (clip_l14_image)".into(),
                ));
            }
            (Some(_), Some(p)) => Some(Head::load(p, o)?),
            _ => None,
        };
        let watermark = load(&cfg.watermark, Role::Image)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.preprocess_threads)
            .thread_name(|i| format!("filters-preprocess-{i}"))
            .build()
            .map_err(|e| FilterError::Config(format!("preprocess thread pool: {e}")))?;
        Ok(Scorer {
            cfg,
            clip_image,
            clip_text,
            l14,
            aesthetic,
            nsfw,
            watermark,
            pool,
        })
    }

    pub fn config(&self) -> &ScorerConfig {
        &self.cfg
    }

    /// Whether any score is configured.
    pub fn is_empty(&self) -> bool {
        self.clip_image.is_none() && self.l14.is_none() && self.watermark.is_none()
    }

    /// Which columns this scorer writes: its score columns, plus `clip_embedding` (the
    /// ViT-L/14 embedding) whenever the ViT-L/14 encoder is configured.
    pub fn columns(&self) -> Vec<&'static str> {
        use llamagen_catalog::schema::col;
        let mut c = Vec::new();
        if self.clip_image.is_some() {
            c.push(col::SCORE_CLIP_SIMILARITY);
        }
        if self.aesthetic.is_some() {
            c.push(col::SCORE_AESTHETIC);
        }
        if self.watermark.is_some() {
            c.push(col::SCORE_WATERMARK);
        }
        if self.nsfw.is_some() {
            c.push(col::SCORE_NSFW);
        }
        if self.l14.is_some() {
            c.push(col::CLIP_EMBEDDING);
        }
        c
    }

    /// The models behind each written column (see [`Scorer::columns`]), for `provenance`.
    pub fn model_ids(&self) -> Vec<ModelId> {
        use llamagen_catalog::schema::col;
        let mut v = Vec::new();
        let caption = format!("{:?}", self.cfg.caption).to_lowercase();
        if let (Some(i), Some(t)) = (&self.clip_image, &self.clip_text) {
            v.push(ModelId {
                score: col::SCORE_CLIP_SIMILARITY,
                model: i.name.clone(),
                sha256: i.sha256.clone(),
                version: CLIP_PREPROCESS_VERSION.into(),
            });
            v.push(ModelId {
                score: col::SCORE_CLIP_SIMILARITY,
                model: t.name.clone(),
                sha256: t.sha256.clone(),
                version: format!("clip-bpe-77-truncate-v1;caption={caption}"),
            });
        }
        if let Some(l) = &self.l14 {
            for (score, head) in [
                (col::SCORE_AESTHETIC, &self.aesthetic),
                (col::SCORE_NSFW, &self.nsfw),
            ] {
                if let Some(h) = head {
                    v.push(ModelId {
                        score,
                        model: l.name.clone(),
                        sha256: l.sha256.clone(),
                        version: CLIP_PREPROCESS_VERSION.into(),
                    });
                    v.push(ModelId {
                        score,
                        model: h.name.clone(),
                        sha256: h.sha256.clone(),
                        version: "l2-normalised-embedding-v1".into(),
                    });
                }
            }
            v.push(ModelId {
                score: col::CLIP_EMBEDDING,
                model: l.name.clone(),
                sha256: l.sha256.clone(),
                version: format!("{CLIP_PREPROCESS_VERSION};{CLIP_EMBEDDING_VERSION}"),
            });
        }
        if let Some(w) = &self.watermark {
            v.push(ModelId {
                score: col::SCORE_WATERMARK,
                model: w.name.clone(),
                sha256: w.sha256.clone(),
                version: format!(
                    "{WATERMARK_PREPROCESS_VERSION};softmax[{}]",
                    self.cfg.watermark_class_index
                ),
            });
        }
        v
    }

    fn clip_sizes(&self) -> Vec<u32> {
        let mut s: Vec<u32> = [&self.clip_image, &self.l14]
            .into_iter()
            .flatten()
            .map(|m| m.image_size(224))
            .collect();
        s.sort();
        s.dedup();
        s
    }

    /// Decodes and preprocesses `inputs` (rows `offset ..` of the call) on the thread pool.
    /// Each row's tensors are written in place into the batch tensors; `spare` (a chunk whose
    /// inference is done) lends its buffers.
    fn prepare(
        &self,
        inputs: &[SampleInput<'_>],
        offset: usize,
        spare: Option<Prepared>,
    ) -> Prepared {
        let sizes = self.clip_sizes();
        let wm = self.watermark.as_ref().map(|m| m.image_size(256));
        let want_text = self.clip_text.is_some();
        let n = inputs.len();
        let item = |s: u32| 3 * s as usize * s as usize;
        let (mut clip, mut watermark) = match spare {
            Some(p) => (p.clip.into_iter().map(|(_, v)| v).collect(), p.watermark),
            None => (Vec::new(), Vec::new()),
        };
        clip.resize_with(sizes.len(), Vec::new);
        for (buf, &s) in clip.iter_mut().zip(&sizes) {
            buf.resize(n * item(s), 0.0);
        }
        watermark.resize(wm.map_or(0, |w| n * item(w)), 0.0);

        // Each row's destinations: one slice per CLIP size, and the watermark slice.
        type Dest<'b> = (Vec<&'b mut [f32]>, Option<&'b mut [f32]>);
        let mut dests: Vec<Dest<'_>> = (0..n)
            .map(|_| (Vec::with_capacity(sizes.len()), None))
            .collect();
        for (buf, &s) in clip.iter_mut().zip(&sizes) {
            for (d, slot) in dests.iter_mut().zip(buf.chunks_exact_mut(item(s))) {
                d.0.push(slot);
            }
        }
        if let Some(w) = wm {
            for (d, slot) in dests.iter_mut().zip(watermark.chunks_exact_mut(item(w))) {
                d.1 = Some(slot);
            }
        }

        struct Row {
            tokens: Option<[u32; CONTEXT_LENGTH]>,
            decode_s: f64,
            pre_s: f64,
        }
        let tok = ClipTokenizer::bundled();
        let max_pixels = self.cfg.max_pixels;
        let rows: Vec<std::result::Result<Row, String>> = self.pool.install(|| {
            inputs
                .par_iter()
                .zip(dests)
                .map(|(inp, (clip_dst, wm_dst))| {
                    let t0 = Instant::now();
                    let bytes = inp.image.ok_or_else(|| "no_image".to_string())?;
                    let img =
                        decode_rgb(bytes, max_pixels).map_err(|e| format!("decode_error: {e}"))?;
                    let t1 = Instant::now();
                    for (&s, dst) in sizes.iter().zip(clip_dst) {
                        clip_preprocess_into(&img, s, dst);
                    }
                    if let (Some(n), Some(dst)) = (wm, wm_dst) {
                        watermark_preprocess_into(&img, n, dst);
                    }
                    let tokens = if want_text {
                        inp.caption.map(|c| tok.tokenize(c))
                    } else {
                        None
                    };
                    let t2 = Instant::now();
                    Ok(Row {
                        tokens,
                        decode_s: (t1 - t0).as_secs_f64(),
                        pre_s: (t2 - t1).as_secs_f64(),
                    })
                })
                .collect()
        });
        let mut p = Prepared {
            rows: vec![],
            clip: vec![],
            watermark: vec![],
            tokens: vec![],
            errors: vec![],
            decode_s: 0.0,
            preprocess_s: 0.0,
        };
        for (i, r) in rows.into_iter().enumerate() {
            match r {
                Ok(r) => {
                    // Rows that failed before this one leave gaps: move this row's tensors down.
                    let k = p.rows.len();
                    if k != i {
                        for (buf, &s) in clip.iter_mut().zip(&sizes) {
                            buf.copy_within(i * item(s)..(i + 1) * item(s), k * item(s));
                        }
                        if let Some(w) = wm {
                            watermark.copy_within(i * item(w)..(i + 1) * item(w), k * item(w));
                        }
                    }
                    p.rows.push(offset + i);
                    if let Some(t) = r.tokens {
                        p.tokens.push((k, t));
                    }
                    p.decode_s += r.decode_s;
                    p.preprocess_s += r.pre_s;
                }
                Err(e) => p.errors.push((offset + i, e)),
            }
        }
        let k = p.rows.len();
        for (buf, &s) in clip.iter_mut().zip(&sizes) {
            buf.truncate(k * item(s));
        }
        watermark.truncate(wm.map_or(0, |w| k * item(w)));
        p.clip = sizes.into_iter().zip(clip).collect();
        p.watermark = watermark;
        p
    }

    fn infer(&self, p: &Prepared, out: &mut Scores) -> Result<()> {
        let n = p.rows.len();
        if n == 0 {
            return Ok(());
        }
        let clip_of = |m: &OnnxModel| -> &Vec<f32> {
            let s = m.image_size(224);
            &p.clip
                .iter()
                .find(|(z, _)| *z == s)
                .expect("size prepared")
                .1
        };
        if let (Some(im), Some(tm)) = (&self.clip_image, &self.clip_text) {
            let s = im.image_size(224) as usize;
            let (mut ie, d) = im.run_f32(clip_of(im), n, &[3, s, s])?;
            l2_normalise(&mut ie, d);
            if !p.tokens.is_empty() {
                let ids: Vec<u32> = p
                    .tokens
                    .iter()
                    .flat_map(|(_, t)| t.iter().copied())
                    .collect();
                let (mut te, dt) = tm.run_tokens(&ids, p.tokens.len(), CONTEXT_LENGTH)?;
                if dt != d {
                    return Err(FilterError::ModelSignature {
                        model: tm.name.clone(),
                        message: format!(
                            "text embeddings are {dt}-d but image embeddings ({}) are {d}-d",
                            im.name
                        ),
                    });
                }
                l2_normalise(&mut te, d);
                for (j, (k, _)) in p.tokens.iter().enumerate() {
                    let a = &ie[k * d..(k + 1) * d];
                    let b = &te[j * d..(j + 1) * d];
                    let cos: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
                    out.clip_similarity[p.rows[*k]] = Some(cos as f32);
                }
            }
        }
        if let Some(l) = &self.l14 {
            let s = l.image_size(224) as usize;
            let (mut e, d) = l.run_f32(clip_of(l), n, &[3, s, s])?;
            l2_normalise(&mut e, d);
            for (k, v) in e.chunks_exact(d).enumerate() {
                out.l14_embedding[p.rows[k]] = Some(v.to_vec());
            }
            if let Some(h) = &self.aesthetic {
                for (k, v) in h.score(&e, n, d)?.into_iter().enumerate() {
                    out.aesthetic[p.rows[k]] = Some(v);
                }
            }
            if let Some(h) = &self.nsfw {
                for (k, v) in h.score(&e, n, d)?.into_iter().enumerate() {
                    out.nsfw[p.rows[k]] = Some(v);
                }
            }
        }
        if let Some(w) = &self.watermark {
            let s = w.image_size(256) as usize;
            let (logits, c) = w.run_f32(&p.watermark, n, &[3, s, s])?;
            let idx = self.cfg.watermark_class_index;
            if idx >= c {
                return Err(FilterError::ModelSignature {
                    model: w.name.clone(),
                    message: format!("watermark class index {idx} but the model has {c} classes"),
                });
            }
            for (k, row) in logits.chunks(c).enumerate() {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
                out.watermark[p.rows[k]] = Some((((row[idx] - m) as f64).exp() / sum) as f32);
            }
        }
        Ok(())
    }

    /// Scores `inputs`: preprocessing of chunk k+1 overlaps inference of chunk k.
    pub fn score(&self, inputs: &[SampleInput<'_>]) -> Result<(Scores, Timings)> {
        let t0 = Instant::now();
        let n = inputs.len();
        let mut out = Scores {
            clip_similarity: vec![None; n],
            aesthetic: vec![None; n],
            watermark: vec![None; n],
            nsfw: vec![None; n],
            l14_embedding: vec![None; n],
            errors: vec![None; n],
        };
        let mut tm = Timings::default();
        if self.is_empty() || n == 0 {
            return Ok((out, tm));
        }
        let chunk = self.cfg.model.batch_size.max(1);
        let result = std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = sync_channel::<Prepared>(1);
            // Chunks whose inference is done go back to the preprocessing thread, which writes
            // the next chunks' tensors into their buffers (no fresh allocation per chunk).
            let (spare_tx, spare_rx) = sync_channel::<Prepared>(3);
            scope.spawn(move || {
                for (c, part) in inputs.chunks(chunk).enumerate() {
                    let spare = spare_rx.try_recv().ok();
                    if tx.send(self.prepare(part, c * chunk, spare)).is_err() {
                        break;
                    }
                }
            });
            for p in rx {
                tm.decode_s += p.decode_s;
                tm.preprocess_s += p.preprocess_s;
                tm.images += p.rows.len() as u64;
                for (i, e) in &p.errors {
                    out.errors[*i] = Some(e.clone());
                }
                let ti = Instant::now();
                self.infer(&p, &mut out)?;
                tm.inference_s += ti.elapsed().as_secs_f64();
                // A full return channel or a finished producer: the buffers are just dropped.
                let _ = spare_tx.try_send(p);
            }
            Ok(())
        });
        result?;
        tm.total_s = t0.elapsed().as_secs_f64();
        Ok((out, tm))
    }
}
