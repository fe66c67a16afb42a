//! The one error type of this crate.

/// What can go wrong while starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A request field is missing, of the wrong type or out of range (HTTP 400).
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },

    /// The request body is not a JSON object (HTTP 400).
    #[error("the body is not a JSON object: {0}")]
    InvalidJson(String),

    /// The queue of waiting requests is full (HTTP 429).
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),

    /// The server is draining after SIGTERM and takes no new requests (HTTP 503).
    #[error("the server is shutting down")]
    ShuttingDown,

    /// The generation engine stopped working (a thread panicked); the server must be restarted
    /// (HTTP 503, and `/health` says why).
    #[error("the generation engine stopped: {0}")]
    EngineFailed(String),

    /// A setting of the server itself is invalid (flags).
    #[error("invalid server setting: {0}")]
    InvalidSetting(String),

    /// The model refused or failed a generation.
    #[error("generation failed: {0}")]
    Model(#[from] llamagen_train::TrainError),

    /// The VQ decoder failed.
    #[error("VQ decoding failed: {0}")]
    Decode(#[from] llamagen_encode::EncodeError),

    /// The prompt encoder refused or failed a prompt.
    #[error("prompt encoding failed: {0}")]
    Prompt(String),

    /// The listening socket or the runtime failed.
    #[error("server I/O failed: {0}")]
    Io(#[from] std::io::Error),

    /// A failure inside another library (tensors, PNG encoding, threads).
    #[error("{0}")]
    External(String),
}

impl ServeError {
    /// `InvalidField` for `field`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ServeError::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<candle_core::Error> for ServeError {
    fn from(e: candle_core::Error) -> Self {
        ServeError::External(format!("tensor operation failed: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, ServeError>;
