//! Finding duplicate groups over a whole catalog, by SQL, and choosing the sample each keeps.
//!
//! Invariants enforced here:
//! - Only rows with status `ok` take part (ingest's own `url`/`content` duplicates are dropped
//!   rows already); a row's dedup verdict never changes its status, so re-grouping with other
//!   thresholds sees the same rows and undoes nothing by hand.
//! - Three kinds of link, each found without an all-pairs scan:
//!   - `exact`: equal `content_sha256` (`GROUP BY content_sha256`);
//!   - `perceptual`: `phash` within [`DedupConfig::hamming`] bits, candidates from the banded LSH
//!     of [`crate::lsh`] (per band: the buckets of `GROUP BY phash & mask HAVING count(*) > 1`,
//!     then the rows of those buckets), every candidate verified by its exact distance: all
//!     pairs within the threshold are found;
//!   - `semantic`: cosine of `clip_embedding` at least [`DedupConfig::cosine`] between rows of
//!     the same `semantic_cluster` (one query ordered by cluster, one cluster in memory at a time).
//! - Groups are the connected components of all links. Each group keeps one row, the first by
//!   [`DedupConfig::keep`] (by default: highest `score_aesthetic`, then most original pixels, then
//!   the smallest key; nulls last); every other row gets `duplicate_of` = the kept key and
//!   `dup_kind` = the strongest kind (exact > perceptual > semantic) among its own links.
//! - Memory holds the rows that have a link (and one band's buckets or one cluster at a time),
//!   never the whole dataset.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray,
};
use llamagen_catalog::arrow::datatypes::{
    DataType, Field, Float32Type, Int32Type, Int64Type, Schema,
};
use llamagen_catalog::datafusion::datasource::MemTable;
use llamagen_catalog::datafusion::prelude::SessionContext;
use llamagen_catalog::schema::col;
use serde::{Deserialize, Serialize};

use crate::error::{DedupError, Result};
use crate::kmeans::dot;
use crate::lsh::{band_masks, default_blocks};

/// Why a row is a duplicate, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DupKind {
    Exact,
    Perceptual,
    Semantic,
}

impl DupKind {
    pub const ALL: [DupKind; 3] = [DupKind::Exact, DupKind::Perceptual, DupKind::Semantic];

    /// The value stored in `dup_kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            DupKind::Exact => "exact",
            DupKind::Perceptual => "perceptual",
            DupKind::Semantic => "semantic",
        }
    }

    pub fn parse(s: &str) -> Option<DupKind> {
        DupKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One ordering criterion of the keep rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepBy {
    /// Highest `score_aesthetic` first.
    Aesthetic,
    /// Most original pixels (`orig_width · orig_height`) first.
    Pixels,
    /// Most content bytes first.
    Bytes,
    /// Smallest key first (always the last tie-break).
    Key,
}

impl KeepBy {
    pub fn parse(s: &str) -> Option<KeepBy> {
        match s {
            "aesthetic" => Some(KeepBy::Aesthetic),
            "pixels" => Some(KeepBy::Pixels),
            "bytes" => Some(KeepBy::Bytes),
            "key" => Some(KeepBy::Key),
            _ => None,
        }
    }
}

/// What dedup looks for and which row of a group it keeps (`[dedup]` in a pipeline config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Link rows with equal content bytes.
    pub exact: bool,
    /// Link rows whose pHashes are within `hamming` bits (None: no perceptual links).
    pub hamming: Option<u32>,
    /// LSH blocks for the perceptual search (None: [`default_blocks`] of `hamming`).
    pub blocks: Option<u32>,
    /// Link rows of the same cluster whose CLIP embeddings have at least this cosine (None: no
    /// semantic links).
    pub cosine: Option<f32>,
    /// k-means clusters (None: one per [`ROWS_PER_CLUSTER`] rows with an embedding).
    pub clusters: Option<usize>,
    /// Rows k-means trains on (the rows with the smallest key hashes, so the sample is stable).
    pub sample: usize,
    /// Lloyd iterations at most.
    pub iterations: usize,
    /// Seed of the k-means++ initialisation.
    pub seed: u64,
    /// Keep rule: `aesthetic`, `pixels`, `bytes`, `key`, in order of precedence.
    pub keep: Vec<String>,
}

