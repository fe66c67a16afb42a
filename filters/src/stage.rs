//! The filters as catalog stages.
//!
//! Invariants enforced here:
//! - Scoring ([`score_catalog`]) is a copy-on-write stage named `filters-score-<digest>`, the
//!   digest covering every model hash, preprocessing version and the caption field: re-running
//!   with the same models resumes, changing a model re-scores. It writes only the score columns
//!   of the configured scorers, `clip_embedding` (when the ViT-L/14 encoder is configured: the
//!   L2-normalised ViT-L/14 image embedding the aesthetic and NSFW heads read, one token of
//!   `dim` little-endian f16 values; null where the image is missing or does not decode) and
//!   `provenance` (entries of stage [`PROVENANCE_STAGE`], one per model and written column,
//!   version `<column>/<preprocessing version>`; earlier `filters` entries for the same columns
//!   are replaced). It never touches `status` or `reject_reasons`.
//! - Each row's input image is its largest stored rendition (most pixels, then largest `size`).
//! - Verdicts ([`apply_catalog`]) are a stage named `filters-apply-<thresholds digest>`. A shard
//!   is rewritten when its most recent verdict stage is a different one or when it was re-scored
//!   after it, so applying thresholds A, then B, then A again gives A's verdicts.

use std::collections::BTreeMap;
use std::sync::Arc;

use llamagen_catalog::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float32Array, Int32Array, ListBuilder, RecordBatch,
    StringArray, StringBuilder, StructArray, StructBuilder,
};
use llamagen_catalog::arrow::buffer::NullBuffer;
use llamagen_catalog::arrow::datatypes::{
    DataType, Field, Float32Type, Int32Type, Int64Type, Schema,
};
use llamagen_catalog::schema::{col, embedding_fields, provenance_fields};
use llamagen_catalog::stage::{MapReport, Stage, StageError, run_stage};
use llamagen_catalog::{Dataset, ShardEntry, ShardWriterOptions, StageCounters};
use sha2::{Digest, Sha256};

use crate::error::{FilterError, Result};
use crate::rules::{Measure, Thresholds, Values, verdict};
use crate::scorer::{Scorer, Timings};

/// `provenance.stage` of the entries the scorer writes.
pub const PROVENANCE_STAGE: &str = "filters";
/// Prefix of the scoring stage's name.
pub const SCORE_STAGE_PREFIX: &str = "filters-score-";
/// Prefix of the verdict stage's name.
pub const APPLY_STAGE_PREFIX: &str = "filters-apply-";

/// Name of the scoring stage for `scorer`'s models.
pub fn score_stage_name(scorer: &Scorer) -> String {
    let ids = serde_json::to_string(&scorer.model_ids()).expect("serialisable");
    let d = Sha256::digest(format!("{ids}|{:?}", scorer.config().caption).as_bytes());
    format!("{SCORE_STAGE_PREFIX}{}", hex::encode(&d[..6]))
}

/// Name of the verdict stage for `t`.
pub fn apply_stage_name(t: &Thresholds) -> String {
    format!("{APPLY_STAGE_PREFIX}{}", t.digest())
}

fn col_err(column: &str, message: impl Into<String>) -> FilterError {
    FilterError::Column {
        column: column.into(),
        message: message.into(),
    }
}

/// The largest rendition's bytes for each row of `batch` (`None` when the row has none).
pub fn largest_images(batch: &RecordBatch) -> Result<Vec<Option<&[u8]>>> {
    let n = batch.num_rows();
    let Some(c) = batch.column_by_name(col::IMAGES) else {
        return Err(col_err(col::IMAGES, "missing from the shard"));
    };
    let list = c
        .as_list_opt::<i32>()
        .ok_or_else(|| col_err(col::IMAGES, format!("is {}, wants a list", c.data_type())))?;
    let items = list
        .values()
        .as_struct_opt()
        .ok_or_else(|| col_err(col::IMAGES, "items are not structs"))?;
    let get = |name: &str| {
        items
            .column_by_name(name)
            .ok_or_else(|| col_err(col::IMAGES, format!("has no field {name}")))
    };
    let size = get("size")?.as_primitive_opt::<Int32Type>().cloned();
    let width = get("width")?.as_primitive_opt::<Int32Type>().cloned();
    let height = get("height")?.as_primitive_opt::<Int32Type>().cloned();
    let data = get("data")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| col_err(col::IMAGES, "field data is not binary"))?;
    let (Some(size), Some(width), Some(height)) = (size, width, height) else {
        return Err(col_err(col::IMAGES, "size/width/height are not int32"));
    };
    let offsets = list.value_offsets();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        if list.is_null(i) {
            out.push(None);
            continue;
        }
        let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
        let best = (a..b).filter(|&j| data.is_valid(j)).max_by_key(|&j| {
            (
                width.value(j) as i64 * height.value(j) as i64,
                size.value(j),
            )
        });
        out.push(best.map(|j| data.value(j)));
    }
    Ok(out)
}

