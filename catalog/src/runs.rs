//! The run log: one JSON record per pipeline run under `<root>/_runs/`, shown as the `runs` table.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::storage::{Storage, join};

pub const RUNS_DIR: &str = "_runs";

/// One run of a llamagen command that writes to the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    /// The command and its arguments, as started.
    pub command: String,
    /// "running", "succeeded" or "failed".
    pub status: String,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub host: Option<String>,
    /// Counters and anything else the command reports, as JSON.
    #[serde(default)]
    pub report: serde_json::Value,
}

impl RunRecord {
    /// A new record in state "running", with a fresh time-ordered id.
    pub fn start(command: impl Into<String>) -> Self {
        RunRecord {
            run_id: uuid::Uuid::now_v7().to_string(),
            command: command.into(),
            status: "running".into(),
            started_at: Utc::now(),
            finished_at: None,
            exit_code: None,
            host: std::env::var("HOSTNAME").ok(),
            report: serde_json::Value::Null,
        }
    }

    /// Marks the run finished with an exit code (0 = succeeded).
    pub fn finish(&mut self, exit_code: i32, report: serde_json::Value) {
        self.status = if exit_code == 0 {
            "succeeded"
        } else {
            "failed"
        }
        .into();
        self.exit_code = Some(exit_code);
        self.finished_at = Some(Utc::now());
        self.report = report;
    }
}

/// Writes (or overwrites) a run's record.
pub async fn record_run(storage: &Arc<dyn Storage>, run: &RunRecord) -> Result<()> {
    let body = serde_json::to_vec_pretty(run).expect("run record serialises");
    storage
        .put(
            &join(RUNS_DIR, &format!("{}.json", run.run_id)),
            body.into(),
        )
        .await
}

/// Every run recorded under the root, oldest first.
pub async fn list_runs(storage: &Arc<dyn Storage>) -> Result<Vec<RunRecord>> {
    let mut runs = Vec::new();
    for o in storage.list(&format!("{RUNS_DIR}/")).await? {
        if !o.path.ends_with(".json") {
            continue;
        }
        let data = storage.get(&o.path).await?;
        let run: RunRecord = serde_json::from_slice(&data).map_err(|e| CatalogError::Json {
            path: format!("{}/{}", storage.root().trim_end_matches('/'), o.path),
            source: e,
        })?;
        runs.push(run);
    }
    runs.sort_by(|a, b| {
        a.started_at
            .cmp(&b.started_at)
            .then(a.run_id.cmp(&b.run_id))
    });
    Ok(runs)
}
