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
//! Opening a session reads the table log and nothing else: the files, their sizes and row counts
//! come from the log, so its cost does not grow with the number of shards, and `count(*)` is
//! answered from the log's row counts. A missing, truncated or corrupt shard fails the query that
//! reads it, with an error naming the file; `llamagen catalog verify` checks every file.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use futures::StreamExt;

use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};

use crate::dataset::{Dataset, ShardEntry, Snapshot};
use crate::error::{CatalogError, Result};
use crate::runs::list_runs;
use crate::schema::{group_of, sample_schema};
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
    let (url, _) = ds.storage().object_store()?;
    let mut files = Vec::with_capacity(snap.shards.len());
    let mut store_url = None;
    for s in &snap.shards {
        let u = ListingTableUrl::parse(format!("{url}{}", join(ds.name(), &s.path)))?;
        store_url.get_or_insert_with(|| u.object_store());
        files.push((u.prefix().clone(), s.bytes, s.rows));
    }
    let store_url = store_url.expect("at least one shard");
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
    ctx.register_table(
        table,
        Arc::new(SamplesTable {
            schema,
            store_url,
            files,
            ds: ds.clone(),
            shards: Arc::new(snap.shards.clone()),
        }),
    )?;
    Ok(())
}

/// A dataset version as a table. Its files, sizes and row counts come from the table log, so
/// opening it and planning a query list and read nothing, and `count(*)` reads nothing at all.
/// Queries that project no wide column scan the base files with DataFusion's Parquet reader
/// (whose errors name the file: a missing or truncated shard fails the query that reads it, and
/// `llamagen catalog verify` checks them all); those that do read the shards whole through
/// [`Dataset::read_shard`] (base and column files, keys checked; see [`crate::columns`]).
#[derive(Debug)]
struct SamplesTable {
    schema: SchemaRef,
    store_url: ObjectStoreUrl,
    /// Each shard's base file: object store path, bytes, rows.
    files: Vec<(object_store::path::Path, u64, u64)>,
    ds: Dataset,
    shards: Arc<Vec<ShardEntry>>,
}

impl SamplesTable {
    /// A scan of the base files.
    async fn scan_base(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        use datafusion::common::stats::{Precision, Statistics};
        use datafusion::datasource::file_format::FileFormat;
        use datafusion::datasource::listing::PartitionedFile;
        use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
        let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
        let source = format.file_source(self.schema.clone().into());
        let parts = state
            .config()
            .target_partitions()
            .clamp(1, self.files.len().max(1));
        let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); parts];
        for (i, (path, bytes, rows)) in self.files.iter().enumerate() {
            let stats = Statistics::new_unknown(&self.schema)
                .with_num_rows(Precision::Exact(*rows as usize))
                .with_total_byte_size(Precision::Inexact(*bytes as usize));
            groups[i % parts].push(
                PartitionedFile::new(path.to_string(), *bytes).with_statistics(Arc::new(stats)),
            );
        }
        let rows: u64 = self.files.iter().map(|f| f.2).sum();
        let bytes: u64 = self.files.iter().map(|f| f.1).sum();
        let stats = Statistics::new_unknown(&self.schema)
            .with_num_rows(Precision::Exact(rows as usize))
            .with_total_byte_size(Precision::Inexact(bytes as usize));
        let config = FileScanConfigBuilder::new(self.store_url.clone(), source)
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_statistics(stats)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        format.create_physical_plan(state, config).await
    }
}

#[async_trait::async_trait]
impl TableProvider for SamplesTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        // Filters stay above the scan; the physical optimizer pushes them into the Parquet
        // reader (row-group and page pruning) where it can.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
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
        let _ = filters;
        if !names.iter().any(|n| group_of(n).is_some())
            || self.shards.iter().all(|s| s.columns.is_empty())
        {
            return self.scan_base(state, projection, limit).await;
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
