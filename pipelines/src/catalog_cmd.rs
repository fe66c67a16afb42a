//! `llamagen catalog …`: SQL, stats, import of URL lists, verify and gc.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use llamagen_catalog::source::{Source, SourceOptions, source_name};
use llamagen_catalog::sql::{self, OutputFormat};
use llamagen_catalog::storage::S3Config;
use llamagen_catalog::{
    Catalog, CatalogError, ShardWriterOptions, StageCounters, StorageOptions, Transaction, runs,
};

/// Where the catalog lives and how to reach S3.
#[derive(Args, Debug, Clone)]
pub struct RootArgs {
    /// Catalog root: a local directory, or s3://bucket/prefix.
    #[arg(long, env = "LLAMAGEN_ROOT", default_value = "./catalog")]
    pub root: String,
    /// Dataset shown as the `samples` table.
    #[arg(long, default_value = sql::SAMPLES)]
    pub dataset: String,
    /// Endpoint of an S3-compatible server (default: AWS, or AWS_ENDPOINT_URL).
    #[arg(long, env = "LLAMAGEN_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, then us-east-1).
    #[arg(long, env = "LLAMAGEN_S3_REGION")]
    pub s3_region: Option<String>,
    /// Force path-style (true) or virtual-host (false) S3 addressing (default: path style when
    /// an endpoint is set).
    #[arg(long)]
    pub s3_path_style: Option<bool>,
}

impl RootArgs {
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            s3: S3Config {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                ..Default::default()
            },
        }
    }

    pub async fn open(&self) -> Result<Catalog> {
        Catalog::open(&self.root, &self.storage_options())
            .await
            .with_context(|| format!("opening catalog root {}", self.root))
    }
}

#[derive(Args, Debug)]
pub struct CatalogArgs {
    #[command(subcommand)]
    command: CatalogCommand,
}

