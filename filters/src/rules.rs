//! Keep/drop rules over stored scores and sizes: thresholds in, `reject_reasons` and `status` out.
//!
//! Invariants enforced here:
//! - A rule keeps a value v when `min ≤ v` (`min < v` if `min_inclusive = false`) and `v ≤ max`
//!   (`v < max` if `max_inclusive = false`). Every failed bound adds one reason, written as the
//!   failing comparison in the threshold's own unit: `aesthetic<5`, `aesthetic<=5` (exclusive
//!   min), `pwatermark>0.8`, `pwatermark>=0.8` (exclusive max), `min_side<256`. A missing value
//!   (null or NaN) adds `<measure>:missing` unless `on_missing = "keep"`.
//! - Aesthetic scores are stored on LAION's 0–10 scale; with `scale = "0-1"` the thresholds are
//!   on 0–1 (data-juicer, NeMo) and the score is divided by 10 before comparing.
//! - Sizes come from `orig_width`/`orig_height` (the decoded original), else from the largest
//!   stored rendition; `file_bytes` from `content_bytes`.
//! - Verdicts are recomputed from scratch each time: reasons this module wrote earlier (any reason
//!   [`is_rule_reason`] recognises) are removed first, other stages' reasons are kept. Rows with
//!   status `ok` or `dropped` get a verdict; `pending` and `failed` rows are left alone. A row ends
//!   `dropped` if a rule fails or it was dropped for another stage's reason, else `ok`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{FilterError, Result};

/// The values rules can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// `score_clip_similarity`: cosine of CLIP ViT-B/32 image and caption embeddings.
    ClipSimilarity,
    /// `score_aesthetic`: LAION aesthetic score (0–10).
    Aesthetic,
    /// `score_watermark`: probability of a watermark.
    Pwatermark,
    /// `score_nsfw`: probability of unsafe content.
    Punsafe,
    /// min(width, height) of the original image, pixels.
    MinSide,
    /// max(width, height), pixels.
    MaxSide,
    /// max(w, h) / min(w, h) (≥ 1).
    AspectRatio,
    /// Size of the downloaded file, bytes.
    FileBytes,
}

impl Measure {
    pub const ALL: [Measure; 8] = [
        Measure::ClipSimilarity,
        Measure::Aesthetic,
        Measure::Pwatermark,
        Measure::Punsafe,
        Measure::MinSide,
        Measure::MaxSide,
        Measure::AspectRatio,
        Measure::FileBytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Measure::ClipSimilarity => "clip_similarity",
            Measure::Aesthetic => "aesthetic",
            Measure::Pwatermark => "pwatermark",
            Measure::Punsafe => "punsafe",
            Measure::MinSide => "min_side",
            Measure::MaxSide => "max_side",
            Measure::AspectRatio => "aspect_ratio",
            Measure::FileBytes => "file_bytes",
        }
    }

    pub fn parse(s: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// Scale of aesthetic thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AestheticScale {
    /// LAION's scale, as stored (default).
    #[default]
    #[serde(rename = "0-10")]
    ZeroToTen,
    /// Thresholds on 0–1 (score / 10).
    #[serde(rename = "0-1")]
    ZeroToOne,
}

/// Bounds of one measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    /// Lower bound (default: none).
    #[serde(default)]
    pub min: Option<f64>,
    /// Upper bound (default: none).
    #[serde(default)]
    pub max: Option<f64>,
    /// Whether `min` itself is kept (default true).
    #[serde(default = "yes")]
    pub min_inclusive: bool,
    /// Whether `max` itself is kept (default true).
    #[serde(default = "yes")]
    pub max_inclusive: bool,
    /// Aesthetic only: the scale the bounds are written on (default "0-10").
    #[serde(default)]
    pub scale: Option<AestheticScale>,
}

fn yes() -> bool {
    true
}

/// What to do with a row that lacks a value a rule needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// Drop it with reason `<measure>:missing` (default).
    #[default]
    Drop,
    /// Keep it.
    Keep,
}

