//! `llamagen conformance <dir>`: every GPT, sampling and training check
//! ([`llamagen_train::conformance_checks`]) and every VQ and augmentation check
//! ([`llamagen_encode::conformance_checks`]) that a reference directory in the format of
//! `data/parity/` describes. One line per check, then `N passed, M failed`; the exit status is
//! non-zero when any check failed or nothing could be checked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    /// Reference directory: `manifest.json` plus the safetensors files it describes.
    pub dir: PathBuf,
}

/// One line of the report.
struct Line {
    name: String,
    passed: bool,
    detail: String,
}

/// Whether the manifest has a `vq` or `augment` config (the VQ suite's subjects). An
/// unreadable manifest counts as yes, so that the suite reports it.
fn describes_vq_or_augment(dir: &Path) -> bool {
    let read = || -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).ok()?).ok()
    };
    match read() {
        Some(m) => ["vq", "augment"]
            .iter()
            .any(|k| m["configs"].get(k).is_some()),
        None => true,
    }
}

/// Runs both suites. A suite that cannot start (unreadable manifest) is one failed line; a
/// suite that finds nothing of its kind in the manifest contributes no line.
fn collect(dir: &Path) -> Vec<Line> {
    let mut lines = Vec::new();
    match llamagen_train::conformance_checks(dir) {
        Ok(checks) => lines.extend(checks.into_iter().map(|c| Line {
            name: c.name,
            passed: c.passed,
            detail: c.detail,
        })),
        Err(e) => lines.push(Line {
            name: "gpt".into(),
            passed: false,
            detail: e.to_string(),
        }),
    }
    if !describes_vq_or_augment(dir) {
        return lines;
    }
    match llamagen_encode::conformance_checks(dir) {
        Ok(checks) => lines.extend(checks.into_iter().map(|c| Line {
            name: c.name,
            passed: c.passed,
            detail: c.detail,
        })),
        Err(e) => lines.push(Line {
            name: "vq".into(),
            passed: false,
            detail: e.to_string(),
        }),
    }
    lines
}

pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let lines = collect(&args.dir);
    let passed = lines.iter().filter(|l| l.passed).count();
    let failed = lines.len() - passed;
    for l in &lines {
        println!(
            "{} {}: {}",
            if l.passed { "PASS" } else { "FAIL" },
            l.name,
            l.detail
        );
    }
    if lines.is_empty() {
        println!(
            "FAIL reference: {} describes no check",
            args.dir.join("manifest.json").display()
        );
        println!("0 passed, 1 failed");
        return Ok(ExitCode::from(1));
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
