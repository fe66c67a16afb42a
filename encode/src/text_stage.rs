//! The catalog stages of the text side: `captions` (long, short and source columns) and `t5`
//! (the `t5_long` / `t5_short` features), both copy-on-write rewrites through
//! [`llamagen_catalog::stage::map_shards`].
//!
//! Invariants:
//! - Only rows whose `status` is `ok` or `pending` are processed; dropped and failed rows keep
//!   every column as it was.
//! - `captions`: a row with no usable caption (no long caption and every configured fallback
//!   blank) becomes `failed` with `error_kind` `no_caption`. `short_caption` is the
//!   [`first_sentence`] of the caption used.
//! - `t5`: a row whose long caption yields no features (empty after cleaning, too long) becomes
//!   `failed` with the issue's `error_kind` (`empty_caption`, `caption_too_long`); the shard goes
//!   on. A row whose short caption alone fails keeps `ok` with a null `t5_short` and the issue
//!   counted as `short_<kind>`. Features are stored without padding as `{tokens, dim, dtype,
//!   data}`, and each processed row gets a `provenance` entry naming the model, the SHA-256 of
//!   its weights and the preprocessing.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int32Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, StructArray, StructBuilder,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use llamagen_catalog::StageCounters;
use llamagen_catalog::schema::{col, embedding_fields, provenance_fields};

use crate::captions::{CaptionIndex, Fallback, choose_caption};
use crate::error::EncodeError;
use crate::sentence::first_sentence;
use crate::text_encoder::{StoreDtype, TextEncoder};

type Result<T> = std::result::Result<T, EncodeError>;

/// Stage names recorded in the table log and in provenance.
pub const CAPTIONS_STAGE: &str = "captions";
pub const T5_STAGE: &str = "t5";

fn bad(msg: String) -> EncodeError {
    EncodeError::InvalidInput(msg)
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a arrow::array::StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| bad(format!("batch has no string column {name:?}")))
}

fn opt(a: &StringArray, i: usize) -> Option<&str> {
    (!a.is_null(i)).then(|| a.value(i))
}

fn processable(status: &str) -> bool {
    status == "ok" || status == "pending"
}

/// One provenance entry.
#[derive(Debug, Clone)]
pub struct ProvenanceEntry {
    pub stage: String,
    pub model: Option<String>,
    pub sha256: Option<String>,
    pub version: Option<String>,
}

fn push_provenance(sb: &mut StructBuilder, vals: [Option<&str>; 4]) {
    for (k, v) in vals.iter().enumerate() {
        let fb = sb
            .field_builder::<StringBuilder>(k)
            .expect("provenance fields are strings");
        match v {
            Some(s) => fb.append_value(s),
            None if k == 0 => fb.append_value(""),
            None => fb.append_null(),
        }
    }
    sb.append(true);
}

/// The `provenance` column of `batch` with `entry` appended to the rows where `touched`.
pub fn append_provenance(
    batch: &RecordBatch,
    touched: &[bool],
    entry: &ProvenanceEntry,
) -> Result<ArrayRef> {
    let fields = provenance_fields();
    let mut b =
        ListBuilder::new(StructBuilder::from_fields(fields.clone(), batch.num_rows())).with_field(
            Arc::new(Field::new("item", DataType::Struct(fields.clone()), true)),
        );
    let old = batch
        .column_by_name(col::PROVENANCE)
        .and_then(|c| c.as_list_opt::<i32>());
    for i in 0..batch.num_rows() {
        let had = old.is_some_and(|o| !o.is_null(i));
        if let (Some(o), true) = (old, had) {
            let v = o.value(i);
            let s = v.as_struct();
            for j in 0..s.len() {
                let get = |k: usize| {
                    let a = s.column(k).as_string::<i32>();
                    (!a.is_null(j)).then(|| a.value(j))
                };
                push_provenance(b.values(), [get(0), get(1), get(2), get(3)]);
            }
        }
        if touched[i] {
            push_provenance(
                b.values(),
                [
                    Some(entry.stage.as_str()),
                    entry.model.as_deref(),
                    entry.sha256.as_deref(),
                    entry.version.as_deref(),
                ],
            );
        }
        b.append(had || touched[i]);
    }
    Ok(Arc::new(b.finish()))
}

