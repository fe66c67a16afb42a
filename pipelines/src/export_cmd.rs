//! `llamagen export llamagen`: ready shards → the on-disk layout of the official LlamaGen PyTorch
//! code, for teams training with it. `llamagen export checkpoint`: a trained GPT or tokenizer →
//! a `torch.save` checkpoint the official scripts load (see `llamagen_encode::torch_save`).
//!
//! Layout written under `--out` (only `ok` rows; files are named by sample key, or by a running
//! index for c2i as `extract_codes_c2i.py` does):
//! ```text
//! t2i:
//!   captions.jsonl            {"image_path": "images/<key>.<ext>", "text": [long, short],
//!                              "code_dir": "", "code_name": "<key>"} per sample
//!   images/<key>.<ext>        the stored centre crop at --image-size (online-VQ training)
//!   codes<S>/<key>.npy        int64 (1, h·w): centre-crop codes at S px, raster order
//!   t5_long/<key>.npy         float32 (1, L_valid, D): valid tokens only, as extract_t5_feature.py
//!   t5_short/<key>.npy        float32 (1, L_valid, D), when the sample has it
//! c2i:
//!   imagenet<S>_codes/<i>.npy  int64 (1, 10, h·w) ten-crop codes (or (1, 2, h·w): centre + flip)
//!   imagenet<S>_labels/<i>.npy int64 (1,)
//! ```
//! The trainer's dataset left-pads the T5 features to 120 tokens at load time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use llamagen_catalog::arrow::array::{Array, AsArray, RecordBatch, StructArray};
use llamagen_catalog::arrow::datatypes::Int32Type;
use llamagen_catalog::schema::col;
use llamagen_encode::text_encoder::StoreDtype;

use crate::catalog_cmd::RootArgs;

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(subcommand)]
    command: ExportCommand,
}

#[derive(Subcommand, Debug)]
enum ExportCommand {
    /// Write the official LlamaGen layout (npy codes and T5 features, jsonl lists).
    Llamagen {
        #[command(flatten)]
        root: RootArgs,
        /// Output directory (local).
        #[arg(long)]
        out: PathBuf,
        /// t2i (codes, T5 features, captions, images) or c2i (ten-crop codes and labels).
        #[arg(long, default_value = "t2i")]
        kind: String,
        /// Image size of the codes (and images) to export.
        #[arg(long, default_value_t = 256)]
        image_size: i32,
        /// Also export rows dedup marked as duplicates (`dup_kind` set); by default they are
        /// skipped.
        #[arg(long)]
        keep_duplicates: bool,
    },
    /// Write a model as a checkpoint the official PyTorch scripts load:
    /// `torch.load(out, weights_only=True)["model"]` is the official state dict.
    Checkpoint {
        /// A GPT training checkpoint directory (`train_state.json`), a tokenizer training
        /// checkpoint directory (`state.json`), both checked against their model config; or a
        /// weights file (safetensors or torch), converted tensor for tensor (without the
        /// `freqs_cis` and KV-cache buffers, which are not model state).
        #[arg(long)]
        input: PathBuf,
        /// Output file (`.pt`).
        #[arg(long)]
        out: PathBuf,
        /// Output format: `torch` (the zip format of `torch.save`).
        #[arg(long, default_value = "torch")]
        format: String,
    },
}

