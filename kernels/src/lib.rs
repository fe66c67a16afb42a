//! CPU float32 kernels shared by `llamagen-encode` (convolutions, T5 linear layers) and
//! `llamagen-train` (GPT linear layers and fused training ops): the stage crates build their
//! candle ops on these.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

pub mod alloc;
pub mod amx;
pub mod fused;
pub mod linear;
pub mod sgemm;

/// A buffer of `n` floats for an op that writes every element before anything reads it (an
/// output or a per-call intermediate), without first filling it with zeros.
pub fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller overwrites all `n` elements
    // before reading any (the contract above), as candle's own CPU ops do with their outputs.
    unsafe { v.set_len(n) };
    v
}

/// The float32 elements of a contiguous CPU storage, or an error naming `op`.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: expected a contiguous tensor"),
        _ => candle_core::bail!("{op}: expected f32, got {:?}", s.dtype()),
    }
}

/// The float32 elements of a contiguous CPU storage, writable.
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let dtype = s.dtype();
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: expected a contiguous tensor"),
        _ => candle_core::bail!("{op}: expected f32, got {dtype:?}"),
    }
}
