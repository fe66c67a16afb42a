//! CLIP's text cleaning, as `clip/simple_tokenizer.py` does it before BPE:
//! `ftfy.fix_text`, `html.unescape` twice, strip, whitespace collapse, lowercase.
//!
//! Invariants enforced here:
//! - `ftfy.fix_text` (all its default fixes except the mojibake repair), `html.unescape` and
//!   `str.strip` are Python's (`llamagen_prep::text`).
//! - Whitespace is collapsed on Unicode `White_Space` (the `regex` module's `\s`); the outer strip
//!   also removes U+001C..U+001F, as Python's `str.strip` does.

use llamagen_prep::text::{ftfy_fix_text, html_unescape, py_strip};

/// CLIP's `whitespace_clean(basic_clean(text)).lower()`.
pub fn clip_clean(text: &str) -> String {
    let fixed = ftfy_fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    let stripped = py_strip(&unescaped);
    let mut collapsed = String::with_capacity(stripped.len());
    let mut in_space = false;
    for c in stripped.chars() {
        if c.is_whitespace() {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    py_strip(&collapsed).to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_collapses_and_lowercases() {
        assert_eq!(
            clip_clean("  A\t\tPhoto\n of  &amp;  CAT \u{1c}"),
            "a photo of & cat"
        );
    }
}
