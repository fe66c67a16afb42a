//! Score heads on CLIP image embeddings: LAION's aesthetic predictors (torch `.pth` state dicts,
//! run here in float32) and any ONNX head (`[N,D] → [N,1]`, e.g. an exported NSFW detector).
//!
//! Invariants enforced here:
//! - A head always receives L2-normalised embeddings (the caller normalises; [`Head::score`]
//!   checks the norms and refuses anything off by more than 1e-3).
//! - `.pth` heads are read from the torch zip format (`*/data.pkl` + `*/data/<key>` storages,
//!   float32 little-endian) with candle's pickle reader, which runs no code; only a plain state
//!   dict of contiguous float32 tensors is accepted (entries that are not tensors, such as an
//!   OrderedDict's `_metadata`, are skipped), anything else is an error naming the file.
//! - Layouts recognised: V1 (`weight`, `bias`: one Linear), V2 linear
//!   (`layers.{0,2,4,6,7}`: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear; no
//!   activations) and V2 ReLU (`layers.{0,3,6,9,11}`: ReLU after every Linear but the last).
//!   Dropout is the identity at inference.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{FilterError, Result};
use crate::model::{ModelOptions, OnnxModel, Role};

/// The LAION-Aesthetics V2 head (`sac+logos+ava1-l14-linearMSE.pth`), bundled (Apache-2.0).
pub static AESTHETIC_V2: &[u8] =
    include_bytes!("../assets/laion-aesthetic/sac+logos+ava1-l14-linearMSE.pth");
/// File name of [`AESTHETIC_V2`].
pub const AESTHETIC_V2_NAME: &str = "sac+logos+ava1-l14-linearMSE.pth";

