//! Training images for the VQ tokenizer: the `images` column of a catalog dataset's committed
//! shards (local or `s3://`), or a directory of image files; LlamaGen's `random_crop_arr` and
//! horizontal flip.
//!
//! Invariants enforced here:
//! - Catalog rows are used when their `status` is `ok` (indexing reads only that column); the
//!   largest rendition of the `images` column (by pixel count, then target size) is decoded. A
//!   row with status `ok` but no rendition fails with an error naming its shard and row.
//! - A directory source uses its files with an image extension (jpg, jpeg, png, webp, bmp,
//!   gif, tif, tiff), sorted by name.
//! - The sample stream is a pure function of (source, seed): epoch `e` is drawn with a generator
//!   seeded by `(seed, e)`. A directory's files are permuted as a whole; a catalog's shards are
//!   permuted, grouped into windows of `shuffle_window` shards, and the rows inside each window
//!   permuted (so only a window's shards need to be held decoded). Sample `k` is position
//!   `k % n` of epoch `k / n`. The crop and flip of sample `k` come from a generator seeded by
//!   `(seed, k)`. A resumed run therefore sees exactly the images an uninterrupted one would.
//! - `random_crop_arr(img, S)` (ADM): side `s` uniform in `[ceil(S/max_frac), ceil(S/min_frac)]`
//!   (inclusive), BOX-halve while `min(W, H) ≥ 2s`, BICUBIC-resize so the short side is `s`
//!   (`round(dim·s/min)`), then an S×S window at a uniform offset; then a flip with
//!   probability ½.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use llamagen_catalog::arrow::array::{Array, AsArray, RecordBatch};
use llamagen_catalog::arrow::datatypes::Int32Type;
use llamagen_catalog::schema::col;
use llamagen_catalog::{Catalog, Dataset, ShardEntry};
use llamagen_encode::augment::{Filter, crop, hflip, resize};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::error::{Result, TrainError};
use crate::train::mix_seed;

/// Image extensions a directory source reads.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// Where the training images come from (the `[data]` table of a tokenizer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum ImageSourceConfig {
    /// The `images` column of a catalog dataset.
    Catalog(DataConfig),
    /// Image files in a directory (not recursive).
    Dir { path: PathBuf },
}

/// One training image: a file, or (shard, row) of a catalog snapshot.
#[derive(Debug, Clone)]
enum Item {
    File(PathBuf),
    Row(usize, usize),
}

/// An indexed image source (module invariants).
pub struct ImageSource {
    items: Vec<Item>,
    catalog: Option<CatalogImages>,
    /// Decoded catalog shards, most recently used last.
    cache: VecDeque<(usize, Arc<ShardImages>)>,
    /// Shards per shuffle window (catalog sources).
    window: usize,
    seed: u64,
    order: Option<(u64, Vec<usize>)>,
}

/// The image bytes of a shard's rows (None: no rendition or status not `ok`).
type ShardImages = Vec<Option<Vec<u8>>>;

struct CatalogImages {
    rt: tokio::runtime::Runtime,
    dataset: Dataset,
    shards: Vec<ShardEntry>,
}

impl CatalogImages {
    /// Row indices with status `ok` of a shard.
    fn ok_rows(&self, shard: usize) -> Result<Vec<usize>> {
        let batches = self.rt.block_on(
            self.dataset
                .read_shard(&self.shards[shard], Some(&[col::STATUS][..])),
        )?;
        let mut out = Vec::new();
        let mut base = 0;
        for b in &batches {
            let status = b
                .column_by_name(col::STATUS)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(|| {
                    TrainError::Data(format!(
                        "shard {}: no utf8 status column",
                        self.shards[shard].path
                    ))
                })?;
            for i in 0..b.num_rows() {
                if status.is_valid(i) && status.value(i) == "ok" {
                    out.push(base + i);
                }
            }
            base += b.num_rows();
        }
        Ok(out)
    }

    fn read(&self, shard: usize) -> Result<Vec<Option<Vec<u8>>>> {
        let batches = self.rt.block_on(
            self.dataset
                .read_shard(&self.shards[shard], Some(&[col::STATUS, col::IMAGES][..])),
        )?;
        let mut out = Vec::new();
        for b in &batches {
            out.extend(largest_images(b, &self.shards[shard].path)?);
        }
        Ok(out)
    }
}

