//! On-demand: CPU milliseconds per image of `decode_rgb` over the files of a directory (each
//! file decoded `REPEATS` times, best pass), with and without a target-size hint.
//!
//!   cargo run -p llamagen-ingest --example decode_bench DIR [TARGET] [REPEATS]
use llamagen_ingest::DecodeLimits;
use llamagen_ingest::decode::decode_rgb;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() >= 2, "usage: decode_bench DIR [TARGET] [REPEATS]");
    let target: Option<u32> = a.get(2).map(|s| s.parse()).transpose()?;
    let repeats: usize = a.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for e in std::fs::read_dir(&a[1])? {
        let p = e?.path();
        files.push((p.display().to_string(), std::fs::read(&p)?));
    }
    files.sort();
    let limits = DecodeLimits::default();
    let mut by_format: std::collections::BTreeMap<&str, (usize, f64)> = Default::default();
    for (_, data) in &files {
        let mut best = f64::MAX;
        let mut fmt = "failed";
        for _ in 0..repeats {
            let t = Instant::now();
            let r = decode_rgb(data, &limits, target);
            best = best.min(t.elapsed().as_secs_f64());
            fmt = r.map(|d| d.format).unwrap_or("failed");
        }
        let e = by_format.entry(fmt).or_default();
        e.0 += 1;
        e.1 += best;
    }
    let (n, s) = by_format
        .values()
        .fold((0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    for (f, (c, t)) in &by_format {
        println!("{f}: {c} files, {:.2} ms each", t / *c as f64 * 1e3);
    }
    println!(
        "all: {n} files, {:.2} ms each (target hint {target:?})",
        s / n as f64 * 1e3
    );
    Ok(())
}
