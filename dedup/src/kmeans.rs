//! Spherical k-means for semantic dedup (SemDeDup clusters L2-normalised CLIP embeddings by
//! cosine similarity before comparing pairs inside each cluster).
//!
//! Invariants enforced here:
//! - Inputs and centroids are L2-normalised; similarity is the dot product; a point belongs to the
//!   centroid of highest similarity, the lowest index on ties.
//! - Training is deterministic: k-means++ seeding from a seeded generator over the points in the
//!   order given (callers sort their sample by key hash), then Lloyd iterations until no point
//!   moves or `iterations` is reached. An emptied cluster keeps its previous centroid.
//! - A [`Centroids`] digest covers every bit of every centroid, so a stage named after it is
//!   re-run exactly when the centroids change.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// Trained centroids, `k` rows of `dim` floats, each of unit length.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Centroids {
    pub dim: usize,
    pub values: Vec<Vec<f32>>,
}

/// `v` scaled to unit length (unchanged when its norm is zero).
pub fn normalise(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / n) as f32);
    }
}

/// Dot product in f32, eight partial sums added in a fixed order (deterministic for given inputs).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

impl Centroids {
    pub fn k(&self) -> usize {
        self.values.len()
    }

    /// The index of the most similar centroid (lowest index on ties).
    pub fn assign(&self, v: &[f32]) -> usize {
        let mut best = (0, f32::NEG_INFINITY);
        for (i, c) in self.values.iter().enumerate() {
            let s = dot(v, c);
            if s > best.1 {
                best = (i, s);
            }
        }
        best.0
    }

    /// Hex digest of the dimensions and every centroid's bits.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.dim as u64).to_le_bytes());
        h.update((self.k() as u64).to_le_bytes());
        for c in &self.values {
            for x in c {
                h.update(x.to_le_bytes());
            }
        }
        hex::encode(&h.finalize()[..6])
    }

    /// Trains `k` centroids (at most one per point) on unit-length `points`.
    pub fn train(points: &[Vec<f32>], k: usize, iterations: usize, seed: u64) -> Centroids {
        let dim = points.first().map_or(0, |p| p.len());
        let k = k.min(points.len()).max(1);
        if points.is_empty() {
            return Centroids {
                dim,
                values: Vec::new(),
            };
        }
        let mut rng = StdRng::seed_from_u64(seed);
        // k-means++ seeding on the cosine distance 1 - s.
        let mut centroids: Vec<Vec<f32>> = vec![points[rng.random_range(0..points.len())].clone()];
        let mut dist: Vec<f64> = points
            .iter()
            .map(|p| (1.0 - dot(p, &centroids[0]) as f64).max(0.0))
            .collect();
        while centroids.len() < k {
            let total: f64 = dist.iter().sum();
            let pick = if total <= 0.0 {
                // every point sits on a centroid: take the first not chosen yet
                match (0..points.len()).find(|&i| !centroids.contains(&points[i])) {
                    Some(i) => i,
                    None => break,
                }
            } else {
                let mut r = rng.random::<f64>() * total;
                let mut i = 0;
                while i + 1 < dist.len() && r >= dist[i] {
                    r -= dist[i];
                    i += 1;
                }
                i
            };
            let c = points[pick].clone();
            for (d, p) in dist.iter_mut().zip(points) {
                *d = d.min((1.0 - dot(p, &c) as f64).max(0.0));
            }
            centroids.push(c);
        }
        let mut cs = Centroids {
            dim,
            values: centroids,
        };
        let mut labels = vec![usize::MAX; points.len()];
        for _ in 0..iterations {
            let mut moved = false;
            for (l, p) in labels.iter_mut().zip(points) {
                let a = cs.assign(p);
                if *l != a {
                    *l = a;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
            let mut sums = vec![vec![0f64; dim]; cs.k()];
            let mut counts = vec![0usize; cs.k()];
            for (l, p) in labels.iter().zip(points) {
                counts[*l] += 1;
                for (s, x) in sums[*l].iter_mut().zip(p) {
                    *s += *x as f64;
                }
            }
            for (i, (s, n)) in sums.into_iter().zip(counts).enumerate() {
                if n > 0 {
                    let mut c: Vec<f32> = s.into_iter().map(|x| x as f32).collect();
                    normalise(&mut c);
                    cs.values[i] = c;
                }
            }
        }
        cs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separates_three_directions() {
        let mut rng = StdRng::seed_from_u64(1);
        let axes = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut pts = Vec::new();
        for i in 0..90 {
            let a = axes[i % 3];
            let mut v: Vec<f32> = a.iter().map(|x| x + rng.random_range(-0.1..0.1)).collect();
            normalise(&mut v);
            pts.push(v);
        }
        let c = Centroids::train(&pts, 3, 50, 7);
        assert_eq!(c.k(), 3);
        for (i, p) in pts.iter().enumerate() {
            let same = c.assign(p);
            assert_eq!(same, c.assign(&pts[i % 3]), "point {i}");
        }
        let labels: std::collections::BTreeSet<usize> = (0..3).map(|i| c.assign(&pts[i])).collect();
        assert_eq!(labels.len(), 3);
        assert_eq!(c, Centroids::train(&pts, 3, 50, 7), "deterministic");
        assert_eq!(Centroids::train(&pts[..2], 5, 10, 0).k(), 2);
    }
}
