//! The model against the reference tensors of the official PyTorch code (`data/parity`).

mod common;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::*;
use llamagen_train::checkpoint::{load_gpt, read_state_dict, save_gpt, validate_state_dict};
use llamagen_train::gpt::{loss, mask_to_bias};
use llamagen_train::{Condition, TrainError};

const LOGITS_TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;

fn tolerances() -> Result<(f32, f32)> {
    let m = manifest()?;
    let t = &m["suggested_tolerances"];
    Ok((
        t["gpt_logits_f32_abs"]
            .as_f64()
            .unwrap_or(LOGITS_TOL as f64) as f32,
        t["gpt_loss_f32_abs"].as_f64().unwrap_or(LOSS_TOL as f64) as f32,
    ))
}

#[test]
fn c2i_forward_matches_reference() -> Result<()> {
    let (ltol, losstol) = tolerances()?;
    let (_, model) = reference_gpt("gpt_c2i")?;
    let io = tensors("gpt_c2i_io.safetensors")?;
    let cond = Condition::Class(get(&io, "inputs.cond_idx")?.clone());
    let (logits, trace) = model.forward_traced(get(&io, "inputs.idx")?, &cond, None)?;

    let mut report = Vec::new();
    let mut check = |name: &str, ours: &Tensor, reference: &str, tol: f32| -> Result<()> {
        let e = max_abs(ours, get(&io, reference)?)?;
        report.push(format!("{name}: max abs err {e:e}"));
        anyhow::ensure!(e <= tol, "{name}: max abs err {e} > {tol}");
        Ok(())
    };
    check("logits", &logits, "outputs.logits", ltol)?;
    check(
        "h_embed",
        trace.h_embed.as_ref().unwrap(),
        "debug.h_embed",
        ltol,
    )?;
    check("h_layer0", &trace.h_layers[0], "debug.h_layer0", ltol)?;
    check("h_layer1", &trace.h_layers[1], "debug.h_layer1", ltol)?;
    check(
        "h_final_norm",
        trace.h_final_norm.as_ref().unwrap(),
        "debug.h_final_norm",
        ltol,
    )?;
    check(
        "layer0.xq_rope",
        &trace.q_rope[0],
        "debug.layer0.xq_rope",
        ltol,
    )?;
    check(
        "layer0.xk_rope",
        &trace.k_rope[0],
        "debug.layer0.xk_rope",
        ltol,
    )?;

    // RoPE table: (rows, D/2, 2) [cos, sin], first rows zero.
    let fc = get(&io, "debug.freqs_cis")?;
    let rows = fc.dim(0)?;
    let rope = model.rope();
    let ours = Tensor::stack(
        &[rope.cos.narrow(0, 0, rows)?, rope.sin.narrow(0, 0, rows)?],
        2,
    )?;
    check("freqs_cis", &ours, "debug.freqs_cis", 1e-6)?;
    // Condition rows of q and k are exactly zero.
    let q0 = trace.q_rope[0]
        .narrow(1, 0, 1)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    let k0 = trace.k_rope[0]
        .narrow(1, 0, 1)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert_eq!((q0, k0), (0.0, 0.0));

    let l = loss(&logits, get(&io, "inputs.z")?, None)?.to_scalar::<f32>()?;
    let e = (l - scalar(&io, "outputs.loss")?).abs();
    report.push(format!("loss: abs err {e:e}"));
    assert!(e <= losstol, "loss err {e}");
    println!("c2i parity: {}", report.join("; "));
    Ok(())
}

#[test]
fn t2i_forward_and_losses_match_reference() -> Result<()> {
    let (ltol, losstol) = tolerances()?;
    let (_, model) = reference_gpt("gpt_t2i")?;
    let io = tensors("gpt_t2i_io.safetensors")?;
    let cond = Condition::Caption(get(&io, "inputs.caption")?.clone());
    let mask = get(&io, "inputs.attn_mask")?;
    let (logits, trace) = model.forward_traced(get(&io, "inputs.idx")?, &cond, Some(mask))?;
    let mut report = Vec::new();
    for (name, ours, reference) in [
        ("logits", &logits, "outputs.logits"),
        ("h_embed", trace.h_embed.as_ref().unwrap(), "debug.h_embed"),
        ("h_layer0", &trace.h_layers[0], "debug.h_layer0"),
        ("h_layer1", &trace.h_layers[1], "debug.h_layer1"),
        (
            "h_final_norm",
            trace.h_final_norm.as_ref().unwrap(),
            "debug.h_final_norm",
        ),
        ("layer0.xq_rope", &trace.q_rope[0], "debug.layer0.xq_rope"),
        ("layer0.xk_rope", &trace.k_rope[0], "debug.layer0.xk_rope"),
    ] {
        let e = max_abs(ours, get(&io, reference)?)?;
        report.push(format!("{name}: {e:e}"));
        assert!(e <= ltol, "{name}: max abs err {e} > {ltol}");
    }
    let z = get(&io, "inputs.z")?;
    let lv = loss(&logits, z, Some(get(&io, "inputs.valid")?))?.to_scalar::<f32>()?;
    let ln = loss(&logits, z, None)?.to_scalar::<f32>()?;
    let ev = (lv - scalar(&io, "outputs.loss_valid")?).abs();
    let en = (ln - scalar(&io, "outputs.loss_no_valid")?).abs();
    report.push(format!("loss_valid: {ev:e}; loss_no_valid: {en:e}"));
    assert!(ev <= losstol && en <= losstol, "{report:?}");
    // The losses differ: the dummy sample is excluded by `valid`.
    assert!((lv - ln).abs() > 1e-3);
    println!("t2i parity: {}", report.join("; "));
    Ok(())
}

