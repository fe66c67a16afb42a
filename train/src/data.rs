//! Training data from a catalog: the committed shards of a dataset (local or `s3://`), read
//! through the catalog (a Delta table), turned into training batches.
//!
//! Invariants enforced here:
//! - Only the shards of one committed table version are read (the snapshot taken at
//!   [`CatalogLoader::open`]); every shard is checked against its log entry (size, SHA-256) on read.
//! - A row is *usable* when its `status` is `ok` and it has a code grid of the configured image
//!   size (c2i: the ten-crop views, else the centre crop; t2i: the centre crop) with exactly
//!   `grid * grid` codes, and, for c2i, a non-null `label`, and (unless
//!   [`DataConfig::keep_duplicates`]) no `dup_kind`: the rows dedup marked as copies of a kept
//!   row are skipped. Other rows are never trained on.
//!   A t2i row without `t5_long` features is a dummy sample (zero caption, plain causal mask,
//!   `valid = 0`), as in the official `dataset/t2i.py`.
//! - The sample stream of a rank is a pure function of (snapshot, seed, rank, world): epoch `e`
//!   permutes the shards, groups them into windows of `shuffle_window` shards and permutes the
//!   rows inside each window (all with a generator seeded by `(seed, e)`); the epoch order is
//!   padded by wrapping to a multiple of `world` and rank `r` takes positions `r, r + world, ...`.
//!   Sample `k` of a rank is position `k % per_rank` of epoch `k / per_rank`, so a resumed run
//!   reads exactly what an uninterrupted one would.
//! - Per-sample choices (which of the ten crops; the short caption with probability
//!   `short_caption_prob`) come from a generator seeded by `(seed, epoch, shard, row)`.
//! - Captions are left-padded to `cls_token_num` tokens (longer features are truncated to their
//!   first `cls_token_num` tokens), padding rows zero, `emb_mask` 1 on the real tokens; the
//!   attention mask is [`crate::gpt::caption_attention_mask`] at length
//!   `cls_token_num + block_size - 1` (the official `M[:, :, :-1, :-1]`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use llamagen_catalog::arrow::array::{Array, AsArray, RecordBatch, StructArray};
use llamagen_catalog::arrow::datatypes::Int32Type;
use llamagen_catalog::schema::col;
use llamagen_catalog::storage::S3Config;
use llamagen_catalog::{Catalog, Dataset, ShardEntry, StorageOptions};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::ModelType;
use crate::error::{Result, TrainError};
use crate::gpt::{Condition, caption_attention_mask};
use crate::train::{Batch, mix_seed};

/// Where the training data lives and how it is shuffled (the `[data]` table of a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Catalog root: a local directory or `s3://bucket/prefix`.
    pub root: String,
    /// Dataset inside the root. Default `samples`.
    pub dataset: String,
    /// Endpoint of an S3-compatible server (default: AWS, or `AWS_ENDPOINT_URL`).
    pub s3_endpoint: Option<String>,
    /// S3 region (default: `AWS_REGION`, then us-east-1).
    pub s3_region: Option<String>,
    /// Force path-style (true) or virtual-host (false) addressing.
    pub s3_path_style: Option<bool>,
    /// Shards whose rows are shuffled together (and kept decoded in memory). Default 4.
    pub shuffle_window: usize,
    /// t2i: probability of training on the short caption's features (when a row has them).
    /// Default 0.3 (official `--short-t5-feat-path`).
    pub short_caption_prob: f64,
    /// Also train on rows dedup marked as duplicates (`dup_kind` set). Default false.
    pub keep_duplicates: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            root: String::new(),
            dataset: "samples".into(),
            s3_endpoint: None,
            s3_region: None,
            s3_path_style: None,
            shuffle_window: 4,
            short_caption_prob: 0.3,
            keep_duplicates: false,
        }
    }
}

impl DataConfig {
    pub(crate) fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            s3: S3Config {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                ..Default::default()
            },
        }
    }
}

/// What the model needs from a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// c2i (codes + label) or t2i (codes + caption features).
    pub model_type: ModelType,
    /// Image size whose code grids are read (the `image_size` field of `vq_codes`).
    pub image_size: u32,
    /// Side of the code grid (`image_size / 16` for VQ-16).
    pub grid: usize,
    /// t2i: caption positions `T` (the model's `cls_token_num`).
    pub caption_tokens: usize,
    /// t2i: width of the caption features (the model's `caption_dim`).
    pub caption_dim: usize,
}

