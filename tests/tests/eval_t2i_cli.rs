//! `llamagen eval t2i` end to end on the fixtures of `eval/tests/fixtures/t2i` (a GigaGAN-layout
//! sample folder, a reference folder, a stand-in clean-fid Inception; the filters' stand-in CLIP
//! models): the printed and written CLIP score and FID equal those `make_reference.py` computed
//! with the official code paths (PIL, numpy, onnxruntime), for a reference folder, its saved
//! statistics and clean-fid-style statistics.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    llamagen_tests::workspace().join("eval/tests/fixtures/t2i")
}

fn models() -> PathBuf {
    llamagen_tests::workspace().join("filters/tests/models")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

/// Runs `llamagen eval t2i` with `args`; returns success, the JSON at `out` and the output.
fn t2i(args: &[&str], out: Option<&Path>) -> (bool, serde_json::Value, String) {
    let mut cmd = Command::new(llamagen_tests::llamagen());
    cmd.args(["eval", "t2i"])
        .args(args)
        .arg("--inception-clean")
        .arg(fixtures().join("clean_inception_standin.onnx"))
        .args(["--batch-size", "3", "--intra-threads", "1"]);
    if let Some(o) = out {
        cmd.arg("--out").arg(o);
    }
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{text}");
    let json = out
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    (o.status.success(), json, text)
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        ((got - want) / want).abs() <= 1e-4,
        "{what}: {got} vs reference {want}"
    );
}

/// The number printed after `label: `.
fn printed(text: &str, label: &str) -> f64 {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{label}: ")))
        .unwrap_or_else(|| panic!("no `{label}:` line in {text}"));
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{label}: {line}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn clip_args() -> Vec<String> {
    vec![
        "--clip-image".into(),
        models().join("clip_b32_image.onnx").display().to_string(),
        "--clip-text".into(),
        models().join("clip_b32_text.onnx").display().to_string(),
    ]
}

#[test]
fn clip_score_and_fid_match_the_official_code_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let want = expected();
    let (f, clip) = (fixtures(), clip_args());
    let clip: Vec<&str> = clip.iter().map(String::as_str).collect();
    let stats = tmp.path().join("ref_stats.npz");
    let sample = f.join("sample");
    let reference = f.join("ref");

    // Reference folder; the fixture has one caption too many (the official zip drops it).
    let out = tmp.path().join("a.json");
    let mut args = vec!["--sample", s(&sample), "--ref", s(&reference)];
    args.extend(&clip);
    args.extend(["--allow-caption-mismatch", "--save-ref-stats", s(&stats)]);
    let (ok, got, text) = t2i(&args, Some(&out));
    assert!(ok, "{text}");
    let (wc, wf) = (
        want["clip_score"].as_f64().unwrap(),
        want["fid"].as_f64().unwrap(),
    );
    close(printed(&text, "CLIP score"), wc, "printed CLIP score");
    close(printed(&text, "FID_256px"), wf, "printed FID");
    close(got["clip_score"].as_f64().unwrap(), wc, "CLIP score");
    close(got["fid"].as_f64().unwrap(), wf, "FID");
    assert_eq!(got["reference_statistics"], "images");
    assert_eq!(got["reference_images"], 4);
    assert_eq!(got["sample_images"], 5);
    assert_eq!(
        (got["clip_pairs"].clone(), got["captions"].clone()),
        (5.into(), 6.into())
    );
    assert_eq!(got["fid_label"], "FID_256px");
    assert!(stats.exists());

    // The saved statistics as the reference: the same FID, no reference images read.
    let out = tmp.path().join("b.json");
    let mut args = vec!["--sample", s(&sample), "--ref", s(&stats)];
    args.extend(&clip);
    args.push("--allow-caption-mismatch");
    let (ok, got, text) = t2i(&args, Some(&out));
    assert!(ok, "{text}");
    close(
        got["fid"].as_f64().unwrap(),
        wf,
        "FID from saved statistics",
    );
    assert_eq!(got["reference_statistics"], "file");
    assert_eq!(got["reference_images"], 0);
    // Statistics saved at another --eval-res are refused, not silently compared.
    let mut args = vec![
        "--sample",
        s(&sample),
        "--ref",
        s(&stats),
        "--eval-res",
        "128",
    ];
    args.push("--allow-caption-mismatch");
    let (ok, _, text) = t2i(&args, Some(&tmp.path().join("r.json")));
    assert!(
        !ok && text.contains("computed at --eval-res 256, this run uses 128"),
        "{text}"
    );

    // clean-fid's own statistics files: float32 mu (np.mean of float32 features), compressed.
    let cleanfid = tmp.path().join("cleanfid_stats.npz");
    let o = Command::new(llamagen_tests::python())
        .arg("-c")
        .arg(
            "import sys, numpy as np\nr = np.load(sys.argv[1])\n\
             np.savez_compressed(sys.argv[2], mu=r['mu'].astype(np.float32), sigma=r['sigma'])",
        )
        .arg(&stats)
        .arg(&cleanfid)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("c.json");
    let (ok, got, text) = t2i(
        &[
            "--sample",
            s(&sample),
            "--ref",
            s(&cleanfid),
            "--allow-caption-mismatch",
        ],
        Some(&out),
    );
    assert!(ok, "{text}");
    close(
        got["fid"].as_f64().unwrap(),
        wf,
        "FID from clean-fid statistics",
    );
    // Without CLIP models the CLIP score is skipped, with a note.
    assert!(got["clip_score"].is_null(), "{got}");
    assert!(text.contains("CLIP score: skipped"), "{text}");
}

