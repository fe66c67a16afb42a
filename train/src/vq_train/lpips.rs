//! LPIPS perceptual distance with a VGG16 backbone, as LlamaGen's VQ loss uses it.
//!
//! Invariants enforced here:
//! - Input scaling: `(x − shift)/scale` per channel, shift (−.030, −.088, −.188), scale
//!   (.458, .448, .450).
//! - VGG16 `features` (torchvision key names `features.{i}.weight/bias`) cut at relu1_2,
//!   relu2_2, relu3_3, relu4_3 and relu5_3 (slices `[0:4]`, `[4:9]`, `[9:16]`, `[16:23]`,
//!   `[23:30]`): 3×3 convs with padding 1, ReLU, and 2×2 max-pooling between the slices (a
//!   window's gradient goes to its maximum). The channel widths are read from the checkpoint's
//!   shapes.
//! - Each feature map is divided by `sqrt(Σ_c f²) + 1e-10`; the squared difference of the two
//!   normalised maps goes through Dropout (p 0.5, when enabled) and the bias-free 1×1 conv
//!   `lin{k}.model.1.weight`; the result is averaged over space, and the five are summed: one
//!   value per image, shape (B, 1, 1, 1).
//! - Dropout is active by default, as in LlamaGen's training loop (its `.train()` call undoes
//!   `LPIPS().eval()`). Masks come from the caller-supplied seed, so a step is reproducible.
//! - No LPIPS weight is trained; gradients flow through to the images only.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Module, Tensor};
use llamagen_encode::conv::Conv2d;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};
use crate::train::mix_seed;

/// The five LPIPS v0.1 linear heads for VGG16 (`lin{0..4}.model.1.weight`), shipped with the
/// crate (provenance and licence: `train/assets/lpips/`).
pub const BUNDLED_LIN_WEIGHTS: &[u8] = include_bytes!("../../assets/lpips/vgg_lin.safetensors");

/// Indices of the 13 conv layers of torchvision's `vgg16().features`.
pub const VGG16_CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// Convs per slice (the slices end at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
const SLICE_CONVS: [usize; 5] = [2, 2, 3, 3, 3];
/// The file name of torchvision's ImageNet VGG16 weights.
pub const VGG16_FILE: &str = "vgg16-397923af.pth";
/// Dropout probability before each linear head.
pub const LPIPS_DROPOUT_P: f64 = 0.5;

const SHIFT: [f32; 3] = [-0.030, -0.088, -0.188];
const SCALE: [f32; 3] = [0.458, 0.448, 0.450];

/// LPIPS-VGG16 (module invariants).
#[derive(Debug, Clone)]
pub struct Lpips {
    slices: Vec<Vec<Conv2d>>,
    lins: Vec<Tensor>,
    shift: Tensor,
    scale: Tensor,
    dropout: bool,
}

fn missing_backbone(path: &Path) -> TrainError {
    TrainError::InvalidConfig(format!(
        "the LPIPS loss needs the VGG16 ImageNet backbone: torchvision's `vgg16` state_dict \
         (`{VGG16_FILE}`, the file `torchvision.models.vgg16(weights=\"IMAGENET1K_V1\")` \
         downloads to ~/.cache/torch/hub/checkpoints/, or a safetensors conversion of it with \
         the keys features.{{0,2,5,7,10,12,14,17,19,21,24,26,28}}.weight/bias); \
         {} does not exist",
        path.display()
    ))
}

/// Reads the named tensors of a torch zip (`.pth`) or safetensors file; only `names` are
/// materialised.
fn read_tensors(path: &Path, names: &[String], device: &Device) -> Result<HashMap<String, Tensor>> {
    let unreadable = |reason: String| TrainError::UnreadableCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| TrainError::io(path, e))?;
    drop(f);
    let mut out = HashMap::new();
    if n == 4 && &magic == b"PK\x03\x04" {
        let pth = PthTensors::new(path, None).map_err(|e| unreadable(e.to_string()))?;
        for name in names {
            if let Some(t) = pth.get(name).map_err(|e| unreadable(e.to_string()))? {
                out.insert(name.clone(), t.to_dtype(DType::F32)?.to_device(device)?);
            }
        }
    } else {
        let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
        let all = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| unreadable(format!("neither a torch zip nor safetensors: {e}")))?;
        for name in names {
            if let Some(t) = all.get(name) {
                out.insert(name.clone(), t.to_dtype(DType::F32)?);
            }
        }
    }
    Ok(out)
}

impl Lpips {
    /// Loads the VGG16 backbone from `vgg_path` (torchvision state_dict, `.pth` or
    /// safetensors) and the linear heads from `lin_path` (None: the bundled LPIPS v0.1 heads).
    pub fn load(
        vgg_path: &Path,
        lin_path: Option<&Path>,
        dropout: bool,
        device: &Device,
    ) -> Result<Self> {
        if !vgg_path.is_file() {
            return Err(missing_backbone(vgg_path));
        }
        let mut names = Vec::new();
        for i in VGG16_CONV_INDICES {
            names.push(format!("features.{i}.weight"));
            names.push(format!("features.{i}.bias"));
        }
        let vgg = read_tensors(vgg_path, &names, device)?;
        let lin_names: Vec<String> = (0..5).map(|k| format!("lin{k}.model.1.weight")).collect();
        let (lins, lin_source) = match lin_path {
            Some(p) => (read_tensors(p, &lin_names, device)?, p.to_path_buf()),
            None => {
                let all = candle_core::safetensors::load_buffer(BUNDLED_LIN_WEIGHTS, device)?;
                (all, PathBuf::from("<bundled LPIPS v0.1 vgg heads>"))
            }
        };
        Self::from_tensors(&vgg, vgg_path, &lins, &lin_source, dropout, device)
    }

