//! Conformance checks against a reference directory in the layout of `data/parity/`:
//! `manifest.json` (configs, tolerances), `vq_weights.safetensors`, `vq_io.safetensors`,
//! `augment_io.safetensors` and optionally `real_config_shapes.json`.
//!
//! Invariants enforced here:
//! - Every config value (model shape, image and crop sizes, cases) and the float tolerance come
//!   from the manifest; only the file and tensor naming scheme is fixed.
//! - Codes, codebook usage and every augmentation output must be exactly equal; VQ float
//!   tensors must be within the manifest's `suggested_tolerances.vq_f32_abs`.
//! - A check that cannot run because an earlier step failed (the model does not load, a reference
//!   tensor is missing) is reported as failed with the reason, never as passed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::augment;
use crate::error::EncodeError;
use crate::vq::{ModelArgs, VqModel};

type Result<T> = std::result::Result<T, EncodeError>;

/// The outcome of one conformance check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Dotted name, e.g. `vq.indices` or `augment.big.ten_crop`.
    pub name: String,
    pub passed: bool,
    /// What was compared and by how much it differed.
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Manifest {
    configs: Configs,
    #[serde(default)]
    suggested_tolerances: Tolerances,
}

#[derive(Debug, Deserialize)]
struct Configs {
    vq: Option<VqConfig>,
    augment: Option<AugmentConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct Tolerances {
    vq_f32_abs: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct VqConfig {
    ch: usize,
    num_res_blocks: usize,
    model_args: VqModelArgs,
}

#[derive(Debug, Deserialize)]
struct VqModelArgs {
    codebook_size: usize,
    codebook_embed_dim: usize,
    codebook_l2_norm: bool,
    codebook_show_usage: bool,
    commit_loss_beta: f64,
    entropy_loss_ratio: f64,
    encoder_ch_mult: Vec<usize>,
    decoder_ch_mult: Vec<usize>,
    z_channels: usize,
    dropout_p: f64,
}

impl VqConfig {
    fn model_args(&self) -> ModelArgs {
        let a = &self.model_args;
        ModelArgs {
            codebook_size: a.codebook_size,
            codebook_embed_dim: a.codebook_embed_dim,
            codebook_l2_norm: a.codebook_l2_norm,
            codebook_show_usage: a.codebook_show_usage,
            commit_loss_beta: a.commit_loss_beta,
            entropy_loss_ratio: a.entropy_loss_ratio,
            encoder_ch_mult: a.encoder_ch_mult.clone(),
            decoder_ch_mult: a.decoder_ch_mult.clone(),
            z_channels: a.z_channels,
            dropout_p: a.dropout_p,
            ch: self.ch,
            num_res_blocks: self.num_res_blocks,
        }
    }
}

#[derive(Debug, Deserialize)]
struct AugmentConfig {
    image_size: u32,
    crop_range: f64,
    crop_size: u32,
    cases: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    real_crop_sizes: BTreeMap<String, u32>,
}

/// Default float tolerance when the manifest names none.
const DEFAULT_VQ_TOL: f64 = 1e-4;

/// The model args a reference directory's manifest describes for its VQ, if any.
pub fn reference_model_args(dir: &Path) -> Result<Option<ModelArgs>> {
    Ok(read_manifest(dir)?.configs.vq.map(|v| v.model_args()))
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| EncodeError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| EncodeError::Reference {
        path,
        reason: e.to_string(),
    })
}

fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| EncodeError::Reference {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Runs every VQ and augmentation check `dir` describes, on the CPU.
pub fn conformance_checks(dir: &Path) -> Result<Vec<Check>> {
    let manifest = read_manifest(dir)?;
    let mut checks = Vec::new();
    if let Some(vq) = &manifest.configs.vq {
        let tol = manifest
            .suggested_tolerances
            .vq_f32_abs
            .unwrap_or(DEFAULT_VQ_TOL);
        checks.extend(vq_checks(dir, &vq.model_args(), tol)?);
    }
    let real = dir.join("real_config_shapes.json");
    if real.exists() {
        checks.extend(real_config_checks(&real)?);
    }
    if let Some(aug) = &manifest.configs.augment {
        checks.extend(augment_checks(dir, aug)?);
    }
    if checks.is_empty() {
        return Err(EncodeError::Reference {
            path: dir.join("manifest.json"),
            reason: "describes no VQ or augmentation reference".into(),
        });
    }
    Ok(checks)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> std::result::Result<f64, String> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} vs reference {:?}", a.dims(), b.dims()));
    }
    let diff = || -> candle_core::Result<f64> {
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        Ok(d as f64)
    };
    diff().map_err(|e| e.to_string())
}

