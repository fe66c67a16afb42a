//! Write amplification of a full pipeline over the catalog: bytes written to storage divided by
//! the bytes of the final dataset.
//!
//! `cargo run -p llamagen-catalog --example write_amp -- ROOT [ROWS] [IMAGE_KB] [T5_KB]` writes
//! ROWS samples (default 10,000) as ingest does, with one stored image of IMAGE_KB (default 64,
//! incompressible bytes, as JPEG is), then runs the pipeline's four later stages as stage passes:
//! filter scores, captions, T5 features of T5_KB (default 250, FLAN-T5-XL width) and VQ codes
//! (256 codes). It prints one JSON line: bytes written per stage, data and log bytes on storage
//! (every file any stage wrote: replaced shards stay until `gc`), the final dataset's bytes, and
//! the ratio.
//!
//! `ROOT` must be a new local directory.

use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    ArrayRef, BinaryArray, Float32Array, Int16Array, Int32Array, ListArray, RecordBatch,
    StringArray, StructArray,
};
use llamagen_catalog::arrow::buffer::OffsetBuffer;
use llamagen_catalog::arrow::datatypes::{DataType, Field};
use llamagen_catalog::schema::{embedding_fields, image_fields, vq_code_fields};
use llamagen_catalog::stage::map_shards;
use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};

struct Rng(u64);
impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

fn list(item: DataType, n: usize, values: ArrayRef) -> ArrayRef {
    Arc::new(ListArray::new(
        Arc::new(Field::new("item", item, true)),
        OffsetBuffer::from_lengths(vec![1; n]),
        values,
        None,
    ))
}

