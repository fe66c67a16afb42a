//! The T5 encoder, tokenizer and caption cleaning against `transformers`, `tokenizers` and the
//! Python caption cleaning, on fixtures made by `tests/fixtures/t5/generate.py`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use llamagen_encode::EncodeError;
use llamagen_encode::clean::text_preprocessing;
use llamagen_encode::t5::{T5Config, T5Encoder, WeightFiles};
use llamagen_encode::text_encoder::{
    CaptionIssue, ModelPaths, StoreDtype, TextEncoder, TextEncoderConfig, left_pad, load_tokenizer,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/t5")
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    cleaned: String,
    ids: Vec<u32>,
}

fn encoder_cases() -> Result<Vec<Case>> {
    Ok(serde_json::from_slice(&std::fs::read(
        fixtures().join("encoder_cases.json"),
    )?)?)
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale)
}

fn load(model: &str, weights: &Path) -> Result<T5Encoder> {
    let cfg = T5Config::from_file(&fixtures().join(model).join("config.json"))?;
    Ok(T5Encoder::load(
        &cfg,
        &WeightFiles::resolve(weights)?,
        &Device::Cpu,
        DType::F32,
    )?)
}

fn check_model(model: &str, enc: &T5Encoder) -> Result<()> {
    let expected =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let cases = encoder_cases()?;
    // One by one (no padding) and all together (padded batch): both must match.
    let rows: Vec<&[u32]> = cases.iter().map(|c| c.ids.as_slice()).collect();
    let batched = enc.encode_rows(&rows)?;
    for (i, c) in cases.iter().enumerate() {
        let want = &expected[&format!("{model}.{i}")];
        let single = enc.encode_rows(&[c.ids.as_slice()])?.remove(0);
        let e1 = max_rel_err(&single, want)?;
        let e2 = max_rel_err(&batched[i], want)?;
        assert!(
            e1 <= 1e-4 && e2 <= 1e-4,
            "{model} case {i} ({} tokens): max relative error {e1} unpadded, {e2} batched",
            c.ids.len()
        );
    }
    Ok(())
}

#[test]
fn gated_gelu_encoder_matches_transformers() -> Result<()> {
    let enc = load("gated", &fixtures().join("gated"))?;
    check_model("gated", &enc)
}

#[test]
fn sharded_weights_load_through_the_index() -> Result<()> {
    let w = WeightFiles::resolve(&fixtures().join("sharded"))?;
    assert_eq!(w.files.len(), 2);
    let enc = load(
        "gated",
        &fixtures().join("sharded/model.safetensors.index.json"),
    )?;
    check_model("gated", &enc)
}

#[test]
fn relu_encoder_matches_transformers() -> Result<()> {
    let enc = load("relu", &fixtures().join("relu/model.safetensors"))?;
    check_model("relu", &enc)
}

#[test]
fn relative_position_buckets_follow_t5() -> Result<()> {
    let enc = load("gated", &fixtures().join("gated"))?;
    // 32 buckets, max distance 128: 0..7 exact, then logarithmic up to 15; +16 for k > q.
    let b = |r| enc.relative_position_bucket(r);
    assert_eq!((b(0), b(-1), b(1), b(-7), b(7)), (0, 1, 17, 7, 23));
    assert_eq!((b(-8), b(-12), b(-127), b(-1000)), (8, 9, 15, 15));
    assert_eq!((b(8), b(200)), (24, 31));
    Ok(())
}

#[derive(serde::Deserialize)]
struct CleanCase {
    corpus: String,
    text: String,
    cleaned: String,
    ids: Vec<u32>,
}

fn clean_cases() -> Result<Vec<CleanCase>> {
    let text = std::fs::read_to_string(fixtures().join("clean_cases.jsonl"))?;
    Ok(text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?)
}