/// The tensors of `input` in state-dict order, and the step count where the input records one.
fn checkpoint_tensors(input: &Path) -> Result<(Vec<(String, candle_core::Tensor)>, Option<u64>)> {
    use llamagen_train::train::{MODEL_FILE, STATE_FILE, TrainState};
    use llamagen_train::vq_train::{CKPT_MODEL, CKPT_STATE, CheckpointState};
    let dev = candle_core::Device::Cpu;
    let take = |mut sd: std::collections::HashMap<String, candle_core::Tensor>,
                order: Vec<(String, Vec<usize>)>| {
        order
            .into_iter()
            .map(|(n, _)| {
                let t = sd.remove(&n).expect("validated");
                (n, t)
            })
            .collect::<Vec<_>>()
    };
    if input.join(STATE_FILE).is_file() {
        let sp = input.join(STATE_FILE);
        let state: TrainState = serde_json::from_str(&std::fs::read_to_string(&sp)?)
            .with_context(|| format!("reading {}", sp.display()))?;
        let sd = llamagen_train::checkpoint::read_state_dict(&input.join(MODEL_FILE), &dev)?;
        llamagen_train::checkpoint::validate_state_dict(&state.model, &sd)?;
        let order = state.model.state_dict_shapes();
        return Ok((take(sd.tensors, order), Some(state.step)));
    }
    if input.join(CKPT_STATE).is_file() {
        let sp = input.join(CKPT_STATE);
        let state: CheckpointState = serde_json::from_str(&std::fs::read_to_string(&sp)?)
            .with_context(|| format!("reading {}", sp.display()))?;
        let specs = llamagen_encode::vq::VqModel::tensor_specs(&state.config.model)?;
        let file = input.join(CKPT_MODEL);
        let mut sd = candle_core::safetensors::load(&file, &dev)
            .with_context(|| format!("reading {}", file.display()))?;
        for (name, shape) in &specs {
            match sd.get(name) {
                Some(t) if t.dims() == shape.as_slice() => {}
                Some(t) => bail!(
                    "{}: {name} has shape {:?}, the model's is {shape:?}",
                    file.display(),
                    t.dims()
                ),
                None => bail!("{}: {name} is missing", file.display()),
            }
        }
        if let Some(extra) = sd.keys().find(|k| !specs.iter().any(|(n, _)| n == *k)) {
            bail!("{}: {extra} is not part of the model", file.display());
        }
        let tensors = specs
            .iter()
            .map(|(n, _)| (n.clone(), sd.remove(n).expect("checked")))
            .collect();
        return Ok((tensors, Some(state.steps)));
    }
    if input.is_dir() {
        bail!(
            "{}: neither a GPT training checkpoint ({STATE_FILE}) nor a tokenizer checkpoint ({CKPT_STATE})",
            input.display()
        );
    }
    let sd = llamagen_train::checkpoint::read_state_dict(input, &dev)?;
    let mut tensors: Vec<_> = sd.tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, None))
}

