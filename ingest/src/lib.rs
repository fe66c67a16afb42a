//! Ingest: URL lists to image shards.
//!
//! A run reads each URL list (Parquet, CSV or JSONL; local or `s3://`) in file order, cuts it into
//! work units of [`IngestConfig::unit_rows`] rows, and for each unit: applies the metadata
//! pre-filter, downloads, decodes, resizes and encodes the images, writes every row (also the
//! dropped and failed ones, with their reasons) through the catalog's shard writer, and commits the
//! unit's shards with the unit id `ingest:<file name>:<first row>`.
//!
//! Resume rules:
//! - A unit is committed whole or not at all; a re-run skips the units already committed, so a
//!   run killed at any point and re-run yields the samples of an uninterrupted run: same keys,
//!   none missing, none twice.
//! - What a unit contains depends only on its input rows and the configuration: repeated URLs
//!   are downloaded once *within a unit* (later rows get `duplicate_of` and are dropped with
//!   reason `duplicate_url`), and repeated content within a unit is flagged the same way
//!   (`duplicate_content`; the lowest source row is kept, see `process_unit`). Deduplication across
//!   units is a query away (`GROUP BY url`).
//!
//! Scheduling: downloads run [`FetchConfig::concurrency`] at a time and are handled in the order
//! they *finish*, so a URL that takes the whole deadline delays only itself, never the rows behind
//! it; and [`IngestConfig::units_in_flight`] units run at once, so the last slow downloads of a unit
//! do not hold back the next one. Units still commit whole, each on its own. Rows are keyed, so their order inside a shard carries no meaning; each written batch
//! is sorted by source row. Memory stays bounded: at most twice `concurrency` rows are in flight and
//! [`WRITE_ROWS`] finished rows wait for the writer.
//! - Small images follow LlamaGen's t2i dataset, which makes an image whose shorter side is below
//!   `image_size` an invalid sample: no crop is stored for a size the original's shorter side does
//!   not reach, the row records `below_image_size_<size>` in `reject_reasons`, and a row with no
//!   size left is `dropped`. [`IngestConfig::upscale_small`] upscales instead.
//! - `partition = (index, count)` keeps only the units whose ordinal is ≡ index (mod count), so
//!   N workers on N machines produce, together, the dataset one worker would.

pub mod decode;
pub mod fetch;
pub mod webdataset;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use image::RgbImage;
use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Array, Int32Builder, Int64Array, ListBuilder,
    RecordBatch, StringArray, StringBuilder, StructBuilder, TimestampMicrosecondArray, UInt32Array,
};
use llamagen_catalog::arrow::compute::{concat_batches, take_record_batch};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::schema::{col, image_fields};
use llamagen_catalog::source::{
    Source, SourceOptions, source_name, strip_url_column, strip_url_credentials,
};
use llamagen_catalog::{
    Catalog, CatalogError, ShardWriterOptions, StageCounters, StorageOptions, Transaction,
};
use sha2::{Digest, Sha256};

pub use decode::{DecodeFailure, DecodeLimits, Decoded};
pub use fetch::{FetchConfig, FetchFailure, Fetched, Fetcher};

/// Everything that can stop an ingest run (per-sample problems never do: they are recorded).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("Arrow error: {0}")]
    Arrow(#[from] llamagen_catalog::arrow::error::ArrowError),
    #[error("writing webdataset tars: {0}")]
    Webdataset(String),
}

pub type Result<T, E = IngestError> = std::result::Result<T, E>;

/// Encoding of stored images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Baseline JPEG; `full_chroma` keeps chroma at full resolution (4:4:4) instead of the usual
    /// 4:2:0 of PIL, OpenCV and img2dataset.
    Jpeg {
        quality: u8,
        full_chroma: bool,
    },
    Png,
    Webp,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Jpeg { .. } => "jpeg",
            OutputFormat::Png => "png",
            OutputFormat::Webp => "webp",
        }
    }
}

