//! Configurations against the real model shapes, and gradient flow through every parameter.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use llamagen_train::checkpoint::{load_into_varmap, new_trainable, read_state_dict};
use llamagen_train::gpt::loss;
use llamagen_train::{Condition, GptConfig, GptSize, ModelType};

#[test]
fn named_configs_match_real_checkpoint_shapes() -> Result<()> {
    let p = parity_dir().join("real_config_shapes.json");
    let real: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
    let gpts = real["gpt"].as_object().context("gpt section")?;
    assert_eq!(gpts.len(), 8);
    for (label, g) in gpts {
        let size = GptSize::from_name(g["constructor"].as_str().unwrap()).context("size")?;
        let block = g["block_size"].as_u64().unwrap() as usize;
        let image = ((block as f64).sqrt() as usize) * 16;
        let cfg = if label.contains("t2i") {
            GptConfig::t2i(size, image)
        } else {
            GptConfig::c2i(size, image)
        };
        cfg.validate()?;
        assert_eq!(cfg.dim as u64, g["dim"].as_u64().unwrap(), "{label}");
        assert_eq!(
            cfg.n_layer as u64,
            g["n_layer"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            cfg.head_dim() as u64,
            g["head_dim"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            cfg.ffn_hidden() as u64,
            g["ffn_hidden"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            cfg.cls_token_num as u64,
            g["cls_token_num"].as_u64().unwrap(),
            "{label}"
        );
        assert_eq!(
            cfg.num_parameters() as u64,
            g["num_params"].as_u64().unwrap(),
            "{label}"
        );
        let sd = cfg.state_dict_shapes();
        assert_eq!(
            sd.len() as u64,
            g["num_state_dict_keys"].as_u64().unwrap(),
            "{label}"
        );
        let buffers: usize = sd
            .iter()
            .filter(|(n, _)| !cfg.parameter_names().contains(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(
            buffers as u64,
            g["num_buffer_elems_in_state_dict"].as_u64().unwrap(),
            "{label}"
        );
        for pat in g["keys_pattern"].as_array().unwrap() {
            let name = pat["name"].as_str().unwrap().replace("{i}", "0");
            let shape: Vec<usize> = pat["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let ours = sd.iter().find(|(n, _)| *n == name).context(name.clone())?;
            assert_eq!(ours.1, shape, "{label} {name}");
        }
        let rope_rows = cfg.cls_token_num + cfg.block_size;
        assert_eq!(
            g["freqs_cis_shape"],
            serde_json::json!([rope_rows, cfg.head_dim() / 2, 2]),
            "{label}"
        );
    }
    Ok(())
}

#[test]
fn ffn_hidden_rule() {
    let h = |size| GptConfig::c2i(size, 256).ffn_hidden();
    assert_eq!(h(GptSize::B), 2048);
    assert_eq!(h(GptSize::L), 2816);
    assert_eq!(h(GptSize::XL), 3584);
    assert_eq!(h(GptSize::XXL), 4096);
    assert_eq!(h(GptSize::B3), 8704);
    assert_eq!(h(GptSize::B7), 11008);
    let tiny = GptConfig {
        dim: 64,
        ..GptConfig::default()
    };
    assert_eq!(tiny.ffn_hidden(), 256);
    let t = GptConfig::t2i(GptSize::XL, 512);
    assert_eq!(
        (t.model_type, t.cls_token_num, t.block_size),
        (ModelType::T2i, 120, 1024)
    );
}

#[test]
fn invalid_configs_are_rejected() {
    let bad_grid = GptConfig {
        block_size: 15,
        ..GptConfig::c2i(GptSize::B, 256)
    };
    assert!(
        bad_grid
            .validate()
            .unwrap_err()
            .to_string()
            .contains("perfect square")
    );
    let bad_heads = GptConfig {
        n_head: 7,
        ..GptConfig::c2i(GptSize::B, 256)
    };
    assert!(bad_heads.validate().is_err());
    let drop_path = GptConfig {
        drop_path_rate: 0.1,
        ..GptConfig::c2i(GptSize::B, 256)
    };
    assert!(drop_path.validate().is_err());
}

/// Every trainable tensor receives a non-zero gradient through the plain-op training path,
/// and the t2i null-caption buffer is not a parameter.
fn all_parameters_get_gradients(name: &str, weights: &str) -> Result<()> {
    let cfg = config(name)?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &cfg, &dev)?;
    load_into_varmap(
        &varmap,
        &cfg,
        &read_state_dict(&parity_dir().join(weights), &dev)?,
    )?;
    let (logits, z) = if cfg.model_type == ModelType::C2i {
        let io = tensors("gpt_c2i_io.safetensors")?;
        let cond = Condition::Class(get(&io, "inputs.cond_idx")?.clone());
        (
            model.forward(get(&io, "inputs.idx")?, &cond, None, None)?,
            get(&io, "inputs.z")?.clone(),
        )
    } else {
        let io = tensors("gpt_t2i_io.safetensors")?;
        let cond = Condition::Caption(get(&io, "inputs.caption")?.clone());
        (
            model.forward(
                get(&io, "inputs.idx")?,
                &cond,
                Some(get(&io, "inputs.attn_mask")?),
                None,
            )?,
            get(&io, "inputs.z")?.clone(),
        )
    };
    let l = loss(&logits, &z, None)?;
    let grads = l.backward()?;
    let vars = varmap.data().lock().unwrap();
    for pname in cfg.parameter_names() {
        let var = &vars[&pname];
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for {pname}"))?;
        let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
        assert!(n > 0.0 && n.is_finite(), "{pname}: grad norm^2 {n}");
    }
    if cfg.model_type == ModelType::T2i {
        assert!(!cfg.parameter_names().iter().any(|n| n.contains("uncond")));
    }
    Ok(())
}

#[test]
fn c2i_every_parameter_gets_a_gradient() -> Result<()> {
    all_parameters_get_gradients("gpt_c2i", "gpt_c2i_weights.safetensors")
}

#[test]
fn t2i_every_parameter_gets_a_gradient() -> Result<()> {
    all_parameters_get_gradients("gpt_t2i", "gpt_t2i_weights.safetensors")
}

#[test]
fn fresh_model_is_initialised_like_the_official_code() -> Result<()> {
    let cfg = config("gpt_t2i")?;
    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &cfg, &Device::Cpu)?;
    let sd = model.state_dict();
    let get = |n: &str| sd.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let stats = |t: &Tensor| -> Result<(f32, f32)> {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        Ok((mean, var.sqrt()))
    };
    assert_eq!(stats(&get("output.weight"))?, (0.0, 0.0));
    assert_eq!(stats(&get("norm.weight"))?, (1.0, 0.0));
    let (m, s) = stats(&get("layers.0.feed_forward.w1.weight"))?;
    assert!(m.abs() < 0.002 && (s - 0.02).abs() < 0.002, "{m} {s}");
    let (_, s) = stats(&get("cls_embedding.uncond_embedding"))?;
    assert!((s - 1.0 / (32f32).sqrt()).abs() < 0.03, "{s}");
    // A zero output layer gives uniform predictions.
    let idx = Tensor::zeros((1, 15), DType::U32, &Device::Cpu)?;
    let cap = Tensor::zeros((1, 8, 32), DType::F32, &Device::Cpu)?;
    let logits = model.forward(&idx, &Condition::Caption(cap), None, None)?;
    assert_eq!(logits.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    Ok(())
}

/// The CPU float32 training path (fused ops with their own backward) against the plain candle
/// ops, which the same model runs in float64: logits, loss and every parameter's gradient.
fn fused_path_matches_plain_ops(name: &str, weights: &str) -> Result<()> {
    let cfg = config(name)?;
    let dev = Device::Cpu;
    let sd = read_state_dict(&parity_dir().join(weights), &dev)?;
    let run = |dtype: DType| -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &dev);
        let model = llamagen_train::Gpt::load(vb, &cfg)?;
        load_into_varmap(&varmap, &cfg, &sd)?;
        let (logits, z) = if cfg.model_type == ModelType::C2i {
            let io = tensors("gpt_c2i_io.safetensors")?;
            let cond = Condition::Class(get(&io, "inputs.cond_idx")?.clone());
            let idx = get(&io, "inputs.idx")?;
            (
                model.forward(idx, &cond, None, None)?,
                get(&io, "inputs.z")?.clone(),
            )
        } else {
            let io = tensors("gpt_t2i_io.safetensors")?;
            let cap = get(&io, "inputs.caption")?.to_dtype(dtype)?;
            let mask = get(&io, "inputs.attn_mask")?;
            let idx = get(&io, "inputs.idx")?;
            let logits = model.forward(idx, &Condition::Caption(cap), Some(mask), None)?;
            (logits, get(&io, "inputs.z")?.clone())
        };
        let l = loss(&logits, &z, None)?;
        let grads = l.backward()?;
        let vars = varmap.data().lock().unwrap();
        let g = cfg
            .parameter_names()
            .iter()
            .map(|p| {
                let g = grads.get(vars[p].as_tensor()).context(p.clone())?;
                Ok(g.to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits.to_dtype(DType::F32)?, l.to_dtype(DType::F32)?, g))
    };
    let (logits32, loss32, g32) = run(DType::F32)?;
    let (logits64, loss64, g64) = run(DType::F64)?;
    let max_abs = |t: &Tensor| -> Result<f32> { Ok(t.abs()?.max_all()?.to_scalar::<f32>()?) };
    let err = max_abs(&(&logits32 - &logits64)?)?;
    assert!(
        err <= 1e-4 * max_abs(&logits64)?.max(1.0),
        "{name} logits: {err}"
    );
    let (a, b) = (loss32.to_scalar::<f32>()?, loss64.to_scalar::<f32>()?);
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{name} loss {a} vs {b}");
    for ((p, x), y) in cfg.parameter_names().iter().zip(&g32).zip(&g64) {
        let scale = max_abs(y)?;
        let err = max_abs(&(x - y)?)?;
        assert!(
            scale > 0.0 && err <= 1e-3 * scale,
            "{name} {p}: error {err}, max {scale}"
        );
    }
    Ok(())
}

#[test]
fn c2i_fused_training_path_matches_the_plain_ops() -> Result<()> {
    fused_path_matches_plain_ops("gpt_c2i", "gpt_c2i_weights.safetensors")
}

#[test]
fn t2i_fused_training_path_matches_the_plain_ops() -> Result<()> {
    fused_path_matches_plain_ops("gpt_t2i", "gpt_t2i_weights.safetensors")
}
