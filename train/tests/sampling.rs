//! Generation against the official `generate()` reference tokens and filter cases.

mod common;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use common::*;
use llamagen_train::Condition;
use llamagen_train::gpt::caption_attention_mask;
use llamagen_train::sample::{SamplingConfig, filtered_probs, generate, teacher_forced_logits};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn run_case(case: &str) -> Result<()> {
    let m = manifest()?;
    let sc_json = &m["configs"]["sampling"][case];
    let model_name = sc_json["model"].as_str().context("model")?;
    let (_, model) = reference_gpt(model_name)?;
    let io = tensors("sample_io.safetensors")?;
    let (cond, emb_mask) = if io.contains_key(&format!("{case}.cond")) {
        (
            Condition::Class(get(&io, &format!("{case}.cond"))?.clone()),
            None,
        )
    } else {
        (
            Condition::Caption(get(&io, &format!("{case}.caption"))?.clone()),
            Some(get(&io, &format!("{case}.emb_mask"))?.clone()),
        )
    };
    let sc = SamplingConfig {
        cfg_scale: sc_json["cfg_scale"].as_f64().unwrap() as f32,
        cfg_interval: sc_json["cfg_interval"].as_i64().unwrap_or(-1),
        temperature: sc_json["temperature"].as_f64().unwrap() as f32,
        top_k: sc_json["top_k"].as_u64().unwrap() as usize,
        top_p: sc_json["top_p"].as_f64().unwrap() as f32,
        sample_logits: sc_json["sample_logits"].as_bool().unwrap(),
    };
    let n = sc_json["max_new_tokens"].as_u64().unwrap() as usize;
    let mut rng = StdRng::seed_from_u64(0);
    let tokens = generate(&model, &cond, emb_mask.as_ref(), n, &sc, &mut rng)?;
    let reference = get(&io, &format!("{case}.tokens"))?.to_dtype(DType::U32)?;
    assert_eq!(
        tokens.to_vec2::<u32>()?,
        reference.to_vec2::<u32>()?,
        "{case}: generated tokens differ"
    );
    let tf = teacher_forced_logits(&model, &cond, emb_mask.as_ref(), &reference, sc.cfg_scale)?;
    let e = max_abs(&tf, get(&io, &format!("{case}.teacher_forced_logits"))?)?;
    println!("{case}: tokens equal; teacher-forced logits max abs err {e:e}");
    assert!(e <= 1e-4, "{case}: teacher-forced logits err {e}");
    Ok(())
}

#[test]
fn c2i_greedy_with_cfg_matches_reference() -> Result<()> {
    run_case("c2i_cfg2")
}

#[test]
fn c2i_greedy_without_cfg_matches_reference() -> Result<()> {
    run_case("c2i_cfg1")
}

#[test]
fn t2i_greedy_with_cfg_matches_reference() -> Result<()> {
    run_case("t2i_cfg7.5")
}

#[test]
fn t2i_greedy_without_cfg_matches_reference() -> Result<()> {
    run_case("t2i_cfg1")
}

#[test]
fn filter_cases_match_reference() -> Result<()> {
    let m = manifest()?;
    let io = tensors("sample_io.safetensors")?;
    let logits = get(&io, "filter.logits")?.squeeze(1)?.to_vec2::<f32>()?;
    let cases = m["configs"]["sampling"]["filter_cases"]
        .as_array()
        .context("filter_cases")?;
    // Every case of the reference run is compared, every row and every probability of it.
    assert!(!cases.is_empty() && !logits.is_empty());
    assert!(
        get(&io, &format!("filter.case{}.probs", cases.len())).is_err(),
        "the fixture has more cases than its manifest lists"
    );
    for (i, case) in cases.iter().enumerate() {
        let reference = get(&io, &format!("filter.case{i}.probs"))?.to_vec2::<f32>()?;
        assert_eq!(reference.len(), logits.len(), "case {i}: rows");
        let mut worst = 0f32;
        for (row, want) in logits.iter().zip(&reference) {
            assert_eq!(row.len(), want.len(), "case {i}: vocabulary");
            let got = filtered_probs(
                row,
                case["temperature"].as_f64().unwrap() as f32,
                case["top_k"].as_u64().unwrap() as usize,
                case["top_p"].as_f64().unwrap() as f32,
            );
            assert_eq!(got.len(), want.len(), "case {i}: probabilities");
            for (g, w) in got.iter().zip(want) {
                assert_eq!(*g == 0.0, *w == 0.0, "case {i}: kept set differs");
                worst = worst.max((g - w).abs());
            }
        }
        println!("filter case {i}: max abs err {worst:e}");
        assert!(worst <= 1e-6, "case {i}: {worst}");
    }
    Ok(())
}

