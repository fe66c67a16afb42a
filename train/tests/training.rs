//! The official 5-step AdamW run (`train_c2i_*` reference tensors) and training-step behaviour.

mod common;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use common::*;
use llamagen_train::checkpoint::{load_into_varmap, new_trainable, read_state_dict};
use llamagen_train::optim::{AdamW, AdamWConfig, LrSchedule};
use llamagen_train::train::{Batch, batch_loss, train_step};
use llamagen_train::{Condition, Gpt, GptConfig, TrainError};

fn reference_setup() -> Result<(GptConfig, VarMap, Gpt, AdamW, Batch, serde_json::Value)> {
    let m = manifest()?;
    let t = m["configs"]["train_c2i"].clone();
    let cfg = config("gpt_c2i")?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = new_trainable(&varmap, &cfg, &dev)?;
    load_into_varmap(
        &varmap,
        &cfg,
        &read_state_dict(&parity_dir().join("gpt_c2i_weights.safetensors"), &dev)?,
    )?;
    let betas = t["betas"].as_array().context("betas")?;
    let opt = AdamW::for_gpt(
        &varmap,
        &cfg,
        AdamWConfig {
            lr: t["lr"].as_f64().unwrap(),
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: t["eps"].as_f64().unwrap(),
            weight_decay: t["weight_decay"].as_f64().unwrap(),
        },
    )?;
    let io = tensors("train_c2i_io.safetensors")?;
    let batch = Batch {
        cond: Condition::Class(get(&io, "inputs.cond_idx")?.clone()),
        tokens: get(&io, "inputs.z")?.clone(),
        mask: None,
        valid: None,
    };
    Ok((cfg, varmap, model, opt, batch, t))
}

#[test]
fn five_adamw_steps_match_reference() -> Result<()> {
    let (cfg, varmap, model, mut opt, batch, t) = reference_setup()?;
    // The official parameter groups.
    let (decay, no_decay) = opt.groups();
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(decay, names(&t["weight_decay_params"]));
    assert_eq!(no_decay, names(&t["no_weight_decay_params"]));

    let io = tensors("train_c2i_io.safetensors")?;
    let want_losses = get(&io, "outputs.step_losses")?.to_vec1::<f32>()?;
    let want_norms = get(&io, "outputs.step_grad_norms")?.to_vec1::<f32>()?;
    let max_norm = t["max_grad_norm"].as_f64().unwrap();
    let steps = t["steps"].as_u64().unwrap();
    let (mut loss_err, mut norm_err) = (0f32, 0f32);
    for s in 0..steps {
        let st = train_step(
            &model,
            &mut opt,
            std::slice::from_ref(&batch),
            max_norm,
            None,
            s,
        )?;
        loss_err = loss_err.max((st.loss - want_losses[s as usize]).abs());
        norm_err = norm_err.max((st.grad_norm - want_norms[s as usize]).abs());
    }
    let final_loss = batch_loss(&model, &batch, None)?.to_scalar::<f32>()?;
    let final_err = (final_loss - scalar(&io, "outputs.final_loss")?).abs();

    let want_w = tensors("train_c2i_final_weights.safetensors")?;
    let vars = varmap.data().lock().unwrap();
    let mut w_err = 0f32;
    for name in cfg.parameter_names() {
        w_err = w_err.max(max_abs(vars[&name].as_tensor(), get(&want_w, &name)?)?);
    }
    drop(vars);
    let state: std::collections::HashMap<String, Tensor> =
        opt.state_tensors()?.into_iter().collect();
    let (mut m_err, mut v_err) = (0f32, 0f32);
    for name in cfg.parameter_names() {
        m_err = m_err.max(max_abs(
            &state[&format!("exp_avg.{name}")],
            get(&io, &format!("optimizer.exp_avg.{name}"))?,
        )?);
        v_err = v_err.max(max_abs(
            &state[&format!("exp_avg_sq.{name}")],
            get(&io, &format!("optimizer.exp_avg_sq.{name}"))?,
        )?);
    }
    println!(
        "adamw: step losses {loss_err:e}, grad norms {norm_err:e}, final loss {final_err:e}, weights {w_err:e}, exp_avg {m_err:e}, exp_avg_sq {v_err:e}"
    );
    assert!(
        loss_err <= 1e-5 && final_err <= 1e-5,
        "losses {loss_err} {final_err}"
    );
    assert!(norm_err <= 1e-4, "grad norms {norm_err}");
    assert!(w_err <= 1e-4, "weights {w_err}");
    assert!(m_err <= 1e-5 && v_err <= 1e-6, "moments {m_err} {v_err}");
    Ok(())
}

