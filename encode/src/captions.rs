//! Long captions from caption files, and the choice of each sample's caption.
//!
//! Invariants:
//! - A caption file is JSON lines or Parquet. A record names its sample by `key`, `url` or
//!   `image_path` and carries its caption in `long_caption`, `caption` or `text`: a string, or a
//!   list of strings. LlamaGen's t2i files (`{"image_path": …, "text": [blip, llava,
//!   llava_first]}`) hold three captions; [`CaptionFileOptions::list_entry`] picks one by index,
//!   as the official `extract_t5_feature.py --caption-key` does (default here: the LLaVA caption,
//!   index 1, the long caption LlamaGen's stage II trains on; the official script defaults to
//!   `blip`). A record whose list is too short, or whose chosen entry is blank, is skipped as
//!   `blank_caption`; with `list_entry = None` the first non-blank entry is used. Field names can
//!   be overridden.
//! - An image path joins on its file stem (`00001/000012345.jpg` → `000012345`), compared with
//!   the sample key.
//! - A record that cannot be used (bad JSON, not UTF-8, no join field, blank caption) is counted
//!   by reason, never fatal. A later record for the same join value replaces an earlier one and
//!   is counted as a duplicate.
//! - [`choose_caption`] takes the long caption when it is not blank, else the fallbacks in the
//!   configured order; the returned source names the text used ("long", "top_caption", "text").

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;

use crate::error::EncodeError;

type Result<T> = std::result::Result<T, EncodeError>;

/// Which sample field a caption record joins on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinOn {
    /// The sample `key` (record field `key`).
    Key,
    /// The sample `url` (record field `url`).
    Url,
    /// The sample `key` against the file stem of the record's `image_path`.
    ImagePath,
}

impl JoinOn {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "key" => Some(Self::Key),
            "url" => Some(Self::Url),
            "image_path" | "image-path" => Some(Self::ImagePath),
            _ => None,
        }
    }
    fn default_field(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Url => "url",
            Self::ImagePath => "image_path",
        }
    }
}

/// Where to find captions in the files.
#[derive(Debug, Clone)]
pub struct CaptionFileOptions {
    /// What records join on. Default [`JoinOn::Key`].
    pub join: JoinOn,
    /// Record field holding the join value. Default: `key`, `url` or `image_path` per `join`.
    pub join_field: Option<String>,
    /// Record field holding the caption. Default: the first of `long_caption`, `caption`,
    /// `text` that the record has.
    pub text_field: Option<String>,
    /// Which entry of a list-valued caption to use (see [`CaptionKey`]); `None`: the first
    /// non-blank one. Default `Some(1)` (LlamaGen's `llava`).
    pub list_entry: Option<usize>,
}

/// LlamaGen's names for the entries of a t2i caption list (`--caption-key` of the official
/// `language/extract_t5_feature.py`).
pub struct CaptionKey;

impl CaptionKey {
    /// `blip`, `llava`, `llava_first`, an index, or `first` (the first non-blank entry).
    pub fn parse(s: &str) -> Option<Option<usize>> {
        match s {
            "blip" => Some(Some(0)),
            "llava" => Some(Some(1)),
            "llava_first" => Some(Some(2)),
            "first" => Some(None),
            n => n.parse().ok().map(Some),
        }
    }
}

impl Default for CaptionFileOptions {
    fn default() -> Self {
        Self {
            join: JoinOn::Key,
            join_field: None,
            text_field: None,
            list_entry: Some(1),
        }
    }
}

const TEXT_FIELDS: [&str; 3] = ["long_caption", "caption", "text"];

/// Long captions by join value, with what reading them found.
#[derive(Debug, Default)]
pub struct CaptionIndex {
    pub join: Option<JoinOn>,
    pub captions: HashMap<String, String>,
    /// Records read (lines or rows).
    pub records: u64,
    /// Records not used, by reason (`bad_json`, `not_utf8`, `no_join_field`, `blank_caption`).
    pub skipped: BTreeMap<String, u64>,
    /// Records whose join value was seen before (the later one wins).
    pub duplicates: u64,
}

/// The join value of `raw` for `join` (image paths reduce to their file stem).
pub fn join_value(join: JoinOn, raw: &str) -> String {
    match join {
        JoinOn::ImagePath => {
            let name = raw.rsplit(['/', '\\']).next().unwrap_or(raw);
            match name.rfind('.') {
                Some(i) if i > 0 => name[..i].to_string(),
                _ => name.to_string(),
            }
        }
        _ => raw.to_string(),
    }
}

impl CaptionIndex {
    fn skip(&mut self, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_default() += 1;
    }

