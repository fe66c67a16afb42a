//! Parquet shards: bounded-size, zstd-compressed files of sample rows.
//!
//! Shard layout invariants:
//! - A shard holds rows of exactly the sample schema (see [`crate::schema`]) and carries
//!   `llamagen.schema_version` in its Parquet key-value metadata.
//! - A shard is at most about [`ShardWriterOptions::target_bytes`] (checked after each row group)
//!   and at most [`ShardWriterOptions::max_rows`] rows; row groups are bounded by bytes as well as
//!   rows, so writing image shards needs bounded memory.
//! - A shard is written to a local scratch file while its SHA-256 and size are computed, then
//!   stored under a name no other writer can choose (`data/part-<uuid v7>.parquet`). Writing a
//!   shard never makes it visible: only a commit that adds it does (see [`crate::dataset`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use bytes::Bytes;
use chrono::Utc;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use sha2::{Digest, Sha256};

use crate::columns;
use crate::dataset::{DATA_DIR, ShardEntry};
use crate::error::{CatalogError, Result};
use crate::schema::{self, SCHEMA_VERSION, SCHEMA_VERSION_KEY, group_schema, sample_schema};
use crate::storage::Storage;

/// How shards are cut and encoded.
#[derive(Debug, Clone)]
pub struct ShardWriterOptions {
    /// Roll over to a new shard once a shard reaches this many bytes (default 256 MiB).
    pub target_bytes: u64,
    /// At most this many rows per shard (default 1,000,000).
    pub max_rows: usize,
    /// Flush a row group once its encoded size reaches this (default 64 MiB).
    pub row_group_bytes: usize,
    /// At most this many rows per row group (default 1,048,576).
    pub row_group_rows: usize,
    /// zstd level (default 3).
    pub zstd_level: i32,
    /// The stage that writes these shards, recorded in the table log (e.g. "ingest").
    pub stage: String,
    /// Stages whose columns the rows carry, recorded in the table log (default: `[stage]`
    /// is added by [`crate::stage::map_shards`]; writers of fresh rows leave it empty or set it).
    pub applied: Vec<String>,
    /// Stage passes commit their rewrites in groups of this many shards (default 64, or
    /// `LLAMAGEN_COMMIT_SHARDS`; see [`crate::stage`]).
    pub commit_shards: usize,
    /// ... or once the oldest uncommitted rewrite is this old (default 30 s, or
    /// `LLAMAGEN_COMMIT_SECS`).
    pub commit_interval: std::time::Duration,
}

impl Default for ShardWriterOptions {
    fn default() -> Self {
        ShardWriterOptions {
            target_bytes: 256 << 20,
            max_rows: 1_000_000,
            row_group_bytes: 64 << 20,
            row_group_rows: 1 << 20,
            zstd_level: 3,
            stage: "unknown".into(),
            applied: Vec::new(),
            commit_shards: env_or("LLAMAGEN_COMMIT_SHARDS", 64).max(1) as usize,
            commit_interval: std::time::Duration::from_secs(env_or("LLAMAGEN_COMMIT_SECS", 30)),
        }
    }
}

/// A whole number from the environment, or `default` when unset or not a number.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Writes sample batches into shards under a dataset's `data/` directory. The shards it returns
/// are stored but not committed: pass them to [`crate::dataset::Dataset::commit`].
pub struct ShardWriter {
    storage: Arc<dyn Storage>,
    dataset_dir: String,
    opts: ShardWriterOptions,
    open: Option<OpenShard>,
    done: Vec<ShardEntry>,
}

