//! Writing state dicts as `torch.save` zip checkpoints, so the official PyTorch scripts load
//! our models with `torch.load(path, weights_only=True)["model"]`.
//!
//! Invariants enforced here:
//! - The file is the zip layout `torch.save` writes (`archive/data.pkl`, `archive/byteorder`,
//!   `archive/version`, one stored, 64-byte-aligned `archive/data/<i>` entry per tensor, so
//!   `torch.load(mmap=True)` works too), with a protocol-2 pickle that uses only what
//!   `weights_only` loading allows: dicts, `collections.OrderedDict`, strings, ints, and tensors
//!   as `torch._utils._rebuild_tensor_v2` over `('storage', torch.<Dtype>Storage, key, 'cpu',
//!   numel)` persistent ids.
//! - Every tensor is written whole and contiguous (row-major strides, offset 0), little-endian,
//!   in its own dtype; the written file holds each tensor's bytes exactly.
//!
//! Written by hand: no Rust library writes torch checkpoints (candle, safetensors and the
//! pickle crates read them or write other formats). Reading stays with candle's reader.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};
use zip::write::SimpleFileOptions;

use crate::error::EncodeError;

type Result<T> = std::result::Result<T, EncodeError>;

/// A value of the top-level dict of a checkpoint.
pub enum TorchValue<'a> {
    /// A state dict (an `OrderedDict` of tensors by name, in the given order).
    StateDict(&'a [(String, Tensor)]),
    /// An integer (e.g. `steps`).
    Int(i64),
}

fn storage_class(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "FloatStorage",
        DType::F64 => "DoubleStorage",
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::I64 => "LongStorage",
        DType::U8 => "ByteStorage",
        _ => return None,
    })
}

/// A protocol-2 pickle under construction (opcodes as in CPython's `pickle.py`).
struct Pickle(Vec<u8>);

impl Pickle {
    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J'); // BININT
            self.0.extend(v.to_le_bytes());
        } else {
            self.0.extend([0x8a, 8]); // LONG1, 8 bytes two's complement
            self.0.extend(v.to_le_bytes());
        }
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c'); // GLOBAL
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
    fn int_tuple(&mut self, v: &[usize]) {
        self.0.push(b'('); // MARK
        for &x in v {
            self.int(x as i64);
        }
        self.0.push(b't'); // TUPLE
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.push(b')'); // EMPTY_TUPLE
        self.0.push(b'R'); // REDUCE
    }
}

