//! The sample schema: one Arrow schema for every row of a llamagen dataset.
//!
//! Invariants (enforced by [`conform`] and by the shard writer, which calls it):
//! - Every shard of a dataset has exactly [`sample_schema`]: same names, order and types, and the
//!   Parquet key-value metadata `llamagen.schema_version` = [`SCHEMA_VERSION`]. Readers refuse any
//!   other version with [`CatalogError::UnsupportedSchemaVersion`].
//! - `key` and `status` are never null; `key` is unique within a dataset.
//! - Every other column is nullable. A stage fills only its own columns (ingest: source, download
//!   and image columns; filters: `score_*` and `reject_reasons`; captions: `*_caption`; encode:
//!   `vq_codes`, `t5_*`) and carries the others through unchanged.
//! - Wide columns ([`WIDE_COLUMNS`]: encoded images, code grids, text embeddings) sit in their own
//!   Parquet columns, so a query that does not project them never reads their pages.
//! - A change to names, types or meaning bumps [`SCHEMA_VERSION`].

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::error::{CatalogError, Result};

/// Version of the sample schema written by this build.
pub const SCHEMA_VERSION: u32 = 3;

/// Key of the schema version in Arrow schema metadata and Parquet key-value metadata.
pub const SCHEMA_VERSION_KEY: &str = "llamagen.schema_version";

/// Column names, so stages never spell them twice.
pub mod col {
    // identity and source metadata (LAION-COCO columns normalised)
    pub const KEY: &str = "key";
    pub const SOURCE: &str = "source";
    pub const SOURCE_ROW: &str = "source_row";
    pub const URL: &str = "url";
    pub const TEXT: &str = "text";
    pub const TOP_CAPTION: &str = "top_caption";
    pub const ALL_CAPTIONS: &str = "all_captions";
    pub const ALL_SIMILARITIES: &str = "all_similarities";
    pub const WIDTH: &str = "width";
    pub const HEIGHT: &str = "height";
    pub const SIMILARITY: &str = "similarity";
    pub const HASH: &str = "hash";
    pub const PWATERMARK: &str = "pwatermark";
    pub const PUNSAFE: &str = "punsafe";
    pub const EXTRA: &str = "extra";
    // state
    pub const STATUS: &str = "status";
    pub const ERROR_KIND: &str = "error_kind";
    pub const ERROR: &str = "error";
    pub const REJECT_REASONS: &str = "reject_reasons";
    // download
    pub const HTTP_STATUS: &str = "http_status";
    pub const DOWNLOADED_AT: &str = "downloaded_at";
    pub const CONTENT_SHA256: &str = "content_sha256";
    pub const CONTENT_BYTES: &str = "content_bytes";
    pub const DUPLICATE_OF: &str = "duplicate_of";
    /// Why `duplicate_of` is set: `url` or `content` (ingest, within a unit), `exact`,
    /// `perceptual` or `semantic` (dataset-wide dedup).
    pub const DUP_KIND: &str = "dup_kind";
    /// 64-bit DCT perceptual hash of the largest rendition (imagehash.phash's bits, first bit
    /// most significant, stored as the two's-complement int64 of those bits).
    pub const PHASH: &str = "phash";
    pub const ORIG_FORMAT: &str = "orig_format";
    pub const ORIG_WIDTH: &str = "orig_width";
    pub const ORIG_HEIGHT: &str = "orig_height";
    pub const IMAGES: &str = "images";
    // filter scores
    pub const SCORE_CLIP_SIMILARITY: &str = "score_clip_similarity";
    pub const SCORE_AESTHETIC: &str = "score_aesthetic";
    pub const SCORE_WATERMARK: &str = "score_watermark";
    pub const SCORE_NSFW: &str = "score_nsfw";
    /// The L2-normalised CLIP ViT-L/14 image embedding the aesthetic head reads
    /// ([`super::embedding_fields`], one token, f16).
    pub const CLIP_EMBEDDING: &str = "clip_embedding";
    /// The k-means cluster of `clip_embedding` semantic dedup assigned.
    pub const SEMANTIC_CLUSTER: &str = "semantic_cluster";
    // captions
    pub const LONG_CAPTION: &str = "long_caption";
    pub const SHORT_CAPTION: &str = "short_caption";
    pub const CAPTION_SOURCE: &str = "caption_source";
    /// Class label for class-conditional training (e.g. an ImageNet class index).
    pub const LABEL: &str = "label";
    // encodings
    pub const VQ_CODES: &str = "vq_codes";
    pub const T5_LONG: &str = "t5_long";
    pub const T5_SHORT: &str = "t5_short";
    // provenance
    pub const PROVENANCE: &str = "provenance";
    pub const PIPELINE_VERSION: &str = "pipeline_version";
    pub const UPDATED_AT: &str = "updated_at";
}

