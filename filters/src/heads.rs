//! Score heads on CLIP image embeddings: LAION's aesthetic predictors (torch `.pth` state dicts,
//! run here in float32) and any ONNX head (`[N,D] → [N,1]`, e.g. an exported NSFW detector).
//!
//! Invariants enforced here:
//! - A head always receives L2-normalised embeddings (the caller normalises; [`Head::score`]
//!   checks the norms and refuses anything off by more than 1e-3).
//! - `.pth` heads are read from the torch zip format (`*/data.pkl` + `*/data/<key>` storages,
//!   float32 little-endian) with a pickle reader that understands only what `torch.save` writes for
//!   a plain state dict; anything else is an error naming the file.
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

#[derive(Debug, Clone)]
enum Pk {
    None,
    /// A boolean (`requires_grad`); its value does not matter for inference.
    Bool,
    Int(i64),
    /// A float; its value does not matter for inference.
    Float,
    Str(String),
    Tuple(Vec<Pk>),
    List(Vec<Pk>),
    Dict(Vec<(Pk, Pk)>),
    Global(String),
    Persistent(Box<Pk>),
    Tensor {
        key: String,
        class: String,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

fn ck(path: &str, message: impl Into<String>) -> FilterError {
    FilterError::Checkpoint {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Runs the pickle of a torch state dict; returns (name, tensor metadata) pairs.
/// Most objects the memo may copy over one unpickling (each `BINPUT`/`BINGET` deep-copies): a
/// head copies a handful; a pickle doubling a list through its memo would exhaust memory.
const MAX_MEMO_COPIED: usize = 1 << 20;

/// Objects in `v`, counted up to `limit` (iteratively: nesting may be deep).
fn count_objects(v: &Pk, limit: usize) -> usize {
    let mut n = 0;
    let mut todo = vec![v];
    while let Some(v) = todo.pop() {
        n += 1;
        if n > limit {
            break;
        }
        match v {
            Pk::Tuple(x) | Pk::List(x) => todo.extend(x.iter()),
            Pk::Dict(kv) => {
                for (k, v) in kv {
                    todo.push(k);
                    todo.push(v);
                }
            }
            Pk::Persistent(v) => todo.push(v),
            _ => {}
        }
    }
    n
}

fn unpickle(path: &str, b: &[u8]) -> Result<Vec<(String, Pk)>> {
    let mut st: Vec<Pk> = Vec::new();
    let mut memo: HashMap<u32, Pk> = HashMap::new();
    let mut copied = 0usize;
    let mut charge = |v: &Pk| -> Result<()> {
        copied += count_objects(v, MAX_MEMO_COPIED.saturating_sub(copied));
        if copied > MAX_MEMO_COPIED {
            return Err(ck(
                path,
                format!("the pickle copies more than {MAX_MEMO_COPIED} objects through its memo"),
            ));
        }
        Ok(())
    };
    let mut i = 0usize;
    let take = |i: &mut usize, n: usize| -> Result<&[u8]> {
        let s = b
            .get(*i..*i + n)
            .ok_or_else(|| ck(path, "truncated pickle"))?;
        *i += n;
        Ok(s)
    };
    let pop_mark = |st: &mut Vec<Pk>| -> Result<Vec<Pk>> {
        let m = st
            .iter()
            .rposition(|v| matches!(v, Pk::Mark))
            .ok_or_else(|| ck(path, "pickle MARK missing"))?;
        let items = st.split_off(m + 1);
        st.pop();
        Ok(items)
    };
    let pop = |st: &mut Vec<Pk>| st.pop().ok_or_else(|| ck(path, "pickle stack underflow"));
    loop {
        let op = *b.get(i).ok_or_else(|| ck(path, "pickle without STOP"))?;
        i += 1;
        match op {
            0x80 => {
                take(&mut i, 1)?;
            }
            0x95 => {
                take(&mut i, 8)?;
            }
            b'}' => st.push(Pk::Dict(vec![])),
            b']' => st.push(Pk::List(vec![])),
            b')' => st.push(Pk::Tuple(vec![])),
            b'(' => st.push(Pk::Mark),
            b't' => {
                let items = pop_mark(&mut st)?;
                st.push(Pk::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if st.len() < n {
                    return Err(ck(path, "pickle stack underflow"));
                }
                let items = st.split_off(st.len() - n);
                st.push(Pk::Tuple(items));
            }
            b'X' => {
                let n = u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as usize;
                st.push(Pk::Str(String::from_utf8_lossy(take(&mut i, n)?).into()));
            }
            0x8c | b'U' => {
                let n = take(&mut i, 1)?[0] as usize;
                st.push(Pk::Str(String::from_utf8_lossy(take(&mut i, n)?).into()));
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => take(&mut i, 1)?[0] as u32,
                    b'r' => u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")),
                    _ => memo.len() as u32,
                };
                let v = st.last().ok_or_else(|| ck(path, "empty"))?;
                charge(v)?;
                memo.insert(k, v.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    take(&mut i, 1)?[0] as u32
                } else {
                    u32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4"))
                };
                let v = memo
                    .get(&k)
                    .ok_or_else(|| ck(path, format!("pickle memo {k} unset")))?;
                charge(v)?;
                st.push(v.clone());
            }
            b'K' => st.push(Pk::Int(take(&mut i, 1)?[0] as i64)),
            b'M' => st.push(Pk::Int(
                u16::from_le_bytes(take(&mut i, 2)?.try_into().expect("2")) as i64,
            )),
            b'J' => st.push(Pk::Int(
                i32::from_le_bytes(take(&mut i, 4)?.try_into().expect("4")) as i64,
            )),
            0x8a => {
                let n = take(&mut i, 1)?[0] as usize;
                let bytes = take(&mut i, n)?;
                if n > 8 {
                    return Err(ck(path, "integer too large"));
                }
                let mut v: i64 = 0;
                for (j, &x) in bytes.iter().enumerate() {
                    v |= (x as i64) << (8 * j);
                }
                if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                st.push(Pk::Int(v));
            }
            b'G' => {
                take(&mut i, 8)?;
                st.push(Pk::Float);
            }
            0x88 | 0x89 => st.push(Pk::Bool),
            b'N' => st.push(Pk::None),
            b'c' => {
                let rest = &b[i..];
                let mut parts = rest.splitn(3, |&c| c == b'\n');
                let module = parts.next().unwrap_or_default();
                let name = parts.next().unwrap_or_default();
                i += module.len() + name.len() + 2;
                st.push(Pk::Global(format!(
                    "{}.{}",
                    String::from_utf8_lossy(module),
                    String::from_utf8_lossy(name)
                )));
            }
            b'Q' => {
                let v = pop(&mut st)?;
                st.push(Pk::Persistent(Box::new(v)));
            }
            b'R' => {
                let args = pop(&mut st)?;
                let f = pop(&mut st)?;
                let Pk::Tuple(args) = args else {
                    return Err(ck(path, "REDUCE without an argument tuple"));
                };
                let Pk::Global(f) = f else {
                    return Err(ck(path, "REDUCE of a non-global"));
                };
                st.push(match f.as_str() {
                    "collections.OrderedDict" => Pk::Dict(vec![]),
                    "torch._utils._rebuild_tensor_v2" => tensor_of(path, &args)?,
                    other => return Err(ck(path, format!("unsupported pickle callable {other}"))),
                });
            }
            b'b' => {
                // BUILD: sets attributes (e.g. `_metadata`) that inference does not need.
                pop(&mut st)?;
            }
            b's' => {
                let v = pop(&mut st)?;
                let k = pop(&mut st)?;
                match st.last_mut() {
                    Some(Pk::Dict(d)) => d.push((k, v)),
                    _ => return Err(ck(path, "SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut st)?;
                match st.last_mut() {
                    Some(Pk::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return Err(ck(path, "SETITEMS on a non-dict")),
                }
            }
            b'a' => {
                let v = pop(&mut st)?;
                match st.last_mut() {
                    Some(Pk::List(l)) => l.push(v),
                    _ => return Err(ck(path, "APPEND on a non-list")),
                }
            }
            b'e' => {
                let items = pop_mark(&mut st)?;
                match st.last_mut() {
                    Some(Pk::List(l)) => l.extend(items),
                    _ => return Err(ck(path, "APPENDS on a non-list")),
                }
            }
            b'.' => break,
            other => {
                return Err(ck(
                    path,
                    format!("unsupported pickle opcode 0x{other:02x} at byte {}", i - 1),
                ));
            }
        }
    }
    let top = st.pop().ok_or_else(|| ck(path, "empty pickle"))?;
    let Pk::Dict(items) = top else {
        return Err(ck(path, "the checkpoint is not a state dict"));
    };
    items
        .into_iter()
        .map(|(k, v)| match k {
            Pk::Str(k) => Ok((k, v)),
            _ => Err(ck(path, "state dict key is not a string")),
        })
        .collect()
}

fn ints(path: &str, v: &Pk) -> Result<Vec<usize>> {
    match v {
        Pk::Tuple(t) => t
            .iter()
            .map(|x| match x {
                Pk::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(ck(path, "shape/stride entry is not a non-negative int")),
            })
            .collect(),
        _ => Err(ck(path, "shape/stride is not a tuple")),
    }
}

fn tensor_of(path: &str, args: &[Pk]) -> Result<Pk> {
    let (Some(Pk::Persistent(pid)), Some(Pk::Int(offset)), Some(shape), Some(stride)) =
        (args.first(), args.get(1), args.get(2), args.get(3))
    else {
        return Err(ck(path, "unexpected _rebuild_tensor_v2 arguments"));
    };
    let Pk::Tuple(pid) = pid.as_ref() else {
        return Err(ck(path, "unexpected storage id"));
    };
    let (Some(Pk::Global(class)), Some(Pk::Str(key))) = (pid.get(1), pid.get(2)) else {
        return Err(ck(path, "unexpected storage id"));
    };
    let offset = usize::try_from(*offset)
        .map_err(|_| ck(path, format!("negative tensor offset {offset}")))?;
    Ok(Pk::Tensor {
        key: key.clone(),
        class: class.clone(),
        offset,
        shape: ints(path, shape)?,
        stride: ints(path, stride)?,
    })
}

/// Reads a torch state dict of float32 tensors from `.pth` bytes (`path` names it in errors).
pub fn read_state_dict(path: &str, bytes: &[u8]) -> Result<Vec<(String, StateTensor)>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ck(path, format!("not a torch zip checkpoint: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("/data.pkl") || n == "data.pkl")
        .map(|n| n.to_string())
        .ok_or_else(|| ck(path, "no data.pkl in the checkpoint"))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut buf = Vec::new();
    zip.by_name(&pkl)
        .map_err(|e| ck(path, e.to_string()))?
        .read_to_end(&mut buf)
        .map_err(|e| ck(path, e.to_string()))?;
    let mut out = Vec::new();
    for (name, v) in unpickle(path, &buf)? {
        let Pk::Tensor {
            key,
            class,
            offset,
            shape,
            stride,
        } = v
        else {
            return Err(ck(path, format!("{name} is not a tensor")));
        };
        if class != "torch.FloatStorage" {
            return Err(ck(
                path,
                format!("{name} is {class}, only float32 is supported"),
            ));
        }
        // Contiguous row-major strides; declared sizes checked before anything is allocated.
        let Some(n) = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return Err(ck(path, format!("{name}: shape {shape:?} overflows")));
        };
        let Some(end) = offset.checked_add(n).and_then(|e| e.checked_mul(4)) else {
            return Err(ck(
                path,
                format!("{name}: offset {offset} + {n} elements overflows"),
            ));
        };
        if stride.len() != shape.len() {
            return Err(ck(
                path,
                format!("{name}: shape {shape:?} with strides {stride:?}"),
            ));
        }
        let mut expect = 1usize;
        for (d, s) in shape.iter().zip(&stride).rev() {
            if *d > 1 && *s != expect {
                return Err(ck(path, format!("{name} is not contiguous")));
            }
            expect = expect.saturating_mul(*d);
        }
        let mut raw = Vec::new();
        zip.by_name(&format!("{prefix}data/{key}"))
            .map_err(|e| ck(path, format!("storage {key} of {name}: {e}")))?
            .read_to_end(&mut raw)
            .map_err(|e| ck(path, e.to_string()))?;
        let bytes = raw
            .get(offset * 4..end)
            .ok_or_else(|| ck(path, format!("storage {key} too short for {name}")))?;
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        out.push((name, StateTensor { shape, data }));
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
        let err = unpickle("bomb.pth", &p).unwrap_err().to_string();
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
