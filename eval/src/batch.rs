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
    let values = match descr.as_str() {
        "|u1" | "<u1" => Values::U8(npy.into_vec::<u8>().map_err(|e| bad(path, e))?),
        "<f4" => Values::F32(npy.into_vec::<f32>().map_err(|e| bad(path, e))?),
        "<f8" => Values::F64(npy.into_vec::<f64>().map_err(|e| bad(path, e))?),
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
    let mut pixels = Vec::new();
    let mut size = None;
    for f in &files {
        let mut bytes = Vec::new();
        std::fs::File::open(f)
            .and_then(|mut h| h.read_to_end(&mut bytes))
            .map_err(|e| bad(f, e))?;
        let img = image::load_from_memory(&bytes)
            .map_err(|e| bad(f, e))?
            .to_rgb8();
        let s = (img.height() as usize, img.width() as usize);
        if size.is_none() {
            // Every image has this size: one allocation for the whole batch.
            pixels.reserve_exact(files.len() * s.0 * s.1 * 3);
        }
        if *size.get_or_insert(s) != s {
            return Err(bad(
                f,
                format!(
                    "{}x{} px, the first image is {}x{}",
                    s.1,
                    s.0,
                    size.unwrap().1,
                    size.unwrap().0
                ),
            ));
        }
        pixels.extend_from_slice(img.as_raw());
    }
    let (height, width) = size.expect("one image");
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
