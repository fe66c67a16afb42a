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
//!   `Prof.`, `No.`, `vs.`, `e.g.`, `i.e.`, ...) or a single capital initial (`J. Smith`) does
//!   not end it. After an abbreviation that may close a sentence (`etc.`, `Inc.`, `Jr.`) or an
//!   initialism (`U.S.`, `D.C.`) it ends only before a capitalised sentence-opening word (`The`,
//!   `A`, `It`, ...): `U.S. Army` goes on, `Washington, D.C. The entrance` ends.
//! - Inside a double quote still open after the terminator and its closers, that closes later in
//!   the same paragraph, no boundary is taken (`"Stop. Go." Then` ends after the quote),
//!   except where the quote closes after a space (`"... CHINA. " The`).
//! - CJK full-width `。`, `！`, `？` always end a sentence.
//! - A blank line always ends it; a single newline ends it when the next line starts a sentence.

/// Abbreviations whose period never ends a sentence (compared case-insensitively, without the
/// final period).
const ABBREVIATIONS: &[&str] = &[
    "st", "mt", "mr", "mrs", "ms", "dr", "prof", "rev", "gen", "col", "lt", "sgt", "capt", "cpt",
    "ft", "hon", "sen", "rep", "gov", "pres", "no", "nos", "vs", "v", "e.g", "i.e", "cf", "approx",
    "ca", "jr", "sr", "inc", "ltd", "co", "corp", "ave", "blvd", "rd", "mgr", "dept", "est", "fig",
    "vol", "ed", "al", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec",
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
    c.is_uppercase()
        || c.is_ascii_digit()
        || is_opener(c)
        || (c.is_alphabetic() && !c.is_lowercase())
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abbrev {
    /// Precedes a name or number (`St.`, `Dr.`, `J.`): never ends a sentence.
    Title,
    /// May end a sentence (`etc.`, `Inc.`, `U.S.`): ends it only before a [`STARTERS`] word.
    MayEnd,
}

/// Abbreviations that may also close a sentence.
const MAY_END: &[&str] = &[
    "etc", "inc", "ltd", "co", "corp", "jr", "sr", "al", "approx",
];

/// Words that begin a new sentence after an ambiguous abbreviation (`... in Washington, D.C. The
/// entrance ...`).
const STARTERS: &[&str] = &[
    "the", "a", "an", "this", "that", "these", "those", "it", "its", "in", "on", "at", "to",
    "there", "here", "he", "she", "they", "we", "i", "his", "her", "their", "above", "below",
    "behind", "beside", "next", "each", "both", "all", "two", "three", "several", "some", "one",
    "from", "with", "overall", "however", "captured", "to", "photo", "image",
];

fn next_word_is_starter(rest: &str) -> bool {
    let w: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphabetic())
        .collect();
    let first_upper = w.chars().next().is_some_and(char::is_uppercase);
    first_upper && STARTERS.contains(&w.to_lowercase().as_str())
}

fn abbreviation_kind(word: &str) -> Option<Abbrev> {
    if word.is_empty() {
        return None;
    }
    let lower = word.to_lowercase();
    if MAY_END.contains(&lower.as_str()) {
        return Some(Abbrev::MayEnd);
    }
    if ABBREVIATIONS.contains(&lower.as_str()) {
        return Some(Abbrev::Title);
    }
    // A single capital initial (`J.`), or an initialism (`U.S`, `S.K`, `D.C`).
    if word.chars().count() == 1 && word.chars().all(char::is_uppercase) {
        return Some(Abbrev::Title);
    }
    let initialism = word.contains('.')
        && word
            .split('.')
            .all(|p| p.chars().count() == 1 && p.chars().all(char::is_alphabetic));
    initialism.then_some(Abbrev::MayEnd)
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
    let para_end = text[pos..]
        .find("\n\n")
        .map(|i| i + pos)
        .unwrap_or(text.len());
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
                if !t[..i].trim().is_empty() && (blank || j >= n || starts_sentence(chars[j].1)) {
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
                let abbreviation = if single_period {
                    abbreviation_kind(word_before(t, i))
                } else {
                    None
                };
                let next_is_newline = t[after..].trim_start_matches([' ', '\t']).starts_with('\n');
                let at_end = j >= n || next_is_newline;
                let quoted = !at_end && inside_quote(t, after);
                let abbreviation_ok = match abbreviation {
                    None => true,
                    Some(Abbrev::Title) => at_end,
                    Some(Abbrev::MayEnd) => at_end || next_word_is_starter(&t[after..]),
                };
                if boundary && abbreviation_ok && !quoted {
                    end = after;
                    break;
                }
                if quoted && abbreviation_ok {
                    // `... CHINA. " The`: the quote closes after a space, then a sentence starts.
                    let mut m = j;
                    while m < n && chars[m].1.is_whitespace() && chars[m].1 != '\n' {
                        m += 1;
                    }
                    if m < n
                        && matches!(chars[m].1, '"' | '”')
                        && (m + 1 >= n || chars[m + 1].1.is_whitespace())
                    {
                        let mut q = m + 1;
                        while q < n && chars[q].1.is_whitespace() {
                            q += 1;
                        }
                        if q >= n || starts_sentence(chars[q].1) {
                            end = chars.get(m + 1).map(|p| p.0).unwrap_or(t.len());
                            break;
                        }
                    }
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
        assert_eq!(
            f("A full shot of St. Louis. Then"),
            "A full shot of St. Louis."
        );
        assert_eq!(f("It costs $2.50 today. Next"), "It costs $2.50 today.");
        assert_eq!(
            f("Visit www.example.com/en now. Next"),
            "Visit www.example.com/en now."
        );
        assert_eq!(f("The U.S. Army tank. Next"), "The U.S. Army tank.");
        assert_eq!(f("Wait... Then more"), "Wait...");
        assert_eq!(f("Wait... and more. X"), "Wait... and more.");
        assert_eq!(
            f("The words \"Fun!\" appear here. X"),
            "The words \"Fun!\" appear here."
        );
        assert_eq!(
            f("He said \"Stop. Go.\" Then left."),
            "He said \"Stop. Go.\""
        );
        assert_eq!(f("一只猫。一只狗。"), "一只猫。");
        assert_eq!(f("  \nTitle line\n\nBody text."), "Title line");
        assert_eq!(f("a soft\nwrap. Next"), "a soft wrap.");
        assert_eq!(f("no terminator"), "no terminator");
        assert_eq!(f("   "), "");
        assert_eq!(
            f("Dogs, cats, etc. are here. X"),
            "Dogs, cats, etc. are here."
        );
        assert_eq!(
            f("Brand \"S.K. Knives\" shown. X"),
            "Brand \"S.K. Knives\" shown."
        );
    }
}
