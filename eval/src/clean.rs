//! clean-fid's FID as LlamaGen's text-to-image evaluation computes it
//! (`evaluations/t2i/evaluation.py`, `compute_fid`: `cleanfid.fid.compute_fid(ref_dir, fake_dir,
//! mode="clean", model_name="inception_v3", custom_image_tranform=resize_and_center_crop)`).
//!
//! Invariants enforced here (checked against the official code paths in
//! `tests/fixtures/t2i/make_reference.py`):
//! - Files: what clean-fid's `glob(f"{dir}/**/*.{ext}", recursive=True)` finds for its extensions
//!   [`EXTENSIONS`] (case-sensitive: `.Png` is not one; hidden files and folders, whose names
//!   start with a dot, are not searched; `.npy` arrays, which clean-fid also reads, are not
//!   supported), sorted by path.
//! - Decoding: `Image.open(f).convert("RGB")`: grey is replicated, alpha is dropped, EXIF
//!   orientation is not applied; images over Pillow's decompression-bomb limit
//!   ([`MAX_PIXELS`]) are refused. Errors name the file.
//! - `resize_and_center_crop`: torchvision's `center_crop(img, min(img.size))`, i.e. the square
//!   of side `s = min(w, h)` at `(int(round((w - s) / 2)), int(round((h - s) / 2)))` with Python's
//!   round half to even, then Pillow's `resize((eval_res, eval_res), LANCZOS)` on the 8-bit RGB
//!   square (no resize when it already has that size, or when `eval_res` is `None`).
//! - clean mode's resize: per channel, Pillow's mode-`F` `resize((299, 299), BICUBIC)` of the
//!   8-bit values as float32, then `clip(0, 255)` (clean-fid ≥ 0.1.2x clips; older releases did
//!   not, which only matters where bicubic overshoots), channel-first float32, 0..255.
//! - The model is clean-fid's `InceptionV3W` (`resize_inside=False`): the ONNX export of
//!   `scripts/export-inception.py --clean` takes those 0..255 values and computes `(x - 128) / 128`
//!   itself (see [`CleanInception`]).
//! - Statistics: mean and `np.cov(rowvar=False)` covariance of the features in float64
//!   ([`FidStats::of`]; clean-fid's `np.mean` of float32 features is a float32 mean, which differs
//!   in the last float32 digits), and the Fréchet distance of the crate ([`FidStats`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::RgbImage;
use llamagen_filters::model::ModelOptions;
use llamagen_prep::resample::{Filter, resize_f32, resize_window};
use ort::session::Session;
use ort::value::TensorRef;
use rayon::prelude::*;

use crate::{EvalError, FidStats, Result};

/// clean-fid's image extensions (`cleanfid.utils.EXTENSIONS` without `npy`), matched
/// case-sensitively as its glob does.
pub const EXTENSIONS: [&str; 12] = [
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "JPEG", "JPG", "PNG",
];

/// Side of the Inception input.
pub const CLEAN_SIZE: usize = 299;

/// Pillow refuses images of more than `2 * Image.MAX_IMAGE_PIXELS` pixels
/// (`DecompressionBombError`).
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// Width of the pool features.
pub const FEATURE_DIM: usize = 2048;

fn input_err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Input(format!("{}: {e}", path.display()))
}

/// Decodes `path` as `Image.open(path).convert("RGB")` (see the module invariants).
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| input_err(path, e))?;
    llamagen_filters::preprocess::decode_rgb(&bytes, MAX_PIXELS).map_err(|e| input_err(path, e))
}

/// The square torchvision's `center_crop(img, min(img.size))` keeps: `(left, top, side)`.
pub fn crop_long_edge_box(w: u32, h: u32) -> (u32, u32, u32) {
    let s = w.min(h);
    let off = |d: u32| (d as f64 / 2.0).round_ties_even() as u32;
    (off(w - s), off(h - s), s)
}

/// `CenterCropLongEdge()` of an RGB image.
pub fn center_crop_long_edge(img: &RgbImage) -> RgbImage {
    let (left, top, s) = crop_long_edge_box(img.width(), img.height());
    if (left, top, s) == (0, 0, img.width()) && s == img.height() {
        return img.clone();
    }
    image::imageops::crop_imm(img, left, top, s, s).to_image()
}

/// The centre crop of the long edge, then Pillow's LANCZOS to `eval_res`×`eval_res` (8-bit RGB);
/// `None` keeps the crop's size. Both the CLIP score's `EvalDataset` and the FID's
/// `resize_and_center_crop` compute this.
pub fn eval_res_image(img: &RgbImage, eval_res: Option<u32>) -> RgbImage {
    let square = center_crop_long_edge(img);
    match eval_res {
        Some(r) if r != square.width() => {
            let px = resize_window(&square, r, r, Filter::Lanczos, (0, 0, r, r));
            RgbImage::from_raw(r, r, px).expect("resized size")
        }
        _ => square,
    }
}