fn keys(b: &RecordBatch) -> ArrayRef {
    b.column_by_name("key").expect("key").clone()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let root = args
        .get(1)
        .expect("usage: write_amp ROOT [ROWS] [IMAGE_KB] [T5_KB]");
    let rows: usize = args.get(2).map_or(Ok(10_000), |s| s.parse())?;
    let image_kb: usize = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let t5_kb: usize = args.get(4).map_or(Ok(250), |s| s.parse())?;
    anyhow::ensure!(
        !std::path::Path::new(root).exists(),
        "{root} exists; give a new directory"
    );
    let cat = Catalog::open(root, &StorageOptions::default()).await?;
    let ds = cat.samples();
    let unit_rows = 1000;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut written: Vec<(String, u64)> = Vec::new();

    // Ingest: one commit per unit of 1,000 rows.
    let mut ingest_bytes = 0;
    for u in 0..rows.div_ceil(unit_rows) {
        let n = unit_rows.min(rows - u * unit_rows);
        let images = StructArray::new(
            image_fields(),
            vec![
                Arc::new(Int32Array::from(vec![256; n])) as ArrayRef,
                Arc::new(Int32Array::from(vec![256; n])),
                Arc::new(Int32Array::from(vec![256; n])),
                Arc::new(StringArray::from(vec!["jpeg"; n])),
                Arc::new(BinaryArray::from_iter_values(
                    (0..n).map(|_| rng.bytes(image_kb << 10)),
                )),
            ],
            None,
        );
        let batch = RecordBatch::try_from_iter(vec![
            (
                "key",
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("{:09}", u * unit_rows + i)),
                )) as ArrayRef,
            ),
            ("status", Arc::new(StringArray::from(vec!["ok"; n]))),
            (
                "text",
                Arc::new(StringArray::from(vec!["a photo of a cat on a sofa"; n])),
            ),
            (
                "images",
                list(DataType::Struct(image_fields()), n, Arc::new(images)),
            ),
        ])?;
        let mut w = ds.writer(ShardWriterOptions {
            stage: "ingest".into(),
            ..Default::default()
        });
        w.write(&batch).await?;
        let add = w.finish().await?;
        ingest_bytes += add.iter().map(|s| s.total_bytes()).sum::<u64>();
        ds.commit(Transaction {
            operation: "ingest".into(),
            add,
            units: vec![format!("unit-{u}")],
            ..Default::default()
        })
        .await?;
    }
    written.push(("ingest".into(), ingest_bytes));

    let opts = ShardWriterOptions::default;

    // Filters: four scores. Each stage's entry below is the size of the dataset it leaves, which is
    // what that pass wrote (it rewrites every shard).
    map_shards(
        &ds,
        "filter",
        (0, 1),
        opts(),
        |b: RecordBatch| async move {
            let n = b.num_rows();
            Ok(RecordBatch::try_from_iter(vec![
                ("key", keys(&b)),
                (
                    "score_aesthetic",
                    Arc::new(Float32Array::from(vec![6.1f32; n])) as ArrayRef,
                ),
                (
                    "score_clip_similarity",
                    Arc::new(Float32Array::from(vec![0.31f32; n])),
                ),
                (
                    "score_watermark",
                    Arc::new(Float32Array::from(vec![0.1f32; n])),
                ),
                ("score_nsfw", Arc::new(Float32Array::from(vec![0.01f32; n]))),
            ])?)
        },
        |_, _| {},
    )
    .await?;
    written.push(("filter".into(), ds.snapshot().await?.bytes()));

    // Captions.
    map_shards(
        &ds,
        "captions",
        (0, 1),
        opts(),
        |b: RecordBatch| async move {
            let n = b.num_rows();
            Ok(RecordBatch::try_from_iter(vec![
                ("key", keys(&b)),
                (
                    "long_caption",
                    Arc::new(StringArray::from(vec![
                        "A grey cat lies on a blue sofa next to a window with white curtains.";
                        n
                    ])) as ArrayRef,
                ),
                (
                    "short_caption",
                    Arc::new(StringArray::from(vec![
                        "A grey cat lies on a blue sofa.";
                        n
                    ])),
                ),
            ])?)
        },
        |_, _| {},
    )
    .await?;
    written.push(("captions".into(), ds.snapshot().await?.bytes()));

    // T5 features of the long caption.
    let seed = std::sync::atomic::AtomicU64::new(7);
    map_shards(
        &ds,
        "t5",
        (0, 1),
        opts(),
        |b: RecordBatch| {
            let s = seed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                let n = b.num_rows();
                let mut rng = Rng(s.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
                let t5 = StructArray::new(
                    embedding_fields(),
                    vec![
                        Arc::new(Int32Array::from(vec![60; n])) as ArrayRef,
                        Arc::new(Int32Array::from(vec![2048; n])),
                        Arc::new(StringArray::from(vec!["bf16"; n])),
                        Arc::new(BinaryArray::from_iter_values(
                            (0..n).map(|_| rng.bytes(t5_kb << 10)),
                        )),
                    ],
                    None,
                );
                Ok(RecordBatch::try_from_iter(vec![
                    ("key", keys(&b)),
                    ("t5_long", Arc::new(t5) as ArrayRef),
                ])?)
            }
        },
        |_, _| {},
    )
    .await?;
    written.push(("t5".into(), ds.snapshot().await?.bytes()));

    // VQ codes: one 16x16 centre crop.
    map_shards(
        &ds,
        "vq",
        (0, 1),
        opts(),
        |b: RecordBatch| async move {
            let n = b.num_rows();
            let codes = ListArray::new(
                Arc::new(Field::new("item", DataType::Int16, false)),
                OffsetBuffer::from_lengths(vec![256; n]),
                Arc::new(Int16Array::from_iter_values(
                    (0..n * 256).map(|i| (i * 4099 % 16384) as i16),
                )),
                None,
            );
            let vq = StructArray::new(
                vq_code_fields(),
                vec![
                    Arc::new(Int32Array::from(vec![256; n])) as ArrayRef,
                    Arc::new(StringArray::from(vec!["center"; n])),
                    Arc::new(Int32Array::from(vec![256; n])),
                    Arc::new(Int32Array::from(vec![0; n])),
                    Arc::new(Int32Array::from(vec![16; n])),
                    Arc::new(codes),
                ],
                None,
            );
            Ok(RecordBatch::try_from_iter(vec![
                ("key", keys(&b)),
                (
                    "vq_codes",
                    list(DataType::Struct(vq_code_fields()), n, Arc::new(vq)),
                ),
            ])?)
        },
        |_, _| {},
    )
    .await?;
    let final_snapshot = ds.snapshot().await?;
    written.push(("vq".into(), final_snapshot.bytes()));

    // Every file of the dataset's table and of its column-group tables.
    let storage = cat.storage();
    let mut data = 0u64;
    let mut log = 0u64;
    let tables = std::iter::once("samples".to_string()).chain(
        llamagen_catalog::schema::COLUMN_GROUPS
            .iter()
            .map(|(g, _)| llamagen_catalog::columns::table_name("samples", g)),
    );
    for t in tables {
        for (dir, total) in [("data", &mut data), ("_delta_log", &mut log)] {
            *total += storage
                .list(&format!("{t}/{dir}/"))
                .await?
                .iter()
                .map(|o| o.size)
                .sum::<u64>();
        }
    }
    let fin = final_snapshot.bytes();
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "image_kb": image_kb,
            "t5_kb": t5_kb,
            "stage_output_bytes": written.iter().map(|(s, b)| (s.clone(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
            "data_bytes_written": data,
            "log_bytes_written": log,
            "final_dataset_bytes": fin,
            "write_amplification": (data + log) as f64 / fin as f64,
        })
    );
    Ok(())
}