/// Columns holding bulk data: never read unless a query projects them.
pub const WIDE_COLUMNS: &[&str] = &[col::IMAGES, col::VQ_CODES, col::T5_LONG, col::T5_SHORT];

/// The wide columns by column group: each group is stored once, apart from the rest of the row
/// (see [`crate::columns`]). Every wide column is in exactly one group.
pub const COLUMN_GROUPS: &[(&str, &[&str])] = &[
    ("images", &[col::IMAGES]),
    ("t5", &[col::T5_LONG, col::T5_SHORT]),
    ("vq", &[col::VQ_CODES]),
];

/// The group of a wide column (None for every other column).
pub fn group_of(column: &str) -> Option<&'static str> {
    COLUMN_GROUPS
        .iter()
        .find(|(_, cols)| cols.contains(&column))
        .map(|(g, _)| *g)
}

/// The columns of group `group` (None for a name that is not a group).
pub fn group_columns(group: &str) -> Option<&'static [&'static str]> {
    COLUMN_GROUPS
        .iter()
        .find(|(g, _)| *g == group)
        .map(|(_, cols)| *cols)
}

/// The schema of a column file of `group`: `key`, then the group's columns as the sample schema
/// has them, with the same schema-version metadata. Panics on a name that is not a group.
pub fn group_schema(group: &str) -> SchemaRef {
    static SCHEMAS: OnceLock<HashMap<&'static str, SchemaRef>> = OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            let sample = sample_schema();
            COLUMN_GROUPS
                .iter()
                .map(|(g, cols)| {
                    let fields: Vec<Field> = std::iter::once(col::KEY)
                        .chain(cols.iter().copied())
                        .map(|c| sample.field_with_name(c).expect("a sample column").clone())
                        .collect();
                    let schema = Schema::new_with_metadata(fields, sample.metadata().clone());
                    (*g, Arc::new(schema))
                })
                .collect()
        })
        .get(group)
        .unwrap_or_else(|| panic!("{group:?} is not a column group"))
        .clone()
}

/// Where a sample stands. Stored as its lower-case name in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Listed, not yet downloaded.
    Pending,
    /// Downloaded and decoded; passes every rule applied so far.
    Ok,
    /// Deliberately rejected by a rule (metadata, robots header, filter threshold, duplicate):
    /// `reject_reasons` lists every failed rule.
    Dropped,
    /// Could not be processed (network, HTTP, decode, ...): `error_kind` and `error` say why.
    Failed,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Pending, Status::Ok, Status::Dropped, Status::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Ok => "ok",
            Status::Dropped => "dropped",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn list_of(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, true))),
        true,
    )
}

fn timestamp(name: &str) -> Field {
    Field::new(
        name,
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        true,
    )
}

/// One stored image rendition: `images` is a list of these, one per target size.
pub fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("size", DataType::Int32, false),
        Field::new("width", DataType::Int32, false),
        Field::new("height", DataType::Int32, false),
        Field::new("format", DataType::Utf8, false),
        Field::new("data", DataType::Binary, false),
    ])
}

/// One VQ code grid: `vq_codes` is a list of these (one per image size, ten per ten-crop set).
/// `codes` holds grid×grid codebook indices in raster order (row-major, as the official VQ flattens).
pub fn vq_code_fields() -> Fields {
    Fields::from(vec![
        Field::new("image_size", DataType::Int32, false),
        // "center" (center_crop_arr at image_size) or "tencrop"
        Field::new("kind", DataType::Utf8, false),
        // image side before cropping: image_size for "center", e.g. 281 for a 256 px ten-crop
        Field::new("crop_size", DataType::Int32, false),
        // 0 for "center"; 0..9 for "tencrop" in torchvision TenCrop order (tl, tr, bl, br, center, then flipped)
        Field::new("view", DataType::Int32, false),
        Field::new("grid", DataType::Int32, false),
        Field::new(
            "codes",
            // int16: Delta Lake (and so Spark, polars) has no unsigned types; every code of a
            // codebook of up to 32,768 entries (LlamaGen's is 16,384) fits. See `codes_array`.
            DataType::List(Arc::new(Field::new("item", DataType::Int16, false))),
            false,
        ),
    ])
}