/// Rules applied to the metadata before anything is downloaded; a row failing any is dropped
/// (never fetched) with every failed rule recorded.
#[derive(Debug, Clone, Default)]
pub struct PreFilter {
    /// Minimum `WIDTH` from the metadata (rows without it pass).
    pub min_width: Option<i64>,
    pub min_height: Option<i64>,
    /// Maximum `pwatermark` (rows without it pass).
    pub max_pwatermark: Option<f64>,
    /// Minimum `similarity` (CLIP similarity computed by LAION).
    pub min_similarity: Option<f64>,
}

/// Ingest settings.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Target sizes of the stored centre crops (default 256; LlamaGen's stages use 256 and 512).
    pub sizes: Vec<u32>,
    /// Encoding of stored images (default JPEG quality 95).
    pub format: OutputFormat,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (default true).
    pub reduced_decode: bool,
    /// Upscale images whose shorter side is below a target size (default false: as LlamaGen's
    /// t2i dataset, which makes such an image an invalid sample, no crop of that size is stored
    /// and the row records `below_image_size_<size>`; a row with no size left is dropped).
    pub upscale_small: bool,
    /// Rows per work unit (commit); default 10,000.
    pub unit_rows: usize,
    /// Units processed at once (default 2): a unit's slowest downloads overlap the next unit's.
    pub units_in_flight: usize,
    /// Work on the units whose ordinal ≡ index (mod count) only; default (0, 1).
    pub partition: (usize, usize),
    /// Threads for decoding and resizing (default: available cores).
    pub cpu_workers: usize,
    pub fetch: FetchConfig,
    pub decode: DecodeLimits,
    pub prefilter: PreFilter,
    pub source: SourceOptions,
    pub storage: StorageOptions,
    pub shard: ShardWriterOptions,
    /// Dataset written (default "samples").
    pub dataset: String,
    pub run_id: Option<String>,
    /// Also write img2dataset's webdataset layout (tar shards) here: a local directory or
    /// `s3://bucket/prefix` (see [`webdataset`]). Default: none.
    pub webdataset: Option<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            sizes: vec![256],
            format: OutputFormat::Jpeg {
                quality: 95,
                full_chroma: false,
            },
            reduced_decode: true,
            upscale_small: false,
            unit_rows: 10_000,
            units_in_flight: 2,
            partition: (0, 1),
            cpu_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            fetch: FetchConfig::default(),
            decode: DecodeLimits::default(),
            prefilter: PreFilter::default(),
            source: SourceOptions::default(),
            storage: StorageOptions::default(),
            shard: ShardWriterOptions {
                stage: "ingest".into(),
                ..Default::default()
            },
            dataset: "samples".into(),
            run_id: None,
            webdataset: None,
        }
    }
}

/// One processed row's outcome.
#[derive(Debug, Clone, Default)]
struct Outcome {
    status: &'static str,
    error_kind: Option<String>,
    error: Option<String>,
    reasons: Vec<String>,
    http_status: Option<i32>,
    downloaded_at: Option<i64>,
    sha256: Option<String>,
    bytes: Option<i64>,
    duplicate_of: Option<String>,
    format: Option<&'static str>,
    orig: Option<(i32, i32)>,
    /// (size, width, height, encoded bytes)
    images: Vec<(i32, i32, i32, Bytes)>,
}

