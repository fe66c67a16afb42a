//! URL lists (LAION-COCO and friends) read into sample rows.
//!
//! Input files are Parquet, CSV (with a header) or JSON lines, local or on S3, read in file order
//! in bounded batches. Each row becomes a `pending` sample:
//! - `key` = `<first 8 hex digits of SHA-256 of the file name>-<row index, 10 digits>`: stable across
//!   runs and machines as long as the file keeps its name, unique across the files of one run;
//! - the URL and caption columns are configurable (LAION: `URL`, `TEXT`);
//! - LAION's optional columns are normalised: `WIDTH`/`HEIGHT` may be int, float, string or null
//!   and become `width`/`height` (Int64; null when missing, negative, NaN or unparsable);
//!   `similarity`, `pwatermark`, `punsafe` become Float64; `hash` Int64; `top_caption`,
//!   `all_captions` and `all_similarities` keep their meaning;
//! - every other column is carried through in `extra` as a JSON object (pandas' saved index
//!   `__index_level_N__` excepted);
//! - credentials in a URL (`http://user:pass@host/…`) are never stored: the `url` column holds the
//!   URL without them (see [`strip_url_credentials`]); only a downloader that was allowed to use
//!   them asks for them with [`SourceOptions::keep_url_credentials`] and strips them itself;
//! - a row without a usable URL is kept as a `failed` sample (`error_kind` = "invalid_url") whose
//!   error names the file and row, never dropped silently.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{
    CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionConfig, SessionContext,
};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::error::{CatalogError, Result};
use crate::schema::{Status, col};
use crate::storage::{self, StorageOptions};

/// Which input columns hold what.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Column with the image URL (default "URL").
    pub url_column: String,
    /// Column with the alt-text caption (default "TEXT").
    pub caption_column: String,
    /// Rows per batch read (default 8192).
    pub batch_rows: usize,
    /// Leave `user:pass@` in the URLs read (for a downloader allowed to send them, which must strip
    /// them before storing). Default false.
    pub keep_url_credentials: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            url_column: "URL".into(),
            caption_column: "TEXT".into(),
            batch_rows: 8192,
            keep_url_credentials: false,
        }
    }
}

/// The input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Parquet,
    Csv,
    Jsonl,
}

impl SourceFormat {
    /// From the file extension (`.parquet`, `.csv`, `.jsonl`, `.json`, `.ndjson`).
    pub fn from_path(path: &str) -> Result<SourceFormat> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".parquet") {
            Ok(SourceFormat::Parquet)
        } else if lower.ends_with(".csv") {
            Ok(SourceFormat::Csv)
        } else if lower.ends_with(".jsonl")
            || lower.ends_with(".json")
            || lower.ends_with(".ndjson")
        {
            Ok(SourceFormat::Jsonl)
        } else {
            Err(CatalogError::InvalidArgument(format!(
                "{path}: unknown URL-list format; use .parquet, .csv or .jsonl"
            )))
        }
    }
}

/// The name a source file is known by in `source` and in keys: its file name.
pub fn source_name(location: &str) -> String {
    location
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(location)
        .to_string()
}

/// Stable sample key of row `row` of source file `name`.
pub fn sample_key(name: &str, row: u64) -> String {
    let h = Sha256::digest(name.as_bytes());
    format!("{}-{row:010}", &hex::encode(h)[..8])
}

/// A URL list being read: raw batches in file order.
pub struct Source {
    pub location: String,
    pub name: String,
    stream: SendableRecordBatchStream,
    next_row: u64,
    opts: SourceOptions,
}