/// One training sample, before batching.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Image tokens in raster order, `grid * grid` of them.
    pub tokens: Vec<u32>,
    /// c2i class label.
    pub label: Option<u32>,
    /// t2i caption features `(n, caption_dim)` row-major, `n <= caption_tokens` real tokens
    /// (None: a dummy sample).
    pub caption: Option<(usize, Vec<f32>)>,
    /// Whether the sample counts in the loss.
    pub valid: bool,
}

/// A caption feature matrix as stored (valid tokens only).
#[derive(Debug, Clone)]
struct Embedding {
    tokens: usize,
    dim: usize,
    dtype: DType,
    data: Vec<u8>,
}

impl Embedding {
    fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(Tensor::from_raw_buffer(
            &self.data,
            self.dtype,
            &[self.tokens * self.dim],
            &Device::Cpu,
        )?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
    }
}

/// The decoded training columns of one usable row.
#[derive(Debug, Clone)]
struct Row {
    /// Code grids to choose from (ten crops, or the centre crop).
    views: Vec<Vec<u16>>,
    label: Option<u32>,
    t5_long: Option<Embedding>,
    t5_short: Option<Embedding>,
}

fn data_err(shard: &str, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Data(format!("{shard}: {reason}"))
}

/// The code grids of `row` that match `spec` (see the module invariants), ordered by view.
fn code_views(
    list: &llamagen_catalog::arrow::array::ListArray,
    row: usize,
    spec: &SampleSpec,
) -> Vec<Vec<u16>> {
    if list.is_null(row) {
        return Vec::new();
    }
    let entries = list.value(row);
    let st: &StructArray = entries.as_struct();
    let (Some(size), Some(kind), Some(view), Some(grid), Some(codes)) = (
        st.column_by_name("image_size"),
        st.column_by_name("kind"),
        st.column_by_name("view"),
        st.column_by_name("grid"),
        st.column_by_name("codes"),
    ) else {
        return Vec::new();
    };
    let (size, kind, view, grid, codes) = (
        size.as_primitive::<Int32Type>(),
        kind.as_string::<i32>(),
        view.as_primitive::<Int32Type>(),
        grid.as_primitive::<Int32Type>(),
        codes.as_list::<i32>(),
    );
    let n = spec.grid * spec.grid;
    let pick = |want: &str| -> Vec<Vec<u16>> {
        let mut v: Vec<(i32, Vec<u16>)> = (0..st.len())
            .filter(|&j| {
                size.value(j) == spec.image_size as i32
                    && kind.value(j) == want
                    && grid.value(j) as usize == spec.grid
                    && !codes.is_null(j)
            })
            .map(|j| {
                let c = codes.value(j);
                (
                    view.value(j),
                    llamagen_catalog::schema::codes_of(c.as_ref()).unwrap_or_default(),
                )
            })
            .filter(|(_, c)| c.len() == n)
            .collect();
        v.sort_by_key(|(view, _)| *view);
        v.into_iter().map(|(_, c)| c).collect()
    };
    match spec.model_type {
        ModelType::C2i => {
            let ten = pick("tencrop");
            if ten.is_empty() { pick("center") } else { ten }
        }
        ModelType::T2i => pick("center"),
    }
}

fn embedding(col: Option<&Arc<dyn Array>>, row: usize, shard: &str) -> Result<Option<Embedding>> {
    let Some(col) = col else { return Ok(None) };
    let st = col.as_struct();
    if st.is_null(row) {
        return Ok(None);
    }
    let get = |name: &str| {
        st.column_by_name(name)
            .ok_or_else(|| data_err(shard, format!("embedding struct has no field {name}")))
    };
    let tokens = get("tokens")?.as_primitive::<Int32Type>().value(row);
    let dim = get("dim")?.as_primitive::<Int32Type>().value(row);
    let dtype = match get("dtype")?.as_string::<i32>().value(row) {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => {
            return Err(data_err(
                shard,
                format!("unknown embedding dtype {other:?}"),
            ));
        }
    };
    let data = get("data")?.as_binary::<i32>().value(row).to_vec();
    let (tokens, dim) = (tokens.max(0) as usize, dim.max(0) as usize);
    if data.len() != tokens * dim * dtype.size_in_bytes() {
        return Err(data_err(
            shard,
            format!(
                "row {row}: embedding of {tokens}x{dim} {dtype:?} has {} bytes",
                data.len()
            ),
        ));
    }
    Ok(Some(Embedding {
        tokens,
        dim,
        dtype,
        data,
    }))
}

