//! Images → code grids with the reduced reference VQ (downsampling 4): raster order, batching
//! and the grid-size check.

use std::path::PathBuf;

use anyhow::{Result, ensure};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use image::RgbImage;
use llamagen_encode::codes::{self, CodeGrid};
use llamagen_encode::{EncodeError, ModelArgs, VqModel, augment};

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

fn model() -> Result<VqModel> {
    Ok(VqModel::from_file(
        &parity_dir().join("vq_weights.safetensors"),
        &ModelArgs::reduced(),
        &Device::Cpu,
    )?)
}

fn inputs() -> Result<Vec<RgbImage>> {
    let io =
        candle_core::safetensors::load(parity_dir().join("augment_io.safetensors"), &Device::Cpu)?;
    let mut out = Vec::new();
    for case in ["big", "small"] {
        let t = &io[&format!("{case}.input_hwc_u8")];
        let (h, w, _) = t.dims3()?;
        out.push(augment::rgb_from_hwc(
            t.flatten_all()?.to_vec1::<u8>()?,
            h as u32,
            w as u32,
        )?);
    }
    Ok(out)
}

#[test]
fn ten_crop_codes_are_raster_grids_independent_of_batching() -> Result<()> {
    let model = model()?;
    for img in inputs()? {
        let grids = codes::ten_crop_codes(&model, &img, 32, 1.1, 3)?;
        ensure!(grids.len() == 10);
        let crops = augment::ten_crop_arr(&img, 32, 1.1)?;
        let one_by_one: Vec<CodeGrid> = crops
            .iter()
            .map(|c| {
                codes::encode_images(&model, std::slice::from_ref(c), 1).map(|mut g| g.remove(0))
            })
            .collect::<std::result::Result<_, _>>()?;
        ensure!(grids == one_by_one, "batching changed the codes");
        for (crop, grid) in crops.iter().zip(&grids) {
            ensure!((grid.height, grid.width) == (8, 8) && grid.codes.len() == 64);
            let x = augment::to_tensor(std::slice::from_ref(crop), &Device::Cpu)?;
            let idx = model.encode_indices(&x)?.to_dtype(DType::U32)?.get(0)?;
            for row in 0..8 {
                for col in 0..8 {
                    let want = idx.get(row)?.get(col)?.to_scalar::<u32>()?;
                    ensure!(grid.codes[row * 8 + col] as u32 == want);
                }
            }
        }
        // Every code is a row of the 64-entry codebook.
        ensure!(
            grids
                .iter()
                .all(|g| g.codes.iter().all(|&c| (c as usize) < 64))
        );
    }
    Ok(())
}

#[test]
fn center_crop_codes_match_the_plain_path() -> Result<()> {
    let model = model()?;
    let imgs = inputs()?;
    let batch = codes::center_crop_codes(&model, &imgs, 32, 4)?;
    ensure!(batch.len() == 2);
    for (img, grid) in imgs.iter().zip(&batch) {
        let [plain, flipped] = codes::center_crop_flip_codes(&model, img, 32)?;
        ensure!(&plain == grid);
        let x = augment::to_tensor(
            &[augment::hflip(&augment::center_crop_arr(img, 32)?)],
            &Device::Cpu,
        )?;
        let want: Vec<u32> = model
            .encode_indices(&x)?
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        ensure!(flipped.codes.iter().map(|&c| c as u32).collect::<Vec<_>>() == want);
    }
    Ok(())
}

#[test]
fn sizes_off_the_grid_are_refused_with_size_and_factor() -> Result<()> {
    let model = model()?;
    let img = RgbImage::new(30, 32);
    let err = codes::encode_images(&model, &[img], 1).expect_err("30 is not a multiple of 4");
    let msg = err.to_string();
    println!("{msg}");
    ensure!(matches!(
        err,
        EncodeError::ImageSize {
            width: 30,
            height: 32,
            factor: 4
        }
    ));
    ensure!(msg.contains("30x32") && msg.contains('4'));
    let err = codes::center_crop_codes(&model, &inputs()?, 30, 2).expect_err("30 is off the grid");
    ensure!(matches!(err, EncodeError::ImageSize { .. }));
    let mixed = [RgbImage::new(32, 32), RgbImage::new(36, 36)];
    ensure!(codes::encode_images(&model, &mixed, 2).is_err());
    ensure!(codes::encode_images(&model, &[], 2)?.is_empty());
    Ok(())
}

#[test]
fn codebooks_beyond_u16_are_refused() -> Result<()> {
    let args = ModelArgs {
        codebook_size: 70_000,
        ..ModelArgs::reduced()
    };
    let model = VqModel::load(VarBuilder::zeros(DType::F32, &Device::Cpu), &args)?;
    let err = codes::encode_images(&model, &[RgbImage::new(32, 32)], 1).expect_err("u16");
    ensure!(err.to_string().contains("70000"));
    Ok(())
}
