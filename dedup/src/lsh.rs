//! Banded LSH for Hamming distance on 64-bit hashes, with a recall guarantee.
//!
//! Invariant: the 64 bits are cut into `blocks` contiguous blocks (sizes differ by at most one
//! bit). A *band* is a choice of `blocks - threshold` blocks, and its key is the hash with every
//! other bit masked off. Two hashes within `threshold` bits of each other differ in at most
//! `threshold` blocks, so at least `blocks - threshold` blocks are equal and they share the key of
//! at least one band: every pair within the threshold is a candidate (pigeonhole, as Manku et al.,
//! "Detecting near-duplicates for web crawling", WWW 2007). Pairs further apart are candidates
//! only by chance; each candidate is verified by its exact distance.
//!
//! Cost: each band is one equi-join on a masked key of `64·(blocks − threshold)/blocks` bits, so
//! with N uniformly spread hashes a band yields about N²/2 / 2^bits chance candidates. The
//! default number of blocks ([`default_blocks`]) is the smallest that keeps keys at 24 bits or
//! more: about N²/2^25 chance candidates per band (3 million for 10 million hashes).

use crate::error::DedupError;

/// Minimum bits of a band key of [`default_blocks`].
pub const MIN_KEY_BITS: u32 = 24;

/// The bands of `blocks` blocks for `threshold`: one mask per choice of `blocks - threshold`
/// blocks, in lexicographic order of the choice.
pub fn band_masks(threshold: u32, blocks: u32) -> Result<Vec<u64>, DedupError> {
    if blocks == 0 || blocks > 64 || threshold >= blocks {
        return Err(DedupError::Config(format!(
            "LSH needs more blocks than the Hamming threshold (threshold {threshold}, blocks {blocks}, at most 64)"
        )));
    }
    let keep = (blocks - threshold) as usize;
    let count = binomial(blocks as u64, keep as u64);
    if count > 10_000 {
        return Err(DedupError::Config(format!(
            "{count} bands for threshold {threshold} with {blocks} blocks; use fewer blocks or a lower threshold"
        )));
    }
    let block_masks: Vec<u64> = (0..blocks)
        .map(|b| {
            let lo = 64 * b / blocks;
            let hi = 64 * (b + 1) / blocks;
            let width = hi - lo;
            let ones = if width == 64 {
                u64::MAX
            } else {
                (1u64 << width) - 1
            };
            ones << lo
        })
        .collect();
    let mut out = Vec::with_capacity(count as usize);
    let mut choice: Vec<usize> = (0..keep).collect();
    loop {
        out.push(choice.iter().fold(0u64, |m, &b| m | block_masks[b]));
        // next combination
        let n = blocks as usize;
        let mut i = keep;
        while i > 0 && choice[i - 1] == n - keep + i - 1 {
            i -= 1;
        }
        if i == 0 {
            break;
        }
        choice[i - 1] += 1;
        for j in i..keep {
            choice[j] = choice[j - 1] + 1;
        }
    }
    Ok(out)
}

/// The smallest number of blocks whose band keys keep at least [`MIN_KEY_BITS`] bits (a block
/// has at least `64 / blocks` bits).
pub fn default_blocks(threshold: u32) -> u32 {
    (threshold + 1..=64)
        .find(|&m| (m - threshold) * (64 / m) >= MIN_KEY_BITS)
        .unwrap_or(64)
}

fn binomial(n: u64, k: u64) -> u64 {
    (0..k).fold(1u64, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phash::hamming;

    #[test]
    fn every_pair_within_the_threshold_shares_a_band() {
        // Exhaustive over flip patterns is too large; random pairs at every distance up to t.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for t in 0..=10 {
            let blocks = default_blocks(t);
            let masks = band_masks(t, blocks).unwrap();
            assert!(
                masks.iter().all(|m| m.count_ones() >= MIN_KEY_BITS),
                "t={t}"
            );
            for _ in 0..2000 {
                let a = next();
                let mut b = a;
                let d = (next() % (t as u64 + 1)) as u32;
                while hamming(a, b) < d {
                    b ^= 1 << (next() % 64);
                }
                assert!(masks.iter().any(|m| a & m == b & m), "t={t} d={d}");
            }
        }
    }

    #[test]
    fn band_counts_and_refusals() {
        assert_eq!(band_masks(0, 1).unwrap(), vec![u64::MAX]);
        assert_eq!(band_masks(1, 4).unwrap().len(), 4);
        assert_eq!(band_masks(2, 4).unwrap().len(), 6);
        assert_eq!(default_blocks(4), 7);
        assert!(band_masks(4, 4).is_err());
        assert!(band_masks(20, 60).is_err());
    }
}