/// The largest rendition of each row whose status is `ok` (None otherwise).
fn largest_images(batch: &RecordBatch, shard: &str) -> Result<Vec<Option<Vec<u8>>>> {
    let bad = |m: &str| TrainError::Data(format!("shard {shard}: column images {m}"));
    let status = batch
        .column_by_name(col::STATUS)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| TrainError::Data(format!("shard {shard}: no utf8 status column")))?;
    let list = batch
        .column_by_name(col::IMAGES)
        .ok_or_else(|| bad("is missing"))?
        .as_list_opt::<i32>()
        .ok_or_else(|| bad("is not a list"))?;
    let items = list
        .values()
        .as_struct_opt()
        .ok_or_else(|| bad("items are not structs"))?;
    let field = |n: &str| items.column_by_name(n).ok_or_else(|| bad("lacks a field"));
    let size = field("size")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| bad("size"))?;
    let width = field("width")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| bad("width"))?;
    let height = field("height")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| bad("height"))?;
    let data = field("data")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| bad("data"))?;
    let offsets = list.value_offsets();
    let mut out = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        if list.is_null(i) || status.is_null(i) || status.value(i) != "ok" {
            out.push(None);
            continue;
        }
        let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
        let best = (a..b).filter(|&j| data.is_valid(j)).max_by_key(|&j| {
            (
                width.value(j) as i64 * height.value(j) as i64,
                size.value(j),
            )
        });
        out.push(best.map(|j| data.value(j).to_vec()));
    }
    Ok(out)
}

impl ImageSource {
    /// Indexes the images of `cfg`.
    pub fn open(cfg: &ImageSourceConfig, seed: u64) -> Result<Self> {
        match cfg {
            ImageSourceConfig::Dir { path } => {
                let rd = std::fs::read_dir(path).map_err(|e| TrainError::io(path, e))?;
                let mut files = Vec::new();
                for e in rd {
                    let p = e.map_err(|e| TrainError::io(path, e))?.path();
                    let ext = p
                        .extension()
                        .and_then(|e| e.to_str())
                        .map(|e| e.to_ascii_lowercase());
                    if p.is_file() && ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str())) {
                        files.push(p);
                    }
                }
                files.sort();
                if files.is_empty() {
                    return Err(TrainError::Data(format!(
                        "no image files ({}) in {}",
                        IMAGE_EXTENSIONS.join(", "),
                        path.display()
                    )));
                }
                Ok(Self::with_items(
                    files.into_iter().map(Item::File).collect(),
                    None,
                    seed,
                ))
            }
            ImageSourceConfig::Catalog(dc) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| TrainError::Data(format!("starting the I/O runtime: {e}")))?;
                let (dataset, manifest) = rt.block_on(async {
                    let cat = Catalog::open(&dc.root, &dc.storage_options()).await?;
                    let ds = cat.dataset(&dc.dataset);
                    let m = ds.snapshot().await?;
                    Ok::<_, llamagen_catalog::CatalogError>((ds, m))
                })?;
                let cat = CatalogImages {
                    rt,
                    dataset,
                    shards: manifest.shards,
                };
                if dc.shuffle_window == 0 {
                    return Err(TrainError::InvalidConfig(
                        "data.shuffle_window must be >= 1".into(),
                    ));
                }
                let mut items = Vec::new();
                for s in 0..cat.shards.len() {
                    items.extend(cat.ok_rows(s)?.into_iter().map(|r| Item::Row(s, r)));
                }
                if items.is_empty() {
                    return Err(TrainError::Data(format!(
                        "catalog {} dataset {} (version {}) has no rows with status ok",
                        dc.root, dc.dataset, manifest.version
                    )));
                }
                let mut src = Self::with_items(items, Some(cat), seed);
                src.window = dc.shuffle_window;
                Ok(src)
            }
        }
    }

    fn with_items(items: Vec<Item>, catalog: Option<CatalogImages>, seed: u64) -> Self {
        ImageSource {
            items,
            catalog,
            cache: VecDeque::new(),
            window: 1,
            seed,
            order: None,
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the source is empty (never true for an opened source).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Decodes item `i` (in index order, not shuffled).
    pub fn image(&mut self, i: usize) -> Result<RgbImage> {
        match self.items[i].clone() {
            Item::File(p) => Ok(llamagen_encode::augment::load_rgb(&p)?),
            Item::Row(s, r) => {
                let rows = match self.cache.iter().position(|(c, _)| *c == s) {
                    Some(i) => {
                        let hit = self.cache.remove(i).expect("position is valid");
                        self.cache.push_back(hit);
                        self.cache.back().expect("just pushed").1.clone()
                    }
                    None => {
                        let cat = self.catalog.as_ref().expect("rows come from a catalog");
                        let rows = Arc::new(cat.read(s)?);
                        self.cache.push_back((s, rows.clone()));
                        while self.cache.len() > self.window + 1 {
                            self.cache.pop_front();
                        }
                        rows
                    }
                };
                let shard = &self.catalog.as_ref().expect("catalog").shards[s].path;
                let bytes = rows.get(r).and_then(|b| b.as_ref()).ok_or_else(|| {
                    TrainError::Data(format!(
                        "shard {shard} row {r}: status ok but no image rendition"
                    ))
                })?;
                let img = image::load_from_memory(bytes)
                    .map_err(|e| TrainError::Data(format!("shard {shard} row {r}: {e}")))?;
                Ok(img.to_rgb8())
            }
        }
    }

    /// Index (into [`Self::image`]) of sample `k` of the stream.
    pub fn locate(&mut self, k: u64) -> usize {
        let n = self.items.len() as u64;
        let (epoch, pos) = (k / n, (k % n) as usize);
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, epoch, 0x1A6E]));
            let order = if let Some(cat) = &self.catalog {
                // Items are in shard order: group them, permute shards, then rows per window.
                let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); cat.shards.len()];
                for (i, it) in self.items.iter().enumerate() {
                    if let Item::Row(s, _) = it {
                        by_shard[*s].push(i);
                    }
                }
                let mut shards: Vec<usize> = (0..by_shard.len()).collect();
                shards.shuffle(&mut rng);
                let mut order = Vec::with_capacity(self.items.len());
                for w in shards.chunks(self.window) {
                    let mut rows: Vec<usize> = w
                        .iter()
                        .flat_map(|&s| by_shard[s].iter().copied())
                        .collect();
                    rows.shuffle(&mut rng);
                    order.extend(rows);
                }
                order
            } else {
                let mut order: Vec<usize> = (0..self.items.len()).collect();
                order.shuffle(&mut rng);
                order
            };
            self.order = Some((epoch, order));
        }
        self.order.as_ref().expect("just set").1[pos]
    }

    /// Sample `k`: the image with its random crop and flip (module invariants).
    pub fn sample(&mut self, k: u64, image_size: u32, crop: (f64, f64)) -> Result<RgbImage> {
        let i = self.locate(k);
        let img = self.image(i)?;
        let mut rng = StdRng::seed_from_u64(mix_seed(&[self.seed, k, 0xC809]));
        let out = random_crop_arr(&img, image_size, crop.0, crop.1, &mut rng)?;
        Ok(if rng.random::<f64>() < 0.5 {
            hflip(&out)
        } else {
            out
        })
    }
}