struct OpenShard {
    base: OpenFile,
    /// One column file per column group the shard's rows carry (see [`crate::columns`]).
    groups: Vec<(&'static str, OpenFile)>,
    rows: usize,
}

/// A Parquet file being written to local scratch space.
struct OpenFile {
    local: PathBuf,
    writer: ArrowWriter<HashingFile>,
}

impl OpenFile {
    fn create(dir: &std::path::Path, schema: SchemaRef, opts: &ShardWriterOptions) -> Result<Self> {
        let local = dir.join(format!("shard-{}.parquet.tmp", uuid::Uuid::now_v7()));
        let file = std::fs::File::create(&local).map_err(|e| CatalogError::io(&local, e))?;
        let sink = HashingFile {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let writer = ArrowWriter::try_new(sink, schema, Some(writer_properties(opts)))
            .map_err(|e| parquet_err(&local, e))?;
        Ok(OpenFile { local, writer })
    }

    fn write(&mut self, batch: &RecordBatch, row_group_bytes: usize) -> Result<()> {
        self.writer
            .write(batch)
            .map_err(|e| parquet_err(&self.local, e))?;
        if self.writer.in_progress_size() >= row_group_bytes {
            self.writer
                .flush()
                .map_err(|e| parquet_err(&self.local, e))?;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.writer.bytes_written() as u64 + self.writer.in_progress_size() as u64
    }

    /// Closes the file and stores it at `full` (a storage path); returns its SHA-256 and size.
    async fn store(self, storage: &dyn Storage, full: &str) -> Result<(String, u64)> {
        let local = self.local.clone();
        let result = async {
            let mut sink = self
                .writer
                .into_inner()
                .map_err(|e| parquet_err(&local, e))?;
            sink.flush().map_err(|e| CatalogError::io(&local, e))?;
            sink.file
                .get_ref()
                .sync_all()
                .map_err(|e| CatalogError::io(&local, e))?;
            let sha256 = hex::encode(sink.hasher.finalize());
            storage.put_file(full, &local).await?;
            Ok((sha256, sink.bytes))
        }
        .await;
        let _ = std::fs::remove_file(&local);
        result
    }
}

/// A file writer that hashes and counts what passes through it.
struct HashingFile {
    file: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    bytes: u64,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Parquet writer properties for sample shards.
pub fn writer_properties(opts: &ShardWriterOptions) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(opts.zstd_level).unwrap_or_default(),
        ))
        .set_max_row_group_row_count(Some(opts.row_group_rows))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_key_value_metadata(Some(vec![
            KeyValue::new(SCHEMA_VERSION_KEY.to_string(), SCHEMA_VERSION.to_string()),
            KeyValue::new(
                "llamagen.writer".to_string(),
                format!("llamagen {}", env!("CARGO_PKG_VERSION")),
            ),
        ]))
        .build()
}

impl ShardWriter {
    pub fn new(storage: Arc<dyn Storage>, dataset_dir: &str, opts: ShardWriterOptions) -> Self {
        ShardWriter {
            storage,
            dataset_dir: dataset_dir.to_string(),
            opts,
            open: None,
            done: Vec::new(),
        }
    }

    /// Rows buffered or written into the shard currently open.
    pub fn open_rows(&self) -> usize {
        self.open.as_ref().map_or(0, |o| o.rows)
    }

