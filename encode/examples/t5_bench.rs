//! Encoder throughput on CPU: `t5_bench MODEL_DIR TOKENIZER CAPTIONS.txt REPEATS`.
//! Captions are one per line, already cleaned; prints a JSON line with valid tokens per second
//! (median over REPEATS passes). Threads follow RAYON_NUM_THREADS. With `T5_BENCH_DUMP=FILE`,
//! the features of the first 64 captions (valid tokens, float32, caption after caption) are
//! also written to FILE, for the benchmark's parity check.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use llamagen_encode::text_encoder::{ModelPaths, TextEncoder, TextEncoderConfig};

fn main() -> anyhow::Result<()> {
    // As the `llamagen` binary does (llamagen_kernels::alloc).
    llamagen_kernels::alloc::reuse_freed_memory();
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: t5_bench MODEL_DIR TOKENIZER CAPTIONS.txt REPEATS"
    );
    let mut paths = ModelPaths::in_dir(Path::new(&a[1]));
    paths.tokenizer = a[2].clone().into();
    let captions: Vec<String> = std::fs::read_to_string(&a[3])?
        .lines()
        .map(str::to_string)
        .collect();
    let repeats: usize = a[4].parse()?;
    let enc = TextEncoder::load(
        &paths,
        &Device::Cpu,
        DType::F32,
        TextEncoderConfig {
            clean: false,
            ..Default::default()
        },
    )?;
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let mut times = Vec::new();
    let mut tokens = 0usize;
    let mut last = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let out = enc.encode(&refs)?;
        times.push(t.elapsed().as_secs_f64());
        tokens = out
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|f| f.tokens)
            .sum();
        last = out;
    }
    if let Ok(path) = std::env::var("T5_BENCH_DUMP") {
        let mut bytes = Vec::new();
        for f in last.iter().take(64) {
            let f = f
                .as_ref()
                .map_err(|e| anyhow::anyhow!("caption failed: {e:?}"))?;
            bytes.extend(f.data.iter().flat_map(|v| v.to_le_bytes()));
        }
        std::fs::write(path, bytes)?;
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let median = times[times.len() / 2];
    println!(
        "{{\"side\": \"llamagen (candle)\", \"captions\": {}, \"valid_tokens\": {tokens}, \"median_s\": {median:.3}, \"tokens_per_s\": {:.1}, \"runs_s\": {times:?}, \"amx\": {}}}",
        captions.len(),
        tokens as f64 / median,
        llamagen_kernels::amx::available()
    );
    Ok(())
}