#[derive(Subcommand, Debug)]
enum CatalogCommand {
    /// Run a SQL query over the tables `samples`, `shards`, `runs` and `history` (one row per
    /// table version).
    Sql {
        /// The query, e.g. "SELECT status, count(*) FROM samples GROUP BY status".
        query: String,
        #[command(flatten)]
        root: RootArgs,
        /// Read `samples` and `shards` as of this table version (time travel).
        #[arg(long)]
        version: Option<u64>,
        /// Memory a query may hold, in MiB (sorts, joins and aggregations spill or fail beyond it).
        #[arg(long, default_value_t = 4096)]
        memory_mib: usize,
        /// Output format: table, csv, json (lines) or parquet.
        #[arg(long, default_value = "table")]
        format: String,
        /// Write to this file instead of standard output (required for parquet).
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Counts by status, error kind and rejection reason.
    Stats {
        #[command(flatten)]
        root: RootArgs,
    },
    /// Register URL lists (Parquet, CSV or JSONL; local or s3://) as pending samples, one commit
    /// per file. Files already imported are skipped, so re-running completes an interrupted import.
    Import {
        /// URL-list files.
        #[arg(required = true)]
        inputs: Vec<String>,
        #[command(flatten)]
        root: RootArgs,
        /// Column holding the image URL.
        #[arg(long, default_value = "URL")]
        url_column: String,
        /// Column holding the alt-text caption.
        #[arg(long, default_value = "TEXT")]
        caption_column: String,
        /// Maximum rows per shard.
        #[arg(long, default_value_t = 1_000_000)]
        shard_rows: usize,
    },
    /// Check every committed shard: present, right size and SHA-256, readable, right schema.
    Verify {
        #[command(flatten)]
        root: RootArgs,
    },
    /// Delete what no reader can see: uncommitted shard files and temporary files older than
    /// the grace period, unfinished S3 multipart uploads, and log entries older than the grace
    /// period that the latest checkpoint replaces (Delta's vacuum, limited to llamagen's shards).
    Gc {
        #[command(flatten)]
        root: RootArgs,
        /// Only files older than this many seconds are removed (protects writers in flight and
        /// readers of versions younger than this: the table's time-travel window).
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        grace_secs: u64,
        /// Report what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(args: CatalogArgs) -> Result<ExitCode> {
    match args.command {
        CatalogCommand::Sql {
            query,
            root,
            version,
            memory_mib,
            format,
            output,
        } => {
            let format: OutputFormat = format.parse()?;
            let cat = root.open().await?;
            let opts = sql::SessionOptions {
                version,
                // `history` reads every commit in the log: only when the query names it.
                history: query.to_ascii_lowercase().contains("history"),
                memory_limit: Some(memory_mib << 20),
            };
            let ctx = sql::session_with(cat.storage().clone(), &root.dataset, &opts).await?;
            if output.is_none() && format == OutputFormat::Parquet {
                bail!("--format parquet needs --output FILE");
            }
            let result = match &output {
                Some(path) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .with_context(|| format!("creating {}", path.display()))?,
                    );
                    let r = sql::query_to(&ctx, &query, format, &mut f).await;
                    f.flush()?;
                    r
                }
                None => {
                    let mut out = std::io::stdout();
                    let r = sql::query_to(&ctx, &query, format, &mut out).await;
                    out.flush()?;
                    r
                }
            };
            match result {
                Ok(_) => Ok(ExitCode::SUCCESS),
                // SQL errors are the user's: say them as DataFusion words them, exit 2.
                Err(CatalogError::DataFusion(e)) => {
                    if let Some(path) = &output {
                        let _ = std::fs::remove_file(path);
                    }
                    eprintln!("SQL error: {e}");
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
        CatalogCommand::Stats { root } => {
            stats(&root).await?;
            Ok(ExitCode::SUCCESS)
        }
        CatalogCommand::Import {
            inputs,
            root,
            url_column,
            caption_column,
            shard_rows,
        } => import(&root, &inputs, url_column, caption_column, shard_rows).await,
        CatalogCommand::Verify { root } => {
            let cat = root.open().await?;
            let ds = cat.dataset(&root.dataset);
            let snap = ds.snapshot().await?;
            let problems = ds.verify().await?;
            for p in &problems {
                println!("FAIL {}: {}", p.path, p.problem);
            }
            println!(
                "{} shard(s) checked in {} version {}: {} ok, {} bad",
                snap.shards.len(),
                root.dataset,
                snap.version,
                snap.shards.len() - problems.len(),
                problems.len()
            );
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CatalogCommand::Gc {
            root,
            grace_secs,
            dry_run,
        } => {
            let cat = root.open().await?;
            let report = cat
                .dataset(&root.dataset)
                .gc(Duration::from_secs(grace_secs), dry_run)
                .await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "{verb}: {} orphan shard(s) ({} bytes), {} expired log entr(ies), {} temporary file(s), {} unfinished upload(s)",
                report.orphan_shards.len(),
                report.orphan_bytes,
                report.expired_log_entries,
                report.temp_files.len(),
                report.aborted_uploads.len()
            );
            for p in report
                .orphan_shards
                .iter()
                .chain(&report.temp_files)
                .chain(&report.aborted_uploads)
            {
                println!("  {p}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn stats(root: &RootArgs) -> Result<()> {
    let cat = root.open().await?;
    let ds = cat.dataset(&root.dataset);
    let snap = ds.snapshot().await?;
    println!(
        "{} at {}: version {}, {} shard(s), {} row(s), {} byte(s)",
        root.dataset,
        cat.storage().root(),
        snap.version,
        snap.shards.len(),
        snap.rows(),
        snap.bytes()
    );
    let ctx = sql::session_for(cat.storage().clone(), &root.dataset).await?;
    let mut out = std::io::stdout();
    for (title, q) in [
        (
            "by status",
            "SELECT status, count(*) AS samples FROM samples GROUP BY status ORDER BY samples DESC, status",
        ),
        (
            "failed, by error kind",
            "SELECT error_kind, count(*) AS samples FROM samples WHERE status = 'failed' \
             GROUP BY error_kind ORDER BY samples DESC, error_kind",
        ),
        (
            "dropped, by rejection reason (a sample can fail several rules)",
            "SELECT reason, count(*) AS samples FROM \
             (SELECT unnest(reject_reasons) AS reason FROM samples WHERE status = 'dropped') \
             GROUP BY reason ORDER BY samples DESC, reason",
        ),
    ] {
        let (schema, batches) = sql::query(&ctx, q).await?;
        writeln!(out, "\n{title}:")?;
        sql::write_results(&schema, &batches, OutputFormat::Table, &mut out)?;
    }
    Ok(())
}

async fn import(
    root: &RootArgs,
    inputs: &[String],
    url_column: String,
    caption_column: String,
    shard_rows: usize,
) -> Result<ExitCode> {
    let cat = root.open().await?;
    let ds = cat.dataset(&root.dataset);
    let mut names = std::collections::BTreeMap::new();
    for i in inputs {
        if let Some(prev) = names.insert(source_name(i), i) {
            bail!(
                "{prev} and {i} have the same file name; sample keys derive from it, so rename one"
            );
        }
    }
    let mut run = runs::RunRecord::start(std::env::args().collect::<Vec<_>>().join(" "));
    runs::record_run(cat.storage(), &run).await?;
    let opts = SourceOptions {
        url_column,
        caption_column,
        ..Default::default()
    };
    let mut counters = StageCounters::new("import");
    let started = Instant::now();
    let bar = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} rows [{elapsed_precise}, {per_sec}]")
            .expect("template"),
    );
    let result: Result<()> = async {
        for input in inputs {
            let unit = format!("import:{}", source_name(input));
            let done = ds.snapshot().await?;
            if done.units.contains(&unit) {
                bar.println(format!("{input}: already imported, skipped"));
                counters.add_extra("files skipped", 1);
                continue;
            }
            bar.set_message(source_name(input));
            let mut source = Source::open(input, &opts, &root.storage_options()).await?;
            let mut writer = ds.writer(ShardWriterOptions {
                stage: "import".into(),
                max_rows: shard_rows,
                ..Default::default()
            });
            let mut file_counters = StageCounters::new("import");
            while let Some(batch) = source.next_samples().await {
                let batch = batch?;
                let status = batch
                    .column_by_name("status")
                    .expect("status column")
                    .as_any()
                    .downcast_ref::<llamagen_catalog::arrow::array::StringArray>()
                    .expect("utf8 status")
                    .clone();
                for s in status.iter().flatten() {
                    if s == "failed" {
                        file_counters.error_kind("invalid_url");
                    }
                }
                file_counters.received += batch.num_rows() as u64;
                file_counters.written += batch.num_rows() as u64;
                writer.write(&batch).await?;
                bar.inc(batch.num_rows() as u64);
            }
            let shards = writer.finish().await?;
            file_counters.add_extra("shards", shards.len() as u64);
            file_counters.add_extra("bytes", shards.iter().map(|s| s.bytes).sum());
            match ds
                .commit(Transaction {
                    operation: "import".into(),
                    run_id: Some(run.run_id.clone()),
                    add: shards,
                    remove: vec![],
                    units: vec![unit],
                })
                .await
            {
                Ok(m) => {
                    counters.merge(&file_counters);
                    counters.add_extra("files imported", 1);
                    bar.println(format!(
                        "{input}: {} rows committed as version {}",
                        file_counters.written, m.version
                    ));
                }
                Err(CatalogError::UnitAlreadyCommitted { .. }) => {
                    counters.add_extra("files skipped", 1);
                    bar.println(format!(
                        "{input}: imported concurrently by another run, skipped"
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    counters.add_extra("seconds", started.elapsed().as_secs());
    let code = if result.is_ok() { 0 } else { 1 };
    let mut report = serde_json::to_value(&counters)?;
    if let Err(e) = &result {
        report["error"] = serde_json::Value::String(format!("{e:#}"));
    }
    run.finish(code, report);
    runs::record_run(cat.storage(), &run).await?;
    result?;
    print!("{counters}");
    Ok(ExitCode::SUCCESS)
}
