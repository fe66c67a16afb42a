//! First-sentence extraction for short captions.
//!
//! Rules of [`first_sentence`] (a boundary is a place where the first sentence may end):
//! - Leading whitespace is skipped; runs of whitespace inside the result become one space; the
//!   result keeps its closing punctuation and any closing quotes/brackets after it.
//! - `.`, `!`, `?` and `…` (or `...`) end a sentence only when followed, after optional closing
//!   quotes/brackets, by whitespace and then a sentence start (an uppercase or uncased letter, a
//!   digit or an opening quote/bracket), or by the end of the text. So decimals and money
//!   (`3.5`, `$2.50`), domains and URLs (`www.example.com/en`), initialisms (`U.S.`, `S.K.`)
//!   and a lowercase continuation (`e.g. a dog`, `"Fun!" appears`) never end it.
//! - A period after a title or prefix abbreviation (`St.`, `Mt.`, `Mr.`, `Mrs.`, `Ms.`, `Dr.`,
//!   `Prof.`, `No.`, `vs.`, `e.g.`, `i.e.`, `etc.`, ...) or after a single capital initial
//!   (`J. Smith`) or an initialism (`U.S. Army`) does not end it.
//! - Inside an open double quote that closes later in the same paragraph, no boundary is taken.
//! - CJK full-width `。`, `！`, `？` always end a sentence.
//! - A blank line always ends it; a single newline ends it when the next line starts a sentence.

/// Abbreviations whose period never ends a sentence (compared case-insensitively, without the
/// final period).
const ABBREVIATIONS: &[&str] = &[
    "st", "mt", "mr", "mrs", "ms", "dr", "prof", "rev", "gen", "col", "lt", "sgt", "capt", "cpt",
    "ft", "hon", "sen", "rep", "gov", "pres", "no", "nos", "vs", "v", "e.g", "i.e", "etc", "cf",
    "approx", "ca", "jr", "sr", "inc", "ltd", "co", "corp", "ave", "blvd", "rd", "mgr", "dept",
    "est", "fig", "vol", "ed", "al", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec",
];

fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '”' | '’' | '»' | ')' | ']' | '}' | '」' | '』' | '）' | '】' | '》'
    )
}

fn is_opener(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '“' | '‘' | '«' | '(' | '[' | '{' | '「' | '『' | '（' | '【' | '《'
    )
}

fn starts_sentence(c: char) -> bool {
    c.is_uppercase() || c.is_ascii_digit() || is_opener(c) || (c.is_alphabetic() && !c.is_lowercase())
}

/// The word (letters, digits and inner periods) ending right before byte `dot`.
fn word_before(text: &str, dot: usize) -> &str {
    let start = text[..dot]
        .char_indices()
        .rev()
        .take_while(|&(_, c)| c.is_alphanumeric() || c == '.')
        .last()
        .map(|(i, _)| i)
        .unwrap_or(dot);
    &text[start..dot]
}

fn is_abbreviation(word: &str) -> bool {
    if word.is_empty() {
        return false;
    }
    let lower = word.to_lowercase();
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return true;
    }
    // A single capital initial (`J.`), or an initialism (`U.S`, `S.K`, `D.C`).
    let mut chars = word.chars();
    let first = chars.next().expect("non-empty");
    if word.chars().count() == 1 && first.is_uppercase() {
        return true;
    }
    word.contains('.')
        && word
            .split('.')
            .all(|p| p.chars().count() == 1 && p.chars().all(char::is_alphabetic))
}

/// Whether an unclosed double quote is open at byte `pos` and closes later in the paragraph.
fn inside_quote(text: &str, pos: usize) -> bool {
    let para_start = text[..pos].rfind("\n\n").map(|i| i + 2).unwrap_or(0);
    let mut open = false;
    for c in text[para_start..pos].chars() {
        match c {
            '“' => open = true,
            '”' => open = false,
            '"' => open = !open,
            _ => {}
        }
    }
    if !open {
        return false;
    }
    let para_end = text[pos..].find("\n\n").map(|i| i + pos).unwrap_or(text.len());
    text[pos..para_end].contains(['"', '”'])
}