    /// Builds LPIPS from already-loaded backbone and head tensors (see [`Self::load`]).
    pub fn from_tensors(
        vgg: &HashMap<String, Tensor>,
        vgg_source: &Path,
        lins: &HashMap<String, Tensor>,
        lin_source: &Path,
        dropout: bool,
        device: &Device,
    ) -> Result<Self> {
        let get = |map: &HashMap<String, Tensor>, src: &Path, name: &str| {
            map.get(name)
                .cloned()
                .ok_or_else(|| TrainError::MissingTensor {
                    path: src.to_path_buf(),
                    name: name.to_string(),
                    expected: vec![],
                })
        };
        let mut slices = Vec::new();
        let mut conv_iter = VGG16_CONV_INDICES.iter();
        let mut in_c = 3;
        let mut widths = Vec::new();
        for &n in &SLICE_CONVS {
            let mut convs = Vec::new();
            for _ in 0..n {
                let i = conv_iter.next().expect("13 convs in 5 slices");
                let w = get(vgg, vgg_source, &format!("features.{i}.weight"))?;
                let b = get(vgg, vgg_source, &format!("features.{i}.bias"))?;
                let (out_c, wc, kh, kw) = w.dims4()?;
                if wc != in_c || kh != 3 || kw != 3 || b.dims() != [out_c] {
                    return Err(TrainError::ShapeMismatch {
                        path: vgg_source.to_path_buf(),
                        name: format!("features.{i}.weight"),
                        expected: vec![out_c, in_c, 3, 3],
                        found: w.dims().to_vec(),
                    });
                }
                in_c = out_c;
                convs.push(Conv2d::new(
                    w.to_dtype(DType::F32)?.to_device(device)?,
                    Some(b.to_dtype(DType::F32)?.to_device(device)?),
                    1,
                    1,
                ));
            }
            widths.push(in_c);
            slices.push(convs);
        }
        let mut lin_ts = Vec::new();
        for (k, &c) in widths.iter().enumerate() {
            let name = format!("lin{k}.model.1.weight");
            let w = get(lins, lin_source, &name)?;
            if w.dims() != [1, c, 1, 1] {
                return Err(TrainError::ShapeMismatch {
                    path: lin_source.to_path_buf(),
                    name,
                    expected: vec![1, c, 1, 1],
                    found: w.dims().to_vec(),
                });
            }
            lin_ts.push(
                w.to_dtype(DType::F32)?
                    .to_device(device)?
                    .reshape((1, c, 1, 1))?,
            );
        }
        Ok(Lpips {
            slices,
            lins: lin_ts,
            shift: Tensor::new(&SHIFT, device)?.reshape((1, 3, 1, 1))?,
            scale: Tensor::new(&SCALE, device)?.reshape((1, 3, 1, 1))?,
            dropout,
        })
    }

    /// Whether dropout is applied before the linear heads.
    pub fn dropout(&self) -> bool {
        self.dropout
    }

    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.broadcast_sub(&self.shift)?.broadcast_div(&self.scale)?;
        let mut out = Vec::with_capacity(5);
        for (s, convs) in self.slices.iter().enumerate() {
            if s > 0 {
                h = max_pool_2x2(&h)?;
            }
            for c in convs {
                h = c.forward(&h)?.relu()?;
            }
            out.push(h.clone());
        }
        Ok(out)
    }

    /// LPIPS(x0, x1) per image, shape (B, 1, 1, 1). `seed` draws the dropout masks (ignored
    /// when dropout is off).
    pub fn forward(&self, x0: &Tensor, x1: &Tensor, seed: u64) -> Result<Tensor> {
        let f0 = self.features(x0)?;
        let f1 = self.features(x1)?;
        let mut total: Option<Tensor> = None;
        for (k, ((a, b), lin)) in f0.iter().zip(&f1).zip(&self.lins).enumerate() {
            let d = (normalize_channels(a)? - normalize_channels(b)?)?.sqr()?;
            let d = if self.dropout {
                let mask = dropout_mask(d.dims(), mix_seed(&[seed, k as u64]), d.device())?;
                (d * mask)?
            } else {
                d
            };
            // 1×1 conv with one output channel and no bias = weighted channel sum.
            let v = d.broadcast_mul(lin)?.sum_keepdim(1)?;
            let v = v.mean_keepdim(2)?.mean_keepdim(3)?;
            total = Some(match total {
                None => v,
                Some(t) => (t + v)?,
            });
        }
        total.ok_or_else(|| TrainError::InvalidConfig("LPIPS without layers".into()))
    }
}

/// 2×2 max-pooling with stride 2 (odd trailing rows/columns dropped, as PyTorch's floor mode),
/// written as a reshape and two max reductions: candle's `max_pool2d` backward scales the
/// gradient of a window's maximum by 1/4 instead of passing it through.
fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = x.narrow(2, 0, oh * 2)?.narrow(3, 0, ow * 2)?;
    Ok(x.reshape((b, c, oh, 2, ow, 2))?.max(5)?.max(3)?)
}

/// `x / (sqrt(Σ_c x²) + 1e-10)` over the channel axis.
fn normalize_channels(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&(norm + 1e-10)?)?)
}

/// Inverted-dropout mask: 0 with probability p, else 1/(1 − p).
fn dropout_mask(dims: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let keep = (1.0 / (1.0 - LPIPS_DROPOUT_P)) as f32;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < LPIPS_DROPOUT_P {
                0.0
            } else {
                keep
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}
