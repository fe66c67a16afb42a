//! The conformance library on the bundled reference directory, and on altered copies of it.

use std::path::{Path, PathBuf};

use anyhow::{Result, ensure};
use llamagen_encode::{Check, conformance_checks};

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

fn find<'a>(checks: &'a [Check], name: &str) -> Result<&'a Check> {
    checks
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow::anyhow!("no check {name}"))
}

#[test]
fn every_check_passes_on_the_bundled_references() -> Result<()> {
    let checks = conformance_checks(&parity_dir())?;
    for c in &checks {
        println!(
            "{:5} {:40} {}",
            if c.passed { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    ensure!(checks.iter().all(|c| c.passed), "some checks failed");
    for name in [
        "vq.load",
        "vq.encoder_out",
        "vq.pre_quant",
        "vq.quant",
        "vq.distances",
        "vq.indices",
        "vq.indices_bhw",
        "vq.decoded",
        "vq.decoded_from_code",
        "vq.train_vq_loss",
        "vq.train_commit_loss",
        "vq.train_entropy_loss",
        "vq.train_codebook_usage",
        "vq.real_config.VQ-16",
        "vq.real_config.VQ-8",
        "augment.crop_size",
        "augment.real_crop_size.384@1.05",
        "augment.big.center_crop_35",
        "augment.big.ten_crop",
        "augment.small.ten_crop",
        "augment.small.plain_center_crop",
        "augment.small.plain_center_crop_flip",
    ] {
        find(&checks, name)?;
    }
    Ok(())
}

fn copy_refs(to: &Path) -> Result<()> {
    for f in [
        "manifest.json",
        "vq_weights.safetensors",
        "vq_io.safetensors",
        "augment_io.safetensors",
    ] {
        std::fs::copy(parity_dir().join(f), to.join(f))?;
    }
    Ok(())
}

#[test]
fn altered_references_make_checks_fail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    copy_refs(dir.path())?;
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    manifest["configs"]["vq"]["model_args"]["codebook_size"] = 65.into();
    manifest["configs"]["augment"]["crop_size"] = 36.into();
    std::fs::write(&path, serde_json::to_string(&manifest)?)?;

    let checks = conformance_checks(dir.path())?;
    let load = find(&checks, "vq.load")?;
    ensure!(
        !load.passed && load.detail.contains("quantize.embedding.weight"),
        "{load:?}"
    );
    ensure!(!find(&checks, "augment.crop_size")?.passed);
    // The crop of the wrong size is compared against a reference that does not exist.
    ensure!(!find(&checks, "augment.big.center_crop_36")?.passed);
    // The ten-crop itself is still right.
    ensure!(find(&checks, "augment.big.ten_crop")?.passed);
    Ok(())
}

#[test]
fn altered_reference_tensors_are_detected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    copy_refs(dir.path())?;
    let io_path = dir.path().join("vq_io.safetensors");
    let mut io = candle_core::safetensors::load(&io_path, &candle_core::Device::Cpu)?;
    let dec = io["outputs.decoded"].clone();
    io.insert("outputs.decoded".into(), (dec + 1e-3)?);
    candle_core::safetensors::save(&io, &io_path)?;
    let checks = conformance_checks(dir.path())?;
    let c = find(&checks, "vq.decoded")?;
    ensure!(!c.passed, "{c:?}");
    ensure!(find(&checks, "vq.indices")?.passed);
    Ok(())
}

#[test]
fn a_directory_without_manifest_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = conformance_checks(dir.path()).expect_err("no manifest");
    assert!(err.to_string().contains("manifest.json"), "{err}");
}
