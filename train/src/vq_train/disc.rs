//! The PatchGAN discriminator of LlamaGen's VQ training (`NLayerDiscriminator`), with the
//! official key names `main.{i}.*`.
//!
//! Invariants enforced here:
//! - Layout for `n_layers` = 3 (the official setting): `main.0` conv 3→ndf k4 s2 p1 (+bias),
//!   LeakyReLU 0.2; then for n = 1..n_layers a conv k4 s2 p1 without bias, BatchNorm2d,
//!   LeakyReLU (channels ndf·min(2ⁿ, 8)); then a conv k4 **s1** p1 without bias, BatchNorm2d,
//!   LeakyReLU; then a conv k4 s1 p1 to one channel (+bias). Module indices count the
//!   activations, so BatchNorms sit at `main.3`, `main.6`, `main.9` and the last conv at
//!   `main.11`.
//! - BatchNorm is always in training mode (as in the official loop): it normalises with the
//!   batch mean and **biased** variance over (N, H, W), eps 1e-5, and updates
//!   `running_mean`/`running_var` with momentum 0.1, the variance **unbiased** (n/(n−1)), and
//!   `num_batches_tracked` += 1 on every forward call.
//! - Every operation on the training path is a composed, differentiable candle op.
//! - Initialisation (from scratch): conv weights N(0, 0.02), conv biases U(±1/√fan_in) (the
//!   PyTorch default the official init leaves alone), BatchNorm weight N(1, 0.02), bias 0,
//!   running mean 0, running var 1.

use candle_core::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use llamagen_encode::conv::Conv2d;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// BatchNorm2d epsilon.
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm2d momentum of the running statistics.
pub const BN_MOMENTUM: f64 = 0.1;
/// Slope of the LeakyReLU for negative inputs.
pub const LEAKY_SLOPE: f64 = 0.2;

/// Discriminator hyper-parameters (official: ndf 64, n_layers 3, 3 input channels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscConfig {
    /// Input channels. Default 3.
    pub input_nc: usize,
    /// Channels of the first conv. Default 64.
    pub ndf: usize,
    /// Number of stride-2 blocks. Default 3.
    pub n_layers: usize,
}

impl Default for DiscConfig {
    fn default() -> Self {
        DiscConfig {
            input_nc: 3,
            ndf: 64,
            n_layers: 3,
        }
    }
}

/// One layer of the `main` sequence.
#[derive(Debug, Clone)]
enum Spec {
    Conv {
        idx: usize,
        in_c: usize,
        out_c: usize,
        stride: usize,
        bias: bool,
    },
    Bn {
        idx: usize,
        c: usize,
    },
    Leaky,
}

impl DiscConfig {
    fn validate(&self) -> Result<()> {
        if self.input_nc == 0 || self.ndf == 0 || self.n_layers == 0 {
            return Err(TrainError::InvalidConfig(
                "discriminator input_nc, ndf and n_layers must be positive".into(),
            ));
        }
        Ok(())
    }

    fn layers(&self) -> Vec<Spec> {
        let mut out = vec![
            Spec::Conv {
                idx: 0,
                in_c: self.input_nc,
                out_c: self.ndf,
                stride: 2,
                bias: true,
            },
            Spec::Leaky,
        ];
        let mut idx = 2;
        let mut mult = 1;
        for n in 1..=self.n_layers {
            let prev = mult;
            mult = (1usize << n).min(8);
            let stride = if n < self.n_layers { 2 } else { 1 };
            out.push(Spec::Conv {
                idx,
                in_c: self.ndf * prev,
                out_c: self.ndf * mult,
                stride,
                bias: false,
            });
            out.push(Spec::Bn {
                idx: idx + 1,
                c: self.ndf * mult,
            });
            out.push(Spec::Leaky);
            idx += 3;
        }
        out.push(Spec::Conv {
            idx,
            in_c: self.ndf * mult,
            out_c: 1,
            stride: 1,
            bias: true,
        });
        out
    }

