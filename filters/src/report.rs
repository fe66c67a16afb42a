//! Dry-run reports: per-measure histograms and per-rule drop counts, as text and as an HTML page
//! with one SVG chart per measure (threshold lines drawn in), computed from stored scores only.
//!
//! Invariants enforced here:
//! - The report counts exactly what [`crate::rules::verdict`] would do to each row: `would_drop`
//!   and `would_keep` cover the rows with status `ok` or `dropped`; per rule, `failed` counts rows
//!   failing it and `only` rows failing nothing else.
//! - Histograms use every non-null value of a measure over the rows that get a verdict, in
//!   [`BINS`] equal bins between the observed minimum and maximum.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::rules::{Measure, Thresholds, Values, is_rule_reason, verdict};

/// Bins per histogram.
pub const BINS: usize = 30;

/// A histogram of one measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Histogram {
    pub measure: &'static str,
    pub min: f64,
    pub max: f64,
    pub counts: Vec<u64>,
    pub values: u64,
    pub missing: u64,
    /// Threshold lines (value in stored units, label).
    pub thresholds: Vec<(f64, String)>,
}

impl Histogram {
    /// [`BINS`] equal bins of `vals` between their minimum and maximum (all zero when empty).
    pub fn of(measure: &'static str, vals: &[f64], missing: u64) -> Histogram {
        let (lo, hi) = vals
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let mut counts = vec![0u64; BINS];
        if !vals.is_empty() {
            let span = (hi - lo).max(f64::MIN_POSITIVE);
            for &v in vals {
                let b = (((v - lo) / span) * BINS as f64) as usize;
                counts[b.min(BINS - 1)] += 1;
            }
        }
        Histogram {
            measure,
            min: if vals.is_empty() { 0.0 } else { lo },
            max: if vals.is_empty() { 0.0 } else { hi },
            counts,
            values: vals.len() as u64,
            missing,
            thresholds: Vec::new(),
        }
    }

    /// An SVG bar chart with its title, threshold lines in red and the range below.
    pub fn to_svg(&self) -> String {
        let (w, h, pad) = (600.0, 200.0, 30.0);
        let mut s = String::new();
        let peak = self.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        let bw = (w - 2.0 * pad) / self.counts.len().max(1) as f64;
        let _ = write!(
            s,
            "<h3>{} <small>({} values, {} missing)</small></h3>\
             <svg width=\"{w}\" height=\"{}\" xmlns=\"http://www.w3.org/2000/svg\">",
            esc(self.measure),
            self.values,
            self.missing,
            h + 2.0 * pad
        );
        for (i, &c) in self.counts.iter().enumerate() {
            let bh = (c as f64 / peak) * h;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#4a7ab5\"><title>{c}</title></rect>",
                pad + i as f64 * bw,
                pad + h - bh,
                bw - 1.0
            );
        }
        let span = (self.max - self.min).max(f64::MIN_POSITIVE);
        for (t, label) in &self.thresholds {
            let x = pad + ((t - self.min) / span).clamp(0.0, 1.0) * (w - 2.0 * pad);
            let _ = write!(
                s,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{pad}\" y2=\"{}\" stroke=\"red\" stroke-width=\"2\"/>\
                 <text x=\"{:.1}\" y=\"{}\" fill=\"red\" font-size=\"12\">{}</text>",
                pad + h,
                x + 3.0,
                pad - 5.0,
                esc(label)
            );
        }
        let _ = write!(
            s,
            "<text x=\"{pad}\" y=\"{}\" font-size=\"12\">{:.4}</text>\
             <text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{:.4}</text></svg>",
            h + 2.0 * pad - 8.0,
            self.min,
            w - pad,
            h + 2.0 * pad - 8.0,
            self.max
        );
        s
    }
}

/// Text for HTML element content and attribute values.
pub fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A two-column HTML table of counts under an `<h2>` title.
pub fn count_table(title: &str, what: &str, rows: &BTreeMap<String, u64>) -> String {
    let mut s = format!(
        "<h2>{}</h2><table><tr><th>{}</th><th>rows</th></tr>",
        esc(title),
        esc(what)
    );
    if rows.is_empty() {
        s.push_str("<tr><td colspan=2>none</td></tr>");
    }
    for (k, v) in rows {
        let _ = write!(s, "<tr><td>{}</td><td class=n>{v}</td></tr>", esc(k));
    }
    s.push_str("</table>");
    s
}

/// Counts for one rule.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RuleCount {
    pub failed: u64,
    pub only: u64,
}

/// What applying thresholds would do.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DryRunReport {
    pub stage: String,
    pub rows: u64,
    /// Rows with status ok/dropped (those that get a verdict).
    pub judged: u64,
    pub would_keep: u64,
    pub would_drop: u64,
    /// Per failing reason (e.g. `aesthetic<5`).
    pub reasons: BTreeMap<String, u64>,
    /// Per measure name.
    pub rules: BTreeMap<String, RuleCount>,
    pub histograms: Vec<Histogram>,
}

/// Accumulates rows, then builds the report.
pub struct DryRun {
    t: Thresholds,
    stage: String,
    rows: u64,
    judged: u64,
    keep: u64,
    drop: u64,
    reasons: BTreeMap<String, u64>,
    rules: BTreeMap<String, RuleCount>,
    values: BTreeMap<Measure, (Vec<f64>, u64)>,
}

