//! Data-parallel `llamagen train` with CPU processes (the real binary, TCP collectives): ranks
//! started by `--nproc-per-node` and by torchrun-style variables train like one process with the
//! whole global batch (c2i and t2i), keep bit-identical parameters after every step, stop with a
//! clear error within the timeout when a rank is killed, resume from a checkpoint on the same or
//! a different world size, and with ZeRO-1 write the same weights as without it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llamagen_train::synthetic::{SyntheticSpec, write_synthetic_catalog};

fn llamagen(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(llamagen_tests::llamagen())
        .args(args)
        // Two cores are shared by all ranks of a test.
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    eprintln!("$ llamagen {}\n{o}{e}", args.join(" "));
    (out.status.success(), o, e)
}

/// 36 usable rows: every global batch of 6 or 12 samples and every world size of 1, 2 or 3
/// divides an epoch, so W ranks read exactly the samples of one process with W times the batch.
fn catalog(root: &Path, t2i: bool) {
    write_synthetic_catalog(
        &root.display().to_string(),
        &SyntheticSpec {
            shards: 3,
            rows_per_shard: 12,
            image_sizes: vec![64],
            num_classes: (!t2i).then_some(10),
            caption_dim: 16,
            // t2i: some samples without a caption (valid = 0), unevenly spread over the ranks.
            no_caption_every: if t2i { 5 } else { 0 },
            ..SyntheticSpec::default()
        },
    )
    .unwrap();
}

/// A tiny config; `dropout` false turns every dropout (and label/caption dropout) off.
fn config(root: &Path, out: &Path, t2i: bool, batch: usize, steps: u64, dropout: bool) -> String {
    let p = if dropout { 0.1 } else { 0.0 };
    let model = if t2i {
        "type = \"t2i\"\ncaption_dim = 16\ncls_token_num = 120"
    } else {
        "type = \"c2i\"\nnum_classes = 10"
    };
    format!(
        r#"
[model]
{model}
dim = 32
n_layer = 2
n_head = 2
image_size = 64
vocab_size = 64
token_dropout_p = {p}
resid_dropout_p = {p}
ffn_dropout_p = {p}
class_dropout_prob = {p}

[data]
root = "{root}"
shuffle_window = 2

[train]
steps = {steps}
batch_size = {batch}
grad_accum = 2
seed = 11
dist_timeout_s = 20
check_replicas_every = 1

[optim]
lr = 1e-3
warmup_steps = 2

[output]
dir = "{out}"
checkpoint_every = 3
log_every = 1
progress = false
"#,
        root = root.display(),
        out = out.display()
    )
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for ((s, x), (_, y)) in a.iter().zip(b) {
        let rel = (x - y).abs() / x.abs().max(1e-12);
        assert!(
            rel <= 1e-5,
            "{what}: step {s}: {x} vs {y} (relative {rel:e})"
        );
    }
}

/// 1 process with batch 6, 2 ranks with 3 and 3 ranks with 2 (`--nproc-per-node`): the same
/// losses within 1e-5 relative for 10 steps, and the replicas' parameters bit-identical after
/// every step (`check_replicas_every = 1` stops a run whose ranks differ).
fn ranks_match_one_process(t2i: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog(&root, t2i);
    let mut curves = Vec::new();
    for (world, batch) in [(1usize, 6usize), (2, 3), (3, 2)] {
        let out = tmp.path().join(format!("w{world}"));
        let cfg = write_config(
            tmp.path(),
            &format!("w{world}"),
            &config(&root, &out, t2i, batch, 10, false),
        );
        let n = world.to_string();
        let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
        if world > 1 {
            args.extend(["--nproc-per-node", n.as_str()]);
        }
        let t = Instant::now();
        let (ok, stdout, _) = llamagen(&args);
        eprintln!("world {world}: {:.2}s", t.elapsed().as_secs_f64());
        assert!(ok, "world {world}");
        assert!(stdout.contains("trained steps 0..10"), "{stdout}");
        // Only rank 0 writes checkpoints and metrics.
        assert!(out.join("checkpoints/0000010/model.safetensors").is_file());
        curves.push((world, losses(&out)));
    }
    for (world, l) in &curves[1..] {
        assert_close(
            &curves[0].1,
            l,
            &format!("world {world} against one process"),
        );
    }
}