#[test]
fn gradient_accumulation_equals_one_big_batch() -> Result<()> {
    let (_, varmap_a, model_a, mut opt_a, batch, _) = reference_setup()?;
    let (_, varmap_b, model_b, mut opt_b, _, _) = reference_setup()?;
    let half = |start: usize| -> Result<Batch> {
        let Condition::Class(c) = &batch.cond else {
            unreachable!()
        };
        Ok(Batch {
            cond: Condition::Class(c.narrow(0, start, 2)?),
            tokens: batch.tokens.narrow(0, start, 2)?,
            mask: None,
            valid: None,
        })
    };
    let a = train_step(
        &model_a,
        &mut opt_a,
        std::slice::from_ref(&batch),
        1.0,
        None,
        0,
    )?;
    let b = train_step(&model_b, &mut opt_b, &[half(0)?, half(2)?], 1.0, None, 0)?;
    assert!((a.loss - b.loss).abs() < 1e-5 && (a.grad_norm - b.grad_norm).abs() < 1e-4);
    let va = varmap_a.data().lock().unwrap();
    let vb = varmap_b.data().lock().unwrap();
    for (name, v) in va.iter() {
        assert!(
            max_abs(v.as_tensor(), vb[name].as_tensor())? < 1e-5,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn non_finite_loss_leaves_weights_untouched() -> Result<()> {
    let (cfg, varmap, model, mut opt, batch, _) = reference_setup()?;
    let name = "norm.weight";
    let nan = Tensor::full(f32::NAN, cfg.dim, &Device::Cpu)?;
    let before: Vec<(String, Tensor)> = {
        let vars = varmap.data().lock().unwrap();
        let out = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        vars[name].set(&nan)?;
        out
    };
    let err = train_step(&model, &mut opt, std::slice::from_ref(&batch), 1.0, None, 7).unwrap_err();
    assert!(
        matches!(err, TrainError::NonFiniteLoss { step: 7, .. }),
        "{err}"
    );
    assert_eq!(opt.step_count(), 0);
    let vars = varmap.data().lock().unwrap();
    for (k, t) in before {
        if k != name {
            assert_eq!(max_abs(vars[&k].as_tensor(), &t)?, 0.0, "{k}");
        }
    }
    Ok(())
}

#[test]
fn dropout_training_is_reproducible_from_the_seed() -> Result<()> {
    use rand::SeedableRng;
    let mut cfg = config("gpt_c2i")?;
    cfg.token_dropout_p = 0.1;
    cfg.resid_dropout_p = 0.1;
    cfg.ffn_dropout_p = 0.1;
    cfg.attn_dropout_p = 0.1;
    let run = || -> Result<Vec<f32>> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let model = new_trainable(&varmap, &cfg, &dev)?;
        load_into_varmap(
            &varmap,
            &cfg,
            &read_state_dict(&parity_dir().join("gpt_c2i_weights.safetensors"), &dev)?,
        )?;
        let mut opt = AdamW::for_gpt(&varmap, &cfg, AdamWConfig::default())?;
        let io = tensors("train_c2i_io.safetensors")?;
        let batch = Batch {
            cond: Condition::Class(get(&io, "inputs.cond_idx")?.clone()),
            tokens: get(&io, "inputs.z")?.clone(),
            mask: None,
            valid: None,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        (0..3)
            .map(|s| {
                Ok(train_step(
                    &model,
                    &mut opt,
                    std::slice::from_ref(&batch),
                    1.0,
                    Some(&mut rng),
                    s,
                )?
                .loss)
            })
            .collect()
    };
    let a = run()?;
    assert_eq!(a, run()?);
    // Dropout changes the loss relative to the deterministic forward.
    let want = tensors("train_c2i_io.safetensors")?;
    assert!((a[0] - get(&want, "outputs.step_losses")?.to_vec1::<f32>()?[0]).abs() > 1e-4);
    Ok(())
}

#[test]
fn lr_schedule_warmup_and_cosine() {
    let constant = LrSchedule::default();
    assert_eq!(constant.lr_at(0), 1e-4);
    assert_eq!(constant.lr_at(1_000_000), 1e-4);
    let s = LrSchedule {
        lr: 1.0,
        warmup_steps: 10,
        decay_steps: 110,
        min_lr: 0.1,
    };
    assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
    assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
    assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
    assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
    assert!((s.lr_at(500) - 0.1).abs() < 1e-12);
}

#[test]
fn resume_from_checkpoint_is_exact() -> Result<()> {
    use llamagen_train::train::{load_training_checkpoint, save_training_checkpoint, step_rng};
    let mut cfg = config("gpt_c2i")?;
    cfg.token_dropout_p = 0.1;
    cfg.resid_dropout_p = 0.1;
    cfg.ffn_dropout_p = 0.1;
    let dev = Device::Cpu;
    let io = tensors("train_c2i_io.safetensors")?;
    let batch = Batch {
        cond: Condition::Class(get(&io, "inputs.cond_idx")?.clone()),
        tokens: get(&io, "inputs.z")?.clone(),
        mask: None,
        valid: None,
    };
    let fresh = || -> Result<(VarMap, Gpt, AdamW)> {
        let varmap = VarMap::new();
        let model = new_trainable(&varmap, &cfg, &dev)?;
        load_into_varmap(
            &varmap,
            &cfg,
            &read_state_dict(&parity_dir().join("gpt_c2i_weights.safetensors"), &dev)?,
        )?;
        let opt = AdamW::for_gpt(
            &varmap,
            &cfg,
            AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
        )?;
        Ok((varmap, model, opt))
    };
    let seed = 11;
    let run = |model: &Gpt, opt: &mut AdamW, steps: std::ops::Range<u64>| -> Result<Vec<f32>> {
        steps
            .map(|s| {
                let mut rng = step_rng(seed, s);
                Ok(train_step(
                    model,
                    opt,
                    std::slice::from_ref(&batch),
                    1.0,
                    Some(&mut rng),
                    s,
                )?
                .loss)
            })
            .collect()
    };
    // Uninterrupted: 4 steps.
    let (va, ma, mut oa) = fresh()?;
    let la = run(&ma, &mut oa, 0..4)?;
    // Interrupted after 2 steps, restored into a fresh model and optimiser.
    let dir = tempfile::tempdir()?;
    let (_, mb, mut ob) = fresh()?;
    let mut lb = run(&mb, &mut ob, 0..2)?;
    let ckpt = save_training_checkpoint(dir.path(), &mb, &ob, seed)?;
    assert!(ckpt.ends_with("0000002"));
    let (vc, mc, mut oc) = fresh()?;
    let state = load_training_checkpoint(&ckpt, &vc, &cfg, &mut oc)?;
    assert_eq!((state.step, state.seed, oc.step_count()), (2, seed, 2));
    lb.extend(run(&mc, &mut oc, 2..4)?);
    assert_eq!(la, lb);
    let a = va.data().lock().unwrap();
    let c = vc.data().lock().unwrap();
    for (name, v) in a.iter() {
        assert_eq!(max_abs(v.as_tensor(), c[name].as_tensor())?, 0.0, "{name}");
    }
    // The saved model file uses official key names and loads for inference.
    llamagen_train::checkpoint::load_gpt(
        &ckpt.join("model.safetensors"),
        &cfg,
        candle_core::DType::F32,
        &dev,
    )?;
    // A checkpoint for another configuration is refused.
    let other = GptConfig {
        n_layer: 1,
        ..cfg.clone()
    };
    let (vo, _, mut oo) = {
        let varmap = VarMap::new();
        let m = new_trainable(&varmap, &other, &dev)?;
        let o = AdamW::for_gpt(&varmap, &other, AdamWConfig::default())?;
        (varmap, m, o)
    };
    assert!(load_training_checkpoint(&ckpt, &vo, &other, &mut oo).is_err());
    Ok(())
}
