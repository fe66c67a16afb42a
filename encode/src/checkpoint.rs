//! Reading VQ checkpoints: safetensors files and official torch zip checkpoints.
//!
//! Invariants enforced here:
//! - A checkpoint must hold exactly the tensors the model asks for, with the model's shapes; a
//!   missing, mis-shaped or unexpected tensor fails with its full name (and both shapes), before
//!   any tensor data is converted.
//! - A torch checkpoint is the zip format of `torch.save`. When its top-level dict has a `model`
//!   entry, that state_dict is used and every other entry (`optimizer`, `discriminator`, `steps`,
//!   the pickled `argparse.Namespace` under `args`, …) is parsed as plain pickle data and never
//!   resolved; otherwise the top level itself is taken as the state_dict.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::{Device, Tensor};

use crate::error::EncodeError;

type Result<T> = std::result::Result<T, EncodeError>;

/// The state_dict entry of an official training checkpoint.
pub const STATE_DICT_KEY: &str = "model";

const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// Loads the tensors of `path` after checking them against `specs` (name, shape).
pub(crate) fn load_checked(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| EncodeError::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| EncodeError::io(path, e))?;
    drop(f);
    if n == 4 && &magic == ZIP_MAGIC {
        load_torch(path, specs, device)
    } else {
        load_safetensors(path, specs, device)
    }
}

/// Compares the tensors a file holds with the tensors the model expects.
fn check_specs(
    file: &Path,
    specs: &[(String, Vec<usize>)],
    found: &HashMap<String, Vec<usize>>,
) -> Result<()> {
    let file = file.display().to_string();
    for (name, expected) in specs {
        match found.get(name) {
            None => {
                return Err(EncodeError::MissingTensor {
                    file,
                    name: name.clone(),
                    expected: expected.clone(),
                });
            }
            Some(shape) if shape != expected => {
                return Err(EncodeError::TensorShape {
                    file,
                    name: name.clone(),
                    expected: expected.clone(),
                    found: shape.clone(),
                });
            }
            Some(_) => {}
        }
    }
    let wanted: std::collections::HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<(&String, &Vec<usize>)> = found
        .iter()
        .filter(|(n, _)| !wanted.contains(n.as_str()))
        .collect();
    extra.sort();
    if let Some((name, shape)) = extra.first() {
        return Err(EncodeError::UnexpectedTensor {
            file,
            name: (*name).clone(),
            found: (*shape).clone(),
        });
    }
    Ok(())
}

fn load_safetensors(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| EncodeError::io(path, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| EncodeError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a torch zip checkpoint, and not a safetensors file: {e}"),
        })?;
    let found: HashMap<String, Vec<usize>> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect();
    check_specs(path, specs, &found)?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| EncodeError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Reads the top-level pickle of a torch zip checkpoint and says which entry holds the
/// state_dict.
fn state_dict_key(path: &Path) -> Result<Option<&'static str>> {
    let bad = |reason: String| EncodeError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| EncodeError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a readable zip archive: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| bad("no data.pkl inside the zip: not a torch.save checkpoint".into()))?;
    let entry = zip
        .by_name(&pkl)
        .map_err(|e| bad(format!("cannot open {pkl}: {e}")))?;
    let mut reader = std::io::BufReader::new(entry);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(format!("cannot parse {pkl}: {e}")))?;
    let top = stack
        .finalize()
        .map_err(|e| bad(format!("cannot parse {pkl}: {e}")))?;
    match top {
        Object::Dict(entries) => {
            let has_model = entries
                .iter()
                .any(|(k, _)| *k == Object::Unicode(STATE_DICT_KEY.to_string()));
            Ok(has_model.then_some(STATE_DICT_KEY))
        }
        other => Err(bad(format!(
            "the pickled top-level object is not a dict but {}",
            describe(&other)
        ))),
    }
}

fn describe(o: &Object) -> String {
    match o {
        Object::Class {
            module_name,
            class_name,
        } => format!("{module_name}.{class_name}"),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => describe(callable),
        Object::List(_) => "a list".into(),
        Object::Tuple(_) => "a tuple".into(),
        other => format!("{other:?}"),
    }
}

fn load_torch(
    path: &Path,
    specs: &[(String, Vec<usize>)],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let key = state_dict_key(path)?;
    let pth = PthTensors::new(path, key).map_err(|e| EncodeError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let found: HashMap<String, Vec<usize>> = pth
        .tensor_infos()
        .iter()
        .map(|(name, info)| (name.clone(), info.layout.dims().to_vec()))
        .collect();
    check_specs(path, specs, &found)?;
    let mut out = HashMap::with_capacity(specs.len());
    for (name, shape) in specs {
        let t = pth
            .get(name)
            .map_err(|e| EncodeError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("tensor {name:?}: {e}"),
            })?
            .ok_or_else(|| EncodeError::MissingTensor {
                file: path.display().to_string(),
                name: name.clone(),
                expected: shape.clone(),
            })?;
        out.insert(name.clone(), t.to_device(device)?);
    }
    Ok(out)
}