/// Reads the usable rows of one shard (see the module invariants) as `(row index, Row)`.
/// With `light`, only what decides usability is decoded (no caption features).
fn decode_rows(
    batches: &[RecordBatch],
    spec: &SampleSpec,
    shard: &str,
    light: bool,
    keep_duplicates: bool,
) -> Result<Vec<(u32, Option<Row>)>> {
    let mut out = Vec::new();
    let mut base = 0usize;
    for b in batches {
        let status = b
            .column_by_name(col::STATUS)
            .ok_or_else(|| data_err(shard, "no status column"))?
            .as_string::<i32>();
        let codes = b
            .column_by_name(col::VQ_CODES)
            .ok_or_else(|| data_err(shard, "no vq_codes column"))?
            .as_list::<i32>();
        let label = b
            .column_by_name(col::LABEL)
            .map(|c| c.as_primitive::<Int32Type>());
        let dup = b.column_by_name(col::DUP_KIND).filter(|_| !keep_duplicates);
        for r in 0..b.num_rows() {
            if status.is_null(r) || status.value(r) != "ok" {
                continue;
            }
            if dup.is_some_and(|d| d.is_valid(r)) {
                continue;
            }
            let lab = match (spec.model_type, label) {
                (ModelType::C2i, Some(l)) if !l.is_null(r) && l.value(r) >= 0 => {
                    Some(l.value(r) as u32)
                }
                (ModelType::C2i, _) => continue,
                (ModelType::T2i, _) => None,
            };
            let views = code_views(codes, r, spec);
            if views.is_empty() {
                continue;
            }
            let row = if light {
                None
            } else {
                Some(Row {
                    views,
                    label: lab,
                    t5_long: embedding(b.column_by_name(col::T5_LONG), r, shard)?,
                    t5_short: embedding(b.column_by_name(col::T5_SHORT), r, shard)?,
                })
            };
            out.push(((base + r) as u32, row));
        }
        base += b.num_rows();
    }
    Ok(out)
}

/// Reads training samples from the committed shards of a catalog dataset (module invariants).
pub struct CatalogLoader {
    rt: tokio::runtime::Runtime,
    dataset: Dataset,
    version: u64,
    shards: Vec<ShardEntry>,
    /// Usable row indices of each shard.
    usable: Vec<Vec<u32>>,
    spec: SampleSpec,
    cfg: DataConfig,
    seed: u64,
    rank: usize,
    world: usize,
    /// Decoded shards, most recently used last.
    cache: VecDeque<(usize, Arc<HashMap<u32, Row>>)>,
    /// Epoch order `(shard, row)` of the epoch last asked for, padded to a multiple of `world`.
    order: Option<(u64, Vec<(u32, u32)>)>,
}

