//! Leases: at most one live holder per name, on any storage backend, with expiry.
//!
//! Layout: `_leases/<name>/<generation:020>.json`, one small JSON record per generation.
//!
//! Invariants of the lease protocol:
//! 1. The lease's state is its highest generation. It is *free* when there is none, when that
//!    record is released, or when its `expires_at` has passed; otherwise it is held by that
//!    record's `holder`.
//! 2. Every change (acquire, renew, release) writes generation g+1 on top of the g it read with
//!    an atomic put-if-absent (local: hard link; S3: `If-None-Match: *`). Of two processes racing
//!    for the same g+1 exactly one wins; the other re-reads. So two live holders never coexist,
//!    even when both saw the lease expire at the same moment.
//! 3. A holder that cannot write g+1 on renewal (someone took the lease after it expired) has
//!    lost it and must stop writing ([`CatalogError::LeaseLost`]).
//! 4. Expiry is judged by the reader's clock against the writer's `expires_at`: clocks must agree
//!    to well within the time-to-live (minutes, not seconds). A record written on this host by a
//!    process that no longer exists (`/proc/<pid>` is gone: it was killed) counts as expired, so a
//!    re-run after a crash on the same machine does not wait for the time-to-live.
//! 5. Old generations are garbage: a holder deletes generations more than two below its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{CatalogError, Result};
use crate::storage::{PutOutcome, Storage, join};

/// Directory of every lease under a storage root.
pub const LEASES_DIR: &str = "_leases";

/// One generation of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub host: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub released: bool,
}

/// A lease this process holds.
#[derive(Debug, Clone)]
pub struct Lease {
    storage: Arc<dyn Storage>,
    name: String,
    holder: String,
    ttl: Duration,
    generation: u64,
    acquired_at: DateTime<Utc>,
}

fn dir(name: &str) -> String {
    join(LEASES_DIR, name)
}

fn gen_path(name: &str, generation: u64) -> String {
    join(&dir(name), &format!("{generation:020}.json"))
}

