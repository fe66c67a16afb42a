//! The crate's one error type. Every variant names the image or file it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PrepError {
    /// An image or value that the operation cannot take (sizes, shapes, buffer lengths).
    #[error("{0}")]
    InvalidInput(String),

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot decode image {path}: {source}")]
    ImageDecode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

impl PrepError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        PrepError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
