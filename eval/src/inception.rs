//! Inception-v3 activations through ONNX Runtime, in the layout of ADM's evaluator.
//!
//! The model's signature (what `scripts/export-inception.py` writes from ADM's
//! `classify_image_graph_def.pb`; tests use a stand-in with the same one):
//! - input `images`: float32 `[N, H, W, 3]`, pixel values 0..255 as ADM feeds its uint8 batches
//!   (the graph resizes to 299 bilinearly itself);
//! - output `pool_3`: float32 `[N, 2048]` (FID, precision/recall);
//! - output `spatial`: float32 `[N, 17, 17, 7]`, the first 7 channels of `mixed_6/conv` (sFID),
//!   flattened per image in that (H, W, C) order as the evaluator reshapes it;
//! - output `logits`: float32 `[N, 1008]`, `pool_3` times the weights of `softmax/logits/MatMul`
//!   (the Inception Score takes their softmax).

use std::path::Path;
use std::sync::Mutex;

use llamagen_filters::model::{ModelOptions, open_session};
use ort::session::Session;
use ort::value::TensorRef;

use crate::batch::Images;
use crate::{EvalError, Result};

/// Activations of a batch of images.
#[derive(Debug, Clone, Default)]
pub struct Activations {
    pub n: usize,
    /// `n × pool_dim` pool features.
    pub pool: Vec<f32>,
    pub pool_dim: usize,
    /// `n × spatial_dim` spatial features.
    pub spatial: Vec<f32>,
    pub spatial_dim: usize,
    /// `n × classes` softmax probabilities.
    pub probs: Vec<f32>,
    pub classes: usize,
}

impl Activations {
    /// Appends the activations of the next images (of the same model).
    pub fn append(&mut self, other: Activations) {
        self.n += other.n;
        self.pool.extend(other.pool);
        self.spatial.extend(other.spatial);
        self.probs.extend(other.probs);
        (self.pool_dim, self.spatial_dim, self.classes) =
            (other.pool_dim, other.spatial_dim, other.classes);
    }
}

/// Opens the ONNX model at `path` and checks its signature: one input named `images` (else an
/// error saying what the model `takes`) and every output of `outputs` (else an error pointing at
/// the conversion `script`). Returns the session, the model's name and SHA-256.
pub(crate) fn open_checked(
    path: &Path,
    opts: &ModelOptions,
    takes: &str,
    outputs: &[&str],
    script: &str,
) -> Result<(Session, String, String)> {
    let (session, name, sha256) = open_session(path, opts).map_err(EvalError::external)?;
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    if inputs != ["images"] {
        return Err(EvalError::Input(format!(
            "{name}: inputs are {inputs:?}, {takes}"
        )));
    }
    let have: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    if let Some(o) = outputs.iter().find(|o| !have.contains(o)) {
        return Err(EvalError::Input(format!(
            "{name}: no output {o} (outputs: {have:?}); see {script}"
        )));
    }
    Ok((session, name, sha256))
}

/// A loaded Inception model.
pub struct Inception {
    pub name: String,
    pub sha256: String,
    session: Mutex<Session>,
    batch_size: usize,
}

const OUTPUTS: [&str; 3] = ["pool_3", "spatial", "logits"];

impl Inception {
    /// Loads `path`, checking the signature of the module docs.
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Inception> {
        let (session, name, sha256) = open_checked(
            path,
            opts,
            "an Inception model for the evaluator takes `images` [N,H,W,3]",
            &OUTPUTS,
            "scripts/export-inception.py",
        )?;
        Ok(Inception {
            name,
            sha256,
            session: Mutex::new(session),
            batch_size: opts.batch_size.max(1),
        })
    }

    /// The activations of `images`, in batches.
    pub fn activations(&self, images: &Images, progress: impl Fn(usize)) -> Result<Activations> {
        // The work is in a function that is not generic: compiled in this crate (at its
        // optimisation level), not in each caller's.
        self.activations_dyn(images, &progress)
    }

    fn activations_dyn(&self, images: &Images, progress: &dyn Fn(usize)) -> Result<Activations> {
        let (h, w) = (images.height, images.width);
        let item = h * w * 3;
        let mut acts = Activations {
            n: images.n,
            ..Activations::default()
        };
        let mut session = self.session.lock().expect("inception session");
        // One float buffer for every batch (the model takes float32 pixels 0..255).
        let mut x = vec![0f32; self.batch_size.min(images.n) * item];
        for start in (0..images.n).step_by(self.batch_size) {
            let m = self.batch_size.min(images.n - start);
            let x = &mut x[..m * item];
            for (o, &p) in x
                .iter_mut()
                .zip(&images.pixels[start * item..(start + m) * item])
            {
                *o = p as f32;
            }
            let t = TensorRef::from_array_view((vec![m as i64, h as i64, w as i64, 3], &x[..]))
                .map_err(|e| self.err(e))?;
            let out = session
                .run(ort::inputs!["images" => t])
                .map_err(|e| self.err(e))?;
            let take = |name: &str| -> Result<(usize, &[f32])> {
                let (shape, v) = out[name]
                    .try_extract_tensor::<f32>()
                    .map_err(|e| self.err(format!("{name}: {e}")))?;
                if shape.first().copied() != Some(m as i64) {
                    return Err(self.err(format!(
                        "{name} has shape {:?} for {m} images",
                        shape.to_vec()
                    )));
                }
                Ok((v.len() / m, v))
            };
            let (pd, pool) = take("pool_3")?;
            let (sd, spatial) = take("spatial")?;
            let (cd, logits) = take("logits")?;
            acts.pool_dim = pd;
            acts.spatial_dim = sd;
            acts.classes = cd;
            acts.pool.extend_from_slice(pool);
            acts.spatial.extend_from_slice(spatial);
            // Softmax in float32, as the evaluator's TensorFlow graph.
            for row in logits.chunks_exact(cd) {
                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let at = acts.probs.len();
                acts.probs.extend(row.iter().map(|&l| (l - mx).exp()));
                let e = &mut acts.probs[at..];
                let s: f32 = e.iter().sum();
                e.iter_mut().for_each(|x| *x /= s);
            }
            progress(start + m);
        }
        Ok(acts)
    }

    fn err(&self, e: impl std::fmt::Display) -> EvalError {
        EvalError::Input(format!("{}: {e}", self.name))
    }
}
