//! `llamagen tokenizer reconstruct`: round-trips images through a VQ (or decodes stored codes) to
//! a PNG grid, and reports PSNR, SSIM (as LlamaGen's evaluation computes them), codebook usage
//! and, with an Inception model, rFID (the FID of the reconstructions against the originals).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use image::RgbImage;
use llamagen_encode::metrics::llamagen_reconstruction_metrics;
use llamagen_encode::{VqModel, augment};

use crate::stages::VqModelSpec;

#[derive(Args, Debug)]
pub struct ReconstructArgs {
    /// VQ weights: the official .pt or safetensors with the official keys.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Architecture: vq16, vq8, or a JSON file of ModelArgs.
    #[arg(long, default_value = "vq16")]
    pub model: String,
    /// Images or directories of images to round-trip (centre-cropped to --image-size).
    #[arg(long = "images", num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Instead of images: decode the stored centre-crop codes of these sample keys
    /// (comma-separated) from the catalog at --catalog.
    #[arg(long, value_delimiter = ',')]
    pub keys: Vec<String>,
    /// Catalog root for --keys.
    #[arg(long)]
    pub catalog: Option<String>,
    #[arg(long, default_value = "samples")]
    pub dataset: String,
    #[arg(long, default_value_t = 256)]
    pub image_size: u32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// At most this many images.
    #[arg(long, default_value_t = 64)]
    pub limit: usize,
    /// Output PNG grid: originals on odd rows, reconstructions below them.
    #[arg(long, default_value = "reconstruction.png")]
    pub out: PathBuf,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Inception-v3 ONNX model (as `llamagen eval`): also report rFID, the FID of the
    /// reconstructions against the original crops, as the official tokenizer validation
    /// evaluates its reconstruction batch (needs --images, at least 2).
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Also write the original crops and the reconstructions as ADM batches
    /// (`DIR/originals.npz`, `DIR/reconstructions.npz`) for `llamagen eval`.
    #[arg(long)]
    pub npz_dir: Option<PathBuf>,
}

/// An image `(3, H, W)` in about [-1, 1] as uint8 H×W×3, converted as the official scripts
/// convert samples for the evaluator: `clamp(127.5·x + 128, 0, 255)`, truncated.
fn to_u8_hwc(t: &Tensor) -> Result<Vec<u8>> {
    let x = t
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(x.iter()
        .map(|&v| (127.5 * v + 128.0).clamp(0.0, 255.0) as u8)
        .collect())
}

fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn to_rgb(t: &Tensor) -> Result<RgbImage> {
    Ok(augment::to_rgb_image(t)?)
}

/// Rows of images (originals over reconstructions, or decoded codes) as one grid.
fn grid(rows: Vec<Vec<RgbImage>>) -> Result<RgbImage> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut cells = Vec::with_capacity(rows.len() * cols);
    for row in rows {
        let n = row.len();
        cells.extend(row.into_iter().map(Some));
        cells.extend((n..cols).map(|_| None));
    }
    Ok(augment::make_grid(&cells, cols)?)
}