/// A float32 tensor from a state dict.
#[derive(Debug, Clone)]
pub struct StateTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn ck(path: &str, message: impl Into<String>) -> FilterError {
    FilterError::Checkpoint {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Reads a torch state dict of float32 tensors from `.pth` bytes (`path` names it in errors).
///
/// The pickle runs on candle's reader (hardened in `vendor/candle-core-pickle.patch`: no code
/// runs, memo copies are bounded), the one pickle reader of the workspace. Its `PthTensors`
/// opens files by path; the bundled head is bytes, so the storages are read here from the zip in
/// memory, after checking that the entry holds every byte a tensor declares.
pub fn read_state_dict(path: &str, bytes: &[u8]) -> Result<Vec<(String, StateTensor)>> {
    use candle_core::pickle::{Object, Stack};
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ck(path, format!("not a torch zip checkpoint: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .map(|n| n.to_string())
        .ok_or_else(|| ck(path, "no data.pkl in the checkpoint"))?;
    let dir = pkl.trim_end_matches(".pkl").to_string();
    let mut stack = Stack::empty();
    {
        let entry = zip.by_name(&pkl).map_err(|e| ck(path, e.to_string()))?;
        stack
            .read_loop(&mut std::io::BufReader::new(entry))
            .map_err(|e| ck(path, format!("pickle: {e}")))?;
    }
    let obj = stack
        .finalize()
        .map_err(|e| ck(path, format!("pickle: {e}")))?;
    let Object::Dict(entries) = obj else {
        return Err(ck(path, "the pickle is not a state dict"));
    };
    let mut out = Vec::new();
    for (name, value) in entries {
        let shown = match &name {
            Object::Unicode(s) => s.clone(),
            other => format!("{other:?}"),
        };
        // Entries that are not tensors (the `_metadata` an OrderedDict carries) are skipped,
        // as candle's own reader skips them; the layouts below name every tensor they need.
        let Some(info) = value
            .into_tensor_info(name, Path::new(&dir))
            .map_err(|e| ck(path, format!("{shown}: {e}")))?
        else {
            continue;
        };
        if info.dtype != candle_core::DType::F32 {
            return Err(ck(
                path,
                format!("{shown} is {:?}, only float32 is supported", info.dtype),
            ));
        }
        let layout = &info.layout;
        if !layout.is_contiguous() {
            return Err(ck(path, format!("{shown} is not contiguous")));
        }
        let shape = layout.dims().to_vec();
        let n = layout.shape().elem_count();
        // candle's layout counts the storage offset in bytes.
        let begin = layout.start_offset();
        let end = n.saturating_mul(4).saturating_add(begin);
        let mut entry = zip
            .by_name(&info.path)
            .map_err(|e| ck(path, format!("storage of {shown}: {e}")))?;
        // The bytes a tensor needs must be in the file before anything is read: a stored entry
        // holds its bytes as they are, a compressed one expands at most 1032:1 (deflate's
        // limit); the sizes the zip declares are not trusted alone (as candle's reader does).
        let on_disk = entry.compressed_size().min(bytes.len() as u64);
        let available = match entry.compression() {
            zip::CompressionMethod::Stored => entry.size().min(on_disk),
            _ => entry.size().min(on_disk.saturating_mul(1032)),
        };
        if (available as usize) < end {
            return Err(ck(
                path,
                format!(
                    "{shown} needs {end} bytes but its storage {} holds {available}",
                    info.path
                ),
            ));
        }
        let mut raw = Vec::new();
        entry
            .by_ref()
            .take(end as u64)
            .read_to_end(&mut raw)
            .map_err(|e| ck(path, e.to_string()))?;
        let bytes = raw
            .get(begin..end)
            .ok_or_else(|| ck(path, format!("storage {} too short for {shown}", info.path)))?;
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        out.push((shown, StateTensor { shape, data }));
    }
    Ok(out)
}

/// One Linear layer and whether a ReLU follows it. The weight is kept transposed (in×out, row
/// `i` = input `i`'s weight for every output), so a row's outputs accumulate side by side.
#[derive(Debug, Clone)]
struct Linear {
    wt: Vec<f32>,
    b: Vec<f32>,
    in_dim: usize,
    out_dim: usize,
    relu: bool,
}

/// Which LAION aesthetic head layout a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Layout {
    /// `weight`, `bias`: one Linear (LAION aesthetic predictor V1).
    V1Linear,
    /// `layers.{0,2,4,6,7}`: five Linears, no activations (improved predictor, "linearMSE").
    V2Linear,
    /// `layers.{0,3,6,9,11}`: five Linears with ReLUs ("reluMSE").
    V2Relu,
}

/// An MLP head read from a LAION `.pth`, evaluated in float32 as torch does.
#[derive(Debug, Clone)]
pub struct TorchHead {
    layers: Vec<Linear>,
    pub layout: Layout,
}

impl TorchHead {
    /// Parses a LAION aesthetic head checkpoint.
    pub fn from_pth(path: &str, bytes: &[u8]) -> Result<TorchHead> {
        let sd: HashMap<String, StateTensor> = read_state_dict(path, bytes)?.into_iter().collect();
        let mut keys: Vec<&String> = sd.keys().collect();
        keys.sort();
        let get = |k: &str| {
            sd.get(k)
                .ok_or_else(|| ck(path, format!("missing {k} (keys: {keys:?})")))
        };
        let (layout, prefixes, relus): (Layout, Vec<String>, Vec<bool>) =
            if sd.contains_key("weight") && sd.contains_key("bias") && sd.len() == 2 {
                (Layout::V1Linear, vec![String::new()], vec![false])
            } else if ["0", "2", "4", "6", "7"]
                .iter()
                .all(|i| sd.contains_key(&format!("layers.{i}.weight")))
                && sd.len() == 10
            {
                (
                    Layout::V2Linear,
                    ["0", "2", "4", "6", "7"]
                        .iter()
                        .map(|i| format!("layers.{i}."))
                        .collect(),
                    vec![false; 5],
                )
            } else if ["0", "3", "6", "9", "11"]
                .iter()
                .all(|i| sd.contains_key(&format!("layers.{i}.weight")))
                && sd.len() == 10
            {
                (
                    Layout::V2Relu,
                    ["0", "3", "6", "9", "11"]
                        .iter()
                        .map(|i| format!("layers.{i}."))
                        .collect(),
                    vec![true, true, true, true, false],
                )
            } else {
                return Err(ck(
                    path,
                    format!("unrecognised aesthetic head layout (keys: {keys:?})"),
                ));
            };
        let mut layers = Vec::new();
        for (p, relu) in prefixes.iter().zip(relus) {
            let w = get(&format!("{p}weight"))?;
            let b = get(&format!("{p}bias"))?;
            if w.shape.len() != 2 || b.shape != [w.shape[0]] {
                return Err(ck(
                    path,
                    format!(
                        "{p}weight {:?} / bias {:?} do not form a Linear",
                        w.shape, b.shape
                    ),
                ));
            }
            if let Some(prev) = layers.last() {
                let prev: &Linear = prev;
                if prev.out_dim != w.shape[1] {
                    return Err(ck(path, format!("{p}weight does not chain")));
                }
            }
            let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
            let mut wt = vec![0f32; in_dim * out_dim];
            for (o, row) in w.data.chunks_exact(in_dim).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    wt[i * out_dim + o] = v;
                }
            }
            layers.push(Linear {
                wt,
                b: b.data.clone(),
                in_dim: w.shape[1],
                out_dim: w.shape[0],
                relu,
            });
        }
        if layers.last().expect("layers").out_dim != 1 {
            return Err(ck(path, "the head does not output one score"));
        }
        Ok(TorchHead { layers, layout })
    }

    pub fn input_dim(&self) -> usize {
        self.layers[0].in_dim
    }

    /// Scores `n` embeddings (row-major, width [`TorchHead::input_dim`]).
    ///
    /// Each output is `Σ_i x_i·w_oi` summed in input order from 0 in float32, plus the bias:
    /// rows are processed four at a time, all outputs of a row at once.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        const ROWS: usize = 4;
        let mut cur = x.to_vec();
        for l in &self.layers {
            let mut next = vec![0f32; n * l.out_dim];
            for (xs, outs) in cur
                .chunks(ROWS * l.in_dim)
                .zip(next.chunks_mut(ROWS * l.out_dim))
            {
                for (i, wrow) in l.wt.chunks_exact(l.out_dim).enumerate() {
                    for (xr, acc) in xs
                        .chunks_exact(l.in_dim)
                        .zip(outs.chunks_exact_mut(l.out_dim))
                    {
                        let a = xr[i];
                        for (s, &w) in acc.iter_mut().zip(wrow) {
                            *s += a * w;
                        }
                    }
                }
                for acc in outs.chunks_exact_mut(l.out_dim) {
                    for (s, &b) in acc.iter_mut().zip(&l.b) {
                        let v = *s + b;
                        *s = if l.relu { v.max(0.0) } else { v };
                    }
                }
            }
            cur = next;
        }
        cur
    }
}