/// A thresholds file (TOML): one optional table per measure, e.g.
///
/// ```toml
/// on_missing = "drop"
/// [aesthetic]
/// min = 5.0            # keep aesthetic >= 5 (LAION 0-10 scale)
/// [pwatermark]
/// max = 0.8
/// max_inclusive = false  # keep pwatermark < 0.8
/// [clip_similarity]
/// min = 0.28
/// [min_side]
/// min = 256
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Rows missing a value (default: drop).
    #[serde(default)]
    pub on_missing: OnMissing,
    #[serde(default)]
    pub clip_similarity: Option<Bound>,
    #[serde(default)]
    pub aesthetic: Option<Bound>,
    #[serde(default)]
    pub pwatermark: Option<Bound>,
    #[serde(default)]
    pub punsafe: Option<Bound>,
    #[serde(default)]
    pub min_side: Option<Bound>,
    #[serde(default)]
    pub max_side: Option<Bound>,
    #[serde(default)]
    pub aspect_ratio: Option<Bound>,
    #[serde(default)]
    pub file_bytes: Option<Bound>,
}

/// Measured values of one row.
pub type Values = BTreeMap<Measure, Option<f64>>;

impl Thresholds {
    /// Parses and checks a TOML thresholds file's text (`source` names it in errors).
    pub fn from_toml(source: &str, text: &str) -> Result<Thresholds> {
        let t: Thresholds =
            toml::from_str(text).map_err(|e| FilterError::Config(format!("{source}: {e}")))?;
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        for (m, b) in self.rules() {
            if b.min.is_none() && b.max.is_none() {
                return Err(FilterError::Config(format!(
                    "[{}] sets neither min nor max",
                    m.name()
                )));
            }
            if b.min.is_some_and(|v| !v.is_finite()) || b.max.is_some_and(|v| !v.is_finite()) {
                return Err(FilterError::Config(format!(
                    "[{}] bound is not finite",
                    m.name()
                )));
            }
            if b.scale.is_some() && m != Measure::Aesthetic {
                return Err(FilterError::Config(format!(
                    "[{}] has a scale; only aesthetic thresholds have one",
                    m.name()
                )));
            }
        }
        Ok(())
    }

    /// The configured rules, in [`Measure::ALL`] order.
    pub fn rules(&self) -> Vec<(Measure, &Bound)> {
        let all = [
            (Measure::ClipSimilarity, &self.clip_similarity),
            (Measure::Aesthetic, &self.aesthetic),
            (Measure::Pwatermark, &self.pwatermark),
            (Measure::Punsafe, &self.punsafe),
            (Measure::MinSide, &self.min_side),
            (Measure::MaxSide, &self.max_side),
            (Measure::AspectRatio, &self.aspect_ratio),
            (Measure::FileBytes, &self.file_bytes),
        ];
        all.into_iter()
            .filter_map(|(m, b)| b.as_ref().map(|b| (m, b)))
            .collect()
    }

    /// Short stable hash of the thresholds (names the verdict stage).
    pub fn digest(&self) -> String {
        let json = serde_json::to_string(self).expect("serialisable");
        hex::encode(&Sha256::digest(json.as_bytes())[..6])
    }

    /// A value converted to the unit a rule's bounds are written in.
    pub fn in_rule_unit(&self, m: Measure, b: &Bound, v: f64) -> f64 {
        if m == Measure::Aesthetic && b.scale == Some(AestheticScale::ZeroToOne) {
            v / 10.0
        } else {
            v
        }
    }

    /// Every failed rule of one row (empty = keep).
    pub fn failures(&self, values: &Values) -> Vec<String> {
        let mut out = Vec::new();
        for (m, b) in self.rules() {
            let v = values.get(&m).copied().flatten().filter(|v| !v.is_nan());
            let Some(v) = v else {
                if self.on_missing == OnMissing::Drop {
                    out.push(format!("{}:missing", m.name()));
                }
                continue;
            };
            let v = self.in_rule_unit(m, b, v);
            if let Some(min) = b.min {
                if b.min_inclusive && v < min {
                    out.push(format!("{}<{}", m.name(), min));
                } else if !b.min_inclusive && v <= min {
                    out.push(format!("{}<={}", m.name(), min));
                }
            }
            if let Some(max) = b.max {
                if b.max_inclusive && v > max {
                    out.push(format!("{}>{}", m.name(), max));
                } else if !b.max_inclusive && v >= max {
                    out.push(format!("{}>={}", m.name(), max));
                }
            }
        }
        out
    }
}

