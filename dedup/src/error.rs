//! Errors of the deduplication crate.

/// What went wrong while hashing an image.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The bytes are not in any image format this build decodes (AVIF and HEIF included: the
    /// `image` crate is built without their decoders).
    #[error("unrecognised or unsupported image format: {0}")]
    UnsupportedFormat(String),
    /// The file is an image, but corrupt or truncated.
    #[error("cannot decode image: {0}")]
    Decode(String),
    /// A side is zero.
    #[error("image has a zero side ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    /// More pixels than the caller allows (refused before the pixels are allocated).
    #[error("{width}x{height} image exceeds the limit of {max_pixels} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// A decoded pixel layout with no Pillow `convert("L")` equivalent here (floating-point
    /// images).
    #[error("unsupported pixel type {0}")]
    UnsupportedPixelType(String),
    /// A threshold, keep rule or LSH setting that cannot work; the message names the key.
    #[error("dedup config: {0}")]
    Config(String),
    /// The catalog refused a read or a commit.
    #[error(transparent)]
    Catalog(#[from] llamagen_catalog::CatalogError),
    /// Any other error of a library underneath (I/O while reading, the decoder's limits, a SQL
    /// query), with what was being done.
    #[error("{context}: {source}")]
    External {
        context: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DedupError {
    /// A catalog error, with a dedup error a stage returned recovered from inside it.
    pub fn from_catalog(e: llamagen_catalog::CatalogError) -> DedupError {
        match e {
            llamagen_catalog::CatalogError::External { context, source } => {
                match source.downcast::<DedupError>() {
                    Ok(d) => *d,
                    Err(source) => DedupError::External { context, source },
                }
            }
            e => DedupError::Catalog(e),
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, DedupError>;

impl From<std::io::Error> for DedupError {
    fn from(e: std::io::Error) -> Self {
        DedupError::External {
            context: "reading an image".into(),
            source: Box::new(e),
        }
    }
}
