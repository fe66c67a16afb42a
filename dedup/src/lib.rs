//! Dataset-wide deduplication. This first piece: the perceptual hash (pHash) of PyPI's
//! `imagehash`, bit for bit ([`phash`]), and the Hamming distance between two hashes.

pub mod error;
pub mod phash;

pub use error::DedupError;
pub use phash::{hamming, phash, phash_bytes, phash_luma};