/// Default rows per k-means cluster (SemDeDup: 50,000 clusters for 440 million rows).
pub const ROWS_PER_CLUSTER: usize = 10_000;
/// Default Hamming threshold: the search is exact and cheap up to here (35 bands of 27-bit keys).
pub const DEFAULT_HAMMING: u32 = 4;
/// Default cosine threshold (SemDeDup's ε = 0.05).
pub const DEFAULT_COSINE: f32 = 0.95;

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            exact: true,
            hamming: Some(DEFAULT_HAMMING),
            blocks: None,
            cosine: Some(DEFAULT_COSINE),
            clusters: None,
            sample: 100_000,
            iterations: 20,
            seed: 0,
            keep: vec!["aesthetic".into(), "pixels".into(), "key".into()],
        }
    }
}

impl DedupConfig {
    /// The keep rule, checked (`key` appended as the final tie-break).
    pub fn keep_rule(&self) -> Result<Vec<KeepBy>> {
        let mut rule = self
            .keep
            .iter()
            .map(|s| {
                KeepBy::parse(s).ok_or_else(|| {
                    DedupError::Config(format!(
                        "keep: unknown criterion {s:?} (aesthetic, pixels, bytes, key)"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if !rule.contains(&KeepBy::Key) {
            rule.push(KeepBy::Key);
        }
        Ok(rule)
    }

    /// The LSH band masks of the perceptual search (empty when it is off).
    pub fn band_masks(&self) -> Result<Vec<u64>> {
        match self.hamming {
            None => Ok(Vec::new()),
            Some(t) => band_masks(t, self.blocks.unwrap_or_else(|| default_blocks(t))),
        }
    }

    /// Checks every value (thresholds, keep rule, bands).
    pub fn check(&self) -> Result<()> {
        self.keep_rule()?;
        self.band_masks()?;
        if let Some(c) = self.cosine {
            if !(-1.0..=1.0).contains(&c) {
                return Err(DedupError::Config(format!(
                    "cosine = {c} is outside [-1, 1]"
                )));
            }
        }
        if self.sample == 0 {
            return Err(DedupError::Config("sample = 0".into()));
        }
        Ok(())
    }
}

/// The verdict for one duplicate row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub duplicate_of: String,
    pub kind: DupKind,
}

/// What a grouping found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Grouping {
    /// Rows taking part (status `ok`).
    pub rows: u64,
    /// Duplicate rows (not kept) by key.
    #[serde(skip)]
    pub verdicts: HashMap<String, Verdict>,
    /// Groups (connected components with two rows or more).
    pub groups: u64,
    /// Duplicates by kind.
    pub duplicates: BTreeMap<String, u64>,
    /// Verified links by kind (a pair found by several bands counts once).
    pub links: BTreeMap<String, u64>,
    /// Hamming distance of each perceptual link: `hamming_histogram[d]` pairs at distance d.
    pub hamming_histogram: Vec<u64>,
    /// Cosines of the semantic links (for the report's histogram).
    #[serde(skip)]
    pub cosines: Vec<f32>,
    /// LSH bands queried and candidate pairs verified.
    pub bands: u64,
    pub candidate_pairs: u64,
    /// k-means clusters used (0 when semantic dedup is off or nothing has an embedding).
    pub clusters: u64,
    /// Seconds per step.
    pub seconds: BTreeMap<String, f64>,
}

/// Rows that take part in grouping.
pub const PARTICIPANTS: &str = "status = 'ok'";

/// Union-find over the keys that have a link.
#[derive(Default)]
struct Links {
    ids: HashMap<String, u32>,
    keys: Vec<String>,
    parent: Vec<u32>,
    kind: Vec<DupKind>,
}

impl Links {
    fn id(&mut self, key: &str, kind: DupKind) -> u32 {
        if let Some(&i) = self.ids.get(key) {
            let k = &mut self.kind[i as usize];
            *k = (*k).min(kind);
            return i;
        }
        let i = self.keys.len() as u32;
        self.ids.insert(key.to_string(), i);
        self.keys.push(key.to_string());
        self.parent.push(i);
        self.kind.push(kind);
        i
    }

    fn find(&mut self, mut i: u32) -> u32 {
        while self.parent[i as usize] != i {
            let g = self.parent[self.parent[i as usize] as usize];
            self.parent[i as usize] = g;
            i = g;
        }
        i
    }

    fn link(&mut self, a: &str, b: &str, kind: DupKind) {
        let (a, b) = (self.id(a, kind), self.id(b, kind));
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb) as usize] = ra.min(rb);
        }
    }
}

fn ext(context: &str, e: impl std::error::Error + Send + Sync + 'static) -> DedupError {
    DedupError::External {
        context: context.into(),
        source: Box::new(e),
    }
}

async fn stream(
    ctx: &SessionContext,
    sql: &str,
) -> Result<llamagen_catalog::datafusion::physical_plan::SendableRecordBatchStream> {
    let df = ctx
        .sql_with_options(sql, llamagen_catalog::sql::read_only())
        .await
        .map_err(|e| ext(sql, e))?;
    df.execute_stream().await.map_err(|e| ext(sql, e))
}

/// A string array as Utf8 (DataFusion may hand back string views).
fn utf8(a: &ArrayRef) -> Result<StringArray> {
    let c = llamagen_catalog::arrow::compute::cast(a, &DataType::Utf8)
        .map_err(|e| ext("reading keys", e))?;
    Ok(c.as_string::<i32>().clone())
}

fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    b.column_by_name(name)
        .ok_or_else(|| DedupError::Config(format!("query result has no column {name:?}")))
}

