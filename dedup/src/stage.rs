//! Dedup as catalog stages, and the whole run ([`dedup_dataset`]).
//!
//! Invariants enforced here:
//! - `phash` is computed once per row, from the row's largest stored rendition, by the stage
//!   [`HASH_STAGE`]; a row without an image, or whose image does not decode, keeps a null `phash`
//!   and is counted under `errors`.
//! - `semantic_cluster` comes from the stage `dedup-cluster-<centroids digest>`, run on shards
//!   the filters scored (they hold `clip_embedding`), again when a shard is re-scored; centroids
//!   are trained once per dataset and stored at [`centroids_path`], so shards that arrive later
//!   are assigned to the same clusters. `--retrain` (or a stored set of another dimension) trains
//!   anew, which re-assigns every shard.
//! - Verdicts are written by the stage `dedup-apply-<digest>`, the digest covering the config and
//!   every verdict, so the same verdicts are never written twice and any change rewrites the
//!   shards. It sets `duplicate_of` and `dup_kind` of the rows the grouping marked, clears them on
//!   rows it marked before and no longer does, and leaves ingest's `url`/`content` duplicates and
//!   every other column alone. It never changes `status`: consumers skip rows whose `dup_kind` is
//!   set (the training loader and `export` by default).
//! - A dry run computes hashes, clusters and groups and writes no verdict.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray,
};
use llamagen_catalog::arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::schema::col;
use llamagen_catalog::stage::{ShardSelection, Stage, StageError, StageRun, run_stage};
use llamagen_catalog::{Dataset, ShardEntry, ShardWriterOptions, StageCounters, Storage};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{DedupError, Result};
use crate::group::{DedupConfig, DupKind, Grouping, PARTICIPANTS, Verdict, find_groups};
use crate::kmeans::{Centroids, normalise};
use crate::phash::{DEFAULT_MAX_PIXELS, phash_bytes_limited};

/// Name of the hashing stage.
pub const HASH_STAGE: &str = "dedup-phash-v1";
/// Prefix of the cluster assignment stage.
pub const CLUSTER_STAGE_PREFIX: &str = "dedup-cluster-";
/// Prefix of the verdict stage.
pub const APPLY_STAGE_PREFIX: &str = "dedup-apply-";

fn key_column(batch: &RecordBatch) -> std::result::Result<ArrayRef, StageError> {
    Ok(batch
        .column_by_name(col::KEY)
        .ok_or("the batch has no key column")?
        .clone())
}

fn out_batch(
    fields: Vec<(&str, DataType, ArrayRef)>,
) -> std::result::Result<RecordBatch, StageError> {
    let schema = Schema::new(
        fields
            .iter()
            .map(|(n, t, _)| Field::new(*n, t.clone(), *n != col::KEY))
            .collect::<Vec<_>>(),
    );
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        fields.into_iter().map(|(_, _, a)| a).collect(),
    )?)
}

/// Computes `phash` (see the module invariants).
pub struct HashStage {
    pub max_pixels: u64,
}