impl Source {
    /// Opens a URL list, local or `s3://bucket/key`.
    pub async fn open(
        location: &str,
        opts: &SourceOptions,
        storage_opts: &StorageOptions,
    ) -> Result<Source> {
        let format = SourceFormat::from_path(location)?;
        // One partition: batches come in file order, so row indices are stable.
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(opts.batch_rows.max(1))
            .with_repartition_file_scans(false);
        let ctx = SessionContext::new_with_config(config);
        let url = if let Some(rest) = location.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or_default();
            let st = storage::open(&format!("s3://{bucket}"), storage_opts).await?;
            let (u, store) = st.object_store()?;
            ctx.register_object_store(&u, store);
            location.to_string()
        } else {
            let p = std::path::Path::new(location.strip_prefix("file://").unwrap_or(location));
            let abs = std::fs::canonicalize(p).map_err(|e| CatalogError::io(p, e))?;
            abs.display().to_string()
        };
        let df = match format {
            SourceFormat::Parquet => ctx.read_parquet(&url, ParquetReadOptions::default()).await,
            SourceFormat::Csv => {
                let ext = std::path::Path::new(&url)
                    .extension()
                    .map(|e| format!(".{}", e.to_string_lossy()))
                    .unwrap_or_default();
                ctx.read_csv(
                    &url,
                    CsvReadOptions::new().has_header(true).file_extension(&ext),
                )
                .await
            }
            SourceFormat::Jsonl => {
                let ext = std::path::Path::new(&url)
                    .extension()
                    .map(|e| format!(".{}", e.to_string_lossy()))
                    .unwrap_or_default();
                ctx.read_json(
                    &url,
                    JsonReadOptions::default()
                        .file_extension(&ext)
                        .newline_delimited(true),
                )
                .await
            }
        }
        .map_err(|e| {
            CatalogError::InvalidArgument(format!("{location}: cannot read as {format:?}: {e}"))
        })?;
        let has_url = df
            .schema()
            .fields()
            .iter()
            .any(|f| f.name() == &opts.url_column);
        if !has_url {
            let names: Vec<String> = df
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            return Err(CatalogError::InvalidArgument(format!(
                "{location}: no URL column {:?} (columns: {})",
                opts.url_column,
                names.join(", ")
            )));
        }
        let stream = df
            .execute_stream()
            .await
            .map_err(|e| CatalogError::InvalidArgument(format!("{location}: {e}")))?;
        Ok(Source {
            location: location.to_string(),
            name: source_name(location),
            stream,
            next_row: 0,
            opts: opts.clone(),
        })
    }

    /// The next batch of sample rows (status `pending`, or `failed` for rows without a URL).
    pub async fn next_samples(&mut self) -> Option<Result<RecordBatch>> {
        let raw = match self.stream.next().await? {
            Ok(b) => b,
            Err(e) => {
                return Some(Err(CatalogError::InvalidArgument(format!(
                    "{}: error after row {}: {e}",
                    self.location, self.next_row
                ))));
            }
        };
        let first = self.next_row;
        self.next_row += raw.num_rows() as u64;
        Some(to_samples(
            &raw,
            &self.location,
            &self.name,
            first,
            &self.opts,
        ))
    }
}

fn cast_lenient(a: &ArrayRef, to: &DataType) -> Option<ArrayRef> {
    // Values that do not convert become null (e.g. a WIDTH of "n/a").
    cast_with_options(a, to, &CastOptions::default()).ok()
}

/// WIDTH/HEIGHT of any type to Int64: rounded, null if negative, NaN or unparsable.
fn dimension(a: &ArrayRef) -> Option<ArrayRef> {
    let f = cast_lenient(a, &DataType::Float64)?;
    let f = f.as_primitive::<arrow::datatypes::Float64Type>();
    let out: Int64Array = f
        .iter()
        .map(|v| {
            v.filter(|x| x.is_finite() && *x >= 0.0 && *x < 1e12)
                .map(|x| x.round() as i64)
        })
        .collect();
    Some(Arc::new(out))
}

/// The URL without the `user:pass@` of its authority; unchanged when it has none.
///
/// Works on the text (scheme `://`, then the authority up to the first `/`, `?` or `#`), so it
/// also cleans URLs that do not parse.
pub fn strip_url_credentials(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.into();
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &rest[at + 1..]).into(),
        None => url.into(),
    }
}

/// [`strip_url_credentials`] over a column.
pub fn strip_url_column(urls: &StringArray) -> StringArray {
    if !urls.iter().flatten().any(|u| u.contains('@')) {
        return urls.clone();
    }
    urls.iter()
        .map(|u| u.map(|u| strip_url_credentials(u).into_owned()))
        .collect()
}