#[test]
fn how_many_default_output_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let want = expected();
    let f = fixtures();
    let clip = clip_args();
    let clip: Vec<&str> = clip.iter().map(String::as_str).collect();
    let (refdir, fixture_sample) = (f.join("ref"), f.join("sample"));

    // A copy of the sample with exactly one caption per image.
    let sample = tmp.path().join("sample");
    std::fs::create_dir_all(sample.join("images")).unwrap();
    for e in std::fs::read_dir(f.join("sample/images")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), sample.join("images").join(e.file_name())).unwrap();
    }
    let captions = std::fs::read_to_string(f.join("sample/captions.txt")).unwrap();
    let five: Vec<&str> = captions.lines().take(5).collect();
    std::fs::write(sample.join("captions.txt"), five.join("\n") + "\n").unwrap();

    // --how-many 3: the first three pairs; the JSON goes to SAMPLE/score.json.
    let mut args = vec![
        "--sample",
        s(&sample),
        "--ref",
        s(&refdir),
        "--how-many",
        "3",
    ];
    args.extend(&clip);
    let (ok, _, text) = t2i(&args, None);
    assert!(ok, "{text}");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sample.join("score.json")).unwrap()).unwrap();
    close(
        got["clip_score"].as_f64().unwrap(),
        want["clip_score_small"].as_f64().unwrap(),
        "CLIP score of the first 3",
    );
    assert_eq!(got["clip_pairs"], 3);
    // The FID uses every image, whatever --how-many says (as the official script).
    close(
        got["fid"].as_f64().unwrap(),
        want["fid"].as_f64().unwrap(),
        "FID",
    );

    // The committed fixture has 6 captions for 5 images: refused unless asked for.
    let out = tmp.path().join("x.json");
    let mut args = vec!["--sample", s(&fixture_sample), "--ref", s(&refdir)];
    args.extend(&clip);
    let (ok, _, text) = t2i(&args, Some(&out));
    assert!(!ok);
    assert!(text.contains("6 captions for 5 images"), "{text}");

    // One CLIP model without the other.
    let (ok, _, text) = t2i(
        &[
            "--sample",
            s(&sample),
            "--ref",
            s(&refdir),
            "--clip-image",
            clip[1],
        ],
        Some(&out),
    );
    assert!(!ok);
    assert!(text.contains("--clip-text"), "{text}");

    // A broken image is named; so is a missing captions.txt.
    std::fs::write(sample.join("images/99.png"), b"not a png").unwrap();
    std::fs::write(
        sample.join("captions.txt"),
        captions.lines().take(6).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let (ok, _, text) = t2i(&["--sample", s(&sample), "--ref", s(&refdir)], Some(&out));
    assert!(!ok);
    assert!(text.contains("99.png"), "{text}");
    std::fs::remove_file(sample.join("images/99.png")).unwrap();
    std::fs::remove_file(sample.join("captions.txt")).unwrap();
    let mut args = vec!["--sample", s(&sample), "--ref", s(&refdir)];
    args.extend(&clip);
    let (ok, _, text) = t2i(&args, Some(&out));
    assert!(!ok);
    assert!(text.contains("captions.txt"), "{text}");
    // FID alone needs no captions.
    let (ok, got, text) = t2i(&["--sample", s(&sample), "--ref", s(&refdir)], Some(&out));
    assert!(ok, "{text}");
    close(
        got["fid"].as_f64().unwrap(),
        want["fid"].as_f64().unwrap(),
        "FID without captions",
    );
}
