//! The LlamaGen VQ image tokenizer in candle: the `VQModel` (encoder, L2-normalised quantizer,
//! decoder) loaded from safetensors or official torch checkpoints under the official key names,
//! and the image preprocessing of LlamaGen's code extraction (`center_crop_arr`, ten-crop).

pub mod augment;
pub mod checkpoint;
pub mod codes;
pub mod conformance;
pub mod error;
pub mod metrics;
pub mod vq;

pub use conformance::{Check, conformance_checks};
pub use error::EncodeError;
pub use vq::{ModelArgs, VqModel};
