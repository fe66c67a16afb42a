//! GigaGAN's CLIP score as LlamaGen's text-to-image evaluation computes it
//! (`evaluations/t2i/evaluation.py`: `EvalDataset` with `load_txt_from_file=True`, then
//! `compute_clip_score`), on the filters' CLIP ViT-B/32 ONNX models.
//!
//! Invariants enforced here (checked against the official code paths in
//! `tests/fixtures/t2i/make_reference.py`):
//! - Pairs: the `*.png` files directly in `<dir>/images` (case-sensitive, not recursive) in
//!   `natural_sort` order ([`natural_cmp`]: digit runs compare as integers, text lowercased;
//!   names the official key ties, such as `a01.png` and `a1.png`, are ordered by their bytes,
//!   where Python keeps the directory listing's order), zipped with the lines of
//!   `<dir>/captions.txt` (UTF-8, Python's `str.splitlines`). The official `zip` drops what is
//!   beyond the shorter list; here a different count is an error unless
//!   [`CaptionMismatch::Truncate`] asks for the official behaviour.
//! - Image: `Image.open(f).convert("RGB")`, the centre crop of the long edge and LANCZOS to
//!   `eval_res` (`crate::clean::eval_res_image`), `ToTensor` and `Normalize(0.5, 0.5)`, then
//!   `tensor2pil`: `((x + 1) * 127.5).clamp(0, 255).to(uint8)`, all in float32, the cast
//!   truncating, so some values come back one lower ([`tensor2pil_table`]); then CLIP's
//!   `_transform(224)` (`llamagen_filters::preprocess::clip_preprocess_into`).
//! - Text: `clip.tokenize(caption, truncate=True)`, the three ids after the start token of
//!   `clip.tokenize("A photo depicts ")` inserted after the start token, the row cut to 77, and a
//!   non-zero id in the last column replaced by the end token 49407 ([`prepend_tokens`]).
//! - Score: the cosine similarity of each image and text embedding (float64 from the float32
//!   embeddings), the mean over the first `how_many` pairs (the raw cosine, not ×100). The
//!   official script runs OpenAI's CLIP in float16 on CUDA; the ONNX models run in float32, so
//!   scores agree to about the third decimal, not bit for bit.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use image::RgbImage;
use llamagen_filters::model::{ModelOptions, OnnxModel, Role};
use llamagen_filters::preprocess::clip_preprocess_into;
use llamagen_filters::tokenizer::{CONTEXT_LENGTH, ClipTokenizer, EOT};
use rayon::prelude::*;

use crate::clean::{eval_res_image, read_rgb};
use crate::{EvalError, Result};

/// The text GigaGAN prepends to every caption (arXiv 2104.08718).
pub const PREPEND_TEXT: &str = "A photo depicts ";
/// Side of CLIP ViT-B/32's input.
pub const CLIP_SIZE: u32 = 224;

fn input_err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{}: {e}", path.display()))
}

/// One part of a natural-sort key: text (lowercased) or a run of ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Num(String),
}

/// `re.split('([0-9]+)', s)` with digit runs as integers (their digits without leading zeros)
/// and text lowercased.
fn natural_key(s: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let start = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        parts.push(Part::Text(rest[..start].to_lowercase()));
        if start == rest.len() {
            break;
        }
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(tail.len());
        let digits = tail[..end].trim_start_matches('0');
        parts.push(Part::Num(digits.to_string()));
        rest = &tail[end..];
    }
    parts
}

fn part_cmp(a: &Part, b: &Part) -> Ordering {
    match (a, b) {
        (Part::Text(x), Part::Text(y)) => x.cmp(y),
        (Part::Num(x), Part::Num(y)) => x.len().cmp(&y.len()).then_with(|| x.cmp(y)),
        // re.split alternates text and digits from a text part, so positions always agree.
        (Part::Text(_), Part::Num(_)) => Ordering::Greater,
        (Part::Num(_), Part::Text(_)) => Ordering::Less,
    }
}

/// The order of EvalDataset's `natural_sort` (ties broken by the names' bytes).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (ka, kb) = (natural_key(a), natural_key(b));
    for (x, y) in ka.iter().zip(&kb) {
        let o = part_cmp(x, y);
        if o != Ordering::Equal {
            return o;
        }
    }
    ka.len().cmp(&kb.len()).then_with(|| a.cmp(b))
}

