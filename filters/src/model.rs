//! ONNX models and what their metadata says about how to call them.
//!
//! Invariants enforced here:
//! - Input and output names, element types and shapes are read from the model, never assumed:
//!   an image model has one float input of rank 4 (`[N,3,H,W]`), a text model one integer input
//!   of rank 2 (`[N,77]`, int32 or int64; an `attention_mask`-like second integer input gets 1 up
//!   to and including the first end token), a head one float input of rank 2 (`[N,D]`).
//! - The output is the one named in the options, else the first whose name is among the role's
//!   usual names, else the only or first output of rank 2.
//! - A batch dimension fixed to k is run in chunks of k (the last chunk padded with zeros and the
//!   padding's outputs discarded); a dynamic one in chunks of [`ModelOptions::batch_size`].
//! - Every model is identified by its file name and the SHA-256 of its bytes.
//! - Intra-op worker threads do not spin while waiting for work: the scorer decodes and
//!   preprocesses the next batch on the same cores while a batch is in inference, and spinning
//!   workers would take those cores (one per session) without doing anything.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::{Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};
use sha2::{Digest, Sha256};

use crate::error::{FilterError, Result};
use crate::runtime::{Provider, provider_available, runtime};

/// How sessions are created.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelOptions {
    /// Threads ONNX Runtime uses inside one operator (0 = its default, one per core).
    pub intra_threads: usize,
    /// Execution provider (default CPU).
    pub provider: Provider,
    /// Rows per inference call for models with a dynamic batch dimension (default 32).
    pub batch_size: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            intra_threads: 0,
            provider: Provider::Cpu,
            batch_size: 32,
        }
    }
}

/// What a model is used for; decides which input signature is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Image encoder or classifier: float `[N,3,H,W]`.
    Image,
    /// CLIP text encoder: integer `[N,L]`.
    Text,
    /// Head on an embedding: float `[N,D]`.
    Head,
}

impl Role {
    fn usual_outputs(self) -> &'static [&'static str] {
        match self {
            Role::Image => &[
                "image_embeds",
                "embedding",
                "embeddings",
                "logits",
                "output",
            ],
            Role::Text => &["text_embeds", "embedding", "embeddings", "output"],
            Role::Head => &["score", "scores", "output", "logits", "prob"],
        }
    }
}

/// Integer element type of a text model's token input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    I32,
    I64,
}