/// ADM's `random_crop_arr` (module invariants).
pub fn random_crop_arr(
    img: &RgbImage,
    image_size: u32,
    min_crop_frac: f64,
    max_crop_frac: f64,
    rng: &mut StdRng,
) -> Result<RgbImage> {
    if !(0.0 < min_crop_frac && min_crop_frac <= max_crop_frac && max_crop_frac <= 1.0) {
        return Err(TrainError::InvalidConfig(format!(
            "crop fractions {min_crop_frac}..{max_crop_frac} must satisfy 0 < min <= max <= 1"
        )));
    }
    let lo = (image_size as f64 / max_crop_frac).ceil() as u32;
    let hi = (image_size as f64 / min_crop_frac).ceil() as u32;
    let side = rng.random_range(lo..=hi);
    let mut cur = img.clone();
    while cur.width().min(cur.height()) >= 2 * side {
        cur = resize(&cur, cur.width() / 2, cur.height() / 2, Filter::Box)?;
    }
    let scale = side as f64 / cur.width().min(cur.height()) as f64;
    let (w, h) = (
        round_half_even(cur.width() as f64 * scale),
        round_half_even(cur.height() as f64 * scale),
    );
    let cur = resize(&cur, w, h, Filter::Bicubic)?;
    if w < image_size || h < image_size {
        return Err(TrainError::Data(format!(
            "image resized to {w}x{h} is smaller than the crop {image_size}"
        )));
    }
    let y = rng.random_range(0..=h - image_size);
    let x = rng.random_range(0..=w - image_size);
    Ok(crop(&cur, x, y, image_size, image_size)?)
}

fn round_half_even(v: f64) -> u32 {
    let r = v.round();
    let r = if (v - v.trunc()).abs() == 0.5 && (r as u64) % 2 == 1 {
        r - 1.0
    } else {
        r
    };
    r.max(1.0) as u32
}
