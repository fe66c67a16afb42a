//! center_crop_arr, TenCrop, flip and normalisation against the tensors Pillow and torchvision
//! produced (`data/parity/augment_io.safetensors`): every byte and every float exactly equal.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use image::RgbImage;
use llamagen_encode::augment::{self, Filter};

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

fn io() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        parity_dir().join("augment_io.safetensors"),
        &Device::Cpu,
    )?)
}

fn image(io: &HashMap<String, Tensor>, name: &str) -> Result<RgbImage> {
    let t = io.get(name).with_context(|| format!("no {name}"))?;
    let (h, w, c) = t.dims3()?;
    ensure!(c == 3);
    Ok(augment::rgb_from_hwc(
        t.flatten_all()?.to_vec1::<u8>()?,
        h as u32,
        w as u32,
    )?)
}

fn floats(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

fn count_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

#[test]
fn center_crop_arr_is_byte_exact() -> Result<()> {
    let io = io()?;
    for case in ["big", "small"] {
        let input = image(&io, &format!("{case}.input_hwc_u8"))?;
        let want = image(&io, &format!("{case}.center_crop_35_hwc_u8"))?;
        let got = augment::center_crop_arr(&input, 35)?;
        ensure!(got.dimensions() == (35, 35));
        let n = count_diff(got.as_raw(), want.as_raw());
        println!(
            "{case}: center_crop_arr(35) differs in {n} of {} bytes",
            want.len()
        );
        ensure!(n == 0, "{case}: {n} bytes differ");
    }
    Ok(())
}

#[test]
fn ten_crop_and_plain_crops_are_float_exact() -> Result<()> {
    let io = io()?;
    for case in ["big", "small"] {
        let input = image(&io, &format!("{case}.input_hwc_u8"))?;
        let crops = augment::ten_crop_arr(&input, 32, 1.1)?;
        ensure!(crops.len() == 10);
        let got = augment::to_tensor(&crops, &Device::Cpu)?;
        let want = &io[&format!("{case}.ten_crop")];
        ensure!(got.dims() == want.dims());
        ensure!(floats(&got)? == floats(want)?, "{case}: ten-crop differs");

        let [plain, flip] = augment::center_crop_and_flip(&input, 32)?;
        let got = augment::to_tensor(&[plain, flip], &Device::Cpu)?;
        let want_plain = &io[&format!("{case}.plain_center_crop")];
        let want_flip = &io[&format!("{case}.plain_center_crop_flip")];
        ensure!(
            floats(&got.get(0)?)? == floats(want_plain)?,
            "{case}: plain crop differs"
        );
        ensure!(
            floats(&got.get(1)?)? == floats(want_flip)?,
            "{case}: flipped crop differs"
        );
    }
    Ok(())
}

#[test]
fn real_crop_sizes_and_center_offsets() -> Result<()> {
    ensure!(augment::crop_size(256, 1.1) == 281);
    ensure!(augment::crop_size(384, 1.1) == 422);
    ensure!(augment::crop_size(256, 1.05) == 268);
    ensure!(augment::crop_size(384, 1.05) == 403);
    ensure!(augment::crop_size(32, 1.1) == 35);
    // The center crop of a 281² image at 256 starts at 12 (12.5 rounds to even), of 403² at 384
    // at 10 (9.5 rounds to even).
    for (size, crop, offset) in [(281u32, 256u32, 12u32), (403, 384, 10), (35, 32, 2)] {
        let img = RgbImage::from_fn(size, size, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let five = augment::five_crop(&img, crop)?;
        let c = &five[4];
        ensure!(
            c.get_pixel(0, 0).0 == [offset as u8, offset as u8, 0],
            "{size}->{crop}"
        );
        ensure!(five[1].get_pixel(0, 0).0 == [(size - crop) as u8, 0, 0]);
        ensure!(five[2].get_pixel(0, 0).0 == [0, (size - crop) as u8, 0]);
    }
    Ok(())
}

#[test]
fn resize_keeps_constant_images_and_box_halving_averages() -> Result<()> {
    let grey = RgbImage::from_pixel(37, 23, image::Rgb([77, 128, 201]));
    for (w, h) in [(10, 7), (80, 50), (37, 5), (3, 23)] {
        for f in [Filter::Box, Filter::Bicubic] {
            let r = augment::resize(&grey, w, h, f)?;
            ensure!(r.dimensions() == (w, h));
            ensure!(r.pixels().all(|p| p.0 == [77, 128, 201]), "{f:?} {w}x{h}");
        }
    }
    // BOX halving of an even image is the 2×2 mean, rounded half up.
    let img = RgbImage::from_fn(4, 2, |x, y| image::Rgb([(x * 10 + y) as u8, 0, 255]));
    let r = augment::resize(&img, 2, 1, Filter::Box)?;
    ensure!(
        r.get_pixel(0, 0).0 == [6, 0, 255],
        "{:?}",
        r.get_pixel(0, 0)
    );
    ensure!(
        r.get_pixel(1, 0).0 == [26, 0, 255],
        "{:?}",
        r.get_pixel(1, 0)
    );
    Ok(())
}

#[test]
fn invalid_sizes_are_refused() {
    let img = RgbImage::new(10, 10);
    assert!(augment::five_crop(&img, 11).is_err());
    assert!(augment::resize(&img, 0, 5, Filter::Box).is_err());
    assert!(augment::center_crop_arr(&img, 0).is_err());
    assert!(augment::to_tensor(&[], &Device::Cpu).is_err());
}

/// Pillow's own `Image.resize` and ADM's `center_crop_arr` on pseudo-photos of even and odd
/// sizes (fixtures/resize, written by make_cases.py beside them): every byte equal, through the
/// general passes and the exact 2:1 BOX fast path alike; the multi-size crop equals the single.
#[test]
fn resize_and_center_crop_match_pillow() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    ensure!(cases.len() >= 12);
    let load = |f: &str| -> Result<RgbImage> { Ok(image::open(dir.join(f))?.to_rgb8()) };
    for c in &cases {
        let input = load(c["input"].as_str().unwrap())?;
        let want = load(c["output"].as_str().unwrap())?;
        let (w, h) = (
            c["size"][0].as_u64().unwrap() as u32,
            c["size"][1].as_u64().unwrap() as u32,
        );
        let got = match c["op"].as_str().unwrap() {
            "box" => augment::resize(&input, w, h, Filter::Box)?,
            "bicubic" => augment::resize(&input, w, h, Filter::Bicubic)?,
            "center_crop_arr" => {
                let single = augment::center_crop_arr(&input, w)?;
                let multi = augment::center_crop_arr_multi(&input, &[100, w, 48])?;
                ensure!(multi[1] == single, "{c}: multi-size crop differs");
                single
            }
            op => anyhow::bail!("unknown op {op}"),
        };
        ensure!(got.dimensions() == want.dimensions(), "{c}");
        let n = count_diff(got.as_raw(), want.as_raw());
        ensure!(n == 0, "{c}: {n} bytes differ from Pillow");
    }
    Ok(())
}