#[test]
fn c2i_ranks_train_like_one_process_with_the_global_batch() {
    ranks_match_one_process(false);
}

/// t2i: the loss is normalised by the global count of valid samples (captionless samples fall
/// unevenly on the ranks), so ranks still match one process.
#[test]
fn t2i_ranks_normalise_the_loss_by_the_global_count_of_valid_samples() {
    ranks_match_one_process(true);
}

/// With dropout on (each rank draws its own masks from a rank-mixed seed), the replicas stay
/// bit-identical: the config's replica check compares every rank's parameter digest every step
/// and would stop the run on any difference.
#[test]
fn replicas_stay_bit_identical_with_dropout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog(&root, false);
    let out = tmp.path().join("w2");
    let cfg = write_config(tmp.path(), "w2", &config(&root, &out, false, 3, 6, true));
    let (ok, _, _) = llamagen(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--nproc-per-node",
        "2",
    ]);
    assert!(ok);
    assert_eq!(losses(&out).len(), 6);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_rank(cfg: &Path, rank: usize, world: usize, port: u16, log: &Path) -> Child {
    Command::new(llamagen_tests::llamagen())
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Three ranks started with torchrun-style variables; rank 1 is killed mid-run. Ranks 0 and 2
/// exit with an error naming the lost rank well within the timeout (no hang), and a re-run
/// with `--resume` continues from the last checkpoint rank 0 wrote.
#[test]
fn a_killed_rank_stops_the_others_with_a_clear_error_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog(&root, false);
    let out = tmp.path().join("run");
    let text = config(&root, &out, false, 2, 150, true)
        .replace("checkpoint_every = 3", "checkpoint_every = 10")
        .replace("check_replicas_every = 1", "check_replicas_every = 0");
    let cfg = write_config(tmp.path(), "run", &text);
    let port = free_port();
    let logs: Vec<PathBuf> = (0..3)
        .map(|r| tmp.path().join(format!("rank{r}.log")))
        .collect();
    let mut ranks: Vec<Child> = (0..3)
        .map(|r| spawn_rank(&cfg, r, 3, port, &logs[r]))
        .collect();
    // Wait until a checkpoint exists and training goes on.
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 25 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the ranks did not train"
        );
        for r in ranks.iter_mut() {
            assert!(r.try_wait().unwrap().is_none(), "a rank exited early");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    ranks[1].kill().unwrap();
    ranks[1].wait().unwrap();
    let killed = Instant::now();
    for r in [0, 2] {
        let status = loop {
            if let Some(s) = ranks[r].try_wait().unwrap() {
                break s;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                let _ = ranks[r].kill();
                panic!("rank {r} still runs 30 s after rank 1 was killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "rank {r} reported success");
        let log = std::fs::read_to_string(&logs[r]).unwrap();
        assert!(log.contains("lost rank 1"), "rank {r}: {log}");
        if r == 2 {
            assert!(log.contains("rank 0 stopped the job"), "{log}");
        }
    }
    eprintln!(
        "the others stopped {:.2}s after the kill",
        killed.elapsed().as_secs_f64()
    );
    let done = losses(&out).len() as u64;
    assert!(done < 150, "the run finished before the kill");
    let last = done / 10 * 10;
    let (ok, stdout, _) = llamagen(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--nproc-per-node",
        "3",
        "--resume",
    ]);
    assert!(ok);
    assert!(
        stdout.contains(&format!("trained steps {last}..150")),
        "{stdout}"
    );
}

/// A checkpoint of one process with batch 6 resumes on 2 ranks with 3 and on 3 ranks with 2:
/// the losses after the resume equal the uninterrupted single-process run's (within 1e-5).
#[test]
fn a_run_resumes_on_a_different_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog(&root, false);
    let full = tmp.path().join("full");
    let cfg = write_config(
        tmp.path(),
        "full",
        &config(&root, &full, false, 6, 6, false),
    );
    assert!(llamagen(&["train", "--config", cfg.to_str().unwrap()]).0);
    let first = tmp.path().join("first");
    let cfg = write_config(
        tmp.path(),
        "first",
        &config(&root, &first, false, 6, 3, false),
    );
    assert!(llamagen(&["train", "--config", cfg.to_str().unwrap()]).0);
    let want = losses(&full);
    for (world, batch) in [(2usize, 3usize), (3, 2)] {
        let out = tmp.path().join(format!("resumed{world}"));
        copy_checkpoint(&first, "0000003", &out);
        let cfg = write_config(
            tmp.path(),
            &format!("resumed{world}"),
            &config(&root, &out, false, batch, 6, false),
        );
        let n = world.to_string();
        let (ok, stdout, _) = llamagen(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--nproc-per-node",
            &n,
            "--resume",
        ]);
        assert!(ok);
        assert!(stdout.contains("trained steps 3..6"), "{stdout}");
        assert_close(&want, &losses(&out), &format!("resumed on {world} ranks"));
    }
}

