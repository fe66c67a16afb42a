//! Times the metrics at the evaluator's real sizes on random ReLU-like activations:
//! statistics and FID at 2048 features, precision/recall at 2048 features.
//!
//!   cargo run --release -p llamagen-eval --example metrics_scale -- [N]   # default 10000

use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("N"))
        .unwrap_or(10_000);
    let d = 2048;
    // A cheap deterministic generator (xorshift) of values in [0, 1).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    let a: Vec<f32> = (0..n * d).map(|_| next() * next()).collect();
    let b: Vec<f32> = (0..n * d).map(|_| next() * next() * 1.1).collect();
    let t = Instant::now();
    let sa = llamagen_eval::FidStats::of(&a, n, d).unwrap();
    let sb = llamagen_eval::FidStats::of(&b, n, d).unwrap();
    let t_stats = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let fid = sa.frechet_distance(&sb).unwrap();
    let t_fid = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (p, r) = llamagen_eval::precision_recall(&a, n, &b, n, d, 3).unwrap();
    let t_pr = t.elapsed().as_secs_f64();
    println!(
        "{{\"n\": {n}, \"d\": {d}, \"stats_s\": {t_stats:.2}, \"fid_s\": {t_fid:.2}, \"pr_s\": {t_pr:.2}, \"fid\": {fid:.4}, \"precision\": {p}, \"recall\": {r}}}"
    );
}
