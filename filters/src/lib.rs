//! LAION-style sample scores on ONNX Runtime, and re-tunable keep/drop rules over them.
//!
//! - [`scorer`]: decodes each sample's largest stored image once, preprocesses it for CLIP
//!   (ViT-B/32 similarity, ViT-L/14 embedding) and for the watermark classifier, tokenizes its
//!   caption, runs the models in batches while the next batch is being preprocessed, and returns
//!   the scores: `score_clip_similarity`, `score_aesthetic`, `score_watermark`, `score_nsfw`,
//!   and the ViT-L/14 image embedding itself (`clip_embedding`, which semantic dedup reads).
//! - [`rules`]: thresholds (min/max, inclusive or exclusive, scale stated) turned into
//!   `reject_reasons` and `status`, recomputed from the stored scores without re-scoring.
//! - [`stage`]: both as catalog stages.
//!
//! Models are ONNX files whose signatures are read from their metadata ([`model`]); the ONNX
//! Runtime library is found at run time ([`runtime`]).

pub mod error;
pub mod heads;
pub mod model;
pub mod preprocess;
pub mod report;
pub mod rules;
pub mod runtime;
pub mod scorer;
pub mod stage;
pub mod text;
pub mod tokenizer;

pub use error::{FilterError, Result};
