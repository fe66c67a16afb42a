//! The TCP collectives of `llamagen_train::dist` between ranks on threads of this process (real
//! sockets on 127.0.0.1): launch variables, rendezvous checks, bit-identical sums in rank order,
//! broadcast, the replica check, and the errors for a lost or silent peer.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use llamagen_train::TrainError;
use llamagen_train::dist::{Comm, DistEnv};

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    }
}

/// Runs `f` on `world` ranks (threads), each with its own communicator; returns their results
/// in rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    fingerprints: &[u64],
    timeout: Duration,
    f: impl Fn(usize, llamagen_train::Result<Comm>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let p = port();
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let f = f.clone();
            let fp = fingerprints[r];
            std::thread::spawn(move || f(r, Comm::connect(&env(r, world, p), fp, timeout)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn launch_variables_are_read_like_torchrun_and_slurm() {
    let vars = |list: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            list.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
    assert_eq!(
        DistEnv::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
        None
    );
    let e = DistEnv::from_vars(vars(&[
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "1234"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            e.rank,
            e.world,
            e.local_rank,
            e.master_addr.as_str(),
            e.master_port
        ),
        (3, 4, 1, "node0", 1234)
    );
    let s = DistEnv::from_vars(vars(&[
        ("SLURM_NTASKS", "8"),
        ("SLURM_PROCID", "5"),
        ("SLURM_LOCALID", "1"),
        ("MASTER_ADDR", "node0"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (s.rank, s.world, s.local_rank, s.master_port),
        (5, 8, 1, 29500)
    );
    for (bad, names) in [
        (&[("RANK", "1")][..], "WORLD_SIZE"),
        (&[("WORLD_SIZE", "2")][..], "RANK"),
        (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "RANK=2"),
        (&[("WORLD_SIZE", "2"), ("RANK", "1")][..], "MASTER_ADDR"),
        (&[("WORLD_SIZE", "two")][..], "WORLD_SIZE"),
    ] {
        let list: &'static [(&str, &str)] = Box::leak(bad.to_vec().into_boxed_slice());
        let e = DistEnv::from_vars(vars(list)).unwrap_err().to_string();
        assert!(e.contains(names), "{e}");
    }
}

/// Every rank receives the bits of `((x0 + x1) + x2)`, the broadcast gives rank 0's values,
/// and the replica check names the rank whose value differs, on every rank.
#[test]
fn sums_are_bit_identical_on_every_rank_in_rank_order() {
    let world = 3;
    let results = on_ranks(world, &[7; 3], Duration::from_secs(20), |r, comm| {
        let comm = comm.unwrap();
        // Values whose sum depends on the order: 1e8 + 1 - 1e8 differs from 1e8 - 1e8 + 1.
        let mut x: Vec<f32> = (0..1000)
            .map(|i| [1e8f32, 1.0, -1e8][r] + i as f32)
            .collect();
        comm.all_reduce_sum(&mut x).unwrap();
        let mut b = vec![r as f32; 5];
        comm.broadcast_f32(&mut b).unwrap();
        let differ = comm.differing_ranks(if r == 2 { 1 } else { 0 }).unwrap();
        comm.barrier().unwrap();
        (x, b, differ)
    });
    let want: Vec<f32> = (0..1000)
        .map(|i| {
            let i = i as f32;
            ((1e8f32 + i) + (1.0 + i)) + (-1e8 + i)
        })
        .collect();
    for (x, b, differ) in &results {
        assert!(x.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(b, &vec![0f32; 5]);
        assert_eq!(differ, &vec![2]);
    }
}

/// A rank with another config (fingerprint) is refused at the rendezvous, with the reason on
/// both sides.
#[test]
fn a_rank_with_another_config_is_refused_at_the_rendezvous() {
    let results = on_ranks(2, &[1, 2], Duration::from_secs(20), |_, comm| {
        comm.map(|_| ()).unwrap_err().to_string()
    });
    for e in &results {
        assert!(e.contains("different config"), "{e}");
    }
}

/// A rank that joins and then stays silent makes rank 0 fail within the timeout, naming it;
/// a rank whose peer closes its connection fails at once, naming it.
#[test]
fn a_silent_or_vanished_peer_is_an_error_not_a_hang() {
    let t0 = Instant::now();
    let results = on_ranks(2, &[0, 0], Duration::from_secs(2), |r, comm| {
        let comm = comm.unwrap();
        if r == 1 {
            // Silent for longer than the timeout, then gone.
            std::thread::sleep(Duration::from_secs(4));
            return None;
        }
        let mut x = vec![1f32; 4];
        Some(comm.all_reduce_sum(&mut x).unwrap_err())
    });
    let e = results[0].as_ref().unwrap();
    assert!(matches!(e, TrainError::PeerTimeout { peer: 1, .. }), "{e}");
    assert!(
        e.to_string().contains("rank 1 did not answer within 2s"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));

    let results = on_ranks(3, &[0, 0, 0], Duration::from_secs(20), |r, comm| {
        let comm = comm.unwrap();
        if r == 1 {
            drop(comm);
            return None;
        }
        let mut x = vec![1f32; 4];
        Some(comm.all_reduce_sum(&mut x).unwrap_err().to_string())
    });
    let (e0, e2) = (results[0].as_ref().unwrap(), results[2].as_ref().unwrap());
    assert!(e0.contains("rank 0: lost rank 1 during all-reduce"), "{e0}");
    assert!(
        e2.contains("rank 2: rank 0 stopped the job") && e2.contains("lost rank 1"),
        "{e2}"
    );
}

/// ZeRO-1 owners: whole parameters, contiguous runs in order, about equal element counts.
#[test]
fn zero_partition_gives_contiguous_balanced_runs() {
    use llamagen_train::optim::zero_partition;
    assert_eq!(zero_partition(&[10, 10, 10, 10], 2), [0, 0, 1, 1]);
    assert_eq!(zero_partition(&[10, 10, 10], 3), [0, 1, 2]);
    assert_eq!(zero_partition(&[100, 1, 1, 1], 2), [0, 1, 1, 1]);
    assert_eq!(zero_partition(&[5, 5], 1), [0, 0]);
    let sizes: Vec<usize> = (0..50).map(|i| 1 + (i * 37) % 101).collect();
    for world in 1..6 {
        let owners = zero_partition(&sizes, world);
        assert!(owners.windows(2).all(|w| w[0] <= w[1]), "{owners:?}");
        assert!(owners.iter().all(|&o| o < world));
        let total: usize = sizes.iter().sum();
        for r in 0..world {
            let mine: usize = sizes
                .iter()
                .zip(&owners)
                .filter(|(_, o)| **o == r)
                .map(|(s, _)| s)
                .sum();
            assert!(
                mine.abs_diff(total / world) <= 101,
                "rank {r}: {mine} of {total}"
            );
        }
    }
}

/// Rank 0 alone (rank 1 never starts) fails the rendezvous after the timeout, naming rank 1;
/// a rank without rank 0 fails likewise.
#[test]
fn a_missing_rank_fails_the_rendezvous_after_the_timeout() {
    let t0 = Instant::now();
    let e = Comm::connect(&env(0, 2, port()), 0, Duration::from_secs(1)).unwrap_err();
    assert!(
        e.to_string().contains("rank(s) 1 did not join within 1s"),
        "{e}"
    );
    let e = Comm::connect(&env(1, 2, port()), 0, Duration::from_secs(1)).unwrap_err();
    assert!(
        e.to_string().contains("rank 0 did not accept within 1s"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(8));
}
