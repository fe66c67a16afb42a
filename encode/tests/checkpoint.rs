//! Checkpoint layout and loading: the official key names and shapes of VQ-16 and VQ-8,
//! safetensors round trips, official torch zip checkpoints (with their pickled
//! `argparse.Namespace`, optimizer state and other entries), and the errors for missing,
//! mis-shaped and unexpected tensors.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use llamagen_encode::vq::CODEBOOK_USED_LEN;
use llamagen_encode::{EncodeError, ModelArgs, VqModel};

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

fn weights_path() -> PathBuf {
    parity_dir().join("vq_weights.safetensors")
}

fn reference_weights() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        weights_path(),
        &Device::Cpu,
    )?)
}

fn real_config(name: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(parity_dir().join("real_config_shapes.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["vq"][name].clone())
}

fn same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Result<()> {
    ensure!(a.len() == b.len(), "{} vs {} tensors", a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        ensure!(na == nb, "key {na} vs {nb}");
        ensure!(
            ta.dims() == tb.dims(),
            "{na}: shape {:?} vs {:?}",
            ta.dims(),
            tb.dims()
        );
        let va = ta.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let vb = tb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        ensure!(va == vb, "{na}: values differ");
    }
    Ok(())
}

#[test]
fn key_names_shapes_and_order_match_the_official_vq16_and_vq8() -> Result<()> {
    for (name, args) in [("VQ-16", ModelArgs::vq_16()), ("VQ-8", ModelArgs::vq_8())] {
        let cfg = real_config(name)?;
        let want: Vec<(String, Vec<usize>)> = cfg["keys"]
            .as_array()
            .context("keys")?
            .iter()
            .map(|k| {
                let shape = k["shape"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter_map(|d| d.as_u64())
                            .map(|d| d as usize)
                            .collect()
                    })
                    .unwrap_or_default();
                (k["name"].as_str().unwrap_or_default().to_string(), shape)
            })
            .collect();
        let got = VqModel::tensor_specs(&args)?;
        ensure!(
            got.len() as u64 == cfg["num_state_dict_keys"].as_u64().context("count")?,
            "{name}: {} keys",
            got.len()
        );
        for (g, w) in got.iter().zip(&want) {
            ensure!(g == w, "{name}: {g:?} vs official {w:?}");
        }
        let params: usize = got
            .iter()
            .filter(|(n, _)| n != "quantize.codebook_used")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        ensure!(params as u64 == cfg["num_params"].as_u64().context("num_params")?);
        let buffer: usize = got
            .iter()
            .filter(|(n, _)| n == "quantize.codebook_used")
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        ensure!(buffer == CODEBOOK_USED_LEN);
        println!("{name}: {} keys, {params} parameters", got.len());
    }
    ensure!(ModelArgs::vq_16().downsample_factor() == 16);
    ensure!(ModelArgs::vq_8().downsample_factor() == 8);
    Ok(())
}

#[test]
fn reduced_config_asks_for_exactly_the_reference_tensors_in_state_dict_order() -> Result<()> {
    let specs = VqModel::tensor_specs(&ModelArgs::reduced())?;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        parity_dir().join("manifest.json"),
    )?)?;
    let listed: Vec<(String, Vec<usize>)> = manifest["files"]["vq_weights.safetensors"]["tensors"]
        .as_array()
        .context("tensors")?
        .iter()
        .map(|t| {
            let shape = t["shape"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            (t["name"].as_str().unwrap_or_default().to_string(), shape)
        })
        .collect();
    ensure!(
        specs == listed,
        "specs differ from the manifest's state_dict listing"
    );
    Ok(())
}

