//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading, running, sampling or training a GPT.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (manifest, config, training state) could not be parsed.
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A checkpoint file could not be decoded (not safetensors / not a torch zip checkpoint).
    #[error("cannot read checkpoint {path}: {reason}")]
    UnreadableCheckpoint { path: PathBuf, reason: String },

    /// A checkpoint lacks a tensor the model needs.
    #[error("checkpoint {path} has no tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },

    /// A checkpoint tensor has a different shape than the configured model.
    #[error(
        "checkpoint {path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}"
    )]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A checkpoint holds a tensor that the configured model does not have.
    #[error("checkpoint {path} has tensor `{name}` that the configured model does not have")]
    UnexpectedTensor { path: PathBuf, name: String },

    /// A reference file lacks a tensor or value the check needs.
    #[error("reference {path}: missing `{name}`")]
    MissingReference { path: PathBuf, name: String },

    /// A configuration is inconsistent (e.g. dim not divisible by n_head).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// Inputs do not fit the model (wrong batch, length, condition kind, dtype).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// The catalog could not be opened or a shard could not be read.
    #[cfg(feature = "catalog")]
    #[error("catalog: {0}")]
    Catalog(#[from] llamagen_catalog::CatalogError),

    /// The VQ tokenizer could not be built, loaded or run, or an image could not be prepared.
    #[cfg(feature = "catalog")]
    #[error("VQ tokenizer: {0}")]
    Encode(#[from] llamagen_encode::EncodeError),

    /// An image could not be read, resized or cropped.
    #[cfg(feature = "catalog")]
    #[error("image: {0}")]
    Image(#[from] llamagen_prep::PrepError),

    /// Training data is unusable (no usable rows, malformed columns).
    #[error("training data: {0}")]
    Data(String),

    /// The loss became NaN or infinite.
    #[error("non-finite loss {loss} at step {step}")]
    NonFiniteLoss { step: u64, loss: f32 },

    /// A training run stopped on a non-finite loss or gradient norm.
    #[error("training stopped: {reason}; {}", match last_checkpoint {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written before it".to_string(),
    })]
    Diverged {
        reason: String,
        last_checkpoint: Option<PathBuf>,
    },

    /// The gradient norm became NaN or infinite.
    #[error("non-finite gradient norm {norm} at step {step}")]
    NonFiniteGradient { step: u64, norm: f32 },

    /// The launch environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...) or launcher options
    /// are missing, malformed or inconsistent.
    #[error("distributed launch: {0}")]
    DistLaunch(String),

    /// The ranks could not meet at rank 0's rendezvous socket.
    #[error("rank {rank}: rendezvous at {addr} failed: {reason}")]
    Rendezvous {
        rank: usize,
        addr: String,
        reason: String,
    },

    /// A peer's connection closed or broke during a collective (its process died).
    #[error("rank {rank}: lost rank {peer} during {during}: {reason}")]
    PeerLost {
        rank: usize,
        peer: usize,
        during: String,
        reason: String,
    },

    /// A peer sent nothing for the whole timeout during a collective.
    #[error(
        "rank {rank}: rank {peer} did not answer within {secs}s during {during} (hung or \
         stopped; the timeout is train.dist_timeout_s)"
    )]
    PeerTimeout {
        rank: usize,
        peer: usize,
        during: String,
        secs: u64,
    },

    /// Rank 0 stopped the job and sent the reason (another rank was lost or misbehaved).
    #[error("rank {rank}: rank 0 stopped the job during {during}: {reason}")]
    PeerAborted {
        rank: usize,
        during: String,
        reason: String,
    },

    /// The ranks disagree on what collective or buffer comes next.
    #[error("distributed protocol: {0}")]
    DistProtocol(String),

    /// Data-parallel replicas no longer hold bit-identical parameters.
    #[error(
        "replicas diverged at step {step}: the parameters of rank(s) {ranks:?} differ from rank 0's"
    )]
    ReplicasDiverged { step: u64, ranks: Vec<usize> },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
