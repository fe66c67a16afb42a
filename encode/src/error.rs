//! The crate's one error type. Every variant names the file, tensor or image it is about.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or checking the VQ tokenizer, its image
/// preprocessing, the caption files and the T5 text encoder.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Prep(#[from] llamagen_prep::PrepError),

    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    #[error("invalid VQ model config: {0}")]
    InvalidConfig(String),

    #[error("{file}: tensor {name:?} is missing (expected shape {expected:?})")]
    MissingTensor {
        file: String,
        name: String,
        expected: Vec<usize>,
    },

    #[error("{file}: tensor {name:?} has shape {found:?}, but the model expects {expected:?}")]
    TensorShape {
        file: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: tensor {name:?} is not part of the model (shape {found:?})")]
    UnexpectedTensor {
        file: String,
        name: String,
        found: Vec<usize>,
    },

    #[error("unreadable checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    #[error("cannot decode image {path}: {source}")]
    ImageDecode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error(
        "image of {width}x{height} pixels does not fit the VQ grid: both sides must be positive \
         multiples of the downsampling factor {factor}"
    )]
    ImageSize {
        width: usize,
        height: usize,
        factor: usize,
    },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("{what} not found: {path}")]
    MissingFile { what: &'static str, path: PathBuf },

    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("tokenizing caption failed: {0}")]
    Tokenize(String),

    #[error("{path}, line {line}: {reason}")]
    CaptionFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error("caption file {path}: {reason}")]
    CaptionParquet { path: PathBuf, reason: String },

    #[error("catalog: {0}")]
    Catalog(#[from] llamagen_catalog::CatalogError),

    #[error("malformed reference data {path}: {reason}")]
    Reference { path: PathBuf, reason: String },
}

impl EncodeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A stage run's error: the stage's own error where the catalog's runner carried one.
    pub fn from_catalog(e: llamagen_catalog::CatalogError) -> Self {
        e.into_external::<EncodeError>()
            .unwrap_or_else(EncodeError::Catalog)
    }
}