/// A feature matrix of `tokens` × `dim` (text-encoder features; one token for an image embedding), valid tokens only (no padding), row-major,
/// little-endian `dtype` ("f16", "bf16" or "f32").
pub fn embedding_fields() -> Fields {
    Fields::from(vec![
        Field::new("tokens", DataType::Int32, false),
        Field::new("dim", DataType::Int32, false),
        Field::new("dtype", DataType::Utf8, false),
        Field::new("data", DataType::Binary, false),
    ])
}

/// Which model (and which preprocessing) produced a sample's derived columns.
pub fn provenance_fields() -> Fields {
    Fields::from(vec![
        Field::new("stage", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, true),
        Field::new("sha256", DataType::Utf8, true),
        Field::new("version", DataType::Utf8, true),
    ])
}

/// The `codes` values of a `vq_codes` entry, from codebook indices; an index that does not fit
/// the column's int16 (a codebook over 32,768 entries) is an error.
pub fn codes_array(codes: &[u16]) -> Result<arrow::array::Int16Array> {
    codes
        .iter()
        .map(|&c| i16::try_from(c).ok())
        .collect::<Option<Vec<i16>>>()
        .map(arrow::array::Int16Array::from)
        .ok_or_else(|| {
            CatalogError::SchemaMismatch(
                "a VQ code is above 32,767: vq_codes holds codebooks of up to 32,768 entries"
                    .into(),
            )
        })
}

/// Codebook indices from the `codes` values of a `vq_codes` entry (None if the array is not
/// int16, or holds a negative value).
pub fn codes_of(values: &dyn Array) -> Option<Vec<u16>> {
    use arrow::array::AsArray;
    let a = values.as_primitive_opt::<arrow::datatypes::Int16Type>()?;
    a.values().iter().map(|&c| u16::try_from(c).ok()).collect()
}

/// The sample schema of [`SCHEMA_VERSION`].
pub fn sample_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let fields = vec![
                Field::new(col::KEY, DataType::Utf8, false),
                utf8(col::SOURCE),
                Field::new(col::SOURCE_ROW, DataType::Int64, true),
                utf8(col::URL),
                utf8(col::TEXT),
                utf8(col::TOP_CAPTION),
                list_of(col::ALL_CAPTIONS, DataType::Utf8),
                list_of(col::ALL_SIMILARITIES, DataType::Float64),
                Field::new(col::WIDTH, DataType::Int64, true),
                Field::new(col::HEIGHT, DataType::Int64, true),
                Field::new(col::SIMILARITY, DataType::Float64, true),
                Field::new(col::HASH, DataType::Int64, true),
                Field::new(col::PWATERMARK, DataType::Float64, true),
                Field::new(col::PUNSAFE, DataType::Float64, true),
                utf8(col::EXTRA),
                Field::new(col::STATUS, DataType::Utf8, false),
                utf8(col::ERROR_KIND),
                utf8(col::ERROR),
                list_of(col::REJECT_REASONS, DataType::Utf8),
                Field::new(col::HTTP_STATUS, DataType::Int32, true),
                timestamp(col::DOWNLOADED_AT),
                utf8(col::CONTENT_SHA256),
                Field::new(col::CONTENT_BYTES, DataType::Int64, true),
                utf8(col::DUPLICATE_OF),
                utf8(col::DUP_KIND),
                Field::new(col::PHASH, DataType::Int64, true),
                utf8(col::ORIG_FORMAT),
                Field::new(col::ORIG_WIDTH, DataType::Int32, true),
                Field::new(col::ORIG_HEIGHT, DataType::Int32, true),
                list_of(col::IMAGES, DataType::Struct(image_fields())),
                Field::new(col::SCORE_CLIP_SIMILARITY, DataType::Float32, true),
                Field::new(col::SCORE_AESTHETIC, DataType::Float32, true),
                Field::new(col::SCORE_WATERMARK, DataType::Float32, true),
                Field::new(col::SCORE_NSFW, DataType::Float32, true),
                Field::new(
                    col::CLIP_EMBEDDING,
                    DataType::Struct(embedding_fields()),
                    true,
                ),
                Field::new(col::SEMANTIC_CLUSTER, DataType::Int32, true),
                utf8(col::LONG_CAPTION),
                utf8(col::SHORT_CAPTION),
                utf8(col::CAPTION_SOURCE),
                Field::new(col::LABEL, DataType::Int32, true),
                list_of(col::VQ_CODES, DataType::Struct(vq_code_fields())),
                Field::new(col::T5_LONG, DataType::Struct(embedding_fields()), true),
                Field::new(col::T5_SHORT, DataType::Struct(embedding_fields()), true),
                list_of(col::PROVENANCE, DataType::Struct(provenance_fields())),
                utf8(col::PIPELINE_VERSION),
                timestamp(col::UPDATED_AT),
            ];
            let metadata =
                HashMap::from([(SCHEMA_VERSION_KEY.to_string(), SCHEMA_VERSION.to_string())]);
            Arc::new(Schema::new_with_metadata(fields, metadata))
        })
        .clone()
}