/// A head on the normalised embedding.
pub enum HeadKind {
    Torch(TorchHead),
    Onnx(OnnxModel),
}

/// A loaded head with its identity.
pub struct Head {
    pub name: String,
    pub sha256: String,
    pub kind: HeadKind,
}

impl Head {
    /// Loads `.pth` (LAION layouts) or `.onnx` heads by extension.
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<Head> {
        let is_onnx = path.extension().is_some_and(|e| e == "onnx");
        if is_onnx {
            let m = OnnxModel::load(path, Role::Head, None, opts)?;
            return Ok(Head {
                name: m.name.clone(),
                sha256: m.sha256.clone(),
                kind: HeadKind::Onnx(m),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| FilterError::ModelFile {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        Head::from_pth_bytes(&name, &bytes)
    }

    /// A `.pth` head from bytes.
    pub fn from_pth_bytes(name: &str, bytes: &[u8]) -> Result<Head> {
        Ok(Head {
            name: name.to_string(),
            sha256: hex::encode(Sha256::digest(bytes)),
            kind: HeadKind::Torch(TorchHead::from_pth(name, bytes)?),
        })
    }

    /// The bundled LAION-Aesthetics V2 head.
    pub fn aesthetic_v2() -> Head {
        Head::from_pth_bytes(AESTHETIC_V2_NAME, AESTHETIC_V2).expect("the bundled head parses")
    }

    /// Width of the embedding the head takes, when known.
    pub fn input_dim(&self) -> Option<usize> {
        match &self.kind {
            HeadKind::Torch(t) => Some(t.input_dim()),
            HeadKind::Onnx(m) => m.input_dim(),
        }
    }

    /// Scores `n` L2-normalised embeddings of width `d`; one score per row.
    pub fn score(&self, emb: &[f32], n: usize, d: usize) -> Result<Vec<f32>> {
        if let Some(want) = self.input_dim() {
            if want != d {
                return Err(FilterError::ModelSignature {
                    model: self.name.clone(),
                    message: format!("head takes {want}-d embeddings, the encoder gives {d}"),
                });
            }
        }
        for (r, row) in emb.chunks(d).enumerate() {
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if (norm - 1.0).abs() > 1e-3 {
                return Err(FilterError::ModelSignature {
                    model: self.name.clone(),
                    message: format!("embedding row {r} has norm {norm}, heads need unit norm"),
                });
            }
        }
        match &self.kind {
            HeadKind::Torch(t) => Ok(t.forward(emb, n)),
            HeadKind::Onnx(m) => {
                let (out, w) = m.run_f32(emb, n, &[d])?;
                Ok(out.chunks(w).map(|r| r[0]).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 300-byte pickle that doubles a tuple through its memo 40 times (2^40 objects if
    /// expanded) is refused with an error naming the file.
    #[test]
    fn memo_bombs_are_refused() {
        let mut p = vec![0x80, 2, b']', b'r', 0, 0, 0, 0];
        for i in 0u32..40 {
            let get = [&[b'j'][..], &i.to_le_bytes()].concat();
            p.push(b'(');
            p.extend_from_slice(&get);
            p.extend_from_slice(&get);
            p.push(b't');
            p.push(b'r');
            p.extend_from_slice(&(i + 1).to_le_bytes());
        }
        p.push(b'.');
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        zip.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, &p).unwrap();
        let bytes = zip.finish().unwrap().into_inner();
        let err = read_state_dict("bomb.pth", &bytes).unwrap_err().to_string();
        assert!(err.contains("bomb.pth") && err.contains("memo"), "{err}");
    }

    /// Deterministic values in [-1, 1].
    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed) * 1.7).sin())
            .collect()
    }

    #[test]
    fn forward_sums_each_output_in_input_order() {
        // 3 layers (ReLU after the first two), 7 rows: a partial block of rows at the end.
        let dims = [(37usize, 19usize, true), (19, 5, true), (5, 1, false)];
        let w: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(k, &(i, o, _))| values(i * o, k as f32))
            .collect();
        let b: Vec<Vec<f32>> = dims
            .iter()
            .enumerate()
            .map(|(k, &(_, o, _))| values(o, 10.0 + k as f32))
            .collect();
        let head = TorchHead {
            layers: dims
                .iter()
                .zip(&w)
                .zip(&b)
                .map(|((&(in_dim, out_dim, relu), w), b)| {
                    let mut wt = vec![0f32; in_dim * out_dim];
                    for o in 0..out_dim {
                        for i in 0..in_dim {
                            wt[i * out_dim + o] = w[o * in_dim + i];
                        }
                    }
                    Linear {
                        wt,
                        b: b.clone(),
                        in_dim,
                        out_dim,
                        relu,
                    }
                })
                .collect(),
            layout: Layout::V2Linear,
        };
        let n = 7;
        let x = values(n * 37, 99.0);
        // The textbook loop: one dot product per output.
        let mut cur = x.clone();
        for (k, &(in_dim, out_dim, relu)) in dims.iter().enumerate() {
            let mut next = vec![0f32; n * out_dim];
            for r in 0..n {
                for o in 0..out_dim {
                    let mut acc = 0f32;
                    for i in 0..in_dim {
                        acc += cur[r * in_dim + i] * w[k][o * in_dim + i];
                    }
                    let v = acc + b[k][o];
                    next[r * out_dim + o] = if relu { v.max(0.0) } else { v };
                }
            }
            cur = next;
        }
        let got = head.forward(&x, n);
        assert_eq!(got.len(), n);
        assert!(got.iter().any(|&v| v != 0.0));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&cur));
    }
}