impl CatalogLoader {
    /// Opens the latest committed version of `cfg.dataset` under `cfg.root` and indexes the
    /// usable rows of every shard (reading only `status`, `label` and `vq_codes`).
    pub fn open(
        cfg: &DataConfig,
        spec: SampleSpec,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Result<Self> {
        Self::open_version(cfg, spec, seed, rank, world, None)
    }

    /// [`CatalogLoader::open`] at table version `version` (None: the latest). The ranks of a
    /// data-parallel job open the version rank 0 found, so a commit landing while they start
    /// cannot give them different snapshots.
    pub fn open_version(
        cfg: &DataConfig,
        spec: SampleSpec,
        seed: u64,
        rank: usize,
        world: usize,
        version: Option<u64>,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(TrainError::InvalidConfig(format!(
                "rank {rank} of world size {world}"
            )));
        }
        if cfg.shuffle_window == 0 {
            return Err(TrainError::InvalidConfig(
                "data.shuffle_window must be >= 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.short_caption_prob) {
            return Err(TrainError::InvalidConfig(format!(
                "data.short_caption_prob {} is not a probability",
                cfg.short_caption_prob
            )));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TrainError::Data(format!("starting the I/O runtime: {e}")))?;
        let (dataset, manifest) = rt.block_on(async {
            let cat = Catalog::open(&cfg.root, &cfg.storage_options()).await?;
            let ds = cat.dataset(&cfg.dataset);
            let m = match version {
                None => ds.snapshot().await?,
                Some(v) => ds.snapshot_at(v).await?,
            };
            Ok::<_, llamagen_catalog::CatalogError>((ds, m))
        })?;
        if manifest.shards.is_empty() {
            return Err(TrainError::Data(format!(
                "catalog {} has no committed shards in dataset {}",
                cfg.root, cfg.dataset
            )));
        }
        let mut loader = CatalogLoader {
            rt,
            dataset,
            version: manifest.version,
            shards: manifest.shards,
            usable: Vec::new(),
            spec,
            cfg: cfg.clone(),
            seed,
            rank,
            world,
            cache: VecDeque::new(),
            order: None,
        };
        let mut usable = Vec::with_capacity(loader.shards.len());
        let light: &[&str] = match spec.model_type {
            ModelType::C2i => &[col::STATUS, col::DUP_KIND, col::LABEL, col::VQ_CODES],
            ModelType::T2i => &[col::STATUS, col::DUP_KIND, col::VQ_CODES],
        };
        for i in 0..loader.shards.len() {
            let (name, batches) = loader.read(i, light)?;
            let rows = decode_rows(&batches, &spec, &name, true, cfg.keep_duplicates)?;
            usable.push(rows.into_iter().map(|(r, _)| r).collect());
        }
        loader.usable = usable;
        if loader.num_samples() == 0 {
            return Err(TrainError::Data(format!(
                "catalog {} (version {}) has no usable {:?} rows at image size {} (status ok, {}x{} codes{})",
                cfg.root,
                loader.version,
                spec.model_type,
                spec.image_size,
                spec.grid,
                spec.grid,
                if spec.model_type == ModelType::C2i {
                    ", label"
                } else {
                    ""
                }
            )));
        }
        Ok(loader)
    }

    fn read(&self, shard: usize, cols: &[&str]) -> Result<(String, Vec<RecordBatch>)> {
        let entry = &self.shards[shard];
        let name = format!(
            "{}/{}",
            self.cfg.root.trim_end_matches('/'),
            self.dataset.shard_path(entry)
        );
        let batches = self
            .rt
            .block_on(self.dataset.read_shard(entry, Some(cols)))?;
        Ok((name, batches))
    }

    /// The table version being read.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Usable rows in the snapshot.
    pub fn num_samples(&self) -> usize {
        self.usable.iter().map(Vec::len).sum()
    }

    /// Samples each rank sees per epoch.
    pub fn per_rank(&self) -> usize {
        self.num_samples().div_ceil(self.world)
    }

    fn epoch_order(&mut self, epoch: u64) -> &[(u32, u32)] {
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, epoch, 0xE90C]));
            let mut shards: Vec<usize> = (0..self.shards.len()).collect();
            shards.shuffle(&mut rng);
            let mut order = Vec::with_capacity(self.per_rank() * self.world);
            for window in shards.chunks(self.cfg.shuffle_window) {
                let mut rows: Vec<(u32, u32)> = window
                    .iter()
                    .flat_map(|&s| self.usable[s].iter().map(move |&r| (s as u32, r)))
                    .collect();
                rows.shuffle(&mut rng);
                order.extend(rows);
            }
            let n = order.len();
            let total = self.per_rank() * self.world;
            for i in 0..total - n {
                order.push(order[i % n]);
            }
            self.order = Some((epoch, order));
        }
        &self.order.as_ref().expect("just set").1
    }

    /// `(epoch, shard, row)` of sample `k` of this rank's stream.
    pub fn locate(&mut self, k: u64) -> (u64, u32, u32) {
        let per = self.per_rank() as u64;
        let (epoch, i) = (k / per, (k % per) as usize);
        let pos = i * self.world + self.rank;
        let (s, r) = self.epoch_order(epoch)[pos];
        (epoch, s, r)
    }

    fn shard_rows(&mut self, shard: usize) -> Result<Arc<HashMap<u32, Row>>> {
        if let Some(i) = self.cache.iter().position(|(s, _)| *s == shard) {
            let hit = self.cache.remove(i).expect("position is valid");
            self.cache.push_back(hit.clone());
            return Ok(hit.1);
        }
        let cols: &[&str] = match self.spec.model_type {
            ModelType::C2i => &[col::STATUS, col::DUP_KIND, col::LABEL, col::VQ_CODES],
            ModelType::T2i => &[
                col::STATUS,
                col::DUP_KIND,
                col::VQ_CODES,
                col::T5_LONG,
                col::T5_SHORT,
            ],
        };
        let (name, batches) = self.read(shard, cols)?;
        let rows: HashMap<u32, Row> =
            decode_rows(&batches, &self.spec, &name, false, self.cfg.keep_duplicates)?
                .into_iter()
                .filter_map(|(r, row)| row.map(|row| (r, row)))
                .collect();
        let rows = Arc::new(rows);
        self.cache.push_back((shard, rows.clone()));
        while self.cache.len() > self.cfg.shuffle_window + 1 {
            self.cache.pop_front();
        }
        Ok(rows)
    }

    /// Sample `k` of this rank's stream (module invariants).
    pub fn sample(&mut self, k: u64) -> Result<Sample> {
        let (epoch, shard, row) = self.locate(k);
        let rows = self.shard_rows(shard as usize)?;
        let r = rows.get(&row).ok_or_else(|| {
            TrainError::Data(format!(
                "shard {} row {row} changed between indexing and reading",
                self.shards[shard as usize].path
            ))
        })?;
        let mut rng =
            StdRng::seed_from_u64(mix_seed(&[self.seed, epoch, shard as u64, row as u64]));
        let view = &r.views[rng.random_range(0..r.views.len())];
        let tokens = view.iter().map(|&c| c as u32).collect();
        match self.spec.model_type {
            ModelType::C2i => Ok(Sample {
                tokens,
                label: r.label,
                caption: None,
                valid: true,
            }),
            ModelType::T2i => {
                let short =
                    r.t5_short.is_some() && rng.random::<f64>() < self.cfg.short_caption_prob;
                let emb = if short { &r.t5_short } else { &r.t5_long };
                let caption = match emb {
                    Some(e) => {
                        if e.dim != self.spec.caption_dim {
                            return Err(TrainError::Data(format!(
                                "shard {} row {row}: caption features of width {}, the model expects caption_dim {}",
                                self.shards[shard as usize].path, e.dim, self.spec.caption_dim
                            )));
                        }
                        let n = e.tokens.min(self.spec.caption_tokens);
                        let mut v = e.to_f32()?;
                        v.truncate(n * e.dim);
                        Some((n, v))
                    }
                    None => None,
                };
                Ok(Sample {
                    tokens,
                    label: None,
                    valid: caption.is_some(),
                    caption,
                })
            }
        }
    }

    /// Samples `start..start + n` of this rank's stream as a batch on `device`.
    pub fn batch(&mut self, start: u64, n: usize, device: &Device) -> Result<Batch> {
        let samples = (0..n as u64)
            .map(|i| self.sample(start + i))
            .collect::<Result<Vec<_>>>()?;
        make_batch(&samples, &self.spec, device)
    }
}