#[test]
fn safetensors_round_trip_keeps_every_key_and_the_usage_buffer() -> Result<()> {
    let mut model = VqModel::from_file(&weights_path(), &ModelArgs::reduced(), &Device::Cpu)?;
    // Move the ring buffer away from its initial zeros.
    let io = candle_core::safetensors::load(parity_dir().join("vq_io.safetensors"), &Device::Cpu)?;
    model.forward_train(&io["inputs.images"])?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("vq.safetensors");
    model.save_safetensors(&out)?;

    let saved = candle_core::safetensors::load(&out, &Device::Cpu)?;
    let reference = reference_weights()?;
    let mut saved_keys: Vec<_> = saved.keys().cloned().collect();
    let mut ref_keys: Vec<_> = reference.keys().cloned().collect();
    saved_keys.sort();
    ref_keys.sort();
    ensure!(
        saved_keys == ref_keys,
        "saved keys differ from the official ones"
    );
    let used = saved["quantize.codebook_used"].to_vec1::<f32>()?;
    ensure!(used.len() == CODEBOOK_USED_LEN);
    ensure!(
        used.iter().any(|&v| v != 0.0),
        "the updated usage buffer was not saved"
    );

    let reloaded = VqModel::from_file(&out, &ModelArgs::reduced(), &Device::Cpu)?;
    same_tensors(&model.named_tensors(), &reloaded.named_tensors())?;
    Ok(())
}

fn expect_err(res: std::result::Result<VqModel, EncodeError>) -> Result<EncodeError> {
    match res {
        Ok(_) => anyhow::bail!("the checkpoint loaded"),
        Err(e) => Ok(e),
    }
}

#[test]
fn missing_misshaped_and_unexpected_tensors_fail_with_name_and_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = ModelArgs::reduced();
    let name = "decoder.conv_blocks.1.res.2.conv1.weight";

    let mut missing = reference_weights()?;
    missing.remove(name);
    let p = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&missing, &p)?;
    let msg = expect_err(VqModel::from_file(&p, &args, &Device::Cpu))?.to_string();
    println!("{msg}");
    ensure!(msg.contains(name) && msg.contains("[64, 64, 3, 3]") && msg.contains("missing"));

    let mut misshaped = reference_weights()?;
    misshaped.insert(
        name.into(),
        Tensor::zeros((64, 32, 3, 3), DType::F32, &Device::Cpu)?,
    );
    let p = dir.path().join("misshaped.safetensors");
    candle_core::safetensors::save(&misshaped, &p)?;
    let err = expect_err(VqModel::from_file(&p, &args, &Device::Cpu))?;
    let msg = err.to_string();
    println!("{msg}");
    ensure!(matches!(err, EncodeError::TensorShape { .. }));
    ensure!(msg.contains(name) && msg.contains("[64, 32, 3, 3]") && msg.contains("[64, 64, 3, 3]"));

    // A tensor the model does not have is refused (as torch's strict load_state_dict does).
    let mut extra = reference_weights()?;
    extra.insert(
        "quantize.ema".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let p = dir.path().join("extra.safetensors");
    candle_core::safetensors::save(&extra, &p)?;
    let msg = expect_err(VqModel::from_file(&p, &args, &Device::Cpu))?.to_string();
    println!("{msg}");
    ensure!(msg.contains("quantize.ema") && msg.contains("[3]"));

    let p = dir.path().join("garbage.pt");
    std::fs::write(&p, b"definitely not a checkpoint")?;
    let msg = expect_err(VqModel::from_file(&p, &args, &Device::Cpu))?.to_string();
    println!("{msg}");
    ensure!(msg.contains("garbage.pt"));
    Ok(())
}

/// A Python value, as `torch.save` pickles it (protocol 2).
enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Py>),
    List(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    /// `collections.OrderedDict` with an optional instance `__dict__` (the state_dict's
    /// `_metadata`).
    OrderedDict(Vec<(Py, Py)>, Option<Box<Py>>),
    /// `argparse.Namespace(**attrs)`.
    Namespace(Vec<(String, Py)>),
    /// A float32 CPU tensor.
    Tensor(Tensor),
}

fn s(v: &str) -> Py {
    Py::Str(v.to_string())
}

/// Writes the protocol-2 pickle stream and the storages of a torch zip checkpoint.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    next_memo: u32,
    globals: HashMap<(String, String), u32>,
    storages: Vec<(String, Vec<u8>)>,
}

