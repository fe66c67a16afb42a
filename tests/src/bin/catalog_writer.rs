//! A catalog writer process for concurrency and crash tests:
//! `catalog_writer <root> <unit-prefix> <shards> <rows-per-shard> [sleep-ms-per-batch]`.
//! Writes `shards` shards of distinct keys (`<prefix>-<shard>-<row>`), committing each as its own
//! work unit, and prints `committed <unit> v<version>` after each commit. With a sleep, it writes
//! each shard in ten batches with a pause between them, so a test can kill it mid-shard.

use std::sync::Arc;
use std::time::Duration;

use llamagen_catalog::arrow::array::{ArrayRef, Float32Array, RecordBatch, StringArray};
use llamagen_catalog::{Catalog, CatalogError, ShardWriterOptions, StorageOptions, Transaction};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        a.len() >= 4,
        "usage: catalog_writer <root> <prefix> <shards> <rows> [sleep-ms]"
    );
    let (root, prefix) = (&a[0], &a[1]);
    let shards: usize = a[2].parse()?;
    let rows: usize = a[3].parse()?;
    let sleep_ms: u64 = a.get(4).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let cat = Catalog::open(root, &StorageOptions::default()).await?;
    let ds = cat.samples();
    for s in 0..shards {
        let unit = format!("{prefix}-{s}");
        let mut w = ds.writer(ShardWriterOptions {
            stage: "test".into(),
            row_group_rows: (rows / 10).max(1),
            ..Default::default()
        });
        let parts = if sleep_ms > 0 { 10 } else { 1 };
        let per = rows.div_ceil(parts);
        let mut r = 0;
        while r < rows {
            let n = per.min(rows - r);
            let keys: Vec<String> = (r..r + n).map(|i| format!("{unit}-{i:06}")).collect();
            let scores: Vec<f32> = (r..r + n).map(|i| i as f32 / rows as f32).collect();
            let b = RecordBatch::try_from_iter(vec![
                ("key", Arc::new(StringArray::from(keys)) as ArrayRef),
                (
                    "status",
                    Arc::new(StringArray::from(vec!["ok"; n])) as ArrayRef,
                ),
                (
                    "score_aesthetic",
                    Arc::new(Float32Array::from(scores)) as ArrayRef,
                ),
            ])?;
            w.write(&b).await?;
            r += n;
            if sleep_ms > 0 {
                println!("wrote {unit} rows {r}");
                tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
            }
        }
        let added = w.finish().await?;
        match ds
            .commit(Transaction {
                operation: "test".into(),
                add: added,
                units: vec![unit.clone()],
                ..Default::default()
            })
            .await
        {
            Ok(m) => println!("committed {unit} v{}", m.version),
            Err(CatalogError::UnitAlreadyCommitted { .. }) => println!("skipped {unit}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