/// Sorts `names` as [`natural_cmp`].
pub fn natural_sort(names: &mut [String]) {
    names.sort_by(|a, b| natural_cmp(a, b));
}

/// Python's `str.splitlines()`: lines split at `\n`, `\r\n`, `\r`, `\v`, `\f`, `\x1c`, `\x1d`,
/// `\x1e`, `\x85`, `\u2028`, `\u2029`, without the separators; no empty line after a final one.
pub fn splitlines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(std::mem::take(&mut line));
            }
            '\n' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => out.push(std::mem::take(&mut line)),
            c => line.push(c),
        }
    }
    if !line.is_empty() {
        out.push(line);
    }
    out
}

/// What to do when `captions.txt` and the images differ in number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptionMismatch {
    /// An error naming both counts.
    #[default]
    Error,
    /// The official `zip`: pairs up to the shorter list.
    Truncate,
}

/// A GigaGAN-layout sample folder: `images/*.png` and `captions.txt`, paired.
#[derive(Debug, Clone, PartialEq)]
pub struct T2iSample {
    /// The images in natural-sort order (all of them, also those without a caption).
    pub images: Vec<PathBuf>,
    /// The captions, one per line of `captions.txt`.
    pub captions: Vec<String>,
    /// How many (image, caption) pairs the CLIP score uses at most.
    pub pairs: usize,
}

/// Reads `dir/images/*.png` (natural sort) and `dir/captions.txt`.
pub fn load_sample(dir: &Path, mismatch: CaptionMismatch) -> Result<T2iSample> {
    let img_dir = dir.join("images");
    let entries = std::fs::read_dir(&img_dir)
        .map_err(|e| input_err(&img_dir, format!("the sample's images folder: {e}")))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| input_err(&img_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // glob's `*.png`: not hidden, ends with `.png`.
        if name.starts_with('.') || !name.ends_with(".png") {
            continue;
        }
        names.push(name);
    }
    natural_sort(&mut names);
    let images: Vec<PathBuf> = names.iter().map(|n| img_dir.join(n)).collect();
    let cap_path = dir.join("captions.txt");
    let bytes = std::fs::read(&cap_path).map_err(|e| {
        input_err(
            &cap_path,
            format!("{e} (the sample folder needs captions.txt, one caption per image)"),
        )
    })?;
    let text =
        String::from_utf8(bytes).map_err(|e| input_err(&cap_path, format!("not UTF-8: {e}")))?;
    let captions = splitlines(&text);
    if images.is_empty() {
        return Err(input_err(&img_dir, "no .png images"));
    }
    if captions.len() != images.len() && mismatch == CaptionMismatch::Error {
        return Err(input_err(
            &cap_path,
            format!(
                "{} captions for {} images in {} (the official script pairs them with zip and \
                 silently drops the rest; pass --allow-caption-mismatch to do the same)",
                captions.len(),
                images.len(),
                img_dir.display()
            ),
        ));
    }
    let pairs = images.len().min(captions.len());
    Ok(T2iSample {
        images,
        captions,
        pairs,
    })
}

/// `tensor2pil(Normalize(0.5, 0.5)(ToTensor()(v)))` for every 8-bit value `v`, in float32.
pub fn tensor2pil_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    for (v, o) in t.iter_mut().enumerate() {
        let x = v as f32 / 255.0;
        let x = (x - 0.5) / 0.5;
        let y = ((x + 1.0) * 127.5).clamp(0.0, 255.0);
        *o = y as u8; // truncation, as torch's .to(uint8) of a non-negative float
    }
    t
}

/// The tensor2pil round trip of an 8-bit image, in place.
pub fn tensor2pil(img: &mut RgbImage) {
    let t = tensor2pil_table();
    for p in img.iter_mut() {
        *p = t[*p as usize];
    }
}

/// The ids GigaGAN inserts: `clip.tokenize("A photo depicts ")[:, 1:4]`.
pub fn prefix_tokens() -> [u32; 3] {
    let row = ClipTokenizer::bundled().tokenize(PREPEND_TEXT);
    [row[1], row[2], row[3]]
}

