//! The catalog's one error type. Every variant names the object (file, key, dataset) it is about.

use std::path::PathBuf;

/// Everything that can go wrong in the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: no such object")]
    NotFound { path: String },

    #[error("S3 {op} of s3://{bucket}/{key} failed: {message}")]
    S3 {
        op: &'static str,
        bucket: String,
        key: String,
        message: String,
    },

    /// Neither the configured credentials provider nor the standard AWS chain gave credentials.
    #[error("AWS credentials for s3://{bucket} could not be resolved: {message}")]
    S3Credentials { bucket: String, message: String },

    #[error("object store error: {0}")]
    ObjectStore(#[from] object_store::Error),

    #[error("invalid storage root {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },

    #[error("malformed transaction log entry {path}: {reason}")]
    MalformedLog { path: String, reason: String },

    /// The Delta Lake library failed on a table; `table` names the table's location.
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    #[error(
        "{path} has sample schema version {found}, but this build of llamagen reads version {supported}; \
         upgrade llamagen (newer data) or re-run the pipeline (older data)"
    )]
    UnsupportedSchemaVersion {
        path: String,
        found: u32,
        supported: u32,
    },

    #[error("corrupt shard {path}: {reason}")]
    CorruptShard { path: String, reason: String },

    #[error("record batch does not fit the sample schema: {0}")]
    SchemaMismatch(String),

    #[error("commit to dataset {dataset:?} lost the race {attempts} times in a row; giving up")]
    CommitConflict { dataset: String, attempts: u32 },

    #[error("work unit {unit:?} is already committed in dataset {dataset:?} (version {version})")]
    UnitAlreadyCommitted {
        dataset: String,
        unit: String,
        version: u64,
    },

    #[error(
        "shard {path} is no longer part of dataset {dataset:?}: a concurrent commit removed it"
    )]
    ShardGone { dataset: String, path: String },

    #[error("dataset {dataset:?} does not exist under {root} (no transaction log)")]
    NoSuchDataset { dataset: String, root: String },

    #[error("lease {path} is held by {holder} until {expires_at}")]
    LeaseHeld {
        path: String,
        holder: String,
        expires_at: String,
    },

    #[error("lease {path} was lost to {holder} (it expired before renewal); stop writing")]
    LeaseLost { path: String, holder: String },

    #[error("Parquet error in {path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    #[error("Arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    /// SQL planning and execution errors, worded as DataFusion words them.
    #[error("{0}")]
    DataFusion(#[from] datafusion::error::DataFusionError),

    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An error of another library or stage, kept whole (a stage's own error type is recovered by
    /// `downcast`).
    #[error("{context}: {source}")]
    External {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

impl CatalogError {
    /// The error of type `E` this error carries (a stage's own error, as
    /// [`crate::stage::run_stage`] returns it), or this error back.
    pub fn into_external<E: std::error::Error + 'static>(self) -> std::result::Result<E, Self> {
        match self {
            CatalogError::External { context, source } => match source.downcast::<E>() {
                Ok(own) => Ok(*own),
                Err(source) => Err(CatalogError::External { context, source }),
            },
            e => Err(e),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CatalogError::Io {
            path: path.into(),
            source,
        }
    }
}