impl Default for HashStage {
    fn default() -> Self {
        HashStage {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl Stage for HashStage {
    fn name(&self) -> String {
        HASH_STAGE.into()
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        let images = llamagen_filters::stage::largest_images(batch)?;
        let hashes: Vec<Option<std::result::Result<u64, String>>> = images
            .par_iter()
            .map(|img| {
                img.map(|b| phash_bytes_limited(b, self.max_pixels).map_err(|e| e.to_string()))
            })
            .collect();
        counters.received += batch.num_rows() as u64;
        counters.written += batch.num_rows() as u64;
        let mut hashed = 0;
        let values: Int64Array = hashes
            .iter()
            .map(|h| match h {
                Some(Ok(v)) => {
                    hashed += 1;
                    Some(*v as i64)
                }
                Some(Err(_)) => {
                    counters.error_kind("phash_decode");
                    None
                }
                None => None,
            })
            .collect();
        counters.add_extra("hashed", hashed);
        out_batch(vec![
            (col::KEY, DataType::Utf8, key_column(batch)?),
            (col::PHASH, DataType::Int64, Arc::new(values)),
        ])
    }
}

/// Assigns `semantic_cluster` from stored centroids.
pub struct ClusterStage {
    pub centroids: Arc<Centroids>,
}

impl Stage for ClusterStage {
    fn name(&self) -> String {
        format!("{CLUSTER_STAGE_PREFIX}{}", self.centroids.digest())
    }

    fn needs(&self, entry: &ShardEntry) -> bool {
        // Only scored shards (their embeddings exist), and again when the shard was clustered
        // with other centroids or re-scored since.
        let last = |prefix: &str| entry.applied.iter().rposition(|s| s.starts_with(prefix));
        let Some(scored) = last(llamagen_filters::stage::SCORE_STAGE_PREFIX) else {
            return false;
        };
        match last(CLUSTER_STAGE_PREFIX) {
            None => true,
            Some(c) => entry.applied[c] != self.name() || c < scored,
        }
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        counters.received += batch.num_rows() as u64;
        counters.written += batch.num_rows() as u64;
        let n = batch.num_rows();
        let ids: Int32Array = match batch.column_by_name(col::CLIP_EMBEDDING) {
            None => Int32Array::from(vec![None; n]),
            Some(c) => {
                let s = c.as_struct();
                (0..n)
                    .into_par_iter()
                    .map(|i| {
                        let mut v = crate::group::embedding_values(s, i)?;
                        if v.len() != self.centroids.dim {
                            return None;
                        }
                        normalise(&mut v);
                        Some(self.centroids.assign(&v) as i32)
                    })
                    .collect::<Vec<_>>()
                    .into()
            }
        };
        counters.add_extra("clustered", (n - ids.null_count()) as u64);
        out_batch(vec![
            (col::KEY, DataType::Utf8, key_column(batch)?),
            (col::SEMANTIC_CLUSTER, DataType::Int32, Arc::new(ids)),
        ])
    }
}

/// Writes the verdicts of a grouping (see the module invariants).
pub struct ApplyStage {
    pub name: String,
    pub verdicts: Arc<HashMap<String, Verdict>>,
}

impl ApplyStage {
    /// The stage for `verdicts` found with `cfg`: its name digests both.
    pub fn new(cfg: &DedupConfig, verdicts: Arc<HashMap<String, Verdict>>) -> ApplyStage {
        // Order-independent digest: the wrapping sum of each verdict's own hash.
        let mut sum = 0u128;
        for (k, v) in verdicts.iter() {
            let d = Sha256::digest(format!("{k}\0{}\0{}", v.duplicate_of, v.kind.as_str()));
            sum = sum.wrapping_add(u128::from_le_bytes(d[..16].try_into().expect("16 bytes")));
        }
        let d = Sha256::digest(format!(
            "{}|{}|{sum:x}",
            serde_json::to_string(cfg).expect("serialisable"),
            verdicts.len()
        ));
        ApplyStage {
            name: format!("{APPLY_STAGE_PREFIX}{}", hex::encode(&d[..6])),
            verdicts,
        }
    }
}

impl Stage for ApplyStage {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn needs(&self, entry: &ShardEntry) -> bool {
        let name = self.name();
        entry
            .applied
            .iter()
            .rev()
            .find(|s| s.starts_with(APPLY_STAGE_PREFIX))
            .is_none_or(|s| *s != name)
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        let n = batch.num_rows();
        counters.received += n as u64;
        counters.written += n as u64;
        // Utf8 whatever string type the reader handed over (views, large strings).
        let text = |name: &str| -> std::result::Result<Option<StringArray>, StageError> {
            batch
                .column_by_name(name)
                .map(|c| {
                    llamagen_catalog::arrow::compute::cast(c, &DataType::Utf8)
                        .map(|a| a.as_string::<i32>().clone())
                })
                .transpose()
                .map_err(Into::into)
        };
        let keys = text(col::KEY)?.ok_or("the batch has no key column")?;
        let status = text(col::STATUS)?.ok_or("the batch has no status column")?;
        let old_of = text(col::DUPLICATE_OF)?;
        let old_kind = text(col::DUP_KIND)?;
        let get = |a: &Option<StringArray>, i: usize| {
            a.as_ref()
                .filter(|a| a.is_valid(i))
                .map(|a| a.value(i).to_string())
        };
        let mut of = Vec::with_capacity(n);
        let mut kind = Vec::with_capacity(n);
        for i in 0..n {
            let prev_kind = get(&old_kind, i);
            let ours = prev_kind.as_deref().and_then(DupKind::parse).is_some();
            match self.verdicts.get(keys.value(i)) {
                Some(v) if status.value(i) == "ok" => {
                    counters.add_extra(&format!("duplicate_{}", v.kind.as_str()), 1);
                    of.push(Some(v.duplicate_of.clone()));
                    kind.push(Some(v.kind.as_str().to_string()));
                }
                _ if ours => {
                    counters.add_extra("cleared", 1);
                    of.push(None);
                    kind.push(None);
                }
                _ => {
                    of.push(get(&old_of, i));
                    kind.push(prev_kind);
                }
            }
        }
        out_batch(vec![
            (col::KEY, DataType::Utf8, Arc::new(keys.clone())),
            (
                col::DUPLICATE_OF,
                DataType::Utf8,
                Arc::new(StringArray::from(of)),
            ),
            (
                col::DUP_KIND,
                DataType::Utf8,
                Arc::new(StringArray::from(kind)),
            ),
        ])
    }
}

/// Where a dataset's k-means centroids are stored, relative to the catalog root.
pub fn centroids_path(dataset: &str) -> String {
    format!("_dedup/{dataset}/centroids.json")
}

/// What [`dedup_dataset`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DedupReport {
    pub dataset: String,
    pub dry_run: bool,
    pub hash: StageRun,
    pub cluster: Option<StageRun>,
    /// Whether the centroids were trained in this run (false: loaded from the catalog).
    pub centroids_trained: bool,
    pub grouping: Grouping,
    pub apply: Option<StageRun>,
}

/// Options of a run beyond the thresholds.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Report, write no verdict.
    pub dry_run: bool,
    /// Train new centroids even if stored ones exist.
    pub retrain: bool,
    /// The SQL session's memory limit (None: the catalog's default).
    pub memory_limit: Option<usize>,
    /// Stages a shard must carry before clusters are assigned to it (the stage that writes
    /// `clip_embedding`), so a shard is never clustered before its embeddings exist.
    pub cluster_requires: Vec<String>,
}

fn catalog_err(e: llamagen_catalog::CatalogError) -> DedupError {
    DedupError::from_catalog(e)
}

/// Hashes, clusters, groups and (unless a dry run) writes verdicts for `dataset` of the catalog
/// in `storage` (see the module invariants). `on_shard(stage, rows)` follows each commit.
pub async fn dedup_dataset(
    storage: Arc<dyn Storage>,
    dataset: &str,
    cfg: &DedupConfig,
    opts: &RunOptions,
    mut on_shard: impl FnMut(&str, u64),
) -> Result<DedupReport> {
    cfg.check()?;
    let ds = Dataset::new(storage.clone(), dataset);
    let hash = run_stage(
        &ds,
        Arc::new(HashStage::default()),
        ShardSelection::default(),
        ShardWriterOptions::default(),
        |_e: &ShardEntry, rows| on_shard(HASH_STAGE, rows),
    )
    .await
    .map_err(catalog_err)?;
    let session = || async {
        llamagen_catalog::sql::session_with(
            storage.clone(),
            dataset,
            &llamagen_catalog::sql::SessionOptions {
                memory_limit: opts.memory_limit,
                ..Default::default()
            },
        )
        .await
        .map_err(catalog_err)
    };
    let mut cluster = None;
    let mut centroids_trained = false;
    if cfg.cosine.is_some() {
        let ctx = session().await?;
        if let Some((c, trained)) = centroids(&ctx, storage.as_ref(), dataset, cfg, opts).await? {
            centroids_trained = trained;
            let stage = Arc::new(ClusterStage {
                centroids: Arc::new(c),
            });
            let name = stage.name();
            cluster = Some(
                run_stage(
                    &ds,
                    stage,
                    ShardSelection {
                        partition: (0, 1),
                        requires: opts.cluster_requires.clone(),
                    },
                    ShardWriterOptions::default(),
                    |_e: &ShardEntry, rows| on_shard(&name, rows),
                )
                .await
                .map_err(catalog_err)?,
            );
        }
    }
    let ctx = session().await?;
    let grouping = find_groups(&ctx, cfg).await?;
    let apply = if opts.dry_run {
        None
    } else {
        let stage = Arc::new(ApplyStage::new(cfg, Arc::new(grouping.verdicts.clone())));
        let name = stage.name();
        Some(
            run_stage(
                &ds,
                stage,
                ShardSelection::default(),
                ShardWriterOptions::default(),
                |_e: &ShardEntry, rows| on_shard(&name, rows),
            )
            .await
            .map_err(catalog_err)?,
        )
    };
    Ok(DedupReport {
        dataset: dataset.into(),
        dry_run: opts.dry_run,
        hash,
        cluster,
        centroids_trained,
        grouping,
        apply,
    })
}

/// The stored centroids, or new ones trained on a stable sample (None: no row has an embedding).
async fn centroids(
    ctx: &llamagen_catalog::datafusion::prelude::SessionContext,
    storage: &dyn Storage,
    dataset: &str,
    cfg: &DedupConfig,
    opts: &RunOptions,
) -> Result<Option<(Centroids, bool)>> {
    let path = centroids_path(dataset);
    let stored: Option<Centroids> = if opts.retrain {
        None
    } else {
        match storage.get(&path).await {
            Ok(b) => Some(
                serde_json::from_slice(&b).map_err(|e| DedupError::External {
                    context: format!("reading {path}"),
                    source: Box::new(e),
                })?,
            ),
            Err(llamagen_catalog::CatalogError::NotFound { .. }) => None,
            Err(e) => return Err(catalog_err(e)),
        }
    };
    // The sample: the rows with the smallest key hashes (stable as shards arrive).
    let has = ctx
        .table("samples")
        .await
        .map(|t| {
            t.schema()
                .field_with_unqualified_name(col::CLIP_EMBEDDING)
                .is_ok()
        })
        .unwrap_or(false);
    if !has {
        return Ok(None);
    }
    let sql = format!(
        "SELECT {k} AS key, {e} AS emb FROM samples WHERE {PARTICIPANTS} AND {e} IS NOT NULL",
        k = col::KEY,
        e = col::CLIP_EMBEDDING
    );
    let df = ctx
        .sql_with_options(&sql, llamagen_catalog::sql::read_only())
        .await
        .map_err(|e| DedupError::External {
            context: sql.clone(),
            source: Box::new(e),
        })?;
    let mut s = df
        .execute_stream()
        .await
        .map_err(|e| DedupError::External {
            context: sql.clone(),
            source: Box::new(e),
        })?;
    // Bottom-k by key hash: the heap holds (hash, key), `chosen` their embeddings.
    let mut heap: std::collections::BinaryHeap<(u64, String)> = Default::default();
    let mut chosen: HashMap<String, Vec<f32>> = HashMap::new();
    let mut rows = 0usize;
    let mut dim = None;
    while let Some(b) = s.next().await {
        let b = b.map_err(|e| DedupError::External {
            context: "embedding sample".into(),
            source: Box::new(e),
        })?;
        let keys =
            llamagen_catalog::arrow::compute::cast(b.column(0), &DataType::Utf8).map_err(|e| {
                DedupError::External {
                    context: "embedding sample".into(),
                    source: Box::new(e),
                }
            })?;
        let keys = keys.as_string::<i32>();
        let embs = b.column(1).as_struct();
        for i in 0..b.num_rows() {
            let Some(mut v) = crate::group::embedding_values(embs, i) else {
                continue;
            };
            if *dim.get_or_insert(v.len()) != v.len() {
                return Err(DedupError::Config(format!(
                    "row {:?}: clip_embedding has {} values where other rows have {}",
                    keys.value(i),
                    v.len(),
                    dim.unwrap_or(0)
                )));
            }
            rows += 1;
            if let Some(c) = &stored {
                if c.dim == v.len() {
                    continue; // only counting and checking
                }
            }
            let h = u64::from_le_bytes(
                Sha256::digest(keys.value(i).as_bytes())[..8]
                    .try_into()
                    .expect("8 bytes"),
            );
            if heap.len() < cfg.sample || heap.peek().is_some_and(|t| h < t.0) {
                normalise(&mut v);
                heap.push((h, keys.value(i).to_string()));
                chosen.insert(keys.value(i).to_string(), v);
                if heap.len() > cfg.sample {
                    if let Some((_, k)) = heap.pop() {
                        chosen.remove(&k);
                    }
                }
            }
        }
    }
    if rows == 0 {
        return Ok(None);
    }
    if let Some(c) = stored {
        if Some(c.dim) == dim {
            return Ok(Some((c, false)));
        }
    }
    // Sorted by (hash, key): the order k-means++ sees does not depend on the scan order.
    let points: Vec<Vec<f32>> = heap
        .into_sorted_vec()
        .into_iter()
        .filter_map(|(_, k)| chosen.remove(&k))
        .collect();
    let k = cfg
        .clusters
        .unwrap_or_else(|| rows.div_ceil(crate::group::ROWS_PER_CLUSTER))
        .max(1);
    let (iterations, seed) = (cfg.iterations, cfg.seed);
    let c = tokio::task::spawn_blocking(move || Centroids::train(&points, k, iterations, seed))
        .await
        .map_err(|e| DedupError::External {
            context: "k-means".into(),
            source: Box::new(e),
        })?;
    let json = serde_json::to_vec(&c).expect("serialisable");
    storage
        .put(&path, bytes::Bytes::from(json))
        .await
        .map_err(catalog_err)?;
    Ok(Some((c, true)))
}
