//! Preprocessing with no model behind it, exact to the Python tools the official pipelines use:
//! Pillow's resize and ADM's crops ([`pixels`], [`resample`]), scikit-image's PSNR and SSIM
//! ([`metrics`]), and Python's `html.unescape` and `ftfy.fix_text` ([`text`]). The download,
//! filter and encode crates share it, so none of them compiles a model runtime to reach it.

pub mod error;
pub mod metrics;
pub mod pixels;
pub mod resample;
pub mod text;

pub use error::PrepError;