#[test]
fn mask_bias_blocks_disallowed_keys() -> Result<()> {
    let m = Tensor::new(&[[1u8, 0], [1, 1]], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
    let b = mask_to_bias(&m)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(b[0], 0.0);
    assert!(b[1] < -1e29);
    assert_eq!(&b[2..], &[0.0, 0.0]);
    Ok(())
}

#[test]
fn state_dict_errors_name_the_tensor_and_shapes() -> Result<()> {
    let cfg = config("gpt_c2i")?;
    let dev = Device::Cpu;
    let mut sd = read_state_dict(&parity_dir().join("gpt_c2i_weights.safetensors"), &dev)?;
    validate_state_dict(&cfg, &sd)?;

    let mut wrong = sd.clone();
    wrong.tensors.insert(
        "layers.1.attention.wo.weight".into(),
        Tensor::zeros((64, 32), DType::F32, &dev)?,
    );
    let err = validate_state_dict(&cfg, &wrong).unwrap_err();
    assert!(matches!(err, TrainError::ShapeMismatch { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("layers.1.attention.wo.weight")
            && msg.contains("[64, 32]")
            && msg.contains("[64, 64]"),
        "{msg}"
    );

    let mut missing = sd.clone();
    missing.tensors.remove("norm.weight");
    let msg = validate_state_dict(&cfg, &missing).unwrap_err().to_string();
    assert!(
        msg.contains("norm.weight") && msg.contains("gpt_c2i_weights.safetensors"),
        "{msg}"
    );

    sd.tensors.insert(
        "layers.2.ffn_norm.weight".into(),
        Tensor::zeros(64, DType::F32, &dev)?,
    );
    let msg = validate_state_dict(&cfg, &sd).unwrap_err().to_string();
    assert!(msg.contains("layers.2.ffn_norm.weight"), "{msg}");
    Ok(())
}

#[test]
fn saved_safetensors_round_trip_with_official_keys() -> Result<()> {
    let cfg = config("gpt_t2i")?;
    let dev = Device::Cpu;
    let src = parity_dir().join("gpt_t2i_weights.safetensors");
    let model = load_gpt(&src, &cfg, DType::F32, &dev)?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("saved.safetensors");
    save_gpt(&out, &model)?;
    let a = read_state_dict(&src, &dev)?;
    let b = read_state_dict(&out, &dev)?;
    let mut ka: Vec<_> = a.tensors.keys().collect();
    let mut kb: Vec<_> = b.tensors.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for (k, t) in &a.tensors {
        assert_eq!(max_abs(t, &b.tensors[k])?, 0.0, "{k}");
    }
    Ok(())
}

fn fixtures() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn torch_training_checkpoint_loads_the_model_entry() -> Result<()> {
    let cfg = config("gpt_c2i")?;
    let dev = Device::Cpu;
    // {"model", "optimizer", "steps", "args": argparse.Namespace}, with freqs_cis and a
    // KV-cache buffer in the state dict.
    let sd = read_state_dict(&fixtures().join("tiny_c2i.pt"), &dev)?;
    validate_state_dict(&cfg, &sd)?;
    let reference = read_state_dict(&parity_dir().join("gpt_c2i_weights.safetensors"), &dev)?;
    assert_eq!(sd.tensors.len(), reference.tensors.len());
    for (k, t) in &reference.tensors {
        assert_eq!(max_abs(t, &sd.tensors[k])?, 0.0, "{k}");
    }
    // The loaded model reproduces the reference logits.
    let model = load_gpt(&fixtures().join("tiny_c2i.pt"), &cfg, DType::F32, &dev)?;
    let io = tensors("gpt_c2i_io.safetensors")?;
    let logits = model.forward(
        get(&io, "inputs.idx")?,
        &Condition::Class(get(&io, "inputs.cond_idx")?.clone()),
        None,
        None,
    )?;
    assert!(max_abs(&logits, get(&io, "outputs.logits")?)? <= LOGITS_TOL);
    Ok(())
}

#[test]
fn fsdp_checkpoint_directory_loads_the_raw_state_dict() -> Result<()> {
    let cfg = config("gpt_t2i")?;
    let dev = Device::Cpu;
    let sd = read_state_dict(&fixtures().join("tiny_t2i_fsdp/0000100"), &dev)?;
    validate_state_dict(&cfg, &sd)?;
    let reference = read_state_dict(&parity_dir().join("gpt_t2i_weights.safetensors"), &dev)?;
    for (k, t) in &reference.tensors {
        assert_eq!(max_abs(t, &sd.tensors[k])?, 0.0, "{k}");
    }
    // The wrong configuration fails on the first tensor whose shape differs.
    let err = load_gpt(
        &fixtures().join("tiny_t2i_fsdp/0000100"),
        &config("gpt_t2i120")?,
        DType::F32,
        &dev,
    );
    assert!(err.is_ok(), "cls_token_num does not change shapes");
    let c2i = config("gpt_c2i")?;
    let msg = validate_state_dict(&c2i, &sd).unwrap_err().to_string();
    assert!(msg.contains("consolidated.pth"), "{msg}");
    Ok(())
}
