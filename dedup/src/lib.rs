//! Dataset-wide deduplication: exact (content bytes), perceptual (`imagehash.phash`, bit for bit,
//! searched with banded LSH) and semantic (SemDeDup: k-means on CLIP embeddings, pairs inside
//! each cluster), grouped by SQL over the catalog; one row kept per group by a configurable rule.
//!
//! The run ([`stage::dedup_dataset`]): the hash stage fills `phash`; the cluster stage fills
//! `semantic_cluster` from stored centroids; [`group::find_groups`] links rows and picks the row
//! each group keeps; the apply stage writes `duplicate_of` and `dup_kind`.

pub mod error;
pub mod group;
pub mod kmeans;
pub mod lsh;
pub mod phash;
pub mod report;
pub mod stage;

pub use error::{DedupError, Result};
pub use group::{DedupConfig, DupKind, Grouping, Verdict, find_groups};
pub use phash::{hamming, phash, phash_bytes, phash_luma};
pub use stage::{DedupReport, RunOptions, dedup_dataset};
