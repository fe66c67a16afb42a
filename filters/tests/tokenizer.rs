//! CLIP tokenizer parity: every caption of data/captions/, every LAION alt-text of
//! data/laion_meta/ and hand-written edge cases, token for token against OpenAI CLIP's Python
//! tokenizer (fixture written by tests/tokenizer/make_tokens.py).

use std::io::{BufRead, BufReader};

use llamagen_filters::tokenizer::{CONTEXT_LENGTH, ClipTokenizer};

#[test]
fn matches_the_python_tokenizer_on_every_text() -> anyhow::Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tokenizer/expected_tokens.jsonl.gz"
    );
    let f = std::fs::File::open(path)?;
    let tok = ClipTokenizer::bundled();
    let mut total = 0;
    let mut mismatches = Vec::new();
    let mut sources = std::collections::BTreeMap::<String, usize>::new();
    for line in BufReader::new(flate2::read::GzDecoder::new(f)).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let text = v["text"].as_str().expect("text");
        let source = v["source"].as_str().expect("source");
        let want: Vec<u32> = v["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let row = tok.tokenize(text);
        let mut padded = want.clone();
        padded.resize(CONTEXT_LENGTH, 0);
        if row[..] != padded[..] {
            mismatches.push(format!(
                "{source}: {text:?}\n  got  {:?}\n  want {:?}",
                &row[..],
                want
            ));
        }
        total += 1;
        *sources
            .entry(source.split(':').next().unwrap_or("").to_string())
            .or_default() += 1;
    }
    assert!(total > 45_000, "fixture has {total} texts");
    assert!(
        sources["laion"] > 9_000 && sources["coco"] == 30_000,
        "{sources:?}"
    );
    assert!(
        mismatches.is_empty(),
        "{} of {total} texts differ, first ones:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(5)].join("\n")
    );
    Ok(())
}