    fn insert(&mut self, join: String, caption: String) {
        if self.captions.insert(join, caption).is_some() {
            self.duplicates += 1;
        }
    }

    /// Reads every file (`.parquet`, else JSON lines) into one index.
    pub fn read(files: &[&Path], opts: &CaptionFileOptions) -> Result<Self> {
        let mut idx = CaptionIndex {
            join: Some(opts.join),
            ..Default::default()
        };
        for f in files {
            if f.extension().is_some_and(|e| e == "parquet") {
                idx.read_parquet(f, opts)?;
            } else {
                idx.read_jsonl(f, opts)?;
            }
        }
        Ok(idx)
    }

    fn read_jsonl(&mut self, path: &Path, opts: &CaptionFileOptions) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| EncodeError::io(path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let join_field = opts
            .join_field
            .clone()
            .unwrap_or_else(|| opts.join.default_field().to_string());
        let mut buf = Vec::new();
        let mut line_no = 0usize;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| EncodeError::io(path, e))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            let Ok(line) = std::str::from_utf8(&buf) else {
                self.records += 1;
                self.skip("not_utf8");
                continue;
            };
            if line.trim().is_empty() {
                continue;
            }
            self.records += 1;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                self.skip("bad_json");
                continue;
            };
            let Some(obj) = v.as_object() else {
                self.skip("bad_json");
                continue;
            };
            let Some(j) = obj.get(&join_field).and_then(|v| v.as_str()) else {
                self.skip("no_join_field");
                continue;
            };
            let text = match &opts.text_field {
                Some(f) => obj.get(f),
                None => TEXT_FIELDS.iter().find_map(|f| obj.get(*f)),
            };
            let caption = match text {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(a)) => {
                    let entries: Vec<&str> = a.iter().map(|v| v.as_str().unwrap_or("")).collect();
                    pick(&entries, opts.list_entry).map(str::to_string)
                }
                Some(serde_json::Value::Null) | None => None,
                Some(_) => {
                    return Err(EncodeError::CaptionFile {
                        path: path.to_path_buf(),
                        line: line_no,
                        reason: "the caption field is neither a string nor a list of strings"
                            .into(),
                    });
                }
            };
            match caption {
                Some(c) if !c.trim().is_empty() => self.insert(join_value(opts.join, j), c),
                _ => self.skip("blank_caption"),
            }
        }
        Ok(())
    }

    fn read_parquet(&mut self, path: &Path, opts: &CaptionFileOptions) -> Result<()> {
        let err = |reason: String| EncodeError::CaptionParquet {
            path: path.to_path_buf(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| EncodeError::io(path, e))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(e.to_string()))?
            .build()
            .map_err(|e| err(e.to_string()))?;
        let join_field = opts
            .join_field
            .clone()
            .unwrap_or_else(|| opts.join.default_field().to_string());
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let schema = batch.schema();
            let text_field = match &opts.text_field {
                Some(f) => f.clone(),
                None => TEXT_FIELDS
                    .iter()
                    .find(|f| schema.field_with_name(f).is_ok())
                    .map(|f| f.to_string())
                    .ok_or_else(|| err(format!("no caption column (one of {TEXT_FIELDS:?})")))?,
            };
            let keys = string_column(&batch, &join_field).map_err(err)?;
            let texts = caption_column(&batch, &text_field, opts.list_entry).map_err(err)?;
            for (k, t) in keys.into_iter().zip(texts) {
                self.records += 1;
                let Some(k) = k else {
                    self.skip("no_join_field");
                    continue;
                };
                match t {
                    Some(t) if !t.trim().is_empty() => self.insert(join_value(opts.join, &k), t),
                    _ => self.skip("blank_caption"),
                }
            }
        }
        Ok(())
    }

    /// The long caption of a sample, if any.
    pub fn lookup(&self, key: &str, url: Option<&str>) -> Option<&str> {
        let j = match self.join? {
            JoinOn::Url => url?,
            _ => key,
        };
        self.captions.get(j).map(String::as_str)
    }
}

fn string_column(
    batch: &RecordBatch,
    name: &str,
) -> std::result::Result<Vec<Option<String>>, String> {
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column {name:?}"))?;
    let c =
        arrow::compute::cast(c, &DataType::Utf8).map_err(|e| format!("column {name:?}: {e}"))?;
    let s = c.as_string::<i32>();
    Ok((0..s.len())
        .map(|i| (!s.is_null(i)).then(|| s.value(i).to_string()))
        .collect())
}

/// The chosen entry of a caption list (see [`CaptionFileOptions::list_entry`]).
fn pick<'a>(entries: &[&'a str], entry: Option<usize>) -> Option<&'a str> {
    match entry {
        Some(i) => entries.get(i).copied(),
        None => entries.iter().copied().find(|s| !s.trim().is_empty()),
    }
}

