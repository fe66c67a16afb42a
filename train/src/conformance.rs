//! Conformance checks of the GPT, sampling and training code against a reference directory in
//! the format of the bundled `data/parity` set: a `manifest.json` (configs, scalars,
//! suggested tolerances, file list) and safetensors files named after the configs
//! (`{config}_weights.safetensors`, `{config}_io.safetensors`, `sample_io.safetensors`,
//! `{train}_io.safetensors`, `{train}_final_weights.safetensors`).
//!
//! Invariants enforced here:
//! - Configurations, cases and tolerances come from the manifest, never from constants here
//!   (the fallbacks below apply only when the manifest has no `suggested_tolerances`).
//! - Every check yields one [`Check`]; a check whose reference data is missing or whose run
//!   fails is reported as failed with the reason, and the remaining checks still run. Only an
//!   unreadable manifest is an error.
//! - Token and index checks are exact; tensor checks compare the max absolute error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;

use crate::checkpoint::{load_gpt, load_into_varmap, new_trainable, read_state_dict};
use crate::config::GptConfig;
use crate::error::{Result, TrainError};
use crate::gpt::{Condition, Gpt, loss};
use crate::optim::{AdamW, AdamWConfig};
use crate::sample::{SamplingConfig, filtered_probs, generate, teacher_forced_logits};
use crate::train::{Batch, batch_loss, train_step};

/// The outcome of one conformance check.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked, e.g. `gpt_c2i.logits`.
    pub name: String,
    /// Whether it is within tolerance.
    pub passed: bool,
    /// The measured error and the tolerance, or why it failed.
    pub detail: String,
}

#[derive(Debug, Clone, Copy)]
struct Tolerances {
    logits: f32,
    loss: f32,
    weights: f32,
}

fn tolerances(m: &Value) -> Tolerances {
    let t = &m["suggested_tolerances"];
    let f = |k: &str, d: f32| t[k].as_f64().map(|v| v as f32).unwrap_or(d);
    Tolerances {
        logits: f("gpt_logits_f32_abs", 1e-4),
        loss: f("gpt_loss_f32_abs", 1e-5),
        weights: f("train_weights_after_5_steps_abs", 1e-4),
    }
}

struct Refs {
    dir: PathBuf,
    cache: HashMap<String, HashMap<String, Tensor>>,
}

impl Refs {
    fn file(&mut self, name: &str) -> Result<&HashMap<String, Tensor>> {
        if !self.cache.contains_key(name) {
            let path = self.dir.join(name);
            if !path.exists() {
                return Err(TrainError::MissingReference {
                    path,
                    name: name.to_string(),
                });
            }
            let t = candle_core::safetensors::load(&path, &Device::Cpu)?;
            self.cache.insert(name.to_string(), t);
        }
        Ok(&self.cache[name])
    }

    fn tensor(&mut self, file: &str, name: &str) -> Result<Tensor> {
        let dir = self.dir.clone();
        self.file(file)?
            .get(name)
            .cloned()
            .ok_or_else(|| TrainError::MissingReference {
                path: dir.join(file),
                name: name.to_string(),
            })
    }