/// A tokenized caption with the prefix inserted after the start token, cut to 77, and a
/// non-zero last id replaced by the end token.
pub fn prepend_tokens(row: &[u32; CONTEXT_LENGTH], prefix: [u32; 3]) -> [u32; CONTEXT_LENGTH] {
    let mut out = [0u32; CONTEXT_LENGTH];
    out[0] = row[0];
    out[1..4].copy_from_slice(&prefix);
    out[4..].copy_from_slice(&row[1..CONTEXT_LENGTH - 3]);
    if out[CONTEXT_LENGTH - 1] > 0 {
        out[CONTEXT_LENGTH - 1] = EOT;
    }
    out
}

/// The token rows the text encoder gets for `captions`.
pub fn caption_tokens(captions: &[String]) -> Vec<u32> {
    let tok = ClipTokenizer::bundled();
    let prefix = prefix_tokens();
    captions
        .iter()
        .flat_map(|c| prepend_tokens(&tok.tokenize(c), prefix))
        .collect()
}

/// The CLIP image input of one file (`[3,224,224]` written to `dst`).
pub fn clip_image_input_into(path: &Path, eval_res: Option<u32>, dst: &mut [f32]) -> Result<()> {
    let mut img = eval_res_image(&read_rgb(path)?, eval_res);
    tensor2pil(&mut img);
    clip_preprocess_into(&img, CLIP_SIZE, dst);
    Ok(())
}

/// Cosine similarity of two rows, in float64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-8)
}

/// The mean of the first `how_many` similarities.
pub fn clip_score(cosines: &[f64], how_many: usize) -> Result<f64> {
    let n = how_many.min(cosines.len());
    if n == 0 {
        return Err(EvalError::Shape(
            "no (image, caption) pairs to score".into(),
        ));
    }
    Ok(cosines[..n].iter().sum::<f64>() / n as f64)
}

/// CLIP's image and text encoders (the filters' ONNX exports: image `[N,3,224,224]` →
/// `[N,512]`, text int32/int64 `[N,77]` → `[N,512]`).
pub struct ClipModels {
    pub image: OnnxModel,
    pub text: OnnxModel,
    batch_size: usize,
}

impl ClipModels {
    pub fn load(image: &Path, text: &Path, opts: &ModelOptions) -> Result<ClipModels> {
        let image = OnnxModel::load(image, Role::Image, None, opts).map_err(EvalError::external)?;
        let text = OnnxModel::load(text, Role::Text, None, opts).map_err(EvalError::external)?;
        if image.image_size(CLIP_SIZE) != CLIP_SIZE {
            return Err(EvalError::Input(format!(
                "{}: takes {}px images; the CLIP score's model is ViT-B/32 at {CLIP_SIZE}px",
                image.name,
                image.image_size(CLIP_SIZE)
            )));
        }
        Ok(ClipModels {
            image,
            text,
            batch_size: opts.batch_size.max(1),
        })
    }

    /// The cosine similarity of each of the first `how_many` pairs of `sample`, in batches;
    /// `progress` gets the number of pairs done.
    pub fn cosines(
        &self,
        sample: &T2iSample,
        eval_res: Option<u32>,
        how_many: usize,
        progress: impl Fn(usize),
    ) -> Result<Vec<f64>> {
        let n = sample.pairs.min(how_many);
        let item = 3 * (CLIP_SIZE * CLIP_SIZE) as usize;
        let mut out = Vec::with_capacity(n);
        let mut buf = Vec::new();
        for start in (0..n).step_by(self.batch_size) {
            let m = self.batch_size.min(n - start);
            buf.resize(m * item, 0f32);
            buf.par_chunks_mut(item)
                .zip(&sample.images[start..start + m])
                .try_for_each(|(dst, f)| clip_image_input_into(f, eval_res, dst))?;
            let s = CLIP_SIZE as usize;
            let (img, wi) = self
                .image
                .run_f32(&buf, m, &[3, s, s])
                .map_err(EvalError::external)?;
            let ids = caption_tokens(&sample.captions[start..start + m]);
            let (txt, wt) = self
                .text
                .run_tokens(&ids, m, CONTEXT_LENGTH)
                .map_err(EvalError::external)?;
            if wi != wt {
                return Err(EvalError::Shape(format!(
                    "image embeddings of width {wi} ({}), text embeddings of width {wt} ({})",
                    self.image.name, self.text.name
                )));
            }
            out.extend(
                img.chunks_exact(wi)
                    .zip(txt.chunks_exact(wt))
                    .map(|(a, b)| cosine(a, b)),
            );
            progress(start + m);
        }
        Ok(out)
    }
}