/// The first sentence of `text` (see the module rules). Empty when `text` is blank.
pub fn first_sentence(text: &str) -> String {
    let t = text.trim_start();
    let chars: Vec<(usize, char)> = t.char_indices().collect();
    let n = chars.len();
    let mut end = t.len();
    let mut k = 0;
    while k < n {
        let (i, c) = chars[k];
        match c {
            '。' | '！' | '？' => {
                let mut j = k + 1;
                while j < n && is_closer(chars[j].1) {
                    j += 1;
                }
                end = chars.get(j).map(|p| p.0).unwrap_or(t.len());
                break;
            }
            '\n' => {
                // blank line, or a new line that starts a sentence
                let mut j = k + 1;
                let mut blank = false;
                while j < n && chars[j].1.is_whitespace() {
                    if chars[j].1 == '\n' {
                        blank = true;
                    }
                    j += 1;
                }
                if !t[..i].trim().is_empty()
                    && (blank || j >= n || starts_sentence(chars[j].1))
                {
                    end = i;
                    break;
                }
            }
            '.' | '!' | '?' | '…' => {
                // the whole run of terminators (`...`, `?!`)
                let mut j = k + 1;
                while j < n && matches!(chars[j].1, '.' | '!' | '?' | '…') {
                    j += 1;
                }
                while j < n && is_closer(chars[j].1) {
                    j += 1;
                }
                let after = chars.get(j).map(|p| p.0).unwrap_or(t.len());
                let boundary = if j >= n {
                    true
                } else if chars[j].1.is_whitespace() {
                    let mut m = j;
                    while m < n && chars[m].1.is_whitespace() && chars[m].1 != '\n' {
                        m += 1;
                    }
                    m >= n || chars[m].1 == '\n' || starts_sentence(chars[m].1)
                } else {
                    false
                };
                let single_period = c == '.' && (k + 1 >= n || chars[k + 1].1 != '.');
                let abbreviation = single_period && is_abbreviation(word_before(t, i));
                let next_is_newline = t[after..].trim_start_matches([' ', '\t']).starts_with('\n');
                if boundary
                    && (!abbreviation || j >= n || next_is_newline)
                    && (j >= n || next_is_newline || !inside_quote(t, i))
                {
                    end = after;
                    break;
                }
                k = j;
                continue;
            }
            _ => {}
        }
        k += 1;
    }
    t[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// LlamaGen's `--trunc_caption` cut: everything before the first `.`.
pub fn naive_first_sentence(text: &str) -> &str {
    text.split('.').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::first_sentence as f;

    #[test]
    fn basic_rules() {
        assert_eq!(f("A dog. A cat."), "A dog.");
        assert_eq!(f("A full shot of St. Louis. Then"), "A full shot of St. Louis.");
        assert_eq!(f("It costs $2.50 today. Next"), "It costs $2.50 today.");
        assert_eq!(f("Visit www.example.com/en now. Next"), "Visit www.example.com/en now.");
        assert_eq!(f("The U.S. Army tank. Next"), "The U.S. Army tank.");
        assert_eq!(f("Wait... Then more"), "Wait...");
        assert_eq!(f("Wait... and more. X"), "Wait... and more.");
        assert_eq!(f("The words \"Fun!\" appear here. X"), "The words \"Fun!\" appear here.");
        assert_eq!(f("He said \"Stop. Go.\" Then left."), "He said \"Stop. Go.\"");
        assert_eq!(f("一只猫。一只狗。"), "一只猫。");
        assert_eq!(f("  \nTitle line\n\nBody text."), "Title line");
        assert_eq!(f("a soft\nwrap. Next"), "a soft wrap.");
        assert_eq!(f("no terminator"), "no terminator");
        assert_eq!(f("   "), "");
        assert_eq!(f("Dogs, cats, etc. are here. X"), "Dogs, cats, etc. are here.");
        assert_eq!(f("Brand \"S.K. Knives\" shown. X"), "Brand \"S.K. Knives\" shown.");
    }
}
