//! img2dataset's webdataset layout, written beside the catalog for tools that read tar shards.
//!
//! Layout under the configured location (a local directory or `s3://bucket/prefix`), one folder
//! per stored size:
//!
//! ```text
//! <location>/<size>/<input name>-<first row, 10 digits>.tar
//! <location>/<size>/<input name>-<first row, 10 digits>_stats.json
//! ```
//!
//! Each tar holds, for every sample of the unit whose status is `ok` and in the order the shards
//! receive them (input order within each written batch),
//! `<key>.<jpg|png|webp>` (the stored centre crop), `<key>.txt` (the caption) and `<key>.json`
//! (key, url, caption, original size, sha256, source and row, as img2dataset writes them). The
//! stats file counts the unit's rows by status and error kind.
//!
//! Invariants:
//! - A unit's tars are stored (whole, see the storage guarantees) *before* the unit commits, and
//!   their names derive from the unit alone; a run killed in between leaves tars of an
//!   uncommitted unit, which the re-run replaces with the same samples. So every committed unit
//!   has its tars, and no tar holds a sample that is not in the catalog.
//! - Tars are built in local scratch files as samples arrive (memory stays flat whatever the
//!   unit size) by the `tar` crate: GNU headers, with GNU long-name entries for member names over
//!   100 bytes, readable by `tar`, Python's `tarfile` and the `webdataset` package. For a local location the scratch files live in its `_tmp/`
//!   folder (a killed run may leave `*.tar.partial` files there; nothing reads them and they
//!   can be deleted).
//! - Units committed by a run without a webdataset location get no tars later.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use llamagen_catalog::Storage;

use crate::{IngestError, Result};

/// Folder of a size and base name of a unit's shard: `<size>/<input name>-<first row>`.
pub fn shard_base(size: u32, unit_id: &str) -> String {
    // unit ids are `ingest:<input name>:<first row>`; the name may itself hold ':'.
    let (rest, row) = unit_id.rsplit_once(':').unwrap_or((unit_id, "0"));
    let name = rest.strip_prefix("ingest:").unwrap_or(rest);
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let row: u64 = row.parse().unwrap_or(0);
    format!("{size}/{name}-{row:010}")
}

/// One unit's tar shards (one per size), being written.
pub struct UnitTars {
    storage: Arc<dyn Storage>,
    unit_id: String,
    tars: Vec<(u32, PathBuf, tar::Builder<BufWriter<std::fs::File>>)>,
    /// Every scratch file, removed on drop if still there (stored ones have been moved).
    scratch: Vec<PathBuf>,
    /// Samples written to each size's tar (a sample lacks the sizes it was too small for).
    samples: std::collections::BTreeMap<u32, u64>,
}

fn io_err(path: &Path, e: std::io::Error) -> IngestError {
    IngestError::Webdataset(format!("{}: {e}", path.display()))
}

impl UnitTars {
    /// Starts the tars of `unit_id` for `sizes`, in the storage's scratch directory.
    pub fn create(storage: Arc<dyn Storage>, unit_id: &str, sizes: &[u32]) -> Result<UnitTars> {
        let dir = storage.scratch_dir();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let mut tars = Vec::with_capacity(sizes.len());
        for &s in sizes {
            let path = dir.join(format!(
                "wds-{}-{s}-{}.tar.partial",
                std::process::id(),
                uuid_like()
            ));
            let f = std::fs::File::create(&path).map_err(|e| io_err(&path, e))?;
            tars.push((
                s,
                path,
                tar::Builder::new(BufWriter::with_capacity(1 << 20, f)),
            ));
        }
        Ok(UnitTars {
            storage,
            unit_id: unit_id.to_string(),
            scratch: tars.iter().map(|t| t.1.clone()).collect(),
            tars,
            samples: Default::default(),
        })
    }

    /// Adds one sample: its image at every size (`(size, bytes)`), caption and json record.
    pub fn add(
        &mut self,
        key: &str,
        images: &[(u32, &[u8])],
        caption: &str,
        json: &serde_json::Value,
        mtime: u64,
    ) -> Result<()> {
        let json = serde_json::to_vec(json).expect("json values serialise");
        for (size, path, w) in &mut self.tars {
            let Some((_, data)) = images.iter().find(|(s, _)| s == size) else {
                continue;
            };
            let ext = match crate::format_of(data) {
                "jpeg" => "jpg",
                other => other,
            };
            write_entry(w, &format!("{key}.{ext}"), data, mtime).map_err(|e| io_err(path, e))?;
            write_entry(w, &format!("{key}.txt"), caption.as_bytes(), mtime)
                .map_err(|e| io_err(path, e))?;
            write_entry(w, &format!("{key}.json"), &json, mtime).map_err(|e| io_err(path, e))?;
            *self.samples.entry(*size).or_default() += 1;
        }
        Ok(())
    }

    /// Closes the tars and stores them (with their stats files) under `location`; returns the
    /// stored tar paths. `stats` is written as each size's `_stats.json`.
    pub async fn finish(mut self, stats: &serde_json::Value) -> Result<Vec<String>> {
        let mut stored = Vec::new();
        for (size, path, w) in std::mem::take(&mut self.tars) {
            // `into_inner` writes the two zero blocks that end a tar archive.
            let mut f = w.into_inner().map_err(|e| io_err(&path, e))?;
            f.flush().map_err(|e| io_err(&path, e))?;
            drop(f);
            let base = shard_base(size, &self.unit_id);
            let mut st = stats.clone();
            // Per size, as img2dataset (one run per size) counts them.
            let n = self.samples.get(&size).copied().unwrap_or(0);
            st["samples_in_tar"] = n.into();
            st["successes"] = n.into();
            st["size"] = size.into();
            self.storage
                .put(
                    &format!("{base}_stats.json"),
                    serde_json::to_vec_pretty(&st)
                        .expect("json values serialise")
                        .into(),
                )
                .await?;
            let tar = format!("{base}.tar");
            self.storage.put_file(&tar, &path).await?;
            stored.push(tar);
        }
        Ok(stored)
    }
}

impl Drop for UnitTars {
    fn drop(&mut self) {
        for path in &self.scratch {
            if path.exists() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn uuid_like() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Writes one regular-file entry (GNU header; a GNU long-name entry first when `name` is longer
/// than 100 bytes).
fn write_entry<W: Write>(
    w: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
    mtime: u64,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(data.len() as u64);
    h.set_mtime(mtime);
    w.append_data(&mut h, name, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_derive_from_the_unit() {
        assert_eq!(
            shard_base(256, "ingest:laion part 1.parquet:20000"),
            "256/laion_part_1.parquet-0000020000"
        );
        assert_eq!(
            shard_base(512, "ingest:a:b.csv:0"),
            "512/a_b.csv-0000000000"
        );
    }

    /// Names of any length come back whole (GNU long names), with their data and mtime.
    #[test]
    fn entries_with_long_names_read_back() {
        let long = format!("{}.jpg", "k".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        write_entry(&mut b, "abc.txt", b"hello", 1_700_000_000).unwrap();
        write_entry(&mut b, &long, b"\xff\xd8data", 1_700_000_001).unwrap();
        let buf = b.into_inner().unwrap();
        let mut a = tar::Archive::new(std::io::Cursor::new(buf));
        let got: Vec<(String, Vec<u8>, u64)> = a
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mtime = e.header().mtime().unwrap();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (name, data, mtime)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("abc.txt".to_string(), b"hello".to_vec(), 1_700_000_000),
                (long, b"\xff\xd8data".to_vec(), 1_700_000_001),
            ]
        );
    }
}
