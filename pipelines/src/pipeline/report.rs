//! The run's HTML page: per-stage counts and throughput, statuses, drop reasons, error kinds,
//! score histograms and a grid of thumbnails with their short captions. One self-contained file
//! (inline SVG and base64 JPEG thumbnails) written to `<dataset>/_reports/<run_id>.html` and
//! `<dataset>/_reports/latest.html` under the catalog root.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use base64::Engine as _;
use llamagen_catalog::arrow::array::{Array, AsArray, RecordBatch};
use llamagen_catalog::arrow::datatypes::{Float32Type, Int32Type};
use llamagen_catalog::schema::col;
use llamagen_catalog::{Catalog, Dataset};
use llamagen_filters::report::{Histogram, count_table, esc};

use super::{PipelineConfig, RunReport};

const SCORES: [&str; 4] = [
    col::SCORE_CLIP_SIMILARITY,
    col::SCORE_AESTHETIC,
    col::SCORE_WATERMARK,
    col::SCORE_NSFW,
];

#[derive(Default)]
struct Tally {
    status: BTreeMap<String, u64>,
    reasons: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    scores: BTreeMap<&'static str, Vec<f32>>,
    with_codes: u64,
    with_t5: u64,
    thumbs: Vec<(String, String, String)>,
}

fn thumbnail(batch: &RecordBatch, i: usize) -> Option<String> {
    let list = batch.column_by_name(col::IMAGES)?.as_list_opt::<i32>()?;
    if list.is_null(i) {
        return None;
    }
    let v = list.value(i);
    let s = v.as_struct();
    let sizes = s.column_by_name("size")?.as_primitive_opt::<Int32Type>()?;
    let data = s.column_by_name("data")?.as_binary_opt::<i32>()?;
    let j = (0..s.len()).min_by_key(|&j| sizes.value(j))?;
    let img = image::load_from_memory(data.value(j)).ok()?;
    let t = img.thumbnail(128, 128).to_rgb8();
    let mut buf = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 80)
        .encode_image(&t)
        .ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(buf.get_ref()))
}

fn tally(t: &mut Tally, b: &RecordBatch, want_thumbs: usize) {
    let status = b
        .column_by_name(col::STATUS)
        .map(|c| c.as_string::<i32>().clone());
    let kinds = b
        .column_by_name(col::ERROR_KIND)
        .map(|c| c.as_string::<i32>().clone());
    let reasons = b
        .column_by_name(col::REJECT_REASONS)
        .and_then(|c| c.as_list_opt::<i32>().cloned());
    let short = b
        .column_by_name(col::SHORT_CAPTION)
        .and_then(|c| c.as_string_opt::<i32>().cloned());
    let text = b
        .column_by_name(col::TEXT)
        .and_then(|c| c.as_string_opt::<i32>().cloned());
    let keys = b
        .column_by_name(col::KEY)
        .map(|c| c.as_string::<i32>().clone());
    let codes = b
        .column_by_name(col::VQ_CODES)
        .and_then(|c| c.as_list_opt::<i32>().cloned());
    let t5 = b.column_by_name(col::T5_LONG).cloned();
    for i in 0..b.num_rows() {
        let st = status.as_ref().map_or("?", |s| s.value(i)).to_string();
        if let Some(k) = kinds.as_ref().filter(|k| k.is_valid(i)) {
            *t.errors.entry(k.value(i).to_string()).or_default() += 1;
        }
        if let Some(r) = reasons.as_ref().filter(|r| r.is_valid(i)) {
            let v = r.value(i);
            let v = v.as_string::<i32>();
            for j in 0..v.len() {
                *t.reasons.entry(v.value(j).to_string()).or_default() += 1;
            }
        }
        if codes.as_ref().is_some_and(|c| c.is_valid(i)) {
            t.with_codes += 1;
        }
        if t5.as_ref().is_some_and(|c| c.is_valid(i)) {
            t.with_t5 += 1;
        }
        if st == "ok" && t.thumbs.len() < want_thumbs {
            if let Some(img) = thumbnail(b, i) {
                let cap = short
                    .as_ref()
                    .filter(|s| s.is_valid(i))
                    .or(text.as_ref().filter(|s| s.is_valid(i)))
                    .map_or(String::new(), |s| s.value(i).to_string());
                let key = keys
                    .as_ref()
                    .map_or(String::new(), |k| k.value(i).to_string());
                t.thumbs.push((key, img, cap));
            }
        }
        *t.status.entry(st).or_default() += 1;
    }
    for name in SCORES {
        if let Some(c) = b
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Float32Type>())
        {
            let v = t.scores.entry(name).or_default();
            v.extend(c.iter().flatten().filter(|x| x.is_finite()));
        }
    }
}

