//! `llamagen export checkpoint --format torch`: the written file is read back by PyPI torch with
//! `torch.load(weights_only=True)` (and `mmap=True`), as the official sample scripts load
//! checkpoints, and every tensor is compared bit for bit with its source
//! (`tests/python/torch_readback.py`).

use std::path::Path;
use std::process::Command;

use llamagen_train::synthetic::{SyntheticSpec, write_synthetic_catalog};

fn llamagen(args: &[&str]) -> (bool, String) {
    let out = Command::new(llamagen_tests::llamagen())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ llamagen {}\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// Exports `input` to `out` and has torch compare it with `reference`; returns the JSON summary.
fn export_and_read_back(
    input: &Path,
    out: &Path,
    reference: &Path,
    steps: Option<u64>,
) -> serde_json::Value {
    let (ok, text) = llamagen(&[
        "export",
        "checkpoint",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let script = llamagen_tests::workspace().join("tests/python/torch_readback.py");
    let mut cmd = Command::new(llamagen_tests::torch_python());
    cmd.arg(&script).arg(out).arg(reference);
    if let Some(s) = steps {
        cmd.arg(s.to_string());
    }
    let o = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "torch read-back failed:\n{stdout}{stderr}"
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn official_weights_files_round_trip_through_torch() {
    let tmp = tempfile::tempdir().unwrap();
    let parity = llamagen_tests::workspace().join("data/parity");
    for file in [
        "gpt_c2i_weights.safetensors",
        "gpt_t2i_weights.safetensors",
        "vq_weights.safetensors",
    ] {
        let src = parity.join(file);
        let n = candle_core::safetensors::load(&src, &candle_core::Device::Cpu)
            .unwrap()
            .keys()
            .filter(|k| k.as_str() != "freqs_cis")
            .count();
        let out = tmp.path().join(file.replace(".safetensors", ".pt"));
        let v = export_and_read_back(&src, &out, &src, None);
        assert_eq!(v["tensors"], n, "{file}: {v}");
        assert!(n > 5, "{file} holds {n} tensors");
    }
}

/// Every dtype the writer maps, a 0-dim tensor and a 1-element one keep their values bit for
/// bit.
#[test]
fn every_dtype_and_rank_round_trips_through_torch() {
    use candle_core::{DType, Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let base = Tensor::new(&[[0.1f32, -2.5, 3.25], [1e-3, 7.0, -0.0]], &dev).unwrap();
    let tensors: Vec<(String, Tensor)> = vec![
        ("f32".into(), base.clone()),
        ("f64".into(), base.to_dtype(DType::F64).unwrap()),
        ("f16".into(), base.to_dtype(DType::F16).unwrap()),
        ("bf16".into(), base.to_dtype(DType::BF16).unwrap()),
        ("u8".into(), Tensor::new(&[0u8, 7, 255], &dev).unwrap()),
        ("i64".into(), Tensor::new(&[-5i64, 1 << 40], &dev).unwrap()),
        ("scalar".into(), Tensor::new(2.5f32, &dev).unwrap()),
        ("one".into(), Tensor::new(&[4.0f32], &dev).unwrap()),
    ];
    let src = tmp.path().join("mixed.safetensors");
    candle_core::safetensors::save(
        &tensors
            .iter()
            .cloned()
            .collect::<std::collections::HashMap<_, _>>(),
        &src,
    )
    .unwrap();
    let v = export_and_read_back(&src, &tmp.path().join("mixed.pt"), &src, None);
    assert_eq!(v["tensors"], tensors.len(), "{v}");
}

#[test]
fn a_training_checkpoint_exports_with_its_step() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    write_synthetic_catalog(
        &root.display().to_string(),
        &SyntheticSpec {
            shards: 1,
            rows_per_shard: 6,
            image_sizes: vec![64],
            ..SyntheticSpec::default()
        },
    )
    .unwrap();
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("c2i.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[model]
type = "c2i"
dim = 32
n_layer = 2
n_head = 2
image_size = 64
vocab_size = 64
num_classes = 10

[data]
root = "{root}"

[train]
steps = 2
batch_size = 2

[output]
dir = "{run}"
checkpoint_every = 2
progress = false
"#,
            root = root.display(),
            run = run.display()
        ),
    )
    .unwrap();
    let (ok, text) = llamagen(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{text}");
    let ck = run.join("checkpoints/0000002");
    let out = tmp.path().join("c2i.pt");
    let v = export_and_read_back(&ck, &out, &ck.join("model.safetensors"), Some(2));
    assert_eq!(v["steps"], 2);
    assert_eq!(v["keys"][0], "cls_embedding.embedding_table.weight", "{v}");

    // A directory that is no checkpoint is refused, naming it.
    let (ok, text) = llamagen(&[
        "export",
        "checkpoint",
        "--input",
        tmp.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(text.contains("neither a GPT training checkpoint"), "{text}");
}

/// A tokenizer training checkpoint (`state.json`): checked against its model config, exported
/// in state-dict order with its step.
#[test]
fn a_tokenizer_checkpoint_exports_with_its_step() {
    use llamagen_train::vq_train::{CheckpointState, VqStepConfig};
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("0000007");
    std::fs::create_dir_all(&ck).unwrap();
    let weights = llamagen_tests::workspace().join("data/parity/vq_weights.safetensors");
    std::fs::copy(&weights, ck.join("model.safetensors")).unwrap();
    let state = CheckpointState {
        steps: 7,
        config: VqStepConfig {
            model: llamagen_encode::ModelArgs::reduced(),
            ..VqStepConfig::default()
        },
    };
    std::fs::write(
        ck.join("state.json"),
        serde_json::to_string(&state).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("vq.pt");
    let v = export_and_read_back(&ck, &out, &weights, Some(7));
    assert_eq!(v["steps"], 7);
    assert_eq!(v["keys"][0], "encoder.conv_in.weight", "{v}");

    // The same checkpoint against another model config is refused, naming the tensor.
    let wrong = CheckpointState {
        steps: 7,
        config: VqStepConfig::default(),
    };
    std::fs::write(
        ck.join("state.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let (ok, text) = llamagen(&[
        "export",
        "checkpoint",
        "--input",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        text.contains("has shape") || text.contains("missing"),
        "{text}"
    );
}