/// Whether the session's `samples` table has column `name`.
async fn has_column(ctx: &SessionContext, name: &str) -> bool {
    ctx.table("samples")
        .await
        .map(|t| t.schema().field_with_unqualified_name(name).is_ok())
        .unwrap_or(false)
}

/// Groups the `samples` of `ctx` (a catalog session) as `cfg` says (see the module invariants).
pub async fn find_groups(ctx: &SessionContext, cfg: &DedupConfig) -> Result<Grouping> {
    cfg.check()?;
    let mut out = Grouping::default();
    let mut links = Links::default();
    let t0 = Instant::now();
    {
        let mut s = stream(
            ctx,
            &format!("SELECT count(*) AS n FROM samples WHERE {PARTICIPANTS}"),
        )
        .await?;
        while let Some(b) = s.next().await {
            let b = b.map_err(|e| ext("count", e))?;
            out.rows += column(&b, "n")?.as_primitive::<Int64Type>().value(0) as u64;
        }
    }
    if cfg.exact {
        let sql = format!(
            "SELECT array_agg({k}) AS keys FROM samples WHERE {PARTICIPANTS} AND {sha} IS NOT NULL \
             GROUP BY {sha} HAVING count(*) > 1",
            k = col::KEY,
            sha = col::CONTENT_SHA256
        );
        let mut s = stream(ctx, &sql).await?;
        while let Some(b) = s.next().await {
            let b = b.map_err(|e| ext("exact groups", e))?;
            let lists = column(&b, "keys")?.as_list::<i32>();
            for i in 0..lists.len() {
                let keys = utf8(&lists.value(i))?;
                for j in 1..keys.len() {
                    links.link(keys.value(0), keys.value(j), DupKind::Exact);
                }
                // Every pair of equal bytes is a link (as for the other kinds).
                let n = keys.len() as u64;
                *out.links.entry("exact".into()).or_default() += n * (n - 1) / 2;
            }
        }
        out.seconds
            .insert("exact".into(), t0.elapsed().as_secs_f64());
    }
    if let Some(t) = cfg.hamming {
        let t1 = Instant::now();
        let masks = cfg.band_masks()?;
        out.hamming_histogram = vec![0; t as usize + 1];
        for (j, &m) in masks.iter().enumerate() {
            out.bands += 1;
            // Bucket keys with more than one row (a count-only aggregation), then the rows of
            // those buckets only, sorted by bucket.
            let sql = format!(
                "WITH c AS (SELECT {k} AS key, {p} AS phash, {p} & ({mask}) AS band FROM samples \
                 WHERE {PARTICIPANTS} AND {p} IS NOT NULL) \
                 SELECT c.band, c.key, c.phash FROM c \
                 JOIN (SELECT band FROM c GROUP BY band HAVING count(*) > 1) d ON c.band = d.band \
                 ORDER BY c.band",
                k = col::KEY,
                p = col::PHASH,
                mask = m as i64
            );
            let mut s = stream(ctx, &sql).await?;
            let mut cur: Option<i64> = None;
            let (mut bk, mut bh): (Vec<String>, Vec<i64>) = (Vec::new(), Vec::new());
            let flush =
                |bk: &mut Vec<String>, bh: &mut Vec<i64>, links: &mut Links, out: &mut Grouping| {
                    if bk.len() > 1 {
                        let ks = StringArray::from_iter_values(bk.iter());
                        bucket_pairs(&ks, bh, t, &masks[..j], links, out);
                    }
                    bk.clear();
                    bh.clear();
                };
            while let Some(b) = s.next().await {
                let b = b.map_err(|e| ext("perceptual bands", e))?;
                let band = column(&b, "band")?.as_primitive::<Int64Type>().clone();
                let keys = utf8(column(&b, "key")?)?;
                let hs = column(&b, "phash")?.as_primitive::<Int64Type>().clone();
                for i in 0..b.num_rows() {
                    if cur != Some(band.value(i)) {
                        flush(&mut bk, &mut bh, &mut links, &mut out);
                        cur = Some(band.value(i));
                    }
                    bk.push(keys.value(i).to_string());
                    bh.push(hs.value(i));
                }
            }
            flush(&mut bk, &mut bh, &mut links, &mut out);
        }
        out.seconds
            .insert("perceptual".into(), t1.elapsed().as_secs_f64());
    }
    if let Some(cos) = cfg.cosine {
        if has_column(ctx, col::SEMANTIC_CLUSTER).await {
            let t2 = Instant::now();
            semantic_links(ctx, cos, &mut links, &mut out).await?;
            out.seconds
                .insert("semantic".into(), t2.elapsed().as_secs_f64());
        }
    }
    let t3 = Instant::now();
    choose(ctx, cfg, links, &mut out).await?;
    out.seconds
        .insert("keep".into(), t3.elapsed().as_secs_f64());
    out.seconds
        .insert("total".into(), t0.elapsed().as_secs_f64());
    Ok(out)
}

