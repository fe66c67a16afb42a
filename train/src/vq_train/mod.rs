//! VQ tokenizer training (LlamaGen `vq_train.py` / `vq_loss.py`): reconstruction, LPIPS and
//! PatchGAN hinge losses on top of the quantizer's vq and commitment losses, Adam for the model
//! and for the discriminator, checkpoints with exact resume.
//!
//! Invariants enforced here (the official recipe and its quirks):
//! - Generator loss = rec_weight·MSE(x, x̂) + perceptual_weight·mean(LPIPS(x, x̂)) +
//!   disc_weight_eff·(−mean(D(x̂))) + vq_loss + commit_loss + entropy_loss. There is no
//!   adaptive weight and no codebook weight (the codebook terms are added unweighted).
//! - `disc_weight_eff` = 0 while `global_step < disc_start`, else `disc_weight` (0.5), with
//!   `global_step = steps + 1` (`steps` = updates done before this one).
//! - Discriminator loss = disc_weight_eff·½·(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂)))) on
//!   detached inputs, with the discriminator weights of before this step's update. The
//!   discriminator is stepped on every iteration (with a zero loss before `disc_start`), and its
//!   BatchNorm sees three training-mode calls per step: D(x̂) in the generator loss, then D(x)
//!   and D(x̂) in its own loss.
//! - One step: generator forward and backward, clip the model's gradients to total norm
//!   `max_grad_norm`, Adam step of the model, EMA update; then the discriminator loss on the
//!   same reconstruction, clip the discriminator's gradients, Adam step of the discriminator.
//!   Adam is PyTorch's (no weight decay), betas (0.9, 0.95), lr 1e-4; the `codebook_used`
//!   buffer is not optimised.
//! - Randomness (crops, flips, LPIPS dropout masks) is a pure function of (seed, step), so a
//!   run resumed from a checkpoint continues bit-identically.
//! - Checkpoints hold the model (official VQ keys, with `quantize.codebook_used`), the
//!   discriminator (official `main.*` keys with the BatchNorm running statistics), both
//!   optimizers, the EMA model when enabled, and the step count.

pub mod data;
pub mod disc;
pub mod lpips;
pub mod run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use llamagen_encode::vq::{CODEBOOK_USED_LEN, ModelArgs, VqModel};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::save_safetensors;
use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::train::mix_seed;
pub use data::{ImageSource, ImageSourceConfig};
pub use disc::{DiscConfig, Discriminator};
pub use lpips::Lpips;

/// Variables under their official names.
pub type NamedVars = Vec<(String, Var)>;

/// Name of the quantizer's usage buffer (never optimised).
pub const CODEBOOK_USED_KEY: &str = "quantize.codebook_used";

/// Loss weights and the adversarial schedule (`[loss]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Weight of the MSE reconstruction loss. Default 1.0.
    pub rec_weight: f64,
    /// Weight of the LPIPS loss. Default 1.0.
    pub perceptual_weight: f64,
    /// Weight of the adversarial terms once active. Default 0.5.
    pub disc_weight: f64,
    /// First global step (1-based) with adversarial terms. Default 20000 (from scratch); the
    /// official fine-tuning uses 0.
    pub disc_start: u64,
    /// LPIPS dropout (p 0.5) before the linear heads during training. Default true, the
    /// official behaviour (its `.train()` re-enables the dropout of the LPIPS heads).
    pub lpips_dropout: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            rec_weight: 1.0,
            perceptual_weight: 1.0,
            disc_weight: 0.5,
            disc_start: 20000,
            lpips_dropout: true,
        }
    }
}

impl LossConfig {
    /// The adversarial weight of the step whose 1-based global step is `global_step`.
    pub fn disc_weight_at(&self, global_step: u64) -> f64 {
        if global_step < self.disc_start {
            0.0
        } else {
            self.disc_weight
        }
    }
}

