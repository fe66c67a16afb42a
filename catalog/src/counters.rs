//! The counters every stage reports: rows received, rows written, rows dropped by reason and
//! errors by kind. They go into the run record (`runs.report`) and the closing summary.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCounters {
    pub stage: String,
    /// Rows that reached the stage.
    pub received: u64,
    /// Rows the stage wrote (every received row is written: dropped and failed rows too, with
    /// their reason, so none is lost).
    pub written: u64,
    /// Rows rejected by a rule, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Rows that failed, by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Stage-specific figures (bytes, shards, seconds, ...).
    pub extra: BTreeMap<String, u64>,
}

impl StageCounters {
    pub fn new(stage: &str) -> Self {
        StageCounters {
            stage: stage.into(),
            ..Default::default()
        }
    }

    pub fn drop_reason(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    pub fn error_kind(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    pub fn add_extra(&mut self, name: &str, n: u64) {
        *self.extra.entry(name.to_string()).or_default() += n;
    }

    pub fn merge(&mut self, other: &StageCounters) {
        self.received += other.received;
        self.written += other.written;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.extra {
            *self.extra.entry(k.clone()).or_default() += v;
        }
    }
}

impl fmt::Display for StageCounters {
    /// A small two-column summary table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<(String, u64)> = vec![
            ("received".into(), self.received),
            ("written".into(), self.written),
        ];
        rows.extend(
            self.dropped
                .iter()
                .map(|(k, v)| (format!("dropped: {k}"), *v)),
        );
        rows.extend(self.errors.iter().map(|(k, v)| (format!("error: {k}"), *v)));
        rows.extend(self.extra.iter().map(|(k, v)| (k.clone(), *v)));
        let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(8);
        writeln!(f, "{} summary", self.stage)?;
        for (k, v) in rows {
            writeln!(f, "  {k:<w$}  {v:>12}")?;
        }
        Ok(())
    }
}
