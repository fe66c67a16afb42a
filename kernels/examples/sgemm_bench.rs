//! On-demand microbenchmark of `sgemm` (GFLOP/s per shape, one thread and all threads), and of
//! the AMX product (`amx::gemm`, a pre-packed weight) for the linear-layer shapes where the CPU
//! has AMX. `ONLY_AMX=1` skips the float32 timings of those shapes.
//!
//!   cargo run -p llamagen-kernels --example sgemm_bench [M,N,K[,p] ...]
use llamagen_kernels::amx;
use llamagen_kernels::sgemm::{PackedA, sgemm, sgemm_packed};
use std::time::Instant;

fn main() {
    // (m, n, k): a VQ 3×3 conv tile (packed kernel), T5-base and GPT-B linear layers.
    let mut shapes = vec![
        (96, 480, 256, true),
        (128, 1024, 1152, true),
        (256, 4096, 2304, true),
        (512, 1024, 4608, true),
        (512, 768, 768, false),
        (512, 2048, 768, false),
        (512, 768, 3072, false),
    ];
    // `sgemm_bench M,N,K[,p] ...` times the given shapes instead (`p`: packed `A`).
    let given: Vec<(usize, usize, usize, bool)> = std::env::args()
        .skip(1)
        .map(|s| {
            let f: Vec<&str> = s.split(',').collect();
            let d = |i: usize| f[i].parse::<usize>().expect("M,N,K[,p]");
            (d(0), d(1), d(2), f.get(3) == Some(&"p"))
        })
        .collect();
    if !given.is_empty() {
        shapes = given;
    }
    let only_amx = std::env::var("ONLY_AMX").is_ok();
    for threads in [1, rayon::current_num_threads()] {
        for &(m, n, k, packed) in &shapes {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let mut c = vec![0f32; m * n];
            let pa = unsafe { PackedA::new(m, k, (a.as_ptr(), k as isize, 1)) };
            let run = |c: &mut Vec<f32>| unsafe {
                if packed {
                    sgemm_packed(
                        &pa,
                        n,
                        (b.as_ptr(), n as isize, 1),
                        (c.as_mut_ptr(), n as isize),
                        false,
                        threads,
                    );
                } else {
                    sgemm(
                        (m, n, k),
                        (a.as_ptr(), k as isize, 1),
                        (b.as_ptr(), n as isize, 1),
                        (c.as_mut_ptr(), n as isize),
                        false,
                        threads,
                    );
                }
            };
            if !only_amx {
                run(&mut c);
            }
            let reps = if m * n * k < 20_000_000 { 2000 } else { 10 };
            let mut best = f64::MAX;
            for _ in 0..if only_amx { 0 } else { reps } {
                let t = Instant::now();
                run(&mut c);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let gf = 2.0 * (m * n * k) as f64 / best / 1e9;
            println!("threads {threads} m {m} n {n} k {k} packed {packed}: {gf:.1} GFLOP/s");
            if !packed && amx::available() {
                // The same B as a linear layer's (n, k) weight.
                let w: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                for split in [amx::Split::Two, amx::Split::Three] {
                    let pb = amx::PackedB::from_weight(&w, n, k, split);
                    let mut best = f64::MAX;
                    for _ in 0..reps {
                        let t = Instant::now();
                        amx::gemm(m, &a, k, &pb, &mut c, n, threads);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    let gf = 2.0 * (m * n * k) as f64 / best / 1e9;
                    println!("threads {threads} m {m} n {n} k {k} amx {split:?}: {gf:.1} GFLOP/s");
                }
            }
        }
    }
}