impl Outcome {
    fn failed(kind: &str, msg: String, http: Option<u16>) -> Outcome {
        Outcome {
            status: "failed",
            error_kind: Some(kind.to_string()),
            error: Some(msg),
            http_status: http.map(i32::from),
            ..Default::default()
        }
    }
    fn dropped(reasons: Vec<String>) -> Outcome {
        Outcome {
            status: "dropped",
            reasons,
            ..Default::default()
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IngestReport {
    pub counters: StageCounters,
    pub units_committed: u64,
    pub units_skipped: u64,
    pub seconds: f64,
}

/// Progress callbacks: rows processed and their status, for a progress bar.
pub trait Progress: Send + Sync {
    fn rows_done(&self, n: u64, ok: u64);
    fn message(&self, msg: &str);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {
    fn rows_done(&self, _: u64, _: u64) {}
    fn message(&self, _: &str) {}
}

/// Runs ingest over `inputs` into `catalog`.
pub async fn run(
    catalog: &Catalog,
    inputs: &[String],
    cfg: &IngestConfig,
    progress: &dyn Progress,
) -> Result<IngestReport> {
    if cfg.sizes.is_empty() || cfg.sizes.contains(&0) {
        return Err(IngestError::Config("image sizes must be positive".into()));
    }
    if cfg.unit_rows == 0 {
        return Err(IngestError::Config("unit_rows must be positive".into()));
    }
    if cfg.partition.1 == 0 || cfg.partition.0 >= cfg.partition.1 {
        return Err(IngestError::Config(format!(
            "partition index {} is not below count {}",
            cfg.partition.0, cfg.partition.1
        )));
    }
    let mut names = std::collections::BTreeMap::new();
    for i in inputs {
        if let Some(prev) = names.insert(source_name(i), i) {
            return Err(IngestError::Config(format!(
                "{prev} and {i} have the same file name; sample keys derive from it, so rename one"
            )));
        }
    }
    let started = Instant::now();
    let ds = catalog.dataset(&cfg.dataset);
    let wds = match &cfg.webdataset {
        Some(loc) => Some(llamagen_catalog::storage::open(loc, &cfg.storage).await?),
        None => None,
    };
    let ctx = UnitContext {
        wds,
        fetcher: Fetcher::new(cfg.fetch.clone())?,
        cpu: Arc::new(tokio::sync::Semaphore::new(cfg.cpu_workers.max(1))),
        cfg: Arc::new(cfg.clone()),
    };
    let mut report = IngestReport {
        counters: StageCounters::new("ingest"),
        ..Default::default()
    };
    let mut running = futures::stream::FuturesUnordered::new();
    for input in inputs {
        let name = source_name(input);
        let done = ds.snapshot().await?.units;
        let mut source = Source::open(
            input,
            &SourceOptions {
                batch_rows: cfg.unit_rows.clamp(1, 65_536),
                // The fetcher needs them when allowed to send them; `with_outcomes` strips them.
                keep_url_credentials: cfg.fetch.allow_url_credentials,
                ..cfg.source.clone()
            },
            &cfg.storage,
        )
        .await?;
        progress.message(&name);
        let mut buf: Vec<RecordBatch> = Vec::new();
        let mut buf_rows = 0usize;
        let mut first_row = 0u64;
        loop {
            let next = source.next_samples().await.transpose()?;
            let end = next.is_none();
            if let Some(b) = next {
                buf_rows += b.num_rows();
                buf.push(b);
            }
            while buf_rows >= cfg.unit_rows || (end && buf_rows > 0) {
                let all = concat_batches(&buf[0].schema(), &buf)?;
                let take = buf_rows.min(cfg.unit_rows);
                let unit = all.slice(0, take);
                buf = if buf_rows > take {
                    vec![all.slice(take, buf_rows - take)]
                } else {
                    Vec::new()
                };
                buf_rows -= take;
                let unit_id = format!("ingest:{name}:{first_row}");
                first_row += take as u64;
                if !in_partition(&unit_id, cfg.partition) {
                    continue;
                }
                if done.contains(&unit_id) {
                    report.units_skipped += 1;
                    progress.rows_done(take as u64, 0);
                    continue;
                }
                // A unit's last downloads may wait out the deadline; the next units start
                // meanwhile (all share the fetcher's limits), so the wait is not paid per unit.
                while running.len() >= cfg.units_in_flight.max(1) {
                    let done = running.next().await.expect("a unit is running");
                    settle(done, &mut report)?;
                }
                running.push(process_unit(&ds, &ctx, unit, unit_id, progress));
            }
            if end {
                break;
            }
        }
    }
    while let Some(done) = running.next().await {
        settle(done, &mut report)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Adds a finished unit's outcome to the report; a unit another worker committed first counts as
/// skipped.
fn settle(done: Result<StageCounters>, report: &mut IngestReport) -> Result<()> {
    match done {
        Ok(c) => {
            report.counters.merge(&c);
            report.units_committed += 1;
            Ok(())
        }
        Err(IngestError::Catalog(CatalogError::UnitAlreadyCommitted { .. })) => {
            report.units_skipped += 1;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether a unit belongs to worker `index` of `count` (by hash of its id, so the split does not
/// depend on the order of the inputs).
pub fn in_partition(unit_id: &str, share: (usize, usize)) -> bool {
    llamagen_catalog::worker::in_share(unit_id, share)
}

struct UnitContext {
    /// Where the webdataset tars go, if anywhere.
    wds: Option<Arc<dyn llamagen_catalog::Storage>>,
    fetcher: Fetcher,
    cpu: Arc<tokio::sync::Semaphore>,
    cfg: Arc<IngestConfig>,
}

/// What to do with one row of a unit.
enum Plan {
    Done(Outcome),
    Fetch(String),
}

/// Rows per batch handed to the shard writer.
const WRITE_ROWS: usize = 256;

async fn process_unit(
    ds: &llamagen_catalog::Dataset,
    ctx: &UnitContext,
    unit: RecordBatch,
    unit_id: String,
    progress: &dyn Progress,
) -> Result<StageCounters> {
    let unit_id = unit_id.as_str();
    let cfg = &ctx.cfg;
    let n = unit.num_rows();
    let keys = unit
        .column_by_name(col::KEY)
        .expect("key")
        .as_string::<i32>()
        .clone();
    let urls = unit
        .column_by_name(col::URL)
        .expect("url")
        .as_string::<i32>()
        .clone();
    let status = unit
        .column_by_name(col::STATUS)
        .expect("status")
        .as_string::<i32>()
        .clone();
    let kinds = unit
        .column_by_name(col::ERROR_KIND)
        .map(|a| a.as_string::<i32>().clone());
    let errors = unit
        .column_by_name(col::ERROR)
        .map(|a| a.as_string::<i32>().clone());
    let int = |name: &str| {
        unit.column_by_name(name).map(|a| {
            a.as_primitive::<llamagen_catalog::arrow::datatypes::Int64Type>()
                .clone()
        })
    };
    let float = |name: &str| {
        unit.column_by_name(name).map(|a| {
            a.as_primitive::<llamagen_catalog::arrow::datatypes::Float64Type>()
                .clone()
        })
    };
    let (widths, heights) = (int(col::WIDTH), int(col::HEIGHT));
    let (pwm, sim) = (float(col::PWATERMARK), float(col::SIMILARITY));
    let pf = &cfg.prefilter;

    let mut first_by_url: HashMap<&str, usize> = HashMap::new();
    let mut plans = Vec::with_capacity(n);
    for i in 0..n {
        if status.value(i) == "failed" {
            plans.push(Plan::Done(Outcome::failed(
                kinds
                    .as_ref()
                    .filter(|k| k.is_valid(i))
                    .map_or("invalid_url", |k| k.value(i)),
                errors
                    .as_ref()
                    .filter(|e| e.is_valid(i))
                    .map_or(String::new(), |e| e.value(i).to_string()),
                None,
            )));
            continue;
        }
        let mut reasons = Vec::new();
        let get_i =
            |a: &Option<Int64Array>| a.as_ref().filter(|a| a.is_valid(i)).map(|a| a.value(i));
        let get_f = |a: &Option<llamagen_catalog::arrow::array::Float64Array>| {
            a.as_ref().filter(|a| a.is_valid(i)).map(|a| a.value(i))
        };
        if let (Some(min), Some(w)) = (pf.min_width, get_i(&widths)) {
            if w < min {
                reasons.push(format!("width<{min}"));
            }
        }
        if let (Some(min), Some(h)) = (pf.min_height, get_i(&heights)) {
            if h < min {
                reasons.push(format!("height<{min}"));
            }
        }
        if let (Some(max), Some(p)) = (pf.max_pwatermark, get_f(&pwm)) {
            if p > max {
                reasons.push(format!("pwatermark>{max}"));
            }
        }
        if let (Some(min), Some(s)) = (pf.min_similarity, get_f(&sim)) {
            if s < min {
                reasons.push(format!("similarity<{min}"));
            }
        }
        if !reasons.is_empty() {
            plans.push(Plan::Done(Outcome::dropped(reasons)));
            continue;
        }
        let url = urls.value(i).trim();
        if let Some(&first) = first_by_url.get(url) {
            let mut o = Outcome::dropped(vec!["duplicate_url".into()]);
            o.duplicate_of = Some(keys.value(first).to_string());
            plans.push(Plan::Done(o));
            continue;
        }
        first_by_url.insert(url, i);
        plans.push(Plan::Fetch(url.to_string()));
    }

    // `buffer_unordered`, not `buffered`: outcomes come back as downloads finish (see the module
    // docs), so a dead host's timeout does not hold back the finished rows queued behind it.
    let window = (cfg.fetch.concurrency * 2).max(8);
    let mut outcomes = futures::stream::iter(plans.into_iter().enumerate())
        .map(|(i, plan)| async move {
            match plan {
                Plan::Done(o) => (i, o),
                Plan::Fetch(url) => (i, fetch_and_process(ctx, url).await),
            }
        })
        .buffer_unordered(window);

    let mut writer = ds.writer(cfg.shard.clone());
    let mut tars = match &ctx.wds {
        Some(st) => Some(webdataset::UnitTars::create(
            st.clone(),
            unit_id,
            &cfg.sizes,
        )?),
        None => None,
    };
    let captions = unit
        .column_by_name(col::TEXT)
        .map(|a| a.as_string::<i32>().clone());
    let sources = unit
        .column_by_name(col::SOURCE)
        .map(|a| a.as_string::<i32>().clone());
    let source_rows = int(col::SOURCE_ROW);
    let mut counters = StageCounters::new("ingest");
    let mut first_by_sha: HashMap<String, usize> = HashMap::new();
    let mut chunk: Vec<(usize, Outcome)> = Vec::with_capacity(WRITE_ROWS);
    let mut finished = 0usize;
    // Content duplicates keep the lowest source row among the rows not yet written (always so
    // when the copies finish within `WRITE_ROWS` rows of each other); a copy finishing after its
    // twin was written is the one flagged.
    let flag = |o: &mut Outcome, of: usize| {
        o.status = "dropped";
        o.reasons = vec!["duplicate_content".into()];
        o.duplicate_of = Some(keys.value(of).to_string());
        o.images.clear();
    };
    let mut pending: HashMap<usize, usize> = HashMap::new(); // source row -> index in `chunk`
    while let Some((row, mut o)) = outcomes.next().await {
        if let (Some(sha), "ok") = (o.sha256.clone(), o.status) {
            match first_by_sha.get(&sha).copied() {
                None => {
                    first_by_sha.insert(sha, row);
                }
                Some(first) => match pending.get(&first) {
                    Some(&at) if row < first => {
                        flag(&mut chunk[at].1, row);
                        // Copies already pointing at the demoted row now point at this one.
                        let demoted = keys.value(first);
                        for (_, other) in chunk.iter_mut() {
                            if other.duplicate_of.as_deref() == Some(demoted)
                                && other.reasons.iter().any(|r| r == "duplicate_content")
                            {
                                other.duplicate_of = Some(keys.value(row).to_string());
                            }
                        }
                        first_by_sha.insert(sha, row);
                    }
                    _ => flag(&mut o, first),
                },
            }
        }
        pending.insert(row, chunk.len());
        chunk.push((row, o));
        finished += 1;
        if chunk.len() < WRITE_ROWS && finished < n {
            continue;
        }
        pending.clear();
        chunk.sort_unstable_by_key(|(i, _)| *i);
        for (row, o) in &chunk {
            let row = *row;
            match o.status {
                "failed" => counters.error_kind(o.error_kind.as_deref().unwrap_or("unknown")),
                "dropped" => {
                    for r in &o.reasons {
                        counters.drop_reason(r);
                    }
                }
                _ => {
                    // An ok row without some sizes (`below_image_size_<size>`).
                    for r in &o.reasons {
                        counters.add_extra(&format!("ok, {r}"), 1);
                    }
                }
            }
            counters.add_extra("bytes downloaded", o.bytes.unwrap_or(0) as u64);
            if let (Some(t), "ok") = (tars.as_mut(), o.status) {
                let caption = captions
                    .as_ref()
                    .filter(|c| c.is_valid(row))
                    .map_or("", |c| c.value(row));
                let json = serde_json::json!({
                    "key": keys.value(row),
                    "url": strip_url_credentials(urls.value(row)),
                    "caption": caption,
                    "status": "success",
                    "original_width": o.orig.map(|x| x.0),
                    "original_height": o.orig.map(|x| x.1),
                    "sha256": o.sha256,
                    "source": sources.as_ref().filter(|c| c.is_valid(row)).map(|c| c.value(row)),
                    "source_row": source_rows.as_ref().filter(|c| c.is_valid(row)).map(|c| c.value(row)),
                });
                let images: Vec<(u32, &[u8])> = o
                    .images
                    .iter()
                    .map(|(s, _, _, b)| (*s as u32, b.as_ref()))
                    .collect();
                let mtime = o.downloaded_at.map_or(0, |t| (t / 1_000_000).max(0) as u64);
                t.add(keys.value(row), &images, caption, &json, mtime)?;
            }
        }
        let ok = chunk.iter().filter(|(_, o)| o.status == "ok").count() as u64;
        let rows = UInt32Array::from_iter_values(chunk.iter().map(|(i, _)| *i as u32));
        let outs: Vec<Outcome> = chunk.drain(..).map(|(_, o)| o).collect();
        let batch = with_outcomes(&take_record_batch(&unit, &rows)?, &outs)?;
        writer.write(&batch).await?;
        progress.rows_done(outs.len() as u64, ok);
        counters.add_extra("ok", ok);
    }
    counters.received += n as u64;
    counters.written += n as u64;
    let shards = writer.finish().await?;
    counters.add_extra("shards", shards.len() as u64);
    if let Some(t) = tars.take() {
        // Stored before the commit (see the webdataset module's invariants).
        let stats = serde_json::json!({
            "unit": unit_id,
            "count": counters.received,
            "successes": counters.extra.get("ok").copied().unwrap_or(0),
            "failed_by_kind": counters.errors,
            "dropped_by_reason": counters.dropped,
        });
        let stored = t.finish(&stats).await?;
        counters.add_extra("webdataset tars", stored.len() as u64);
    }
    ds.commit(Transaction {
        operation: "ingest".into(),
        run_id: cfg.run_id.clone(),
        add: shards,
        remove: vec![],
        units: vec![unit_id.to_string()],
    })
    .await?;
    Ok(counters)
}

async fn fetch_and_process(ctx: &UnitContext, url: String) -> Outcome {
    let fetched = match ctx.fetcher.fetch(&url).await {
        Ok(f) => f,
        Err(f) if f.is_refusal => {
            let mut o = Outcome::dropped(vec![f.kind.to_string()]);
            o.error = Some(f.message);
            o.http_status = f.http_status.map(i32::from);
            return o;
        }
        Err(f) => return Outcome::failed(f.kind, f.message, f.http_status),
    };
    let downloaded_at = chrono::Utc::now().timestamp_micros();
    let _permit = ctx.cpu.acquire().await.expect("semaphore never closed");
    let cfg = ctx.cfg.clone();
    let body = fetched.body.clone();
    let result = tokio::task::spawn_blocking(move || process_image(&body, &cfg)).await;
    let mut o = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::failed(e.kind(), e.to_string(), None),
        Err(panic) => Outcome::failed("decode_panic", format!("decoder panicked: {panic}"), None),
    };
    o.http_status = Some(fetched.http_status as i32);
    o.downloaded_at = Some(downloaded_at);
    o.bytes = Some(fetched.body.len() as i64);
    o.sha256 = Some(hex::encode(Sha256::digest(&fetched.body)));
    o
}

/// Decodes, crops to every target size (upscaling an image smaller than a size; `ingest` itself
/// follows [`IngestConfig::upscale_small`]) and encodes one downloaded image.
pub fn process_image_bytes(
    data: &[u8],
    cfg: &IngestConfig,
) -> Result<(Decoded, Vec<(u32, Bytes)>), DecodeFailure> {
    let max_size = *cfg.sizes.iter().max().expect("sizes checked");
    let decoded = decode::decode_rgb(data, &cfg.decode, cfg.reduced_decode.then_some(max_size))?;
    let out = crop_and_encode(&decoded, &cfg.sizes, cfg.format)?;
    Ok((decoded, out))
}

/// Centre crops of `decoded` at `sizes`, encoded.
fn crop_and_encode(
    decoded: &Decoded,
    sizes: &[u32],
    format: OutputFormat,
) -> Result<Vec<(u32, Bytes)>, DecodeFailure> {
    // LlamaGen's center_crop_arr, byte-exact with PIL (see llamagen_prep::pixels).
    let crops = llamagen_prep::pixels::center_crop_arr_multi(&decoded.rgb, sizes)
        .map_err(|e| DecodeFailure::Corrupt(format!("resizing to {sizes:?}: {e}")))?;
    sizes
        .iter()
        .zip(&crops)
        .map(|(&s, crop)| Ok((s, encode_image(crop, format)?)))
        .collect()
}

/// One downloaded image's outcome: its crops at the sizes its shorter side reaches (all sizes
/// with [`IngestConfig::upscale_small`]), `below_image_size_<size>` for the others, and
/// `dropped` when no size is left.
fn process_image(data: &[u8], cfg: &IngestConfig) -> Result<Outcome, DecodeFailure> {
    let max_size = *cfg.sizes.iter().max().expect("sizes checked");
    let decoded = decode::decode_rgb(data, &cfg.decode, cfg.reduced_decode.then_some(max_size))?;
    let short = decoded.orig_width.min(decoded.orig_height);
    let (keep, small): (Vec<u32>, Vec<u32>) = cfg
        .sizes
        .iter()
        .partition(|&&s| cfg.upscale_small || short >= s);
    let images = crop_and_encode(&decoded, &keep, cfg.format)?;
    Ok(Outcome {
        status: if keep.is_empty() { "dropped" } else { "ok" },
        reasons: small
            .iter()
            .map(|s| format!("below_image_size_{s}"))
            .collect(),
        format: Some(decoded.format),
        orig: Some((decoded.orig_width as i32, decoded.orig_height as i32)),
        images: images
            .into_iter()
            .map(|(s, b)| (s as i32, s as i32, s as i32, b))
            .collect(),
        ..Default::default()
    })
}

/// Encodes an RGB image.
pub fn encode_image(img: &RgbImage, format: OutputFormat) -> Result<Bytes, DecodeFailure> {
    let mut buf = Vec::with_capacity((img.width() * img.height()) as usize / 2);
    let r = match format {
        OutputFormat::Jpeg {
            quality,
            full_chroma,
        } => {
            // Baseline JPEG with the standard tables scaled by quality (libjpeg's scaling).
            let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality.clamp(1, 100));
            enc.set_sampling_factor(if full_chroma {
                jpeg_encoder::SamplingFactor::R_4_4_4
            } else {
                jpeg_encoder::SamplingFactor::R_4_2_0
            });
            let (w, h) = (u16::try_from(img.width()), u16::try_from(img.height()));
            let (Ok(w), Ok(h)) = (w, h) else {
                return Err(DecodeFailure::Corrupt(format!(
                    "encoding jpeg: {}x{} exceeds 65535",
                    img.width(),
                    img.height()
                )));
            };
            return enc
                .encode(img.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
                .map(|()| Bytes::from(buf))
                .map_err(|e| DecodeFailure::Corrupt(format!("encoding jpeg: {e}")));
        }
        OutputFormat::Png => img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut buf)),
        OutputFormat::Webp => {
            img.write_with_encoder(image::codecs::webp::WebPEncoder::new_lossless(&mut buf))
        }
    };
    r.map_err(|e| DecodeFailure::Corrupt(format!("encoding {}: {e}", format.name())))?;
    Ok(Bytes::from(buf))
}

/// The unit's source rows with the outcome columns set.
fn with_outcomes(rows: &RecordBatch, outs: &[Outcome]) -> Result<RecordBatch> {
    let n = outs.len();
    let mut images = ListBuilder::new(StructBuilder::from_fields(image_fields(), n)).with_field(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
    );
    let mut reasons = ListBuilder::new(StringBuilder::new());
    for o in outs {
        for (size, w, h, data) in &o.images {
            let sb = images.values();
            sb.field_builder::<Int32Builder>(0)
                .expect("size")
                .append_value(*size);
            sb.field_builder::<Int32Builder>(1)
                .expect("width")
                .append_value(*w);
            sb.field_builder::<Int32Builder>(2)
                .expect("height")
                .append_value(*h);
            sb.field_builder::<StringBuilder>(3)
                .expect("format")
                .append_value(format_of(data));
            sb.field_builder::<BinaryBuilder>(4)
                .expect("data")
                .append_value(data);
            sb.append(true);
        }
        images.append(!o.images.is_empty());
        for r in &o.reasons {
            reasons.values().append_value(r);
        }
        reasons.append(!o.reasons.is_empty());
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    let replaced = [
        col::STATUS,
        col::ERROR_KIND,
        col::ERROR,
        col::REJECT_REASONS,
        col::HTTP_STATUS,
        col::DOWNLOADED_AT,
        col::CONTENT_SHA256,
        col::CONTENT_BYTES,
        col::DUPLICATE_OF,
        col::DUP_KIND,
        col::ORIG_FORMAT,
        col::ORIG_WIDTH,
        col::ORIG_HEIGHT,
        col::IMAGES,
    ];
    for (f, c) in rows.schema().fields().iter().zip(rows.columns()) {
        if f.name() == col::URL {
            // Credentials reach the fetcher at most, never storage.
            fields.push(f.as_ref().clone());
            cols.push(Arc::new(strip_url_column(c.as_string::<i32>())));
        } else if !replaced.contains(&f.name().as_str()) {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
        }
    }
    let mut push = |name: &str, a: ArrayRef| {
        fields.push(Field::new(name, a.data_type().clone(), true));
        cols.push(a);
    };
    push(
        col::STATUS,
        Arc::new(StringArray::from_iter_values(outs.iter().map(|o| o.status))),
    );
    push(
        col::ERROR_KIND,
        Arc::new(StringArray::from_iter(
            outs.iter().map(|o| o.error_kind.as_deref()),
        )),
    );
    push(
        col::ERROR,
        Arc::new(StringArray::from_iter(
            outs.iter().map(|o| o.error.as_deref()),
        )),
    );
    push(col::REJECT_REASONS, Arc::new(reasons.finish()));
    push(
        col::HTTP_STATUS,
        Arc::new(Int32Array::from_iter(outs.iter().map(|o| o.http_status))),
    );
    push(
        col::DOWNLOADED_AT,
        Arc::new(
            TimestampMicrosecondArray::from_iter(outs.iter().map(|o| o.downloaded_at))
                .with_timezone("UTC"),
        ),
    );
    push(
        col::CONTENT_SHA256,
        Arc::new(StringArray::from_iter(
            outs.iter().map(|o| o.sha256.as_deref()),
        )),
    );
    push(
        col::CONTENT_BYTES,
        Arc::new(Int64Array::from_iter(outs.iter().map(|o| o.bytes))),
    );
    push(
        col::DUPLICATE_OF,
        Arc::new(StringArray::from_iter(
            outs.iter().map(|o| o.duplicate_of.as_deref()),
        )),
    );
    push(
        col::DUP_KIND,
        Arc::new(StringArray::from_iter(outs.iter().map(|o| {
            o.duplicate_of.as_ref()?;
            o.reasons.iter().find_map(|r| r.strip_prefix("duplicate_"))
        }))),
    );
    push(
        col::ORIG_FORMAT,
        Arc::new(StringArray::from_iter(outs.iter().map(|o| o.format))),
    );
    push(
        col::ORIG_WIDTH,
        Arc::new(Int32Array::from_iter(
            outs.iter().map(|o| o.orig.map(|x| x.0)),
        )),
    );
    push(
        col::ORIG_HEIGHT,
        Arc::new(Int32Array::from_iter(
            outs.iter().map(|o| o.orig.map(|x| x.1)),
        )),
    );
    push(col::IMAGES, Arc::new(images.finish()));
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

pub(crate) fn format_of(data: &[u8]) -> &'static str {
    match data {
        [0xff, 0xd8, ..] => "jpeg",
        [0x89, b'P', b'N', b'G', ..] => "png",
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => "webp",
        _ => "unknown",
    }
}
