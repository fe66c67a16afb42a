#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use llamagen_train::GptConfig;

pub fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

pub fn manifest() -> Result<serde_json::Value> {
    let p = parity_dir().join("manifest.json");
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
    )?)
}

pub fn config(name: &str) -> Result<GptConfig> {
    let m = manifest()?;
    Ok(serde_json::from_value(m["configs"][name].clone())?)
}

/// The reference GPT `name` of the manifest, with its weights, in float32 on the CPU.
pub fn reference_gpt(name: &str) -> Result<(GptConfig, llamagen_train::Gpt)> {
    let cfg = config(name)?;
    let model = llamagen_train::checkpoint::load_gpt(
        &parity_dir().join(format!("{name}_weights.safetensors")),
        &cfg,
        DType::F32,
        &Device::Cpu,
    )?;
    Ok((cfg, model))
}

pub fn tensors(file: &str) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        parity_dir().join(file),
        &Device::Cpu,
    )?)
}

pub fn get<'a>(m: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    m.get(name)
        .with_context(|| format!("reference tensor {name}"))
}

pub fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

pub fn scalar(m: &HashMap<String, Tensor>, name: &str) -> Result<f32> {
    Ok(get(m, name)?.flatten_all()?.to_vec1::<f32>()?[0])
}