/// Optimiser settings (`[optim]`), shared by the model and the discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqOptimConfig {
    /// Learning rate. Default 1e-4.
    pub lr: f64,
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.95.
    pub beta2: f64,
    /// Default 1e-8.
    pub eps: f64,
    /// Total-norm gradient clipping, separately for model and discriminator; 0 disables it.
    /// Default 1.0.
    pub max_grad_norm: f64,
    /// Keep an exponential moving average of the model. Default false.
    pub ema: bool,
    /// EMA decay. Default 0.9999.
    pub ema_decay: f64,
}

impl Default for VqOptimConfig {
    fn default() -> Self {
        VqOptimConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            max_grad_norm: 1.0,
            ema: false,
            ema_decay: 0.9999,
        }
    }
}

impl VqOptimConfig {
    fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: 0.0,
        }
    }
}

/// Everything a training step depends on (the model, discriminator, loss and optimiser
/// settings, and the seed of the random draws).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqStepConfig {
    pub model: ModelArgs,
    pub disc: DiscConfig,
    pub loss: LossConfig,
    pub optim: VqOptimConfig,
    /// Seed of initialisation, data order, crops, flips and dropout masks. Default 0.
    pub seed: u64,
}

impl Default for VqStepConfig {
    fn default() -> Self {
        VqStepConfig {
            model: ModelArgs::vq_16(),
            disc: DiscConfig::default(),
            loss: LossConfig::default(),
            optim: VqOptimConfig::default(),
            seed: 0,
        }
    }
}

/// What one training step measured (values before the update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqStepStats {
    /// 1-based global step of this update.
    pub global_step: u64,
    pub rec_loss: f32,
    pub perceptual_loss: f32,
    /// `−mean(D(x̂))` (before weighting).
    pub gen_adv_loss: f32,
    pub vq_loss: f32,
    pub commit_loss: f32,
    pub entropy_loss: f32,
    /// The total generator loss that was back-propagated.
    pub loss_gen: f32,
    /// The discriminator loss (weighted by `disc_weight_eff`).
    pub loss_disc: f32,
    pub logits_real: f32,
    pub logits_fake: f32,
    pub disc_weight: f64,
    /// Total gradient norms before clipping.
    pub grad_norm_gen: f32,
    pub grad_norm_disc: f32,
    /// Codebook usage after this step (`#unique(codebook_used) / codebook_size`).
    pub codebook_usage: Option<f64>,
}

/// The training state: model, discriminator, both optimisers and the optional EMA.
pub struct VqTrainer {
    cfg: VqStepConfig,
    device: Device,
    vq_vars: VarMap,
    vq: VqModel,
    param_names: Vec<String>,
    disc_vars: VarMap,
    disc: Discriminator,
    lpips: Lpips,
    opt: AdamW,
    opt_disc: AdamW,
    ema: Option<Vec<(String, Tensor)>>,
    steps: u64,
}