fn batch_of(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(|e| bad(format!("building the output batch: {e}")))
}

/// Sets `long_caption`, `short_caption` and `caption_source` (see the module invariants).
pub fn caption_batch(
    batch: &RecordBatch,
    index: &CaptionIndex,
    fallbacks: &[Fallback],
    counters: &mut StageCounters,
) -> Result<RecordBatch> {
    let key = strings(batch, col::KEY)?;
    let url = strings(batch, col::URL)?;
    let text = strings(batch, col::TEXT)?;
    let top = strings(batch, col::TOP_CAPTION)?;
    let status = strings(batch, col::STATUS)?;
    let error_kind = strings(batch, col::ERROR_KIND)?;
    let error = strings(batch, col::ERROR)?;
    let old_long = strings(batch, col::LONG_CAPTION)?;
    let old_short = strings(batch, col::SHORT_CAPTION)?;
    let old_source = strings(batch, col::CAPTION_SOURCE)?;
    let n = batch.num_rows();
    let (mut long, mut short, mut source) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut st, mut ek, mut er) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut touched = vec![false; n];
    for i in 0..n {
        let s = status.value(i);
        if !processable(s) {
            long.push(opt(old_long, i).map(str::to_string));
            short.push(opt(old_short, i).map(str::to_string));
            source.push(opt(old_source, i).map(str::to_string));
            st.push(s.to_string());
            ek.push(opt(error_kind, i).map(str::to_string));
            er.push(opt(error, i).map(str::to_string));
            continue;
        }
        counters.received += 1;
        let found = index.lookup(key.value(i), opt(url, i));
        match choose_caption(found, opt(top, i), opt(text, i), fallbacks) {
            Some((caption, src)) => {
                touched[i] = true;
                counters.written += 1;
                counters.add_extra(&format!("caption_source_{src}"), 1);
                long.push(Some(caption.to_string()));
                short.push(Some(first_sentence(caption)));
                source.push(Some(src.to_string()));
                st.push(s.to_string());
                ek.push(opt(error_kind, i).map(str::to_string));
                er.push(opt(error, i).map(str::to_string));
            }
            None => {
                counters.error_kind("no_caption");
                long.push(None);
                short.push(None);
                source.push(None);
                st.push("failed".to_string());
                ek.push(Some("no_caption".to_string()));
                er.push(Some(
                    "no long caption, and no configured fallback text is present".to_string(),
                ));
            }
        }
    }
    let s = |v: Vec<Option<String>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    let prov = append_provenance(
        batch,
        &touched,
        &ProvenanceEntry {
            stage: CAPTIONS_STAGE.into(),
            model: None,
            sha256: None,
            version: Some(format!("llamagen-encode {}", env!("CARGO_PKG_VERSION"))),
        },
    )?;
    batch_of(vec![
        (
            col::KEY,
            batch.column_by_name(col::KEY).expect("key").clone(),
        ),
        (col::LONG_CAPTION, s(long)),
        (col::SHORT_CAPTION, s(short)),
        (col::CAPTION_SOURCE, s(source)),
        (col::STATUS, Arc::new(StringArray::from(st))),
        (col::ERROR_KIND, s(ek)),
        (col::ERROR, s(er)),
        (col::PROVENANCE, prov),
    ])
}

/// Stored features of one column, built row by row.
struct EmbeddingColumn {
    tokens: Vec<i32>,
    dim: Vec<i32>,
    dtype: Vec<&'static str>,
    data: Vec<Vec<u8>>,
    valid: Vec<bool>,
}

