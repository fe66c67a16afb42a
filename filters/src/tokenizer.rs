//! The CLIP BPE tokenizer (`clip/simple_tokenizer.py` + `clip.tokenize(text, truncate=True)`).
//!
//! Invariants enforced here:
//! - Vocabulary: 256 byte symbols (GPT-2 byte-to-unicode order), the same 256 with `</w>`, the
//!   first 48,894 merges of `bpe_simple_vocab_16e6.txt.gz` (lines 1..=48894), then
//!   `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407: 49,408 ids.
//! - Text is cleaned by [`crate::text::clip_clean`], split with CLIP's pattern (case-insensitive),
//!   each piece's UTF-8 bytes become byte symbols, the last one carrying `</w>`, and the
//!   lowest-ranked adjacent pair is merged everywhere, left to right, until no pair has a rank.
//!   The literal pieces `<|startoftext|>` / `<|endoftext|>` map to their special ids.
//! - A row is `[49406] + ids + [49407]`, cut to [`CONTEXT_LENGTH`] with the last id set to 49407
//!   when too long, then padded with 0 (the text encoder pools at the arg-max id, the first EOT).

use std::collections::HashMap;
use std::io::Read;
use std::sync::OnceLock;

use regex::Regex;

use crate::error::FilterError;
use crate::text::clip_clean;

/// Tokens per row of CLIP's text encoder.
pub const CONTEXT_LENGTH: usize = 77;
pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;
pub const VOCAB_SIZE: usize = 49408;
const MERGES: usize = 49152 - 256 - 2;

/// CLIP's merges file, bundled (openai/CLIP, MIT).
static BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");

/// The CLIP tokenizer. Build once ([`ClipTokenizer::bundled`]) and share; it is `Sync`.
pub struct ClipTokenizer {
    /// Byte → symbol id (0..256).
    byte_id: [u32; 256],
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    pattern: Regex,
}

/// GPT-2's byte order: printable Latin-1 bytes first, then the rest mapped above U+0100.
fn byte_order() -> Vec<u8> {
    let mut bs: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    for b in 0..=255u8 {
        if !bs.contains(&b) {
            bs.push(b);
        }
    }
    bs
}

/// The unicode character GPT-2's `bytes_to_unicode` assigns to each byte.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        out[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid")
        };
    }
    out
}

impl ClipTokenizer {
    /// The tokenizer with the bundled vocabulary, built once per process.
    pub fn bundled() -> &'static ClipTokenizer {
        static T: OnceLock<ClipTokenizer> = OnceLock::new();
        T.get_or_init(|| {
            ClipTokenizer::from_gz(BPE_GZ).expect("the bundled CLIP vocabulary is well-formed")
        })
    }

    /// Builds the tokenizer from the gzip'd merges file.
    pub fn from_gz(gz: &[u8]) -> Result<ClipTokenizer, FilterError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| FilterError::Vocabulary(format!("cannot read the merges file: {e}")))?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < MERGES + 1 {
            return Err(FilterError::Vocabulary(format!(
                "merges file has {} lines, wants at least {}",
                lines.len(),
                MERGES + 1
            )));
        }
        let chars = byte_chars();
        let order = byte_order();
        let mut encoder: HashMap<String, u32> = HashMap::new();
        let mut vocab: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        for &b in &order {
            vocab.push(chars[b as usize].to_string());
        }
        for &b in &order {
            vocab.push(format!("{}</w>", chars[b as usize]));
        }
        let mut pairs = Vec::with_capacity(MERGES);
        for (i, line) in lines[1..=MERGES].iter().enumerate() {
            let mut it = line.split_whitespace();
            let (Some(a), Some(b), None) = (it.next(), it.next(), it.next()) else {
                return Err(FilterError::Vocabulary(format!(
                    "merge line {} is not two symbols: {line:?}",
                    i + 1
                )));
            };
            pairs.push((a.to_string(), b.to_string()));
            vocab.push(format!("{a}{b}"));
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        for (i, v) in vocab.iter().enumerate() {
            encoder.insert(v.clone(), i as u32);
        }
        let mut byte_id = [0u32; 256];
        for b in 0..256 {
            byte_id[b] = encoder[&chars[b].to_string()];
        }
        let mut merges = HashMap::with_capacity(MERGES);
        for (rank, (a, b)) in pairs.iter().enumerate() {
            let (Some(&ia), Some(&ib), Some(&im)) = (
                encoder.get(a),
                encoder.get(b),
                encoder.get(&format!("{a}{b}")),
            ) else {
                return Err(FilterError::Vocabulary(format!(
                    "merge {rank} ({a} {b}) uses a symbol that is not in the vocabulary"
                )));
            };
            merges.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("valid pattern");
        // `</w>` variant of byte symbol i is i + 256 (same order).
        Ok(ClipTokenizer {
            byte_id,
            merges,
            pattern,
        })
    }

    /// BPE of one piece, appended to `out`.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        match piece {
            "<|startoftext|>" => return out.push(SOT),
            "<|endoftext|>" => return out.push(EOT),
            _ => {}
        }
        let bytes = piece.as_bytes();
        let mut word: Vec<u32> = bytes.iter().map(|&b| self.byte_id[b as usize]).collect();
        if let Some(last) = word.last_mut() {
            *last += 256;
        } else {
            return;
        }
        while word.len() > 1 {
            let mut best: Option<(u32, u32, u32)> = None; // rank, first, second
            for w in word.windows(2) {
                if let Some(&(rank, _)) = self.merges.get(&(w[0], w[1])) {
                    if best.is_none_or(|b| rank < b.0) {
                        best = Some((rank, w[0], w[1]));
                    }
                }
            }
            let Some((_, first, second)) = best else {
                break;
            };
            let merged = self.merges[&(first, second)].1;
            let mut next = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if word[i] == first && i + 1 < word.len() && word[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        out.extend(word);
    }

    /// Token ids of `text` without SOT/EOT (`SimpleTokenizer.encode`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let clean = clip_clean(text);
        let mut out = Vec::new();
        for m in self.pattern.find_iter(&clean) {
            self.bpe(m.as_str(), &mut out);
        }
        out
    }

    /// One row of `clip.tokenize(text, truncate=True)`: SOT, ids, EOT, zero padding to 77.
    pub fn tokenize(&self, text: &str) -> [u32; CONTEXT_LENGTH] {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH + 2);
        ids.push(SOT);
        ids.extend(self.encode(text));
        ids.push(EOT);
        if ids.len() > CONTEXT_LENGTH {
            ids.truncate(CONTEXT_LENGTH);
            ids[CONTEXT_LENGTH - 1] = EOT;
        }
        let mut row = [0u32; CONTEXT_LENGTH];
        row[..ids.len()].copy_from_slice(&ids);
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_rows() {
        let t = ClipTokenizer::bundled();
        let row = t.tokenize("a photo of a cat");
        // Reference: OpenAI CLIP's tokenizer as copied in tests/tokenizer/make_tokens.py.
        assert_eq!(&row[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(row[7..].iter().all(|&x| x == 0));
        let long = t.tokenize(&"word ".repeat(200));
        assert_eq!(long[76], EOT);
        assert_eq!(long[0], SOT);
    }
}
