//! The LlamaGen VQ image tokenizer in candle: the `VQModel` (encoder, L2-normalised quantizer,
//! decoder) loaded from safetensors or official torch checkpoints under the official key names,
//! and the image preprocessing of LlamaGen's code extraction (`center_crop_arr`, ten-crop).
//!
//! The text side: long captions joined from caption files ([`captions`]), first-sentence short
//! captions ([`sentence`]), LlamaGen's caption cleaning ([`clean`]) and the T5 encoder features
//! that condition the text-to-image model ([`t5`], [`text_encoder`], [`text_stage`]).

pub mod activation;
pub mod augment;
pub mod captions;
pub mod checkpoint;
pub mod clean;
pub mod codes;
pub mod conformance;
pub mod conv;
pub mod error;
pub mod html_text;
pub mod metrics;
pub mod norm;
pub use llamagen_prep::resample;
pub mod sentence;
pub use llamagen_kernels::sgemm;
pub mod t5;
pub mod text_encoder;
pub mod text_stage;
pub mod torch_save;
pub mod vq;
pub mod vq_stage;

pub use conformance::{Check, conformance_checks};
pub use error::EncodeError;
pub use vq::{ModelArgs, VqModel};