impl EmbeddingColumn {
    fn new() -> Self {
        Self {
            tokens: vec![],
            dim: vec![],
            dtype: vec![],
            data: vec![],
            valid: vec![],
        }
    }
    fn push(&mut self, v: Option<(i32, i32, &'static str, Vec<u8>)>) {
        match v {
            Some((t, d, dt, bytes)) => {
                self.tokens.push(t);
                self.dim.push(d);
                self.dtype.push(dt);
                self.data.push(bytes);
                self.valid.push(true);
            }
            None => {
                self.tokens.push(0);
                self.dim.push(0);
                self.dtype.push("");
                self.data.push(vec![]);
                self.valid.push(false);
            }
        }
    }
    /// Keeps the stored value of row `i` of `old`.
    fn keep(&mut self, old: Option<&StructArray>, i: usize) {
        match old {
            Some(s) if !s.is_null(i) => {
                let t = s
                    .column(0)
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .value(i);
                let d = s
                    .column(1)
                    .as_primitive::<arrow::datatypes::Int32Type>()
                    .value(i);
                let dt = match s.column(2).as_string::<i32>().value(i) {
                    "f16" => "f16",
                    "f32" => "f32",
                    _ => "bf16",
                };
                let bytes = s.column(3).as_binary::<i32>().value(i).to_vec();
                self.push(Some((t, d, dt, bytes)));
            }
            _ => self.push(None),
        }
    }
    fn finish(self) -> Result<ArrayRef> {
        let data: Vec<&[u8]> = self.data.iter().map(|d| d.as_slice()).collect();
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(Int32Array::from(self.tokens)),
            Arc::new(Int32Array::from(self.dim)),
            Arc::new(StringArray::from(self.dtype)),
            Arc::new(BinaryArray::from(data)),
        ];
        let s = StructArray::try_new(
            embedding_fields(),
            arrays,
            Some(NullBuffer::from(self.valid)),
        )
        .map_err(|e| bad(format!("building t5 features: {e}")))?;
        Ok(Arc::new(s))
    }
}

/// Sets `t5_long` and `t5_short` (see the module invariants).
pub fn embed_batch(
    batch: &RecordBatch,
    encoder: &TextEncoder,
    dtype: StoreDtype,
    counters: &mut StageCounters,
) -> Result<RecordBatch> {
    let status = strings(batch, col::STATUS)?;
    let error_kind = strings(batch, col::ERROR_KIND)?;
    let error = strings(batch, col::ERROR)?;
    let long = strings(batch, col::LONG_CAPTION)?;
    let short = strings(batch, col::SHORT_CAPTION)?;
    let old_long = batch
        .column_by_name(col::T5_LONG)
        .and_then(|c| c.as_struct_opt());
    let old_short = batch
        .column_by_name(col::T5_SHORT)
        .and_then(|c| c.as_struct_opt());
    let n = batch.num_rows();
    let rows: Vec<usize> = (0..n).filter(|&i| processable(status.value(i))).collect();
    let longs: Vec<&str> = rows.iter().map(|&i| opt(long, i).unwrap_or("")).collect();
    let shorts: Vec<&str> = rows.iter().map(|&i| opt(short, i).unwrap_or("")).collect();
    let lf = encoder.encode(&longs)?;
    let sf = encoder.encode(&shorts)?;
    let mut pos = vec![None; n];
    for (j, &i) in rows.iter().enumerate() {
        pos[i] = Some(j);
    }
    let (mut cl, mut cs) = (EmbeddingColumn::new(), EmbeddingColumn::new());
    let (mut st, mut ek, mut er) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut touched = vec![false; n];
    let store = |f: &crate::text_encoder::Features| {
        Some((
            f.tokens as i32,
            f.dim as i32,
            dtype.as_str(),
            dtype.encode(&f.data),
        ))
    };
    for i in 0..n {
        let Some(j) = pos[i] else {
            cl.keep(old_long, i);
            cs.keep(old_short, i);
            st.push(status.value(i).to_string());
            ek.push(opt(error_kind, i).map(str::to_string));
            er.push(opt(error, i).map(str::to_string));
            continue;
        };
        counters.received += 1;
        match &lf[j] {
            Ok(f) => {
                touched[i] = true;
                counters.written += 1;
                counters.add_extra("tokens_long", f.tokens as u64);
                if f.truncated {
                    counters.add_extra("truncated_long", 1);
                }
                cl.push(store(f));
                match &sf[j] {
                    Ok(s) => {
                        counters.add_extra("tokens_short", s.tokens as u64);
                        cs.push(store(s));
                    }
                    Err(issue) => {
                        counters.error_kind(&format!("short_{}", issue.kind()));
                        cs.push(None);
                    }
                }
                st.push(status.value(i).to_string());
                ek.push(opt(error_kind, i).map(str::to_string));
                er.push(opt(error, i).map(str::to_string));
            }
            Err(issue) => {
                counters.error_kind(issue.kind());
                cl.push(None);
                cs.push(None);
                st.push("failed".to_string());
                ek.push(Some(issue.kind().to_string()));
                er.push(Some(format!("T5 features: {issue}")));
            }
        }
    }
    let prov = append_provenance(
        batch,
        &touched,
        &ProvenanceEntry {
            stage: T5_STAGE.into(),
            model: Some(encoder.model_id.clone()),
            sha256: Some(encoder.weights_sha256.clone()),
            version: Some(format!(
                "llamagen-encode {}; clean_caption x{}; max_tokens {}; {}",
                env!("CARGO_PKG_VERSION"),
                if encoder.config().clean { 2 } else { 0 },
                encoder.config().max_tokens,
                dtype.as_str()
            )),
        },
    )?;
    let s = |v: Vec<Option<String>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    batch_of(vec![
        (
            col::KEY,
            batch.column_by_name(col::KEY).expect("key").clone(),
        ),
        (col::T5_LONG, cl.finish()?),
        (col::T5_SHORT, cs.finish()?),
        (col::STATUS, Arc::new(StringArray::from(st))),
        (col::ERROR_KIND, s(ek)),
        (col::ERROR, s(er)),
        (col::PROVENANCE, prov),
    ])
}

