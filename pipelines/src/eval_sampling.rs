//! What the evaluation protocols' sampling shares (`llamagen eval c2i`, `llamagen sample`, the
//! t2i folder sampler): a loaded GPT + VQ pair, seeds derived per shard, class-balanced labels,
//! torch's bicubic resize, the evaluator's uint8 conversion, atomic `.npz`/PNG writers and the
//! settings file that keeps a resumed run from mixing settings.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use llamagen_encode::{ModelArgs, VqModel};
use llamagen_train::checkpoint::load_gpt;
use llamagen_train::gpt::Gpt;
use llamagen_train::run::parse_device;
use llamagen_train::sample::{SamplingConfig, generate};
use llamagen_train::{Condition, GptConfig, GptSize};

/// One step of SplitMix64 (the seed mixer of `derived_seed` and the label shuffle): the same
/// numbers on every platform and with every version of `rand`.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed for item `index` of stream `stream` (0: sampling shards, 1: the label order, 2: t2i
/// folder batches) of a run seeded `seed`: independent of which other items were done before.
pub fn derived_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut s = seed;
    let a = splitmix64(&mut s);
    let mut s = a ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let b = splitmix64(&mut s);
    let mut s = b ^ index;
    splitmix64(&mut s)
}

/// `n` class labels, balanced: `n / classes` of every class, and one more of each of the first
/// `n % classes` classes, in an order shuffled (Fisher–Yates over SplitMix64) by `seed`.
pub fn balanced_labels(n: usize, classes: usize, seed: u64) -> Vec<u32> {
    let mut labels: Vec<u32> = (0..n).map(|i| (i % classes.max(1)) as u32).collect();
    let mut state = derived_seed(seed, 1, 0);
    for i in (1..n).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        labels.swap(i, j);
    }
    labels
}

/// The official evaluation CFG scale of a c2i model size (`sample_c2i_ddp.py` runs of the
/// paper): 2.0 for GPT-B and GPT-L, 1.75 for GPT-XL and GPT-XXL, 1.65 for GPT-3B; None for
/// other sizes and for models whose width, depth and heads are no official size.
pub fn official_eval_cfg(cfg: &GptConfig) -> (Option<GptSize>, Option<f32>) {
    let size = GptSize::ALL
        .into_iter()
        .find(|s| s.dims() == (cfg.n_layer, cfg.n_head, cfg.dim));
    let scale = match size {
        Some(GptSize::B | GptSize::L) => Some(2.0),
        Some(GptSize::XL | GptSize::XXL) => Some(1.75),
        Some(GptSize::B3) => Some(1.65),
        _ => None,
    };
    (size, scale)
}

/// torch's cubic convolution weights (`get_cubic_upsample_coefficients`, A = -0.75) of the four
/// taps around a source position with fractional part `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Source taps (clamped indices) and weights of every output position along one axis.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let i0 = real.floor();
            let w = cubic_weights(real - i0);
            let i0 = i0 as i64;
            let idx =
                std::array::from_fn(|j| (i0 - 1 + j as i64).clamp(0, input as i64 - 1) as usize);
            (idx, w)
        })
        .collect()
}

/// `planes` row-major `h × w` float planes resized to `oh × ow` exactly as torch's
/// `F.interpolate(x, size=(oh, ow), mode='bicubic')` on float32: A = -0.75, align_corners=False
/// (source position `(o + 0.5)·in/out − 0.5`), no antialias, border taps clamped to the edge,
/// horizontal taps summed first for each of the four rows.
pub fn resize_bicubic_planes(
    src: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    assert_eq!(
        src.len(),
        planes * h * w,
        "resize_bicubic_planes: input size"
    );
    let (ty, tx) = (cubic_taps(h, oh), cubic_taps(w, ow));
    let mut out = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let plane = &src[p * h * w..(p + 1) * h * w];
        for (iy, wy) in &ty {
            for (ix, wx) in &tx {
                let mut acc = 0f32;
                for (&y, &cy) in iy.iter().zip(wy) {
                    let row = &plane[y * w..(y + 1) * w];
                    let mut r = 0f32;
                    for (&x, &cx) in ix.iter().zip(wx) {
                        r += cx * row[x];
                    }
                    acc += cy * r;
                }
                out.push(acc);
            }
        }
    }
    out
}