#[test]
fn caption_mask_matches_the_dataset_mask() -> Result<()> {
    let io = tensors("gpt_t2i_io.safetensors")?;
    let emb = get(&io, "inputs.emb_mask")?;
    let full = get(&io, "inputs.attn_mask_full")?;
    let s = full.dim(2)?;
    let ours = caption_attention_mask(emb, s)?;
    // Samples 0 and 1 are real captions; sample 2 is the dummy (plain causal) sample.
    assert_eq!(
        max_abs(&ours.narrow(0, 0, 2)?, &full.narrow(0, 0, 2)?)?,
        0.0
    );
    Ok(())
}

#[test]
fn sampling_draws_only_kept_tokens_and_is_seeded() -> Result<()> {
    let (_, model) = reference_gpt("gpt_c2i")?;
    let cond = Condition::Class(candle_core::Tensor::new(&[3u32, 5], &Device::Cpu)?);
    let sc = SamplingConfig {
        cfg_scale: 4.0,
        cfg_interval: 3,
        top_k: 8,
        temperature: 1.2,
        top_p: 0.9,
        sample_logits: true,
    };
    let a = generate(&model, &cond, None, 16, &sc, &mut StdRng::seed_from_u64(7))?;
    let b = generate(&model, &cond, None, 16, &sc, &mut StdRng::seed_from_u64(7))?;
    assert_eq!(a.to_vec2::<u32>()?, b.to_vec2::<u32>()?);
    assert!(a.to_vec2::<u32>()?.iter().flatten().all(|&t| t < 64));
    // Too many tokens for the RoPE table is an input error, not a panic.
    assert!(generate(&model, &cond, None, 17, &sc, &mut StdRng::seed_from_u64(7)).is_err());
    Ok(())
}

/// Step-by-step cached decoding gives the full forward's logits, whether the cache grows
/// (doubling from nothing) or was reserved up front, and a cache of another batch is refused.
#[test]
fn cached_decoding_matches_the_full_forward() -> Result<()> {
    let (cfg, model) = reference_gpt("gpt_c2i")?;
    let dev = Device::Cpu;
    let n = cfg.block_size;
    let cond = Condition::Class(candle_core::Tensor::new(&[3u32, 5], &dev)?);
    let ids: Vec<u32> = (0..2 * n as u32).map(|i| (i * 37 + 11) % 64).collect();
    let idx = candle_core::Tensor::from_vec(ids, (2, n), &dev)?;
    // Logits at positions cls-1 .. cls+n-1: the prediction after the condition and each token.
    let full = model.forward(&idx, &cond, None, None)?;
    for reserve in [0, cfg.cls_token_num + n] {
        let mut cache = llamagen_train::KvCache::with_capacity(cfg.n_layer, reserve);
        let emb = model.embed_condition(&cond, &mut None)?;
        let first = model.forward_cached(&emb, &mut cache, None)?;
        let mut steps = vec![first.narrow(1, cfg.cls_token_num - 1, 1)?];
        for i in 0..n {
            let x = model.embed_tokens(&idx.narrow(1, i, 1)?)?;
            steps.push(model.forward_cached(&x, &mut cache, None)?);
        }
        assert_eq!(cache.len()?, cfg.cls_token_num + n);
        let cached = candle_core::Tensor::cat(&steps, 1)?;
        let e = max_abs(&cached, &full)?;
        assert!(e <= 1e-4, "reserve {reserve}: cached logits differ by {e}");
    }
    let mut cache = llamagen_train::KvCache::new(cfg.n_layer);
    model.forward_cached(&model.embed_condition(&cond, &mut None)?, &mut cache, None)?;
    let other = model.embed_tokens(&candle_core::Tensor::new(&[[1u32]], &dev)?)?;
    let err = model.forward_cached(&other, &mut cache, None).unwrap_err();
    assert!(err.to_string().contains("KV cache holds batch 2"), "{err}");
    Ok(())
}
