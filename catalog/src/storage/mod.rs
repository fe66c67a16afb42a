//! Storage behind one small interface: a local directory (the default), memory (tests) and S3.
//!
//! Paths are relative to the storage root and use `/` separators. Guarantees every backend keeps:
//! - [`Storage::put`] and [`Storage::put_file`] make an object visible whole or not at all: a
//!   reader never sees a partly written object (local: write to a temporary name, then rename;
//!   S3: single put, or multipart upload that is aborted on failure).
//! - [`Storage::put_if_absent`] is atomic: of several concurrent callers, exactly one gets
//!   [`PutOutcome::Created`] (local: hard link, which fails if the name exists; S3: conditional put
//!   with `If-None-Match: *`; memory: `PutMode::Create`). The commit protocol relies on it.
//! - [`Storage::list`] returns every object under a prefix, sorted by path.

mod local;
mod memory;
mod s3;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::ObjectStore;
use url::Url;

use crate::error::{CatalogError, Result};

/// The AWS credential types of [`S3Config::credentials_provider`] (`Credentials`,
/// `provider::SharedCredentialsProvider`, `credential_fn::provide_credentials_fn`, ...).
pub use aws_credential_types;
pub use local::LocalStorage;
pub use memory::MemoryStorage;
pub use s3::{S3Config, S3Storage};

/// An object found by [`Storage::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Path relative to the storage root.
    pub path: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// Result of [`Storage::put_if_absent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

/// Object storage as the catalog needs it.
#[async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The root as a user writes it: `/data/cat`, `s3://bucket/prefix`, `memory://name`.
    fn root(&self) -> String;

    async fn get(&self, path: &str) -> Result<Bytes>;

    /// Bytes `[start, end)` of an object.
    async fn get_range(&self, path: &str, start: u64, end: u64) -> Result<Bytes>;

    async fn put(&self, path: &str, data: Bytes) -> Result<()>;

    /// Stores a finished local file under `path`, consuming the file (it is moved or deleted).
    async fn put_file(&self, path: &str, file: &Path) -> Result<()>;

    async fn put_if_absent(&self, path: &str, data: Bytes) -> Result<PutOutcome>;

    /// Every object whose path starts with `prefix`, sorted by path.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// Deletes an object; deleting a missing object is not an error.
    async fn delete(&self, path: &str) -> Result<()>;

    /// The object store and URL prefix under which DataFusion reads this storage's objects:
    /// `format!("{url}{path}")` addresses object `path`.
    fn object_store(&self) -> Result<(Url, Arc<dyn ObjectStore>)>;

    /// Aborts multipart uploads started before `cutoff` and never finished (a crashed writer's);
    /// returns their keys. Only S3 has such uploads.
    async fn abort_stale_uploads(
        &self,
        _cutoff: DateTime<Utc>,
        _dry_run: bool,
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A local directory for temporary files that [`Storage::put_file`] can take cheaply.
    fn scratch_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir()
    }
}

/// Options for opening a storage root. S3 settings fall back to the standard AWS environment.
#[derive(Debug, Clone, Default)]
pub struct StorageOptions {
    pub s3: S3Config,
}

/// Opens a storage root: a local path (`/data/cat`, `./cat`, `file:///data/cat`),
/// `s3://bucket/prefix` or `memory://name` (process-local; for tests).
pub async fn open(root: &str, options: &StorageOptions) -> Result<Arc<dyn Storage>> {
    if let Some(rest) = root.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(CatalogError::InvalidUri {
                uri: root.to_string(),
                reason: "no bucket name after s3://".into(),
            });
        }
        let cfg = S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            ..options.s3.clone()
        };
        return Ok(Arc::new(S3Storage::connect(cfg).await?));
    }
    if let Some(name) = root.strip_prefix("memory://") {
        return Ok(Arc::new(MemoryStorage::named(name)));
    }
    let path = if let Some(p) = root.strip_prefix("file://") {
        p
    } else if root.contains("://") {
        return Err(CatalogError::InvalidUri {
            uri: root.to_string(),
            reason: "supported roots are local paths, file://, s3:// and memory://".into(),
        });
    } else {
        root
    };
    if path.is_empty() {
        return Err(CatalogError::InvalidUri {
            uri: root.to_string(),
            reason: "empty path".into(),
        });
    }
    Ok(Arc::new(LocalStorage::new(path)?))
}

/// Storage-relative directory where the local backend keeps files being written.
pub fn local_tmp_dir() -> &'static str {
    local::TMP_DIR
}

/// Joins a storage-relative directory and name.
pub fn join(dir: &str, name: &str) -> String {
    match (dir.trim_end_matches('/'), name.trim_start_matches('/')) {
        ("", n) => n.to_string(),
        (d, n) => format!("{d}/{n}"),
    }
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The same behaviour checks, run against every backend.
    use super::*;

    pub async fn check_backend(s: &dyn Storage) {
        assert!(matches!(
            s.get("nope/missing").await,
            Err(CatalogError::NotFound { .. })
        ));
        s.put("a/one.txt", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        s.put("a/two.txt", Bytes::from_static(b"world!"))
            .await
            .unwrap();
        s.put("b/three.txt", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(
            s.get("a/one.txt").await.unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(
            s.get_range("a/two.txt", 1, 4).await.unwrap(),
            Bytes::from_static(b"orl")
        );
        let listed: Vec<_> = s
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.path, o.size))
            .collect();
        assert_eq!(
            listed,
            vec![("a/one.txt".to_string(), 5), ("a/two.txt".to_string(), 6)]
        );
        assert_eq!(
            s.put_if_absent("a/new", Bytes::from_static(b"1"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_if_absent("a/new", Bytes::from_static(b"2"))
                .await
                .unwrap(),
            PutOutcome::AlreadyExists
        );
        assert_eq!(s.get("a/new").await.unwrap(), Bytes::from_static(b"1"));
        // put overwrites
        s.put("a/one.txt", Bytes::from_static(b"bye"))
            .await
            .unwrap();
        assert_eq!(
            s.get("a/one.txt").await.unwrap(),
            Bytes::from_static(b"bye")
        );
        // put_file consumes the local file
        let dir = s.scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("upload-{}.bin", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, vec![7u8; 1000]).unwrap();
        s.put_file("c/file.bin", &tmp).await.unwrap();
        assert!(!tmp.exists());
        assert_eq!(s.get("c/file.bin").await.unwrap().len(), 1000);
        s.delete("a/two.txt").await.unwrap();
        s.delete("a/two.txt").await.unwrap();
        let listed: Vec<_> = s
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        assert_eq!(listed, vec!["a/new".to_string(), "a/one.txt".to_string()]);
        // concurrent put_if_absent: exactly one winner
        let mut created = 0;
        let results = futures::future::join_all(
            (0..8).map(|i| s.put_if_absent("race/x", Bytes::from(format!("{i}")))),
        )
        .await;
        for r in results {
            if r.unwrap() == PutOutcome::Created {
                created += 1;
            }
        }
        assert_eq!(created, 1);
    }
}
