//! LlamaGen's reconstruction metrics: PSNR and SSIM (`llamagen_prep::metrics`, scikit-image's)
//! of a decoded image against the model input.
//!
//! Invariants enforced here:
//! - [`llamagen_reconstruction_metrics`] compares the decoded image, turned to u8 as
//!   `trunc(clamp(127.5·x + 128, 0, 255))` and divided by 255, against the input mapped to
//!   [0, 1] as `(x + 1)/2`; PSNR uses data range 1 and SSIM uses data range **2** (as the
//!   official script passes `data_range=2.0`).

use candle_core::{DType, Tensor};

use crate::error::EncodeError;

pub use llamagen_prep::metrics::{SSIM_WINDOW, psnr, ssim};

type Result<T> = std::result::Result<T, EncodeError>;

/// PSNR and SSIM of a reconstruction as LlamaGen's evaluation reports them, for one image pair
/// given as (3, H, W) tensors in [−1, 1]: `original` the model input, `decoded` the decoder
/// output.
pub fn llamagen_reconstruction_metrics(original: &Tensor, decoded: &Tensor) -> Result<(f64, f64)> {
    let (c, h, w) = original.dims3()?;
    if decoded.dims() != original.dims() {
        return Err(EncodeError::InvalidInput(format!(
            "decoded shape {:?} differs from the original {:?}",
            decoded.dims(),
            original.dims()
        )));
    }
    let hwc = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let gt: Vec<f32> = hwc(original)?.iter().map(|v| (v + 1.0) / 2.0).collect();
    let restored: Vec<f32> = hwc(decoded)?
        .iter()
        .map(|v| (127.5 * v + 128.0).clamp(0.0, 255.0).trunc() / 255.0)
        .collect();
    let p = psnr(&restored, &gt, 1.0)?;
    let s = ssim(&restored, &gt, h, w, c, 2.0)?;
    Ok((p, s))
}