/// A loaded ONNX model.
pub struct OnnxModel {
    /// File name (e.g. `clip_b32_image.onnx`).
    pub name: String,
    pub path: PathBuf,
    /// Hex SHA-256 of the model file.
    pub sha256: String,
    session: Mutex<Session>,
    role: Role,
    input: String,
    /// Declared input shape (-1 = dynamic).
    input_shape: Vec<i64>,
    token_type: Option<TokenType>,
    mask_input: Option<(String, TokenType)>,
    output: String,
    /// Declared output width (-1 = dynamic).
    output_dim: i64,
    batch: BatchMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchMode {
    Dynamic(usize),
    Fixed(usize),
}

fn onnx_err(model: &str, e: impl std::fmt::Display) -> FilterError {
    FilterError::Onnx {
        model: model.to_string(),
        message: e.to_string(),
    }
}

fn sig_err(model: &str, message: String) -> FilterError {
    FilterError::ModelSignature {
        model: model.to_string(),
        message,
    }
}

fn describe(t: &ValueType) -> String {
    format!("{t}")
}

/// Opens an ONNX Runtime session on `path` with `opts` (threads, execution provider); returns
/// it with the file's name and hex SHA-256. Every model of the workspace is opened here.
pub fn open_session(path: &Path, opts: &ModelOptions) -> Result<(Session, String, String)> {
    let bytes = std::fs::read(path).map_err(|source| FilterError::ModelFile {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let rt = runtime()?;
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| onnx_err(&name, e))?
        .with_intra_op_spinning(false)
        .map_err(|e| onnx_err(&name, e))?;
    if opts.intra_threads > 0 {
        builder = builder
            .with_intra_threads(opts.intra_threads)
            .map_err(|e| onnx_err(&name, e))?;
    }
    if opts.provider == Provider::Cuda {
        if !provider_available(Provider::Cuda)? {
            return Err(FilterError::ProviderUnavailable(format!(
                "CUDA (library {}; install PyPI's onnxruntime-gpu and point ORT_DYLIB_PATH at its libonnxruntime.so)",
                rt.library.display()
            )));
        }
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| onnx_err(&name, e))?;
    }
    let session = builder
        .commit_from_memory(&bytes)
        .map_err(|e| onnx_err(&name, e))?;
    Ok((session, name, sha256))
}

impl OnnxModel {
    /// Loads `path` for `role`; `output` picks the output by name (else see the module rules).
    pub fn load(
        path: &Path,
        role: Role,
        output: Option<&str>,
        opts: &ModelOptions,
    ) -> Result<OnnxModel> {
        let (session, name, sha256) = open_session(path, opts)?;

        // Inputs.
        let inputs: Vec<(String, ValueType)> = session
            .inputs()
            .iter()
            .map(|o| (o.name().to_string(), o.dtype().clone()))
            .collect();
        let is_int = |t: &ValueType| {
            matches!(
                t.tensor_type(),
                Some(TensorElementType::Int32 | TensorElementType::Int64)
            )
        };
        let token_of = |t: &ValueType| match t.tensor_type() {
            Some(TensorElementType::Int32) => Some(TokenType::I32),
            Some(TensorElementType::Int64) => Some(TokenType::I64),
            _ => None,
        };
        let want_rank = match role {
            Role::Image => 4,
            Role::Text | Role::Head => 2,
        };
        let main = inputs
            .iter()
            .find(|(n, t)| {
                let rank_ok = t.tensor_shape().is_some_and(|s| s.len() == want_rank);
                let type_ok = match role {
                    Role::Text => is_int(t) && !n.to_lowercase().contains("mask"),
                    _ => t.tensor_type() == Some(TensorElementType::Float32),
                };
                rank_ok && type_ok
            })
            .ok_or_else(|| {
                sig_err(
                    &name,
                    format!(
                        "no input fits a {role:?} model (wants {}); inputs are {}",
                        match role {
                            Role::Image => "float32 [N,3,H,W]",
                            Role::Text => "int32/int64 [N,L]",
                            Role::Head => "float32 [N,D]",
                        },
                        inputs
                            .iter()
                            .map(|(n, t)| format!("{n}: {}", describe(t)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?
            .clone();
        let mut mask_input = None;
        for (n, t) in &inputs {
            if n == &main.0 {
                continue;
            }
            if role == Role::Text && is_int(t) && n.to_lowercase().contains("mask") {
                mask_input = Some((n.clone(), token_of(t).expect("int")));
            } else {
                return Err(sig_err(
                    &name,
                    format!(
                        "unexpected extra input {n}: {} (a {role:?} model takes {} only)",
                        describe(t),
                        main.0
                    ),
                ));
            }
        }
        let input_shape: Vec<i64> = main.1.tensor_shape().expect("tensor").to_vec();
        if role == Role::Image && input_shape[1] != 3 && input_shape[1] != -1 {
            return Err(sig_err(
                &name,
                format!(
                    "image input {} has {} channels, wants 3",
                    main.0, input_shape[1]
                ),
            ));
        }
        let batch = match input_shape[0] {
            k if k > 0 => BatchMode::Fixed(k as usize),
            _ => BatchMode::Dynamic(opts.batch_size.max(1)),
        };

        // Output.
        let outputs: Vec<(String, ValueType)> = session
            .outputs()
            .iter()
            .map(|o| (o.name().to_string(), o.dtype().clone()))
            .collect();
        let chosen = if let Some(o) = output {
            outputs
                .iter()
                .find(|(n, _)| n == o)
                .cloned()
                .ok_or_else(|| {
                    sig_err(
                        &name,
                        format!(
                            "no output named {o}; outputs are {}",
                            outputs
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?
        } else {
            role.usual_outputs()
                .iter()
                .find_map(|u| outputs.iter().find(|(n, _)| n == u))
                .or_else(|| {
                    if outputs.len() == 1 {
                        outputs.first()
                    } else {
                        outputs
                            .iter()
                            .find(|(_, t)| t.tensor_shape().is_some_and(|s| s.len() == 2))
                    }
                })
                .cloned()
                .ok_or_else(|| sig_err(&name, "model has no usable output".into()))?
        };
        if chosen.1.tensor_type() != Some(TensorElementType::Float32) {
            return Err(sig_err(
                &name,
                format!(
                    "output {} is {}, wants float32",
                    chosen.0,
                    describe(&chosen.1)
                ),
            ));
        }
        let oshape = chosen.1.tensor_shape().expect("tensor").to_vec();
        if oshape.len() != 2 {
            return Err(sig_err(
                &name,
                format!("output {} has shape {oshape:?}, wants [N,D]", chosen.0),
            ));
        }
        Ok(OnnxModel {
            name,
            path: path.to_path_buf(),
            sha256,
            session: Mutex::new(session),
            role,
            input: main.0,
            token_type: token_of(&main.1),
            input_shape,
            mask_input,
            output: chosen.0,
            output_dim: oshape[1],
            batch,
        })
    }

    /// Side length the image input wants (`H` of `[N,3,H,W]`), or `default` when dynamic.
    pub fn image_size(&self, default: u32) -> u32 {
        match self.input_shape.get(2) {
            Some(&h) if h > 0 => h as u32,
            _ => default,
        }
    }

    /// Width of an embedding head's input, when declared.
    pub fn input_dim(&self) -> Option<usize> {
        match self.input_shape.get(1) {
            Some(&d) if d > 0 => Some(d as usize),
            _ => None,
        }
    }

    /// Declared output width, when known.
    pub fn output_dim(&self) -> Option<usize> {
        (self.output_dim > 0).then_some(self.output_dim as usize)
    }

    /// Names of the input and output used.
    pub fn io_names(&self) -> (&str, &str) {
        (&self.input, &self.output)
    }

    /// Whether the batch dimension is fixed, and to what.
    pub fn fixed_batch(&self) -> Option<usize> {
        match self.batch {
            BatchMode::Fixed(k) => Some(k),
            BatchMode::Dynamic(_) => None,
        }
    }

    /// The token input's element type (text models).
    pub fn token_type(&self) -> Option<TokenType> {
        self.token_type
    }

    fn chunk(&self) -> usize {
        match self.batch {
            BatchMode::Fixed(k) | BatchMode::Dynamic(k) => k,
        }
    }

    /// Runs on `n` float rows of `item` values each (`item_shape` = row shape); returns the
    /// output rows, `n × width` row-major, and the width.
    pub fn run_f32(
        &self,
        data: &[f32],
        n: usize,
        item_shape: &[usize],
    ) -> Result<(Vec<f32>, usize)> {
        assert!(self.role != Role::Text, "run_f32 on a text model");
        let item: usize = item_shape.iter().product();
        assert_eq!(data.len(), n * item, "input rows");
        let chunk = self.chunk();
        let fixed = matches!(self.batch, BatchMode::Fixed(_));
        let mut out = Vec::new();
        let mut width = 0;
        let mut padded = Vec::new();
        let mut start = 0;
        while start < n {
            let m = chunk.min(n - start);
            let rows = if fixed { chunk } else { m };
            let slice = &data[start * item..(start + m) * item];
            let slice = if rows > m {
                padded.clear();
                padded.extend_from_slice(slice);
                padded.resize(rows * item, 0.0);
                &padded[..]
            } else {
                slice
            };
            let mut shape = vec![rows as i64];
            shape.extend(item_shape.iter().map(|&d| d as i64));
            let t =
                TensorRef::from_array_view((shape, slice)).map_err(|e| onnx_err(&self.name, e))?;
            let (w, vals) =
                self.run_one(vec![(self.input.clone(), SessionInputValue::from(t))], rows)?;
            width = w;
            out.extend_from_slice(&vals[..m * w]);
            start += m;
        }
        Ok((out, width))
    }

    /// Runs a text model on `n` token rows of `len` ids each.
    pub fn run_tokens(&self, ids: &[u32], n: usize, len: usize) -> Result<(Vec<f32>, usize)> {
        assert_eq!(self.role, Role::Text, "run_tokens on a non-text model");
        assert_eq!(ids.len(), n * len);
        if let Some(&l) = self.input_shape.get(1) {
            if l > 0 && l as usize != len {
                return Err(sig_err(
                    &self.name,
                    format!(
                        "token input {} wants {l} tokens per row, got {len}",
                        self.input
                    ),
                ));
            }
        }
        let chunk = self.chunk();
        let fixed = matches!(self.batch, BatchMode::Fixed(_));
        let mut out = Vec::new();
        let mut width = 0;
        let mut start = 0;
        while start < n {
            let m = chunk.min(n - start);
            let rows = if fixed { chunk } else { m };
            let mut block: Vec<u32> = ids[start * len..(start + m) * len].to_vec();
            block.resize(rows * len, 0);
            let shape = vec![rows as i64, len as i64];
            let mask: Vec<u32> = block
                .chunks(len)
                .flat_map(|row| {
                    let end = row
                        .iter()
                        .position(|&t| t == crate::tokenizer::EOT)
                        .map_or(len, |p| p + 1);
                    (0..len).map(move |i| (i < end) as u32)
                })
                .collect();
            let mut inputs = vec![(
                self.input.clone(),
                self.int_value(self.token_type.expect("text input"), &shape, &block)?,
            )];
            if let Some((mname, mt)) = &self.mask_input {
                inputs.push((mname.clone(), self.int_value(*mt, &shape, &mask)?));
            }
            let (w, vals) = self.run_one(inputs, rows)?;
            width = w;
            out.extend_from_slice(&vals[..m * w]);
            start += m;
        }
        Ok((out, width))
    }

    fn int_value(
        &self,
        t: TokenType,
        shape: &[i64],
        vals: &[u32],
    ) -> Result<SessionInputValue<'static>> {
        Ok(match t {
            TokenType::I64 => SessionInputValue::from(
                ort::value::Tensor::from_array((
                    shape.to_vec(),
                    vals.iter().map(|&v| v as i64).collect::<Vec<_>>(),
                ))
                .map_err(|e| onnx_err(&self.name, e))?,
            ),
            TokenType::I32 => SessionInputValue::from(
                ort::value::Tensor::from_array((
                    shape.to_vec(),
                    vals.iter().map(|&v| v as i32).collect::<Vec<_>>(),
                ))
                .map_err(|e| onnx_err(&self.name, e))?,
            ),
        })
    }

    fn run_one(
        &self,
        inputs: Vec<(String, SessionInputValue<'_>)>,
        rows: usize,
    ) -> Result<(usize, Vec<f32>)> {
        let mut session = self.session.lock().expect("session lock");
        let outputs = session.run(inputs).map_err(|e| onnx_err(&self.name, e))?;
        let (shape, vals) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| onnx_err(&self.name, format!("output {}: {e}", self.output)))?;
        if shape.len() != 2 || shape[0] as usize != rows {
            return Err(sig_err(
                &self.name,
                format!(
                    "output {} has shape {:?} for {rows} input rows",
                    self.output,
                    shape.to_vec()
                ),
            ));
        }
        Ok((shape[1] as usize, vals.to_vec()))
    }
}

/// Divides each row of `rows` (width `w`) by its L2 norm (rows of norm 0 stay 0).
pub fn l2_normalise(rows: &mut [f32], w: usize) {
    for r in rows.chunks_mut(w) {
        let n = r
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            for x in r.iter_mut() {
                *x = (*x as f64 / n) as f32;
            }
        }
    }
}
