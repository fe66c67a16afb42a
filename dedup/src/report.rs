//! The dedup report: group counts, duplicates by kind and the distance histograms, as text and as
//! an HTML page (the same charts as the filter dry run), from a [`Grouping`] only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use llamagen_filters::report::{Histogram, count_table, esc};

use crate::group::{DedupConfig, Grouping};

/// One line per number, for the terminal.
pub fn text(g: &Grouping, cfg: &DedupConfig, dry_run: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "dedup{}: {} rows, {} groups, {} duplicates",
        if dry_run {
            " (dry run, nothing written)"
        } else {
            ""
        },
        g.rows,
        g.groups,
        g.duplicates.values().sum::<u64>()
    );
    for (k, v) in &g.duplicates {
        let _ = writeln!(
            s,
            "  {k:<10} {v} duplicates, {} links",
            g.links.get(k).copied().unwrap_or(0)
        );
    }
    if let Some(t) = cfg.hamming {
        let _ = writeln!(
            s,
            "  perceptual: hamming <= {t}, {} bands, {} candidate pairs verified; links by distance: {:?}",
            g.bands, g.candidate_pairs, g.hamming_histogram
        );
    }
    if let Some(c) = cfg.cosine {
        let _ = writeln!(s, "  semantic: cosine >= {c}, {} clusters", g.clusters);
    }
    s
}

/// The HTML page.
pub fn html(g: &Grouping, cfg: &DedupConfig, dry_run: bool, dataset: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=utf-8><title>dedup {}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px}}td.n{{text-align:right}}</style></head><body>\
         <h1>Deduplication of {}{}</h1><p>{} rows take part; {} groups; thresholds: {}</p>",
        esc(dataset),
        esc(dataset),
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        },
        g.rows,
        g.groups,
        esc(&serde_json::to_string(cfg).expect("serialisable"))
    );
    s.push_str(&count_table("Duplicates by kind", "kind", &g.duplicates));
    s.push_str(&count_table("Verified links by kind", "kind", &g.links));
    let mut hist = BTreeMap::new();
    for (d, n) in g.hamming_histogram.iter().enumerate() {
        hist.insert(format!("{d:02}"), *n);
    }
    s.push_str(&count_table(
        "Perceptual links by Hamming distance",
        "bits",
        &hist,
    ));
    if !g.cosines.is_empty() {
        let vals: Vec<f64> = g.cosines.iter().map(|&c| c as f64).collect();
        let mut h = Histogram::of("cosine of semantic links", &vals, 0);
        if let Some(c) = cfg.cosine {
            h.thresholds.push((c as f64, format!("cosine {c}")));
        }
        s.push_str(&h.to_svg());
    }
    let _ = write!(
        s,
        "<h2>Timings</h2><pre>{}</pre></body></html>",
        esc(&serde_json::to_string_pretty(&g.seconds).expect("serialisable"))
    );
    s
}