fn export_checkpoint(input: &Path, out: &Path, format: &str) -> Result<ExitCode> {
    if format != "torch" {
        bail!("--format {format:?}: the only format is torch");
    }
    let (tensors, steps) = checkpoint_tensors(input)?;
    let mut entries = vec![(
        "model",
        llamagen_encode::torch_save::TorchValue::StateDict(&tensors),
    )];
    if let Some(s) = steps {
        entries.push((
            "steps",
            llamagen_encode::torch_save::TorchValue::Int(s as i64),
        ));
    }
    llamagen_encode::torch_save::save_torch(out, &entries)?;
    eprintln!(
        "wrote {} ({} tensors{}) from {}",
        out.display(),
        tensors.len(),
        steps.map(|s| format!(", step {s}")).unwrap_or_default(),
        input.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether a sample key can be used as a file name inside the export folder: 1 to 200
/// characters of `A-Z a-z 0-9 _ - .`, not starting with `.` (so no `..`, no separator, no
/// absolute path, no hidden file).
fn safe_file_stem(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A little-endian `.npy` (format 1.0) of `shape` holding `data`.
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes a little-endian `.npy` (format 1.0) of `shape` in one write. Written here rather than
/// with candle's `Tensor::write_npy`, which writes to an unbuffered file one element per `write`
/// call (about 245,000 system calls for one (1, 120, 2048) T5 feature file).
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> Result<()> {
    std::fs::write(path, npy_bytes(descr, shape, data))
        .with_context(|| format!("writing {}", path.display()))
}

fn i64_bytes(codes: &[u16]) -> Vec<u8> {
    codes
        .iter()
        .flat_map(|&c| (c as i64).to_le_bytes())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The code grids of row `i` of kind `kind` at `size`, in view order.
fn grids(b: &RecordBatch, i: usize, size: i32, kind: &str) -> Vec<(i32, Vec<u16>)> {
    let Some(list) = b
        .column_by_name(col::VQ_CODES)
        .and_then(|c| c.as_list_opt::<i32>())
    else {
        return Vec::new();
    };
    if list.is_null(i) {
        return Vec::new();
    }
    let v = list.value(i);
    let s = v.as_struct();
    let ints = |n: &str| {
        s.column_by_name(n)
            .map(|c| c.as_primitive::<Int32Type>().clone())
    };
    let (Some(sz), Some(view), Some(grid)) = (ints("image_size"), ints("view"), ints("grid"))
    else {
        return Vec::new();
    };
    let kinds = s
        .column_by_name("kind")
        .map(|c| c.as_string::<i32>().clone());
    let codes = s
        .column_by_name("codes")
        .map(|c| c.as_list::<i32>().clone());
    let (Some(kinds), Some(codes)) = (kinds, codes) else {
        return Vec::new();
    };
    let mut out: Vec<(i32, i32, Vec<u16>)> = (0..s.len())
        .filter(|&j| sz.value(j) == size && kinds.value(j) == kind)
        .map(|j| {
            let c = codes.value(j);
            (
                view.value(j),
                grid.value(j),
                llamagen_catalog::schema::codes_of(c.as_ref()).unwrap_or_default(),
            )
        })
        .collect();
    out.sort_by_key(|g| g.0);
    out.into_iter().map(|(_, g, c)| (g, c)).collect()
}

fn features(b: &RecordBatch, name: &str, i: usize) -> Result<Option<(usize, usize, Vec<f32>)>> {
    let Some(s) = b.column_by_name(name).and_then(|c| c.as_struct_opt()) else {
        return Ok(None);
    };
    if s.is_null(i) {
        return Ok(None);
    }
    let s: &StructArray = s;
    let tokens = s
        .column_by_name("tokens")
        .unwrap()
        .as_primitive::<Int32Type>()
        .value(i) as usize;
    let dim = s
        .column_by_name("dim")
        .unwrap()
        .as_primitive::<Int32Type>()
        .value(i) as usize;
    let dtype = s
        .column_by_name("dtype")
        .unwrap()
        .as_string::<i32>()
        .value(i);
    let data = s
        .column_by_name("data")
        .unwrap()
        .as_binary::<i32>()
        .value(i);
    let v = match dtype {
        "bf16" => StoreDtype::Bf16.decode(data),
        "f16" => StoreDtype::F16.decode(data),
        "f32" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        other => bail!("{name}: unknown dtype {other:?}"),
    };
    if v.len() != tokens * dim {
        bail!("{name}: {} values for {tokens}x{dim}", v.len());
    }
    Ok(Some((tokens, dim, v)))
}

fn stored_image(b: &RecordBatch, i: usize, size: i32) -> Option<(String, Vec<u8>)> {
    let list = b.column_by_name(col::IMAGES)?.as_list_opt::<i32>()?;
    if list.is_null(i) {
        return None;
    }
    let v = list.value(i);
    let s = v.as_struct();
    let sizes = s
        .column_by_name("size")?
        .as_primitive::<Int32Type>()
        .clone();
    let fmt = s.column_by_name("format")?.as_string::<i32>().clone();
    let data = s.column_by_name("data")?.as_binary::<i32>().clone();
    (0..s.len()).find(|&j| sizes.value(j) == size).map(|j| {
        let ext = match fmt.value(j) {
            "jpeg" | "jpg" => "jpg",
            other => other,
        }
        .to_string();
        (ext, data.value(j).to_vec())
    })
}

pub async fn run(args: ExportArgs) -> Result<ExitCode> {
    let (root, out, kind, image_size, keep_duplicates) = match args.command {
        ExportCommand::Checkpoint { input, out, format } => {
            return export_checkpoint(&input, &out, &format);
        }
        ExportCommand::Llamagen {
            root,
            out,
            kind,
            image_size,
            keep_duplicates,
        } => (root, out, kind, image_size, keep_duplicates),
    };
    if !matches!(kind.as_str(), "t2i" | "c2i") {
        bail!("--kind {kind:?}: use t2i or c2i");
    }
    let cat = root.open().await?;
    let ds = cat.dataset(&root.dataset);
    let snap = ds.snapshot().await?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (mut written, mut skipped, mut duplicates) = (0u64, 0u64, 0u64);
    let mut jsonl = None;
    let dirs: Vec<PathBuf> = if kind == "t2i" {
        jsonl = Some(std::io::BufWriter::new(std::fs::File::create(
            out.join("captions.jsonl"),
        )?));
        vec![
            out.join("images"),
            out.join(format!("codes{image_size}")),
            out.join("t5_long"),
            out.join("t5_short"),
        ]
    } else {
        vec![
            out.join(format!("imagenet{image_size}_codes")),
            out.join(format!("imagenet{image_size}_labels")),
        ]
    };
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let pb = indicatif::ProgressBar::new(snap.rows());
    for entry in &snap.shards {
        for b in ds.read_shard(entry, None).await? {
            let keys = b
                .column_by_name(col::KEY)
                .unwrap()
                .as_string::<i32>()
                .clone();
            let status = b
                .column_by_name(col::STATUS)
                .unwrap()
                .as_string::<i32>()
                .clone();
            let dup = b
                .column_by_name(col::DUP_KIND)
                .filter(|_| !keep_duplicates)
                .cloned();
            for i in 0..b.num_rows() {
                pb.inc(1);
                if status.value(i) != "ok" {
                    continue;
                }
                if dup.as_ref().is_some_and(|d| d.is_valid(i)) {
                    duplicates += 1;
                    continue;
                }
                let key = keys.value(i);
                // Keys become file names under --out: one safe component, never a path.
                if !safe_file_stem(key) {
                    bail!(
                        "{}: row {i} has key {key:?}, which cannot be a file name under {} \
                         (use A-Z, a-z, 0-9, '_', '-', '.'; not starting with '.')",
                        ds.shard_path(entry),
                        out.display()
                    );
                }
                if kind == "t2i" {
                    let g = grids(&b, i, image_size, "center");
                    let Some((grid, codes)) = g.first() else {
                        skipped += 1;
                        continue;
                    };
                    let Some((t, d, long)) = features(&b, col::T5_LONG, i)? else {
                        skipped += 1;
                        continue;
                    };
                    write_npy(
                        &dirs[1].join(format!("{key}.npy")),
                        "<i8",
                        &[1, (*grid * *grid) as usize],
                        &i64_bytes(codes),
                    )?;
                    write_npy(
                        &dirs[2].join(format!("{key}.npy")),
                        "<f4",
                        &[1, t, d],
                        &f32_bytes(&long),
                    )?;
                    if let Some((t, d, short)) = features(&b, col::T5_SHORT, i)? {
                        write_npy(
                            &dirs[3].join(format!("{key}.npy")),
                            "<f4",
                            &[1, t, d],
                            &f32_bytes(&short),
                        )?;
                    }
                    let mut image_path = serde_json::Value::Null;
                    if let Some((ext, data)) = stored_image(&b, i, image_size) {
                        let rel = format!("images/{key}.{ext}");
                        std::fs::write(out.join(&rel), data)?;
                        image_path = rel.into();
                    }
                    let text = |c: &str| {
                        b.column_by_name(c)
                            .and_then(|a| a.as_string_opt::<i32>())
                            .filter(|a| a.is_valid(i))
                            .map(|a| a.value(i).to_string())
                    };
                    let texts: Vec<String> = [text(col::LONG_CAPTION), text(col::SHORT_CAPTION)]
                        .into_iter()
                        .flatten()
                        .collect();
                    let line = serde_json::json!({
                        "image_path": image_path, "text": texts, "code_dir": "", "code_name": key,
                    });
                    let w = jsonl.as_mut().expect("t2i list");
                    writeln!(w, "{line}")?;
                } else {
                    let mut g = grids(&b, i, image_size, "tencrop");
                    if g.is_empty() {
                        g = grids(&b, i, image_size, "center");
                    }
                    let label = b
                        .column_by_name(col::LABEL)
                        .map(|c| c.as_primitive::<Int32Type>().clone())
                        .filter(|l| l.is_valid(i))
                        .map(|l| l.value(i));
                    let (Some(label), false) = (label, g.is_empty()) else {
                        skipped += 1;
                        continue;
                    };
                    let n = g[0].0 as usize * g[0].0 as usize;
                    let codes: Vec<u16> = g.iter().flat_map(|(_, c)| c.iter().copied()).collect();
                    write_npy(
                        &dirs[0].join(format!("{written}.npy")),
                        "<i8",
                        &[1, g.len(), n],
                        &i64_bytes(&codes),
                    )?;
                    write_npy(
                        &dirs[1].join(format!("{written}.npy")),
                        "<i8",
                        &[1],
                        &(label as i64).to_le_bytes(),
                    )?;
                }
                written += 1;
            }
        }
    }
    pb.finish_and_clear();
    if let Some(mut w) = jsonl {
        w.flush()?;
    }
    println!(
        "exported {written} samples ({kind}, {image_size} px) from {} version {} to {}; {skipped} ok samples lacked codes, features or a label; {duplicates} duplicates skipped",
        root.dataset,
        snap.version,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