fn strings(batch: &RecordBatch, name: &str) -> Result<Option<StringArray>> {
    match batch.column_by_name(name) {
        None => Ok(None),
        Some(c) => c
            .as_string_opt::<i32>()
            .cloned()
            .map(Some)
            .ok_or_else(|| col_err(name, format!("is {}, wants utf8", c.data_type()))),
    }
}

/// Existing provenance entries per row: (stage, model, sha256, version).
type Prov = (String, Option<String>, Option<String>, Option<String>);

fn read_provenance(batch: &RecordBatch) -> Result<Vec<Vec<Prov>>> {
    let n = batch.num_rows();
    let Some(c) = batch.column_by_name(col::PROVENANCE) else {
        return Ok(vec![vec![]; n]);
    };
    let list = c
        .as_list_opt::<i32>()
        .ok_or_else(|| col_err(col::PROVENANCE, "is not a list"))?;
    let items = list
        .values()
        .as_struct_opt()
        .ok_or_else(|| col_err(col::PROVENANCE, "items are not structs"))?;
    let field = |name: &str| -> Result<StringArray> {
        items
            .column_by_name(name)
            .and_then(|a| a.as_string_opt::<i32>().cloned())
            .ok_or_else(|| col_err(col::PROVENANCE, format!("field {name} is not utf8")))
    };
    let (st, mo, sh, ve) = (
        field("stage")?,
        field("model")?,
        field("sha256")?,
        field("version")?,
    );
    let opt = |a: &StringArray, j: usize| a.is_valid(j).then(|| a.value(j).to_string());
    let offsets = list.value_offsets();
    Ok((0..n)
        .map(|i| {
            if list.is_null(i) {
                return vec![];
            }
            (offsets[i] as usize..offsets[i + 1] as usize)
                .map(|j| {
                    (
                        st.value(j).to_string(),
                        opt(&mo, j),
                        opt(&sh, j),
                        opt(&ve, j),
                    )
                })
                .collect()
        })
        .collect())
}

fn build_provenance(rows: &[Vec<Prov>]) -> ArrayRef {
    let fields = provenance_fields();
    let sb = StructBuilder::from_fields(fields.clone(), rows.len());
    let mut lb = ListBuilder::new(sb).with_field(Arc::new(Field::new(
        "item",
        DataType::Struct(fields),
        true,
    )));
    for row in rows {
        for (stage, model, sha, version) in row {
            let s = lb.values();
            s.field_builder::<StringBuilder>(0)
                .expect("stage")
                .append_value(stage);
            s.field_builder::<StringBuilder>(1)
                .expect("model")
                .append_option(model.as_deref());
            s.field_builder::<StringBuilder>(2)
                .expect("sha256")
                .append_option(sha.as_deref());
            s.field_builder::<StringBuilder>(3)
                .expect("version")
                .append_option(version.as_deref());
            s.append(true);
        }
        lb.append(true);
    }
    Arc::new(lb.finish())
}

/// `clip_embedding` values: one token of `dim` little-endian f16 values per row with an
/// embedding, null for the others.
pub fn clip_embedding_array(rows: &[Option<Vec<f32>>]) -> Result<ArrayRef> {
    let n = rows.len();
    let (mut tokens, mut dim, mut dtype) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut data: Vec<Vec<u8>> = Vec::with_capacity(n);
    for r in rows {
        match r {
            Some(v) => {
                tokens.push(1);
                dim.push(i32::try_from(v.len()).map_err(|_| {
                    col_err(col::CLIP_EMBEDDING, format!("{}-d embedding", v.len()))
                })?);
                dtype.push("f16");
                data.push(
                    v.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                );
            }
            // Children are non-nullable: default values under the struct's null.
            None => {
                tokens.push(0);
                dim.push(0);
                dtype.push("");
                data.push(Vec::new());
            }
        }
    }
    let arrays: Vec<ArrayRef> = vec![
        Arc::new(Int32Array::from(tokens)),
        Arc::new(Int32Array::from(dim)),
        Arc::new(StringArray::from(dtype)),
        Arc::new(BinaryArray::from_iter_values(data)),
    ];
    let valid = NullBuffer::from(rows.iter().map(Option::is_some).collect::<Vec<_>>());
    let s = StructArray::try_new(embedding_fields(), arrays, Some(valid))?;
    Ok(Arc::new(s))
}