    /// Trainable parameter names and shapes, in state_dict order.
    pub fn parameter_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for l in self.layers() {
            match l {
                Spec::Conv {
                    idx,
                    in_c,
                    out_c,
                    bias,
                    ..
                } => {
                    out.push((format!("main.{idx}.weight"), vec![out_c, in_c, 4, 4]));
                    if bias {
                        out.push((format!("main.{idx}.bias"), vec![out_c]));
                    }
                }
                Spec::Bn { idx, c } => {
                    out.push((format!("main.{idx}.weight"), vec![c]));
                    out.push((format!("main.{idx}.bias"), vec![c]));
                }
                Spec::Leaky => {}
            }
        }
        out
    }

    /// Fills `varmap` with freshly initialised parameters (module invariants), drawn from a
    /// generator seeded with `seed`.
    pub fn init_varmap(&self, varmap: &VarMap, seed: u64, device: &Device) -> Result<()> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = varmap.data().lock().expect("VarMap lock poisoned");
        for l in self.layers() {
            match l {
                Spec::Conv {
                    idx,
                    in_c,
                    out_c,
                    bias,
                    ..
                } => {
                    let w = normal(&mut rng, out_c * in_c * 16, 0.0, 0.02);
                    let w = Tensor::from_vec(w, (out_c, in_c, 4, 4), device)?;
                    data.insert(format!("main.{idx}.weight"), Var::from_tensor(&w)?);
                    if bias {
                        let bound = 1.0 / ((in_c * 16) as f64).sqrt();
                        let b: Vec<f32> = (0..out_c)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect();
                        let b = Tensor::from_vec(b, out_c, device)?;
                        data.insert(format!("main.{idx}.bias"), Var::from_tensor(&b)?);
                    }
                }
                Spec::Bn { idx, c } => {
                    let w = Tensor::from_vec(normal(&mut rng, c, 1.0, 0.02), c, device)?;
                    data.insert(format!("main.{idx}.weight"), Var::from_tensor(&w)?);
                    let b = Tensor::zeros(c, DType::F32, device)?;
                    data.insert(format!("main.{idx}.bias"), Var::from_tensor(&b)?);
                }
                Spec::Leaky => {}
            }
        }
        Ok(())
    }
}

