//! Writes a random-weight GPT checkpoint for tests and benchmarks:
//! `cargo run -p llamagen-serve --example random_checkpoint -- DIR "MODEL TOML LINES" [SEED]`
//! gives `DIR/model.safetensors` and `DIR/run.toml` (use `--checkpoint DIR/model.safetensors
//! --config DIR/run.toml`). The `[model]` lines are a run config's, `;` separating them.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err("usage: random_checkpoint DIR \"type = 'c2i'; dim = 128; ...\" [SEED]".into());
    }
    let model = args[1].replace(';', "\n");
    let seed = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let w = llamagen_serve::random_checkpoint(std::path::Path::new(&args[0]), &model, seed, 0.3)?;
    println!("{}", w.display());
    Ok(())
}
