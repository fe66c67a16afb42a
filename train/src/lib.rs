//! LlamaGen GPT (arXiv 2406.06525) in candle: class- and text-conditional autoregressive image
//! token models that load and save the official checkpoints, sample with the official
//! KV-cache/CFG procedure, and train with the official AdamW recipe.
//!
//! Modules: [`config`] (hyper-parameters and state-dict layout), [`gpt`] (the model),
//! [`checkpoint`] (safetensors and torch checkpoints), [`sample`] (generation), [`optim`]
//! (AdamW, gradient clipping, schedules), [`train`] (training step, accumulation, checkpoints
//! with exact resume), [`dist`] (data parallel across processes: launch, rendezvous, TCP
//! collectives), [`conformance`] (checks against a reference set), `vq_train` (VQ
//! tokenizer training with LPIPS and PatchGAN losses).

pub mod checkpoint;
pub mod config;
pub mod conformance;
#[cfg(feature = "catalog")]
pub mod data;
pub mod dist;
pub mod error;
pub mod gpt;
pub mod optim;
#[cfg(feature = "catalog")]
pub mod plot;
#[cfg(feature = "catalog")]
pub mod run;
pub mod sample;
#[cfg(feature = "catalog")]
pub mod synthetic;
pub mod train;
#[cfg(feature = "catalog")]
pub mod vq_train;

pub use config::{GptConfig, GptSize, ModelType};
pub use conformance::{Check, conformance_checks};
pub use error::{Result, TrainError};
pub use gpt::{Condition, Gpt, KvCache, Trace};
