//! Reading and writing GPT weights with the official state-dict key names.
//!
//! Invariants enforced here:
//! - A state dict is accepted for a configuration only if it holds exactly the configuration's
//!   tensors (names and shapes of [`GptConfig::state_dict_shapes`]), apart from keys that are
//!   not model state (`freqs_cis`, KV-cache buffers; see [`is_ignorable_key`]), which are
//!   dropped. Any missing, mis-shaped or unknown tensor is an error naming the tensor, the
//!   file and both shapes.
//! - Torch checkpoints (zip `torch.save` files) are read without executing pickle code: only
//!   the state dict is decoded, taken from the `model` entry (else `module`, `state_dict`,
//!   else the file is a raw state dict, as FSDP's `consolidated.pth`); `args`, `optimizer` and
//!   the rest are skipped. A directory is read as an FSDP checkpoint (`consolidated.pth`).
//! - Saved files are safetensors with official key names, so the official code can load them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{GptConfig, UNCOND_KEY, is_ignorable_key};
use crate::error::{Result, TrainError};
use crate::gpt::Gpt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Entries of a `torch.save` dict that may hold the state dict, in the order they are tried.
pub const TORCH_STATE_ENTRIES: [&str; 3] = ["model", "module", "state_dict"];

/// Tensors read from a checkpoint, with the file they came from.
#[derive(Debug, Clone)]
pub struct StateDict {
    /// The file that was read.
    pub path: PathBuf,
    /// Tensors by official key name (ignorable keys already dropped).
    pub tensors: HashMap<String, Tensor>,
}

fn unreadable(path: &Path, reason: impl ToString) -> TrainError {
    TrainError::UnreadableCheckpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn is_zip(path: &Path) -> Result<bool> {
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| TrainError::io(path, e))?;
    Ok(n == 4 && magic == *b"PK\x03\x04")
}

/// Reads a state dict from a safetensors file, a torch zip checkpoint (`.pt`/`.pth`) or an
/// FSDP checkpoint directory, onto `device` in the stored dtypes.
pub fn read_state_dict(path: &Path, device: &Device) -> Result<StateDict> {
    read_state_dict_entry(path, None, device)
}

/// Like [`read_state_dict`], but for a torch checkpoint reads the named entry (e.g. `ema`)
/// instead of trying [`TORCH_STATE_ENTRIES`].
pub fn read_state_dict_entry(
    path: &Path,
    entry: Option<&str>,
    device: &Device,
) -> Result<StateDict> {
    let file = if path.is_dir() {
        path.join("consolidated.pth")
    } else {
        path.to_path_buf()
    };
    let tensors = if is_zip(&file)? {
        read_torch(&file, entry, device)?
    } else {
        candle_core::safetensors::load(&file, device).map_err(|e| unreadable(&file, e))?
    };
    Ok(StateDict {
        path: file,
        tensors: tensors
            .into_iter()
            .filter(|(k, _)| !is_ignorable_key(k))
            .collect(),
    })
}

