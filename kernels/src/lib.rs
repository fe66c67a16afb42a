//! CPU float32 kernels shared by `llamagen-encode` (convolutions, T5 linear layers) and
//! `llamagen-train` (GPT linear layers and fused training ops): the stage crates build their
//! candle ops on these.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

pub mod alloc;
pub mod amx;
pub mod fused;
pub mod linear;
pub mod sgemm;

/// A buffer of `n` uninitialised floats for an op that writes every element before anything
/// reads it (an output or a per-call intermediate), so it is not first filled with zeros (the
/// allocator reuses freed memory, see [`alloc`], so zeroing would be a `memset` of every output).
/// Write it through [`MaybeUninit::write`] or a raw pointer, then take it with [`assume_init`].
pub fn uninit_buffer(n: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is `n`, and `MaybeUninit<f32>` needs no initialisation.
    unsafe { v.set_len(n) };
    v
}

/// The floats of a buffer from [`uninit_buffer`], without copying.
///
/// # Safety
/// Every element must have been written.
pub unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the caller guarantees every element is
    // initialised; pointer, length and capacity come from a live Vec that is not dropped.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// A written buffer from [`uninit_buffer`] viewed as floats.
///
/// # Safety
/// Every element must have been written.
pub unsafe fn assume_init_mut(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: as [`assume_init`].
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) }
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
