//! Datasets as Delta Lake tables, and the commit protocol.
//!
//! Layout of a dataset `<name>` under a storage root; it is a Delta table that any Delta reader
//! (Spark, DuckDB's `delta_scan`, PyPI's `deltalake` and `polars`) opens at `<root>/<name>`:
//! ```text
//! <name>/_delta_log/00000000000000000007.json               one commit: only its own actions
//! <name>/_delta_log/00000000000000000100.checkpoint.parquet  the table state every 100 versions
//! <name>/_delta_log/_last_checkpoint
//! <name>/data/part-<uuid v7>.parquet                         shards (see crate::shard)
//! ```
//!
//! Invariants of the commit protocol:
//! 1. The dataset *is* its table's latest version: the shards added and not since removed. Version
//!    0 creates the table (protocol, metadata with the sample schema and its version); a dataset
//!    without a log is empty. Each shard's SHA-256, writing stage, applied stages and work units
//!    travel in its `add` action's `tags` (`llamagen.*`), its rows in `stats.numRecords`.
//! 2. Shards are written under unique names first and are invisible until a commit adds them.
//!    Readers read only the shards of the version they loaded, so a writer that dies at any point
//!    leaves nothing a reader sees: at most unreferenced files, which [`Dataset::gc`] removes once
//!    they are older than a grace period (which protects writers still between writing and
//!    committing). `gc` deletes only files named as this module names shards.
//! 3. A commit writes version N+1 with an atomic put-if-absent (object_store's `PutMode::Create`:
//!    a hard link locally, `If-None-Match: *` on S3; no lock service) holding only its own
//!    actions, on top of the version N it read. If another writer took N+1 first, the commit reads
//!    the new versions (only those: the state is advanced incrementally) and re-applies its
//!    additions and removals on top, so concurrent writers never lose or duplicate each other's
//!    shards. A removal of a shard that a concurrent commit already removed fails
//!    ([`CatalogError::ShardGone`]). Nothing lists every version: the cost of a commit does not
//!    grow with the table.
//! 4. Work units make commits idempotent across crashes and concurrent workers. A commit records
//!    each of its units as a Delta application transaction (`txn`, `appId` = the unit) and in the
//!    tags of the shards it adds; a rewrite carries a shard's units over to its replacement, so
//!    the units of a version are those of its live shards plus the `txn` actions read since the
//!    handle loaded the table (a unit that produced no rows is not kept: redoing it adds
//!    nothing). A commit that names a unit already in the table fails with
//!    [`CatalogError::UnitAlreadyCommitted`], so each unit's rows land exactly once, and the
//!    check costs no read of the log.
//! 5. Each commit carries a unique `llamagen.txnId` in its `commitInfo`. A writer whose
//!    put-if-absent was ambiguous (the request failed after the server stored it, then a retry
//!    saw the name taken) finds its own id in that version and treats the commit as done.
//! 6. The table's metadata records the sample schema version (`llamagen.schemaVersion`); readers
//!    refuse versions they do not know ([`CatalogError::UnsupportedSchemaVersion`]) and name the
//!    log file of any malformed entry.
//! 7. A checkpoint is written every [`CHECKPOINT_INTERVAL`] versions, so a cold read replays at
//!    most that many JSON commits after one Parquet checkpoint.
//! 8. Nothing is read, written or deleted outside the dataset's folder: a dataset name is one
//!    path component of a safe alphabet ([`check_name`]), and a shard path in the log must be a
//!    relative path inside the dataset (no `..`, no absolute path, no URL), or the log entry is
//!    refused as malformed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use chrono::{DateTime, TimeZone, Utc};
use deltalake::kernel::transaction::{CommitData, TransactionError};
use deltalake::kernel::{Action, Add, Remove, Transaction as AppTransaction};
use deltalake::logstore::{CommitOrBytes, LogStoreRef, StorageConfig, default_logstore};
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};
use futures::StreamExt;
use object_store::prefix::PrefixStore;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::columns::{self, ColumnFiles};
use crate::error::{CatalogError, Result};
use crate::schema::{
    COLUMN_GROUPS, SCHEMA_VERSION, col, group_columns, group_schema, sample_schema,
};
use crate::shard::{ShardWriter, ShardWriterOptions, decode_shard};
use crate::storage::{Storage, join};

/// The Delta transaction log directory of a table.
pub const LOG_DIR: &str = "_delta_log";
pub const DATA_DIR: &str = "data";
/// Table property holding the sample schema version (invariant 6).
pub const SCHEMA_VERSION_PROPERTY: &str = "llamagen.schemaVersion";
/// A checkpoint every this many versions (invariant 7; Delta's own default).
pub const CHECKPOINT_INTERVAL: u64 = 100;

const TAG_SHA256: &str = "llamagen.sha256";
const TAG_STAGE: &str = "llamagen.stage";
const TAG_APPLIED: &str = "llamagen.applied";
const TAG_UNITS: &str = "llamagen.units";
const TAG_COLUMNS: &str = "llamagen.columns";
const INFO_TXN_ID: &str = "llamagen.txnId";
const INFO_OPERATION: &str = "llamagen.operation";
const INFO_RUN_ID: &str = "llamagen.runId";

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
    /// The work units whose rows this shard holds (carried over by rewrites).
    #[serde(default)]
    pub units: Vec<String>,
    /// Its column files, by column group (see [`crate::columns`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: ColumnFiles,
}

impl ShardEntry {
    /// Bytes of the base file and every column file.
    pub fn total_bytes(&self) -> u64 {
        self.bytes + self.columns.values().map(|c| c.bytes).sum::<u64>()
    }
}