/// Verifies the pairs of one LSH bucket. A pair is counted by the first band it collides in
/// (`earlier` holds the masks before this one), so each link is counted once; identical hashes
/// are linked in a chain, not pairwise.
fn bucket_pairs(
    keys: &StringArray,
    hashes: &[i64],
    t: u32,
    earlier: &[u64],
    links: &mut Links,
    out: &mut Grouping,
) {
    // Identical hashes first: one representative per distinct value.
    let mut by_hash: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, h) in hashes.iter().enumerate() {
        by_hash.entry(*h as u64).or_default().push(i);
    }
    for rows in by_hash.values() {
        // Identical hashes collide in every band: count them in the first only.
        if earlier.is_empty() {
            for w in rows.windows(2) {
                links.link(keys.value(w[0]), keys.value(w[1]), DupKind::Perceptual);
            }
            let n = rows.len() as u64;
            out.hamming_histogram[0] += n * (n - 1) / 2;
            *out.links.entry("perceptual".into()).or_default() += n * (n - 1) / 2;
        }
    }
    let distinct: Vec<(u64, usize)> = by_hash.iter().map(|(&h, r)| (h, r[0])).collect();
    for a in 0..distinct.len() {
        for b in a + 1..distinct.len() {
            out.candidate_pairs += 1;
            let (ha, hb) = (distinct[a].0, distinct[b].0);
            if earlier.iter().any(|m| ha & m == hb & m) {
                continue;
            }
            let d = (ha ^ hb).count_ones();
            if d <= t {
                links.link(
                    keys.value(distinct[a].1),
                    keys.value(distinct[b].1),
                    DupKind::Perceptual,
                );
                let pairs = (by_hash[&ha].len() * by_hash[&hb].len()) as u64;
                out.hamming_histogram[d as usize] += pairs;
                *out.links.entry("perceptual".into()).or_default() += pairs;
            }
        }
    }
}

