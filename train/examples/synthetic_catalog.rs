//! Writes a small catalog of random code grids (and labels or caption features) for trying the
//! example configs: `cargo run -p llamagen-train --example synthetic_catalog -- <root> c2i|t2i`.
//! c2i: ten-crop grids at 64 px (4x4 codes with VQ-16), labels 0..9. t2i: centre grids at 64 and
//! 128 px (stage I and II), 32-wide caption features, long and short.

use llamagen_train::synthetic::{SyntheticSpec, write_synthetic_catalog};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (root, kind) = match args.as_slice() {
        [root, kind] => (root.as_str(), kind.as_str()),
        _ => return Err("usage: synthetic_catalog <root> c2i|t2i".into()),
    };
    let spec = match kind {
        "c2i" => SyntheticSpec {
            image_sizes: vec![64],
            num_classes: Some(10),
            ..SyntheticSpec::default()
        },
        "t2i" => SyntheticSpec {
            image_sizes: vec![64, 128],
            num_classes: None,
            no_caption_every: 7,
            ..SyntheticSpec::default()
        },
        other => return Err(format!("unknown kind {other:?} (c2i or t2i)").into()),
    };
    let v = write_synthetic_catalog(root, &spec)?;
    println!(
        "wrote {} {kind} rows to {root} (version {v})",
        spec.shards * spec.rows_per_shard
    );
    Ok(())
}
