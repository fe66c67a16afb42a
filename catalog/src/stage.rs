//! Stages that add columns to existing samples: one contract for all of them ([`Stage`], run by
//! [`run_stage`]) over copy-on-write shard rewrites ([`map_shards`]).
//!
//! The stage contract:
//! - A stage has a name, recorded in each shard it processed ([`ShardEntry::applied`]); it says
//!   which shards need it (by default: those that do not list its name); it maps a batch of whole
//!   sample rows to the columns it sets for them, adding what it did to the stage counters. That
//!   is all a stage knows: which shards a run selects (worker share, required earlier stages),
//!   commits, progress and counters' bookkeeping are the runner's.
//! - Its batch function runs on a blocking thread (stages compute for seconds per batch), so the
//!   runtime stays free for I/O, lease renewals and progress.
//! - Its errors come back from [`run_stage`] as [`CatalogError::External`] holding the stage's own
//!   error, which the stage's crate recovers with `downcast`.
//!
//! Rules of [`map_shards`]:
//! - A stage named `s` rewrites each committed shard that does not list `s` in its
//!   [`ShardEntry::applied`] (with [`map_shards_where`]: each shard its predicate selects); the
//!   new shard lists everything the old one did, plus `s`.
//! - Rewrites are committed in groups: every [`ShardWriterOptions::commit_shards`] shards or
//!   [`ShardWriterOptions::commit_interval`], whichever comes first, and at the end. Each new
//!   shard replaces its old one in the same table version (remove + add), so readers see either
//!   the old rows or the new rows, never both or neither. A stage pass over N shards makes about
//!   N / commit_shards commits, each holding only its own actions.
//! - A re-run after a crash continues with the shards not yet committed (at most one group of
//!   work is redone). Two workers rewriting the same shard race safely: the loser's commit finds
//!   the shard gone, discards that shard's output and commits the rest of its group.
//! - The [`ShardSelection`] limits a run to some shards: `partition = (index, count)` to the shards
//!   whose path hashes to `index` (a rewritten shard has a new path, so its next stage may fall to
//!   another worker), and `requires` to the shards whose `applied` list holds every named stage, so
//!   a stage never sees rows an earlier stage (run by another worker) has not processed yet.
//! - The function maps a batch of whole sample rows to a batch of the same rows (same keys, same
//!   order) holding the columns it sets; columns it does not return are carried over unchanged.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, AsArray, RecordBatch};

use crate::columns;
use crate::counters::StageCounters;
use crate::dataset::{Dataset, ShardEntry, Transaction};
use crate::error::{CatalogError, Result};
use crate::schema::col;
use crate::shard::ShardWriterOptions;

/// What a [`map_shards`] run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MapReport {
    pub shards_rewritten: u64,
    pub shards_skipped: u64,
    pub shards_lost_race: u64,
    pub rows: u64,
}

/// Which committed shards a stage run may rewrite (see the module rules). A plain
/// `(index, count)` tuple converts into a selection without requirements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardSelection {
    /// `(index, count)`: this worker's share of the shards; `(0, 1)` (or count 0) is all of them.
    pub partition: (usize, usize),
    /// Stages every selected shard must already list in [`ShardEntry::applied`] (or as its
    /// writing stage).
    pub requires: Vec<String>,
}

impl ShardSelection {
    /// Whether `entry` is selected.
    pub fn selects(&self, entry: &ShardEntry) -> bool {
        shard_in_partition(entry, self.partition)
            && self
                .requires
                .iter()
                .all(|r| entry.stage == *r || entry.applied.iter().any(|a| a == r))
    }
}

impl From<(usize, usize)> for ShardSelection {
    fn from(partition: (usize, usize)) -> Self {
        ShardSelection {
            partition,
            requires: Vec::new(),
        }
    }
}

/// Whether a shard belongs to worker `index` of `count`.
pub fn shard_in_partition(entry: &ShardEntry, (index, count): (usize, usize)) -> bool {
    crate::worker::in_share(&entry.path, (index, count))
}

/// Rewrites the shards of `ds` that `stage` has not processed, through `f`, batch by batch.
/// `f` gets whole rows and returns the columns it sets (see the module rules); `on_shard` is told
/// after each commit (for progress and counters).
pub async fn map_shards<F, Fut>(
    ds: &Dataset,
    stage: &str,
    partition: impl Into<ShardSelection>,
    writer: ShardWriterOptions,
    f: F,
    on_shard: impl FnMut(&ShardEntry, u64),
) -> Result<MapReport>
where
    F: FnMut(RecordBatch) -> Fut,
    Fut: Future<Output = Result<RecordBatch>>,
{
    let needs = |e: &ShardEntry| !e.applied.iter().any(|s| s == stage);
    map_shards_where(ds, stage, partition, writer, needs, f, on_shard).await
}

