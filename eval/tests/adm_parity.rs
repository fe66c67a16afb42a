//! The metrics against a numpy/scipy run of the ADM evaluator's formulas on fixed activations
//! (`tests/fixtures/make_reference.py`, which wrote `adm_reference.json` and the arrays).

use std::path::PathBuf;

use llamagen_eval::{FidStats, IS_SPLIT_SIZE, PR_K, inception_score, precision_recall};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

struct Reference {
    json: serde_json::Value,
}

impl Reference {
    fn load() -> Reference {
        let text = std::fs::read_to_string(fixtures().join("adm_reference.json")).unwrap();
        Reference {
            json: serde_json::from_str(&text).unwrap(),
        }
    }

    /// An array: its values, rows and columns.
    fn array(&self, name: &str) -> (Vec<f32>, usize, usize) {
        let a = &self.json["arrays"][name];
        let bytes = std::fs::read(fixtures().join(a["file"].as_str().unwrap())).unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (n, d) = (
            a["shape"][0].as_u64().unwrap() as usize,
            a["shape"][1].as_u64().unwrap() as usize,
        );
        assert_eq!(v.len(), n * d, "{name}");
        (v, n, d)
    }

    fn case(&self, name: &str) -> &serde_json::Value {
        let c = &self.json["cases"][name];
        assert!(!c.is_null(), "no reference case {name}");
        c
    }
}

fn stats(r: &Reference, name: &str) -> FidStats {
    let (v, n, d) = r.array(name);
    FidStats::of(&v, n, d).unwrap()
}

#[test]
fn fid_matches_scipy_sqrtm() {
    let r = Reference::load();
    let (a, b) = (stats(&r, "fid_a"), stats(&r, "fid_b"));
    let want = r.case("fid fid_a fid_b").as_f64().unwrap();
    let got = a.frechet_distance(&b).unwrap();
    eprintln!(
        "FID {got} reference {want}: relative difference {:.2e}",
        (got - want) / want
    );
    assert!(
        ((got - want) / want).abs() <= 1e-4,
        "FID {got} vs reference {want}"
    );
    // Symmetric in its arguments, as the definition.
    let back = b.frechet_distance(&a).unwrap();
    assert!(((back - want) / want).abs() <= 1e-4, "{back} vs {want}");
}

#[test]
fn fid_of_rank_deficient_covariances_matches() {
    // 20 and 24 rows of 32 features: both covariances are singular, as with few samples.
    let r = Reference::load();
    let (c, d) = (stats(&r, "fid_c"), stats(&r, "fid_d"));
    let want = r.case("fid fid_c fid_d").as_f64().unwrap();
    let got = c.frechet_distance(&d).unwrap();
    eprintln!(
        "FID {got} reference {want}: relative difference {:.2e}",
        (got - want) / want
    );
    assert!(
        ((got - want) / want).abs() <= 1e-4,
        "FID {got} vs reference {want}"
    );
}

#[test]
fn fid_of_a_set_with_itself_is_zero() {
    let r = Reference::load();
    for name in ["fid_a", "fid_c"] {
        let s = stats(&r, name);
        let want = r.case(&format!("fid {name} {name}")).as_f64().unwrap();
        let got = s.frechet_distance(&s).unwrap();
        // Zero up to rounding on both sides; the scale is the trace of the covariance.
        let scale: f64 = (0..s.dim).map(|i| s.sigma[i * s.dim + i]).sum();
        assert!(want.abs() <= 1e-6 * scale, "reference {want}");
        assert!(got.abs() <= 1e-6 * scale, "{name}: FID with itself {got}");
    }
}

#[test]
fn inception_score_matches() {
    let r = Reference::load();
    let (p, n, c) = r.array("is_probs");
    let want = r.case("is is_probs").as_f64().unwrap();
    let got = inception_score(&p, n, c, IS_SPLIT_SIZE).unwrap();
    eprintln!(
        "IS {got} reference {want}: relative difference {:.2e}",
        (got - want) / want
    );
    assert!(((got - want) / want).abs() <= 1e-4, "IS {got} vs {want}");
    // The split matters (11,000 rows: groups of 5000, 5000, 1000).
    let one = inception_score(&p, n, c, n).unwrap();
    assert!(((one - want) / want).abs() > 1e-3, "{one} vs {want}");
}

#[test]
fn precision_and_recall_match_both_distance_paths() {
    let r = Reference::load();
    for (rf, sm) in [("pr_ref", "pr_sample"), ("pr_big_ref", "pr_big_sample")] {
        let (a, na, d) = r.array(rf);
        let (b, nb, _) = r.array(sm);
        let want = r.case(&format!("pr {rf} {sm}"));
        let (p, rec) = precision_recall(&a, na, &b, nb, d, PR_K).unwrap();
        let (wp, wr) = (want[0].as_f64().unwrap(), want[1].as_f64().unwrap());
        // Equal counts: precision and recall are shares of a few hundred points.
        assert_eq!((p, rec), (wp, wr), "{rf}/{sm}");
        assert!(p > 0.3 && p < 0.95 && rec > 0.3 && rec < 0.95, "{p} {rec}");
    }
}

#[test]
fn shapes_are_checked() {
    assert!(FidStats::of(&[1.0, 2.0, 3.0], 2, 2).is_err());
    assert!(FidStats::of(&[1.0, 2.0], 1, 2).is_err());
    let a = FidStats::of(&[1.0, 2.0, 3.0, 5.0], 2, 2).unwrap();
    let b = FidStats::of(&[1.0, 2.0, 3.0, 5.0, 1.0, 1.0], 2, 3).unwrap();
    assert!(a.frechet_distance(&b).is_err());
    assert!(precision_recall(&[0.0; 6], 3, &[0.0; 6], 3, 2, 3).is_err());
}