pub use llamagen_catalog::stage::StageRun;
use llamagen_catalog::stage::{Stage, StageError};

/// The `captions` stage: [`caption_batch`] under the catalog's stage contract.
pub struct CaptionsStage {
    pub index: Arc<CaptionIndex>,
    pub fallbacks: Vec<Fallback>,
}

impl Stage for CaptionsStage {
    fn name(&self) -> String {
        CAPTIONS_STAGE.into()
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        Ok(caption_batch(
            batch,
            &self.index,
            &self.fallbacks,
            counters,
        )?)
    }
}

/// The `t5` stage: [`embed_batch`] under the catalog's stage contract.
pub struct T5Stage {
    pub encoder: Arc<TextEncoder>,
    pub dtype: StoreDtype,
}

impl Stage for T5Stage {
    fn name(&self) -> String {
        T5_STAGE.into()
    }

    fn process(
        &self,
        batch: &RecordBatch,
        counters: &mut StageCounters,
    ) -> std::result::Result<RecordBatch, StageError> {
        Ok(embed_batch(batch, &self.encoder, self.dtype, counters)?)
    }
}

/// Runs an encode stage with the catalog's runner; its own errors come back as they were.
pub async fn run(
    ds: &llamagen_catalog::Dataset,
    stage: Arc<dyn Stage>,
    selection: impl Into<llamagen_catalog::stage::ShardSelection>,
    on_shard: impl FnMut(&llamagen_catalog::ShardEntry, u64),
) -> Result<StageRun> {
    llamagen_catalog::stage::run_stage(ds, stage, selection, Default::default(), on_shard)
        .await
        .map_err(EncodeError::from_catalog)
}

/// Runs the `captions` stage over the shards of `ds` not yet processed by it.
pub async fn run_captions(
    ds: &llamagen_catalog::Dataset,
    index: Arc<CaptionIndex>,
    fallbacks: Vec<Fallback>,
    partition: impl Into<llamagen_catalog::stage::ShardSelection>,
    on_shard: impl FnMut(&llamagen_catalog::ShardEntry, u64),
) -> Result<StageRun> {
    run(
        ds,
        Arc::new(CaptionsStage { index, fallbacks }),
        partition,
        on_shard,
    )
    .await
}

/// Runs the `t5` stage over the shards of `ds` not yet processed by it. The encoder computes
/// for seconds per batch, on a blocking thread (the stage contract).
pub async fn run_t5(
    ds: &llamagen_catalog::Dataset,
    encoder: Arc<TextEncoder>,
    dtype: StoreDtype,
    partition: impl Into<llamagen_catalog::stage::ShardSelection>,
    on_shard: impl FnMut(&llamagen_catalog::ShardEntry, u64),
) -> Result<StageRun> {
    run(
        ds,
        Arc::new(T5Stage { encoder, dtype }),
        partition,
        on_shard,
    )
    .await
}
