//! SQL over a catalog root with DataFusion.
//!
//! Tables registered by [`session`]:
//! - `samples`: the committed shards of the `samples` dataset (latest table version only), with
//!   the wide columns of its column groups (see [`crate::columns`]) read from their column files
//!   only by queries that project them;
//! - `shards`: one row per committed shard (dataset, path, rows, bytes, column_bytes, sha256,
//!   stage, created_at);
//! - `runs`: one row per recorded run (see [`crate::runs`]);
//! - `history` (on request, [`SessionOptions::history`]): one row per table version.
//!
//! [`SessionOptions::version`] shows `samples` and `shards` as of an earlier table version.
//!
//! Before a dataset is registered, each listed shard is checked to exist with the size the table log gives
//! and to end in a readable Parquet footer of the right schema version, so a missing, truncated or
//! corrupt file is reported by name instead of failing somewhere inside a query.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;
use parquet::file::metadata::ParquetMetaDataReader;

use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use crate::dataset::{Dataset, ShardEntry, Snapshot};
use crate::error::{CatalogError, Result};
use crate::runs::list_runs;
use crate::schema::{group_of, sample_schema};
use crate::shard::check_schema_version;
use crate::storage::{Storage, join};

/// The dataset that the `samples` table shows.
pub const SAMPLES: &str = "samples";

/// A DataFusion session over a catalog root with `samples`, `shards` and `runs` registered.
pub async fn session(storage: Arc<dyn Storage>) -> Result<SessionContext> {
    session_for(storage, SAMPLES).await
}

/// Like [`session`], with `samples` showing the dataset called `dataset`.
pub async fn session_for(storage: Arc<dyn Storage>, dataset: &str) -> Result<SessionContext> {
    session_with(storage, dataset, &SessionOptions::default()).await
}

/// What a session shows beyond the latest version of its dataset.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Show the dataset as of this table version (time travel) instead of the latest.
    pub version: Option<u64>,
    /// Also register `history`: one row per table version (reads every commit still in the log).
    pub history: bool,
    /// Bytes a query's operators may hold (sorts, joins and aggregations spill to disk where they
    /// can, and fail with an error naming the limit where they cannot). None: [`DEFAULT_MEMORY_LIMIT`].
    pub memory_limit: Option<usize>,
}

/// The default memory limit of a session's queries (4 GiB).
pub const DEFAULT_MEMORY_LIMIT: usize = 4 << 30;

/// Like [`session_for`], as of a version and with the `history` table on request.
pub async fn session_with(
    storage: Arc<dyn Storage>,
    dataset: &str,
    opts: &SessionOptions,
) -> Result<SessionContext> {
    // DATAFUSION_* environment variables tune the engine (e.g. DATAFUSION_EXECUTION_TARGET_PARTITIONS).
    let config = SessionConfig::from_env()?.with_information_schema(true);
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(opts.memory_limit.unwrap_or(DEFAULT_MEMORY_LIMIT), 1.0)
        .build_arc()?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let (url, store) = storage.object_store()?;
    ctx.register_object_store(&url, store);
    let ds = Dataset::new(storage.clone(), dataset);
    let snap = match opts.version {
        Some(v) => ds.snapshot_at(v).await?,
        None => ds.snapshot().await?,
    };
    register_snapshot(&ctx, &ds, &snap, "samples").await?;
    ctx.register_table("shards", Arc::new(shards_table(&ds, &snap)?))?;
    ctx.register_table("runs", Arc::new(runs_table(&storage).await?))?;
    if opts.history {
        ctx.register_table("history", Arc::new(history_table(&ds).await?))?;
    }
    Ok(ctx)
}