pub async fn run(a: ReconstructArgs) -> Result<()> {
    let args = VqModelSpec::Named(a.model.clone()).args()?;
    let vq = VqModel::from_file(&a.checkpoint, &args, &Device::Cpu)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let mut rows: Vec<Vec<RgbImage>> = Vec::new();
    let mut used = BTreeSet::new();
    let (mut psnr, mut ssim, mut n, mut failed) = (0.0, 0.0, 0usize, Vec::new());
    let (mut originals, mut reconstructions) = (Vec::<u8>::new(), Vec::<u8>::new());
    if !a.keys.is_empty() && (a.inception.is_some() || a.npz_dir.is_some()) {
        bail!("--inception and --npz-dir need --images (stored codes have no originals)");
    }
    if !a.keys.is_empty() {
        let root = a.catalog.as_deref().context("--keys needs --catalog")?;
        let cat = llamagen_catalog::Catalog::open(root, &Default::default()).await?;
        let ctx = cat.session().await?;
        let list = a
            .keys
            .iter()
            .map(|k| format!("'{}'", k.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",");
        let batches = ctx
            .sql(&format!(
                "SELECT key, vq_codes FROM {} WHERE key IN ({list})",
                a.dataset
            ))
            .await?
            .collect()
            .await?;
        use llamagen_catalog::arrow::array::{Array, AsArray};
        use llamagen_catalog::arrow::datatypes::Int32Type;
        let mut decoded = Vec::new();
        for b in &batches {
            let codes_col = b.column(1).as_list::<i32>();
            for i in 0..b.num_rows() {
                if codes_col.is_null(i) {
                    continue;
                }
                let v = codes_col.value(i);
                let s = v.as_struct();
                let sz = s
                    .column_by_name("image_size")
                    .unwrap()
                    .as_primitive::<Int32Type>();
                let kind = s.column_by_name("kind").unwrap().as_string::<i32>();
                let grid_c = s
                    .column_by_name("grid")
                    .unwrap()
                    .as_primitive::<Int32Type>();
                let cl = s.column_by_name("codes").unwrap().as_list::<i32>();
                if let Some(j) = (0..s.len())
                    .find(|&j| sz.value(j) == a.image_size as i32 && kind.value(j) == "center")
                {
                    let g = grid_c.value(j) as usize;
                    let c: Vec<u32> = llamagen_catalog::schema::codes_of(cl.value(j).as_ref())
                        .context("vq_codes codes are not int16 codebook indices")?
                        .iter()
                        .map(|&x| x as u32)
                        .collect();
                    used.extend(c.iter().copied());
                    let idx = Tensor::from_vec(c, g * g, &Device::Cpu)?;
                    let img = vq.decode_code(&idx, (1, args.codebook_embed_dim, g, g))?;
                    decoded.push(to_rgb(&img.squeeze(0)?)?);
                }
            }
        }
        if decoded.is_empty() {
            bail!("none of the keys has {} px centre-crop codes", a.image_size);
        }
        n = decoded.len();
        rows.push(decoded);
    } else {
        let files = image_files(&a.images)?;
        if files.is_empty() {
            bail!("give --images (files or directories) or --keys with --catalog");
        }
        let mut crops = Vec::new();
        for f in files.iter().take(a.limit) {
            match image::open(f) {
                Ok(img) => crops.push(augment::center_crop_arr(&img.to_rgb8(), a.image_size)?),
                Err(e) => failed.push(format!("{}: {e}", f.display())),
            }
        }
        for chunk in crops.chunks(a.batch_size.max(1)) {
            let x = augment::to_tensor(chunk, &Device::Cpu)?;
            let q = vq.encode(&x)?;
            let idx: Vec<u32> = q.indices.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
            used.extend(idx);
            let y = vq.decode(&q.quant)?;
            let (mut top, mut bottom) = (Vec::new(), Vec::new());
            for k in 0..chunk.len() {
                let (p, s) = llamagen_reconstruction_metrics(&x.get(k)?, &y.get(k)?)?;
                psnr += p;
                ssim += s;
                n += 1;
                originals.extend_from_slice(chunk[k].as_raw());
                reconstructions.extend(to_u8_hwc(&y.get(k)?)?);
                top.push(chunk[k].clone());
                bottom.push(to_rgb(&y.get(k)?)?);
            }
            rows.push(top);
            rows.push(bottom);
        }
        if n == 0 {
            bail!("no image decoded: {}", failed.join("; "));
        }
    }
    let g = grid(rows)?;
    g.save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let usage = used.len() as f64 / args.codebook_size as f64;
    let side = a.image_size as usize;
    let batch = |pixels: Vec<u8>| llamagen_eval::batch::Images {
        n,
        height: side,
        width: side,
        pixels,
    };
    let (originals, reconstructions) = (batch(originals), batch(reconstructions));
    if let Some(dir) = &a.npz_dir {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        for (name, b) in [
            ("originals", &originals),
            ("reconstructions", &reconstructions),
        ] {
            let p = dir.join(format!("{name}.npz"));
            crate::sample_cmd::write_npz(&p, &[b.n, side, side, 3], &b.pixels)?;
        }
    }
    let rfid = match &a.inception {
        Some(m) if a.keys.is_empty() => {
            if n < 2 {
                bail!("rFID needs at least 2 images, got {n}");
            }
            let model = llamagen_eval::inception::Inception::load(
                m,
                &llamagen_filters::model::ModelOptions {
                    batch_size: a.batch_size.max(1),
                    ..Default::default()
                },
            )?;
            let stats = |b: &llamagen_eval::batch::Images| -> Result<llamagen_eval::FidStats> {
                let acts = model.activations(b, |_| {})?;
                Ok(llamagen_eval::FidStats::of(
                    &acts.pool,
                    acts.n,
                    acts.pool_dim,
                )?)
            };
            Some(stats(&reconstructions)?.frechet_distance(&stats(&originals)?)?)
        }
        _ => None,
    };
    let report = if a.keys.is_empty() {
        serde_json::json!({
            "images": n, "psnr": psnr / n as f64, "ssim": ssim / n as f64,
            "rfid": rfid,
            "codebook_used": used.len(), "codebook_size": args.codebook_size, "codebook_usage": usage,
            "unreadable": failed, "grid": a.out,
        })
    } else {
        serde_json::json!({
            "decoded": n, "codebook_used": used.len(), "codebook_size": args.codebook_size,
            "codebook_usage": usage, "grid": a.out,
        })
    };
    for f in &failed {
        eprintln!("skipped {f}");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(j) = &a.json {
        std::fs::write(j, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