fn close(name: &str, got: &Tensor, want: Option<&Tensor>, tol: f64) -> Check {
    let Some(want) = want else {
        return Check::new(name, false, "reference tensor missing");
    };
    match max_abs_diff(got, want) {
        Ok(d) => Check::new(
            name,
            d <= tol,
            format!("max abs diff {d:.3e} (tolerance {tol:.0e})"),
        ),
        Err(e) => Check::new(name, false, e),
    }
}

fn exact_codes(name: &str, got: &Tensor, want: Option<&Tensor>) -> Check {
    let Some(want) = want else {
        return Check::new(name, false, "reference tensor missing");
    };
    let as_i64 = |t: &Tensor| -> candle_core::Result<Vec<i64>> {
        t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()
    };
    if got.dims() != want.dims() {
        return Check::new(
            name,
            false,
            format!("shape {:?} vs reference {:?}", got.dims(), want.dims()),
        );
    }
    match (as_i64(got), as_i64(want)) {
        (Ok(g), Ok(w)) => {
            let equal = g.iter().zip(&w).filter(|(a, b)| a == b).count();
            Check::new(
                name,
                equal == w.len(),
                format!("{equal} of {} codes equal", w.len()),
            )
        }
        (Err(e), _) | (_, Err(e)) => Check::new(name, false, e.to_string()),
    }
}

fn vq_checks(dir: &Path, args: &ModelArgs, tol: f64) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let weights = dir.join("vq_weights.safetensors");
    let mut model = match VqModel::from_file(&weights, args, &Device::Cpu) {
        Ok(m) => {
            checks.push(Check::new(
                "vq.load",
                true,
                format!(
                    "{} tensors, downsampling {}",
                    m.named_tensors().len(),
                    m.downsample_factor()
                ),
            ));
            m
        }
        Err(e) => {
            checks.push(Check::new("vq.load", false, e.to_string()));
            return Ok(checks);
        }
    };
    let io = load_tensors(&dir.join("vq_io.safetensors"))?;
    let Some(x) = io.get("inputs.images") else {
        checks.push(Check::new(
            "vq.inputs",
            false,
            "reference tensor inputs.images missing",
        ));
        return Ok(checks);
    };
    let out = |n: &str| io.get(&format!("outputs.{n}"));

    let trace = match model.encode_trace(x) {
        Ok(t) => t,
        Err(e) => {
            checks.push(Check::new("vq.encode", false, e.to_string()));
            return Ok(checks);
        }
    };
    checks.push(close(
        "vq.encoder_out",
        &trace.encoder_out,
        out("encoder_out"),
        tol,
    ));
    checks.push(close(
        "vq.pre_quant",
        &trace.pre_quant,
        out("pre_quant"),
        tol,
    ));
    checks.push(close("vq.quant", &trace.quantized.quant, out("quant"), tol));
    checks.push(close(
        "vq.distances",
        &trace.quantized.distances,
        out("distances"),
        tol,
    ));
    checks.push(exact_codes(
        "vq.indices",
        &trace.quantized.indices,
        out("indices"),
    ));
    match model.encode_indices(x) {
        Ok(grid) => checks.push(exact_codes("vq.indices_bhw", &grid, out("indices_bhw"))),
        Err(e) => checks.push(Check::new("vq.indices_bhw", false, e.to_string())),
    }
    match model.decode(&trace.quantized.quant) {
        Ok(d) => checks.push(close("vq.decoded", &d, out("decoded"), tol)),
        Err(e) => checks.push(Check::new("vq.decoded", false, e.to_string())),
    }
    let (b, c, h, w) = trace.quantized.quant.dims4()?;
    match out("indices").map(|i| model.decode_code(i, (b, c, h, w))) {
        Some(Ok(d)) => checks.push(close(
            "vq.decoded_from_code",
            &d,
            out("decoded_from_code"),
            tol,
        )),
        Some(Err(e)) => checks.push(Check::new("vq.decoded_from_code", false, e.to_string())),
        None => checks.push(Check::new(
            "vq.decoded_from_code",
            false,
            "reference tensor outputs.indices missing",
        )),
    }

    match model.forward_train(x) {
        Ok((_, _, losses)) => {
            let scalar = |t: &Tensor| t.reshape(1).map_err(EncodeError::from);
            checks.push(close(
                "vq.train_vq_loss",
                &scalar(&losses.vq_loss)?,
                out("train_vq_loss"),
                tol,
            ));
            checks.push(close(
                "vq.train_commit_loss",
                &scalar(&losses.commit_loss)?,
                out("train_commit_loss"),
                tol,
            ));
            checks.push(close(
                "vq.train_entropy_loss",
                &scalar(&losses.entropy_loss)?,
                out("train_entropy_loss"),
                tol,
            ));
            let want = out("train_codebook_usage")
                .and_then(|t| t.flatten_all().ok())
                .and_then(|t| t.to_vec1::<f32>().ok())
                .and_then(|v| v.first().copied());
            checks.push(match (losses.codebook_usage, want) {
                (Some(got), Some(want)) => Check::new(
                    "vq.train_codebook_usage",
                    got as f32 == want,
                    format!("{got} (reference {want})"),
                ),
                (None, _) => Check::new(
                    "vq.train_codebook_usage",
                    false,
                    "usage tracking is off in this config",
                ),
                (_, None) => {
                    Check::new("vq.train_codebook_usage", false, "reference tensor missing")
                }
            });
        }
        Err(e) => checks.push(Check::new("vq.train", false, e.to_string())),
    }
    Ok(checks)
}

