//! The first-sentence splitter on 949 real long captions (data/captions/first_sentence_cases.jsonl),
//! against hand-checked first sentences for a sample of every flag, and compared with LlamaGen's
//! naive cut (`text.split('.')[0]`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use llamagen_encode::sentence::{first_sentence, naive_first_sentence};

#[derive(serde::Deserialize)]
struct Row {
    flags: Vec<String>,
    llamagen_naive_first: String,
    text: String,
}

#[derive(serde::Deserialize)]
struct Expected {
    line: usize,
    flags: Vec<String>,
    expected: String,
}

fn corpus() -> Result<Vec<Row>> {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/captions/first_sentence_cases.jsonl");
    let text = std::fs::read_to_string(p)?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?)
}

#[test]
fn hand_checked_first_sentences() -> Result<()> {
    let rows = corpus()?;
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/first_sentence_expected.json");
    let cases: Vec<Expected> = serde_json::from_slice(&std::fs::read(p)?)?;
    let mut flags = std::collections::BTreeSet::new();
    let mut wrong = Vec::new();
    for c in &cases {
        assert_eq!(rows[c.line].flags, c.flags, "line {}", c.line);
        flags.extend(c.flags.iter().cloned());
        let got = first_sentence(&rows[c.line].text);
        if got != c.expected {
            wrong.push(format!(
                "line {}:\n  want {:?}\n  got  {:?}",
                c.line, c.expected, got
            ));
        }
    }
    let all: std::collections::BTreeSet<_> = rows.iter().flat_map(|r| r.flags.clone()).collect();
    assert_eq!(flags, all, "every flag has hand-checked cases");
    assert!(
        wrong.is_empty(),
        "{} of {} wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// Why our first sentence differs from the naive cut.
fn reason(ours: &str, naive: &str) -> &'static str {
    let naive_norm = naive.split_whitespace().collect::<Vec<_>>().join(" ");
    let ours_core = ours.trim_end_matches(['.', '"', '\'', '”', '’', ')']);
    if ours_core == naive_norm {
        if naive != naive_norm {
            return "same words, whitespace (leading space, newline) differs";
        }
        return "same";
    }
    if ours.len() > naive_norm.len() && ours.starts_with(&naive_norm) {
        let rest = &ours[naive_norm.len() + 1..];
        let word: String = naive_norm
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let quotes_open = naive_norm.matches(['"', '“']).count() % 2 == 1
            || naive_norm.matches('“').count() > naive_norm.matches('”').count();
        return if rest.starts_with(|c: char| c.is_ascii_digit()) {
            "naive cut stops early: decimal or number (3.5, $2.50, 2.0n)"
        } else if !rest.starts_with(char::is_whitespace)
            && !rest.starts_with(['"', '”', '\'', '’', ')'])
        {
            "naive cut stops early: domain, file name or initialism without space (www.x.com, U.S.)"
        } else if word.chars().count() == 1 && word.chars().all(char::is_uppercase) {
            "naive cut stops early: initial or initialism (J. Smith, D. C.)"
        } else if word.chars().next().is_some_and(char::is_uppercase) && word.len() <= 4 {
            "naive cut stops early: abbreviation (St., Mt., Dr., Mr.)"
        } else if quotes_open {
            "naive cut stops early: period inside a quotation"
        } else {
            "naive cut stops early: other inner period"
        };
    }
    if naive_norm.starts_with(ours_core) {
        return "sentence ends before the first period (! ? newline, CJK)";
    }
    "other"
}

#[test]
fn corpus_statistics_against_the_naive_cut() -> Result<()> {
    let rows = corpus()?;
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_flag: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in &rows {
        assert_eq!(naive_first_sentence(&r.text), r.llamagen_naive_first);
        let ours = first_sentence(&r.text);
        let norm = r.text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            !ours.is_empty() && norm.starts_with(&ours),
            "not a prefix: {ours:?}"
        );
        let why = reason(&ours, &r.llamagen_naive_first);
        *reasons.entry(why).or_default() += 1;
        for f in &r.flags {
            let e = by_flag.entry(f.clone()).or_default();
            e.0 += 1;
            if why != "same" {
                e.1 += 1;
            }
        }
    }
    let differ: usize = reasons
        .iter()
        .filter(|(k, _)| **k != "same")
        .map(|(_, v)| v)
        .sum();
    eprintln!(
        "{} captions, {differ} differ from the naive cut",
        rows.len()
    );
    for (k, v) in &reasons {
        eprintln!("  {v:4}  {k}");
    }
    for (f, (n, d)) in &by_flag {
        eprintln!("  flag {f:20} {n:4} cases, {d:4} differ");
    }
    assert!(differ > 0 && reasons.get("other").copied().unwrap_or(0) < rows.len() / 10);
    Ok(())
}
