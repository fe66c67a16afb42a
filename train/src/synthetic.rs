//! Synthetic training catalogs: random code grids, labels and caption features written through
//! the catalog's shard writer and commit protocol, for tests and for trying the example configs
//! (`cargo run -p llamagen-train --example synthetic_catalog`).

use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    ArrayRef, BinaryArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray,
};
use llamagen_catalog::arrow::buffer::{NullBuffer, OffsetBuffer};
use llamagen_catalog::arrow::datatypes::{DataType, Field};
use llamagen_catalog::schema::{col, embedding_fields, vq_code_fields};
use llamagen_catalog::{Catalog, ShardWriterOptions, StorageOptions, Transaction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};
use crate::train::mix_seed;

/// What to write.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Shards to write (each its own commit).
    pub shards: usize,
    /// Rows per shard.
    pub rows_per_shard: usize,
    /// Code grids are written for each of these image sizes.
    pub image_sizes: Vec<u32>,
    /// Pixels per code (16 for VQ-16): the grid of image size `s` is `s / downsample`.
    pub downsample: u32,
    /// Codes are drawn from `0..vocab_size`.
    pub vocab_size: u16,
    /// With `Some(n)`: labels `0..n` and ten-crop grids (c2i); with None: centre-crop grids and
    /// caption features (t2i).
    pub num_classes: Option<u32>,
    /// Width of the caption features.
    pub caption_dim: usize,
    /// Longest caption (in tokens) written.
    pub max_caption_tokens: usize,
    /// Every `failed_every`-th row is a `failed` row without codes (0: none).
    pub failed_every: usize,
    /// t2i: every `no_caption_every`-th row has codes but no `t5_long` (0: none).
    pub no_caption_every: usize,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            shards: 2,
            rows_per_shard: 16,
            image_sizes: vec![256],
            downsample: 16,
            vocab_size: 64,
            num_classes: Some(10),
            caption_dim: 32,
            max_caption_tokens: 20,
            failed_every: 0,
            no_caption_every: 0,
            seed: 0,
        }
    }
}

fn embeddings(rows: &[Option<(usize, Vec<f32>)>], dim: usize) -> StructArray {
    let tokens: Vec<i32> = rows
        .iter()
        .map(|r| r.as_ref().map_or(0, |(t, _)| *t as i32))
        .collect();
    let data: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| {
            r.as_ref().map_or(Vec::new(), |(_, v)| {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            })
        })
        .collect();
    let n = rows.len();
    StructArray::new(
        embedding_fields(),
        vec![
            Arc::new(Int32Array::from(tokens)) as ArrayRef,
            Arc::new(Int32Array::from(vec![dim as i32; n])),
            Arc::new(StringArray::from(vec!["f32"; n])),
            Arc::new(BinaryArray::from_iter_values(data.iter())),
        ],
        Some(NullBuffer::from(
            rows.iter().map(Option::is_some).collect::<Vec<bool>>(),
        )),
    )
}

