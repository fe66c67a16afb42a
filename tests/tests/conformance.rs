//! `llamagen conformance <dir>` (the real binary) on a copy of the bundled reference set, and on a
//! tampered copy.

use std::path::Path;
use std::process::Command;

fn copy_reference(to: &Path) {
    let src = llamagen_tests::workspace().join("data/parity");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

/// Runs the command; returns (exit success, report lines).
fn conformance(dir: &Path) -> (bool, Vec<String>) {
    let out = Command::new(llamagen_tests::llamagen())
        .arg("conformance")
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    (
        out.status.success(),
        text.lines().map(str::to_string).collect(),
    )
}

fn line<'a>(lines: &'a [String], check: &str) -> &'a str {
    lines
        .iter()
        .find(|l| {
            l.split_once(' ')
                .map(|(_, r)| r.starts_with(&format!("{check}: ")))
                == Some(true)
        })
        .unwrap_or_else(|| panic!("no line for check {check}"))
}

/// `N passed, M failed` of the closing line.
fn totals(lines: &[String]) -> (usize, usize) {
    let last = lines.last().expect("a closing line");
    let (p, f) = last.split_once(" passed, ").expect("closing line");
    let f = f.strip_suffix(" failed").expect("closing line");
    (p.parse().unwrap(), f.parse().unwrap())
}

#[test]
fn the_bundled_reference_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    copy_reference(dir.path());
    let (ok, lines) = conformance(dir.path());
    assert!(ok, "exit status");
    let (passed, failed) = totals(&lines);
    assert_eq!(failed, 0);
    assert_eq!(passed, lines.len() - 1, "one line per check");
    assert!(passed >= 40, "{passed} checks");
    for check in [
        "gpt_c2i.logits",
        "gpt_t2i.loss_valid",
        "sample.c2i_cfg2.tokens",
        "sample.t2i_cfg7.5.tokens",
        "sample.filter.case0",
        "train_c2i.step_losses",
        "train_c2i.final_weights",
        "vq.indices",
        "vq.decoded_from_code",
    ] {
        assert!(line(&lines, check).starts_with("PASS "), "{check}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("PASS augment.")),
        "augmentation checks run"
    );
}

#[test]
fn a_tampered_reference_fails_the_right_checks() {
    let dir = tempfile::tempdir().unwrap();
    copy_reference(dir.path());
    // An impossible logits tolerance, a missing VQ checkpoint, a missing training reference.
    let mpath = dir.path().join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["suggested_tolerances"]["gpt_logits_f32_abs"] = serde_json::json!(1e-12);
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    std::fs::remove_file(dir.path().join("vq_weights.safetensors")).unwrap();
    std::fs::remove_file(dir.path().join("train_c2i_final_weights.safetensors")).unwrap();

    let (ok, lines) = conformance(dir.path());
    assert!(!ok, "a failed check must give a non-zero exit");
    let (passed, failed) = totals(&lines);
    assert_eq!(passed + failed, lines.len() - 1);
    assert!(line(&lines, "gpt_c2i.logits").starts_with("FAIL "));
    assert!(line(&lines, "vq.load").starts_with("FAIL "));
    let train = line(&lines, "train_c2i");
    assert!(
        train.starts_with("FAIL ") && train.contains("train_c2i_final_weights"),
        "{train}"
    );
    // Checks that do not depend on what was tampered with still pass.
    assert!(line(&lines, "sample.c2i_cfg2.tokens").starts_with("PASS "));
    assert!(line(&lines, "gpt_c2i.loss").starts_with("PASS "));
    assert!(lines.iter().any(|l| l.starts_with("PASS augment.")));

    // No manifest at all: one failed line, non-zero exit.
    let (ok, lines) = conformance(&dir.path().join("nowhere"));
    assert!(!ok);
    assert_eq!(totals(&lines).0, 0);
}