impl Pickler {
    fn memoize(&mut self) {
        let id = self.next_memo;
        self.next_memo += 1;
        if id < 256 {
            self.out.extend([b'q', id as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend(id.to_le_bytes());
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = (module.to_string(), name.to_string());
        if let Some(&id) = self.globals.get(&key) {
            if id < 256 {
                self.out.extend([b'h', id as u8]);
            } else {
                self.out.push(b'j');
                self.out.extend(id.to_le_bytes());
            }
            return;
        }
        self.out.push(b'c');
        self.out.extend(format!("{module}\n{name}\n").bytes());
        self.globals.insert(key, self.next_memo);
        self.memoize();
    }

    fn items(&mut self, items: &[(Py, Py)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        self.out.push(b'(');
        for (k, v) in items {
            self.save(k)?;
            self.save(v)?;
        }
        self.out.push(b'u');
        Ok(())
    }

    fn save(&mut self, v: &Py) -> Result<()> {
        match v {
            Py::None => self.out.push(b'N'),
            Py::Bool(b) => self.out.push(if *b { 0x88 } else { 0x89 }),
            Py::Int(i) => {
                let i = *i;
                if (0..256).contains(&i) {
                    self.out.extend([b'K', i as u8]);
                } else if (0..65536).contains(&i) {
                    self.out.push(b'M');
                    self.out.extend((i as u16).to_le_bytes());
                } else if i32::try_from(i).is_ok() {
                    self.out.push(b'J');
                    self.out.extend((i as i32).to_le_bytes());
                } else {
                    let mut bytes = i.to_le_bytes().to_vec();
                    while bytes.len() > 1 {
                        let last = bytes[bytes.len() - 1];
                        let prev_sign = bytes[bytes.len() - 2] & 0x80;
                        if (last == 0 && prev_sign == 0) || (last == 0xff && prev_sign != 0) {
                            bytes.pop();
                        } else {
                            break;
                        }
                    }
                    self.out.extend([0x8a, bytes.len() as u8]);
                    self.out.extend(bytes);
                }
            }
            Py::Float(f) => {
                self.out.push(b'G');
                self.out.extend(f.to_be_bytes());
            }
            Py::Str(st) => {
                self.out.push(b'X');
                self.out.extend((st.len() as u32).to_le_bytes());
                self.out.extend(st.bytes());
                self.memoize();
            }
            Py::Tuple(items) => {
                match items.len() {
                    0 => self.out.push(b')'),
                    1..=3 => {
                        for it in items {
                            self.save(it)?;
                        }
                        self.out.push([0x85, 0x86, 0x87][items.len() - 1]);
                    }
                    _ => {
                        self.out.push(b'(');
                        for it in items {
                            self.save(it)?;
                        }
                        self.out.push(b't');
                    }
                }
                if !items.is_empty() {
                    self.memoize();
                }
            }
            Py::List(items) => {
                self.out.push(b']');
                self.memoize();
                if !items.is_empty() {
                    self.out.push(b'(');
                    for it in items {
                        self.save(it)?;
                    }
                    self.out.push(b'e');
                }
            }
            Py::Dict(items) => {
                self.out.push(b'}');
                self.memoize();
                self.items(items)?;
            }
            Py::OrderedDict(items, state) => {
                self.global("collections", "OrderedDict");
                self.out.extend([b')', b'R']);
                self.memoize();
                self.items(items)?;
                if let Some(state) = state {
                    self.save(state)?;
                    self.out.push(b'b');
                }
            }
            Py::Namespace(attrs) => {
                self.global("argparse", "Namespace");
                self.out.extend([b')', 0x81]);
                self.memoize();
                let state: Vec<(Py, Py)> = attrs.iter().map(|(k, v)| (s(k), clone_py(v))).collect();
                self.save(&Py::Dict(state))?;
                self.out.push(b'b');
            }
            Py::Tensor(t) => {
                let dims = t.dims().to_vec();
                let numel: usize = dims.iter().product();
                let mut stride = vec![1usize; dims.len()];
                for i in (0..dims.len().saturating_sub(1)).rev() {
                    stride[i] = stride[i + 1] * dims[i + 1];
                }
                let data: Vec<u8> = t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                let key = self.storages.len().to_string();
                self.storages.push((key.clone(), data));

                self.global("torch._utils", "_rebuild_tensor_v2");
                self.out.push(b'(');
                // persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel)
                self.out.push(b'(');
                self.save(&s("storage"))?;
                self.global("torch", "FloatStorage");
                self.save(&s(&key))?;
                self.save(&s("cpu"))?;
                self.save(&Py::Int(numel as i64))?;
                self.out.push(b't');
                self.memoize();
                self.out.push(b'Q');
                self.save(&Py::Int(0))?;
                self.save(&Py::Tuple(
                    dims.iter().map(|&d| Py::Int(d as i64)).collect(),
                ))?;
                self.save(&Py::Tuple(
                    stride.iter().map(|&d| Py::Int(d as i64)).collect(),
                ))?;
                self.save(&Py::Bool(false))?;
                self.save(&Py::OrderedDict(vec![], None))?;
                self.out.push(b't');
                self.memoize();
                self.out.push(b'R');
                self.memoize();
            }
        }
        Ok(())
    }
}

fn clone_py(v: &Py) -> Py {
    match v {
        Py::None => Py::None,
        Py::Bool(b) => Py::Bool(*b),
        Py::Int(i) => Py::Int(*i),
        Py::Float(f) => Py::Float(*f),
        Py::Str(st) => Py::Str(st.clone()),
        Py::Tuple(t) => Py::Tuple(t.iter().map(clone_py).collect()),
        Py::List(t) => Py::List(t.iter().map(clone_py).collect()),
        Py::Dict(d) => Py::Dict(d.iter().map(|(k, v)| (clone_py(k), clone_py(v))).collect()),
        Py::OrderedDict(d, st) => Py::OrderedDict(
            d.iter().map(|(k, v)| (clone_py(k), clone_py(v))).collect(),
            st.as_ref().map(|b| Box::new(clone_py(b))),
        ),
        Py::Namespace(a) => {
            Py::Namespace(a.iter().map(|(k, v)| (k.clone(), clone_py(v))).collect())
        }
        Py::Tensor(t) => Py::Tensor(t.clone()),
    }
}

/// Writes `obj` in the zip layout of `torch.save` (`archive/data.pkl`, `archive/data/{key}`,
/// `archive/version`, `archive/byteorder`), entries stored uncompressed.
fn torch_save(obj: &Py, path: &Path) -> Result<()> {
    let mut p = Pickler::default();
    p.out.extend([0x80, 2]);
    p.save(obj)?;
    p.out.push(b'.');
    let file = std::fs::File::create(path)?;
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", opts)?;
    zip.write_all(&p.out)?;
    zip.start_file("archive/byteorder", opts)?;
    zip.write_all(b"little")?;
    for (key, data) in &p.storages {
        zip.start_file(format!("archive/data/{key}"), opts)?;
        zip.write_all(data)?;
    }
    zip.start_file("archive/version", opts)?;
    zip.write_all(b"3\n")?;
    zip.finish()?;
    Ok(())
}

/// The reference weights as an official state_dict: an OrderedDict in state_dict order with
/// its `_metadata`, optionally with one tensor replaced.
fn state_dict(replace: Option<(&str, Tensor)>) -> Result<Py> {
    let weights = reference_weights()?;
    let mut items = Vec::new();
    for (name, _) in VqModel::tensor_specs(&ModelArgs::reduced())? {
        let t = match &replace {
            Some((r, t)) if *r == name => t.clone(),
            _ => weights[&name].clone(),
        };
        items.push((s(&name), Py::Tensor(t)));
    }
    let metadata = Py::OrderedDict(
        ["", "encoder", "decoder", "quantize"]
            .iter()
            .map(|m| (s(m), Py::Dict(vec![(s("version"), Py::Int(1))])))
            .collect(),
        None,
    );
    Ok(Py::OrderedDict(
        items,
        Some(Box::new(Py::Dict(vec![(s("_metadata"), metadata)]))),
    ))
}

fn training_checkpoint(model: Py) -> Result<Py> {
    let w = reference_weights()?;
    let adam_state = Py::Dict(vec![(
        Py::Int(0),
        Py::Dict(vec![
            (s("step"), Py::Tensor(Tensor::new(40000f32, &Device::Cpu)?)),
            (s("exp_avg"), Py::Tensor(w["quant_conv.bias"].clone())),
            (s("exp_avg_sq"), Py::Tensor(w["quant_conv.bias"].sqr()?)),
        ]),
    )]);
    let param_groups = Py::List(vec![Py::Dict(vec![
        (s("lr"), Py::Float(1e-4)),
        (s("betas"), Py::Tuple(vec![Py::Float(0.9), Py::Float(0.95)])),
        (s("eps"), Py::Float(1e-8)),
        (s("weight_decay"), Py::Float(0.0)),
        (s("amsgrad"), Py::Bool(false)),
        (s("foreach"), Py::None),
        (s("params"), Py::List((0..300).map(Py::Int).collect())),
    ])]);
    let optimizer = || {
        Py::Dict(vec![
            (s("state"), clone_py(&adam_state)),
            (s("param_groups"), clone_py(&param_groups)),
        ])
    };
    let args = Py::Namespace(vec![
        ("data_path".into(), s("/data/imagenet/train")),
        ("vq_model".into(), s("VQ-16")),
        ("vq_ckpt".into(), Py::None),
        ("finetune".into(), Py::Bool(false)),
        ("ema".into(), Py::Bool(false)),
        ("codebook_size".into(), Py::Int(16384)),
        ("codebook_embed_dim".into(), Py::Int(8)),
        ("codebook_l2_norm".into(), Py::Bool(true)),
        ("codebook_weight".into(), Py::Float(1.0)),
        ("entropy_loss_ratio".into(), Py::Float(0.0)),
        ("commit_loss_beta".into(), Py::Float(0.25)),
        ("disc_start".into(), Py::Int(20000)),
        ("disc_type".into(), s("patchgan")),
        ("results_dir".into(), s("results_tokenizer_image")),
        ("image_size".into(), Py::Int(256)),
        ("epochs".into(), Py::Int(40)),
        ("lr".into(), Py::Float(1e-4)),
        ("beta1".into(), Py::Float(0.9)),
        ("global_batch_size".into(), Py::Int(128)),
        ("global_seed".into(), Py::Int(0)),
        ("ckpt_every".into(), Py::Int(5000)),
        ("gradient_accumulation_steps".into(), Py::Int(1)),
        ("mixed_precision".into(), s("bf16")),
        (
            "ch_mult".into(),
            Py::List([1, 1, 2, 2, 4].into_iter().map(Py::Int).collect()),
        ),
        ("max_bytes".into(), Py::Int(1 << 40)),
        ("min_loss".into(), Py::Int(-5)),
        ("crop".into(), Py::Tuple((0..4).map(Py::Int).collect())),
    ]);
    Ok(Py::Dict(vec![
        (s("model"), model),
        (s("optimizer"), optimizer()),
        (
            s("discriminator"),
            Py::OrderedDict(
                vec![(
                    s("main.0.weight"),
                    Py::Tensor(w["quant_conv.weight"].clone()),
                )],
                None,
            ),
        ),
        (s("optimizer_disc"), optimizer()),
        (s("steps"), Py::Int(40000)),
        (s("args"), args),
    ]))
}

#[test]
fn official_torch_checkpoint_loads_its_model_entry() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = ModelArgs::reduced();
    let reference = VqModel::from_file(&weights_path(), &args, &Device::Cpu)?;

    let pt = dir.path().join("vq_ds16.pt");
    torch_save(&training_checkpoint(state_dict(None)?)?, &pt)?;
    let from_pt = VqModel::from_file(&pt, &args, &Device::Cpu)?;
    same_tensors(&reference.named_tensors(), &from_pt.named_tensors())?;

    let io = candle_core::safetensors::load(parity_dir().join("vq_io.safetensors"), &Device::Cpu)?;
    let codes = from_pt.encode(&io["inputs.images"])?.indices;
    ensure!(
        codes.to_dtype(DType::I64)?.to_vec1::<i64>()? == io["outputs.indices"].to_vec1::<i64>()?
    );

    // A bare state_dict (the layout of consolidated checkpoints) loads too.
    let raw = dir.path().join("consolidated.pth");
    torch_save(&state_dict(None)?, &raw)?;
    let from_raw = VqModel::from_file(&raw, &args, &Device::Cpu)?;
    same_tensors(&reference.named_tensors(), &from_raw.named_tensors())?;
    Ok(())
}

#[test]
fn misshaped_tensor_in_torch_checkpoint_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = "quantize.embedding.weight";
    let bad = Tensor::zeros((16384, 8), DType::F32, &Device::Cpu)?;
    let pt = dir.path().join("bad.pt");
    torch_save(&training_checkpoint(state_dict(Some((name, bad)))?)?, &pt)?;
    let msg = expect_err(VqModel::from_file(&pt, &ModelArgs::reduced(), &Device::Cpu))?.to_string();
    println!("{msg}");
    ensure!(msg.contains(name) && msg.contains("[16384, 8]") && msg.contains("[64, 8]"));
    ensure!(msg.contains("bad.pt"));
    Ok(())
}
