//! Sample-quality metrics as LlamaGen reports them for class-conditional ImageNet: FID, sFID,
//! Inception Score, precision and recall of OpenAI's ADM evaluator
//! (`evaluations/c2i/evaluator.py` in the official repository), computed from Inception
//! activations.
//!
//! Invariants enforced here (each checked against a numpy/scipy run of the evaluator's formulas,
//! `tests/fixtures/make_reference.py`):
//! - Statistics are the mean and the unbiased covariance (`np.cov(rowvar=False)`) in float64.
//! - The Fréchet distance is `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`. The trace of
//!   the root is taken as the sum of the square roots of the eigenvalues of the symmetric
//!   `S1^1/2 S2 S1^1/2`, which has the eigenvalues of `S1 S2`; eigenvalues below zero (rounding
//!   of a rank-deficient product) count as zero. This equals the real part of the trace of
//!   scipy's `sqrtm` that the evaluator keeps, without its Schur iteration or its failure modes.
//! - The Inception Score splits the softmax rows into groups of 5000 in order and averages
//!   `exp(mean KL(p(y|x) || p(y)))` over the groups; a probability of exactly 0 contributes 0 (the
//!   limit of `p log p`), where the evaluator's numpy returns NaN.
//! - Precision and recall use the evaluator's distance block: squared distances
//!   `max(|u|^2 - 2 u.v + |v|^2, 0)` from inputs rounded to float16 with every intermediate rounded
//!   to float16, per block of 10,000 × 10,000, falling back to float32 for a block with any
//!   non-finite entry; radii are the k-th nearest neighbour's distance (k = 3, the point itself
//!   not counted); a point is covered when its distance to some point of the other set is at most
//!   that point's radius.

use faer::{Mat, Side};
use half::f16;
use rayon::prelude::*;

pub mod batch;
pub mod clean;
pub mod clip_score;
pub mod inception;

/// What went wrong while computing a metric.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Arrays whose sizes do not fit together, or too few rows for a statistic.
    #[error("{0}")]
    Shape(String),
    /// An eigendecomposition did not converge.
    #[error("eigendecomposition failed: {0}")]
    Linalg(String),
    /// An input file (batch, model) is unreadable or not what the evaluator takes; the message
    /// names it.
    #[error("{0}")]
    Input(String),
    /// An error of another library (the ONNX Runtime loader).
    #[error(transparent)]
    External(Box<dyn std::error::Error + Send + Sync>),
}

impl EvalError {
    pub fn external(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        EvalError::External(Box::new(e))
    }
}

/// The metrics of a sample batch against a reference, as the evaluator prints them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub inception_score: f64,
    pub fid: f64,
    pub sfid: f64,
    /// None when the reference has no images (statistics only).
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub samples: usize,
    /// Reference images (0 when only statistics were given).
    pub reference_images: usize,
    /// Where the reference statistics came from: `file` (mu/sigma in the batch) or `images`.
    pub reference_statistics: &'static str,
}

/// A reference batch: its images' activations and/or its precomputed statistics (pool, spatial).
pub struct Reference<'a> {
    pub activations: Option<&'a inception::Activations>,
    pub statistics: Option<(FidStats, FidStats)>,
}