fn real_config_checks(path: &Path) -> Result<Vec<Check>> {
    let text = std::fs::read_to_string(path).map_err(|e| EncodeError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EncodeError::Reference {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut checks = Vec::new();
    let Some(configs) = v.get("vq").and_then(|v| v.as_object()) else {
        return Ok(checks);
    };
    for (name, cfg) in configs {
        let check_name = format!("vq.real_config.{name}");
        let args = match cfg.get("constructor").and_then(|c| c.as_str()) {
            Some("VQ-16") => ModelArgs::vq_16(),
            Some("VQ-8") => ModelArgs::vq_8(),
            other => {
                checks.push(Check::new(
                    check_name,
                    false,
                    format!("unknown constructor {other:?}"),
                ));
                continue;
            }
        };
        let mut args = args;
        if let Some(kw) = cfg.get("kwargs") {
            if let Some(n) = kw.get("codebook_size").and_then(|n| n.as_u64()) {
                args.codebook_size = n as usize;
            }
            if let Some(n) = kw.get("codebook_embed_dim").and_then(|n| n.as_u64()) {
                args.codebook_embed_dim = n as usize;
            }
        }
        let want: Vec<(String, Vec<usize>)> = cfg
            .get("keys")
            .and_then(|k| k.as_array())
            .map(|keys| {
                keys.iter()
                    .map(|k| {
                        let name = k["name"].as_str().unwrap_or_default().to_string();
                        let shape = k["shape"]
                            .as_array()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|d| d.as_u64())
                                    .map(|d| d as usize)
                                    .collect()
                            })
                            .unwrap_or_default();
                        (name, shape)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let got = VqModel::tensor_specs(&args)?;
        let first_diff = got
            .iter()
            .zip(&want)
            .position(|(g, w)| g != w)
            .or((got.len() != want.len()).then_some(got.len().min(want.len())));
        let params: usize = got
            .iter()
            .filter(|(n, _)| n != "quantize.codebook_used")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let want_params = cfg.get("num_params").and_then(|n| n.as_u64());
        let passed = first_diff.is_none() && want_params.is_none_or(|p| p == params as u64);
        let detail = match first_diff {
            Some(i) => format!("key {i}: {:?} vs official {:?}", got.get(i), want.get(i)),
            None => format!("{} keys in order, {params} parameters", got.len()),
        };
        checks.push(Check::new(check_name, passed, detail));
    }
    Ok(checks)
}

fn image_of(t: &Tensor) -> std::result::Result<image::RgbImage, String> {
    let (h, w, c) = t.dims3().map_err(|e| e.to_string())?;
    if c != 3 {
        return Err(format!("expected (H, W, 3), got {:?}", t.dims()));
    }
    let data = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(|e| e.to_string())?;
    augment::rgb_from_hwc(data, h as u32, w as u32).map_err(|e| e.to_string())
}

fn exact_floats(name: &str, got: Result<Tensor>, want: Option<&Tensor>) -> Check {
    let Some(want) = want else {
        return Check::new(name, false, "reference tensor missing");
    };
    let got = match got {
        Ok(g) => g,
        Err(e) => return Check::new(name, false, e.to_string()),
    };
    if got.dims() != want.dims() {
        return Check::new(
            name,
            false,
            format!("shape {:?} vs reference {:?}", got.dims(), want.dims()),
        );
    }
    let v = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
    match (v(&got), v(want)) {
        (Ok(g), Ok(w)) => {
            let differ = g.iter().zip(&w).filter(|(a, b)| a != b).count();
            Check::new(
                name,
                differ == 0,
                format!("{differ} of {} values differ", w.len()),
            )
        }
        (Err(e), _) | (_, Err(e)) => Check::new(name, false, e.to_string()),
    }
}

fn augment_checks(dir: &Path, cfg: &AugmentConfig) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let derived = augment::crop_size(cfg.image_size, cfg.crop_range);
    checks.push(Check::new(
        "augment.crop_size",
        derived == cfg.crop_size,
        format!(
            "int({}·{}) = {derived} (reference {})",
            cfg.image_size, cfg.crop_range, cfg.crop_size
        ),
    ));
    for (label, want) in &cfg.real_crop_sizes {
        let parsed = label
            .split_once('@')
            .and_then(|(s, r)| Some((s.parse::<u32>().ok()?, r.parse::<f64>().ok()?)));
        checks.push(match parsed {
            Some((s, r)) => {
                let got = augment::crop_size(s, r);
                Check::new(
                    format!("augment.real_crop_size.{label}"),
                    got == *want,
                    format!("{got} (reference {want})"),
                )
            }
            None => Check::new(
                format!("augment.real_crop_size.{label}"),
                false,
                "label is not SIZE@RANGE",
            ),
        });
    }

    let io = load_tensors(&dir.join("augment_io.safetensors"))?;
    for case in cfg.cases.keys() {
        let prefix = format!("augment.{case}");
        let input = match io.get(&format!("{case}.input_hwc_u8")).map(image_of) {
            Some(Ok(img)) => img,
            Some(Err(e)) => {
                checks.push(Check::new(format!("{prefix}.input"), false, e));
                continue;
            }
            None => {
                checks.push(Check::new(
                    format!("{prefix}.input"),
                    false,
                    "reference tensor missing",
                ));
                continue;
            }
        };
        let crop_name = format!("{case}.center_crop_{}_hwc_u8", cfg.crop_size);
        let name = format!("{prefix}.center_crop_{}", cfg.crop_size);
        checks.push(
            match (
                augment::center_crop_arr(&input, cfg.crop_size),
                io.get(&crop_name).map(image_of),
            ) {
                (Ok(got), Some(Ok(want))) => {
                    if got.dimensions() != want.dimensions() {
                        Check::new(
                            name,
                            false,
                            format!(
                                "size {:?} vs reference {:?}",
                                got.dimensions(),
                                want.dimensions()
                            ),
                        )
                    } else {
                        let differ = got
                            .as_raw()
                            .iter()
                            .zip(want.as_raw())
                            .filter(|(a, b)| a != b)
                            .count();
                        Check::new(
                            name,
                            differ == 0,
                            format!("{differ} of {} bytes differ", want.as_raw().len()),
                        )
                    }
                }
                (Err(e), _) => Check::new(name, false, e.to_string()),
                (_, Some(Err(e))) => Check::new(name, false, e),
                (_, None) => Check::new(name, false, "reference tensor missing"),
            },
        );

        let ten = augment::ten_crop_arr(&input, cfg.image_size, cfg.crop_range)
            .map_err(EncodeError::from)
            .and_then(|crops| augment::to_tensor(&crops, &Device::Cpu));
        checks.push(exact_floats(
            &format!("{prefix}.ten_crop"),
            ten,
            io.get(&format!("{case}.ten_crop")),
        ));
        let pair = augment::center_crop_and_flip(&input, cfg.image_size)
            .map_err(EncodeError::from)
            .and_then(|p| augment::to_tensor(&p, &Device::Cpu));
        let (plain, flip) = match pair {
            Ok(t) => (
                t.get(0).map_err(EncodeError::from),
                t.get(1).map_err(EncodeError::from),
            ),
            Err(e) => {
                let msg = e.to_string();
                (
                    Err(EncodeError::InvalidInput(msg.clone())),
                    Err(EncodeError::InvalidInput(msg)),
                )
            }
        };
        checks.push(exact_floats(
            &format!("{prefix}.plain_center_crop"),
            plain,
            io.get(&format!("{case}.plain_center_crop")),
        ));
        checks.push(exact_floats(
            &format!("{prefix}.plain_center_crop_flip"),
            flip,
            io.get(&format!("{case}.plain_center_crop_flip")),
        ));
    }
    Ok(checks)
}
