//! llamagen's data contract: the sample schema, storage backends, Parquet shards in Delta Lake tables with
//! an atomic commit protocol, the run log, and SQL over all of it.
//!
//! ```no_run
//! # async fn demo() -> llamagen_catalog::Result<()> {
//! use llamagen_catalog::{Catalog, StorageOptions};
//! let cat = Catalog::open("./catalog", &StorageOptions::default()).await?;
//! let ctx = cat.session().await?; // DataFusion SessionContext with samples, shards, runs
//! ctx.sql("SELECT status, count(*) FROM samples GROUP BY status").await?.show().await?;
//! # Ok(()) }
//! ```

pub mod columns;
pub mod counters;
pub mod dataset;
pub mod error;
pub mod lease;
pub mod runs;
pub mod schema;
pub mod shard;
pub mod source;
pub mod sql;
pub mod stage;
pub mod storage;
pub mod worker;

pub use arrow;
pub use datafusion;

use std::sync::Arc;

pub use counters::StageCounters;
pub use dataset::{Committed, Dataset, GcReport, HistoryEntry, ShardEntry, Snapshot, Transaction};
pub use error::{CatalogError, Result};
pub use schema::{SCHEMA_VERSION, Status, sample_schema};
pub use shard::{ShardWriter, ShardWriterOptions};
pub use storage::{Storage, StorageOptions};

/// A catalog root: a storage location holding datasets and the run log.
#[derive(Debug, Clone)]
pub struct Catalog {
    storage: Arc<dyn Storage>,
}

impl Catalog {
    /// Opens a root: a local path, `s3://bucket/prefix` or `memory://name`.
    pub async fn open(root: &str, options: &StorageOptions) -> Result<Self> {
        Ok(Catalog {
            storage: storage::open(root, options).await?,
        })
    }

    pub fn from_storage(storage: Arc<dyn Storage>) -> Self {
        Catalog { storage }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn dataset(&self, name: &str) -> Dataset {
        Dataset::new(self.storage.clone(), name)
    }

    /// The `samples` dataset.
    pub fn samples(&self) -> Dataset {
        self.dataset(sql::SAMPLES)
    }

    /// A DataFusion session with `samples`, `shards` and `runs` registered.
    pub async fn session(&self) -> Result<datafusion::prelude::SessionContext> {
        sql::session(self.storage.clone()).await
    }
}

/// Row count of a Parquet file from its footer (None if it is not readable Parquet).
pub fn parquet_rows(file: std::fs::File) -> Option<u64> {
    use parquet::file::reader::FileReader;
    let r = parquet::file::reader::SerializedFileReader::new(file).ok()?;
    Some(r.metadata().file_metadata().num_rows().max(0) as u64)
}
