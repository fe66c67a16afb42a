//! CPU float32 kernels shared by `llamagen-encode` (convolutions, T5 linear layers) and
//! `llamagen-train` (GPT linear layers): the stage crates build their candle ops on these.

pub mod sgemm;
