//! Wide columns written once: column groups stored beside the rows they belong to.
//!
//! An image rendition is 64 KB or more and a FLAN-T5-XL feature matrix about 250 KB, while the
//! rest of a row is a few hundred bytes. Stages rewrite shards copy-on-write (see
//! [`crate::stage`]), so wide columns kept in the row would be rewritten by every later stage.
//! They are not: each group of [`COLUMN_GROUPS`] is written once, by the stage that produces it.
//!
//! Invariants:
//! 1. A shard is a *base file* in the dataset's table, holding every column of the sample schema
//!    with the wide ones null, plus one *column file* per group its rows carry. A column file
//!    holds `key` and the group's columns ([`group_schema`]) for exactly the base file's rows, in
//!    the same order; readers check the keys row for row.
//! 2. The base file's `add` action names its column files (tag `llamagen.columns`: group → path,
//!    bytes, SHA-256). Readers follow those names only, so a reader sees exactly the column files
//!    of the version it loaded, and a column file is as immutable and as checked as a shard.
//! 3. A column file lives in the Delta table `<dataset>.<group>` (`samples.images`, `samples.t5`,
//!    `samples.vq`), so other engines read a group by joining it with `samples` on `key`. A
//!    writer commits its column files there after the base commit that names them, removing the
//!    ones that commit replaced. A writer that dies between the two commits leaves a group table
//!    behind the base table; [`crate::Dataset::gc`] brings every group table back to exactly the
//!    column files the latest base version names, and never deletes a file a base version names.
//! 4. A stage rewrite keeps a shard's rows and their order, so it carries the column files of the
//!    groups it does not set over to the new base file unchanged, and writes new column files
//!    only for the groups it sets.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch, new_null_array};
use arrow::datatypes::Schema;
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::schema::{COLUMN_GROUPS, col, group_columns, group_of, group_schema};

/// One column file of a shard (invariant 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnFile {
    /// Path relative to the group's table (`data/part-….parquet`).
    pub path: String,
    pub bytes: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
}

/// A shard's column files by group.
pub type ColumnFiles = BTreeMap<String, ColumnFile>;

/// The Delta table of `dataset`'s column group `group` (invariant 3).
pub fn table_name(dataset: &str, group: &str) -> String {
    format!("{dataset}.{group}")
}

/// The groups any of whose columns `schema` has, in [`COLUMN_GROUPS`] order.
pub fn groups_in(schema: &Schema) -> Vec<&'static str> {
    COLUMN_GROUPS
        .iter()
        .filter(|(_, cols)| cols.iter().any(|c| schema.field_with_name(c).is_ok()))
        .map(|(g, _)| *g)
        .collect()
}

/// The groups whose columns `projection` asks for (all groups for None).
pub fn groups_of_projection(projection: Option<&[&str]>) -> Vec<&'static str> {
    match projection {
        None => COLUMN_GROUPS.iter().map(|(g, _)| *g).collect(),
        Some(cols) => COLUMN_GROUPS
            .iter()
            .filter(|(g, _)| cols.iter().any(|c| group_of(c) == Some(g)))
            .map(|(g, _)| *g)
            .collect(),
    }
}

/// A sample-schema batch with every wide column null: what a base file holds (invariant 1).
pub fn base_part(full: &RecordBatch) -> Result<RecordBatch> {
    let schema = full.schema();
    let cols = schema
        .fields()
        .iter()
        .zip(full.columns())
        .map(|(f, c)| match group_of(f.name()) {
            Some(_) => new_null_array(f.data_type(), full.num_rows()),
            None => c.clone(),
        })
        .collect();
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// The column-file rows of `group` from a sample-schema batch.
pub fn group_part(full: &RecordBatch, group: &str) -> Result<RecordBatch> {
    let schema = group_schema(group);
    let cols = schema
        .fields()
        .iter()
        .map(|f| {
            full.column_by_name(f.name()).cloned().ok_or_else(|| {
                CatalogError::SchemaMismatch(format!("no column {:?} to store", f.name()))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// `batch` without the wide columns of the groups not in `keep`: what a stage rewrite takes
/// over from the old shard (invariant 4: the other groups stay in their column files; a group
/// the stage sets keeps the columns of it the stage does not set).
pub fn without_wide(batch: &RecordBatch, keep: &[&str]) -> Result<RecordBatch> {
    let idx: Vec<usize> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| group_of(f.name()).is_none_or(|g| keep.contains(&g)))
        .map(|(i, _)| i)
        .collect();
    Ok(batch.project(&idx)?)
}

/// Puts the columns of a group's column file (`group_batches`, any batching) into the base
/// batches (projected or whole rows), checking that the keys match row for row. `name` names
/// the column file in errors.
pub fn attach(
    base: Vec<RecordBatch>,
    group: &str,
    group_batches: &[RecordBatch],
    name: &str,
) -> Result<Vec<RecordBatch>> {
    let cols = group_columns(group).expect("a column group");
    let whole = if group_batches.len() == 1 {
        group_batches[0].clone()
    } else {
        arrow::compute::concat_batches(&group_schema(group), group_batches)?
    };
    let base_rows: usize = base.iter().map(|b| b.num_rows()).sum();
    let mismatch = |reason: String| CatalogError::CorruptShard {
        path: name.to_string(),
        reason,
    };
    if whole.num_rows() != base_rows {
        return Err(mismatch(format!(
            "{} rows, its base file has {base_rows}",
            whole.num_rows()
        )));
    }
    let keys = whole
        .column_by_name(col::KEY)
        .expect("group schema has key")
        .as_string::<i32>();
    let mut offset = 0;
    let mut out = Vec::with_capacity(base.len());
    for b in base {
        let n = b.num_rows();
        if let Some(k) = b.column_by_name(col::KEY) {
            let k = k.as_string::<i32>();
            if let Some(i) = (0..n).find(|&i| k.value(i) != keys.value(offset + i)) {
                return Err(mismatch(format!(
                    "row {} has key {:?}, its base file has {:?}",
                    offset + i,
                    keys.value(offset + i),
                    k.value(i)
                )));
            }
        }
        let schema = b.schema();
        let mut columns: Vec<_> = b.columns().to_vec();
        let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
        for c in cols {
            let Some(j) = whole.schema().index_of(c).ok() else {
                continue;
            };
            let values = whole.column(j).slice(offset, n);
            match schema.index_of(c) {
                Ok(i) => columns[i] = values,
                Err(_) => {
                    fields.push(whole.schema().field(j).clone().into());
                    columns.push(values);
                }
            }
        }
        let schema = if fields.len() == schema.fields().len() {
            schema.clone()
        } else {
            std::sync::Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
        };
        out.push(RecordBatch::try_new(schema, columns)?);
        offset += n;
    }
    Ok(out)
}