/// Box–Muller normal samples in float32.
fn normal(rng: &mut StdRng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random::<f64>();
            (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// BatchNorm2d in training mode with its running statistics (module invariants).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: i64,
}

impl BatchNorm2d {
    /// Training-mode forward: normalises with the batch statistics and updates the running ones.
    pub fn forward_train(&mut self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = b * h * w;
        if n < 2 {
            return Err(TrainError::InvalidInput(format!(
                "BatchNorm2d in training mode needs more than one value per channel, got input {:?}",
                x.dims()
            )));
        }
        // (C, N·H·W) view for the statistics.
        let flat = x.transpose(0, 1)?.reshape((c, n))?;
        let mean = flat.mean_keepdim(D::Minus1)?; // (C, 1)
        let centred = flat.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?; // biased, (C, 1)
        let inv_std = (var.clone() + BN_EPS)?.sqrt()?.recip()?;
        let shape = (1, c, 1, 1);
        let xn = x
            .broadcast_sub(&mean.reshape(shape)?)?
            .broadcast_mul(&inv_std.reshape(shape)?)?;
        let y = xn
            .broadcast_mul(&self.weight.reshape(shape)?)?
            .broadcast_add(&self.bias.reshape(shape)?)?;
        let mean_d = mean.detach().flatten_all()?;
        let var_unbiased = (var.detach().flatten_all()? * (n as f64 / (n as f64 - 1.0)))?;
        self.running_mean =
            ((&self.running_mean * (1.0 - BN_MOMENTUM))? + (mean_d * BN_MOMENTUM)?)?;
        self.running_var =
            ((&self.running_var * (1.0 - BN_MOMENTUM))? + (var_unbiased * BN_MOMENTUM)?)?;
        self.num_batches_tracked += 1;
        Ok(y)
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Bn(usize, BatchNorm2d),
    Leaky,
}

/// The PatchGAN discriminator (module invariants).
#[derive(Debug, Clone)]
pub struct Discriminator {
    cfg: DiscConfig,
    layers: Vec<Layer>,
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    // max(x, 0) − 0.2·max(−x, 0): composed ops with a backward pass.
    Ok((x.relu()? - (x.neg()?.relu()? * LEAKY_SLOPE)?)?)
}

impl Discriminator {
    /// Builds the discriminator from `vb` (parameters `main.{i}.weight/bias`). The running
    /// statistics start at mean 0, var 1, count 0; restore them with [`Self::load_buffers`].
    pub fn load(vb: VarBuilder, cfg: &DiscConfig) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::new();
        for l in cfg.layers() {
            layers.push(match l {
                Spec::Conv {
                    idx,
                    in_c,
                    out_c,
                    stride,
                    bias,
                } => {
                    let vb = vb.pp(format!("main.{idx}"));
                    let w = vb.get((out_c, in_c, 4, 4), "weight")?;
                    let b = if bias {
                        Some(vb.get(out_c, "bias")?)
                    } else {
                        None
                    };
                    Layer::Conv(Conv2d::new(w, b, 1, stride))
                }
                Spec::Bn { idx, c } => {
                    let vb = vb.pp(format!("main.{idx}"));
                    Layer::Bn(
                        idx,
                        BatchNorm2d {
                            weight: vb.get(c, "weight")?,
                            bias: vb.get(c, "bias")?,
                            running_mean: Tensor::zeros(c, DType::F32, vb.device())?,
                            running_var: Tensor::ones(c, DType::F32, vb.device())?,
                            num_batches_tracked: 0,
                        },
                    )
                }
                Spec::Leaky => Layer::Leaky,
            });
        }
        Ok(Discriminator {
            cfg: cfg.clone(),
            layers,
        })
    }

    pub fn config(&self) -> &DiscConfig {
        &self.cfg
    }

    /// Training-mode forward: images (B, C, H, W) → logit map (B, 1, H', W'); BatchNorm
    /// running statistics are updated.
    pub fn forward_train(&mut self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &mut self.layers {
            h = match l {
                Layer::Conv(c) => c.forward(&h)?,
                Layer::Bn(_, bn) => bn.forward_train(&h)?,
                Layer::Leaky => leaky_relu(&h)?,
            };
        }
        Ok(h)
    }

    /// The BatchNorm buffers under their official keys: `main.{i}.running_mean`,
    /// `main.{i}.running_var` (float32) and `main.{i}.num_batches_tracked` (int64, shape []).
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for l in &self.layers {
            if let Layer::Bn(idx, bn) = l {
                let dev = bn.running_mean.device();
                out.push((format!("main.{idx}.running_mean"), bn.running_mean.clone()));
                out.push((format!("main.{idx}.running_var"), bn.running_var.clone()));
                out.push((
                    format!("main.{idx}.num_batches_tracked"),
                    Tensor::new(bn.num_batches_tracked, dev)?,
                ));
            }
        }
        Ok(out)
    }

    /// Restores the buffers written by [`Self::buffers`] (all of them must be present).
    pub fn load_buffers(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        let get = |name: String| {
            tensors
                .get(&name)
                .cloned()
                .ok_or(TrainError::MissingReference {
                    path: source.to_path_buf(),
                    name,
                })
        };
        for l in &mut self.layers {
            if let Layer::Bn(idx, bn) = l {
                let c = bn.weight.dim(0)?;
                for (suffix, slot) in [
                    ("running_mean", &mut bn.running_mean),
                    ("running_var", &mut bn.running_var),
                ] {
                    let name = format!("main.{idx}.{suffix}");
                    let t = get(name.clone())?;
                    if t.dims() != [c] {
                        return Err(TrainError::ShapeMismatch {
                            path: source.to_path_buf(),
                            name,
                            expected: vec![c],
                            found: t.dims().to_vec(),
                        });
                    }
                    *slot = t.to_dtype(DType::F32)?.to_device(bn.weight.device())?;
                }
                let n = get(format!("main.{idx}.num_batches_tracked"))?;
                bn.num_batches_tracked = n
                    .to_dtype(DType::I64)?
                    .flatten_all()?
                    .to_vec1::<i64>()?
                    .first()
                    .copied()
                    .unwrap_or(0);
            }
        }
        Ok(())
    }
}