impl DryRun {
    pub fn new(t: &Thresholds, stage: &str) -> DryRun {
        DryRun {
            t: t.clone(),
            stage: stage.into(),
            rows: 0,
            judged: 0,
            keep: 0,
            drop: 0,
            reasons: BTreeMap::new(),
            rules: BTreeMap::new(),
            values: BTreeMap::new(),
        }
    }

    /// Adds one row.
    pub fn add(&mut self, status: &str, old_reasons: &[String], values: &Values) {
        self.rows += 1;
        let Some((reasons, st)) = verdict(&self.t, status, old_reasons, values) else {
            return;
        };
        self.judged += 1;
        if st == "dropped" {
            self.drop += 1;
        } else {
            self.keep += 1;
        }
        let mine: Vec<&String> = reasons.iter().filter(|r| is_rule_reason(r)).collect();
        let measures: std::collections::BTreeSet<&str> = mine
            .iter()
            .map(|r| {
                r.split([':', '<', '>'])
                    .next()
                    .expect("split yields one part")
            })
            .collect();
        for r in &mine {
            *self.reasons.entry((*r).clone()).or_default() += 1;
        }
        for m in &measures {
            let c = self.rules.entry(m.to_string()).or_default();
            c.failed += 1;
            if measures.len() == 1 {
                c.only += 1;
            }
        }
        for (m, v) in values {
            let e = self.values.entry(*m).or_default();
            match v.filter(|v| !v.is_nan()) {
                Some(v) => e.0.push(v),
                None => e.1 += 1,
            }
        }
    }

    /// Builds the report; histograms for measures with a rule or any value.
    pub fn finish(self) -> DryRunReport {
        let mut histograms = Vec::new();
        let rules: BTreeMap<Measure, _> = self.t.rules().into_iter().collect();
        for (m, (vals, missing)) in &self.values {
            if vals.is_empty() && !rules.contains_key(m) {
                continue;
            }
            let mut thresholds = Vec::new();
            if let Some(b) = rules.get(m) {
                let unit = |x: f64| {
                    // Back to stored units for drawing.
                    if self.t.in_rule_unit(*m, b, 10.0) != 10.0 {
                        x * 10.0
                    } else {
                        x
                    }
                };
                if let Some(v) = b.min {
                    thresholds.push((
                        unit(v),
                        format!("min {}{v}", if b.min_inclusive { "≥" } else { ">" }),
                    ));
                }
                if let Some(v) = b.max {
                    thresholds.push((
                        unit(v),
                        format!("max {}{v}", if b.max_inclusive { "≤" } else { "<" }),
                    ));
                }
            }
            histograms.push(Histogram {
                thresholds,
                ..Histogram::of(m.name(), vals, *missing)
            });
        }
        DryRunReport {
            stage: self.stage,
            rows: self.rows,
            judged: self.judged,
            would_keep: self.keep,
            would_drop: self.drop,
            reasons: self.reasons,
            rules: self.rules,
            histograms,
        }
    }
}

impl DryRunReport {
    /// A plain-text summary with ASCII histograms.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "dry run of {}: {} rows, {} judged (status ok/dropped): {} kept, {} dropped",
            self.stage, self.rows, self.judged, self.would_keep, self.would_drop
        );
        let _ = writeln!(s, "\nrule                 failed   only this rule");
        for (m, c) in &self.rules {
            let _ = writeln!(s, "{m:<20} {:>8} {:>8}", c.failed, c.only);
        }
        let _ = writeln!(s, "\nreason                       rows");
        for (r, n) in &self.reasons {
            let _ = writeln!(s, "{r:<26} {n:>8}");
        }
        for h in &self.histograms {
            let _ = writeln!(
                s,
                "\n{} ({} values, {} missing){}",
                h.measure,
                h.values,
                h.missing,
                h.thresholds
                    .iter()
                    .map(|(_, l)| format!("  [{l}]"))
                    .collect::<String>()
            );
            let peak = h.counts.iter().copied().max().unwrap_or(0).max(1);
            let w = (h.max - h.min) / BINS as f64;
            for (i, &c) in h.counts.iter().enumerate() {
                let lo = h.min + w * i as f64;
                let mark = if h
                    .thresholds
                    .iter()
                    .any(|(t, _)| *t >= lo && *t < lo + w.max(f64::MIN_POSITIVE))
                {
                    '|'
                } else {
                    ' '
                };
                let _ = writeln!(
                    s,
                    "{lo:>12.4} {mark} {:<40} {c}",
                    "#".repeat((c * 40).div_ceil(peak) as usize)
                );
            }
        }
        s
    }

    /// A standalone HTML page: one SVG bar chart per measure, thresholds as red lines, and the
    /// drop counts.
    pub fn to_html(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>llamagen filter dry run</title>\
             <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
             td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>\
             <h1>Filter dry run <code>{}</code></h1><p>{} rows; {} judged (status ok/dropped): \
             <b>{} kept</b>, <b>{} dropped</b>.</p>",
            esc(&self.stage),
            self.rows,
            self.judged,
            self.would_keep,
            self.would_drop
        );
        let _ = write!(
            s,
            "<h2>Drops per rule</h2><table><tr><th>rule</th><th>failed</th><th>only this rule</th></tr>"
        );
        for (m, c) in &self.rules {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(m),
                c.failed,
                c.only
            );
        }
        s.push_str("</table>");
        s.push_str(&count_table("Reasons", "reason", &self.reasons));
        s.push_str("<h2>Histograms</h2>");
        for hist in &self.histograms {
            s.push_str(&hist.to_svg());
        }
        s.push_str("</body></html>\n");
        s
    }
}
