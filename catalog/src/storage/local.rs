//! A local directory. Objects are files under the root; writes go to `<root>/_tmp/` first and are
//! renamed into place (atomic on POSIX file systems), and `put_if_absent` hard-links the finished
//! temporary file to its name, which fails if the name exists.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use url::Url;

use super::{ObjectInfo, PutOutcome, Storage};
use crate::error::{CatalogError, Result};

/// Directory (relative to the root) for files being written.
pub const TMP_DIR: &str = "_tmp";

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens (and creates) a local root directory.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        std::fs::create_dir_all(root).map_err(|e| CatalogError::io(root, e))?;
        let root = std::fs::canonicalize(root).map_err(|e| CatalogError::io(root, e))?;
        Ok(LocalStorage { root })
    }

    pub fn path_of(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    fn temp_path(&self) -> Result<PathBuf> {
        let dir = self.root.join(TMP_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
        Ok(dir.join(format!("{}.tmp", uuid::Uuid::new_v4())))
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let tmp = self.temp_path()?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| CatalogError::io(&tmp, e))?;
        f.write_all(data).map_err(|e| CatalogError::io(&tmp, e))?;
        f.sync_all().map_err(|e| CatalogError::io(&tmp, e))?;
        Ok(tmp)
    }

    fn parent_of(&self, target: &Path) -> Result<()> {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CatalogError::io(parent, e))?;
        }
        Ok(())
    }

    fn sync_dir(dir: &Path) {
        // Durability of the rename; best effort (not all file systems support fsync on dirs).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }

    fn walk(&self, dir: &Path, out: &mut Vec<ObjectInfo>) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CatalogError::io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| CatalogError::io(dir, e))?;
            let meta = entry
                .metadata()
                .map_err(|e| CatalogError::io(entry.path(), e))?;
            let p = entry.path();
            if meta.is_dir() {
                self.walk(&p, out)?;
            } else if meta.is_file() {
                let rel = p.strip_prefix(&self.root).unwrap_or(&p);
                let rel = rel
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                let modified: DateTime<Utc> = meta
                    .modified()
                    .map(Into::into)
                    .unwrap_or_else(|_| Utc::now());
                out.push(ObjectInfo {
                    path: rel,
                    size: meta.len(),
                    last_modified: modified,
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn root(&self) -> String {
        self.root.display().to_string()
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let p = self.path_of(path);
        match std::fs::read(&p) {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(CatalogError::NotFound {
                path: p.display().to_string(),
            }),
            Err(e) => Err(CatalogError::io(p, e)),
        }
    }

    async fn get_range(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        let p = self.path_of(path);
        let mut f = std::fs::File::open(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CatalogError::NotFound {
                path: p.display().to_string(),
            },
            _ => CatalogError::io(&p, e),
        })?;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| CatalogError::io(&p, e))?;
        let mut buf = vec![0u8; end.saturating_sub(start) as usize];
        f.read_exact(&mut buf)
            .map_err(|e| CatalogError::io(&p, e))?;
        Ok(Bytes::from(buf))
    }

    async fn put(&self, path: &str, data: Bytes) -> Result<()> {
        let tmp = self.write_temp(&data)?;
        self.put_file(path, &tmp).await
    }

    async fn put_file(&self, path: &str, file: &Path) -> Result<()> {
        let target = self.path_of(path);
        self.parent_of(&target)?;
        if std::fs::rename(file, &target).is_err() {
            // Different file system: copy to a temporary name under the root, then rename.
            let tmp = self.temp_path()?;
            std::fs::copy(file, &tmp).map_err(|e| CatalogError::io(file, e))?;
            std::fs::rename(&tmp, &target).map_err(|e| CatalogError::io(&target, e))?;
            let _ = std::fs::remove_file(file);
        }
        if let Some(parent) = target.parent() {
            Self::sync_dir(parent);
        }
        Ok(())
    }

    async fn put_if_absent(&self, path: &str, data: Bytes) -> Result<PutOutcome> {
        let target = self.path_of(path);
        self.parent_of(&target)?;
        let tmp = self.write_temp(&data)?;
        let outcome = match std::fs::hard_link(&tmp, &target) {
            Ok(()) => PutOutcome::Created,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => PutOutcome::AlreadyExists,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(CatalogError::io(&target, e));
            }
        };
        let _ = std::fs::remove_file(&tmp);
        if let Some(parent) = target.parent() {
            Self::sync_dir(parent);
        }
        Ok(outcome)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walk the deepest directory the prefix names, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        self.walk(&self.root.join(dir_part), &mut out)?;
        out.retain(|o| o.path.starts_with(prefix));
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let p = self.path_of(path);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CatalogError::io(p, e)),
        }
    }

    fn object_store(&self) -> Result<(Url, Arc<dyn ObjectStore>)> {
        let url = Url::from_directory_path(&self.root).map_err(|_| CatalogError::InvalidUri {
            uri: self.root.display().to_string(),
            reason: "not an absolute path".into(),
        })?;
        Ok((url, Arc::new(LocalFileSystem::new())))
    }

    fn scratch_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_backend_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStorage::new(dir.path().join("root")).unwrap();
        crate::storage::conformance::check_backend(&s).await;
    }
}