/// [`map_shards`] for stages that may need to run again on a shard they already processed
/// (e.g. re-applying thresholds): `needs(entry)` decides which shards are rewritten.
pub async fn map_shards_where<F, Fut>(
    ds: &Dataset,
    stage: &str,
    partition: impl Into<ShardSelection>,
    writer: ShardWriterOptions,
    needs: impl Fn(&ShardEntry) -> bool,
    mut f: F,
    mut on_shard: impl FnMut(&ShardEntry, u64),
) -> Result<MapReport>
where
    F: FnMut(RecordBatch) -> Fut,
    Fut: Future<Output = Result<RecordBatch>>,
{
    let selection = partition.into();
    let mut report = MapReport::default();
    let snap = ds.snapshot().await?;
    let mut group = Group::default();
    let mut group_started = Instant::now();
    for entry in &snap.shards {
        if !needs(entry) || !selection.selects(entry) {
            report.shards_skipped += 1;
            continue;
        }
        // A failure commits the rewrites already done before it is returned.
        let rewritten: Result<(Vec<ShardEntry>, u64)> = async {
            let batches = ds.read_shard(entry, None).await?;
            let mut applied = entry.applied.clone();
            if applied.is_empty() {
                applied.push(entry.stage.clone());
            }
            applied.push(stage.to_string());
            // One new shard per old one, so the column files carried over stay row for row
            // with it (columns invariant 4).
            let mut w = ds.writer(ShardWriterOptions {
                stage: stage.to_string(),
                applied,
                max_rows: usize::MAX,
                target_bytes: u64::MAX,
                ..writer.clone()
            });
            let mut rows = 0u64;
            for b in batches {
                let out = f(b.clone()).await?;
                // Wide columns the stage did not set stay in their column files.
                let kept = columns::without_wide(&b, &columns::groups_in(&out.schema()))?;
                let merged = overlay(&kept, &out)?;
                rows += merged.num_rows() as u64;
                w.write(&merged).await?;
            }
            let mut add = w.finish().await?;
            if add.len() > 1 {
                ds.discard(&add).await;
                return Err(CatalogError::SchemaMismatch(format!(
                    "stage {stage} set different wide columns in different batches of shard {}",
                    entry.path
                )));
            }
            for a in &mut add {
                a.units = entry.units.clone();
                for (g, file) in &entry.columns {
                    a.columns.entry(g.clone()).or_insert_with(|| file.clone());
                }
            }
            if add.is_empty() && entry.rows > 0 {
                return Err(CatalogError::SchemaMismatch(format!(
                    "stage {stage} wrote no rows for shard {} ({} rows)",
                    entry.path, entry.rows
                )));
            }
            Ok((add, rows))
        }
        .await;
        let (add, rows) = match rewritten {
            Ok(r) => r,
            Err(e) => {
                commit_group(ds, stage, &mut group, &mut report, &mut on_shard).await?;
                return Err(e);
            }
        };
        if group.pairs.is_empty() {
            group_started = Instant::now();
        }
        group.pairs.push((entry.clone(), add, rows));
        if group.pairs.len() >= writer.commit_shards.max(1)
            || group_started.elapsed() >= writer.commit_interval
        {
            commit_group(ds, stage, &mut group, &mut report, &mut on_shard).await?;
        }
    }
    commit_group(ds, stage, &mut group, &mut report, &mut on_shard).await?;
    Ok(report)
}

/// Rewritten shards waiting for their commit: (old entry, new shards, rows).
#[derive(Default)]
struct Group {
    pairs: Vec<(ShardEntry, Vec<ShardEntry>, u64)>,
}