/// A version of a dataset: the shards that make it up and the work units done so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub dataset: String,
    /// The table version (0 also for a dataset that does not exist yet).
    pub version: u64,
    pub shards: Vec<ShardEntry>,
    /// Work units whose output is in this version (see invariant 4).
    pub units: BTreeSet<String>,
}

impl Snapshot {
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// Bytes of every shard's base file and column files.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.total_bytes()).sum()
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

/// What a commit made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Committed {
    /// The table version the commit wrote.
    pub version: u64,
    /// How many times it lost a race and re-applied itself on a newer version.
    pub retries: u32,
}

/// What `gc` removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub orphan_shards: Vec<String>,
    pub orphan_bytes: u64,
    /// Log entries older than the retention and the latest checkpoint.
    pub expired_log_entries: usize,
    pub temp_files: Vec<String>,
    pub aborted_uploads: Vec<String>,
    /// Column files added to / removed from column-group tables to match the dataset.
    pub column_entries_added: u64,
    pub column_entries_removed: u64,
}

/// One table version, as `history` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryEntry {
    pub version: u64,
    pub committed_at: Option<DateTime<Utc>>,
    /// Delta's name of the operation (`CREATE TABLE`, `WRITE`, `UPDATE`).
    pub operation: Option<String>,
    /// llamagen's stage or command ("ingest", "filter", ...).
    pub stage: Option<String>,
    pub run_id: Option<String>,
    pub shards_added: u64,
    pub shards_removed: u64,
    pub rows_added: u64,
    pub units: u64,
}

/// One problem found by [`Dataset::verify`].
#[derive(Debug, Clone, Serialize)]
pub struct VerifyProblem {
    pub path: String,
    pub problem: String,
}

/// The table state a handle has read (see invariant 3: advanced one commit at a time).
struct State {
    log_store: LogStoreRef,
    /// None: no table yet.
    version: Option<u64>,
    shards: BTreeMap<String, ShardEntry>,
    units: BTreeSet<String>,
    /// The library's view of the table, advanced only when a checkpoint is due.
    table: Option<DeltaTable>,
}

/// A named dataset under a storage root.
#[derive(Clone)]
pub struct Dataset {
    storage: Arc<dyn Storage>,
    name: String,
    /// How many times a commit re-reads and retries after losing a race (default 64).
    pub max_commit_attempts: u32,
    state: Arc<tokio::sync::Mutex<Option<State>>>,
    /// None for a dataset; the group for the table of one of its column groups.
    group: Option<&'static str>,
    /// Handles on the dataset's column-group tables, made on first use.
    group_tables: Arc<std::sync::Mutex<BTreeMap<&'static str, Dataset>>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("root", &self.storage.root())
            .field("name", &self.name)
            .finish()
    }
}

/// The entry of a column file in its group's table.
fn column_entry(shard: &ShardEntry, file: &columns::ColumnFile) -> ShardEntry {
    ShardEntry {
        path: file.path.clone(),
        rows: shard.rows,
        bytes: file.bytes,
        sha256: file.sha256.clone(),
        stage: shard.stage.clone(),
        created_at: shard.created_at,
        applied: Vec::new(),
        units: Vec::new(),
        columns: ColumnFiles::new(),
    }
}

fn log_file(version: u64) -> String {
    format!("{LOG_DIR}/{version:020}.json")
}

/// Checks a dataset name (invariant 8): 1 to 128 characters of `A-Z a-z 0-9 _ - .`, not
/// starting with `.` or `_` (names Delta and llamagen keep for themselves). So a name never
/// leaves the root: no separator, no `..`, no absolute path.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.starts_with('_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::InvalidArgument(format!(
            "dataset name {name:?}: use 1-128 characters of A-Z, a-z, 0-9, '_', '-', '.', not \
             starting with '.' or '_' (a dataset is one folder directly under the root)"
        )))
    }
}

