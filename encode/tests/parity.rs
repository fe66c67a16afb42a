//! The reduced VQ against the tensors the official PyTorch code produced (`data/parity/`):
//! every intermediate within 1e-4, codes exactly equal, train-mode losses and codebook usage.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use llamagen_encode::{ModelArgs, VqModel};

const TOL: f32 = 1e-4;

fn parity_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/parity")
}

fn reduced_model() -> Result<VqModel> {
    let path = parity_dir().join("vq_weights.safetensors");
    Ok(VqModel::from_file(
        &path,
        &ModelArgs::reduced(),
        &Device::Cpu,
    )?)
}

fn io() -> Result<HashMap<String, Tensor>> {
    let path = parity_dir().join("vq_io.safetensors");
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

fn get<'a>(io: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    io.get(name).with_context(|| format!("vq_io has no {name}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    ensure!(
        a.dims() == b.dims(),
        "shape {:?} vs reference {:?}",
        a.dims(),
        b.dims()
    );
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok(d)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
    let d = max_abs_diff(got, want)?;
    println!("{what}: max abs diff {d:e}");
    ensure!(d <= tol, "{what}: max abs diff {d:e} exceeds {tol:e}");
    Ok(())
}

fn as_i64(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
}

#[test]
fn encoder_quantizer_and_decoder_match_the_reference() -> Result<()> {
    let model = reduced_model()?;
    let io = io()?;
    let x = get(&io, "inputs.images")?;
    let trace = model.encode_trace(x)?;
    assert_close(
        "encoder_out",
        &trace.encoder_out,
        get(&io, "outputs.encoder_out")?,
        TOL,
    )?;
    assert_close(
        "pre_quant",
        &trace.pre_quant,
        get(&io, "outputs.pre_quant")?,
        TOL,
    )?;
    assert_close(
        "quant",
        &trace.quantized.quant,
        get(&io, "outputs.quant")?,
        TOL,
    )?;
    assert_close(
        "distances",
        &trace.quantized.distances,
        get(&io, "outputs.distances")?,
        TOL,
    )?;
    let want = as_i64(get(&io, "outputs.indices")?)?;
    let got = as_i64(&trace.quantized.indices)?;
    ensure!(got == want, "indices differ:\n got {got:?}\nwant {want:?}");

    let grid = model.encode_indices(x)?;
    ensure!(grid.dims() == [2, 8, 8], "grid shape {:?}", grid.dims());
    ensure!(as_i64(&grid)? == as_i64(get(&io, "outputs.indices_bhw")?)?);

    let decoded = model.decode(&trace.quantized.quant)?;
    assert_close("decoded", &decoded, get(&io, "outputs.decoded")?, TOL)?;
    let forward = model.forward(x)?;
    assert_close("forward", &forward, get(&io, "outputs.decoded")?, TOL)?;

    let from_code = model.decode_code(get(&io, "outputs.indices")?, (2, 8, 8, 8))?;
    assert_close(
        "decoded_from_code",
        &from_code,
        get(&io, "outputs.decoded_from_code")?,
        TOL,
    )?;
    // u32 codes in (B, h, w) layout decode identically.
    let from_grid = model.decode_code(&grid, (2, 8, 8, 8))?;
    ensure!(max_abs_diff(&from_grid, &from_code)? == 0.0);
    Ok(())
}

#[test]
fn quantizer_output_rows_are_unit_norm_codebook_rows() -> Result<()> {
    let model = reduced_model()?;
    let io = io()?;
    let q = model.encode(get(&io, "inputs.images")?)?;
    let rows = model
        .quantize()
        .codebook()?
        .index_select(&q.indices, 0)?
        .reshape((2, 8, 8, 8))?
        .permute((0, 3, 1, 2))?;
    // Straight-through z + (z_q − z) equals z_q up to float rounding.
    assert_close("z_q vs codebook rows", &q.quant, &rows, 1e-6)?;
    let norms = rows.sqr()?.sum(1)?.sqrt()?;
    let ones = norms.ones_like()?;
    assert_close("row norms", &norms, &ones, 1e-6)?;
    Ok(())
}

#[test]
fn train_mode_losses_and_codebook_usage_match_the_reference() -> Result<()> {
    let mut model = reduced_model()?;
    let io = io()?;
    let x = get(&io, "inputs.images")?;
    let (decoded, q, losses) = model.forward_train(x)?;
    assert_close("train decoded", &decoded, get(&io, "outputs.decoded")?, TOL)?;
    ensure!(as_i64(&q.indices)? == as_i64(get(&io, "outputs.indices")?)?);
    let scalar = |t: &Tensor| -> Result<Tensor> { Ok(t.reshape(1)?) };
    assert_close(
        "vq_loss",
        &scalar(&losses.vq_loss)?,
        get(&io, "outputs.train_vq_loss")?,
        1e-6,
    )?;
    assert_close(
        "commit_loss",
        &scalar(&losses.commit_loss)?,
        get(&io, "outputs.train_commit_loss")?,
        1e-6,
    )?;
    assert_close(
        "entropy_loss",
        &scalar(&losses.entropy_loss)?,
        get(&io, "outputs.train_entropy_loss")?,
        0.0,
    )?;
    let usage = losses.codebook_usage.context("usage tracking is on")?;
    let want = get(&io, "outputs.train_codebook_usage")?.to_vec1::<f32>()?[0];
    println!("codebook usage {usage} (reference {want})");
    ensure!(usage as f32 == want, "usage {usage} vs {want}");

    // The ring buffer now ends with this call's codes; the zeros before them still count as
    // code 0.
    let used = model.quantize().codebook_used().to_vec1::<f32>()?;
    let codes = as_i64(&q.indices)?;
    let tail: Vec<i64> = used[used.len() - codes.len()..]
        .iter()
        .map(|&v| v as i64)
        .collect();
    ensure!(tail == codes);
    ensure!(used[..used.len() - codes.len()].iter().all(|&v| v == 0.0));

    // A second identical call shifts the same codes in again: usage is unchanged.
    let (_, _, again) = model.forward_train(x)?;
    ensure!(again.codebook_usage == Some(usage));
    Ok(())
}

#[test]
fn usage_counts_only_real_codes_once_the_ring_buffer_is_full() -> Result<()> {
    let mut model = reduced_model()?;
    let io = io()?;
    let pre_quant = get(&io, "outputs.pre_quant")?;
    // 512 calls of 128 codes fill the 65536-entry buffer exactly.
    let mut usage = 0.0;
    for _ in 0..512 {
        let (_, losses) = model.quantize_mut().forward_train(pre_quant)?;
        usage = losses.codebook_usage.context("usage")?;
    }
    let mut distinct = as_i64(get(&io, "outputs.indices")?)?;
    distinct.sort_unstable();
    distinct.dedup();
    let expected = distinct.len() as f64 / 64.0;
    ensure!(usage == expected, "usage {usage} vs {expected}");
    Ok(())
}