/// Images `(B, C, H, W)` resized to `size × size` with [`resize_bicubic_planes`] (float32, on
/// the CPU); unchanged when they already have that size.
pub fn resize_images(images: &Tensor, size: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    if (h, w) == (size, size) {
        return Ok(images.clone());
    }
    let x = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let y = resize_bicubic_planes(&x, b * c, (h, w), (size, size));
    Ok(Tensor::from_vec(y, (b, c, size, size), &Device::Cpu)?)
}

/// Images `(B, 3, H, W)` in about [-1, 1] as uint8 `B×H×W×3`, as the official sampling scripts
/// convert them for the evaluator: `clamp(127.5·x + 128, 0, 255)`, truncated to uint8.
pub fn images_u8(images: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    let images = images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (b, c, h, w) = images.dims4()?;
    let x = images
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = x
        .iter()
        .map(|&v| (127.5 * v + 128.0).clamp(0.0, 255.0) as u8)
        .collect();
    Ok((vec![b, h, w, c], bytes))
}

/// The temporary name `path` is written under before its rename.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through `<path>.partial` and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = partial_path(path);
    // Synced before the rename: after a crash the name holds the whole file or nothing.
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes one uint8 `h × w × 3` image as a PNG, atomically (as the official scripts'
/// `Image.fromarray(sample).save(...)`: the pixels as they are, no metadata).
pub fn write_png(path: &Path, h: usize, w: usize, pixels: &[u8]) -> Result<()> {
    let img = image::RgbImage::from_raw(w as u32, h as u32, pixels.to_vec())
        .context("image buffer of the wrong size")?;
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)?;
    write_atomic(path, buf.get_ref())
}