/// Reads the schema version from Arrow/Parquet key-value metadata.
pub fn schema_version_of(metadata: &HashMap<String, String>) -> Option<u32> {
    metadata
        .get(SCHEMA_VERSION_KEY)
        .and_then(|v| v.parse().ok())
}

/// Brings a batch holding any subset of the sample columns to the full sample schema: columns
/// are put in schema order, missing nullable columns become all-null, a column whose type differs
/// is cast when every value fits (e.g. `Int32` to `Int64`, `LargeUtf8` to `Utf8`).
/// An unknown column, a missing required column, a null in a required column or a lossy cast is
/// refused with the column's name, and so is a value that does not fit the wanted type.
pub fn conform(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = sample_schema();
    let input = batch.schema();
    for f in input.fields() {
        if schema.field_with_name(f.name()).is_err() {
            return Err(CatalogError::SchemaMismatch(format!(
                "unknown column {:?} (the sample schema v{SCHEMA_VERSION} has no such column)",
                f.name()
            )));
        }
    }
    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let col = match input.index_of(field.name()) {
            Ok(i) => {
                let c = batch.column(i).clone();
                if c.data_type() == field.data_type() {
                    c
                } else if c.data_type() == &DataType::Null {
                    new_null_array(field.data_type(), rows)
                } else {
                    lossless_cast(field, &c)?
                }
            }
            Err(_) if field.is_nullable() => new_null_array(field.data_type(), rows),
            Err(_) => {
                return Err(CatalogError::SchemaMismatch(format!(
                    "required column {:?} is missing",
                    field.name()
                )));
            }
        };
        if !field.is_nullable() && col.null_count() > 0 {
            return Err(CatalogError::SchemaMismatch(format!(
                "required column {:?} has {} null value(s)",
                field.name(),
                col.null_count()
            )));
        }
        columns.push(col);
    }
    RecordBatch::try_new(schema, columns).map_err(|e| CatalogError::SchemaMismatch(e.to_string()))
}

fn lossless_cast(field: &Field, c: &ArrayRef) -> Result<ArrayRef> {
    use arrow::compute::{CastOptions, cast_with_options};
    // `safe: false` turns any value that does not fit (overflow, unparsable string) into an error
    // instead of a silent null.
    let opts = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(c, field.data_type(), &opts).map_err(|e| {
        CatalogError::SchemaMismatch(format!(
            "column {:?} has type {} where the schema wants {}: {e}",
            field.name(),
            c.data_type(),
            field.data_type()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    #[test]
    fn conform_fills_missing_and_orders_columns() {
        let b = RecordBatch::try_from_iter(vec![
            (
                "status",
                Arc::new(StringArray::from(vec!["pending", "ok"])) as ArrayRef,
            ),
            (
                "key",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            (
                "width",
                Arc::new(Int32Array::from(vec![Some(3), None])) as ArrayRef,
            ),
        ])
        .unwrap();
        let c = conform(&b).unwrap();
        assert_eq!(c.schema(), sample_schema());
        assert_eq!(c.num_rows(), 2);
        assert_eq!(c.column_by_name("score_aesthetic").unwrap().null_count(), 2);
        let w = c.column_by_name("width").unwrap();
        assert_eq!(w.data_type(), &DataType::Int64);
        assert_eq!(w.null_count(), 1);
    }

    #[test]
    fn conform_refuses_unknown_and_missing_required() {
        let b = RecordBatch::try_from_iter(vec![(
            "kee",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        )])
        .unwrap();
        let e = conform(&b).unwrap_err().to_string();
        assert!(e.contains("\"kee\""), "{e}");
        let b = RecordBatch::try_from_iter(vec![(
            "key",
            Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
        )])
        .unwrap();
        let e = conform(&b).unwrap_err().to_string();
        assert!(e.contains("\"status\""), "{e}");
        let b = RecordBatch::try_from_iter(vec![
            (
                "key",
                Arc::new(StringArray::from(vec![Some("a"), None])) as ArrayRef,
            ),
            (
                "status",
                Arc::new(StringArray::from(vec!["ok", "ok"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let e = conform(&b).unwrap_err().to_string();
        assert!(e.contains("null"), "{e}");
    }

    #[test]
    fn status_names_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        assert_eq!(Status::parse("done"), None);
    }
}