/// Scores one batch of whole sample rows; returns `key`, the score columns, `clip_embedding`
/// (with the ViT-L/14 encoder) and `provenance`,
/// plus timings and per-kind error counts.
pub fn score_batch(
    scorer: &Scorer,
    batch: &RecordBatch,
) -> Result<(RecordBatch, Timings, BTreeMap<String, u64>)> {
    let keys = batch
        .column_by_name(col::KEY)
        .ok_or_else(|| col_err(col::KEY, "missing"))?
        .clone();
    let images = largest_images(batch)?;
    let captions = strings(batch, scorer.config().caption.column())?;
    let inputs: Vec<crate::scorer::SampleInput<'_>> = images
        .iter()
        .enumerate()
        .map(|(i, img)| crate::scorer::SampleInput {
            image: *img,
            caption: captions
                .as_ref()
                .filter(|c| c.is_valid(i))
                .map(|c| c.value(i)),
        })
        .collect();
    let (scores, timings) = scorer.score(&inputs)?;
    let mut errors = BTreeMap::new();
    for e in scores.errors.iter().flatten() {
        let kind = e.split(':').next().unwrap_or("error").to_string();
        *errors.entry(kind).or_insert(0) += 1;
    }
    let mut fields = vec![Field::new(col::KEY, DataType::Utf8, false)];
    let mut cols: Vec<ArrayRef> = vec![keys];
    for c in scorer.columns() {
        if c == col::CLIP_EMBEDDING {
            fields.push(Field::new(c, DataType::Struct(embedding_fields()), true));
            cols.push(clip_embedding_array(&scores.l14_embedding)?);
            continue;
        }
        let v = match c {
            col::SCORE_CLIP_SIMILARITY => &scores.clip_similarity,
            col::SCORE_AESTHETIC => &scores.aesthetic,
            col::SCORE_WATERMARK => &scores.watermark,
            col::SCORE_NSFW => &scores.nsfw,
            _ => unreachable!("scorer columns"),
        };
        fields.push(Field::new(c, DataType::Float32, true));
        cols.push(Arc::new(Float32Array::from(v.clone())));
    }
    // Provenance: replace earlier entries of this stage for the columns written now.
    let written = scorer.columns();
    let ids = scorer.model_ids();
    let mut prov = read_provenance(batch)?;
    for row in prov.iter_mut() {
        row.retain(|(stage, _, _, version)| {
            !(stage == PROVENANCE_STAGE
                && version
                    .as_deref()
                    .and_then(|v| v.split('/').next())
                    .is_some_and(|c| written.contains(&c)))
        });
        for id in &ids {
            row.push((
                PROVENANCE_STAGE.to_string(),
                Some(id.model.clone()),
                Some(id.sha256.clone()),
                Some(format!("{}/{}", id.score, id.version)),
            ));
        }
    }
    fields.push(Field::new(
        col::PROVENANCE,
        DataType::List(Arc::new(Field::new(
            "item",
            DataType::Struct(provenance_fields()),
            true,
        ))),
        true,
    ));
    cols.push(build_provenance(&prov));
    let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
    Ok((out, timings, errors))
}

/// What a scoring run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScoreReport {
    pub stage: String,
    pub map: MapReport,
    pub counters: StageCounters,
    pub timings: Timings,
}

/// The scoring stage: [`score_batch`] under the catalog's stage contract, adding up the scorer's
/// timings.
pub struct ScoreStage {
    pub scorer: Arc<Scorer>,
    timings: std::sync::Mutex<Timings>,
}

impl ScoreStage {
    pub fn new(scorer: Arc<Scorer>) -> Result<Self> {
        if scorer.is_empty() {
            return Err(FilterError::Config(
                "no scorer configured: give CLIP, ViT-L/14 or watermark models".into(),
            ));
        }
        Ok(ScoreStage {
            scorer,
            timings: Default::default(),
        })
    }

