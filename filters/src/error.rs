//! The one error type of the filters crate.

use std::path::PathBuf;

/// What went wrong while loading models or scoring samples.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("{0}")]
    RuntimeLibrary(String),
    /// ONNX Runtime refused an operation (session creation, run, tensor extraction).
    #[error("ONNX Runtime error for {model}: {message}")]
    Onnx { model: String, message: String },
    /// A model's inputs or outputs do not have the signature its role needs.
    #[error("model {model}: {message}")]
    ModelSignature { model: String, message: String },
    /// A model file could not be read.
    #[error("cannot read model file {path}: {source}")]
    ModelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A torch checkpoint (`.pth`) could not be parsed or has an unexpected layout.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    /// The tokenizer vocabulary is malformed.
    #[error("CLIP vocabulary: {0}")]
    Vocabulary(String),
    /// An image could not be decoded (the sample keeps null scores; the shard goes on).
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// A configuration value is invalid (thresholds file, scorer settings).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A catalog column is missing or has an unexpected type.
    #[error("column {column}: {message}")]
    Column { column: String, message: String },
    /// The requested execution provider is not in the installed ONNX Runtime library.
    #[error("execution provider {0} is not available in the loaded ONNX Runtime library")]
    ProviderUnavailable(String),
    /// A catalog operation failed.
    #[error(transparent)]
    Catalog(#[from] llamagen_catalog::CatalogError),
    /// An Arrow operation failed while building the output columns.
    #[error("arrow: {0}")]
    Arrow(#[from] llamagen_catalog::arrow::error::ArrowError),
    /// Reading or writing a report or config file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = FilterError> = std::result::Result<T, E>;

impl FilterError {
    /// A stage run's error: the stage's own error where the catalog's runner carried one.
    pub fn from_catalog(e: llamagen_catalog::CatalogError) -> Self {
        e.into_external::<FilterError>()
            .unwrap_or_else(FilterError::Catalog)
    }
}