/// Maps one raw input batch to sample columns (a subset of the sample schema).
pub fn to_samples(
    raw: &RecordBatch,
    location: &str,
    name: &str,
    first_row: u64,
    opts: &SourceOptions,
) -> Result<RecordBatch> {
    let n = raw.num_rows();
    let schema = raw.schema();
    let get = |c: &str| raw.column_by_name(c).cloned();
    let url = get(&opts.url_column)
        .and_then(|a| cast_lenient(&a, &DataType::Utf8))
        .ok_or_else(|| {
            CatalogError::InvalidArgument(format!(
                "{location}: URL column {:?} unreadable",
                opts.url_column
            ))
        })?;
    let url = url.as_string::<i32>();
    let mut columns: Vec<(Field, ArrayRef)> = Vec::new();
    let mut push = |name: &str, a: ArrayRef| {
        columns.push((Field::new(name, a.data_type().clone(), true), a));
    };
    let keys =
        StringArray::from_iter_values((0..n).map(|i| sample_key(name, first_row + i as u64)));
    push(col::KEY, Arc::new(keys));
    push(col::SOURCE, Arc::new(StringArray::from(vec![name; n])));
    push(
        col::SOURCE_ROW,
        Arc::new(Int64Array::from_iter_values(
            (0..n).map(|i| (first_row + i as u64) as i64),
        )),
    );
    let mut status = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut error = Vec::with_capacity(n);
    for i in 0..n {
        let u = url.is_valid(i).then(|| url.value(i).trim());
        let problem = match u {
            None | Some("") => Some("empty URL".to_string()),
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                let shown: String = u.chars().take(80).collect();
                Some(format!("not an http(s) URL: {shown:?}"))
            }
            _ => None,
        };
        match problem {
            Some(p) => {
                status.push(Status::Failed.as_str());
                kind.push(Some("invalid_url"));
                error.push(Some(format!(
                    "{location} row {}: {p}",
                    first_row + i as u64
                )));
            }
            None => {
                status.push(Status::Pending.as_str());
                kind.push(None);
                error.push(None);
            }
        }
    }
    if opts.keep_url_credentials {
        push(col::URL, Arc::new(url.clone()));
    } else {
        push(col::URL, Arc::new(strip_url_column(url)));
    }
    if let Some(t) = get(&opts.caption_column).and_then(|a| cast_lenient(&a, &DataType::Utf8)) {
        push(col::TEXT, t);
    }
    if let Some(t) = get("top_caption").and_then(|a| cast_lenient(&a, &DataType::Utf8)) {
        push(col::TOP_CAPTION, t);
    }
    let list_of = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    if let Some(a) = get("all_captions").and_then(|a| cast_lenient(&a, &list_of(DataType::Utf8))) {
        push(col::ALL_CAPTIONS, a);
    }
    if let Some(a) =
        get("all_similarities").and_then(|a| cast_lenient(&a, &list_of(DataType::Float64)))
    {
        push(col::ALL_SIMILARITIES, a);
    }
    if let Some(a) = get("WIDTH").and_then(|a| dimension(&a)) {
        push(col::WIDTH, a);
    }
    if let Some(a) = get("HEIGHT").and_then(|a| dimension(&a)) {
        push(col::HEIGHT, a);
    }
    for (src, dst) in [
        ("similarity", col::SIMILARITY),
        ("pwatermark", col::PWATERMARK),
        ("punsafe", col::PUNSAFE),
    ] {
        if let Some(a) = get(src).and_then(|a| cast_lenient(&a, &DataType::Float64)) {
            push(dst, a);
        }
    }
    if let Some(a) = get("hash").and_then(|a| cast_lenient(&a, &DataType::Int64)) {
        push(col::HASH, a);
    }
    push(col::STATUS, Arc::new(StringArray::from(status)));
    push(col::ERROR_KIND, Arc::new(StringArray::from(kind)));
    push(col::ERROR, Arc::new(StringArray::from(error)));
    // Everything else rides along as JSON.
    let known = [
        opts.url_column.as_str(),
        opts.caption_column.as_str(),
        "top_caption",
        "all_captions",
        "all_similarities",
        "WIDTH",
        "HEIGHT",
        "similarity",
        "pwatermark",
        "punsafe",
        "hash",
    ];
    let extra_idx: Vec<usize> = schema
        .fields()
        .iter()
        .enumerate()
        // pandas' saved index (`__index_level_0__`) is an artefact of how the file was written.
        .filter(|(_, f)| {
            !known.contains(&f.name().as_str()) && !f.name().starts_with("__index_level_")
        })
        .map(|(i, _)| i)
        .collect();
    if !extra_idx.is_empty() {
        let extra = raw.project(&extra_idx)?;
        push(col::EXTRA, Arc::new(rows_as_json(&extra)?));
    }
    let (fields, arrays): (Vec<Field>, Vec<ArrayRef>) = columns.into_iter().unzip();
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        arrays,
    )?)
}

