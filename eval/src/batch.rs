//! Sample batches as the ADM evaluator reads them: `.npz` files (a zip of `.npy` arrays: `arr_0`
//! uint8 N×H×W×3 images; reference batches may also hold `mu`, `sigma`, `mu_s`, `sigma_s`) and
//! folders of images.
//!
//! The container is read with the `zip` crate (stored or deflated, as `np.savez` and
//! `np.savez_compressed` write it) and each array with `npyz`; only little-endian,
//! C-ordered arrays of uint8, float32 and float64 are accepted, anything else is an error naming
//! the file and the array.

use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::{EvalError, Result};

/// An array's values.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    U8(Vec<u8>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// An array from a `.npz` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl Array {
    /// The values as float64 (for statistics given in the file).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.values {
            Values::U8(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Values::F64(v) => v.clone(),
        }
    }
}

fn bad(path: &Path, what: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{}: {what}", path.display()))
}

/// The names of the arrays in `path` (without `.npy`).
pub fn npz_names(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| bad(path, e))?;
    Ok(zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter_map(|n| n.strip_suffix(".npy").map(str::to_string))
        .collect())
}

/// Reads array `name` of `path`.
pub fn read_npz(path: &Path, name: &str) -> Result<Array> {
    let f = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| bad(path, e))?;
    let entry = zip
        .by_name(&format!("{name}.npy"))
        .map_err(|_| bad(path, format!("no array {name}")))?;
    let entry_size = entry.size();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(entry))
        .map_err(|e| bad(path, format!("{name}: {e}")))?;
    if npy.order() != npyz::Order::C {
        return Err(bad(path, format!("{name} is Fortran-ordered")));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(bad(path, format!("{name} is a structured array")));
    };
    let descr = ts.to_string();
    let count = shape.iter().product::<usize>();
    // The data bytes in one read (npyz's `into_vec` reads element by element: seconds for the
    // gigabyte of a 5,000-image batch), then converted from little-endian.
    let read_raw = |width: usize| -> Result<Vec<u8>> {
        let bytes = count
            .checked_mul(width)
            .filter(|&b| b as u64 <= entry_size)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("{name}: shape {shape:?} is larger than its {entry_size} bytes"),
                )
            })?;
        let mut raw = vec![0u8; bytes];
        npy.into_inner()
            .read_exact(&mut raw)
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        Ok(raw)
    };
    let values = match descr.as_str() {
        "|u1" | "<u1" => Values::U8(read_raw(1)?),
        "<f4" => Values::F32(
            read_raw(4)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        ),
        "<f8" => Values::F64(
            read_raw(8)?
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        ),
        other => {
            return Err(bad(
                path,
                format!("{name} has dtype {other}; uint8, float32 or float64 expected"),
            ));
        }
    };
    let n = match &values {
        Values::U8(v) => v.len(),
        Values::F32(v) => v.len(),
        Values::F64(v) => v.len(),
    };
    if shape.iter().product::<usize>() != n {
        return Err(bad(path, format!("{name}: {n} values for shape {shape:?}")));
    }
    Ok(Array { shape, values })
}

/// Images as uint8 N×H×W×3 (row-major) with their count and size.
#[derive(Debug, Clone)]
pub struct Images {
    pub n: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// The `arr_0` images of an ADM batch.
pub fn npz_images(path: &Path) -> Result<Images> {
    let a = read_npz(path, "arr_0")?;
    let Values::U8(pixels) = a.values else {
        return Err(bad(path, "arr_0 is not uint8"));
    };
    match a.shape[..] {
        [n, height, width, 3] => Ok(Images {
            n,
            height,
            width,
            pixels,
        }),
        _ => Err(bad(
            path,
            format!("arr_0 has shape {:?}, wants N×H×W×3", a.shape),
        )),
    }
}

/// The images of a folder (PNG, JPEG, WebP, ...; sorted by name; all of one size), as RGB.
pub fn folder_images(dir: &Path) -> Result<Images> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| bad(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "webp" | "bmp"
                )
            })
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(bad(dir, "no images"));
    }
    // Decoded in parallel (rayon), each image straight into its place in the batch; all must
    // have the first one's size. Errors are reported for the first failing file by name.
    let decode = |f: &PathBuf| -> Result<image::RgbImage> {
        let mut bytes = Vec::new();
        std::fs::File::open(f)
            .and_then(|mut h| h.read_to_end(&mut bytes))
            .map_err(|e| bad(f, e))?;
        Ok(image::load_from_memory(&bytes)
            .map_err(|e| bad(f, e))?
            .to_rgb8())
    };
    let first = decode(&files[0])?;
    let (height, width) = (first.height() as usize, first.width() as usize);
    let item = height * width * 3;
    // Zeroed pages from the allocator: each is written once, by the thread decoding its image.
    let mut pixels = vec![0u8; files.len() * item];
    pixels[..item].copy_from_slice(first.as_raw());
    drop(first);
    let outcomes: Vec<Result<()>> = pixels[item..]
        .par_chunks_mut(item.max(1))
        .zip(files[1..].par_iter())
        .map(|(dst, f)| {
            let img = decode(f)?;
            let s = (img.height() as usize, img.width() as usize);
            if s != (height, width) {
                return Err(bad(
                    f,
                    format!(
                        "{}x{} px, the first image is {}x{}",
                        s.1, s.0, width, height
                    ),
                ));
            }
            dst.copy_from_slice(img.as_raw());
            Ok(())
        })
        .collect();
    outcomes.into_iter().collect::<Result<()>>()?;
    Ok(Images {
        n: files.len(),
        height,
        width,
        pixels,
    })
}

/// A sample or reference batch from an `.npz` file or a folder of images.
pub fn images(path: &Path) -> Result<Images> {
    if path.is_dir() {
        folder_images(path)
    } else {
        npz_images(path)
    }
}