/// The highest generation of `name` and its record, if any.
pub async fn current(storage: &Arc<dyn Storage>, name: &str) -> Result<Option<(u64, LeaseRecord)>> {
    let mut gens: Vec<u64> = storage
        .list(&format!("{}/", dir(name)))
        .await?
        .iter()
        .filter_map(|o| {
            o.path
                .rsplit('/')
                .next()?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    gens.sort_unstable();
    // The newest readable generation (a deleted one, raced by gc, is skipped).
    for &g in gens.iter().rev() {
        let path = gen_path(name, g);
        match storage.get(&path).await {
            Ok(b) => {
                let rec: LeaseRecord =
                    serde_json::from_slice(&b).map_err(|e| CatalogError::Json {
                        path: path.clone(),
                        source: e,
                    })?;
                return Ok(Some((g, rec)));
            }
            Err(CatalogError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether `rec` was written on this host by a process that has exited (Linux `/proc`).
fn holder_is_dead(rec: &LeaseRecord) -> bool {
    let proc_fs = std::path::Path::new("/proc/self");
    match (rec.pid, &rec.host) {
        (Some(pid), Some(host)) if proc_fs.exists() && hostname().as_ref() == Some(host) => {
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        _ => false,
    }
}

impl Lease {
    /// Takes lease `name` for `holder` for `ttl`, or fails with [`CatalogError::LeaseHeld`]
    /// naming the live holder.
    pub async fn acquire(
        storage: Arc<dyn Storage>,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        for _ in 0..16 {
            let cur = current(&storage, name).await?;
            let now = Utc::now();
            let next = match &cur {
                Some((g, rec)) => {
                    if !rec.released && rec.expires_at > now && !holder_is_dead(rec) {
                        return Err(CatalogError::LeaseHeld {
                            path: dir(name),
                            holder: rec.holder.clone(),
                            expires_at: rec.expires_at.to_rfc3339(),
                        });
                    }
                    g + 1
                }
                None => 1,
            };
            let mut lease = Lease {
                storage: storage.clone(),
                name: name.to_string(),
                holder: holder.to_string(),
                ttl,
                generation: next - 1,
                acquired_at: now,
            };
            match lease.write(false).await? {
                PutOutcome::Created => {
                    lease.collect_garbage().await;
                    return Ok(lease);
                }
                PutOutcome::AlreadyExists => continue,
            }
        }
        Err(CatalogError::InvalidArgument(format!(
            "lease {}: too much contention",
            dir(name)
        )))
    }

    /// Writes generation `self.generation + 1`.
    async fn write(&mut self, released: bool) -> Result<PutOutcome> {
        let now = Utc::now();
        let rec = LeaseRecord {
            holder: self.holder.clone(),
            host: hostname(),
            pid: Some(std::process::id()),
            acquired_at: self.acquired_at,
            expires_at: if released {
                now
            } else {
                now + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::hours(1))
            },
            released,
        };
        let body = serde_json::to_vec_pretty(&rec).map_err(|e| CatalogError::Json {
            path: gen_path(&self.name, self.generation + 1),
            source: e,
        })?;
        let out = self
            .storage
            .put_if_absent(
                &gen_path(&self.name, self.generation + 1),
                Bytes::from(body),
            )
            .await?;
        if out == PutOutcome::Created {
            self.generation += 1;
        }
        Ok(out)
    }

    /// Extends the lease by its time-to-live from now; [`CatalogError::LeaseLost`] if another
    /// holder took it in the meantime.
    pub async fn renew(&mut self) -> Result<()> {
        match self.write(false).await? {
            PutOutcome::Created => {
                self.collect_garbage().await;
                Ok(())
            }
            PutOutcome::AlreadyExists => Err(self.lost().await),
        }
    }

    async fn lost(&self) -> CatalogError {
        let by = match current(&self.storage, &self.name).await {
            Ok(Some((_, r))) => r.holder,
            _ => "another process".into(),
        };
        CatalogError::LeaseLost {
            path: dir(&self.name),
            holder: by,
        }
    }

    /// Gives the lease up.
    pub async fn release(mut self) -> Result<()> {
        match self.write(true).await? {
            PutOutcome::Created => {
                self.collect_garbage().await;
                Ok(())
            }
            PutOutcome::AlreadyExists => Err(self.lost().await),
        }
    }

    async fn collect_garbage(&self) {
        if self.generation <= 3 {
            return;
        }
        for g in self.generation.saturating_sub(6)..self.generation - 2 {
            let _ = self.storage.delete(&gen_path(&self.name, g)).await;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage;

    async fn mem() -> Arc<dyn Storage> {
        storage::open(
            &format!("memory://lease-{}", uuid::Uuid::new_v4()),
            &Default::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn second_holder_is_refused_until_release() {
        let s = mem().await;
        let a = Lease::acquire(s.clone(), "job", "a", Duration::from_secs(60))
            .await
            .unwrap();
        match Lease::acquire(s.clone(), "job", "b", Duration::from_secs(60)).await {
            Err(CatalogError::LeaseHeld { holder, .. }) => assert_eq!(holder, "a"),
            other => panic!("expected LeaseHeld, got {other:?}"),
        }
        a.release().await.unwrap();
        let b = Lease::acquire(s.clone(), "job", "b", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(current(&s, "job").await.unwrap().unwrap().1.holder, "b");
        b.release().await.unwrap();
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over_and_the_old_holder_loses_it() {
        let s = mem().await;
        let mut a = Lease::acquire(s.clone(), "job", "a", Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let b = Lease::acquire(s.clone(), "job", "b", Duration::from_secs(60))
            .await
            .unwrap();
        match a.renew().await {
            Err(CatalogError::LeaseLost { holder, .. }) => assert_eq!(holder, "b"),
            other => panic!("expected LeaseLost, got {other:?}"),
        }
        b.release().await.unwrap();
    }

    #[tokio::test]
    async fn renewals_keep_the_lease_and_old_generations_are_removed() {
        let s = mem().await;
        let mut a = Lease::acquire(s.clone(), "job", "a", Duration::from_secs(60))
            .await
            .unwrap();
        for _ in 0..10 {
            a.renew().await.unwrap();
        }
        let files = s.list(&format!("{LEASES_DIR}/job/")).await.unwrap();
        assert!(files.len() <= 6, "{} generations kept", files.len());
        assert!(
            Lease::acquire(s.clone(), "job", "b", Duration::from_secs(60))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn racing_acquirers_get_exactly_one_lease() {
        let s = mem().await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                Lease::acquire(s, "race", &format!("w{i}"), Duration::from_secs(60)).await
            }));
        }
        let mut won = 0;
        for t in tasks {
            if t.await.unwrap().is_ok() {
                won += 1;
            }
        }
        assert_eq!(won, 1);
    }
}