#[test]
fn caption_cleaning_matches_python_on_real_corpora() -> Result<()> {
    let cases = clean_cases()?;
    let mut bad = Vec::new();
    for c in &cases {
        let got = text_preprocessing(&c.text);
        if got != c.cleaned {
            bad.push(format!(
                "[{}] {:?}\n   python: {:?}\n   ours:   {:?}",
                c.corpus, c.text, c.cleaned, got
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} captions differ:\n{}",
        bad.len(),
        cases.len(),
        bad.iter().take(15).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[test]
fn token_ids_match_transformers_on_real_corpora() -> Result<()> {
    let tok = load_tokenizer(&fixtures().join("tokenizer.json"), 120)?;
    let cases = clean_cases()?;
    let mut bad = 0;
    let mut first = None;
    for c in &cases {
        let ids = tok
            .encode(c.cleaned.as_str(), true)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids()
            .to_vec();
        if ids != c.ids {
            bad += 1;
            first.get_or_insert_with(|| format!("{:?}: {:?} vs {:?}", c.cleaned, ids, c.ids));
        }
    }
    assert_eq!(bad, 0, "{bad} of {} differ, e.g. {first:?}", cases.len());
    assert!(
        cases.iter().any(|c| c.ids.len() == 120),
        "a truncated case is covered"
    );
    Ok(())
}

fn text_encoder(dir: &str) -> Result<TextEncoder> {
    let mut paths = ModelPaths::in_dir(&fixtures().join(dir));
    paths.tokenizer = fixtures().join("tokenizer.json");
    Ok(TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig {
            batch_tokens: 64,
            ..Default::default()
        },
    )?)
}

#[test]
fn text_encoder_end_to_end_matches_transformers() -> Result<()> {
    let enc = text_encoder("gated")?;
    let expected =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let cases = encoder_cases()?;
    let mut captions: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    captions.insert(2, "   ");
    captions.insert(0, "");
    let out = enc.encode(&captions)?;
    assert_eq!(out[0].as_ref().unwrap_err(), &CaptionIssue::Empty);
    assert_eq!(out[3].as_ref().unwrap_err(), &CaptionIssue::Empty);
    let feats: Vec<_> = out.iter().filter_map(|o| o.as_ref().ok()).collect();
    assert_eq!(feats.len(), cases.len());
    for (i, (f, c)) in feats.iter().zip(&cases).enumerate() {
        assert_eq!(enc.preprocess(&c.text), c.cleaned);
        assert_eq!(f.tokens, c.ids.len());
        assert_eq!(f.truncated, c.ids.len() == 120 && i >= 4);
        let got = Tensor::from_vec(f.data.clone(), (f.tokens, f.dim), &Device::Cpu)?;
        let err = max_rel_err(&got, &expected[&format!("gated.{i}")])?;
        assert!(err <= 1e-4, "case {i}: {err}");
        // bf16 storage round trip, then the trainer's left padding.
        let bytes = StoreDtype::Bf16.encode(&f.data);
        assert_eq!(bytes.len(), f.tokens * f.dim * 2);
        let back = StoreDtype::Bf16.decode(&bytes);
        let (pad, mask) = left_pad(&back, f.tokens, f.dim, 120);
        assert_eq!(mask.iter().filter(|&&m| m == 1).count(), f.tokens);
        assert_eq!(mask[120 - f.tokens], 1);
        assert!(pad[..(120 - f.tokens) * f.dim].iter().all(|&v| v == 0.0));
        assert_eq!(pad[(120 - f.tokens) * f.dim], back[0]);
    }
    Ok(())
}

#[test]
fn overlong_caption_is_reported_not_fatal() -> Result<()> {
    let enc = text_encoder("gated")?;
    let long = "a dog ".repeat(5000);
    let out = enc.encode(&["a cat", &long])?;
    assert!(out[0].is_ok());
    assert_eq!(out[1].as_ref().unwrap_err().kind(), "caption_too_long");
    Ok(())
}

#[test]
fn missing_files_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(
        fixtures().join("gated/config.json"),
        dir.path().join("config.json"),
    )?;
    let paths = ModelPaths::in_dir(dir.path());
    let e = TextEncoder::load(&paths, &Device::Cpu, DType::F32, Default::default())
        .err()
        .expect("no tokenizer");
    assert!(
        matches!(&e, EncodeError::MissingFile { what: "tokenizer", path } if path.ends_with("tokenizer.json")),
        "{e}"
    );
    std::fs::copy(
        fixtures().join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )?;
    let e = TextEncoder::load(&paths, &Device::Cpu, DType::F32, Default::default())
        .err()
        .expect("no weights");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    // A shard listed by the index but absent.
    let sdir = dir.path().join("sharded");
    std::fs::create_dir(&sdir)?;
    std::fs::copy(
        fixtures().join("sharded/model.safetensors.index.json"),
        sdir.join("model.safetensors.index.json"),
    )?;
    let e = WeightFiles::resolve(&sdir).err().expect("no shard");
    assert!(e.to_string().contains("model-0000"), "{e}");
    // A weight file without an expected tensor.
    let e = T5Encoder::load(
        &T5Config::from_file(&fixtures().join("gated/config.json"))?,
        &WeightFiles::resolve(&fixtures().join("relu"))?,
        &Device::Cpu,
        DType::F32,
    )
    .err()
    .expect("wrong weights");
    assert!(e.to_string().contains("relu/model.safetensors"), "{e}");
    Ok(())
}