/// Commits a group of rewrites as one table version; a shard another worker rewrote meanwhile
/// is dropped from the group (its output discarded) and the rest committed.
async fn commit_group(
    ds: &Dataset,
    stage: &str,
    group: &mut Group,
    report: &mut MapReport,
    on_shard: &mut impl FnMut(&ShardEntry, u64),
) -> Result<()> {
    while !group.pairs.is_empty() {
        let txn = Transaction {
            operation: stage.to_string(),
            run_id: None,
            add: group.pairs.iter().flat_map(|p| p.1.clone()).collect(),
            remove: group.pairs.iter().map(|p| p.0.path.clone()).collect(),
            units: vec![],
        };
        match ds.commit(txn).await {
            Ok(_) => {
                for (entry, _, rows) in group.pairs.drain(..) {
                    report.shards_rewritten += 1;
                    report.rows += rows;
                    on_shard(&entry, rows);
                }
            }
            Err(CatalogError::ShardGone { path, .. }) => {
                let i = group
                    .pairs
                    .iter()
                    .position(|p| p.0.path == path)
                    .expect("the gone shard is one of the group's");
                let (old, add, _) = group.pairs.remove(i);
                // Column files carried over from the old shard are not this rewrite's to delete.
                let own: Vec<ShardEntry> = add
                    .into_iter()
                    .map(|mut a| {
                        a.columns.retain(|g, f| old.columns.get(g) != Some(f));
                        a
                    })
                    .collect();
                ds.discard(&own).await;
                report.shards_lost_race += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `base` with the columns of `update` replacing (or adding) columns of the same name. Keys must
/// match row for row.
pub fn overlay(base: &RecordBatch, update: &RecordBatch) -> Result<RecordBatch> {
    if base.num_rows() != update.num_rows() {
        return Err(CatalogError::SchemaMismatch(format!(
            "stage returned {} rows for {}",
            update.num_rows(),
            base.num_rows()
        )));
    }
    if let (Some(a), Some(b)) = (
        base.column_by_name(col::KEY),
        update.column_by_name(col::KEY),
    ) {
        if a.as_string::<i32>() != b.as_string::<i32>() {
            return Err(CatalogError::SchemaMismatch(
                "stage changed or reordered the keys".into(),
            ));
        }
    }
    let mut fields: Vec<arrow::datatypes::FieldRef> = Vec::new();
    let mut cols = Vec::new();
    let bs = base.schema();
    for (i, f) in bs.fields().iter().enumerate() {
        match update.column_by_name(f.name()) {
            Some(c) => {
                fields.push(
                    update
                        .schema()
                        .field_with_name(f.name())
                        .expect("present")
                        .clone()
                        .into(),
                );
                cols.push(c.clone());
            }
            None => {
                fields.push(f.clone());
                cols.push(base.column(i).clone());
            }
        }
    }
    for (f, c) in update.schema().fields().iter().zip(update.columns()) {
        if bs.field_with_name(f.name()).is_err() {
            fields.push(f.clone());
            cols.push(c.clone());
        }
    }
    Ok(RecordBatch::try_new(
        std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
        cols,
    )?)
}

/// Adds the stage's counters for a batch of rows by their final status and reasons.
pub fn count_rows(counters: &mut StageCounters, batch: &RecordBatch) {
    counters.received += batch.num_rows() as u64;
    counters.written += batch.num_rows() as u64;
    if let Some(st) = batch.column_by_name(col::STATUS) {
        let st = st.as_string::<i32>();
        let kinds = batch
            .column_by_name(col::ERROR_KIND)
            .map(|k| k.as_string::<i32>().clone());
        for i in 0..batch.num_rows() {
            if st.value(i) == "failed" {
                let k = kinds
                    .as_ref()
                    .filter(|k| k.is_valid(i))
                    .map_or("unknown", |k| k.value(i));
                counters.error_kind(k);
            }
        }
    }
}

/// The error type a stage's batch function returns.
pub type StageError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One stage of the pipeline (see the module's stage contract).
pub trait Stage: Send + Sync + 'static {
    /// The name recorded in the shards it processed.
    fn name(&self) -> String;

    /// Whether `entry` needs this stage (default: it does not list the stage yet).
    fn needs(&self, entry: &ShardEntry) -> bool {
        let name = self.name();
        !entry.applied.iter().any(|s| *s == name)
    }

    /// The columns this stage sets for `batch` (whole rows): a batch of the same rows, in the same
    /// order, with `key` and the columns it sets; what it did goes into `counters`.
    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError>;
}

/// What a [`run_stage`] run did: the shards and rows, and the stage's counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageRun {
    pub stage: String,
    pub map: MapReport,
    pub counters: StageCounters,
}

/// Runs `stage` over the selected shards of `ds` that need it (see the stage contract).
/// `on_shard` is told after each commit.
pub async fn run_stage(
    ds: &Dataset,
    stage: Arc<dyn Stage>,
    selection: impl Into<ShardSelection>,
    writer: ShardWriterOptions,
    on_shard: impl FnMut(&ShardEntry, u64),
) -> Result<StageRun> {
    let name = stage.name();
    let counters = Arc::new(std::sync::Mutex::new(StageCounters::new(&name)));
    let needs = {
        let stage = stage.clone();
        move |e: &ShardEntry| stage.needs(e)
    };
    let run = {
        let counters = counters.clone();
        let name = name.clone();
        move |batch: RecordBatch| {
            let (stage, counters, name) = (stage.clone(), counters.clone(), name.clone());
            async move {
                let done = tokio::task::spawn_blocking(move || {
                    let mut local = StageCounters::new(&name);
                    let out = stage.process(&batch, &mut local);
                    (out, local)
                })
                .await;
                let (out, local) = done.map_err(|e| CatalogError::External {
                    context: "stage task".into(),
                    source: Box::new(e),
                })?;
                counters.lock().expect("counters").merge(&local);
                out.map_err(|source| CatalogError::External {
                    context: format!("stage {}", local.stage),
                    source,
                })
            }
        }
    };
    let map = map_shards_where(ds, &name, selection, writer, needs, run, on_shard).await?;
    let counters = counters.lock().expect("counters").clone();
    Ok(StageRun {
        stage: name,
        map,
        counters,
    })
}