/// clean mode's resize of an RGB image: per channel, Pillow's float `BICUBIC` to 299×299,
/// clipped to 0..255, written channel-first to `dst` (`3·299·299` values).
pub fn clean_resize_into(img: &RgbImage, dst: &mut [f32]) {
    let plane = CLEAN_SIZE * CLEAN_SIZE;
    assert_eq!(dst.len(), 3 * plane, "destination size");
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    for (c, out) in dst.chunks_exact_mut(plane).enumerate() {
        let ch: Vec<f32> = raw.iter().skip(c).step_by(3).map(|&v| v as f32).collect();
        let r = resize_f32(&ch, w, h, CLEAN_SIZE, CLEAN_SIZE, Filter::Bicubic);
        for (o, v) in out.iter_mut().zip(r) {
            *o = v.clamp(0.0, 255.0);
        }
    }
}

/// [`clean_resize_into`] into a new vector.
pub fn clean_resize(img: &RgbImage) -> Vec<f32> {
    let mut v = vec![0f32; 3 * CLEAN_SIZE * CLEAN_SIZE];
    clean_resize_into(img, &mut v);
    v
}

/// The Inception input of one file: decode, crop and LANCZOS to `eval_res`, float bicubic to
/// 299; `[3,299,299]` values 0..255 written to `dst`.
pub fn clean_input_into(path: &Path, eval_res: Option<u32>, dst: &mut [f32]) -> Result<()> {
    let img = read_rgb(path)?;
    clean_resize_into(&eval_res_image(&img, eval_res), dst);
    Ok(())
}

fn hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// The image files clean-fid finds under `dir` (see the module invariants), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(input_err(dir, "not a folder of images"));
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| input_err(&d, e))? {
            let entry = entry.map_err(|e| input_err(&d, e))?;
            let name = entry.file_name();
            if hidden(&name) {
                continue;
            }
            let path = entry.path();
            // Symbolic links are followed, as glob does.
            let meta = std::fs::metadata(&path).map_err(|e| input_err(&path, e))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let name = name.to_string_lossy();
                if let Some((_, ext)) = name.rsplit_once('.')
                    && EXTENSIONS.contains(&ext)
                {
                    out.push(path);
                }
            }
        }
    }
    // By the path's text, as Python sorts the glob's strings (PathBuf's order compares
    // components: `a/x.png` before `a-b.png`).
    out.sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(out)
}

/// Features of a set of images: `n × dim` row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Features {
    pub n: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Features {
    /// Mean and covariance of the features.
    pub fn stats(&self) -> Result<FidStats> {
        FidStats::of(&self.data, self.n, self.dim)
    }
}

/// clean-fid's Inception-v3 (`InceptionV3W`) as an ONNX model.
///
/// The signature (what `scripts/export-inception.py --clean` writes from clean-fid's
/// `inception-2015-12-05.pt`; tests use a stand-in with the same one):
/// - input `images`: float32 `[N, 3, 299, 299]`, values 0..255, already resized (clean mode's
///   float bicubic resize, [`clean_resize_into`]);
/// - output `pool_3`: float32 `[N, 2048]`, the pool features; the model computes
///   `(x - 128) / 128` before the network, as `InceptionV3W.forward` does.
pub struct CleanInception {
    pub name: String,
    pub sha256: String,
    session: Mutex<Session>,
    batch_size: usize,
}

impl CleanInception {
    /// Loads `path`, checking the input and output names of the signature.
    pub fn load(path: &Path, opts: &ModelOptions) -> Result<CleanInception> {
        let (session, name, sha256) = crate::inception::open_checked(
            path,
            opts,
            "clean-fid's Inception takes `images` [N,3,299,299] (see scripts/export-inception.py --clean)",
            &["pool_3"],
            "scripts/export-inception.py --clean",
        )?;
        Ok(CleanInception {
            name,
            sha256,
            session: Mutex::new(session),
            batch_size: opts.batch_size.max(1),
        })
    }