    /// Appends a batch holding any subset of the sample columns (see [`schema::conform`]). The
    /// column groups of the batch's wide columns go to column files (see [`crate::columns`]); a
    /// batch with other groups than the open shard's starts a new shard.
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let groups = columns::groups_in(&batch.schema());
        let batch = schema::conform(batch)?;
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.groups.iter().map(|g| g.0).ne(groups.iter().copied()))
        {
            self.close_shard().await?;
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.open.is_none() {
                self.open = Some(self.open_shard(&groups)?);
            }
            let open = self.open.as_mut().expect("just opened");
            let room = self.opts.max_rows.saturating_sub(open.rows).max(1);
            let n = room.min(batch.num_rows() - offset);
            let part = batch.slice(offset, n);
            open.base
                .write(&columns::base_part(&part)?, self.opts.row_group_bytes)?;
            for (g, file) in &mut open.groups {
                file.write(&columns::group_part(&part, g)?, self.opts.row_group_bytes)?;
            }
            open.rows += n;
            offset += n;
            let size = open.base.size() + open.groups.iter().map(|g| g.1.size()).sum::<u64>();
            if open.rows >= self.opts.max_rows || size >= self.opts.target_bytes {
                self.close_shard().await?;
            }
        }
        Ok(())
    }

    /// Closes the open shard (if any) and returns every shard written, stored but uncommitted.
    pub async fn finish(mut self) -> Result<Vec<ShardEntry>> {
        self.close_shard().await?;
        Ok(std::mem::take(&mut self.done))
    }

    fn open_shard(&self, groups: &[&'static str]) -> Result<OpenShard> {
        let dir = self.storage.scratch_dir();
        std::fs::create_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
        Ok(OpenShard {
            base: OpenFile::create(&dir, sample_schema(), &self.opts)?,
            groups: groups
                .iter()
                .map(|g| Ok((*g, OpenFile::create(&dir, group_schema(g), &self.opts)?)))
                .collect::<Result<_>>()?,
            rows: 0,
        })
    }

    async fn close_shard(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let discard = |open: OpenShard| {
            let _ = std::fs::remove_file(&open.base.local);
            for (_, f) in &open.groups {
                let _ = std::fs::remove_file(&f.local);
            }
        };
        if let Err(e) = crate::dataset::check_name(&self.dataset_dir) {
            discard(open);
            return Err(e);
        }
        if open.rows == 0 {
            discard(open);
            return Ok(());
        }
        let OpenShard { base, groups, rows } = open;
        let mut files = columns::ColumnFiles::new();
        let mut pending = groups.into_iter();
        while let Some((g, file)) = pending.next() {
            let rel = format!("{DATA_DIR}/part-{}.parquet", uuid::Uuid::now_v7());
            let table = columns::table_name(&self.dataset_dir, g);
            let stored = file
                .store(self.storage.as_ref(), &crate::storage::join(&table, &rel))
                .await;
            let (sha256, bytes) = match stored {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&base.local);
                    for (_, f) in pending {
                        let _ = std::fs::remove_file(&f.local);
                    }
                    return Err(e);
                }
            };
            files.insert(
                g.to_string(),
                columns::ColumnFile {
                    path: rel,
                    bytes,
                    sha256,
                },
            );
        }
        let rel = format!("{DATA_DIR}/part-{}.parquet", uuid::Uuid::now_v7());
        let full = crate::storage::join(&self.dataset_dir, &rel);
        let (sha256, bytes) = base.store(self.storage.as_ref(), &full).await?;
        self.done.push(ShardEntry {
            path: rel,
            rows: rows as u64,
            bytes,
            sha256,
            stage: self.opts.stage.clone(),
            // The table log keeps milliseconds (an `add` action's modificationTime).
            created_at: chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
                .expect("now is representable"),
            applied: self.opts.applied.clone(),
            units: Vec::new(),
            columns: files,
        });
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            let _ = std::fs::remove_file(&open.base.local);
            for (_, f) in &open.groups {
                let _ = std::fs::remove_file(&f.local);
            }
        }
    }
}

fn parquet_err(path: &std::path::Path, source: parquet::errors::ParquetError) -> CatalogError {
    CatalogError::Parquet {
        path: path.display().to_string(),
        source,
    }
}

/// Fails unless every column of `found` is `expected`'s (name, type with nested field names,
/// nullability), in order.
fn check_fields(name: &str, found: &Schema, expected: &Schema) -> Result<()> {
    let what = if expected.fields().len() == sample_schema().fields().len() {
        "the sample schema"
    } else {
        "its column group's schema"
    };
    let bad = |reason: String| CatalogError::CorruptShard {
        path: name.to_string(),
        reason: format!("does not have {what}: {reason}"),
    };
    if found.fields().len() != expected.fields().len() {
        return Err(bad(format!(
            "{} columns, the schema has {}",
            found.fields().len(),
            expected.fields().len()
        )));
    }
    for (f, e) in found.fields().iter().zip(expected.fields()) {
        if !e.contains(f) {
            return Err(bad(format!(
                "column {:?} is {} {:?}, the schema has {} {:?}",
                f.name(),
                if f.is_nullable() {
                    "nullable"
                } else {
                    "required"
                },
                f.data_type(),
                e.name(),
                e.data_type()
            )));
        }
    }
    Ok(())
}