/// An `.npz` being written (as `np.savez`: a zip of stored `<name>.npy` entries with a fixed
/// timestamp, so equal arrays give equal bytes), under `<path>.partial` until [`Self::finish`]
/// renames it. Arrays may be streamed in pieces.
pub struct NpzWriter {
    zip: zip::ZipWriter<std::io::BufWriter<std::fs::File>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl NpzWriter {
    pub fn create(path: &Path) -> Result<NpzWriter> {
        let tmp = partial_path(path);
        let file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
        Ok(NpzWriter {
            zip: zip::ZipWriter::new(std::io::BufWriter::new(file)),
            tmp,
            path: path.to_path_buf(),
        })
    }

    /// Starts array `name` of numpy dtype `descr` (`|u1`, `<i8`, `<f4`) and `shape`; its
    /// `data_len` bytes follow through [`Self::write`].
    pub fn begin(&mut self, name: &str, descr: &str, shape: &[usize], data_len: u64) -> Result<()> {
        let header = crate::export_cmd::npy_bytes(descr, shape, &[]);
        let total = header.len() as u64 + data_len;
        self.zip.start_file(
            format!("{name}.npy"),
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .last_modified_time(zip::DateTime::default())
                .large_file(total >= u32::MAX as u64),
        )?;
        self.zip.write_all(&header)?;
        Ok(())
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.zip
            .write_all(bytes)
            .with_context(|| self.tmp.display().to_string())
    }

    /// One whole array.
    pub fn array(&mut self, name: &str, descr: &str, shape: &[usize], data: &[u8]) -> Result<()> {
        self.begin(name, descr, shape, data.len() as u64)?;
        self.write(data)
    }

    /// Completes the file and moves it to its name.
    pub fn finish(self) -> Result<()> {
        let file = self.zip.finish()?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
            .with_context(|| self.tmp.display().to_string())?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// Writes an ADM sample batch: `arr_0` uint8 N×H×W×3 and, when given, `arr_1` int64 labels (as
/// ADM's labelled batches, e.g. `VIRTUAL_imagenet256_labeled.npz`).
pub fn write_npz(path: &Path, shape: &[usize], data: &[u8], labels: Option<&[u32]>) -> Result<()> {
    let mut w = NpzWriter::create(path)?;
    w.array("arr_0", "|u1", shape, data)?;
    if let Some(l) = labels {
        let bytes: Vec<u8> = l.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect();
        w.array("arr_1", "<i8", &[l.len()], &bytes)?;
    }
    w.finish()
}

/// Identifies a weights file without reading all of it: its size and an FNV-1a hash of its
/// first and last MiB (a different checkpoint of the same model differs there), with the path
/// it was read from.
pub fn fingerprint(path: &Path) -> Result<serde_json::Value> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let len = f.metadata()?.len();
    const PART: u64 = 1 << 20;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |buf: &[u8]| {
        for &b in buf {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut buf = Vec::new();
    (&mut f).take(PART).read_to_end(&mut buf)?;
    feed(&buf);
    if len > PART {
        f.seek(SeekFrom::Start(len.saturating_sub(PART).max(PART)))?;
        buf.clear();
        f.read_to_end(&mut buf)?;
        feed(&buf);
    }
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(serde_json::json!({
        "path": abs.display().to_string(),
        "bytes": len,
        "fnv64": format!("{h:016x}"),
    }))
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

/// Keeps a run directory to one set of settings: writes `settings` to `path` when it does not
/// exist, else compares them with the recorded ones and refuses (naming every differing key)
/// when they differ. Keys starting with one of `soft` (paths, the device) only warn.
pub fn check_settings(path: &Path, settings: &serde_json::Value, soft: &[&str]) -> Result<()> {
    if !path.exists() {
        return write_atomic(
            path,
            (serde_json::to_string_pretty(settings)? + "\n").as_bytes(),
        );
    }
    let old: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| path.display().to_string())?,
    )
    .with_context(|| path.display().to_string())?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    flatten("", &old, &mut a);
    flatten("", settings, &mut b);
    let old_map: std::collections::BTreeMap<_, _> = a.into_iter().collect();
    let new_map: std::collections::BTreeMap<_, _> = b.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
    let mut hard = Vec::new();
    for k in keys {
        let (o, n) = (old_map.get(k), new_map.get(k));
        if o == n {
            continue;
        }
        let show =
            |v: Option<&serde_json::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
        let line = format!("{k}: {} then, {} now", show(o), show(n));
        if soft.iter().any(|s| k.starts_with(s)) {
            eprintln!("note: {} records {line}", path.display());
        } else {
            hard.push(line);
        }
    }
    if !hard.is_empty() {
        bail!(
            "{} was made with different settings ({}); give these settings again, or another output directory",
            path.display(),
            hard.join("; ")
        );
    }
    Ok(())
}

/// A progress bar over `len` items of `what`, starting at `pos`.
pub fn progress(len: u64, pos: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
        ))
        .expect("progress template"),
    );
    bar.set_position(pos);
    bar
}

/// The VQ architecture named by `--vq-args`: vq16, vq8, reduced, or a JSON file of ModelArgs.
pub fn vq_model_args(name: &str) -> Result<ModelArgs> {
    Ok(match name {
        "vq16" => ModelArgs::vq_16(),
        "vq8" => ModelArgs::vq_8(),
        "reduced" => ModelArgs::reduced(),
        path => serde_json::from_str(
            &std::fs::read_to_string(path).with_context(|| format!("--vq-args {path}"))?,
        )
        .with_context(|| format!("--vq-args {path}"))?,
    })
}

/// A GPT and the VQ decoding its tokens, loaded for sampling (float32).
pub struct Sampler {
    pub cfg: GptConfig,
    pub vq_args: ModelArgs,
    pub device: Device,
    model: Gpt,
    vq: VqModel,
}

impl Sampler {
    /// Loads the GPT of `checkpoint` (a training checkpoint directory, or a weights file with
    /// the run config `config`) and the VQ `vq` of architecture `vq_args` on `device`; the
    /// codebook must match the GPT's vocabulary.
    pub fn load(
        checkpoint: &Path,
        config: Option<&Path>,
        vq: &Path,
        vq_args: &str,
        device: &str,
    ) -> Result<Sampler> {
        let device = parse_device(device)?;
        let (cfg, weights) = crate::sample_cmd::model_config(checkpoint, config)?;
        let vq_args = vq_model_args(vq_args)?;
        if vq_args.codebook_size != cfg.vocab_size {
            bail!(
                "the VQ codebook has {} codes, the GPT vocabulary {}",
                vq_args.codebook_size,
                cfg.vocab_size
            );
        }
        let vq = VqModel::from_file(vq, &vq_args, &device)
            .with_context(|| format!("loading {}", vq.display()))?;
        let model = load_gpt(&weights, &cfg, DType::F32, &device)
            .with_context(|| format!("loading {}", weights.display()))?;
        Ok(Sampler {
            cfg,
            vq_args,
            device,
            model,
            vq,
        })
    }

