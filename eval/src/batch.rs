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

/// The image files of a folder (PNG, JPEG, WebP, BMP), sorted by name.
fn folder_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
    Ok(files)
}

/// `files` decoded as RGB, all of the size `size` (height, width) or, when `None`, of the first
/// one's.
fn decode_files(files: &[PathBuf], size: Option<(usize, usize)>) -> Result<Images> {
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
    let (height, width) = match size {
        Some(s) => s,
        None => {
            let first = image::ImageReader::open(&files[0])
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| bad(&files[0], e))?
                .into_dimensions()
                .map_err(|e| bad(&files[0], e))?;
            (first.1 as usize, first.0 as usize)
        }
    };
    let item = height * width * 3;
    // Zeroed pages from the allocator: each is written once, by the thread decoding its image.
    let mut pixels = vec![0u8; files.len() * item];
    let outcomes: Vec<Result<()>> = pixels
        .par_chunks_mut(item.max(1))
        .zip(files.par_iter())
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

/// The images of a folder (PNG, JPEG, WebP, ...; sorted by name; all of one size), as RGB.
pub fn folder_images(dir: &Path) -> Result<Images> {
    decode_files(&folder_files(dir)?, None)
}

/// The images of an `.npz` batch (`arr_0`) or a folder, at most `chunk` at a time and in order:
/// `f(images, first, total)` gets each chunk (`first`: the index of its first image, `total`:
/// the batch's count), which is dropped before the next is read, so memory holds one chunk
/// whatever the batch's size (50,000 images of 256 px are 9.8 GB at once).
pub fn for_each_chunk(
    path: &Path,
    chunk: usize,
    mut f: impl FnMut(&Images, usize, usize) -> Result<()>,
) -> Result<()> {
    let chunk = chunk.max(1);
    if path.is_dir() {
        let files = folder_files(path)?;
        let mut size = None;
        for (k, part) in files.chunks(chunk).enumerate() {
            let images = decode_files(part, size)?;
            size = Some((images.height, images.width));
            f(&images, k * chunk, files.len())?;
        }
        return Ok(());
    }
    let file = std::fs::File::open(path).map_err(|e| bad(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| bad(path, e))?;
    let entry = zip
        .by_name("arr_0.npy")
        .map_err(|_| bad(path, "no array arr_0"))?;
    let entry_size = entry.size();
    let npy = npyz::NpyFile::new(std::io::BufReader::new(entry))
        .map_err(|e| bad(path, format!("arr_0: {e}")))?;
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        _ => String::new(),
    };
    if !matches!(descr.as_str(), "|u1" | "<u1") || npy.order() != npyz::Order::C {
        return Err(bad(path, "arr_0 is not a C-ordered uint8 array"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let [n, height, width, 3] = shape[..] else {
        return Err(bad(
            path,
            format!("arr_0 has shape {shape:?}, wants N×H×W×3"),
        ));
    };
    let item = height * width * 3;
    if (n as u64).saturating_mul(item as u64) > entry_size {
        return Err(bad(
            path,
            format!("arr_0: shape {shape:?} is larger than its {entry_size} bytes"),
        ));
    }
    let mut reader = npy.into_inner();
    for first in (0..n).step_by(chunk) {
        let m = chunk.min(n - first);
        let mut pixels = vec![0u8; m * item];
        reader
            .read_exact(&mut pixels)
            .map_err(|e| bad(path, format!("arr_0, images {first}..{}: {e}", first + m)))?;
        f(
            &Images {
                n: m,
                height,
                width,
                pixels,
            },
            first,
            n,
        )?;
    }
    Ok(())
}

/// A sample or reference batch from an `.npz` file or a folder of images.
pub fn images(path: &Path) -> Result<Images> {
    if path.is_dir() {
        folder_images(path)
    } else {
        npz_images(path)
    }
}