/// The f32 values of an `embedding_fields` struct value (f16, f32 or bf16 data).
pub fn embedding_values(
    s: &llamagen_catalog::arrow::array::StructArray,
    i: usize,
) -> Option<Vec<f32>> {
    if s.is_null(i) {
        return None;
    }
    let dtype = s.column_by_name("dtype")?;
    let dtype = match dtype.as_string_opt::<i32>() {
        Some(a) => a.value(i),
        None => dtype.as_string_view_opt()?.value(i),
    };
    let data = s.column_by_name("data")?.as_binary::<i32>().value(i);
    match dtype {
        "f16" => Some(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        "bf16" => Some(
            data.chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        "f32" => Some(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        _ => None,
    }
}

async fn semantic_links(
    ctx: &SessionContext,
    cos: f32,
    links: &mut Links,
    out: &mut Grouping,
) -> Result<()> {
    let sql = format!(
        "SELECT {c} AS cluster, {k} AS key, {e} AS emb FROM samples \
         WHERE {PARTICIPANTS} AND {c} IS NOT NULL AND {e} IS NOT NULL ORDER BY {c}",
        c = col::SEMANTIC_CLUSTER,
        k = col::KEY,
        e = col::CLIP_EMBEDDING
    );
    let mut s = stream(ctx, &sql).await?;
    let mut current: Option<i32> = None;
    let mut members: Vec<(String, Vec<f32>)> = Vec::new();
    let mut clusters = 0u64;
    let flush = |members: &mut Vec<(String, Vec<f32>)>, links: &mut Links, out: &mut Grouping| {
        for a in 0..members.len() {
            for b in a + 1..members.len() {
                let c = dot(&members[a].1, &members[b].1);
                if c >= cos {
                    links.link(&members[a].0, &members[b].0, DupKind::Semantic);
                    out.cosines.push(c);
                    *out.links.entry("semantic".into()).or_default() += 1;
                }
            }
        }
        members.clear();
    };
    while let Some(b) = s.next().await {
        let b = b.map_err(|e| ext("semantic clusters", e))?;
        let cl = column(&b, "cluster")?.as_primitive::<Int32Type>().clone();
        let keys = utf8(column(&b, "key")?)?;
        let embs = column(&b, "emb")?.as_struct().clone();
        for i in 0..b.num_rows() {
            let c = cl.value(i);
            if current != Some(c) {
                flush(&mut members, links, out);
                current = Some(c);
                clusters += 1;
            }
            if let Some(mut v) = embedding_values(&embs, i) {
                crate::kmeans::normalise(&mut v);
                members.push((keys.value(i).to_string(), v));
            }
        }
    }
    flush(&mut members, links, out);
    out.clusters = clusters;
    Ok(())
}

/// Applies the keep rule to every group: reads the rule's columns for the linked rows only.
async fn choose(
    ctx: &SessionContext,
    cfg: &DedupConfig,
    mut links: Links,
    out: &mut Grouping,
) -> Result<()> {
    if links.keys.is_empty() {
        return Ok(());
    }
    let rule = cfg.keep_rule()?;
    let members = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("key", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from_iter_values(links.keys.iter()))],
    )
    .map_err(|e| ext("linked keys", e))?;
    let table = MemTable::try_new(members.schema(), vec![vec![members]])
        .map_err(|e| ext("linked keys", e))?;
    let name = "llamagen_dedup_linked";
    let _ = ctx.deregister_table(name);
    ctx.register_table(name, Arc::new(table))
        .map_err(|e| ext("linked keys", e))?;
    let sql = format!(
        "SELECT s.{k} AS key, CAST(s.{a} AS FLOAT) AS aesthetic, \
         CAST(s.{w} AS BIGINT) * CAST(s.{h} AS BIGINT) AS pixels, s.{by} AS bytes \
         FROM samples s JOIN {name} l ON s.{k} = l.key",
        k = col::KEY,
        a = col::SCORE_AESTHETIC,
        w = col::ORIG_WIDTH,
        h = col::ORIG_HEIGHT,
        by = col::CONTENT_BYTES,
    );
    let mut attrs: HashMap<String, (Option<f32>, Option<i64>, Option<i64>)> = HashMap::new();
    let mut s = stream(ctx, &sql).await?;
    while let Some(b) = s.next().await {
        let b = b.map_err(|e| ext("keep rule columns", e))?;
        let keys = utf8(column(&b, "key")?)?;
        let aes = column(&b, "aesthetic")?
            .as_primitive::<Float32Type>()
            .clone();
        let px = column(&b, "pixels")?.as_primitive::<Int64Type>().clone();
        let by: Int64Array = column(&b, "bytes")?.as_primitive::<Int64Type>().clone();
        for i in 0..b.num_rows() {
            let opt_f = |i: usize| (!aes.is_null(i)).then(|| aes.value(i));
            let opt_i = |a: &Int64Array, i: usize| (!a.is_null(i)).then(|| a.value(i));
            attrs.insert(
                keys.value(i).to_string(),
                (opt_f(i), opt_i(&px, i), opt_i(&by, i)),
            );
        }
    }
    let _ = ctx.deregister_table(name);
    // Components.
    let mut comps: HashMap<u32, Vec<u32>> = HashMap::new();
    for i in 0..links.keys.len() as u32 {
        let r = links.find(i);
        comps.entry(r).or_default().push(i);
    }
    let better = |a: &str, b: &str| -> std::cmp::Ordering {
        use std::cmp::Ordering;
        let (fa, fb) = (attrs.get(a), attrs.get(b));
        for by in &rule {
            // Descending with nulls last: Some(x) beats None; larger beats smaller.
            let o = match by {
                KeepBy::Aesthetic => desc_nulls_last(
                    fa.and_then(|x| x.0).map(f64::from),
                    fb.and_then(|x| x.0).map(f64::from),
                ),
                KeepBy::Pixels => desc_nulls_last(
                    fa.and_then(|x| x.1).map(|v| v as f64),
                    fb.and_then(|x| x.1).map(|v| v as f64),
                ),
                KeepBy::Bytes => desc_nulls_last(
                    fa.and_then(|x| x.2).map(|v| v as f64),
                    fb.and_then(|x| x.2).map(|v| v as f64),
                ),
                KeepBy::Key => a.cmp(b),
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    for (_, ids) in comps {
        if ids.len() < 2 {
            continue;
        }
        out.groups += 1;
        let keep = ids
            .iter()
            .copied()
            .min_by(|&a, &b| better(&links.keys[a as usize], &links.keys[b as usize]))
            .expect("non-empty");
        for &i in &ids {
            if i == keep {
                continue;
            }
            let kind = links.kind[i as usize];
            *out.duplicates.entry(kind.as_str().into()).or_default() += 1;
            out.verdicts.insert(
                links.keys[i as usize].clone(),
                Verdict {
                    duplicate_of: links.keys[keep as usize].clone(),
                    kind,
                },
            );
        }
    }
    Ok(())
}

fn desc_nulls_last(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}