/// Builds the page from the committed dataset and the run report; returns its path.
pub async fn write_html(
    cat: &Catalog,
    ds: &Dataset,
    cfg: &PipelineConfig,
    report: &RunReport,
) -> Result<String> {
    let snap = ds.snapshot().await?;
    let mut t = Tally::default();
    let light: Vec<&str> = vec![
        col::KEY,
        col::STATUS,
        col::ERROR_KIND,
        col::REJECT_REASONS,
        col::SHORT_CAPTION,
        col::TEXT,
        col::SCORE_CLIP_SIMILARITY,
        col::SCORE_AESTHETIC,
        col::SCORE_WATERMARK,
        col::SCORE_NSFW,
        col::VQ_CODES,
        col::T5_LONG,
    ];
    for entry in &snap.shards {
        let need_thumbs = cfg.report.thumbnails.saturating_sub(t.thumbs.len());
        let batches = if need_thumbs > 0 {
            ds.read_shard(entry, None).await?
        } else {
            ds.read_shard(entry, Some(&light)).await?
        };
        for b in &batches {
            let want = cfg.report.thumbnails;
            tally(&mut t, b, want);
        }
    }
    let total: u64 = t.status.values().sum();
    let mut h = String::new();
    let _ = write!(
        h,
        r#"<!doctype html><html><head><meta charset="utf-8"><title>llamagen pipeline report {id}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}td.n{{text-align:right}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}}.cell{{width:140px;font-size:11px}}.cell img{{width:128px;height:128px;object-fit:cover}}</style></head><body>
<h1>Pipeline run {id}</h1>
<p>status <b>{status}</b> (exit {code}) · dataset <code>{ds}</code> at <code>{root}</code> · version {ver} · {total} samples · worker {wi}/{wn} · {secs:.1} s</p>"#,
        id = esc(&report.run_id),
        status = esc(&report.status),
        code = report.exit_code,
        ds = esc(&report.dataset),
        root = esc(&report.root),
        ver = snap.version,
        wi = report.worker.0,
        wn = report.worker.1,
        secs = report.seconds,
    );
    if let Some(e) = &report.error {
        let _ = write!(h, "<p style='color:#b00'>error: {}</p>", esc(e));
    }
    h.push_str("<h2>Stages of this run</h2><table><tr><th>stage</th><th>pass</th><th>shards rewritten</th><th>skipped</th><th>lost race</th><th>rows</th><th>seconds</th><th>rows/s</th><th>dropped</th><th>errors</th></tr>");
    for s in &report.stages {
        let fmt = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{:.2}</td><td class=n>{:.1}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.stage),
            s.pass,
            s.shards_rewritten,
            s.shards_skipped,
            s.shards_lost_race,
            s.rows,
            s.seconds,
            s.rows_per_s,
            esc(&fmt(&s.counters.dropped)),
            esc(&fmt(&s.counters.errors)),
        );
    }
    h.push_str("</table>");
    h.push_str(&count_table("Samples by status", "value", &t.status));
    let mut ready = BTreeMap::new();
    ready.insert("with VQ codes".to_string(), t.with_codes);
    ready.insert("with T5 features (long caption)".to_string(), t.with_t5);
    h.push_str(&count_table("Ready columns", "value", &ready));
    h.push_str(&count_table("Drop reasons (filters)", "value", &t.reasons));
    h.push_str(&count_table("Error kinds", "value", &t.errors));
    h.push_str("<h2>Score histograms</h2>");
    let mut any = false;
    for (name, v) in &t.scores {
        if v.is_empty() {
            continue;
        }
        any = true;
        let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        let missing = total.saturating_sub(v.len() as u64);
        h.push_str(&Histogram::of(name, &v, missing).to_svg());
    }
    if !any {
        h.push_str("<p>no scores</p>");
    }
    let _ = write!(
        h,
        "<h2>Samples ({} of {total})</h2><div class=grid>",
        t.thumbs.len()
    );
    for (key, img, cap) in &t.thumbs {
        let _ = write!(
            h,
            r#"<div class=cell><img src="data:image/jpeg;base64,{img}" title="{k}"><br>{c}</div>"#,
            k = esc(key),
            c = esc(cap)
        );
    }
    h.push_str("</div></body></html>\n");
    let dir = format!("{}/_reports", cfg.output.dataset);
    let path = format!("{dir}/{}.html", report.run_id);
    cat.storage()
        .put(&path, h.clone().into_bytes().into())
        .await?;
    cat.storage()
        .put(&format!("{dir}/latest.html"), h.into_bytes().into())
        .await?;
    Ok(llamagen_catalog::storage::join(
        &cat.storage().root(),
        &path,
    ))
}