fn rows_as_json(batch: &RecordBatch) -> Result<StringArray> {
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        w.write(batch)?;
        w.finish()?;
    }
    let text = String::from_utf8(buf).map_err(|e| CatalogError::InvalidArgument(e.to_string()))?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != batch.num_rows() {
        return Err(CatalogError::InvalidArgument(format!(
            "extra columns: {} JSON rows for {} input rows",
            lines.len(),
            batch.num_rows()
        )));
    }
    Ok(StringArray::from(lines))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_stripped() {
        for (raw, clean) in [
            ("http://user:pass@host/x.jpg", "http://host/x.jpg"),
            (
                "https://u@h.example:8080/a@b.jpg",
                "https://h.example:8080/a@b.jpg",
            ),
            ("http://a:b@c@host?q=@", "http://host?q=@"),
            ("http://:secret@host#x", "http://host#x"),
            ("http://host/path@x", "http://host/path@x"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(strip_url_credentials(raw), clean, "{raw}");
        }
    }
    use arrow::array::Float64Array;

    #[test]
    fn laion_columns_are_normalised() {
        let raw = RecordBatch::try_from_iter(vec![
            (
                "URL",
                Arc::new(StringArray::from(vec![
                    Some("http://a/x.jpg"),
                    None,
                    Some("ftp://b"),
                ])) as ArrayRef,
            ),
            (
                "TEXT",
                Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
            ),
            (
                "WIDTH",
                Arc::new(Float64Array::from(vec![Some(640.0), Some(f64::NAN), None])) as ArrayRef,
            ),
            (
                "HEIGHT",
                Arc::new(StringArray::from(vec![
                    Some("480"),
                    Some("n/a"),
                    Some("-3"),
                ])) as ArrayRef,
            ),
            (
                "LICENSE",
                Arc::new(StringArray::from(vec!["cc", "?", "x"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let b = to_samples(
            &raw,
            "dir/f.parquet",
            "f.parquet",
            100,
            &SourceOptions::default(),
        )
        .unwrap();
        let b = crate::schema::conform(&b).unwrap();
        let w = b
            .column_by_name("width")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(w.iter().collect::<Vec<_>>(), vec![Some(640), None, None]);
        let h = b
            .column_by_name("height")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![Some(480), None, None]);
        let st = b.column_by_name("status").unwrap().as_string::<i32>();
        assert_eq!(
            st.iter().collect::<Vec<_>>(),
            vec![Some("pending"), Some("failed"), Some("failed")]
        );
        let err = b.column_by_name("error").unwrap().as_string::<i32>();
        assert!(
            err.value(1).contains("dir/f.parquet row 101: empty URL"),
            "{}",
            err.value(1)
        );
        let extra = b.column_by_name("extra").unwrap().as_string::<i32>();
        assert_eq!(extra.value(0), r#"{"LICENSE":"cc"}"#);
        let key = b.column_by_name("key").unwrap().as_string::<i32>();
        assert_eq!(key.value(0), sample_key("f.parquet", 100));
        assert!(key.value(2).ends_with("-0000000102"));
    }
}