    /// The scorer's timings over every batch so far.
    pub fn timings(&self) -> Timings {
        self.timings.lock().expect("timings").clone()
    }
}

impl Stage for ScoreStage {
    fn name(&self) -> String {
        score_stage_name(&self.scorer)
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        let rows = batch.num_rows() as u64;
        let (out, t, errors) = score_batch(&self.scorer, batch)?;
        counters.received += rows;
        counters.written += rows;
        for (k, v) in errors {
            *counters.errors.entry(k).or_default() += v;
        }
        counters.add_extra("images_scored", t.images);
        self.timings.lock().expect("timings").add(&t);
        Ok(out)
    }
}

/// The verdict stage: [`apply_batch`] with thresholds `t`, on every shard that needs it
/// ([`needs_apply`]).
pub struct ApplyStage {
    pub thresholds: Thresholds,
}

impl Stage for ApplyStage {
    fn name(&self) -> String {
        apply_stage_name(&self.thresholds)
    }

    fn needs(&self, entry: &ShardEntry) -> bool {
        needs_apply(entry, &self.name())
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        Ok(apply_batch(&self.thresholds, batch, counters)?)
    }
}

/// Scores every shard of `ds` not yet scored by these models (see the module invariants).
/// `on_shard(rows)` is called after each committed shard.
pub async fn score_catalog(
    ds: &Dataset,
    scorer: Arc<Scorer>,
    partition: impl Into<llamagen_catalog::stage::ShardSelection>,
    mut on_shard: impl FnMut(u64),
) -> Result<ScoreReport> {
    let stage = Arc::new(ScoreStage::new(scorer)?);
    let run = run_stage(
        ds,
        stage.clone(),
        partition,
        ShardWriterOptions::default(),
        |_e: &ShardEntry, rows| on_shard(rows),
    )
    .await
    .map_err(FilterError::from_catalog)?;
    let mut counters = run.counters;
    counters.add_extra("shards_rewritten", run.map.shards_rewritten);
    counters.add_extra("shards_skipped", run.map.shards_skipped);
    Ok(ScoreReport {
        stage: run.stage,
        map: run.map,
        counters,
        timings: stage.timings(),
    })
}

/// Columns the verdicts read.
pub const VERDICT_COLUMNS: &[&str] = &[
    col::KEY,
    col::STATUS,
    col::REJECT_REASONS,
    col::SCORE_CLIP_SIMILARITY,
    col::SCORE_AESTHETIC,
    col::SCORE_WATERMARK,
    col::SCORE_NSFW,
    col::ORIG_WIDTH,
    col::ORIG_HEIGHT,
    col::CONTENT_BYTES,
];

/// The measured values of every row of `batch` (columns of [`VERDICT_COLUMNS`]).
pub fn row_values(batch: &RecordBatch) -> Result<Vec<Values>> {
    let n = batch.num_rows();
    let f32col = |name: &str| -> Result<Option<Float32Array>> {
        match batch.column_by_name(name) {
            None => Ok(None),
            Some(c) => c
                .as_primitive_opt::<Float32Type>()
                .cloned()
                .map(Some)
                .ok_or_else(|| col_err(name, "is not float32")),
        }
    };
    let i32col = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int32Type>().cloned())
    };
    let scores = [
        (Measure::ClipSimilarity, f32col(col::SCORE_CLIP_SIMILARITY)?),
        (Measure::Aesthetic, f32col(col::SCORE_AESTHETIC)?),
        (Measure::Pwatermark, f32col(col::SCORE_WATERMARK)?),
        (Measure::Punsafe, f32col(col::SCORE_NSFW)?),
    ];
    let (w, h) = (i32col(col::ORIG_WIDTH), i32col(col::ORIG_HEIGHT));
    let bytes = batch
        .column_by_name(col::CONTENT_BYTES)
        .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned());
    Ok((0..n)
        .map(|i| {
            let mut v = Values::new();
            for (m, a) in &scores {
                v.insert(
                    *m,
                    a.as_ref()
                        .filter(|a| a.is_valid(i))
                        .map(|a| a.value(i) as f64),
                );
            }
            let wh = match (&w, &h) {
                (Some(w), Some(h))
                    if w.is_valid(i) && h.is_valid(i) && w.value(i) > 0 && h.value(i) > 0 =>
                {
                    Some((w.value(i) as f64, h.value(i) as f64))
                }
                _ => None,
            };
            v.insert(Measure::MinSide, wh.map(|(a, b)| a.min(b)));
            v.insert(Measure::MaxSide, wh.map(|(a, b)| a.max(b)));
            v.insert(Measure::AspectRatio, wh.map(|(a, b)| a.max(b) / a.min(b)));
            v.insert(
                Measure::FileBytes,
                bytes
                    .as_ref()
                    .filter(|b| b.is_valid(i))
                    .map(|b| b.value(i) as f64),
            );
            v
        })
        .collect())
}

