//! The `POST /v1/generate` request: parsed from JSON field by field so that every refusal names
//! its field.
//!
//! Invariants enforced here:
//! - A request is exactly one of `class_label` (c2i) or `prompt` (t2i), and only the fields
//!   listed in [`FIELDS`]; anything else is refused by name.
//! - Defaults are `llamagen sample`'s: CFG 4.0 and top-k 2000 for c2i, 7.5 and 1000 for t2i,
//!   cfg_interval -1, temperature 1, top-p 1, seed 0, one image.
//! - Image `i` of a request seeded `s` is generated from `per_image_seed(s, i)`, as image `i` of
//!   `llamagen sample --per-image-seeds --seed s`.

use llamagen_train::ModelType;
use llamagen_train::sample::SamplingConfig;
use serde_json::Value;

use crate::error::{Result, ServeError};

/// The fields a request may have.
pub const FIELDS: &[&str] = &[
    "class_label",
    "prompt",
    "n",
    "cfg_scale",
    "cfg_interval",
    "temperature",
    "top_k",
    "top_p",
    "seed",
];

/// The condition of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestCondition {
    Class(u32),
    Prompt(String),
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub condition: RequestCondition,
    pub n: usize,
    pub sampling: SamplingConfig,
    pub seed: u64,
}

/// What the model accepts, for validation.
#[derive(Debug, Clone)]
pub struct Limits {
    pub model_type: ModelType,
    pub num_classes: usize,
    pub vocab_size: usize,
    pub max_images: usize,
    /// Whether prompts can be encoded (a T5 encoder was given).
    pub prompts: bool,
    /// Whether CFG is possible (c2i: the null class exists).
    pub cfg: bool,
    /// Most characters in a prompt.
    pub max_prompt_chars: usize,
}

fn num(v: &Value, field: &str) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| ServeError::field(field, format!("must be a number, got {v}")))
}

fn int(v: &Value, field: &str) -> Result<i64> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    if v.as_u64().is_some() {
        return Err(ServeError::field(field, format!("{v} is too large")));
    }
    Err(ServeError::field(
        field,
        format!("must be an integer, got {v}"),
    ))
}