/// Whether `reason` is one this module writes (see the module invariants).
pub fn is_rule_reason(reason: &str) -> bool {
    if let Some(name) = reason.strip_suffix(":missing") {
        return Measure::parse(name).is_some();
    }
    for op in ["<=", ">=", "<", ">"] {
        if let Some((name, num)) = reason.split_once(op) {
            return Measure::parse(name).is_some() && num.parse::<f64>().is_ok();
        }
    }
    false
}

/// The verdict for one row: new `reject_reasons` and `status`; `None` when the row is left alone.
pub fn verdict(
    thresholds: &Thresholds,
    status: &str,
    old_reasons: &[String],
    values: &Values,
) -> Option<(Vec<String>, &'static str)> {
    if status != "ok" && status != "dropped" {
        return None;
    }
    let mut reasons: Vec<String> = old_reasons
        .iter()
        .filter(|r| !is_rule_reason(r))
        .cloned()
        .collect();
    let other = !reasons.is_empty();
    let fails = thresholds.failures(values);
    let dropped = !fails.is_empty() || (status == "dropped" && other);
    reasons.extend(fails);
    Some((reasons, if dropped { "dropped" } else { "ok" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(pairs: &[(Measure, Option<f64>)]) -> Values {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn bounds_and_reasons() {
        let t = Thresholds::from_toml(
            "t.toml",
            r#"
            [aesthetic]
            min = 5
            [pwatermark]
            max = 0.8
            max_inclusive = false
            [min_side]
            min = 256
            "#,
        )
        .unwrap();
        let v = vals(&[
            (Measure::Aesthetic, Some(4.9)),
            (Measure::Pwatermark, Some(0.8)),
            (Measure::MinSide, Some(256.0)),
        ]);
        assert_eq!(t.failures(&v), vec!["aesthetic<5", "pwatermark>=0.8"]);
        let v = vals(&[
            (Measure::Aesthetic, Some(5.0)),
            (Measure::Pwatermark, Some(0.79)),
            (Measure::MinSide, None),
        ]);
        assert_eq!(t.failures(&v), vec!["min_side:missing"]);
    }

    #[test]
    fn scale_and_exclusive_min() {
        let t = Thresholds::from_toml(
            "t.toml",
            "[aesthetic]\nmin = 0.5\nmin_inclusive = false\nscale = \"0-1\"\n",
        )
        .unwrap();
        let v = vals(&[(Measure::Aesthetic, Some(5.0))]);
        assert_eq!(t.failures(&v), vec!["aesthetic<=0.5"]);
        let v = vals(&[(Measure::Aesthetic, Some(5.01))]);
        assert!(t.failures(&v).is_empty());
    }

    #[test]
    fn verdicts_recompute_and_keep_other_reasons() {
        let strict = Thresholds::from_toml("s", "[aesthetic]\nmin = 6\n").unwrap();
        let loose = Thresholds::from_toml("l", "[aesthetic]\nmin = 4\n").unwrap();
        let v = vals(&[(Measure::Aesthetic, Some(5.0))]);
        let (r, s) = verdict(&strict, "ok", &[], &v).unwrap();
        assert_eq!((r.clone(), s), (vec!["aesthetic<6".to_string()], "dropped"));
        let (r2, s2) = verdict(&loose, s, &r, &v).unwrap();
        assert_eq!((r2, s2), (vec![], "ok"));
        let other = vec!["duplicate_url".to_string(), "aesthetic<6".to_string()];
        let (r3, s3) = verdict(&loose, "dropped", &other, &v).unwrap();
        assert_eq!((r3, s3), (vec!["duplicate_url".to_string()], "dropped"));
        assert_eq!(verdict(&loose, "failed", &[], &v), None);
        assert!(is_rule_reason("pwatermark>=0.8"));
        assert!(!is_rule_reason("duplicate_url"));
        assert!(!is_rule_reason("too<small"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Thresholds::from_toml("t", "[aesthetics]\nmin = 5\n").is_err());
        assert!(Thresholds::from_toml("t", "[pwatermark]\nmax = 0.5\nscale = \"0-1\"\n").is_err());
        assert!(Thresholds::from_toml("t", "[pwatermark]\n").is_err());
    }
}