/// One row per table version: when, which Delta operation, which llamagen operation and run,
/// and how many shards it added and removed.
async fn history_table(ds: &Dataset) -> Result<MemTable> {
    let h = ds.history().await?;
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("version", DataType::UInt64, false),
        ts_field("committed_at"),
        Field::new("operation", DataType::Utf8, true),
        Field::new("stage", DataType::Utf8, true),
        Field::new("run_id", DataType::Utf8, true),
        Field::new("shards_added", DataType::UInt64, false),
        Field::new("shards_removed", DataType::UInt64, false),
        Field::new("rows_added", DataType::UInt64, false),
        Field::new("units", DataType::UInt64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(h.iter().map(|e| e.version))),
        Arc::new(
            TimestampMicrosecondArray::from_iter(
                h.iter()
                    .map(|e| e.committed_at.map(|t| t.timestamp_micros())),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter(
            h.iter().map(|e| e.operation.as_deref()),
        )),
        Arc::new(StringArray::from_iter(h.iter().map(|e| e.stage.as_deref()))),
        Arc::new(StringArray::from_iter(
            h.iter().map(|e| e.run_id.as_deref()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            h.iter().map(|e| e.shards_added),
        )),
        Arc::new(UInt64Array::from_iter_values(
            h.iter().map(|e| e.shards_removed),
        )),
        Arc::new(UInt64Array::from_iter_values(
            h.iter().map(|e| e.rows_added),
        )),
        Arc::new(UInt64Array::from_iter_values(h.iter().map(|e| e.units))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// Registers a dataset's snapshot as table `table` in `ctx` (whose object store must already be
/// registered for the dataset's storage).
pub async fn register_snapshot(
    ctx: &SessionContext,
    ds: &Dataset,
    snap: &Snapshot,
    table: &str,
) -> Result<()> {
    let schema = sample_schema();
    if snap.shards.is_empty() {
        let empty = MemTable::try_new(schema.clone(), vec![vec![]])?;
        ctx.register_table(table, Arc::new(empty))?;
        return Ok(());
    }
    check_shards(ds, snap).await?;
    let (url, _) = ds.storage().object_store()?;
    let mut urls = Vec::with_capacity(snap.shards.len());
    for s in &snap.shards {
        let u = format!("{url}{}", join(ds.name(), &s.path));
        urls.push(ListingTableUrl::parse(&u)?);
    }
    // DataFusion reads Parquet strings and binaries as view arrays by default; the table schema
    // must say so too, or every string would be read as a view and then copied into a plain array.
    let schema = if ctx
        .state()
        .config()
        .options()
        .execution
        .parquet
        .schema_force_view_types
    {
        Arc::new(with_view_types(&schema))
    } else {
        schema
    };
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(schema);
    let base = Arc::new(ListingTable::try_new(config)?);
    if snap.shards.iter().all(|s| s.columns.is_empty()) {
        ctx.register_table(table, base)?;
    } else {
        ctx.register_table(
            table,
            Arc::new(SamplesTable {
                base,
                ds: ds.clone(),
                shards: Arc::new(snap.shards.clone()),
            }),
        )?;
    }
    Ok(())
}

/// A dataset with column groups: its base files for queries that project no wide column, and
/// its shards read whole through [`Dataset::read_shard`] (base and column files, keys checked)
/// for those that do.
#[derive(Debug)]
struct SamplesTable {
    base: Arc<ListingTable>,
    ds: Dataset,
    shards: Arc<Vec<ShardEntry>>,
}

#[async_trait::async_trait]
impl TableProvider for SamplesTable {
    fn schema(&self) -> SchemaRef {
        self.base.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // The shard-by-shard path does not filter: every filter is applied again above the scan.
        Ok(self
            .base
            .supports_filters_pushdown(filters)?
            .into_iter()
            .map(|p| match p {
                TableProviderFilterPushDown::Exact => TableProviderFilterPushDown::Inexact,
                other => other,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let schema = self.schema();
        let names: Vec<String> = match projection {
            Some(p) => p.iter().map(|&i| schema.field(i).name().clone()).collect(),
            None => schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        if !names.iter().any(|n| group_of(n).is_some()) {
            return self.base.scan(state, projection, filters, limit).await;
        }
        // The partitions yield the projected columns only.
        let schema = match projection {
            Some(p) => Arc::new(schema.project(p)?),
            None => schema,
        };
        let parts = state
            .config()
            .target_partitions()
            .clamp(1, self.shards.len().max(1));
        let partitions = (0..parts)
            .map(|p| {
                Arc::new(ShardStream {
                    ds: self.ds.clone(),
                    shards: self.shards.iter().skip(p).step_by(parts).cloned().collect(),
                    columns: names.clone(),
                    schema: schema.clone(),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            partitions,
            None,
            Vec::new(),
            false,
            limit,
        )?))
    }
}

/// Some shards of a dataset, read whole (the projected columns) under the projected schema.
#[derive(Debug)]
struct ShardStream {
    ds: Dataset,
    shards: Vec<ShardEntry>,
    columns: Vec<String>,
    schema: SchemaRef,
}

impl PartitionStream for ShardStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let ds = self.ds.clone();
        let columns = self.columns.clone();
        let schema = self.schema.clone();
        let stream = futures::stream::iter(self.shards.clone())
            .then(move |entry| {
                let (ds, columns, schema) = (ds.clone(), columns.clone(), schema.clone());
                async move {
                    let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
                    let batches = ds
                        .read_shard(&entry, Some(&cols))
                        .await
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                    batches
                        .iter()
                        .map(|b| widen(b, &schema))
                        .collect::<datafusion::error::Result<Vec<_>>>()
                }
            })
            .flat_map(|r| {
                futures::stream::iter(match r {
                    Ok(batches) => batches.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                })
            });
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

/// `batch` (the columns of `schema`, read from shards) under `schema`: its columns cast to the
/// schema's types (view types).
fn widen(batch: &RecordBatch, schema: &SchemaRef) -> datafusion::error::Result<RecordBatch> {
    let cols = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Ok(arrow::compute::cast(c, f.data_type())?),
            None => Err(datafusion::error::DataFusionError::Internal(format!(
                "column {} was not read",
                f.name()
            ))),
        })
        .collect::<datafusion::error::Result<Vec<_>>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &options,
    )?)
}

/// Top-level `Utf8`/`Binary` columns as `Utf8View`/`BinaryView`, as DataFusion reads them.
fn with_view_types(schema: &Schema) -> Schema {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 => {
                f.as_ref().clone().with_data_type(DataType::Utf8View)
            }
            DataType::Binary | DataType::LargeBinary => {
                f.as_ref().clone().with_data_type(DataType::BinaryView)
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// Checks that every shard of `snap` exists with its logged size and has a readable footer of
/// this schema version. The first problem is returned as an error naming the file.
pub async fn check_shards(ds: &Dataset, snap: &Snapshot) -> Result<()> {
    let storage = ds.storage();
    let root = storage.root();
    let root = root.trim_end_matches('/');
    let listed: HashMap<String, u64> = storage
        .list(&format!("{}/", join(ds.name(), crate::dataset::DATA_DIR)))
        .await?
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect();
    for s in &snap.shards {
        let path = ds.shard_path(s);
        match listed.get(&path) {
            None => {
                return Err(CatalogError::CorruptShard {
                    path: format!("{root}/{path}"),
                    reason: format!("missing, but listed in table version {}", snap.version),
                });
            }
            Some(&size) if size != s.bytes => {
                return Err(CatalogError::CorruptShard {
                    path: format!("{root}/{path}"),
                    reason: format!(
                        "{size} bytes, the table log says {} (truncated or overwritten)",
                        s.bytes
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let mut checks = futures::stream::iter(snap.shards.iter())
        .map(|s| async move {
            let path = ds.shard_path(s);
            let name = format!("{root}/{path}");
            check_footer(storage.as_ref(), &path, s.bytes)
                .await
                .map_err(|reason| match reason {
                    FooterProblem::Corrupt(reason) => CatalogError::CorruptShard {
                        path: name.clone(),
                        reason,
                    },
                    FooterProblem::Other(e) => e,
                })
                .and_then(|kv| check_schema_version(&name, kv.as_ref()))
        })
        .buffer_unordered(16);
    while let Some(r) = checks.next().await {
        r?;
    }
    Ok(())
}

enum FooterProblem {
    Corrupt(String),
    Other(CatalogError),
}

async fn check_footer(
    storage: &dyn Storage,
    path: &str,
    size: u64,
) -> std::result::Result<Option<Vec<parquet::file::metadata::KeyValue>>, FooterProblem> {
    if size < 12 {
        return Err(FooterProblem::Corrupt(format!(
            "{size} bytes is too small for a Parquet file"
        )));
    }
    let tail: Bytes = storage
        .get_range(path, size - 8, size)
        .await
        .map_err(FooterProblem::Other)?;
    if &tail[4..] != b"PAR1" {
        return Err(FooterProblem::Corrupt(
            "no Parquet magic at the end (truncated or not Parquet)".into(),
        ));
    }
    let len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if len + 12 > size {
        return Err(FooterProblem::Corrupt(format!(
            "footer length {len} exceeds the file size {size}"
        )));
    }
    let meta = storage
        .get_range(path, size - 8 - len, size - 8)
        .await
        .map_err(FooterProblem::Other)?;
    let md = ParquetMetaDataReader::decode_metadata(&meta)
        .map_err(|e| FooterProblem::Corrupt(format!("unreadable footer: {e}")))?;
    Ok(md.file_metadata().key_value_metadata().cloned())
}

fn ts_field(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        true,
    )
}

fn shards_table(ds: &Dataset, snap: &Snapshot) -> Result<MemTable> {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("dataset", DataType::Utf8, false),
        Field::new("version", DataType::UInt64, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("column_bytes", DataType::UInt64, false),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        ts_field("created_at"),
    ]));
    let n = snap.shards.len();
    let root = ds.storage().root();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![ds.name(); n])),
        Arc::new(UInt64Array::from(vec![snap.version; n])),
        Arc::new(StringArray::from_iter_values(snap.shards.iter().map(|s| {
            format!("{}/{}", root.trim_end_matches('/'), ds.shard_path(s))
        }))),
        Arc::new(UInt64Array::from_iter_values(
            snap.shards.iter().map(|s| s.rows),
        )),
        Arc::new(UInt64Array::from_iter_values(
            snap.shards.iter().map(|s| s.bytes),
        )),
        Arc::new(UInt64Array::from_iter_values(
            snap.shards.iter().map(|s| s.total_bytes() - s.bytes),
        )),
        Arc::new(StringArray::from_iter_values(
            snap.shards.iter().map(|s| s.sha256.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            snap.shards.iter().map(|s| s.stage.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                snap.shards.iter().map(|s| s.created_at.timestamp_micros()),
            )
            .with_timezone("UTC"),
        ),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

async fn runs_table(storage: &Arc<dyn Storage>) -> Result<MemTable> {
    let runs = list_runs(storage).await?;
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("command", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        ts_field("started_at"),
        ts_field("finished_at"),
        Field::new("exit_code", DataType::Int64, true),
        Field::new("host", DataType::Utf8, true),
        Field::new("report", DataType::Utf8, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            runs.iter().map(|r| r.run_id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            runs.iter().map(|r| r.command.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            runs.iter().map(|r| r.status.as_str()),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                runs.iter().map(|r| r.started_at.timestamp_micros()),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMicrosecondArray::from_iter(
                runs.iter()
                    .map(|r| r.finished_at.map(|t| t.timestamp_micros())),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(Int64Array::from_iter(
            runs.iter().map(|r| r.exit_code.map(i64::from)),
        )),
        Arc::new(StringArray::from_iter(
            runs.iter().map(|r| r.host.as_deref()),
        )),
        Arc::new(StringArray::from_iter(
            runs.iter()
                .map(|r| (!r.report.is_null()).then(|| r.report.to_string())),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), cols)?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// What a catalog query may do: read. No DDL (`CREATE`, `DROP`), no DML (`INSERT`, `COPY … TO`),
/// no statements (`SET`, transactions); results leave only through the caller.
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Runs one read-only SQL statement and collects its result.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let df = ctx.sql_with_options(sql, read_only()).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    Ok((schema, batches))
}

/// Runs one read-only SQL statement and writes its result in `format` as the batches are
/// produced, so memory does not grow with the result (except `table`, which aligns columns over
/// the whole result). Returns the rows written.
pub async fn query_to(
    ctx: &SessionContext,
    sql: &str,
    format: OutputFormat,
    out: &mut (dyn Write + Send),
) -> Result<u64> {
    let df = ctx.sql_with_options(sql, read_only()).await?;
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    if format == OutputFormat::Table {
        let batches = df.collect().await?;
        write_results(&schema, &batches, format, out)?;
        return Ok(batches.iter().map(|b| b.num_rows() as u64).sum());
    }
    let mut stream = df.execute_stream().await?;
    let mut sink = ResultSink::new(&schema, format, out)?;
    let mut rows = 0u64;
    while let Some(b) = stream.next().await {
        let b = b?;
        rows += b.num_rows() as u64;
        sink.write(&b)?;
    }
    sink.finish()?;
    Ok(rows)
}

/// A result writer for the streaming formats.
enum ResultSink<'a> {
    Csv(
        arrow::csv::Writer<&'a mut (dyn Write + Send)>,
        bool,
        SchemaRef,
    ),
    Json(arrow::json::LineDelimitedWriter<&'a mut (dyn Write + Send)>),
    Parquet(parquet::arrow::ArrowWriter<&'a mut (dyn Write + Send)>),
}

impl<'a> ResultSink<'a> {
    fn new(
        schema: &SchemaRef,
        format: OutputFormat,
        out: &'a mut (dyn Write + Send),
    ) -> Result<Self> {
        Ok(match format {
            OutputFormat::Csv => ResultSink::Csv(
                arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(out),
                false,
                schema.clone(),
            ),
            OutputFormat::Json => ResultSink::Json(arrow::json::LineDelimitedWriter::new(out)),
            OutputFormat::Parquet | OutputFormat::Table => ResultSink::Parquet(
                parquet::arrow::ArrowWriter::try_new(out, schema.clone(), None).map_err(|e| {
                    CatalogError::Parquet {
                        path: "<output>".into(),
                        source: e,
                    }
                })?,
            ),
        })
    }

    fn write(&mut self, b: &RecordBatch) -> Result<()> {
        match self {
            ResultSink::Csv(w, wrote, _) => {
                *wrote = true;
                w.write(b)?
            }
            ResultSink::Json(w) => w.write(b)?,
            ResultSink::Parquet(w) => w.write(b).map_err(|e| CatalogError::Parquet {
                path: "<output>".into(),
                source: e,
            })?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            ResultSink::Csv(mut w, wrote, schema) => {
                if !wrote {
                    w.write(&RecordBatch::new_empty(schema))?;
                }
            }
            ResultSink::Json(mut w) => w.finish()?,
            ResultSink::Parquet(w) => {
                w.close().map_err(|e| CatalogError::Parquet {
                    path: "<output>".into(),
                    source: e,
                })?;
            }
        }
        Ok(())
    }
}

/// How query results are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    Csv,
    /// JSON lines, one object per row.
    Json,
    Parquet,
}

impl std::str::FromStr for OutputFormat {
    type Err = CatalogError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "table" => Ok(OutputFormat::Table),
            "csv" => Ok(OutputFormat::Csv),
            "json" | "jsonl" | "ndjson" => Ok(OutputFormat::Json),
            "parquet" => Ok(OutputFormat::Parquet),
            other => Err(CatalogError::InvalidArgument(format!(
                "unknown output format {other:?}; use table, csv, json or parquet"
            ))),
        }
    }
}

/// Writes query results in `format`. Parquet needs a seekable-free sink, so any `Write` works.
pub fn write_results(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    format: OutputFormat,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let io = |e: std::io::Error| CatalogError::io("<output>", e);
    match format {
        OutputFormat::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            if batches.is_empty() {
                // Show the header even for an empty result.
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                writeln!(out, "{}\n(0 rows)", names.join(" | ")).map_err(io)?;
            } else {
                writeln!(out, "{table}").map_err(io)?;
            }
        }
        OutputFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            if batches.is_empty() {
                w.write(&RecordBatch::new_empty(schema.clone()))?;
            }
            for b in batches {
                w.write(b)?;
            }
        }
        OutputFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        OutputFormat::Parquet => {
            let mut w =
                parquet::arrow::ArrowWriter::try_new(out, schema.clone(), None).map_err(|e| {
                    CatalogError::Parquet {
                        path: "<output>".into(),
                        source: e,
                    }
                })?;
            for b in batches {
                w.write(b).map_err(|e| CatalogError::Parquet {
                    path: "<output>".into(),
                    source: e,
                })?;
            }
            w.close().map_err(|e| CatalogError::Parquet {
                path: "<output>".into(),
                source: e,
            })?;
        }
    }
    Ok(())
}