fn uniform(rng: &mut StdRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

/// A freshly initialised VQ model's tensors (PyTorch defaults, as the official `VQModel`
/// leaves them): conv weights and biases U(±1/√fan_in), GroupNorm weight 1 and bias 0, the
/// codebook U(±1/K) then L2-normalised when `codebook_l2_norm`, `codebook_used` zeros.
pub fn init_vq_tensors(
    args: &ModelArgs,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let specs = VqModel::tensor_specs(args)?;
    let shapes: HashMap<&str, &Vec<usize>> = specs.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut rng = StdRng::seed_from_u64(mix_seed(&[seed, 0x5EED_0F09]));
    let mut out = HashMap::new();
    for (name, shape) in &specs {
        let n: usize = shape.iter().product();
        let t = if name == CODEBOOK_USED_KEY {
            Tensor::zeros(shape.as_slice(), DType::F32, device)?
        } else if name == "quantize.embedding.weight" {
            let k = shape[0] as f64;
            let e = Tensor::from_vec(uniform(&mut rng, n, 1.0 / k), shape.as_slice(), device)?;
            if args.codebook_l2_norm {
                llamagen_encode::vq::l2_normalize(&e)?
            } else {
                e
            }
        } else if shape.len() == 4 {
            let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
            Tensor::from_vec(
                uniform(&mut rng, n, 1.0 / fan_in.sqrt()),
                shape.as_slice(),
                device,
            )?
        } else {
            let stem = name.rsplit_once('.').map(|(a, _)| a).unwrap_or(name);
            match shapes.get(format!("{stem}.weight").as_str()) {
                Some(w) if w.len() == 4 && name.ends_with(".bias") => {
                    let fan_in = (w[1] * w[2] * w[3]) as f64;
                    Tensor::from_vec(uniform(&mut rng, n, 1.0 / fan_in.sqrt()), n, device)?
                }
                _ if name.ends_with(".weight") => Tensor::ones(n, DType::F32, device)?,
                _ => Tensor::zeros(n, DType::F32, device)?,
            }
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

fn varmap_from(tensors: &HashMap<String, Tensor>, device: &Device) -> Result<VarMap> {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().expect("VarMap lock poisoned");
        for (n, t) in tensors {
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            data.insert(n.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(vm)
}

fn named_vars(vm: &VarMap, names: &[String]) -> Result<Vec<(String, Var)>> {
    let data = vm.data().lock().expect("VarMap lock poisoned");
    names
        .iter()
        .map(|n| {
            data.get(n).cloned().map(|v| (n.clone(), v)).ok_or_else(|| {
                TrainError::InvalidInput(format!("parameter `{n}` is not in the VarMap"))
            })
        })
        .collect()
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| TrainError::UnreadableCheckpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Files of a training checkpoint directory.
pub const CKPT_MODEL: &str = "model.safetensors";
pub const CKPT_DISC: &str = "discriminator.safetensors";
pub const CKPT_OPT: &str = "optimizer.safetensors";
pub const CKPT_OPT_DISC: &str = "optimizer_disc.safetensors";
pub const CKPT_EMA: &str = "ema.safetensors";
pub const CKPT_STATE: &str = "state.json";

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub steps: u64,
    pub config: VqStepConfig,
}

impl VqTrainer {
    /// A trainer from explicit initial tensors: the VQ model's (official keys, all of them,
    /// `quantize.codebook_used` included) and optionally the discriminator's parameters
    /// (`main.*`; None: fresh initialisation from the seed).
    pub fn from_tensors(
        cfg: &VqStepConfig,
        vq_tensors: &HashMap<String, Tensor>,
        disc_tensors: Option<&HashMap<String, Tensor>>,
        lpips: Lpips,
        device: &Device,
    ) -> Result<Self> {
        if cfg.model.dropout_p != 0.0 {
            return Err(TrainError::InvalidConfig(format!(
                "model.dropout_p = {}: dropout inside the VQ ResnetBlocks is not implemented \
                 (the released tokenizers train with 0)",
                cfg.model.dropout_p
            )));
        }
        let specs = VqModel::tensor_specs(&cfg.model)?;
        for (n, shape) in &specs {
            match vq_tensors.get(n) {
                None => {
                    return Err(TrainError::MissingTensor {
                        path: PathBuf::from("<initial VQ tensors>"),
                        name: n.clone(),
                        expected: shape.clone(),
                    });
                }
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(TrainError::ShapeMismatch {
                        path: PathBuf::from("<initial VQ tensors>"),
                        name: n.clone(),
                        expected: shape.clone(),
                        found: t.dims().to_vec(),
                    });
                }
                Some(_) => {}
            }
        }
        let vq_vars = varmap_from(vq_tensors, device)?;
        let vq = VqModel::load(
            VarBuilder::from_varmap(&vq_vars, DType::F32, device),
            &cfg.model,
        )?;
        let param_names: Vec<String> = specs
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != CODEBOOK_USED_KEY)
            .collect();
        let disc_vars = match disc_tensors {
            Some(t) => varmap_from(t, device)?,
            None => {
                let vm = VarMap::new();
                cfg.disc
                    .init_varmap(&vm, mix_seed(&[cfg.seed, 0xD15C]), device)?;
                vm
            }
        };
        let disc = Discriminator::load(
            VarBuilder::from_varmap(&disc_vars, DType::F32, device),
            &cfg.disc,
        )?;
        let disc_names: Vec<String> = cfg
            .disc
            .parameter_specs()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let opt = AdamW::new(named_vars(&vq_vars, &param_names)?, cfg.optim.adam())?;
        let opt_disc = AdamW::new(named_vars(&disc_vars, &disc_names)?, cfg.optim.adam())?;
        let ema = if cfg.optim.ema {
            Some(
                vq.named_tensors()
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.copy()?)))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        Ok(VqTrainer {
            cfg: cfg.clone(),
            device: device.clone(),
            vq_vars,
            vq,
            param_names,
            disc_vars,
            disc,
            lpips,
            opt,
            opt_disc,
            ema,
            steps: 0,
        })
    }

    /// A trainer from scratch (`init` None) or fine-tuning an official VQ checkpoint
    /// (`.pt`/`.pth` or safetensors with the official keys).
    pub fn new(
        cfg: &VqStepConfig,
        init: Option<&Path>,
        lpips: Lpips,
        device: &Device,
    ) -> Result<Self> {
        let tensors = match init {
            None => init_vq_tensors(&cfg.model, cfg.seed, device)?,
            Some(p) => VqModel::from_file(p, &cfg.model, device)?
                .named_tensors()
                .into_iter()
                .collect(),
        };
        Self::from_tensors(cfg, &tensors, None, lpips, device)
    }

    pub fn config(&self) -> &VqStepConfig {
        &self.cfg
    }

    /// Updates done so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn model(&self) -> &VqModel {
        &self.vq
    }

    pub fn discriminator(&self) -> &Discriminator {
        &self.disc
    }

    /// The discriminator, for calls outside a step (its BatchNorm statistics advance).
    pub fn discriminator_mut(&mut self) -> &mut Discriminator {
        &mut self.disc
    }

    /// The trainable variables of the model (official keys, `codebook_used` excluded) and of
    /// the discriminator.
    pub fn trainable_vars(&self) -> Result<(NamedVars, NamedVars)> {
        let disc_names: Vec<String> = self
            .cfg
            .disc
            .parameter_specs()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        Ok((
            named_vars(&self.vq_vars, &self.param_names)?,
            named_vars(&self.disc_vars, &disc_names)?,
        ))
    }

    /// The generator loss of images `x` (B, 3, H, W) in [−1, 1] without any update: returns
    /// the loss tensor (with its graph), the reconstruction and the stats of its terms. Calls
    /// the quantizer and the discriminator in training mode (usage buffer and BatchNorm
    /// statistics advance).
    pub fn generator_loss(&mut self, x: &Tensor) -> Result<(Tensor, Tensor, VqStepStats)> {
        let global_step = self.steps + 1;
        let lc = &self.cfg.loss;
        let disc_w = lc.disc_weight_at(global_step);
        let (rec, _q, ql) = self.vq.forward_train(x)?;
        let rec_loss = (x - &rec)?.sqr()?.mean_all()?;
        let seed = mix_seed(&[self.cfg.seed, global_step, 0x1F1F]);
        let p_loss = self.lpips.forward(x, &rec, seed)?.mean_all()?;
        let logits_fake = self.disc.forward_train(&rec)?;
        let gen_adv = logits_fake.mean_all()?.neg()?;
        let loss = ((&rec_loss * lc.rec_weight)? + (&p_loss * lc.perceptual_weight)?)?;
        let loss = (loss + (&gen_adv * disc_w)?)?;
        let loss = (((loss + &ql.vq_loss)? + &ql.commit_loss)? + &ql.entropy_loss)?;
        let stats = VqStepStats {
            global_step,
            rec_loss: scalar(&rec_loss)?,
            perceptual_loss: scalar(&p_loss)?,
            gen_adv_loss: scalar(&gen_adv)?,
            vq_loss: scalar(&ql.vq_loss)?,
            commit_loss: scalar(&ql.commit_loss)?,
            entropy_loss: scalar(&ql.entropy_loss)?,
            loss_gen: scalar(&loss)?,
            loss_disc: 0.0,
            logits_real: 0.0,
            logits_fake: 0.0,
            disc_weight: disc_w,
            grad_norm_gen: 0.0,
            grad_norm_disc: 0.0,
            codebook_usage: ql.codebook_usage,
        };
        Ok((loss, rec, stats))
    }

    /// The discriminator loss on `x` and the (detached) reconstruction (module invariants).
    /// Returns the loss and the mean real and fake logits.
    pub fn discriminator_loss(&mut self, x: &Tensor, rec: &Tensor) -> Result<(Tensor, f32, f32)> {
        let disc_w = self.cfg.loss.disc_weight_at(self.steps + 1);
        let lr = self.disc.forward_train(&x.detach())?;
        let lf = self.disc.forward_train(&rec.detach())?;
        let real = lr.affine(-1.0, 1.0)?.relu()?.mean_all()?;
        let fake = lf.affine(1.0, 1.0)?.relu()?.mean_all()?;
        let loss = ((real + fake)? * (0.5 * disc_w))?;
        Ok((loss, scalar(&lr.mean_all()?)?, scalar(&lf.mean_all()?)?))
    }

    /// One training step on images `x` (B, 3, H, W) in [−1, 1] (module invariants).
    pub fn step(&mut self, x: &Tensor) -> Result<VqStepStats> {
        let max_norm = self.cfg.optim.max_grad_norm;
        let (loss, rec, mut stats) = self.generator_loss(x)?;
        if !stats.loss_gen.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step: stats.global_step,
                loss: stats.loss_gen,
            });
        }
        let mut grads = loss.backward()?;
        let vq_vars: Vec<Var> = self.opt.vars().into_iter().cloned().collect();
        let vq_refs: Vec<&Var> = vq_vars.iter().collect();
        stats.grad_norm_gen = if max_norm > 0.0 {
            clip_grad_norm(&mut grads, &vq_refs, max_norm)?
        } else {
            clip_grad_norm(&mut grads, &vq_refs, f64::INFINITY)?
        };
        if !stats.grad_norm_gen.is_finite() {
            return Err(TrainError::NonFiniteGradient {
                step: stats.global_step,
                norm: stats.grad_norm_gen,
            });
        }
        self.opt.step(&grads)?;
        drop(grads);
        self.update_ema()?;

        let (d_loss, lr, lf) = self.discriminator_loss(x, &rec)?;
        stats.loss_disc = scalar(&d_loss)?;
        stats.logits_real = lr;
        stats.logits_fake = lf;
        let mut grads = d_loss.backward()?;
        let d_vars: Vec<Var> = self.opt_disc.vars().into_iter().cloned().collect();
        let d_refs: Vec<&Var> = d_vars.iter().collect();
        stats.grad_norm_disc = clip_grad_norm(
            &mut grads,
            &d_refs,
            if max_norm > 0.0 {
                max_norm
            } else {
                f64::INFINITY
            },
        )?;
        self.opt_disc.step(&grads)?;
        self.steps += 1;
        Ok(stats)
    }

    fn update_ema(&mut self) -> Result<()> {
        let Some(ema) = &mut self.ema else {
            return Ok(());
        };
        let d = self.cfg.optim.ema_decay;
        let data = self.vq_vars.data().lock().expect("VarMap lock poisoned");
        for (name, e) in ema.iter_mut() {
            if name == CODEBOOK_USED_KEY {
                continue;
            }
            if let Some(v) = data.get(name) {
                *e = ((&*e * d)? + (v.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }

    /// The model's tensors under the official keys (`quantize.codebook_used` included).
    pub fn model_tensors(&self) -> Vec<(String, Tensor)> {
        self.vq.named_tensors()
    }

    /// The discriminator's parameters and BatchNorm buffers under the official keys.
    pub fn disc_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = named_vars(
            &self.disc_vars,
            &self
                .cfg
                .disc
                .parameter_specs()
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
        )?
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect::<Vec<_>>();
        out.extend(self.disc.buffers()?);
        Ok(out)
    }

    /// Writes the VQ model (the EMA weights when `ema` and EMA is on) as safetensors with the
    /// official keys, loadable by [`VqModel::from_file`].
    pub fn export_vq(&self, path: &Path, ema: bool) -> Result<()> {
        let tensors = if ema {
            self.ema.clone().ok_or_else(|| {
                TrainError::InvalidConfig("EMA export requested but optim.ema is off".into())
            })?
        } else {
            self.model_tensors()
        };
        save_safetensors(path, &tensors)
    }

    /// Writes a checkpoint directory (written under a temporary name, then renamed).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension("partial");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        save_safetensors(&tmp.join(CKPT_MODEL), &self.model_tensors())?;
        save_safetensors(&tmp.join(CKPT_DISC), &self.disc_tensors()?)?;
        save_safetensors(&tmp.join(CKPT_OPT), &self.opt.state_tensors()?)?;
        save_safetensors(&tmp.join(CKPT_OPT_DISC), &self.opt_disc.state_tensors()?)?;
        if let Some(ema) = &self.ema {
            save_safetensors(&tmp.join(CKPT_EMA), ema)?;
        }
        let state = CheckpointState {
            steps: self.steps,
            config: self.cfg.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| TrainError::Json {
            path: tmp.join(CKPT_STATE),
            source: e,
        })?;
        std::fs::write(tmp.join(CKPT_STATE), json).map_err(|e| TrainError::io(&tmp, e))?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
        Ok(())
    }

    /// Restores a trainer from a checkpoint directory written by [`Self::save_checkpoint`].
    pub fn load_checkpoint(dir: &Path, lpips: Lpips, device: &Device) -> Result<Self> {
        let state_path = dir.join(CKPT_STATE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: CheckpointState = serde_json::from_str(&text).map_err(|e| TrainError::Json {
            path: state_path.clone(),
            source: e,
        })?;
        let model = read_safetensors(&dir.join(CKPT_MODEL), device)?;
        if model.get(CODEBOOK_USED_KEY).map(|t| t.elem_count()) != Some(CODEBOOK_USED_LEN) {
            return Err(TrainError::MissingReference {
                path: dir.join(CKPT_MODEL),
                name: CODEBOOK_USED_KEY.into(),
            });
        }
        let disc = read_safetensors(&dir.join(CKPT_DISC), device)?;
        let disc_params: HashMap<String, Tensor> = state
            .config
            .disc
            .parameter_specs()
            .into_iter()
            .map(|(n, _)| {
                disc.get(&n)
                    .cloned()
                    .map(|t| (n.clone(), t))
                    .ok_or(TrainError::MissingReference {
                        path: dir.join(CKPT_DISC),
                        name: n,
                    })
            })
            .collect::<Result<_>>()?;
        let mut t = Self::from_tensors(&state.config, &model, Some(&disc_params), lpips, device)?;
        t.disc.load_buffers(&disc, &dir.join(CKPT_DISC))?;
        t.opt.load_state(
            &read_safetensors(&dir.join(CKPT_OPT), device)?,
            &dir.join(CKPT_OPT),
        )?;
        t.opt_disc.load_state(
            &read_safetensors(&dir.join(CKPT_OPT_DISC), device)?,
            &dir.join(CKPT_OPT_DISC),
        )?;
        if t.ema.is_some() {
            let ema = read_safetensors(&dir.join(CKPT_EMA), device)?;
            let names: Vec<String> = t.vq.named_tensors().into_iter().map(|(n, _)| n).collect();
            t.ema = Some(
                names
                    .into_iter()
                    .map(|n| {
                        ema.get(&n).cloned().map(|v| (n.clone(), v)).ok_or(
                            TrainError::MissingReference {
                                path: dir.join(CKPT_EMA),
                                name: n,
                            },
                        )
                    })
                    .collect::<Result<_>>()?,
            );
        }
        t.steps = state.steps;
        Ok(t)
    }

    /// The device the trainer runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}