/// Whether a path from a table log stays inside the table (invariant 8).
fn confined(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && !path.contains("://")
        && !path.contains('%')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Whether `path` (relative to a dataset) is named as the shard writer names shards.
pub fn is_shard_path(path: &str) -> bool {
    path.strip_prefix("data/part-")
        .and_then(|rest| rest.strip_suffix(".parquet"))
        .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
}

impl Dataset {
    /// A handle on dataset `name`; a name [`check_name`] refuses makes every operation fail
    /// with that error.
    pub fn new(storage: Arc<dyn Storage>, name: &str) -> Self {
        Dataset {
            storage,
            name: name.to_string(),
            max_commit_attempts: 64,
            state: Arc::new(tokio::sync::Mutex::new(None)),
            group: None,
            group_tables: Arc::default(),
        }
    }

    /// The table of this dataset's column group `group` (see [`crate::columns`]).
    pub fn group_table(&self, group: &str) -> Result<Dataset> {
        let (g, _) = COLUMN_GROUPS
            .iter()
            .find(|(g, _)| *g == group)
            .ok_or_else(|| CatalogError::InvalidArgument(format!("no column group {group:?}")))?;
        let mut tables = self.group_tables.lock().expect("not poisoned");
        Ok(tables
            .entry(g)
            .or_insert_with(|| {
                let mut t = Dataset::new(self.storage.clone(), &columns::table_name(&self.name, g));
                t.group = Some(g);
                t.max_commit_attempts = self.max_commit_attempts;
                t
            })
            .clone())
    }

    /// The schema of the table's files: the sample schema, or a column group's.
    fn file_schema(&self) -> arrow::datatypes::SchemaRef {
        match self.group {
            None => sample_schema(),
            Some(g) => group_schema(g),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The table's location as a user (or another engine) writes it.
    pub fn location(&self) -> String {
        format!(
            "{}/{}",
            self.storage.root().trim_end_matches('/'),
            self.name
        )
    }

    /// Storage path of a log entry.
    pub fn log_path(&self, version: u64) -> String {
        join(&self.name, &log_file(version))
    }

    /// Storage path of a shard entry's file.
    pub fn shard_path(&self, entry: &ShardEntry) -> String {
        join(&self.name, &entry.path)
    }

    fn delta_err(&self, e: DeltaTableError) -> CatalogError {
        CatalogError::Delta {
            table: self.location(),
            source: Box::new(e),
        }
    }

    fn log_store(&self) -> Result<LogStoreRef> {
        check_name(&self.name)?;
        let (url, root) = self.storage.object_store()?;
        let table_url =
            url.join(&format!("{}/", self.name))
                .map_err(|e| CatalogError::InvalidUri {
                    uri: self.location(),
                    reason: e.to_string(),
                })?;
        let prefix = object_store::path::Path::from_url_path(table_url.path()).map_err(|e| {
            CatalogError::InvalidUri {
                uri: self.location(),
                reason: e.to_string(),
            }
        })?;
        let prefixed: Arc<dyn object_store::ObjectStore> =
            Arc::new(PrefixStore::new(root.clone(), prefix));
        Ok(default_logstore(
            prefixed,
            root,
            &table_url,
            &StorageConfig::default(),
        ))
    }

    /// Reads the table from scratch: its latest checkpoint and the commits after it.
    async fn load(&self) -> Result<State> {
        let log_store = self.log_store()?;
        if !log_store
            .is_delta_table_location()
            .await
            .map_err(|e| self.delta_err(e))?
        {
            return Ok(State {
                log_store,
                version: None,
                shards: BTreeMap::new(),
                units: BTreeSet::new(),
                table: None,
            });
        }
        let mut table = DeltaTable::new(log_store.clone());
        if let Err(e) = table.load().await {
            // Name the log entry at fault where there is one.
            return Err(match self.find_malformed_entry().await {
                Some(named) => named,
                None => self.delta_err(e),
            });
        }
        let (version, shards, units) = self.state_of(&table)?;
        Ok(State {
            log_store,
            version: Some(version),
            shards,
            units,
            table: Some(table),
        })
    }

    /// The version, shards (by path) and work units of a table the library loaded.
    #[allow(clippy::type_complexity)]
    fn state_of(
        &self,
        table: &DeltaTable,
    ) -> Result<(u64, BTreeMap<String, ShardEntry>, BTreeSet<String>)> {
        let snap = table.snapshot().map_err(|e| self.delta_err(e))?;
        let version = snap.version();
        self.check_schema_version(
            version,
            snap.metadata().configuration().get(SCHEMA_VERSION_PROPERTY),
        )?;
        let mut shards = BTreeMap::new();
        let mut units = BTreeSet::new();
        for view in snap.log_data().iter() {
            #[allow(deprecated)] // the one accessor that returns a file's tags
            let add = view.add_action();
            let entry = self.entry_of_add(&add, version)?;
            units.extend(entry.units.iter().cloned());
            shards.insert(entry.path.clone(), entry);
        }
        Ok((version, shards, units))
    }

    fn check_schema_version(&self, version: u64, found: Option<&String>) -> Result<()> {
        let path = format!(
            "{}/{}",
            self.storage.root().trim_end_matches('/'),
            self.log_path(version)
        );
        match found.map(|v| v.parse::<u32>()) {
            Some(Ok(v)) if v == SCHEMA_VERSION => Ok(()),
            Some(Ok(v)) => Err(CatalogError::UnsupportedSchemaVersion {
                path,
                found: v,
                supported: SCHEMA_VERSION,
            }),
            _ => Err(CatalogError::MalformedLog {
                path,
                reason: format!(
                    "the table's metadata has no valid {SCHEMA_VERSION_PROPERTY}; not a llamagen table"
                ),
            }),
        }
    }

    fn entry_of_add(&self, add: &Add, version: u64) -> Result<ShardEntry> {
        let bad = |reason: String| CatalogError::MalformedLog {
            path: format!(
                "{}/{}",
                self.storage.root().trim_end_matches('/'),
                self.log_path(version)
            ),
            reason: format!("add {}: {reason}", add.path),
        };
        if !confined(&add.path) {
            return Err(bad("the path leaves the table's folder".into()));
        }
        let tags = add.tags.clone().unwrap_or_default();
        let tag = |k: &str| tags.get(k).cloned().flatten();
        let list = |k: &str| -> Result<Vec<String>> {
            match tag(k) {
                None => Ok(Vec::new()),
                Some(s) => serde_json::from_str(&s).map_err(|e| bad(format!("tag {k}: {e}"))),
            }
        };
        let rows = match &add.stats {
            Some(s) => serde_json::from_str::<serde_json::Value>(s)
                .map_err(|e| bad(format!("stats: {e}")))?
                .get("numRecords")
                .and_then(|n| n.as_u64())
                .ok_or_else(|| bad("stats without numRecords".into()))?,
            None => return Err(bad("no stats (numRecords)".into())),
        };
        Ok(ShardEntry {
            path: add.path.clone(),
            rows,
            bytes: add.size.max(0) as u64,
            sha256: tag(TAG_SHA256).ok_or_else(|| bad(format!("no {TAG_SHA256} tag")))?,
            stage: tag(TAG_STAGE).unwrap_or_default(),
            created_at: Utc
                .timestamp_millis_opt(add.modification_time)
                .single()
                .unwrap_or_default(),
            applied: list(TAG_APPLIED)?,
            units: list(TAG_UNITS)?,
            columns: match tag(TAG_COLUMNS) {
                None => ColumnFiles::new(),
                Some(s) => {
                    let files: ColumnFiles = serde_json::from_str(&s)
                        .map_err(|e| bad(format!("tag {TAG_COLUMNS}: {e}")))?;
                    for (g, f) in &files {
                        if group_columns(g).is_none() {
                            return Err(bad(format!("tag {TAG_COLUMNS}: no column group {g:?}")));
                        }
                        if !confined(&f.path) {
                            return Err(bad(format!(
                                "tag {TAG_COLUMNS}: column file {} leaves its table's folder",
                                f.path
                            )));
                        }
                    }
                    files
                }
            },
        })
    }

    fn add_of_entry(entry: &ShardEntry) -> Add {
        let mut tags = HashMap::new();
        tags.insert(TAG_SHA256.to_string(), Some(entry.sha256.clone()));
        tags.insert(TAG_STAGE.to_string(), Some(entry.stage.clone()));
        if !entry.applied.is_empty() {
            tags.insert(
                TAG_APPLIED.to_string(),
                Some(serde_json::to_string(&entry.applied).expect("strings serialise")),
            );
        }
        if !entry.units.is_empty() {
            tags.insert(
                TAG_UNITS.to_string(),
                Some(serde_json::to_string(&entry.units).expect("strings serialise")),
            );
        }
        if !entry.columns.is_empty() {
            tags.insert(
                TAG_COLUMNS.to_string(),
                Some(serde_json::to_string(&entry.columns).expect("column files serialise")),
            );
        }
        Add {
            path: entry.path.clone(),
            partition_values: HashMap::new(),
            size: entry.bytes as i64,
            modification_time: entry.created_at.timestamp_millis(),
            data_change: true,
            stats: Some(format!("{{\"numRecords\":{}}}", entry.rows)),
            tags: Some(tags),
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        }
    }

    /// Brings `state` to the latest version: a cold load the first time, then only the commits
    /// written since (invariant 3).
    async fn refresh<'a>(&self, slot: &'a mut Option<State>) -> Result<&'a mut State> {
        let stale = match slot.as_mut() {
            None => true,
            Some(st) => match st.version {
                // Created by someone else since?
                None => st
                    .log_store
                    .is_delta_table_location()
                    .await
                    .map_err(|e| self.delta_err(e))?,
                Some(v) => !self.advance(st, v).await?,
            },
        };
        if stale {
            *slot = Some(self.load().await?);
        }
        Ok(slot.as_mut().expect("loaded"))
    }

    /// Applies the commits after `from` to `st`; false if the log no longer has them (expired
    /// entries: a cold load is needed).
    async fn advance(&self, st: &mut State, from: u64) -> Result<bool> {
        let mut v = from;
        loop {
            let next = v + 1;
            let entry = st
                .log_store
                .read_commit_entry(next)
                .await
                .map_err(|e| self.delta_err(e))?;
            let Some(bytes) = entry else {
                break;
            };
            self.apply_commit(st, next, &bytes)?;
            v = next;
        }
        if v == from {
            // Nothing newer; but a gap (an expired entry followed by newer ones) means reload.
            let latest = st
                .log_store
                .get_latest_version(from)
                .await
                .map_err(|e| self.delta_err(e))?;
            return Ok(latest <= from);
        }
        st.version = Some(v);
        Ok(true)
    }

    /// Applies one commit's actions (JSON lines) to `st`.
    fn apply_commit(&self, st: &mut State, version: u64, bytes: &[u8]) -> Result<()> {
        let path = format!(
            "{}/{}",
            self.storage.root().trim_end_matches('/'),
            self.log_path(version)
        );
        let bad = |line: usize, reason: String| CatalogError::MalformedLog {
            path: path.clone(),
            reason: format!("line {line}: {reason}"),
        };
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let action: Action =
                serde_json::from_slice(line).map_err(|e| bad(i + 1, e.to_string()))?;
            match action {
                Action::Add(add) => {
                    let entry = self.entry_of_add(&add, version)?;
                    st.units.extend(entry.units.iter().cloned());
                    st.shards.insert(entry.path.clone(), entry);
                }
                Action::Remove(r) => {
                    if !confined(&r.path) {
                        return Err(bad(
                            i + 1,
                            format!("remove {}: the path leaves the table's folder", r.path),
                        ));
                    }
                    st.shards.remove(&r.path);
                }
                Action::Txn(t) => {
                    st.units.insert(t.app_id);
                }
                Action::Metadata(m) => {
                    self.check_schema_version(
                        version,
                        m.configuration().get(SCHEMA_VERSION_PROPERTY),
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The first JSON log entry after the latest checkpoint that does not parse as Delta actions,
    /// as an error naming it (None if they all parse).
    async fn find_malformed_entry(&self) -> Option<CatalogError> {
        let from = self
            .last_checkpoint_version()
            .await
            .ok()
            .flatten()
            .unwrap_or(0);
        let versions = self.versions().await.ok()?;
        for v in versions.into_iter().filter(|v| *v >= from) {
            let path = self.log_path(v);
            let bytes = self.storage.get(&path).await.ok()?;
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if let Err(e) = serde_json::from_slice::<Action>(line) {
                    return Some(CatalogError::MalformedLog {
                        path: format!("{}/{path}", self.storage.root().trim_end_matches('/')),
                        reason: format!("line {}: {e}", i + 1),
                    });
                }
            }
        }
        None
    }

    /// Creates the table: version 0 (protocol, metadata with the sample schema) written with
    /// put-if-absent like any commit, so of racing creators exactly one writes it and the others
    /// go on with the table it made.
    async fn create(&self, st: &State) -> Result<()> {
        use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
        let schema: deltalake::kernel::StructType =
            self.file_schema()
                .as_ref()
                .try_into_kernel()
                .map_err(|e| self.delta_err(DeltaTableError::from(e)))?;
        let now = Utc::now().timestamp_millis();
        let protocol = serde_json::json!({"minReaderVersion": 1, "minWriterVersion": 2});
        let metadata = serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "name": self.name,
            "description": match self.group {
                None => "llamagen samples (the sample schema: llamagen-catalog's schema.rs)".to_string(),
                Some(g) => format!(
                    "llamagen column group {g:?} of dataset {:?}: join on key (llamagen-catalog's columns.rs)",
                    self.name.trim_end_matches(&format!(".{g}"))
                ),
            },
            "format": {"provider": "parquet", "options": {}},
            "schemaString": serde_json::to_string(&schema).expect("a schema serialises"),
            "partitionColumns": [],
            "configuration": {
                "delta.checkpointInterval": CHECKPOINT_INTERVAL.to_string(),
                SCHEMA_VERSION_PROPERTY: SCHEMA_VERSION.to_string(),
            },
            "createdTime": now,
        });
        let action = |v: serde_json::Value| -> Result<Action> {
            serde_json::from_value(v).map_err(|e| {
                CatalogError::InvalidArgument(format!("building the table's first version: {e}"))
            })
        };
        let (Action::Protocol(p), Action::Metadata(m)) = (
            action(serde_json::json!({"protocol": protocol}))?,
            action(serde_json::json!({"metaData": metadata}))?,
        ) else {
            unreachable!("built as a protocol and a metadata action")
        };
        let location = st.log_store.root_url().clone();
        let operation = DeltaOperation::Create {
            mode: SaveMode::ErrorIfExists,
            location,
            protocol: p.clone(),
            metadata: m.clone(),
        };
        let data = CommitData::new(
            vec![Action::Protocol(p), Action::Metadata(m)],
            operation,
            HashMap::new(),
            Vec::new(),
        );
        let bytes = data
            .get_bytes()
            .map_err(|e| self.delta_err(DeltaTableError::from(e)))?;
        match st
            .log_store
            .write_commit_entry(0, CommitOrBytes::LogBytes(bytes), uuid::Uuid::new_v4())
            .await
        {
            Ok(()) | Err(TransactionError::VersionAlreadyExists(_)) => Ok(()),
            Err(e) => Err(self.delta_err(DeltaTableError::from(e))),
        }
    }

    /// The latest committed version (0 if nothing was committed yet).
    pub async fn latest_version(&self) -> Result<u64> {
        Ok(self.snapshot().await?.version)
    }

    /// Every version still in the log, ascending.
    pub async fn versions(&self) -> Result<Vec<u64>> {
        let prefix = format!("{}/", join(&self.name, LOG_DIR));
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

    /// Every version still in the log, read from its commit (an entry that log cleanup removed
    /// is absent).
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        let log_store = self.log_store()?;
        let versions = self.versions().await?;
        let entries = futures::stream::iter(versions)
            .map(|v| {
                let log_store = log_store.clone();
                async move {
                    let bytes = log_store
                        .read_commit_entry(v)
                        .await
                        .map_err(|e| self.delta_err(e))?;
                    Ok::<_, CatalogError>(bytes.map(|b| (v, b)))
                }
            })
            .buffered(16)
            .collect::<Vec<_>>()
            .await;
        let mut out = Vec::new();
        for e in entries {
            let Some((version, bytes)) = e? else { continue };
            let mut h = HistoryEntry {
                version,
                ..Default::default()
            };
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_slice(line).map_err(|e| CatalogError::MalformedLog {
                        path: format!("{}/{}", self.location(), log_file(version)),
                        reason: format!("line {}: {e}", i + 1),
                    })?;
                if let Some(ci) = v.get("commitInfo") {
                    let s = |k: &str| ci.get(k).and_then(|x| x.as_str()).map(String::from);
                    h.operation = s("operation");
                    h.stage = s(INFO_OPERATION);
                    h.run_id = s(INFO_RUN_ID);
                    h.committed_at = ci
                        .get("timestamp")
                        .and_then(|t| t.as_i64())
                        .and_then(|t| Utc.timestamp_millis_opt(t).single());
                } else if let Some(a) = v.get("add") {
                    h.shards_added += 1;
                    h.rows_added += a
                        .get("stats")
                        .and_then(|s| s.as_str())
                        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                        .and_then(|s| s.get("numRecords").and_then(|n| n.as_u64()))
                        .unwrap_or(0);
                } else if v.get("remove").is_some() {
                    h.shards_removed += 1;
                } else if v.get("txn").is_some() {
                    h.units += 1;
                }
            }
            out.push(h);
        }
        Ok(out)
    }

    /// The dataset as of `version` (time travel; versions older than the log's retention are
    /// gone).
    pub async fn snapshot_at(&self, version: u64) -> Result<Snapshot> {
        let log_store = self.log_store()?;
        let mut table = DeltaTable::new(log_store);
        table
            .load_version(version)
            .await
            .map_err(|e| self.delta_err(e))?;
        let (version, shards, units) = self.state_of(&table)?;
        Ok(Snapshot {
            dataset: self.name.clone(),
            version,
            shards: shards.into_values().collect(),
            units,
        })
    }

    /// The latest committed version (version 0, empty, if nothing was committed yet). Shards
    /// come in the order they were written (their names are time-ordered UUIDs).
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut slot = self.state.lock().await;
        let st = self.refresh(&mut slot).await?;
        Ok(Snapshot {
            dataset: self.name.clone(),
            version: st.version.unwrap_or(0),
            shards: st.shards.values().cloned().collect(),
            units: st.units.clone(),
        })
    }

    /// Whether anything was ever committed.
    pub async fn exists(&self) -> Result<bool> {
        let mut slot = self.state.lock().await;
        Ok(self.refresh(&mut slot).await?.version.is_some())
    }

    /// A writer for new shards of this dataset.
    pub fn writer(&self, opts: ShardWriterOptions) -> ShardWriter {
        ShardWriter::new(self.storage.clone(), &self.name, opts)
    }

    /// Commits a transaction (see the protocol above), then records the column files it adds
    /// and replaces in the column-group tables (see [`crate::columns`]).
    pub async fn commit(&self, txn: Transaction) -> Result<Committed> {
        let (committed, replaced) = self.commit_inner(&txn, false).await?;
        if self.group.is_none() {
            self.sync_groups(&txn, &replaced).await;
        }
        Ok(committed)
    }

    /// Records the column files a committed transaction added and replaced in their groups'
    /// tables. A failure leaves the group table behind the dataset, which `gc` repairs
    /// (columns invariant 3), so it is reported, not returned: the rows are committed.
    async fn sync_groups(&self, txn: &Transaction, replaced: &[ShardEntry]) {
        for (g, _) in COLUMN_GROUPS {
            // Column files carried over from a replaced shard are in the table already.
            let had: BTreeSet<&String> = replaced
                .iter()
                .filter_map(|e| e.columns.get(*g).map(|f| &f.path))
                .collect();
            let add: Vec<ShardEntry> = txn
                .add
                .iter()
                .filter_map(|e| e.columns.get(*g).map(|f| column_entry(e, f)))
                .filter(|a| !had.contains(&a.path))
                .collect();
            let kept: BTreeSet<&String> = txn
                .add
                .iter()
                .filter_map(|e| e.columns.get(*g).map(|f| &f.path))
                .collect();
            let remove: Vec<String> = had
                .iter()
                .filter(|p| !kept.contains(**p))
                .map(|p| (*p).clone())
                .collect();
            if add.is_empty() && remove.is_empty() {
                continue;
            }
            let result = async {
                let table = self.group_table(g)?;
                let t = Transaction {
                    operation: txn.operation.clone(),
                    run_id: txn.run_id.clone(),
                    add,
                    remove,
                    units: Vec::new(),
                };
                table.commit_inner(&t, true).await
            }
            .await;
            if let Err(e) = result {
                eprintln!(
                    "warning: recording column files in {}: {e} (the rows are committed; \
                     `llamagen catalog gc` brings the group table up to date)",
                    columns::table_name(&self.location(), g)
                );
            }
        }
    }

    /// Commits a transaction; returns the version and the entries of the shards it removed.
    /// `lenient`: removals of shards no longer in the table are dropped instead of failing (the
    /// column-group tables, where a repair may have removed them first).
    async fn commit_inner(
        &self,
        txn: &Transaction,
        lenient: bool,
    ) -> Result<(Committed, Vec<ShardEntry>)> {
        let txn_id = uuid::Uuid::new_v4().to_string();
        let mut slot = self.state.lock().await;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let st = self.refresh(&mut slot).await?;
            if st.version.is_none() {
                self.create(st).await?;
                continue;
            }
            let base = st.version.expect("exists");
            for u in &txn.units {
                if st.units.contains(u) {
                    self.discard(&txn.add).await;
                    return Err(CatalogError::UnitAlreadyCommitted {
                        dataset: self.name.clone(),
                        unit: u.clone(),
                        version: base,
                    });
                }
            }
            let remove: Vec<&String> = txn
                .remove
                .iter()
                .filter(|r| !lenient || st.shards.contains_key(*r))
                .collect();
            if let Some(gone) = remove.iter().find(|r| !st.shards.contains_key(**r)) {
                // The added shards are left to the caller, who may commit them without the
                // shard that is gone (see crate::stage).
                return Err(CatalogError::ShardGone {
                    dataset: self.name.clone(),
                    path: (*gone).clone(),
                });
            }
            let replaced: Vec<ShardEntry> = remove.iter().map(|r| st.shards[*r].clone()).collect();
            if lenient && txn.add.is_empty() && replaced.is_empty() {
                return Ok((
                    Committed {
                        version: base,
                        retries: attempt - 1,
                    },
                    replaced,
                ));
            }
            let now = Utc::now().timestamp_millis();
            let mut actions = Vec::with_capacity(txn.add.len() + remove.len());
            for old in &replaced {
                actions.push(Action::Remove(Remove {
                    path: old.path.clone(),
                    data_change: true,
                    deletion_timestamp: Some(now),
                    extended_file_metadata: Some(true),
                    size: Some(old.bytes as i64),
                    partition_values: Some(HashMap::new()),
                    deletion_vector: None,
                    tags: None,
                    base_row_id: None,
                    default_row_commit_version: None,
                }));
            }
            for a in &txn.add {
                let mut a = a.clone();
                if a.units.is_empty() {
                    a.units = txn.units.clone();
                }
                actions.push(Action::Add(Self::add_of_entry(&a)));
            }
            let operation = if remove.is_empty() {
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                }
            } else {
                DeltaOperation::Update { predicate: None }
            };
            let mut info = HashMap::from([
                (
                    INFO_TXN_ID.to_string(),
                    serde_json::Value::from(txn_id.clone()),
                ),
                (
                    INFO_OPERATION.to_string(),
                    serde_json::Value::from(txn.operation.clone()),
                ),
            ]);
            if let Some(r) = &txn.run_id {
                info.insert(INFO_RUN_ID.to_string(), r.clone().into());
            }
            let app_txns = txn
                .units
                .iter()
                .map(|u| AppTransaction::new_with_last_update(u, 1, Some(now)))
                .collect();
            let data = CommitData::new(actions, operation, info, app_txns);
            let bytes = data
                .get_bytes()
                .map_err(|e| self.delta_err(DeltaTableError::from(e)))?;
            let version = base + 1;
            match st
                .log_store
                .write_commit_entry(
                    version,
                    CommitOrBytes::LogBytes(bytes.clone()),
                    uuid::Uuid::new_v4(),
                )
                .await
            {
                Ok(()) => {
                    self.apply_commit(st, version, &bytes)?;
                    st.version = Some(version);
                    if version % CHECKPOINT_INTERVAL == 0 {
                        self.checkpoint(st, version).await;
                    }
                    return Ok((
                        Committed {
                            version,
                            retries: attempt - 1,
                        },
                        replaced,
                    ));
                }
                Err(TransactionError::VersionAlreadyExists(_)) => {
                    // Invariant 5: an ambiguous earlier attempt of ours may have won.
                    if self.committed_by(st, version, &txn_id).await? {
                        self.advance(st, base).await?;
                        return Ok((
                            Committed {
                                version,
                                retries: attempt - 1,
                            },
                            replaced,
                        ));
                    }
                    if attempt >= self.max_commit_attempts {
                        return Err(CatalogError::CommitConflict {
                            dataset: self.name.clone(),
                            attempts: attempt,
                        });
                    }
                    let backoff = 2u64 << attempt.min(6);
                    let jitter = rand::rng().random_range(0..=backoff);
                    tokio::time::sleep(Duration::from_millis(backoff / 2 + jitter)).await;
                }
                Err(e) => return Err(self.delta_err(DeltaTableError::from(e))),
            }
        }
    }

    /// Whether version `version` carries commit id `txn_id`.
    async fn committed_by(&self, st: &State, version: u64, txn_id: &str) -> Result<bool> {
        let Some(bytes) = st
            .log_store
            .read_commit_entry(version)
            .await
            .map_err(|e| self.delta_err(e))?
        else {
            return Ok(false);
        };
        for line in bytes.split(|b| *b == b'\n') {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
                if let Some(ci) = v.get("commitInfo") {
                    return Ok(ci.get(INFO_TXN_ID).and_then(|t| t.as_str()) == Some(txn_id));
                }
            }
        }
        Ok(false)
    }

    /// Writes the checkpoint of `version`. A failure leaves the table correct (only slower to
    /// read cold), so it is reported and not returned.
    async fn checkpoint(&self, st: &mut State, version: u64) {
        let result = async {
            let table = match st.table.as_mut() {
                Some(t) => t,
                None => {
                    st.table = Some(DeltaTable::new(st.log_store.clone()));
                    st.table.as_mut().expect("set")
                }
            };
            if table.version().is_some() {
                table.update_incremental(Some(version)).await?;
            } else {
                table.load_version(version).await?;
            }
            deltalake::checkpoints::create_checkpoint(table, None).await
        }
        .await;
        if let Err(e) = result {
            eprintln!(
                "warning: checkpoint of {} at version {version} failed: {e}",
                self.location()
            );
        }
    }

    /// Best-effort removal of shards (base and column files) that will never be committed.
    pub async fn discard(&self, shards: &[ShardEntry]) {
        for s in shards {
            let _ = self.storage.delete(&self.shard_path(s)).await;
            for (g, f) in &s.columns {
                let path = join(&columns::table_name(&self.name, g), &f.path);
                let _ = self.storage.delete(&path).await;
            }
        }
    }

    /// Reads one committed shard whole, checking size, hash and schema version.
    pub async fn read_shard(
        &self,
        entry: &ShardEntry,
        projection: Option<&[&str]>,
    ) -> Result<Vec<RecordBatch>> {
        check_name(&self.name)?;
        if !confined(&entry.path) {
            return Err(CatalogError::InvalidArgument(format!(
                "shard path {:?} leaves dataset {:?}",
                entry.path, self.name
            )));
        }
        let path = self.shard_path(entry);
        let data = self.storage.get(&path).await?;
        let root = self.storage.root();
        let name = format!("{}/{}", root.trim_end_matches('/'), path);
        if let Some(g) = self.group {
            let logged = (entry.bytes, entry.sha256.as_str());
            return crate::shard::decode_file(&name, logged, data, projection, &group_schema(g));
        }
        let groups: Vec<&str> = columns::groups_of_projection(projection)
            .into_iter()
            .filter(|g| entry.columns.contains_key(*g))
            .collect();
        if groups.is_empty() {
            return decode_shard(&name, entry, data, projection);
        }
        // The keys check each column file row for row (columns invariant 1).
        let with_key = projection.map(|p| {
            let mut v = p.to_vec();
            if !v.contains(&col::KEY) {
                v.insert(0, col::KEY);
            }
            v
        });
        let mut batches = decode_shard(&name, entry, data, with_key.as_deref())?;
        for g in groups {
            let file = &entry.columns[g];
            let gpath = join(&columns::table_name(&self.name, g), &file.path);
            let gname = format!("{}/{gpath}", root.trim_end_matches('/'));
            let cols: Vec<&str> = std::iter::once(col::KEY)
                .chain(
                    group_columns(g)
                        .expect("a group")
                        .iter()
                        .copied()
                        .filter(|c| projection.is_none_or(|p| p.contains(c))),
                )
                .collect();
            let gdata = self.storage.get(&gpath).await?;
            let logged = (file.bytes, file.sha256.as_str());
            let part =
                crate::shard::decode_file(&gname, logged, gdata, Some(&cols), &group_schema(g))?;
            batches = columns::attach(batches, g, &part, &gname)?;
        }
        if with_key.is_some() && projection.is_some_and(|p| !p.contains(&col::KEY)) {
            for b in &mut batches {
                let i = b.schema().index_of(col::KEY)?;
                b.remove_column(i);
            }
        }
        Ok(batches)
    }

    /// Checks every committed shard: present, right size, right SHA-256, readable Parquet of the
    /// right schema version. Returns the problems found (empty when all is well).
    pub async fn verify(&self) -> Result<Vec<VerifyProblem>> {
        let snap = self.snapshot().await?;
        let problems = futures::stream::iter(snap.shards.iter())
            .map(|e| async move {
                // The key and one column of each group: every file of the shard is checked.
                let cols: Vec<&str> = std::iter::once(col::KEY)
                    .chain(
                        e.columns
                            .keys()
                            .filter_map(|g| group_columns(g).and_then(|c| c.first().copied())),
                    )
                    .collect();
                match self.read_shard(e, Some(&cols)).await {
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

    /// Removes what no reader of a version younger than `grace` can see: shard files (named as
    /// the shard writer names them, nothing else) not referenced by the latest version and
    /// temporary files, both only once older than `grace`; log entries older than `grace` that
    /// the latest checkpoint makes unnecessary. With `dry_run`, only reports. Refuses a folder
    /// that is not a table, so a wrong `--dataset` deletes nothing.
    ///
    /// A dataset's column-group tables are collected with it: first each is brought to exactly
    /// the column files the latest version names (columns invariant 3; not in a dry run), then
    /// column files named by neither are removed like shards.
    pub async fn gc(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let mut report = self
            .gc_files(grace, dry_run, &BTreeSet::new(), true)
            .await?;
        if self.group.is_some() {
            return Ok(report);
        }
        let snap = self.snapshot().await?;
        for (g, _) in COLUMN_GROUPS {
            let named: BTreeMap<String, ShardEntry> = snap
                .shards
                .iter()
                .filter_map(|e| {
                    e.columns
                        .get(*g)
                        .map(|f| (f.path.clone(), column_entry(e, f)))
                })
                .collect();
            let table = self.group_table(g)?;
            if !dry_run {
                let live = table.snapshot().await?;
                let live: BTreeSet<&String> = live.shards.iter().map(|e| &e.path).collect();
                let txn = Transaction {
                    operation: "gc".into(),
                    run_id: None,
                    add: named
                        .values()
                        .filter(|e| !live.contains(&e.path))
                        .cloned()
                        .collect(),
                    remove: live
                        .iter()
                        .filter(|p| !named.contains_key(**p))
                        .map(|p| (*p).clone())
                        .collect(),
                    units: Vec::new(),
                };
                report.column_entries_added += txn.add.len() as u64;
                report.column_entries_removed += txn.remove.len() as u64;
                if !txn.add.is_empty() || !txn.remove.is_empty() {
                    table.commit_inner(&txn, true).await?;
                }
            }
            if !table.exists().await? {
                continue;
            }
            let referenced = named.keys().map(|p| join(table.name(), p)).collect();
            let r = table.gc_files(grace, dry_run, &referenced, false).await?;
            report.orphan_shards.extend(r.orphan_shards);
            report.orphan_bytes += r.orphan_bytes;
            report.expired_log_entries += r.expired_log_entries;
        }
        Ok(report)
    }

    /// [`Dataset::gc`] of this table's own files; `also_referenced` (storage paths) are kept as
    /// if the latest version named them; `sweep_scratch`: also temporary files and uploads.
    async fn gc_files(
        &self,
        grace: Duration,
        dry_run: bool,
        also_referenced: &BTreeSet<String>,
        sweep_scratch: bool,
    ) -> Result<GcReport> {
        let (referenced, log_store) = {
            let mut slot = self.state.lock().await;
            let st = self.refresh(&mut slot).await?;
            if st.version.is_none() {
                return Err(CatalogError::NoSuchDataset {
                    dataset: self.name.clone(),
                    root: self.storage.root(),
                });
            }
            let mut referenced: BTreeSet<String> =
                st.shards.values().map(|s| self.shard_path(s)).collect();
            referenced.extend(also_referenced.iter().cloned());
            (referenced, st.log_store.clone())
        };
        let cutoff =
            Utc::now() - chrono::Duration::from_std(grace).unwrap_or(chrono::TimeDelta::MAX);
        let mut report = GcReport::default();
        let data_prefix = format!("{}/", join(&self.name, DATA_DIR));
        for o in self.storage.list(&data_prefix).await? {
            let rel = &o.path[self.name.len() + 1..];
            if is_shard_path(rel) && !referenced.contains(&o.path) && o.last_modified < cutoff {
                report.orphan_bytes += o.size;
                report.orphan_shards.push(o.path);
            }
        }
        if sweep_scratch {
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
        }
        if !dry_run {
            for p in report.orphan_shards.iter().chain(&report.temp_files) {
                self.storage.delete(p).await?;
            }
            if let Some(cp) = self.last_checkpoint_version().await? {
                report.expired_log_entries = deltalake::checkpoints::cleanup_expired_logs_for(
                    cp,
                    log_store.as_ref(),
                    cutoff.timestamp_millis(),
                    None,
                )
                .await
                .map_err(|e| self.delta_err(e))?;
            }
        }
        Ok(report)
    }

    /// The version of the latest checkpoint, from `_last_checkpoint`.
    async fn last_checkpoint_version(&self) -> Result<Option<u64>> {
        let path = join(&self.name, &format!("{LOG_DIR}/_last_checkpoint"));
        match self.storage.get(&path).await {
            Ok(b) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&b).map_err(|e| CatalogError::Json {
                        path: path.clone(),
                        source: e,
                    })?;
                Ok(v.get("version").and_then(|v| v.as_u64()))
            }
            Err(CatalogError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