fn copy_checkpoint(from: &Path, step: &str, to: &Path) {
    let dst = to.join("checkpoints").join(step);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(from.join("metrics.jsonl"), to.join("metrics.jsonl")).unwrap();
    for f in std::fs::read_dir(from.join("checkpoints").join(step)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
    }
}

/// ZeRO-1 (AdamW moments sharded over the ranks): 2 sharded ranks write byte-identical weights
/// and optimiser state to 2 unsharded ones, and the checkpoint resumes sharded over 3 ranks
/// (re-sharded on load) with the losses of an uninterrupted single process.
#[test]
fn zero1_matches_unsharded_training_and_reshards_on_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("catalog");
    catalog(&root, false);
    let zero = |text: String| {
        text.replace(
            "check_replicas_every = 1",
            "check_replicas_every = 1\nzero = true",
        )
    };
    let full = tmp.path().join("full");
    let cfg = write_config(
        tmp.path(),
        "full",
        &config(&root, &full, false, 6, 6, false),
    );
    assert!(llamagen(&["train", "--config", cfg.to_str().unwrap()]).0);
    let mut outs = Vec::new();
    for sharded in [false, true] {
        let out = tmp.path().join(format!("w2_{sharded}"));
        let mut text = config(&root, &out, false, 3, 6, false);
        if sharded {
            text = zero(text);
        }
        let cfg = write_config(tmp.path(), &format!("w2_{sharded}"), &text);
        let (ok, _, err) = llamagen(&[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--nproc-per-node",
            "2",
        ]);
        assert!(ok);
        assert_eq!(err.contains("ZeRO-1"), sharded, "{err}");
        outs.push(out);
    }
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let read = |d: &Path| std::fs::read(d.join("checkpoints/0000006").join(f)).unwrap();
        assert!(read(&outs[0]) == read(&outs[1]), "{f} differs with ZeRO-1");
    }
    assert_close(&losses(&full), &losses(&outs[1]), "ZeRO-1 on 2 ranks");
    // Re-sharded over 3 ranks from the 2-rank checkpoint at step 3.
    let resumed = tmp.path().join("z3");
    copy_checkpoint(&outs[1], "0000003", &resumed);
    let cfg = write_config(
        tmp.path(),
        "z3",
        &zero(config(&root, &resumed, false, 2, 6, false)),
    );
    let (ok, stdout, _) = llamagen(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--nproc-per-node",
        "3",
        "--resume",
    ]);
    assert!(ok);
    assert!(stdout.contains("trained steps 3..6"), "{stdout}");
    assert_close(
        &losses(&full),
        &losses(&resumed),
        "ZeRO-1 resumed on 3 ranks",
    );
}