impl GenerateRequest {
    /// Parses and validates a request body against `limits`.
    pub fn parse(body: &[u8], limits: &Limits) -> Result<Self> {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ServeError::InvalidJson(e.to_string()))?;
        let Value::Object(map) = v else {
            return Err(ServeError::InvalidJson(format!(
                "expected an object, got {}",
                match v {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            )));
        };
        if let Some(k) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(ServeError::field(
                k,
                format!("unknown field (known: {})", FIELDS.join(", ")),
            ));
        }
        let get = |k: &str| map.get(k).filter(|v| !v.is_null());
        let condition = match (get("class_label"), get("prompt")) {
            (Some(_), Some(_)) => {
                return Err(ServeError::field(
                    "prompt",
                    "give class_label or prompt, not both",
                ));
            }
            (Some(l), None) => {
                if limits.model_type != ModelType::C2i {
                    return Err(ServeError::field(
                        "class_label",
                        "this is a text-to-image model: give a prompt",
                    ));
                }
                let l = int(l, "class_label")?;
                if l < 0 || l as usize >= limits.num_classes {
                    return Err(ServeError::field(
                        "class_label",
                        format!(
                            "unknown label {l}: the model has classes 0..={}",
                            limits.num_classes - 1
                        ),
                    ));
                }
                RequestCondition::Class(l as u32)
            }
            (None, Some(p)) => {
                if limits.model_type != ModelType::T2i {
                    return Err(ServeError::field(
                        "prompt",
                        "this is a class-conditional model: give a class_label",
                    ));
                }
                let p = p.as_str().ok_or_else(|| {
                    ServeError::field("prompt", format!("must be a string, got {p}"))
                })?;
                if p.trim().is_empty() {
                    return Err(ServeError::field("prompt", "is empty"));
                }
                if p.chars().count() > limits.max_prompt_chars {
                    return Err(ServeError::field(
                        "prompt",
                        format!("longer than {} characters", limits.max_prompt_chars),
                    ));
                }
                if !limits.prompts {
                    return Err(ServeError::field(
                        "prompt",
                        "the server was started without --t5, so it cannot encode prompts",
                    ));
                }
                RequestCondition::Prompt(p.to_string())
            }
            (None, None) => {
                let f = match limits.model_type {
                    ModelType::C2i => "class_label",
                    ModelType::T2i => "prompt",
                };
                return Err(ServeError::field(f, "is required"));
            }
        };
        let (cfg_default, top_k_default) = match limits.model_type {
            ModelType::C2i => (4.0, 2000),
            ModelType::T2i => (7.5, 1000),
        };
        let n = match get("n") {
            Some(v) => int(v, "n")?,
            None => 1,
        };
        if n < 1 || n as usize > limits.max_images {
            return Err(ServeError::field(
                "n",
                format!("{n} is out of range 1..={}", limits.max_images),
            ));
        }
        let cfg_scale = match get("cfg_scale") {
            Some(v) => num(v, "cfg_scale")?,
            None => cfg_default,
        };
        if !(0.0..=100.0).contains(&cfg_scale) {
            return Err(ServeError::field(
                "cfg_scale",
                format!("{cfg_scale} is out of range [0, 100]"),
            ));
        }
        if cfg_scale > 1.0 && !limits.cfg {
            return Err(ServeError::field(
                "cfg_scale",
                "this model has no null class (trained without class dropout): use cfg_scale <= 1",
            ));
        }
        let cfg_interval = match get("cfg_interval") {
            Some(v) => int(v, "cfg_interval")?,
            None => -1,
        };
        if cfg_interval < -1 {
            return Err(ServeError::field(
                "cfg_interval",
                format!("{cfg_interval} must be >= -1 (-1: every step)"),
            ));
        }
        let temperature = match get("temperature") {
            Some(v) => num(v, "temperature")?,
            None => 1.0,
        };
        // Checked as the f32 the sampler uses (1e-46 is 0 in f32).
        if !((temperature as f32) > 0.0 && temperature <= 100.0) {
            return Err(ServeError::field(
                "temperature",
                format!("{temperature} is out of range (0, 100]"),
            ));
        }
        let top_k = match get("top_k") {
            Some(v) => int(v, "top_k")?,
            None => top_k_default,
        };
        if top_k < 0 {
            return Err(ServeError::field(
                "top_k",
                format!("{top_k} must be >= 0 (0: all tokens)"),
            ));
        }
        let top_p = match get("top_p") {
            Some(v) => num(v, "top_p")?,
            None => 1.0,
        };
        if !((top_p as f32) > 0.0 && top_p <= 1.0) {
            return Err(ServeError::field(
                "top_p",
                format!("{top_p} is out of range (0, 1]"),
            ));
        }
        let seed = match get("seed") {
            Some(v) => v.as_u64().ok_or_else(|| {
                ServeError::field("seed", format!("must be an integer in 0..2^64, got {v}"))
            })?,
            None => 0,
        };
        Ok(GenerateRequest {
            condition,
            n: n as usize,
            sampling: SamplingConfig {
                cfg_scale: cfg_scale as f32,
                cfg_interval,
                temperature: temperature as f32,
                top_k: top_k as usize,
                top_p: top_p as f32,
                sample_logits: true,
            },
            seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_type: ModelType::C2i,
            num_classes: 10,
            vocab_size: 64,
            max_images: 4,
            prompts: false,
            cfg: true,
            max_prompt_chars: 1000,
        }
    }

    fn err(body: &str) -> String {
        match GenerateRequest::parse(body.as_bytes(), &limits()) {
            Err(ServeError::InvalidField { field, .. }) => field,
            Err(e) => format!("other: {e}"),
            Ok(_) => "ok".into(),
        }
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(err(r#"{"class_label": 10}"#), "class_label");
        assert_eq!(err(r#"{"class_label": "a"}"#), "class_label");
        assert_eq!(err(r#"{}"#), "class_label");
        assert_eq!(err(r#"{"class_label": 1, "n": 5}"#), "n");
        assert_eq!(err(r#"{"class_label": 1, "n": 0}"#), "n");
        assert_eq!(err(r#"{"class_label": 1, "top_p": 0}"#), "top_p");
        assert_eq!(
            err(r#"{"class_label": 1, "temperature": -1}"#),
            "temperature"
        );
        assert_eq!(err(r#"{"class_label": 1, "top_k": -3}"#), "top_k");
        assert_eq!(
            err(r#"{"class_label": 1, "cfg_interval": -2}"#),
            "cfg_interval"
        );
        assert_eq!(err(r#"{"class_label": 1, "seed": -2}"#), "seed");
        assert_eq!(err(r#"{"class_label": 1, "colour": 1}"#), "colour");
        assert_eq!(err(r#"{"prompt": "a cat"}"#), "prompt");
        assert!(err("[1]").starts_with("other"));
        assert_eq!(err(r#"{"class_label": 1, "n": 4, "seed": 3}"#), "ok");
    }
}
