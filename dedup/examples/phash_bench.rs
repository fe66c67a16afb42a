//! pHash of every image file in a folder, in parallel (rayon, one thread per core unless
//! RAYON_NUM_THREADS says otherwise). Prints one JSON line: files, errors, wall seconds,
//! images per second, and a checksum of the hashes (XOR) to compare with Python.
//!
//! cargo run --release -p llamagen-dedup --example phash_bench -- DIR [--print]

use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: phash_bench DIR [--print]");
    let print = args.next().as_deref() == Some("--print");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    let t = Instant::now();
    let hashes: Vec<Option<u64>> = files
        .par_iter()
        .map(|p| {
            let bytes = std::fs::read(p).ok()?;
            llamagen_dedup::phash_bytes(&bytes).ok()
        })
        .collect();
    let wall = t.elapsed().as_secs_f64();
    if print {
        for (p, h) in files.iter().zip(&hashes) {
            match h {
                Some(h) => println!("{} {h:016x}", p.file_name().unwrap().to_string_lossy()),
                None => println!("{} error", p.file_name().unwrap().to_string_lossy()),
            }
        }
    }
    let errors = hashes.iter().filter(|h| h.is_none()).count();
    let xor = hashes.iter().flatten().fold(0u64, |a, h| a ^ h);
    println!(
        "{{\"files\": {}, \"errors\": {errors}, \"threads\": {}, \"wall_s\": {wall:.4}, \"images_per_s\": {:.2}, \"xor\": \"{xor:016x}\"}}",
        files.len(),
        rayon::current_num_threads(),
        files.len() as f64 / wall
    );
}