/// Decodes a whole shard's base file held in memory, checking its size, hash and schema against
/// the log entry. `name` is used in errors. `projection` selects columns by name (all if None).
pub fn decode_shard(
    name: &str,
    entry: &ShardEntry,
    data: Bytes,
    projection: Option<&[&str]>,
) -> Result<Vec<RecordBatch>> {
    decode_file(
        name,
        (entry.bytes, &entry.sha256),
        data,
        projection,
        &sample_schema(),
    )
}

/// Decodes a whole Parquet file of schema `expected` held in memory, checking its size and hash
/// (`logged`, as the table log has them) and its schema version. `name` is used in errors.
pub fn decode_file(
    name: &str,
    logged: (u64, &str),
    data: Bytes,
    projection: Option<&[&str]>,
    expected: &SchemaRef,
) -> Result<Vec<RecordBatch>> {
    if data.len() as u64 != logged.0 {
        return Err(CatalogError::CorruptShard {
            path: name.to_string(),
            reason: format!("{} bytes, the table log says {}", data.len(), logged.0),
        });
    }
    let sha = hex::encode(Sha256::digest(&data));
    if sha != logged.1 {
        return Err(CatalogError::CorruptShard {
            path: name.to_string(),
            reason: format!("content SHA-256 {sha}, the table log says {}", logged.1),
        });
    }
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(data).map_err(|e| CatalogError::CorruptShard {
            path: name.to_string(),
            reason: e.to_string(),
        })?;
    check_schema_version(
        name,
        builder.metadata().file_metadata().key_value_metadata(),
    )?;
    // The whole file must have the schema, whatever is projected: `verify` reads one column
    // and must reject what a full read rejects.
    check_fields(name, builder.schema(), expected)?;
    let builder = match projection {
        Some(cols) => {
            let schema = builder.schema().clone();
            let mut idx = Vec::with_capacity(cols.len());
            for c in cols {
                idx.push(schema.index_of(c).map_err(|_| {
                    CatalogError::InvalidArgument(format!("no column {c:?} in the sample schema"))
                })?);
            }
            idx.sort_unstable();
            idx.dedup();
            let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), idx);
            builder.with_projection(mask)
        }
        None => builder,
    };
    let reader = builder
        .build()
        .map_err(|e| parquet_err(std::path::Path::new(name), e))?;
    let full = projection.is_none();
    reader
        .map(|b| {
            let b = b.map_err(|e| CatalogError::CorruptShard {
                path: name.to_string(),
                reason: e.to_string(),
            })?;
            if !full {
                return Ok(b);
            }
            // Whole rows come back under the canonical schema (with its metadata).
            b.with_schema(expected.clone())
                .map_err(|e| CatalogError::CorruptShard {
                    path: name.to_string(),
                    reason: format!("does not have the expected schema: {e}"),
                })
        })
        .collect()
}

/// Refuses a Parquet file whose key-value metadata lacks this build's schema version.
pub fn check_schema_version(name: &str, kv: Option<&Vec<KeyValue>>) -> Result<()> {
    let found = kv
        .and_then(|kv| kv.iter().find(|k| k.key == SCHEMA_VERSION_KEY))
        .and_then(|k| k.value.as_deref());
    match found.map(|v| v.parse::<u32>()) {
        Some(Ok(v)) if v == SCHEMA_VERSION => Ok(()),
        Some(Ok(v)) => Err(CatalogError::UnsupportedSchemaVersion {
            path: name.to_string(),
            found: v,
            supported: SCHEMA_VERSION,
        }),
        _ => Err(CatalogError::CorruptShard {
            path: name.to_string(),
            reason: format!(
                "no valid {SCHEMA_VERSION_KEY} in its Parquet metadata; not a llamagen shard"
            ),
        }),
    }
}