    /// Generates one image per condition row in batches of `batch_size` (one KV cache each,
    /// the generator running on across batches) and decodes them: `(B, 3, H, W)` float32 on the
    /// CPU, the decoder output as it is (no clamp).
    pub fn sample(
        &self,
        cond: &Condition,
        emb_mask: Option<&Tensor>,
        sc: &SamplingConfig,
        batch_size: usize,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<(Tensor, Vec<Vec<u32>>)> {
        let n = cond.batch_size()?;
        let per = batch_size.max(1);
        let g = self.cfg.grid_size();
        let (mut tokens_out, mut decoded) = (Vec::new(), Vec::new());
        for b0 in (0..n).step_by(per) {
            let m = per.min(n - b0);
            let c = match cond {
                Condition::Class(t) => Condition::Class(t.narrow(0, b0, m)?),
                Condition::Caption(t) => Condition::Caption(t.narrow(0, b0, m)?),
            };
            let mask = emb_mask.map(|t| t.narrow(0, b0, m)).transpose()?;
            let tokens = generate(&self.model, &c, mask.as_ref(), self.cfg.block_size, sc, rng)?;
            tokens_out.extend(tokens.to_vec2::<u32>()?);
            let images = self
                .vq
                .decode_code(&tokens, (m, self.vq_args.codebook_embed_dim, g, g))?;
            decoded.push(images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        }
        Ok((Tensor::cat(&decoded, 0)?, tokens_out))
    }

    /// As [`Self::sample`], but image `i` draws from its own generator, seeded
    /// `per_image_seed(seed, i)`, through the paged batch decoder
    /// (`llamagen_train::sample::generate_per_image`): its tokens depend only on its condition,
    /// the settings and that seed, never on `batch_size` or the other images, and are the
    /// tokens `llamagen serve` gives image `i` of a request seeded `seed` (CPU float32 only).
    pub fn sample_per_image(
        &self,
        cond: &Condition,
        emb_mask: Option<&Tensor>,
        sc: &SamplingConfig,
        batch_size: usize,
        seed: u64,
    ) -> Result<(Tensor, Vec<Vec<u32>>)> {
        use llamagen_train::sample::{ImageCondition, ImageJob, per_image_seed};
        let conditions: Vec<ImageCondition> = match cond {
            Condition::Class(t) => t
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(ImageCondition::Class)
                .collect(),
            Condition::Caption(t) => {
                let (b, l, c) = t.dims3()?;
                let f = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let m: Vec<f32> = match emb_mask {
                    Some(m) => m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                    None => vec![1.0; b * l],
                };
                (0..b)
                    .map(|i| ImageCondition::Caption {
                        features: f[i * l * c..(i + 1) * l * c].to_vec(),
                        mask: m[i * l..(i + 1) * l].iter().map(|&x| x != 0.0).collect(),
                    })
                    .collect()
            }
        };
        let jobs: Vec<ImageJob> = conditions
            .into_iter()
            .enumerate()
            .map(|(i, condition)| ImageJob {
                condition,
                sampling: sc.clone(),
                seed: per_image_seed(seed, i as u64),
            })
            .collect();
        let tokens = llamagen_train::sample::generate_per_image(&self.model, &jobs, batch_size)?;
        let g = self.cfg.grid_size();
        let mut decoded = Vec::new();
        for chunk in tokens.chunks(batch_size.max(1)) {
            let m = chunk.len();
            let flat: Vec<u32> = chunk.iter().flatten().copied().collect();
            let codes = Tensor::from_vec(flat, (m, g * g), &self.device)?;
            let images = self
                .vq
                .decode_code(&codes, (m, self.vq_args.codebook_embed_dim, g, g))?;
            decoded.push(images.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        }
        Ok((Tensor::cat(&decoded, 0)?, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_balanced_and_seeded() {
        let l = balanced_labels(25, 10, 3);
        let mut counts = [0; 10];
        for &x in &l {
            counts[x as usize] += 1;
        }
        assert_eq!(counts, [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]);
        assert_eq!(l, balanced_labels(25, 10, 3));
        assert_ne!(l, balanced_labels(25, 10, 4));
    }

    /// Random planes (values beyond [-1, 1]) resized by torch's `F.interpolate(mode='bicubic')`
    /// (PyPI torch from `LLAMAGEN_TORCH_PYTHON`, default `.venv-torch/bin/python`), down and up,
    /// odd and non-square sizes and 384 -> 256: equal to [`resize_bicubic_planes`] within 1e-5.
    #[test]
    fn resize_matches_torch() {
        let python = std::env::var("LLAMAGEN_TORCH_PYTHON").map_or_else(
            |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-torch/bin/python"),
            PathBuf::from,
        );
        assert!(
            python.exists(),
            "{} not found: run `make setup-torch`",
            python.display()
        );
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            ((384, 384), (256, 256)),
            ((24, 24), (16, 16)),
            ((7, 9), (5, 13)),
            ((5, 3), (11, 8)),
            ((1, 4), (3, 2)),
        ];
        let script = r#"
import sys, numpy as np, torch, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
out = sys.argv[1]
for i, a in enumerate(sys.argv[2:]):
    h, w, oh, ow = map(int, a.split(','))
    x = torch.randn(2, 3, h, w, generator=g) * 1.5
    y = F.interpolate(x, size=(oh, ow), mode='bicubic')
    np.save(f'{out}/x{i}.npy', x.numpy()); np.save(f'{out}/y{i}.npy', y.numpy())
"#;
        let o = std::process::Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(tmp.path())
            .args(
                cases
                    .iter()
                    .map(|((h, w), (oh, ow))| format!("{h},{w},{oh},{ow}")),
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for (i, ((h, w), (oh, ow))) in cases.into_iter().enumerate() {
            let read = |n: &str| {
                Tensor::read_npy(tmp.path().join(format!("{n}{i}.npy")))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (x, want) = (read("x"), read("y"));
            let got = resize_bicubic_planes(&x, 6, (h, w), (oh, ow));
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert_eq!(got.len(), want.len());
            assert!(diff <= 1e-5, "{h}x{w} -> {oh}x{ow}: max abs diff {diff}");
        }
    }

    #[test]
    fn paper_cfg_scales_by_model_size() {
        let scale = |s: GptSize, px: usize| official_eval_cfg(&GptConfig::c2i(s, px));
        assert_eq!(scale(GptSize::B, 256), (Some(GptSize::B), Some(2.0)));
        assert_eq!(scale(GptSize::L, 384), (Some(GptSize::L), Some(2.0)));
        assert_eq!(scale(GptSize::XL, 384), (Some(GptSize::XL), Some(1.75)));
        assert_eq!(scale(GptSize::XXL, 384), (Some(GptSize::XXL), Some(1.75)));
        assert_eq!(scale(GptSize::B3, 384), (Some(GptSize::B3), Some(1.65)));
        assert_eq!(scale(GptSize::B7, 384), (Some(GptSize::B7), None));
        let tiny = GptConfig {
            dim: 32,
            n_layer: 2,
            n_head: 2,
            ..GptConfig::default()
        };
        assert_eq!(official_eval_cfg(&tiny), (None, None));
    }

    #[test]
    fn resize_keeps_constants_and_identity() {
        let x = vec![0.25f32; 2 * 6 * 6];
        let y = resize_bicubic_planes(&x, 2, (6, 6), (4, 4));
        assert!(y.iter().all(|&v| (v - 0.25).abs() < 1e-6));
        let x: Vec<f32> = (0..36).map(|i| i as f32).collect();
        let y = resize_bicubic_planes(&x, 1, (6, 6), (6, 6));
        assert_eq!(x, y);
    }
}
