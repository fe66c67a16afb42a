//! Scores image files with the filter scorer and prints timings as JSON (used by
//! bench/filters_throughput.sh).
//!
//! Usage: score_files MODEL_DIR THREADS BATCH REPEAT FILE...
//! MODEL_DIR holds clip_b32_image.onnx, clip_b32_text.onnx, clip_l14_image.onnx, watermark.onnx
//! (and nsfw_head.onnx if present); the aesthetic head is the bundled LAION V2 head.

use std::path::PathBuf;
use std::time::Instant;

use llamagen_filters::model::ModelOptions;
use llamagen_filters::preprocess::{clip_preprocess, decode_rgb, watermark_preprocess};
use llamagen_filters::scorer::{SampleInput, Scorer, ScorerConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        anyhow::bail!("usage: score_files MODEL_DIR THREADS BATCH REPEAT FILE...");
    }
    let dir = PathBuf::from(&args[1]);
    let threads: usize = args[2].parse()?;
    let batch: usize = args[3].parse()?;
    let repeat: usize = args[4].parse()?;
    let files: Vec<Vec<u8>> = args[5..]
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    let nsfw = dir.join("nsfw_head.onnx");
    let scorer = Scorer::load(ScorerConfig {
        clip_image: Some(dir.join("clip_b32_image.onnx")),
        clip_text: Some(dir.join("clip_b32_text.onnx")),
        clip_l14_image: Some(dir.join("clip_l14_image.onnx")),
        nsfw_head: nsfw.exists().then_some(nsfw),
        watermark: Some(dir.join("watermark.onnx")),
        model: ModelOptions {
            intra_threads: threads,
            batch_size: batch,
            ..Default::default()
        },
        preprocess_threads: threads,
        ..ScorerConfig::new()
    })?;
    let caption = "a photo of a cat sitting on a wooden table, high quality";
    let inputs: Vec<SampleInput<'_>> = (0..repeat)
        .flat_map(|_| files.iter())
        .map(|f| SampleInput {
            image: Some(f),
            caption: Some(caption),
        })
        .collect();
    // Warm-up (session initialisation, thread pools).
    scorer.score(&inputs[..inputs.len().min(batch)])?;
    let t0 = Instant::now();
    let (scores, t) = scorer.score(&inputs)?;
    let wall = t0.elapsed().as_secs_f64();
    let n = scores.aesthetic.iter().filter(|s| s.is_some()).count();

    // Single-threaded preprocessing cost per image (decode + CLIP 224 + watermark 256).
    let t1 = Instant::now();
    let mut sink = 0f32;
    for f in &files {
        let img = decode_rgb(f, 1 << 30)?;
        let mut a = Vec::new();
        clip_preprocess(&img, 224, &mut a);
        let mut b = Vec::new();
        watermark_preprocess(&img, 256, &mut b);
        sink += a[0] + b[0];
    }
    let single_ms = 1e3 * t1.elapsed().as_secs_f64() / files.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "images": n,
            "wall_s": wall,
            "images_per_s": n as f64 / wall,
            "decode_thread_s": t.decode_s,
            "preprocess_thread_s": t.preprocess_s,
            "inference_wall_s": t.inference_s,
            "preprocess_ms_per_image_1thread": single_ms,
            "checksum": sink,
        })
    );
    Ok(())
}