/// Writes `entries` as the top-level dict of a `torch.save` checkpoint at `path`.
pub fn save_torch(path: &Path, entries: &[(&str, TorchValue<'_>)]) -> Result<()> {
    let mut pk = Pickle(vec![0x80, 2]); // PROTO 2
    pk.0.push(b'}'); // EMPTY_DICT
    pk.0.push(b'('); // MARK
    let mut storages: Vec<&Tensor> = Vec::new();
    for (key, value) in entries {
        pk.str(key);
        match value {
            TorchValue::Int(v) => pk.int(*v),
            TorchValue::StateDict(tensors) => {
                pk.ordered_dict();
                pk.0.push(b'('); // MARK
                for (name, t) in tensors.iter() {
                    let class =
                        storage_class(t.dtype()).ok_or_else(|| EncodeError::Checkpoint {
                            path: path.to_path_buf(),
                            reason: format!("{name}: dtype {:?} has no torch storage", t.dtype()),
                        })?;
                    pk.str(name);
                    pk.global("torch._utils", "_rebuild_tensor_v2");
                    pk.0.push(b'('); // MARK: the arguments
                    pk.0.push(b'('); // MARK: the persistent id
                    pk.str("storage");
                    pk.global("torch", class);
                    pk.str(&storages.len().to_string());
                    pk.str("cpu");
                    pk.int(t.elem_count() as i64);
                    pk.0.push(b't'); // TUPLE
                    pk.0.push(b'Q'); // BINPERSID
                    pk.int(0); // storage offset
                    let dims = t.dims();
                    pk.int_tuple(dims);
                    let mut strides = vec![1usize; dims.len()];
                    for i in (0..dims.len().saturating_sub(1)).rev() {
                        strides[i] = strides[i + 1] * dims[i + 1];
                    }
                    pk.int_tuple(&strides);
                    pk.0.push(0x89); // NEWFALSE: requires_grad
                    pk.ordered_dict(); // backward hooks
                    pk.0.push(b't'); // TUPLE
                    pk.0.push(b'R'); // REDUCE
                    storages.push(t);
                }
                pk.0.push(b'u'); // SETITEMS
            }
        }
    }
    pk.0.push(b'u'); // SETITEMS
    pk.0.push(b'.'); // STOP

    let tmp = path.with_extension("pt.partial");
    let written = write_zip(&tmp, &pk.0, &storages)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| EncodeError::io(path, e)));
    if written.is_err() {
        // Nothing half-written is left behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The zip layout of the module invariants at `tmp`.
fn write_zip(tmp: &Path, pickle: &[u8], storages: &[&Tensor]) -> Result<()> {
    let io = |e: std::io::Error| EncodeError::io(tmp, e);
    let zerr = |e: zip::result::ZipError| EncodeError::io(tmp, std::io::Error::other(e));
    let file = std::fs::File::create(tmp).map_err(io)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let stored = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", stored).map_err(zerr)?;
    zip.write_all(pickle).map_err(io)?;
    zip.start_file("archive/byteorder", stored).map_err(zerr)?;
    zip.write_all(b"little").map_err(io)?;
    for (i, t) in storages.iter().enumerate() {
        let bytes = tensor_bytes(t)?;
        let opts = stored.large_file(bytes.len() as u64 >= u32::MAX as u64);
        zip.start_file(format!("archive/data/{i}"), opts)
            .map_err(zerr)?;
        zip.write_all(&bytes).map_err(io)?;
    }
    zip.start_file("archive/version", stored).map_err(zerr)?;
    zip.write_all(b"3\n").map_err(io)?;
    let mut w = zip.finish().map_err(zerr)?;
    w.flush().map_err(io)?;
    Ok(())
}

/// The little-endian bytes of `t`, row-major.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::F16 => le(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::U8 => t.to_vec1::<u8>()?,
        other => {
            return Err(EncodeError::Checkpoint {
                path: Default::default(),
                reason: format!("dtype {other:?} has no torch storage"),
            });
        }
    })
}

fn le<T: Copy, const N: usize>(v: Vec<T>, f: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for x in v {
        out.extend(f(x));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The written file reads back through candle's torch reader, tensor for tensor.
    #[test]
    fn round_trips_through_candles_reader() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let tensors = vec![
            (
                "a.weight".to_string(),
                Tensor::arange(0f32, 24., &dev)?.reshape((2, 3, 4))?,
            ),
            ("b".to_string(), Tensor::new(&[1.5f32, -2.0], &dev)?),
            (
                "c.half".to_string(),
                Tensor::new(&[0.25f32, 3.0, -1.0], &dev)?.to_dtype(DType::BF16)?,
            ),
            ("n".to_string(), Tensor::new(&[7i64, -3], &dev)?),
        ];
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.pt");
        save_torch(
            &path,
            &[
                ("model", TorchValue::StateDict(&tensors)),
                ("steps", TorchValue::Int(5_000_000_000)),
            ],
        )?;
        let back = candle_core::pickle::PthTensors::new(&path, Some("model"))?;
        assert_eq!(back.tensor_infos().len(), tensors.len());
        for (name, t) in &tensors {
            let r = back.get(name)?.expect(name);
            assert_eq!(r.dtype(), t.dtype(), "{name}");
            assert_eq!(r.dims(), t.dims(), "{name}");
            let (a, b) = (tensor_bytes(t)?, tensor_bytes(&r)?);
            assert_eq!(a, b, "{name}");
        }
        Ok(())
    }
}
