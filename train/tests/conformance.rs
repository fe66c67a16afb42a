//! The conformance runner on the bundled reference set, and on a tampered copy.

mod common;

use anyhow::Result;
use common::parity_dir;
use llamagen_train::conformance_checks;

#[test]
fn every_check_passes_on_the_bundled_reference() -> Result<()> {
    let checks = conformance_checks(&parity_dir())?;
    for c in &checks {
        println!(
            "{} {}: {}",
            if c.passed { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
    for expected in [
        "gpt_c2i.logits",
        "gpt_c2i.layer0.xq_rope",
        "gpt_c2i.freqs_cis",
        "gpt_c2i.loss",
        "gpt_t2i.loss_valid",
        "gpt_t2i.loss_no_valid",
        "gpt_t2i120.weights",
        "sample.c2i_cfg2.tokens",
        "sample.t2i_cfg7.5.tokens",
        "sample.t2i_cfg1.teacher_forced_logits",
        "sample.filter.case3",
        "train_c2i.param_groups",
        "train_c2i.step_losses",
        "train_c2i.final_weights",
        "train_c2i.exp_avg_sq",
    ] {
        assert!(names.contains(&expected), "missing check {expected}");
    }
    assert!(checks.iter().all(|c| c.passed));
    Ok(())
}

#[test]
fn tampered_reference_fails_the_right_checks() -> Result<()> {
    let src = parity_dir();
    let dir = tempfile::tempdir()?;
    for f in std::fs::read_dir(&src)? {
        let f = f?;
        if f.file_name().to_string_lossy().starts_with("vq_") {
            continue;
        }
        std::fs::copy(f.path(), dir.path().join(f.file_name()))?;
    }
    // An impossible logits tolerance and a missing training reference.
    let mpath = dir.path().join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mpath)?)?;
    m["suggested_tolerances"]["gpt_logits_f32_abs"] = serde_json::json!(1e-9);
    std::fs::write(&mpath, serde_json::to_string(&m)?)?;
    std::fs::remove_file(dir.path().join("train_c2i_final_weights.safetensors"))?;
    let checks = conformance_checks(dir.path())?;
    let get = |n: &str| checks.iter().find(|c| c.name == n).cloned();
    assert!(
        !get("gpt_c2i.logits").unwrap().passed,
        "tolerance 1e-9 must fail"
    );
    let train = get("train_c2i").expect("training failure reported as a check");
    assert!(
        !train.passed && train.detail.contains("train_c2i_final_weights"),
        "{}",
        train.detail
    );
    assert!(get("sample.c2i_cfg2.tokens").unwrap().passed);
    assert!(conformance_checks(&dir.path().join("nowhere")).is_err());
    Ok(())
}