fn read_torch(
    path: &Path,
    entry: Option<&str>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let pth = match entry {
        Some(e) => PthTensors::new(path, Some(e)).map_err(|err| unreadable(path, err))?,
        None => {
            let mut found = None;
            for e in TORCH_STATE_ENTRIES {
                if let Ok(p) = PthTensors::new(path, Some(e))
                    && !p.tensor_infos().is_empty()
                {
                    found = Some(p);
                    break;
                }
            }
            match found {
                Some(p) => p,
                None => PthTensors::new(path, None).map_err(|err| unreadable(path, err))?,
            }
        }
    };
    if pth.tensor_infos().is_empty() {
        return Err(unreadable(
            path,
            "no state dict found (tried entries model, module, state_dict and a raw state dict)",
        ));
    }
    let mut out = HashMap::new();
    let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    for name in names {
        if is_ignorable_key(&name) {
            continue;
        }
        let t = pth
            .get(&name)
            .map_err(|e| unreadable(path, format!("tensor `{name}`: {e}")))?
            .ok_or_else(|| unreadable(path, format!("tensor `{name}` vanished")))?;
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// Checks that `sd` holds exactly the tensors of `cfg` (see the module invariants).
pub fn validate_state_dict(cfg: &GptConfig, sd: &StateDict) -> Result<()> {
    let expected = cfg.state_dict_shapes();
    for (name, shape) in &expected {
        match sd.tensors.get(name) {
            None => {
                return Err(TrainError::MissingTensor {
                    path: sd.path.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                });
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(TrainError::ShapeMismatch {
                    path: sd.path.clone(),
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                });
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = sd
        .tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(TrainError::UnexpectedTensor {
            path: sd.path.clone(),
            name: (*name).clone(),
        });
    }
    Ok(())
}

/// Loads a GPT for inference (or evaluation) from a checkpoint, in `dtype` on `device`.
pub fn load_gpt(path: &Path, cfg: &GptConfig, dtype: DType, device: &Device) -> Result<Gpt> {
    let sd = read_state_dict(path, device)?;
    gpt_from_state_dict(&sd, cfg, dtype, device)
}

/// Builds a GPT from an already read state dict.
pub fn gpt_from_state_dict(
    sd: &StateDict,
    cfg: &GptConfig,
    dtype: DType,
    device: &Device,
) -> Result<Gpt> {
    cfg.validate()?;
    validate_state_dict(cfg, sd)?;
    let vb = VarBuilder::from_tensors(sd.tensors.clone(), dtype, device);
    Gpt::load(vb, cfg)
}

/// Creates a trainable GPT whose parameters live in `varmap` (freshly initialised).
pub fn new_trainable(varmap: &VarMap, cfg: &GptConfig, device: &Device) -> Result<Gpt> {
    Gpt::load(VarBuilder::from_varmap(varmap, DType::F32, device), cfg)
}

/// Overwrites the variables of `varmap` (built by [`new_trainable`] for `cfg`) with the
/// tensors of `sd`, after validating it.
pub fn load_into_varmap(varmap: &VarMap, cfg: &GptConfig, sd: &StateDict) -> Result<()> {
    validate_state_dict(cfg, sd)?;
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    for (name, _) in cfg.state_dict_shapes() {
        let var = data.get(&name).ok_or_else(|| {
            TrainError::InvalidInput(format!("model variable `{name}` is not in the VarMap"))
        })?;
        let t = sd.tensors[&name]
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

/// Writes `tensors` as a safetensors file (official key names are the caller's names).
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&map, path).map_err(|e| unreadable(path, e))
}

/// Saves a model's state dict (official key names, including the t2i null caption buffer).
pub fn save_gpt(path: &Path, model: &Gpt) -> Result<()> {
    save_safetensors(path, &model.state_dict())
}

fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    // Box-Muller.
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        if out.len() < n {
            out.push((r * t.sin()) as f32);
        }
    }
    out
}

/// Overwrites the variables of a model built by [`new_trainable`] with the official
/// initialisation drawn from a generator seeded by `seed` (module invariants).
pub fn seeded_init(varmap: &VarMap, cfg: &GptConfig, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    for (i, (name, shape)) in cfg.state_dict_shapes().into_iter().enumerate() {
        let var = data.get(&name).ok_or_else(|| {
            TrainError::InvalidInput(format!("model variable `{name}` is not in the VarMap"))
        })?;
        let n: usize = shape.iter().product();
        let values = if name == "output.weight" {
            vec![0f32; n]
        } else if shape.len() == 1 {
            vec![1f32; n]
        } else {
            let std = if name == UNCOND_KEY {
                1.0 / (cfg.caption_dim as f64).sqrt()
            } else {
                cfg.initializer_range
            };
            let mut rng = StdRng::seed_from_u64(crate::train::mix_seed(&[seed, 0x1417, i as u64]));
            normal(&mut rng, n, std)
        };
        let t = Tensor::from_vec(values, shape, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}