/// Stacks samples into a [`Batch`] (module invariants for captions and masks).
pub fn make_batch(samples: &[Sample], spec: &SampleSpec, device: &Device) -> Result<Batch> {
    let b = samples.len();
    let n = spec.grid * spec.grid;
    let mut toks = Vec::with_capacity(b * n);
    for s in samples {
        if s.tokens.len() != n {
            return Err(TrainError::InvalidInput(format!(
                "sample with {} tokens, expected {n}",
                s.tokens.len()
            )));
        }
        toks.extend_from_slice(&s.tokens);
    }
    let tokens = Tensor::from_vec(toks, (b, n), device)?;
    match spec.model_type {
        ModelType::C2i => {
            let labels = samples
                .iter()
                .map(|s| {
                    s.label
                        .ok_or_else(|| TrainError::InvalidInput("c2i sample without label".into()))
                })
                .collect::<Result<Vec<u32>>>()?;
            Ok(Batch {
                cond: Condition::Class(Tensor::from_vec(labels, b, device)?),
                tokens,
                mask: None,
                valid: None,
            })
        }
        ModelType::T2i => {
            let (t, c) = (spec.caption_tokens, spec.caption_dim);
            let captions: Vec<Option<&(usize, Vec<f32>)>> =
                samples.iter().map(|s| s.caption.as_ref()).collect();
            let (cap, emb_mask) = left_pad_captions(&captions, t, c)?;
            let valid: Vec<f32> = samples
                .iter()
                .map(|s| {
                    if s.valid && s.caption.is_some() {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            let emb_mask = Tensor::from_vec(emb_mask, (b, t), &Device::Cpu)?;
            let mask = caption_attention_mask(&emb_mask, t + n - 1)?.to_device(device)?;
            Ok(Batch {
                cond: Condition::Caption(Tensor::from_vec(cap, (b, t, c), device)?),
                tokens,
                mask: Some(mask),
                valid: Some(Tensor::from_vec(valid, b, device)?),
            })
        }
    }
}

/// Left-pads caption features to `t` tokens of width `c` (module invariants): returns the
/// captions `(B*t*c)` and `emb_mask` `(B*t)`. A None caption is a dummy: zero features, mask all
/// ones (so its attention mask is plainly causal). Features longer than `t` tokens keep their
/// first `t`.
pub fn left_pad_captions(
    captions: &[Option<&(usize, Vec<f32>)>],
    t: usize,
    c: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let b = captions.len();
    let mut cap = vec![0f32; b * t * c];
    let mut emb_mask = vec![0f32; b * t];
    for (i, caption) in captions.iter().enumerate() {
        match caption {
            Some((len, feats)) => {
                if feats.len() < len * c {
                    return Err(TrainError::InvalidInput(format!(
                        "caption of {len} tokens has {} values, expected {}",
                        feats.len(),
                        len * c
                    )));
                }
                let len = (*len).min(t);
                let dst = i * t * c + (t - len) * c;
                cap[dst..dst + len * c].copy_from_slice(&feats[..len * c]);
                emb_mask[i * t + t - len..(i + 1) * t].fill(1.0);
            }
            None => emb_mask[i * t..(i + 1) * t].fill(1.0),
        }
    }
    Ok((cap, emb_mask))
}

/// Caption features `(tokens, values)` of the rows with the given keys (`t5_short` with
/// `short`, else `t5_long`), in the order of `keys`, from the latest committed version of the
/// dataset. A key that is missing or has no features is an error naming it.
pub fn caption_features(
    cfg: &DataConfig,
    keys: &[String],
    short: bool,
) -> Result<Vec<(usize, usize, Vec<f32>)>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::Data(format!("starting the I/O runtime: {e}")))?;
    let column = if short { col::T5_SHORT } else { col::T5_LONG };
    let found = rt.block_on(async {
        let cat = Catalog::open(&cfg.root, &cfg.storage_options()).await?;
        let ds = cat.dataset(&cfg.dataset);
        let m = ds.snapshot().await?;
        let mut found: HashMap<String, Option<Embedding>> = HashMap::new();
        for entry in &m.shards {
            let name = ds.shard_path(entry);
            for b in ds.read_shard(entry, Some(&[col::KEY, column])).await? {
                let key_col = b
                    .column_by_name(col::KEY)
                    .expect("projected")
                    .as_string::<i32>();
                for r in 0..b.num_rows() {
                    let k = key_col.value(r);
                    if keys.iter().any(|w| w == k) {
                        let e = embedding(b.column_by_name(column), r, &name).map_err(|e| {
                            llamagen_catalog::CatalogError::InvalidArgument(e.to_string())
                        })?;
                        found.insert(k.to_string(), e);
                    }
                }
            }
        }
        Ok::<_, llamagen_catalog::CatalogError>(found)
    })?;
    keys.iter()
        .map(|k| match found.get(k) {
            Some(Some(e)) => Ok((e.tokens, e.dim, e.to_f32()?)),
            Some(None) => Err(TrainError::Data(format!(
                "row {k:?} has no {column} features"
            ))),
            None => Err(TrainError::Data(format!(
                "no row with key {k:?} in {} (dataset {})",
                cfg.root, cfg.dataset
            ))),
        })
        .collect()
}
