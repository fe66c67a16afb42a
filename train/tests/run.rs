//! Run configs (parsing, the example configs), seeded initialisation and the bf16 path of a
//! training run on a tiny synthetic catalog.

use std::path::PathBuf;

use anyhow::Result;
use candle_nn::VarMap;
use llamagen_train::checkpoint::new_trainable;
use llamagen_train::run::{Precision, RunConfig, run, seeded_init};
use llamagen_train::synthetic::{SyntheticSpec, write_synthetic_catalog};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_example_configs_parse() -> Result<()> {
    for name in ["c2i", "t2i_stage1", "t2i_stage2"] {
        let cfg = RunConfig::from_file(&repo().join(format!("configs/{name}.toml")))?;
        let g = cfg.model.gpt_config()?;
        let grid = match name {
            "t2i_stage2" => 8,
            _ => 4,
        };
        assert_eq!(g.grid_size(), grid, "{name}");
    }
    let s2 = RunConfig::from_file(&repo().join("configs/t2i_stage2.toml"))?;
    assert!(s2.output.init_from.is_some());
    assert!(s2.output.init_optimizer);
    Ok(())
}

/// The shipped stage I and stage II configs chain (on a synthetic catalog like the example's):
/// stage II starts from the checkpoint its `init_from` names, at that step, with its AdamW
/// state, and trains up to its `train.steps`.
#[test]
fn the_shipped_two_stage_configs_chain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("tiny_t2i").display().to_string();
    write_synthetic_catalog(
        &root,
        &SyntheticSpec {
            image_sizes: vec![64, 128],
            num_classes: None,
            no_caption_every: 7,
            ..SyntheticSpec::default()
        },
    )?;
    let mut s1 = RunConfig::from_file(&repo().join("configs/t2i_stage1.toml"))?;
    s1.data.root = root.clone();
    s1.output.dir = dir.path().join("t2i_stage1");
    s1.output.progress = false;
    let r1 = run(&s1)?;
    let ck1 = r1.last_checkpoint.expect("stage I checkpoint");

    let mut s2 = RunConfig::from_file(&repo().join("configs/t2i_stage2.toml"))?;
    let named = s2.output.init_from.clone().expect("init_from");
    assert_eq!(
        named.file_name(),
        ck1.file_name(),
        "stage II's init_from names stage I's last checkpoint"
    );
    s2.data.root = root;
    s2.output.dir = dir.path().join("t2i_stage2");
    s2.output.init_from = Some(ck1.clone());
    s2.output.progress = false;
    let r2 = run(&s2)?;
    assert_eq!(r2.start_step, r1.steps);
    assert!(s2.train.steps > r1.steps);
    assert_eq!(r2.losses.len() as u64, s2.train.steps - r1.steps);
    let last = r2.last_checkpoint.expect("stage II checkpoint");
    assert_eq!(
        last.file_name().unwrap().to_string_lossy(),
        format!("{:07}", s2.train.steps)
    );
    let opt = candle_core::safetensors::load(
        last.join("optimizer.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let step = opt["step"].flatten_all()?.to_vec1::<f64>()?[0];
    assert_eq!(step, s2.train.steps as f64, "AdamW's step continues");

    // train.steps at or below the checkpoint's step is refused, naming both.
    s2.train.steps = r1.steps;
    s2.output.dir = dir.path().join("t2i_stage2_short");
    let e = run(&s2).unwrap_err().to_string();
    assert!(
        e.contains(&format!("at step {}", r1.steps))
            && e.contains(&format!("train.steps = {}", r1.steps))
            && e.contains(&ck1.display().to_string()),
        "{e}"
    );
    // Weights only: step 0, fresh AdamW.
    s2.output.init_optimizer = false;
    s2.train.steps = 2;
    let r3 = run(&s2)?;
    assert_eq!((r3.start_step, r3.losses.len()), (0, 2));
    Ok(())
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let base = "[model]\nsize = \"GPT-B\"\n[data]\nroot = \"x\"\n[output]\ndir = \"o\"\n";
    assert!(RunConfig::from_toml(base).is_ok());
    let e = RunConfig::from_toml(&format!("{base}[train]\nbatch = 3\n")).unwrap_err();
    assert!(e.to_string().contains("batch"), "{e}");
    let e = RunConfig::from_toml(&base.replace("GPT-B", "GPT-Q")).unwrap_err();
    assert!(e.to_string().contains("GPT-Q"), "{e}");
    let e = RunConfig::from_toml("[model]\nsize = \"GPT-B\"\n[data]\nroot = \"x\"\n").unwrap_err();
    assert!(e.to_string().contains("output.dir"), "{e}");
    let g = RunConfig::from_toml(base)
        .unwrap()
        .model
        .gpt_config()
        .unwrap();
    assert_eq!((g.dim, g.n_layer, g.block_size), (768, 12, 256));
    let g = RunConfig::from_toml(&base.replace(
        "size = \"GPT-B\"",
        "size = \"GPT-XL\"\ntype = \"t2i\"\nimage_size = 512",
    ))
    .unwrap()
    .model
    .gpt_config()
    .unwrap();
    assert_eq!((g.dim, g.block_size, g.cls_token_num), (1280, 1024, 120));
}

#[test]
fn seeded_initialisation_is_reproducible() -> Result<()> {
    let cfg = RunConfig::from_file(&repo().join("configs/t2i_stage1.toml"))?
        .model
        .gpt_config()?;
    let dev = candle_core::Device::Cpu;
    let weights = |seed| -> Result<Vec<Vec<f32>>> {
        let vm = VarMap::new();
        let m = new_trainable(&vm, &cfg, &dev)?;
        seeded_init(&vm, &cfg, seed)?;
        Ok(m.state_dict()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect())
    };
    let a = weights(1)?;
    assert_eq!(a, weights(1)?);
    assert_ne!(a, weights(2)?);
    let sd: Vec<String> = cfg
        .state_dict_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let out = sd.iter().position(|n| n == "output.weight").unwrap();
    assert!(a[out].iter().all(|&x| x == 0.0));
    let tok = sd
        .iter()
        .position(|n| n == "tok_embeddings.weight")
        .unwrap();
    let std = (a[tok].iter().map(|x| x * x).sum::<f32>() / a[tok].len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    Ok(())
}

#[test]
fn a_bf16_run_trains_the_f32_master_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cat").display().to_string();
    write_synthetic_catalog(
        &root,
        &SyntheticSpec {
            image_sizes: vec![64],
            ..SyntheticSpec::default()
        },
    )?;
    let mut cfg = RunConfig::from_file(&repo().join("configs/c2i.toml"))?;
    cfg.data.root = root;
    cfg.output.dir = dir.path().join("run");
    cfg.output.progress = false;
    cfg.train.steps = 3;
    cfg.train.precision = Precision::Bf16;
    let s = run(&cfg)?;
    assert_eq!(s.losses.len(), 3);
    assert!(s.losses.iter().all(|(_, l)| l.is_finite()));
    assert!((s.losses[0].1 - 64f32.ln()).abs() < 0.1, "{:?}", s.losses);
    let sd = candle_core::safetensors::load(
        dir.path().join("run/checkpoints/0000003/model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(sd["output.weight"].dtype(), candle_core::DType::F32);
    let moved = sd["output.weight"].abs()?.sum_all()?.to_scalar::<f32>()?;
    assert!(moved > 0.0, "the zero-initialised output layer was trained");
    Ok(())
}