/// The evaluator's metrics of `sample` against `reference`: Inception Score of the samples, FID
/// and sFID against the reference statistics (given, else of its images), precision and recall
/// against its images.
pub fn evaluate(sample: &inception::Activations, reference: Reference<'_>) -> Result<Report> {
    let is = inception_score(&sample.probs, sample.n, sample.classes, IS_SPLIT_SIZE)?;
    let s_pool = FidStats::of(&sample.pool, sample.n, sample.pool_dim)?;
    let s_spatial = FidStats::of(&sample.spatial, sample.n, sample.spatial_dim)?;
    let (source, (r_pool, r_spatial)) = match (reference.statistics, reference.activations) {
        (Some(st), _) => ("file", st),
        (None, Some(a)) => (
            "images",
            (
                FidStats::of(&a.pool, a.n, a.pool_dim)?,
                FidStats::of(&a.spatial, a.n, a.spatial_dim)?,
            ),
        ),
        (None, None) => {
            return Err(EvalError::Input(
                "the reference has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)"
                    .into(),
            ));
        }
    };
    let (precision, recall) = match reference.activations {
        Some(a) => {
            if a.pool_dim != sample.pool_dim {
                return Err(EvalError::Shape(format!(
                    "reference features of width {}, sample features of width {}",
                    a.pool_dim, sample.pool_dim
                )));
            }
            let (p, r) = precision_recall(&a.pool, a.n, &sample.pool, sample.n, a.pool_dim, PR_K)?;
            (Some(p), Some(r))
        }
        None => (None, None),
    };
    Ok(Report {
        inception_score: is,
        fid: s_pool.frechet_distance(&r_pool)?,
        sfid: s_spatial.frechet_distance(&r_spatial)?,
        precision,
        recall,
        samples: sample.n,
        reference_images: reference.activations.map_or(0, |a| a.n),
        reference_statistics: source,
    })
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Rows per Inception Score group, as the evaluator's `split_size`.
pub const IS_SPLIT_SIZE: usize = 5000;
/// Neighbourhood size of the precision/recall manifolds.
pub const PR_K: usize = 3;
/// Rows and columns of one distance block (the evaluator's `row_batch_size`/`col_batch_size`).
pub const DISTANCE_BLOCK: usize = 10_000;

fn check_len(what: &str, data: usize, rows: usize, cols: usize) -> Result<()> {
    if rows.checked_mul(cols) != Some(data) {
        return Err(EvalError::Shape(format!(
            "{what}: {data} values are not {rows} rows of {cols}"
        )));
    }
    Ok(())
}

/// Mean and covariance of a set of activations.
#[derive(Debug, Clone, PartialEq)]
pub struct FidStats {
    /// Feature width.
    pub dim: usize,
    /// Mean, `dim` values.
    pub mu: Vec<f64>,
    /// Covariance, `dim × dim` row-major.
    pub sigma: Vec<f64>,
}

impl FidStats {
    /// Statistics of `n` rows of `d` activations (row-major).
    pub fn of(acts: &[f32], n: usize, d: usize) -> Result<FidStats> {
        check_len("activations", acts.len(), n, d)?;
        if n < 2 {
            return Err(EvalError::Shape(format!(
                "a covariance needs at least 2 rows, got {n}"
            )));
        }
        let mut mu = vec![0f64; d];
        for row in acts.chunks_exact(d) {
            for (m, &x) in mu.iter_mut().zip(row) {
                *m += x as f64;
            }
        }
        mu.iter_mut().for_each(|m| *m /= n as f64);
        let xc = Mat::<f64>::from_fn(n, d, |i, j| acts[i * d + j] as f64 - mu[j]);
        let cov = xc.transpose() * &xc;
        let scale = 1.0 / (n as f64 - 1.0);
        let sigma = (0..d * d).map(|k| cov[(k / d, k % d)] * scale).collect();
        Ok(FidStats { dim: d, mu, sigma })
    }

    /// Statistics given as mean and covariance (e.g. a reference batch's `mu`, `sigma`).
    pub fn new(mu: Vec<f64>, sigma: Vec<f64>) -> Result<FidStats> {
        let dim = mu.len();
        check_len("covariance", sigma.len(), dim, dim)?;
        Ok(FidStats { dim, mu, sigma })
    }

    fn sigma_mat(&self) -> Mat<f64> {
        let d = self.dim;
        Mat::from_fn(d, d, |i, j| self.sigma[i * d + j])
    }

    /// The Fréchet distance to `other` (FID for pool features, sFID for spatial ones).
    pub fn frechet_distance(&self, other: &FidStats) -> Result<f64> {
        if self.dim != other.dim {
            return Err(EvalError::Shape(format!(
                "statistics of width {} and {} cannot be compared",
                self.dim, other.dim
            )));
        }
        let d = self.dim;
        let (s1, s2) = (self.sigma_mat(), other.sigma_mat());
        // S1^1/2 from the eigendecomposition of the symmetric S1.
        let e1 = s1
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| EvalError::Linalg(format!("{e:?}")))?;
        let (u, s) = (e1.U(), e1.S().column_vector());
        let us = Mat::<f64>::from_fn(d, d, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
        let root1 = &us * u.transpose();
        let m = &root1 * &s2 * &root1;
        // Symmetrised against rounding before the symmetric eigenvalue routine.
        let m = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
        let ev = m
            .self_adjoint_eigenvalues(Side::Lower)
            .map_err(|e| EvalError::Linalg(format!("{e:?}")))?;
        let tr_covmean: f64 = ev.iter().map(|&l| l.max(0.0).sqrt()).sum();
        let diff: f64 = self
            .mu
            .iter()
            .zip(&other.mu)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let tr1: f64 = (0..d).map(|i| self.sigma[i * d + i]).sum();
        let tr2: f64 = (0..d).map(|i| other.sigma[i * d + i]).sum();
        Ok(diff + tr1 + tr2 - 2.0 * tr_covmean)
    }
}

/// The Inception Score of `n` softmax rows over `classes` classes, in groups of `split_size`.
pub fn inception_score(probs: &[f32], n: usize, classes: usize, split_size: usize) -> Result<f64> {
    check_len("probabilities", probs.len(), n, classes)?;
    if n == 0 || split_size == 0 {
        return Err(EvalError::Shape("no rows to score".into()));
    }
    let plogp = |p: f64, q: f64| if p > 0.0 { p * (p.ln() - q.ln()) } else { 0.0 };
    let scores: Vec<f64> = probs
        .chunks(split_size * classes)
        .map(|part| {
            let rows = part.len() / classes;
            let mut marginal = vec![0f64; classes];
            for row in part.chunks_exact(classes) {
                for (m, &p) in marginal.iter_mut().zip(row) {
                    *m += p as f64;
                }
            }
            marginal.iter_mut().for_each(|m| *m /= rows as f64);
            let kl: f64 = part
                .chunks_exact(classes)
                .map(|row| {
                    row.iter()
                        .zip(&marginal)
                        .map(|(&p, &q)| plogp(p as f64, q))
                        .sum::<f64>()
                })
                .sum::<f64>()
                / rows as f64;
            kl.exp()
        })
        .collect();
    Ok(scores.iter().sum::<f64>() / scores.len() as f64)
}

/// Squared distances between rows of `a` (`na × d`) and `b` (`nb × d`), one block, row-major
/// `na × nb`: the float16 computation if every entry is finite, else the float32 one.
fn block_distances(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let nb = b.len() / d;
    let h = |x: f32| f16::from_f32(x).to_f32();
    let round = |m: &[f32]| -> Vec<f32> { m.iter().map(|&x| h(x)).collect() };
    let (a16, b16) = (round(a), round(b));
    let norms16 = |m: &[f32]| -> Vec<f32> {
        m.chunks_exact(d)
            .map(|r| h(r.iter().map(|&x| h(x * x)).sum::<f32>()))
            .collect()
    };
    let (nu, nv) = (norms16(&a16), norms16(&b16));
    let mm = products(&a16, &b16, d);
    let mut out = vec![0f32; mm.len()];
    let finite = out
        .par_chunks_mut(nb.max(1))
        .zip(mm.par_chunks(nb.max(1)))
        .zip(&nu)
        .map(|((o, m), &u)| {
            let mut finite = true;
            for ((o, &m), &v) in o.iter_mut().zip(m).zip(&nv) {
                let x = h(h(u - h(2.0 * h(m))) + v);
                finite &= x.is_finite();
                *o = x.max(0.0);
            }
            finite
        })
        .reduce(|| true, |x, y| x && y);
    if finite {
        return out;
    }
    let norms32 = |m: &[f32]| -> Vec<f32> {
        m.chunks_exact(d)
            .map(|r| r.iter().map(|&x| x * x).sum())
            .collect()
    };
    let (nu, nv) = (norms32(a), norms32(b));
    let mm = products(a, b, d);
    out.par_chunks_mut(nb.max(1))
        .zip(mm.par_chunks(nb.max(1)))
        .zip(&nu)
        .for_each(|((o, m), &u)| {
            for ((o, &m), &v) in o.iter_mut().zip(m).zip(&nv) {
                *o = (u - 2.0 * m + v).max(0.0);
            }
        });
    out
}

/// `a · bᵀ` in float32, row-major.
fn products(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let (na, nb) = (a.len() / d, b.len() / d);
    let ma = faer::MatRef::from_row_major_slice(a, na, d);
    let mb = faer::MatRef::from_row_major_slice(b, nb, d);
    let mm = ma * mb.transpose();
    let mut out = vec![0f32; na * nb];
    for (i, row) in out.chunks_exact_mut(nb.max(1)).enumerate() {
        for (j, o) in row.iter_mut().enumerate() {
            *o = mm[(i, j)];
        }
    }
    out
}

/// Row blocks `(begin, end)` of `n` rows.
fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(DISTANCE_BLOCK)
        .map(move |b| (b, (b + DISTANCE_BLOCK).min(n)))
}

