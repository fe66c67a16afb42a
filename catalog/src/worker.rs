//! Which share of the work a worker takes: one parser for every command, one hash for every split.
//!
//! Invariants:
//! - A worker is `index` of `count` (`index < count`). It comes from `--worker INDEX/COUNT`, else
//!   from a Kubernetes Indexed Job (`JOB_COMPLETION_INDEX` with `WORKERS`), else from a Slurm array
//!   (`SLURM_ARRAY_TASK_ID` minus `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`), else 0 of 1.
//!   Every command that splits work reads it through [`worker_share`], so a pod of an Indexed
//!   Job never processes another pod's share.
//! - A piece of work (an ingest unit id, a shard path) belongs to the worker
//!   [`share_of`]`(id, count)`: the first 8 bytes of its SHA-256, big-endian, modulo `count`. The
//!   split depends only on the id, never on input order or on which worker lists it.

use sha2::{Digest, Sha256};

use crate::error::{CatalogError, Result};

/// The worker (0-based) of `count` that owns the work named `id`.
pub fn share_of(id: &str, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let h = Sha256::digest(id.as_bytes());
    (u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) % count as u64) as usize
}

/// Whether the work named `id` belongs to worker `index` of `count`.
pub fn in_share(id: &str, (index, count): (usize, usize)) -> bool {
    share_of(id, count) == index
}

/// Parses `INDEX/COUNT`.
pub fn parse_share(s: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| CatalogError::InvalidArgument(format!("worker share {s:?}: {why}"));
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| bad("expected INDEX/COUNT, e.g. 3/8"))?;
    let i: usize = i.trim().parse().map_err(|_| bad("INDEX is not a number"))?;
    let n: usize = n.trim().parse().map_err(|_| bad("COUNT is not a number"))?;
    if n == 0 || i >= n {
        return Err(bad("INDEX must be below COUNT"));
    }
    Ok((i, n))
}

/// This worker's share: from `flag` (`--worker`), else the environment `env` reads (see the
/// module rules).
pub fn worker_share_from(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(usize, usize)> {
    if let Some(f) = flag {
        return parse_share(f);
    }
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    match (env("JOB_COMPLETION_INDEX"), env("WORKERS")) {
        (Some(i), Some(n)) => return parse_share(&format!("{i}/{n}")),
        (Some(_), None) => {
            return Err(CatalogError::InvalidArgument(
                "JOB_COMPLETION_INDEX is set but WORKERS (the Job's completions) is not: set \
                 WORKERS or pass --worker INDEX/COUNT"
                    .into(),
            ));
        }
        _ => {}
    }
    if let (Some(i), Some(n)) = (env("SLURM_ARRAY_TASK_ID"), env("SLURM_ARRAY_TASK_COUNT")) {
        let min: usize = match env("SLURM_ARRAY_TASK_MIN") {
            Some(m) => m.trim().parse().map_err(|_| {
                CatalogError::InvalidArgument(format!("SLURM_ARRAY_TASK_MIN {m:?} is not a number"))
            })?,
            None => 0,
        };
        let id: usize = i.trim().parse().map_err(|_| {
            CatalogError::InvalidArgument(format!("SLURM_ARRAY_TASK_ID {i:?} is not a number"))
        })?;
        return parse_share(&format!("{}/{n}", id.saturating_sub(min)));
    }
    Ok((0, 1))
}

/// This worker's share from `--worker` or the process environment.
pub fn worker_share(flag: Option<&str>) -> Result<(usize, usize)> {
    worker_share_from(flag, |k| std::env::var(k).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<(usize, usize)> {
        worker_share_from(flag, |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn shares_from_flag_job_and_slurm() {
        assert_eq!(from(None, &[]).unwrap(), (0, 1));
        assert_eq!(from(Some("3/8"), &[("WORKERS", "2")]).unwrap(), (3, 8));
        let job = [("JOB_COMPLETION_INDEX", "1"), ("WORKERS", "4")];
        assert_eq!(from(None, &job).unwrap(), (1, 4));
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "12"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ];
        assert_eq!(from(None, &slurm).unwrap(), (2, 4));
        for bad in ["4/4", "x/2", "1", "0/0"] {
            assert!(from(Some(bad), &[]).is_err(), "{bad}");
        }
        let err = from(None, &[("JOB_COMPLETION_INDEX", "0")]).unwrap_err();
        assert!(err.to_string().contains("WORKERS"), "{err}");
    }

    #[test]
    fn shares_split_work_evenly_and_completely() {
        let ids: Vec<String> = (0..4000)
            .map(|i| format!("ingest:list.parquet:{i}"))
            .collect();
        let mut per = [0usize; 4];
        for id in &ids {
            let owners: Vec<usize> = (0..4).filter(|&w| in_share(id, (w, 4))).collect();
            assert_eq!(owners.len(), 1, "{id}");
            per[owners[0]] += 1;
        }
        assert!(per.iter().all(|&n| (900..1100).contains(&n)), "{per:?}");
    }
}