/// Reads `status` and `reject_reasons` of each row.
pub fn row_states(batch: &RecordBatch) -> Result<Vec<(String, Vec<String>)>> {
    let st = strings(batch, col::STATUS)?.ok_or_else(|| col_err(col::STATUS, "missing"))?;
    let reasons = batch.column_by_name(col::REJECT_REASONS);
    let list = reasons.and_then(|c| c.as_list_opt::<i32>().cloned());
    Ok((0..batch.num_rows())
        .map(|i| {
            let rs = match &list {
                Some(l) if l.is_valid(i) => {
                    let v = l.value(i);
                    let s = v.as_string::<i32>();
                    (0..s.len())
                        .filter(|&j| s.is_valid(j))
                        .map(|j| s.value(j).to_string())
                        .collect()
                }
                _ => vec![],
            };
            (st.value(i).to_string(), rs)
        })
        .collect())
}

/// Verdict columns (`key`, `status`, `reject_reasons`) for one batch, and its counters.
pub fn apply_batch(
    t: &Thresholds,
    batch: &RecordBatch,
    counters: &mut StageCounters,
) -> Result<RecordBatch> {
    let values = row_values(batch)?;
    let states = row_states(batch)?;
    let mut status = StringBuilder::new();
    let mut reasons = ListBuilder::new(StringBuilder::new());
    for ((st, old), v) in states.iter().zip(&values) {
        counters.received += 1;
        counters.written += 1;
        match verdict(t, st, old, v) {
            Some((rs, s)) => {
                if s == "dropped" {
                    for r in rs.iter().filter(|r| crate::rules::is_rule_reason(r)) {
                        counters.drop_reason(r);
                    }
                }
                status.append_value(s);
                for r in &rs {
                    reasons.values().append_value(r);
                }
                reasons.append(true);
            }
            None => {
                status.append_value(st);
                for r in old {
                    reasons.values().append_value(r);
                }
                reasons.append(true);
            }
        }
    }
    let key = batch
        .column_by_name(col::KEY)
        .ok_or_else(|| col_err(col::KEY, "missing"))?
        .clone();
    let schema = Schema::new(vec![
        Field::new(col::KEY, DataType::Utf8, false),
        Field::new(col::STATUS, DataType::Utf8, false),
        Field::new(
            col::REJECT_REASONS,
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]);
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        vec![key, Arc::new(status.finish()), Arc::new(reasons.finish())],
    )?)
}

/// Whether a shard needs the verdict stage `stage` (see the module invariants).
pub fn needs_apply(entry: &ShardEntry, stage: &str) -> bool {
    let last_apply = entry
        .applied
        .iter()
        .rposition(|s| s.starts_with(APPLY_STAGE_PREFIX));
    match last_apply {
        None => true,
        Some(p) => {
            entry.applied[p] != stage
                || entry.applied[p + 1..]
                    .iter()
                    .any(|s| s.starts_with(SCORE_STAGE_PREFIX))
        }
    }
}

/// Applies `t` to every shard that needs it; returns the stage name, map report and counters.
pub async fn apply_catalog(
    ds: &Dataset,
    t: &Thresholds,
    partition: impl Into<llamagen_catalog::stage::ShardSelection>,
    mut on_shard: impl FnMut(u64),
) -> Result<(String, MapReport, StageCounters)> {
    let stage = Arc::new(ApplyStage {
        thresholds: t.clone(),
    });
    let run = run_stage(
        ds,
        stage,
        partition,
        ShardWriterOptions::default(),
        |_e: &ShardEntry, rows| on_shard(rows),
    )
    .await
    .map_err(FilterError::from_catalog)?;
    Ok((run.stage, run.map, run.counters))
}