/// The squared distance of each of the `n` rows of `feats` to its `k`-th nearest other row.
/// Memory: one block of rows against all rows at a time, as the evaluator.
pub fn manifold_radii(feats: &[f32], n: usize, d: usize, k: usize) -> Result<Vec<f32>> {
    check_len("features", feats.len(), n, d)?;
    if n <= k {
        return Err(EvalError::Shape(format!(
            "a {k}-neighbour manifold needs more than {k} rows, got {n}"
        )));
    }
    let mut radii = Vec::with_capacity(n);
    for (r0, r1) in blocks(n) {
        let nr = r1 - r0;
        let mut rows = vec![0f32; nr * n];
        for (c0, c1) in blocks(n) {
            let block = block_distances(&feats[r0 * d..r1 * d], &feats[c0 * d..c1 * d], d);
            let nc = c1 - c0;
            for i in 0..nr {
                rows[i * n + c0..i * n + c1].copy_from_slice(&block[i * nc..(i + 1) * nc]);
            }
        }
        radii.par_extend(rows.par_chunks_mut(n).map(|row| {
            let (_, kth, _) = row.select_nth_unstable_by(k, |x, y| x.total_cmp(y));
            *kth
        }));
    }
    Ok(radii)
}

/// Precision (the share of samples inside the reference manifold) and recall (the share of
/// references inside the sample manifold), with `k`-neighbour manifolds.
pub fn precision_recall(
    reference: &[f32],
    n_ref: usize,
    samples: &[f32],
    n_samples: usize,
    d: usize,
    k: usize,
) -> Result<(f64, f64)> {
    let r_ref = manifold_radii(reference, n_ref, d, k)?;
    let r_smp = manifold_radii(samples, n_samples, d, k)?;
    let mut ref_in = vec![false; n_ref];
    let mut smp_in = vec![false; n_samples];
    for (r0, r1) in blocks(n_ref) {
        for (c0, c1) in blocks(n_samples) {
            let block = block_distances(&reference[r0 * d..r1 * d], &samples[c0 * d..c1 * d], d);
            let nc = c1 - c0;
            for (i, row) in block.chunks_exact(nc).enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    ref_in[r0 + i] |= x <= r_smp[c0 + j];
                    smp_in[c0 + j] |= x <= r_ref[r0 + i];
                }
            }
        }
    }
    let share = |v: &[bool]| v.iter().filter(|&&x| x).count() as f64 / v.len() as f64;
    Ok((share(&smp_in), share(&ref_in)))
}
