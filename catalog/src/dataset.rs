//! Datasets, manifests and the commit protocol.
//!
//! Layout of a dataset `<name>` under a storage root:
//! ```text
//! <name>/_manifest/00000000000000000007.json   manifest versions (zero-padded, so names sort by version)
//! <name>/data/part-<uuid v7>.parquet           shards (see crate::shard)
//! ```
//!
//! Invariants of the commit protocol:
//! 1. A manifest version is a complete snapshot: the shards that make up the dataset (path, rows,
//!    bytes, SHA-256) and the work units done so far. The dataset *is* its latest version; the
//!    empty dataset is version 0 and has no file.
//! 2. Shards are written under unique names first and are invisible until a manifest lists them.
//!    Readers read only the shards of the version they loaded, so a writer that dies at any
//!    point leaves nothing a reader sees: at most unreferenced files, which `gc` removes once
//!    they are older than a grace period (which protects writers still between writing and
//!    committing).
//! 3. A commit writes version N+1 with an atomic put-if-absent (local: hard link; S3:
//!    `If-None-Match: *`) on top of the version N it read. If another writer took N+1 first, the
//!    commit re-reads the latest version and re-applies its additions and removals on top, so
//!    concurrent writers never lose or duplicate each other's shards. A removal of a shard that a
//!    concurrent commit already removed fails ([`CatalogError::ShardGone`]).
//! 4. Work units make commits idempotent across crashes and concurrent workers: a commit that
//!    names units fails with [`CatalogError::UnitAlreadyCommitted`] if any is already in the
//!    latest version, so each unit of input lands exactly once.
//! 5. Each commit carries a unique transaction id. A writer whose put-if-absent was ambiguous (the
//!    request failed after the server stored it, then a retry saw the name taken) finds its own
//!    id in that version and treats the commit as done.
//! 6. Every version records the schema version of its shards; readers refuse versions they do not
//!    know ([`CatalogError::UnsupportedSchemaVersion`]) and name the file of any malformed manifest.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::schema::SCHEMA_VERSION;
use crate::shard::{ShardWriter, ShardWriterOptions, decode_shard};
use crate::storage::{PutOutcome, Storage, join};

pub const MANIFEST_DIR: &str = "_manifest";
pub const DATA_DIR: &str = "data";
/// The `format` field of every manifest.
pub const MANIFEST_FORMAT: &str = "llamagen.manifest";
/// Version of the manifest file layout written by this build.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// One committed shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Path relative to the dataset directory (`data/part-….parquet`).
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
    /// The stage that wrote it.
    pub stage: String,
    pub created_at: DateTime<Utc>,
    /// Every stage whose columns this shard's rows carry, in order (see [`crate::stage`]).
    #[serde(default)]
    pub applied: Vec<String>,
}

/// Who committed a version and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnInfo {
    pub id: String,
    pub operation: String,
    #[serde(default)]
    pub run_id: Option<String>,
}

/// A manifest version: a complete snapshot of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub schema_version: u32,
    pub dataset: String,
    pub version: u64,
    pub committed_at: DateTime<Utc>,
    pub txn: TxnInfo,
    pub shards: Vec<ShardEntry>,
    /// Work units whose output is in this snapshot (see invariant 4).
    #[serde(default)]
    pub units: BTreeSet<String>,
}

