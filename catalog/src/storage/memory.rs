//! Process-local storage for tests, backed by `object_store`'s in-memory store so that SQL over
//! a memory root works the same way as over disk or S3. Roots of the same name share objects.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use super::{ObjectInfo, PutOutcome, Storage};
use crate::error::{CatalogError, Result};

#[derive(Debug, Clone)]
pub struct MemoryStorage {
    name: String,
    store: Arc<InMemory>,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static REG: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

impl MemoryStorage {
    /// The memory root called `name`; every handle to the same name sees the same objects.
    pub fn named(name: &str) -> Self {
        let store = registry()
            .lock()
            .expect("memory registry poisoned")
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(InMemory::new()))
            .clone();
        MemoryStorage {
            name: name.to_string(),
            store,
        }
    }

    /// A fresh, uniquely named memory root.
    pub fn unique() -> Self {
        Self::named(&uuid::Uuid::new_v4().simple().to_string())
    }

    fn not_found(&self, path: &str) -> CatalogError {
        CatalogError::NotFound {
            path: format!("memory://{}/{path}", self.name),
        }
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn root(&self) -> String {
        format!("memory://{}", self.name)
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        match self.store.get(&ObjPath::from(path)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(self.not_found(path)),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_range(&self, path: &str, start: u64, end: u64) -> Result<Bytes> {
        match self.store.get_range(&ObjPath::from(path), start..end).await {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(self.not_found(path)),
            Err(e) => Err(e.into()),
        }
    }

    async fn put(&self, path: &str, data: Bytes) -> Result<()> {
        self.store
            .put(&ObjPath::from(path), PutPayload::from(data))
            .await?;
        Ok(())
    }

    async fn put_file(&self, path: &str, file: &Path) -> Result<()> {
        let data = std::fs::read(file).map_err(|e| CatalogError::io(file, e))?;
        self.put(path, Bytes::from(data)).await?;
        std::fs::remove_file(file).map_err(|e| CatalogError::io(file, e))
    }

    async fn put_if_absent(&self, path: &str, data: Bytes) -> Result<PutOutcome> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&ObjPath::from(path), PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                path: m.location.to_string(),
                size: m.size,
                last_modified: m.last_modified,
            })
            .filter(|o| o.path.starts_with(prefix))
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn object_store(&self) -> Result<(Url, Arc<dyn ObjectStore>)> {
        let url = Url::parse(&format!("memory://{}/", self.name)).map_err(|e| {
            CatalogError::InvalidUri {
                uri: self.root(),
                reason: e.to_string(),
            }
        })?;
        Ok((url, self.store.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_backend_conforms() {
        crate::storage::conformance::check_backend(&MemoryStorage::unique()).await;
    }
}