    /// Images per inference call.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The features of `n` preprocessed inputs (`n × 3 × 299 × 299`), in one call.
    pub fn run(&self, inputs: &[f32], n: usize) -> Result<Features> {
        let item = 3 * CLEAN_SIZE * CLEAN_SIZE;
        if inputs.len() != n * item {
            return Err(EvalError::Shape(format!(
                "{} input values are not {n} images of 3x299x299",
                inputs.len()
            )));
        }
        if n == 0 {
            return Ok(Features::default());
        }
        let s = CLEAN_SIZE as i64;
        let t = TensorRef::from_array_view((vec![n as i64, 3, s, s], inputs))
            .map_err(|e| self.err(e))?;
        let mut session = self.session.lock().expect("inception session");
        let out = session
            .run(ort::inputs!["images" => t])
            .map_err(|e| self.err(e))?;
        let (shape, v) = out["pool_3"]
            .try_extract_tensor::<f32>()
            .map_err(|e| self.err(format!("pool_3: {e}")))?;
        if shape.len() != 2 || shape[0] != n as i64 {
            return Err(self.err(format!(
                "pool_3 has shape {:?} for {n} images",
                shape.to_vec()
            )));
        }
        Ok(Features {
            n,
            dim: shape[1] as usize,
            data: v.to_vec(),
        })
    }

    /// The features of `files` (each preprocessed as the module invariants say), in batches;
    /// `progress` gets the number of images done. Errors name the file.
    pub fn files_features(
        &self,
        files: &[PathBuf],
        eval_res: Option<u32>,
        progress: impl Fn(usize),
    ) -> Result<Features> {
        let item = 3 * CLEAN_SIZE * CLEAN_SIZE;
        let mut feats = Features::default();
        let mut buf = Vec::new();
        for (b, chunk) in files.chunks(self.batch_size).enumerate() {
            buf.resize(chunk.len() * item, 0f32);
            buf.par_chunks_mut(item)
                .zip(chunk)
                .try_for_each(|(dst, f)| clean_input_into(f, eval_res, dst))?;
            let f = self.run(&buf, chunk.len())?;
            feats.dim = f.dim;
            feats.n += f.n;
            feats.data.extend(f.data);
            progress(b * self.batch_size + chunk.len());
        }
        Ok(feats)
    }

    /// The features of every image clean-fid finds under `dir` ([`image_files`]).
    pub fn folder_features(
        &self,
        dir: &Path,
        eval_res: Option<u32>,
        progress: impl Fn(usize, usize),
    ) -> Result<Features> {
        let files = image_files(dir)?;
        if files.is_empty() {
            return Err(input_err(
                dir,
                format!("no images (extensions {})", EXTENSIONS.join(", ")),
            ));
        }
        let total = files.len();
        self.files_features(&files, eval_res, |done| progress(done, total))
    }

    fn err(&self, e: impl std::fmt::Display) -> EvalError {
        EvalError::Input(format!("{}: {e}", self.name))
    }
}

/// Writes `stats` as a `.npz` of float64 `mu` `[d]` and `sigma` `[d, d]` (what clean-fid's
/// `make_custom_stats` saves, and what `llamagen eval t2i --ref` reads back).
pub fn write_stats_npz(path: &Path, stats: &FidStats) -> Result<()> {
    use std::io::Write;
    fn npy(shape: &[usize], values: &[f64]) -> Vec<u8> {
        let dims = match shape {
            [d] => format!("({d},)"),
            _ => format!(
                "({})",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': {dims}, }}");
        // Magic (6) + version (2) + length (2) + header + '\n', a multiple of 64.
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        for v in values {
            out.extend(v.to_le_bytes());
        }
        out
    }
    let d = stats.dim;
    let write = || -> std::io::Result<()> {
        let tmp = path.with_extension("npz.tmp");
        let f = std::fs::File::create(&tmp)?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(f));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        zip.start_file("mu.npy", opts)?;
        zip.write_all(&npy(&[d], &stats.mu))?;
        zip.start_file("sigma.npy", opts)?;
        zip.write_all(&npy(&[d, d], &stats.sigma))?;
        zip.finish()?.flush()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| input_err(path, e))
}

/// Reads `mu` and `sigma` from a statistics `.npz` (clean-fid's or [`write_stats_npz`]'s).
pub fn read_stats_npz(path: &Path) -> Result<FidStats> {
    let mu = crate::batch::read_npz(path, "mu")?;
    let sigma = crate::batch::read_npz(path, "sigma")?;
    let d = mu.shape.iter().product::<usize>();
    if mu.shape.len() != 1 || sigma.shape != [d, d] {
        return Err(input_err(
            path,
            format!(
                "mu has shape {:?} and sigma {:?}; [d] and [d, d] expected",
                mu.shape, sigma.shape
            ),
        ));
    }
    FidStats::new(mu.to_f64(), sigma.to_f64()).map_err(|e| input_err(path, e))
}
