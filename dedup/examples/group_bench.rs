//! Grouping time of N synthetic pHashes through the catalog (`bench/dedup.sh` runs it).
//!
//! Writes N rows (`key`, `status` = ok, `phash`) into a catalog at PATH in shards of 100,000 rows:
//! random 64-bit hashes, of which a fraction (default 10 %) are planted near-duplicates of an
//! earlier row (0 to `hamming` random bits flipped). Then runs the perceptual grouping and
//! reports rows/s, bands, candidates verified, groups and duplicates, and how many planted
//! copies were found (the LSH search is exact up to the threshold: all of them).
//!
//! Usage: group_bench PATH N [HAMMING] [DUP_FRACTION]

use std::sync::Arc;
use std::time::Instant;

use llamagen_catalog::arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::schema::col;
use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};
use llamagen_dedup::{DedupConfig, find_groups};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHARD_ROWS: usize = 100_000;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: group_bench PATH N [HAMMING] [DUP_FRACTION]")?;
    let n: usize = args.get(2).ok_or("N")?.parse()?;
    let t: u32 = args.get(3).map_or(Ok(4), |s| s.parse())?;
    let frac: f64 = args.get(4).map_or(Ok(0.1), |s| s.parse())?;
    let cat = Catalog::open(path, &StorageOptions::default()).await?;
    let ds = cat.samples();
    let mut rng = StdRng::seed_from_u64(42);
    let mut planted = 0u64;
    if ds.snapshot().await.map(|s| s.rows()).unwrap_or(0) != n as u64 {
        let t0 = Instant::now();
        let mut hashes: Vec<u64> = Vec::with_capacity(n);
        for i in 0..n {
            let h = if i > 0 && rng.random_bool(frac) {
                let mut h = hashes[rng.random_range(0..i)];
                for _ in 0..rng.random_range(0..=t) {
                    h ^= 1 << rng.random_range(0..64);
                }
                h
            } else {
                rng.random()
            };
            hashes.push(h);
        }
        for (s, chunk) in hashes.chunks(SHARD_ROWS).enumerate() {
            let keys = StringArray::from_iter_values(
                (0..chunk.len()).map(|i| format!("{:010}", s * SHARD_ROWS + i)),
            );
            let cols: Vec<(&str, ArrayRef)> = vec![
                (col::KEY, Arc::new(keys)),
                (
                    col::STATUS,
                    Arc::new(StringArray::from_iter_values(chunk.iter().map(|_| "ok"))),
                ),
                (
                    col::PHASH,
                    Arc::new(Int64Array::from_iter_values(
                        chunk.iter().map(|&h| h as i64),
                    )),
                ),
            ];
            let schema = Schema::new(
                cols.iter()
                    .map(|(c, a)| Field::new(*c, a.data_type().clone(), *c == col::PHASH))
                    .collect::<Vec<_>>(),
            );
            let b =
                RecordBatch::try_new(Arc::new(schema), cols.into_iter().map(|(_, a)| a).collect())?;
            let mut w = ds.writer(ShardWriterOptions::default());
            w.write(&b).await?;
            ds.commit(Transaction {
                operation: "bench".into(),
                run_id: None,
                add: w.finish().await?,
                remove: vec![],
                units: vec![],
            })
            .await?;
        }
        eprintln!("wrote {n} rows in {:.1}s", t0.elapsed().as_secs_f64());
    }
    // Count the planted copies the generator made (same seed, same draws).
    {
        let mut rng = StdRng::seed_from_u64(42);
        let mut hs: Vec<u64> = Vec::with_capacity(n);
        for i in 0..n {
            let h = if i > 0 && rng.random_bool(frac) {
                planted += 1;
                let mut h = hs[rng.random_range(0..i)];
                for _ in 0..rng.random_range(0..=t) {
                    h ^= 1 << rng.random_range(0..64);
                }
                h
            } else {
                rng.random()
            };
            hs.push(h);
        }
    }
    let _ = DataType::Utf8;
    let ctx = cat.session().await?;
    let cfg = DedupConfig {
        exact: false,
        hamming: Some(t),
        cosine: None,
        ..DedupConfig::default()
    };
    let t0 = Instant::now();
    let g = find_groups(&ctx, &cfg).await?;
    let secs = t0.elapsed().as_secs_f64();
    let dups: u64 = g.duplicates.values().sum();
    println!(
        "rows {n} hamming {t}: {secs:.1}s ({:.0} rows/s), {} bands, {} candidate pairs, {} groups, {dups} duplicates (planted {planted}), peak RSS {:.0} MB",
        n as f64 / secs,
        g.bands,
        g.candidate_pairs,
        g.groups,
        peak_rss_mb()
    );
    Ok(())
}