impl Manifest {
    fn empty(dataset: &str) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            format_version: MANIFEST_FORMAT_VERSION,
            schema_version: SCHEMA_VERSION,
            dataset: dataset.into(),
            version: 0,
            committed_at: Utc::now(),
            txn: TxnInfo {
                id: String::new(),
                operation: "create".into(),
                run_id: None,
            },
            shards: Vec::new(),
            units: BTreeSet::new(),
        }
    }

    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// Parses and validates a manifest file; `name` is used in errors.
    pub fn parse(name: &str, data: &[u8]) -> Result<Manifest> {
        let bad = |reason: String| CatalogError::MalformedManifest {
            path: name.to_string(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(MANIFEST_FORMAT) {
            return Err(bad(format!(
                "no \"format\": \"{MANIFEST_FORMAT}\"; not a llamagen manifest"
            )));
        }
        if let Some(sv) = v.get("schema_version").and_then(|s| s.as_u64()) {
            if sv != SCHEMA_VERSION as u64 {
                return Err(CatalogError::UnsupportedSchemaVersion {
                    path: name.to_string(),
                    found: sv as u32,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        if let Some(fv) = v.get("format_version").and_then(|s| s.as_u64()) {
            if fv > MANIFEST_FORMAT_VERSION as u64 {
                return Err(bad(format!(
                    "manifest format version {fv} is newer than this build reads ({MANIFEST_FORMAT_VERSION})"
                )));
            }
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let mut seen = BTreeSet::new();
        for s in &m.shards {
            if !seen.insert(&s.path) {
                return Err(bad(format!("shard {} is listed twice", s.path)));
            }
        }
        Ok(m)
    }
}

/// A change to commit: shards to add and remove, work units completed.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// What the change is ("ingest", "filter", "import", ...).
    pub operation: String,
    pub run_id: Option<String>,
    pub add: Vec<ShardEntry>,
    /// Paths (relative to the dataset) of shards this commit replaces.
    pub remove: Vec<String>,
    pub units: Vec<String>,
}

/// What `gc` removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub orphan_shards: Vec<String>,
    pub orphan_bytes: u64,
    pub old_manifests: Vec<String>,
    pub temp_files: Vec<String>,
    pub aborted_uploads: Vec<String>,
}

/// One problem found by [`Dataset::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProblem {
    pub path: String,
    pub problem: String,
}

/// A named dataset under a storage root.
#[derive(Debug, Clone)]
pub struct Dataset {
    storage: Arc<dyn Storage>,
    name: String,
    /// How many times a commit re-reads and retries after losing a race (default 64).
    pub max_commit_attempts: u32,
}

fn version_file(version: u64) -> String {
    format!("{version:020}.json")
}

impl Dataset {
    pub fn new(storage: Arc<dyn Storage>, name: &str) -> Self {
        Dataset {
            storage,
            name: name.trim_matches('/').to_string(),
            max_commit_attempts: 64,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn manifest_dir(&self) -> String {
        join(&self.name, MANIFEST_DIR)
    }

    /// Storage path of a manifest version.
    pub fn manifest_path(&self, version: u64) -> String {
        join(&self.manifest_dir(), &version_file(version))
    }

    /// Storage path of a shard entry's file.
    pub fn shard_path(&self, entry: &ShardEntry) -> String {
        join(&self.name, &entry.path)
    }

    /// Committed manifest versions, ascending.
    pub async fn versions(&self) -> Result<Vec<u64>> {
        let prefix = format!("{}/", self.manifest_dir());
        let mut v: Vec<u64> = self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let name = o.path.rsplit('/').next()?;
                let digits = name.strip_suffix(".json")?;
                (digits.len() == 20).then(|| digits.parse().ok()).flatten()
            })
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    pub async fn latest_version(&self) -> Result<u64> {
        Ok(self.versions().await?.last().copied().unwrap_or(0))
    }

    /// A given manifest version.
    pub async fn manifest(&self, version: u64) -> Result<Manifest> {
        if version == 0 {
            return Ok(Manifest::empty(&self.name));
        }
        let path = self.manifest_path(version);
        let data = self.storage.get(&path).await?;
        let full = format!("{}/{}", self.storage.root().trim_end_matches('/'), path);
        let m = Manifest::parse(&full, &data)?;
        if m.version != version {
            return Err(CatalogError::MalformedManifest {
                path: full,
                reason: format!(
                    "its file name says version {version}, its content says {}",
                    m.version
                ),
            });
        }
        Ok(m)
    }

    /// The latest committed snapshot (version 0, empty, if nothing was committed yet).
    pub async fn snapshot(&self) -> Result<Manifest> {
        let v = self.latest_version().await?;
        self.manifest(v).await
    }

    /// Whether anything was ever committed.
    pub async fn exists(&self) -> Result<bool> {
        Ok(self.latest_version().await? > 0)
    }

    /// A writer for new shards of this dataset.
    pub fn writer(&self, opts: ShardWriterOptions) -> ShardWriter {
        ShardWriter::new(self.storage.clone(), &self.name, opts)
    }

    /// Commits a transaction (see the protocol above). Returns the new manifest.
    pub async fn commit(&self, txn: Transaction) -> Result<Manifest> {
        let txn_id = uuid::Uuid::new_v4().to_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let base = self.snapshot().await?;
            if let Some(u) = txn.units.iter().find(|u| base.units.contains(*u)) {
                self.discard(&txn.add).await;
                return Err(CatalogError::UnitAlreadyCommitted {
                    dataset: self.name.clone(),
                    unit: u.clone(),
                    version: base.version,
                });
            }
            let present: HashMap<&str, usize> = base
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| (s.path.as_str(), i))
                .collect();
            if let Some(gone) = txn
                .remove
                .iter()
                .find(|r| !present.contains_key(r.as_str()))
            {
                self.discard(&txn.add).await;
                return Err(CatalogError::ShardGone {
                    dataset: self.name.clone(),
                    path: gone.clone(),
                });
            }
            let removed: BTreeSet<&str> = txn.remove.iter().map(String::as_str).collect();
            let mut shards: Vec<ShardEntry> = base
                .shards
                .iter()
                .filter(|s| !removed.contains(s.path.as_str()))
                .cloned()
                .collect();
            shards.extend(txn.add.iter().cloned());
            let mut units = base.units.clone();
            units.extend(txn.units.iter().cloned());
            let next = Manifest {
                format: MANIFEST_FORMAT.into(),
                format_version: MANIFEST_FORMAT_VERSION,
                schema_version: SCHEMA_VERSION,
                dataset: self.name.clone(),
                version: base.version + 1,
                committed_at: Utc::now(),
                txn: TxnInfo {
                    id: txn_id.clone(),
                    operation: txn.operation.clone(),
                    run_id: txn.run_id.clone(),
                },
                shards,
                units,
            };
            let body = serde_json::to_vec_pretty(&next).expect("manifest serialises");
            match self
                .storage
                .put_if_absent(&self.manifest_path(next.version), body.into())
                .await?
            {
                PutOutcome::Created => return Ok(next),
                PutOutcome::AlreadyExists => {
                    // Invariant 5: an ambiguous earlier attempt of ours may have won.
                    if let Ok(m) = self.manifest(next.version).await {
                        if m.txn.id == txn_id {
                            return Ok(m);
                        }
                    }
                    if attempt >= self.max_commit_attempts {
                        return Err(CatalogError::CommitConflict {
                            dataset: self.name.clone(),
                            attempts: attempt,
                        });
                    }
                    let backoff = 5u64 << attempt.min(6);
                    let jitter = rand::rng().random_range(0..=backoff);
                    tokio::time::sleep(Duration::from_millis(backoff / 2 + jitter)).await;
                }
            }
        }
    }

    /// Best-effort removal of shards that will never be committed.
    async fn discard(&self, shards: &[ShardEntry]) {
        for s in shards {
            let _ = self.storage.delete(&self.shard_path(s)).await;
        }
    }

    /// Reads one committed shard whole, checking size, hash and schema version.
    pub async fn read_shard(
        &self,
        entry: &ShardEntry,
        projection: Option<&[&str]>,
    ) -> Result<Vec<RecordBatch>> {
        let path = self.shard_path(entry);
        let data = self.storage.get(&path).await?;
        let name = format!("{}/{}", self.storage.root().trim_end_matches('/'), path);
        decode_shard(&name, entry, data, projection)
    }

    /// Checks every committed shard: present, right size, right SHA-256, readable Parquet of the
    /// right schema version. Returns the problems found (empty when all is well).
    pub async fn verify(&self) -> Result<Vec<VerifyProblem>> {
        let snap = self.snapshot().await?;
        let problems = futures::stream::iter(snap.shards.iter())
            .map(|e| async move {
                match self.read_shard(e, Some(&["key"])).await {
                    Ok(_) => None,
                    Err(err) => Some(VerifyProblem {
                        path: self.shard_path(e),
                        problem: err.to_string(),
                    }),
                }
            })
            .buffer_unordered(4)
            .filter_map(|p| async move { p })
            .collect::<Vec<_>>()
            .await;
        Ok(problems)
    }

    /// Removes what no reader can see: shard files no longer referenced by the latest version
    /// and temporary files, both only once older than `grace`; manifest versions older than the
    /// newest `keep_versions`. With `dry_run`, only reports.
    pub async fn gc(
        &self,
        grace: Duration,
        keep_versions: usize,
        dry_run: bool,
    ) -> Result<GcReport> {
        let snap = self.snapshot().await?;
        let referenced: BTreeSet<String> = snap.shards.iter().map(|s| self.shard_path(s)).collect();
        let cutoff =
            Utc::now() - chrono::Duration::from_std(grace).unwrap_or(chrono::TimeDelta::MAX);
        let mut report = GcReport::default();
        for o in self
            .storage
            .list(&format!("{}/", join(&self.name, DATA_DIR)))
            .await?
        {
            if !referenced.contains(&o.path) && o.last_modified < cutoff {
                report.orphan_bytes += o.size;
                report.orphan_shards.push(o.path);
            }
        }
        let versions = self.versions().await?;
        if keep_versions > 0 && versions.len() > keep_versions {
            for v in &versions[..versions.len() - keep_versions] {
                report.old_manifests.push(self.manifest_path(*v));
            }
        }
        for o in self
            .storage
            .list(&format!("{}/", crate::storage::local_tmp_dir()))
            .await?
        {
            if o.last_modified < cutoff {
                report.temp_files.push(o.path);
            }
        }
        report.aborted_uploads = self.storage.abort_stale_uploads(cutoff, dry_run).await?;
        if !dry_run {
            for p in report
                .orphan_shards
                .iter()
                .chain(&report.old_manifests)
                .chain(&report.temp_files)
            {
                self.storage.delete(p).await?;
            }
        }
        Ok(report)
    }
}