    fn has(&mut self, file: &str, name: &str) -> bool {
        self.file(file)
            .map(|f| f.contains_key(name))
            .unwrap_or(false)
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        return Err(TrainError::InvalidInput(format!(
            "shape {:?} vs reference {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn first(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[0])
}

fn tensor_check(name: String, err: f32, tol: f32) -> Check {
    Check {
        passed: err <= tol,
        detail: format!("max abs err {err:e} (tolerance {tol:e})"),
        name,
    }
}

fn failed(name: String, e: impl std::fmt::Display) -> Check {
    Check {
        name,
        passed: false,
        detail: e.to_string(),
    }
}

fn gpt_config(m: &Value, name: &str, path: &Path) -> Result<GptConfig> {
    let v = m["configs"]
        .get(name)
        .ok_or_else(|| TrainError::MissingReference {
            path: path.join("manifest.json"),
            name: format!("configs.{name}"),
        })?;
    serde_json::from_value(v.clone()).map_err(|source| TrainError::Json {
        path: path.join("manifest.json"),
        source,
    })
}

fn load_model(dir: &Path, m: &Value, name: &str) -> Result<Gpt> {
    let cfg = gpt_config(m, name, dir)?;
    load_gpt(
        &dir.join(format!("{name}_weights.safetensors")),
        &cfg,
        DType::F32,
        &Device::Cpu,
    )
}

/// Runs every GPT, sampling and training check that the reference directory describes.
pub fn conformance_checks(dir: &Path) -> Result<Vec<Check>> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).map_err(|e| TrainError::io(&mpath, e))?;
    let m: Value = serde_json::from_str(&text).map_err(|source| TrainError::Json {
        path: mpath.clone(),
        source,
    })?;
    let tol = tolerances(&m);
    let mut refs = Refs {
        dir: dir.to_path_buf(),
        cache: HashMap::new(),
    };
    let mut checks = Vec::new();
    let configs = m["configs"].as_object().cloned().unwrap_or_default();

    for (name, c) in &configs {
        if c.get("model_type").is_none() {
            continue;
        }
        let io = format!("{name}_io.safetensors");
        if !dir.join(&io).exists() {
            // Weights without forward references (used by sampling): check that they load.
            let r = load_model(dir, &m, name);
            checks.push(Check {
                name: format!("{name}.weights"),
                passed: r.is_ok(),
                detail: r
                    .err()
                    .map_or("loads with official key names".into(), |e| e.to_string()),
            });
            continue;
        }
        match forward_checks(dir, &m, name, &io, tol, &mut refs) {
            Ok(mut c) => checks.append(&mut c),
            Err(e) => checks.push(failed(format!("{name}.forward"), e)),
        }
    }
    if let Some(sampling) = configs.get("sampling").and_then(|s| s.as_object()) {
        for (case, sc) in sampling {
            if case == "filter_cases" {
                match filter_checks(sc, &mut refs) {
                    Ok(mut c) => checks.append(&mut c),
                    Err(e) => checks.push(failed("sample.filter".into(), e)),
                }
                continue;
            }
            match sampling_checks(dir, &m, case, sc, tol, &mut refs) {
                Ok(mut c) => checks.append(&mut c),
                Err(e) => checks.push(failed(format!("sample.{case}"), e)),
            }
        }
    }
    for (name, c) in &configs {
        if !name.starts_with("train_") {
            continue;
        }
        match training_checks(dir, &m, name, c, tol, &mut refs) {
            Ok(mut c) => checks.append(&mut c),
            Err(e) => checks.push(failed(name.clone(), e)),
        }
    }
    Ok(checks)
}

fn condition(refs: &mut Refs, file: &str, prefix: &str) -> Result<Condition> {
    if refs.has(file, &format!("{prefix}cond_idx")) {
        Ok(Condition::Class(
            refs.tensor(file, &format!("{prefix}cond_idx"))?,
        ))
    } else if refs.has(file, &format!("{prefix}cond")) {
        Ok(Condition::Class(
            refs.tensor(file, &format!("{prefix}cond"))?,
        ))
    } else {
        Ok(Condition::Caption(
            refs.tensor(file, &format!("{prefix}caption"))?,
        ))
    }
}

fn optional(refs: &mut Refs, file: &str, name: &str) -> Result<Option<Tensor>> {
    if refs.has(file, name) {
        Ok(Some(refs.tensor(file, name)?))
    } else {
        Ok(None)
    }
}

fn forward_checks(
    dir: &Path,
    m: &Value,
    name: &str,
    io: &str,
    tol: Tolerances,
    refs: &mut Refs,
) -> Result<Vec<Check>> {
    let model = load_model(dir, m, name)?;
    let cond = condition(refs, io, "inputs.")?;
    let idx = refs.tensor(io, "inputs.idx")?;
    let z = refs.tensor(io, "inputs.z")?;
    let mask = optional(refs, io, "inputs.attn_mask")?;
    let valid = optional(refs, io, "inputs.valid")?;
    let (logits, trace) = model.forward_traced(&idx, &cond, mask.as_ref())?;
    let mut out = Vec::new();
    let mut cmp = |label: &str, ours: &Tensor, reference: &str, t: f32| {
        let c = if refs.has(io, reference) {
            match refs.tensor(io, reference).and_then(|r| max_abs(ours, &r)) {
                Ok(e) => tensor_check(format!("{name}.{label}"), e, t),
                Err(e) => failed(format!("{name}.{label}"), e),
            }
        } else {
            return;
        };
        out.push(c);
    };
    cmp("logits", &logits, "outputs.logits", tol.logits);
    if let Some(h) = &trace.h_embed {
        cmp("h_embed", h, "debug.h_embed", tol.logits);
    }
    for (i, h) in trace.h_layers.iter().enumerate() {
        cmp(
            &format!("h_layer{i}"),
            h,
            &format!("debug.h_layer{i}"),
            tol.logits,
        );
    }
    if let Some(h) = &trace.h_final_norm {
        cmp("h_final_norm", h, "debug.h_final_norm", tol.logits);
    }
    for (i, (q, k)) in trace.q_rope.iter().zip(&trace.k_rope).enumerate() {
        cmp(
            &format!("layer{i}.xq_rope"),
            q,
            &format!("debug.layer{i}.xq_rope"),
            tol.logits,
        );
        cmp(
            &format!("layer{i}.xk_rope"),
            k,
            &format!("debug.layer{i}.xk_rope"),
            tol.logits,
        );
    }
    let rows = logits.dim(1)? + model.config().cls_token_num - 1;
    let rope = Tensor::stack(
        &[
            model.rope().cos.narrow(0, 0, rows)?,
            model.rope().sin.narrow(0, 0, rows)?,
        ],
        2,
    )?;
    cmp("freqs_cis", &rope, "debug.freqs_cis", tol.logits);
    let plain = loss(&logits, &z, None)?;
    for (label, reference, value) in [
        ("loss", "outputs.loss", Some(plain.clone())),
        (
            "loss_no_valid",
            "outputs.loss_no_valid",
            Some(plain.clone()),
        ),
        (
            "loss_valid",
            "outputs.loss_valid",
            valid
                .as_ref()
                .map(|v| loss(&logits, &z, Some(v)))
                .transpose()?,
        ),
    ] {
        if !refs.has(io, reference) {
            continue;
        }
        let c = match value {
            None => failed(format!("{name}.{label}"), "reference has no inputs.valid"),
            Some(v) => {
                let e = (first(&v)? - first(&refs.tensor(io, reference)?)?).abs();
                tensor_check(format!("{name}.{label}"), e, tol.loss)
            }
        };
        out.push(c);
    }
    Ok(out)
}

fn sampling_checks(
    dir: &Path,
    m: &Value,
    case: &str,
    sc: &Value,
    tol: Tolerances,
    refs: &mut Refs,
) -> Result<Vec<Check>> {
    let file = "sample_io.safetensors";
    let model_name = sc["model"]
        .as_str()
        .ok_or_else(|| TrainError::MissingReference {
            path: dir.join("manifest.json"),
            name: format!("configs.sampling.{case}.model"),
        })?;
    let model = load_model(dir, m, model_name)?;
    let prefix = format!("{case}.");
    let cond = condition(refs, file, &prefix)?;
    let emb_mask = optional(refs, file, &format!("{case}.emb_mask"))?;
    let settings = SamplingConfig {
        cfg_scale: sc["cfg_scale"].as_f64().unwrap_or(1.0) as f32,
        cfg_interval: sc["cfg_interval"].as_i64().unwrap_or(-1),
        temperature: sc["temperature"].as_f64().unwrap_or(1.0) as f32,
        top_k: sc["top_k"].as_u64().unwrap_or(0) as usize,
        top_p: sc["top_p"].as_f64().unwrap_or(1.0) as f32,
        sample_logits: sc["sample_logits"].as_bool().unwrap_or(true),
    };
    let want = refs
        .tensor(file, &format!("{case}.tokens"))?
        .to_dtype(DType::U32)?;
    let n = sc["max_new_tokens"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(want.dim(1)?);
    let got = generate(
        &model,
        &cond,
        emb_mask.as_ref(),
        n,
        &settings,
        &mut StdRng::seed_from_u64(0),
    )?;
    let (g, w) = (got.to_vec2::<u32>()?, want.to_vec2::<u32>()?);
    let mismatches = g
        .iter()
        .flatten()
        .zip(w.iter().flatten())
        .filter(|(a, b)| a != b)
        .count();
    let mut out = vec![Check {
        name: format!("sample.{case}.tokens"),
        passed: g == w,
        detail: if g == w {
            format!("{} tokens identical", w.len() * n)
        } else {
            format!("{mismatches} of {} tokens differ", w.len() * n)
        },
    }];
    let tf_name = format!("{case}.teacher_forced_logits");
    if refs.has(file, &tf_name) {
        let tf =
            teacher_forced_logits(&model, &cond, emb_mask.as_ref(), &want, settings.cfg_scale)?;
        let e = max_abs(&tf, &refs.tensor(file, &tf_name)?)?;
        out.push(tensor_check(
            format!("sample.{case}.teacher_forced_logits"),
            e,
            tol.logits,
        ));
    }
    Ok(out)
}

fn filter_checks(cases: &Value, refs: &mut Refs) -> Result<Vec<Check>> {
    let file = "sample_io.safetensors";
    let logits = refs.tensor(file, "filter.logits")?;
    // `sample()` reads logits[:, -1, :].
    let last = if logits.rank() == 3 {
        let l = logits.dim(1)?;
        logits.narrow(1, l - 1, 1)?.squeeze(1)?
    } else {
        logits
    }
    .to_vec2::<f32>()?;
    let mut out = Vec::new();
    for (i, case) in cases
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let name = format!("sample.filter.case{i}");
        let want = match refs.tensor(file, &format!("filter.case{i}.probs")) {
            Ok(t) => t.to_vec2::<f32>()?,
            Err(e) => {
                out.push(failed(name, e));
                continue;
            }
        };
        let (mut err, mut kept_differs) = (0f32, false);
        for (row, w) in last.iter().zip(&want) {
            let got = filtered_probs(
                row,
                case["temperature"].as_f64().unwrap_or(1.0) as f32,
                case["top_k"].as_u64().unwrap_or(0) as usize,
                case["top_p"].as_f64().unwrap_or(1.0) as f32,
            );
            for (g, w) in got.iter().zip(w) {
                kept_differs |= (*g == 0.0) != (*w == 0.0);
                err = err.max((g - w).abs());
            }
        }
        let mut c = tensor_check(name, err, 1e-6);
        if kept_differs {
            c.passed = false;
            c.detail = format!("kept token set differs; {}", c.detail);
        }
        out.push(c);
    }
    Ok(out)
}

fn training_checks(
    dir: &Path,
    m: &Value,
    name: &str,
    t: &Value,
    tol: Tolerances,
    refs: &mut Refs,
) -> Result<Vec<Check>> {
    let model_name = t["model"]
        .as_str()
        .and_then(|s| s.split_whitespace().next())
        .ok_or_else(|| TrainError::MissingReference {
            path: dir.join("manifest.json"),
            name: format!("configs.{name}.model"),
        })?;
    let cfg = gpt_config(m, model_name, dir)?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &cfg, &dev)?;
    load_into_varmap(
        &varmap,
        &cfg,
        &read_state_dict(&dir.join(format!("{model_name}_weights.safetensors")), &dev)?,
    )?;
    let betas = t["betas"].as_array().cloned().unwrap_or_default();
    let d = AdamWConfig::default();
    let mut opt = AdamW::for_gpt(
        &varmap,
        &cfg,
        AdamWConfig {
            lr: t["lr"].as_f64().unwrap_or(d.lr),
            beta1: betas.first().and_then(|v| v.as_f64()).unwrap_or(d.beta1),
            beta2: betas.get(1).and_then(|v| v.as_f64()).unwrap_or(d.beta2),
            eps: t["eps"].as_f64().unwrap_or(d.eps),
            weight_decay: t["weight_decay"].as_f64().unwrap_or(d.weight_decay),
        },
    )?;
    let mut out = Vec::new();
    let (decay, no_decay) = opt.groups();
    let listed = |k: &str| -> Option<Vec<String>> {
        t[k].as_array().map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
    };
    if let (Some(wd), Some(nwd)) = (
        listed("weight_decay_params"),
        listed("no_weight_decay_params"),
    ) {
        let ok = wd == decay && nwd == no_decay;
        out.push(Check {
            name: format!("{name}.param_groups"),
            passed: ok,
            detail: format!(
                "{} decayed / {} non-decayed tensors{}",
                decay.len(),
                no_decay.len(),
                if ok {
                    ""
                } else {
                    " (differ from the reference lists)"
                }
            ),
        });
    }
    let io = format!("{name}_io.safetensors");
    let batch = Batch {
        cond: condition(refs, &io, "inputs.")?,
        tokens: refs.tensor(&io, "inputs.z")?,
        mask: optional(refs, &io, "inputs.attn_mask")?,
        valid: optional(refs, &io, "inputs.valid")?,
    };
    let want_losses = refs.tensor(&io, "outputs.step_losses")?.to_vec1::<f32>()?;
    let want_norms = optional(refs, &io, "outputs.step_grad_norms")?;
    let steps = t["steps"].as_u64().unwrap_or(want_losses.len() as u64);
    let max_norm = t["max_grad_norm"].as_f64().unwrap_or(1.0);
    let (mut le, mut ne) = (0f32, 0f32);
    for s in 0..steps {
        let st = train_step(
            &model,
            &mut opt,
            std::slice::from_ref(&batch),
            max_norm,
            None,
            s,
        )?;
        le = le.max((st.loss - want_losses[s as usize]).abs());
        if let Some(n) = &want_norms {
            ne = ne.max((st.grad_norm - n.to_vec1::<f32>()?[s as usize]).abs());
        }
    }
    out.push(tensor_check(format!("{name}.step_losses"), le, tol.loss));
    if want_norms.is_some() {
        out.push(tensor_check(
            format!("{name}.step_grad_norms"),
            ne,
            tol.logits,
        ));
    }
    if refs.has(&io, "outputs.final_loss") {
        let fl = batch_loss(&model, &batch, None)?;
        let e = (first(&fl)? - first(&refs.tensor(&io, "outputs.final_loss")?)?).abs();
        out.push(tensor_check(format!("{name}.final_loss"), e, tol.loss));
    }
    let fw = format!("{name}_final_weights.safetensors");
    let vars: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("VarMap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mut we = 0f32;
    for p in cfg.parameter_names() {
        we = we.max(max_abs(&vars[&p], &refs.tensor(&fw, &p)?)?);
    }
    out.push(tensor_check(
        format!("{name}.final_weights"),
        we,
        tol.weights,
    ));
    let state: HashMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
    for moment in ["exp_avg", "exp_avg_sq"] {
        let mut e = 0f32;
        let mut present = false;
        for p in cfg.parameter_names() {
            let key = format!("optimizer.{moment}.{p}");
            if refs.has(&io, &key) {
                present = true;
                e = e.max(max_abs(
                    &state[&format!("{moment}.{p}")],
                    &refs.tensor(&io, &key)?,
                )?);
            }
        }
        if present {
            out.push(tensor_check(format!("{name}.{moment}"), e, tol.weights));
        }
    }
    Ok(out)
}