fn caption_column(
    batch: &RecordBatch,
    name: &str,
    entry: Option<usize>,
) -> std::result::Result<Vec<Option<String>>, String> {
    let c = batch
        .column_by_name(name)
        .ok_or_else(|| format!("no column {name:?}"))?;
    match c.data_type() {
        DataType::List(_) | DataType::LargeList(_) => {
            let l = arrow::compute::cast(
                c,
                &DataType::List(std::sync::Arc::new(arrow::datatypes::Field::new(
                    "item",
                    DataType::Utf8,
                    true,
                ))),
            )
            .map_err(|e| format!("column {name:?}: {e}"))?;
            let l = l.as_list::<i32>();
            Ok((0..l.len())
                .map(|i| {
                    if l.is_null(i) {
                        return None;
                    }
                    let v = l.value(i);
                    let s = v.as_string::<i32>();
                    let entries: Vec<&str> = (0..s.len())
                        .map(|j| if s.is_null(j) { "" } else { s.value(j) })
                        .collect();
                    pick(&entries, entry).map(str::to_string)
                })
                .collect())
        }
        _ => string_column(batch, name),
    }
}

/// A text a sample may fall back to when it has no long caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    TopCaption,
    Text,
}

impl Fallback {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "top_caption" => Some(Self::TopCaption),
            "text" | "alt_text" => Some(Self::Text),
            _ => None,
        }
    }
    pub fn source(self) -> &'static str {
        match self {
            Self::TopCaption => "top_caption",
            Self::Text => "text",
        }
    }
}

/// The caption a sample uses and its source name; None when every candidate is blank.
pub fn choose_caption<'a>(
    long: Option<&'a str>,
    top_caption: Option<&'a str>,
    text: Option<&'a str>,
    fallbacks: &[Fallback],
) -> Option<(&'a str, &'static str)> {
    let usable = |s: Option<&'a str>| s.filter(|s| !s.trim().is_empty());
    if let Some(l) = usable(long) {
        return Some((l, "long"));
    }
    fallbacks.iter().find_map(|f| {
        let cand = match f {
            Fallback::TopCaption => top_caption,
            Fallback::Text => text,
        };
        usable(cand).map(|c| (c, f.source()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_paths_join_on_their_stem() {
        assert_eq!(
            join_value(JoinOn::ImagePath, "00001/000012345.jpg"),
            "000012345"
        );
        assert_eq!(join_value(JoinOn::ImagePath, "abc"), "abc");
        assert_eq!(join_value(JoinOn::Url, "http://x/a.jpg"), "http://x/a.jpg");
    }

    /// LlamaGen's t2i lists are `[blip, llava, llava_first]`; the key picks one, as
    /// `extract_t5_feature.py --caption-key` does.
    #[test]
    fn caption_keys_pick_list_entries() {
        let dir = std::env::temp_dir().join(format!("caption-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t2i.jsonl");
        std::fs::write(
            &f,
            "{\"image_path\": \"0/a.jpg\", \"text\": [\"B\", \"L\", \"F\"]}\n\
             {\"image_path\": \"0/b.jpg\", \"text\": [\"B only\"]}\n",
        )
        .unwrap();
        for (key, a, b) in [
            ("blip", Some("B"), Some("B only")),
            ("llava", Some("L"), None),
            ("llava_first", Some("F"), None),
            ("first", Some("B"), Some("B only")),
        ] {
            let opts = CaptionFileOptions {
                join: JoinOn::ImagePath,
                list_entry: CaptionKey::parse(key).unwrap(),
                ..Default::default()
            };
            let index = CaptionIndex::read(&[f.as_path()], &opts).unwrap();
            assert_eq!(index.lookup("a", None), a, "{key}");
            assert_eq!(index.lookup("b", None), b, "{key}");
        }
        assert_eq!(CaptionFileOptions::default().list_entry, Some(1));
        assert!(CaptionKey::parse("t5").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fallbacks_in_order() {
        let f = [Fallback::TopCaption, Fallback::Text];
        assert_eq!(
            choose_caption(Some(" "), Some("top"), Some("alt"), &f),
            Some(("top", "top_caption"))
        );
        assert_eq!(
            choose_caption(None, None, Some("alt"), &f),
            Some(("alt", "text"))
        );
        assert_eq!(choose_caption(None, Some("top"), None, &[]), None);
        assert_eq!(
            choose_caption(Some("long"), Some("top"), None, &[]),
            Some(("long", "long"))
        );
    }
}