/// The rows of shard `s` as a record batch.
fn shard_batch(spec: &SyntheticSpec, s: usize) -> Result<RecordBatch> {
    let n = spec.rows_per_shard;
    let mut rng = StdRng::seed_from_u64(mix_seed(&[spec.seed, s as u64, 0x5E7]));
    let mut keys = Vec::new();
    let mut status = Vec::new();
    let mut labels = Vec::new();
    // vq_codes: per row a list of entries
    let (mut e_size, mut e_kind, mut e_crop, mut e_view, mut e_grid) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut codes: Vec<u16> = Vec::new();
    let mut code_lens = Vec::new();
    let mut entries_per_row = Vec::new();
    let mut long = Vec::new();
    let mut short = Vec::new();
    for r in 0..n {
        let i = s * n + r;
        keys.push(format!("synthetic-{s:04}-{r:06}"));
        let failed = spec.failed_every > 0 && i % spec.failed_every == spec.failed_every - 1;
        status.push(if failed { "failed" } else { "ok" });
        labels.push(spec.num_classes.map(|c| (i as u32 % c) as i32));
        let mut entries = 0;
        if !failed {
            for &size in &spec.image_sizes {
                let grid = (size / spec.downsample) as usize;
                let (kind, views, crop) = match spec.num_classes {
                    Some(_) => ("tencrop", 10, (size as f64 * 1.1) as i32),
                    None => ("center", 1, size as i32),
                };
                for v in 0..views {
                    e_size.push(size as i32);
                    e_kind.push(kind);
                    e_crop.push(crop);
                    e_view.push(v);
                    e_grid.push(grid as i32);
                    for _ in 0..grid * grid {
                        codes.push(rng.random_range(0..spec.vocab_size));
                    }
                    code_lens.push(grid * grid);
                    entries += 1;
                }
            }
        }
        entries_per_row.push(entries);
        let caption = |rng: &mut StdRng, max: usize| {
            let t = rng.random_range(1..=max.max(1));
            let v: Vec<f32> = (0..t * spec.caption_dim)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            (t, v)
        };
        let no_caption =
            spec.no_caption_every > 0 && i % spec.no_caption_every == spec.no_caption_every - 1;
        if spec.num_classes.is_none() && !failed && !no_caption {
            long.push(Some(caption(&mut rng, spec.max_caption_tokens)));
            short.push(Some(caption(&mut rng, spec.max_caption_tokens.div_ceil(2))));
        } else {
            long.push(None);
            short.push(None);
        }
    }
    let entries = StructArray::new(
        vq_code_fields(),
        vec![
            Arc::new(Int32Array::from(e_size)) as ArrayRef,
            Arc::new(StringArray::from(e_kind)),
            Arc::new(Int32Array::from(e_crop)),
            Arc::new(Int32Array::from(e_view)),
            Arc::new(Int32Array::from(e_grid)),
            Arc::new(ListArray::new(
                Arc::new(Field::new("item", DataType::Int16, false)),
                OffsetBuffer::from_lengths(code_lens),
                Arc::new(llamagen_catalog::schema::codes_array(&codes)?),
                None,
            )),
        ],
        None,
    );
    let has_codes: Vec<bool> = entries_per_row.iter().map(|&e| e > 0).collect();
    let vq = ListArray::new(
        Arc::new(Field::new("item", DataType::Struct(vq_code_fields()), true)),
        OffsetBuffer::from_lengths(entries_per_row),
        Arc::new(entries),
        Some(NullBuffer::from(has_codes)),
    );
    let mut cols: Vec<(&str, ArrayRef)> = vec![
        (col::KEY, Arc::new(StringArray::from(keys))),
        (col::STATUS, Arc::new(StringArray::from(status))),
        (col::VQ_CODES, Arc::new(vq)),
    ];
    if spec.num_classes.is_some() {
        cols.push((col::LABEL, Arc::new(Int32Array::from(labels))));
    } else {
        cols.push((col::T5_LONG, Arc::new(embeddings(&long, spec.caption_dim))));
        cols.push((
            col::T5_SHORT,
            Arc::new(embeddings(&short, spec.caption_dim)),
        ));
    }
    RecordBatch::try_from_iter(cols).map_err(|e| TrainError::Data(e.to_string()))
}

/// Writes `spec.shards` shards of synthetic rows into the `samples` dataset at `root` (local
/// path), one commit per shard. Returns the committed table version.
pub fn write_synthetic_catalog(root: &str, spec: &SyntheticSpec) -> Result<u64> {
    write_synthetic_catalog_with(root, &StorageOptions::default(), spec)
}

/// [`write_synthetic_catalog`] to any root (`s3://…` with `options`).
pub fn write_synthetic_catalog_with(
    root: &str,
    options: &StorageOptions,
    spec: &SyntheticSpec,
) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::Data(format!("starting the I/O runtime: {e}")))?;
    rt.block_on(async {
        let cat = Catalog::open(root, options).await?;
        let ds = cat.samples();
        let mut version = 0;
        for s in 0..spec.shards {
            let batch = shard_batch(spec, s)?;
            let mut w = ds.writer(ShardWriterOptions {
                stage: "synthetic".into(),
                ..Default::default()
            });
            w.write(&batch).await?;
            let add = w.finish().await?;
            version = ds
                .commit(Transaction {
                    operation: "synthetic".into(),
                    add,
                    ..Default::default()
                })
                .await?
                .version;
        }
        Ok(version)
    })
}
