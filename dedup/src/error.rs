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
    /// Any other error of a library underneath (I/O while reading, the decoder's limits).
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync>),
}

impl From<std::io::Error> for DedupError {
    fn from(e: std::io::Error) -> Self {
        DedupError::External(Box::new(e))
    }
}
