//! Data-parallel training across processes: the launch environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, as `torchrun`, Slurm wrappers and Kubernetes'
//! PyTorchJob set them; Slurm's own `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` as a
//! fallback), the rendezvous through rank 0, and the collectives the trainer needs over TCP.
//!
//! Why a hand-written TCP backend: the `mpi` crate needs an MPI installation and `mpirun` on
//! every node, which users of `torchrun`-style launchers (Slurm `srun`, PyTorchJob) do not have;
//! NCCL needs CUDA devices. The trainer needs only an all-reduce of f32 buffers, a broadcast, a
//! barrier and an equality check, on small worlds of CPU processes (the tests, CPU clusters) or
//! as a host-memory fallback for CUDA replicas, so a star through rank 0 over plain sockets is
//! enough and has no dependency. Its traffic at rank 0 grows with the world size (`2·(W−1)`
//! buffers per all-reduce), so it is meant for small worlds; large GPU worlds want NCCL.
//!
//! Invariants enforced here:
//! - Every rank gets bit-identical results from every collective: rank 0 sums the contributions
//!   in rank order (`((x₀ + x₁) + x₂) + …`), applies the same operation, and sends the same bytes
//!   to every rank, which copies them over its own buffer.
//! - No collective waits forever: every socket read and write has the timeout given at
//!   [`Comm::connect`]; a peer whose connection closes (its process died) is an error at once
//!   ([`TrainError::PeerLost`]), a silent one after the timeout ([`TrainError::PeerTimeout`]).
//!   When rank 0 fails a collective it sends the reason to the other ranks before returning, so
//!   they report which rank was lost rather than only "rank 0".
//! - Every frame names its collective; a rank calling a different collective than rank 0 (the
//!   ranks fell out of step) is an error naming both, not silent corruption.
//! - The rendezvous admits each rank of `1..world` exactly once, and only when it runs the same
//!   world size and the same run config (a fingerprint of it) as rank 0.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Result, TrainError};

/// Where this process sits in a data-parallel job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank, `0..world`.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank on this node (selects `cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous socket.
    pub master_addr: String,
    /// Port of rank 0's rendezvous socket.
    pub master_port: u16,
}

/// Default port of the rendezvous (PyTorch's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl DistEnv {
    /// The job described by the environment, or None when it names none (no `WORLD_SIZE` and
    /// no `SLURM_NTASKS`, or a world of 1). A partial or inconsistent description is an error
    /// naming the variable.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source (for tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    TrainError::DistLaunch(format!("{k}={v:?} is not a non-negative integer"))
                }),
            }
        };
        // torchrun's variables first, Slurm's as a fallback.
        let (world_var, world) = match num("WORLD_SIZE")? {
            Some(w) => ("WORLD_SIZE", w),
            None => match num("SLURM_NTASKS")? {
                Some(w) => ("SLURM_NTASKS", w),
                None => {
                    if get("RANK").is_some() {
                        return Err(TrainError::DistLaunch(
                            "RANK is set but WORLD_SIZE is not".into(),
                        ));
                    }
                    return Ok(None);
                }
            },
        };
        if world == 0 {
            return Err(TrainError::DistLaunch(format!("{world_var}=0")));
        }
        let rank = match (world_var, num("RANK")?, num("SLURM_PROCID")?) {
            (_, Some(r), _) => r,
            ("SLURM_NTASKS", None, Some(r)) => r,
            _ if world == 1 => 0,
            _ => {
                return Err(TrainError::DistLaunch(format!(
                    "{world_var}={world} is set but RANK is not"
                )));
            }
        };
        if rank >= world {
            return Err(TrainError::DistLaunch(format!(
                "RANK={rank} is not below {world_var}={world}"
            )));
        }
        if world == 1 {
            return Ok(None);
        }
        let local_rank = num("LOCAL_RANK")?.or(num("SLURM_LOCALID")?).unwrap_or(0);
        let master_addr = get("MASTER_ADDR").filter(|s| !s.trim().is_empty());
        let Some(master_addr) = master_addr else {
            return Err(TrainError::DistLaunch(format!(
                "{world_var}={world} but MASTER_ADDR (the host of rank 0) is not set"
            )));
        };
        let master_port = match get("MASTER_PORT").filter(|s| !s.trim().is_empty()) {
            None => DEFAULT_MASTER_PORT,
            Some(p) => p.trim().parse::<u16>().map_err(|_| {
                TrainError::DistLaunch(format!("MASTER_PORT={p:?} is not a port number"))
            })?,
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
        }))
    }
}

/// Stable 64-bit FNV-1a fingerprint of bytes (the run config at the rendezvous).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A fast digest of f32 values by their bits (replica checks: equal digests for bit-identical
/// parameters; a change of any bit changes it with overwhelming probability).
pub fn digest_f32(h: &mut u64, values: &[f32]) {
    for v in values {
        *h ^= v.to_bits() as u64;
        *h = h.wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17);
    }
}

const MAGIC: u64 = 0x4c4c_4147_454e_4450; // "LLAGENDP"
const PROTOCOL: u32 = 1;
/// How long rank 0 waits for a new connection's hello before dropping it.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What a frame carries; a mismatch means the ranks fell out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    AllReduce = 1,
    Broadcast = 2,
    Barrier = 3,
    Check = 4,
    Gather = 5,
    Abort = 0xdead,
}

impl Op {
    fn from_u32(v: u32) -> Option<Op> {
        Some(match v {
            1 => Op::AllReduce,
            2 => Op::Broadcast,
            3 => Op::Barrier,
            4 => Op::Check,
            5 => Op::Gather,
            0xdead => Op::Abort,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all-reduce",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::Check => "replica check",
            Op::Gather => "gather",
            Op::Abort => "abort",
        }
    }
}

enum Peers {
    /// A world of one: every collective is the identity.
    Single,
    /// Rank 0: the connection of rank `r` at index `r - 1`.
    Root(Vec<TcpStream>),
    /// Any other rank: its connection to rank 0.
    Leaf(TcpStream),
}

/// The collectives of one data-parallel job (module invariants).
pub struct Comm {
    rank: usize,
    world: usize,
    local_rank: usize,
    timeout: Duration,
    peers: Peers,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Comm(rank {} of {})", self.rank, self.world)
    }
}

impl Comm {
    /// The communicator of a single process (world size 1).
    pub fn single() -> Comm {
        Comm {
            rank: 0,
            world: 1,
            local_rank: 0,
            timeout: Duration::from_secs(0),
            peers: Peers::Single,
        }
    }

    /// Joins the job `env`: rank 0 listens on `MASTER_PORT` (every interface) and admits the
    /// other ranks; they connect to `MASTER_ADDR:MASTER_PORT`, retrying until rank 0 is up.
    /// Everything (the rendezvous included) fails after `timeout` without progress.
    /// `config_fingerprint` must be equal on every rank (module invariants).
    pub fn connect(env: &DistEnv, config_fingerprint: u64, timeout: Duration) -> Result<Comm> {
        if env.world <= 1 {
            return Ok(Comm::single());
        }
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let rdv = |reason: String| TrainError::Rendezvous {
            rank: env.rank,
            addr: addr.clone(),
            reason,
        };
        let deadline = Instant::now() + timeout;
        let peers = if env.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", env.master_port))
                .map_err(|e| rdv(format!("cannot listen on port {}: {e}", env.master_port)))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| rdv(e.to_string()))?;
            let mut slots: Vec<Option<TcpStream>> = (1..env.world).map(|_| None).collect();
            let mut joined = 0;
            while joined < env.world - 1 {
                let (mut s, from) = match listener.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(rdv(format!(
                                "rank(s) {} did not join within {}s",
                                missing.join(", "),
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => return Err(rdv(format!("accept: {e}"))),
                };
                s.set_nonblocking(false).map_err(|e| rdv(e.to_string()))?;
                // A connection that is not a rank (a probe, a scanner, a stale rank of an earlier
                // attempt that never speaks) is dropped after a short wait, never waited on for
                // the collective timeout nor allowed to fail the rendezvous.
                setup(&s, timeout.min(HELLO_TIMEOUT)).map_err(|e| rdv(e.to_string()))?;
                let mut hello = [0u8; 28];
                if let Err(e) = s.read_exact(&mut hello) {
                    eprintln!(
                        "rendezvous: ignoring {from}: no hello within {HELLO_TIMEOUT:?} ({e})"
                    );
                    continue;
                }
                setup(&s, timeout).map_err(|e| rdv(e.to_string()))?;
                let magic = u64::from_le_bytes(hello[0..8].try_into().unwrap());
                let proto = u32::from_le_bytes(hello[8..12].try_into().unwrap());
                let rank = u32::from_le_bytes(hello[12..16].try_into().unwrap()) as usize;
                let world = u32::from_le_bytes(hello[16..20].try_into().unwrap()) as usize;
                let fp = u64::from_le_bytes(hello[20..28].try_into().unwrap());
                let refuse = |s: &mut TcpStream, why: String| {
                    let _ = write_status(s, &why);
                    rdv(why)
                };
                if magic != MAGIC || proto != PROTOCOL {
                    let _ = write_status(
                        &mut s,
                        &format!("{from} is not a llamagen rank of this protocol version"),
                    );
                    eprintln!("rendezvous: ignoring {from}: not a llamagen rank of this protocol");
                    continue;
                }
                if world != env.world {
                    return Err(refuse(
                        &mut s,
                        format!(
                            "rank {rank} runs with world size {world}, rank 0 with {}",
                            env.world
                        ),
                    ));
                }
                if rank == 0 || rank >= env.world {
                    return Err(refuse(
                        &mut s,
                        format!("a process joined as rank {rank} (world size {world})"),
                    ));
                }
                if slots[rank - 1].is_some() {
                    return Err(refuse(&mut s, format!("rank {rank} joined twice")));
                }
                if fp != config_fingerprint {
                    return Err(refuse(
                        &mut s,
                        format!(
                            "rank {rank} runs a different config than rank 0 (every rank must \
                             read the same config file)"
                        ),
                    ));
                }
                slots[rank - 1] = Some(s);
                joined += 1;
            }
            let mut conns: Vec<TcpStream> = slots.into_iter().map(|s| s.unwrap()).collect();
            for s in &mut conns {
                write_status(s, "").map_err(|e| rdv(format!("admitting a rank: {e}")))?;
            }
            Peers::Root(conns)
        } else {
            let targets: Vec<SocketAddr> = loop {
                match addr.to_socket_addrs() {
                    Ok(a) => break a.collect(),
                    // The master's name may not resolve yet (a Kubernetes Service coming up).
                    Err(e) if Instant::now() > deadline => {
                        return Err(rdv(format!("cannot resolve: {e}")));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            let mut s = loop {
                let mut last_err = None;
                let mut conn = None;
                for t in &targets {
                    match TcpStream::connect_timeout(t, Duration::from_secs(5)) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last_err = Some(e),
                    }
                }
                if let Some(s) = conn {
                    break s;
                }
                if Instant::now() > deadline {
                    return Err(rdv(format!(
                        "rank 0 did not accept within {}s: {}",
                        timeout.as_secs(),
                        last_err.map_or("no address to connect to".into(), |e| e.to_string())
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            setup(&s, timeout).map_err(|e| rdv(e.to_string()))?;
            let mut hello = Vec::with_capacity(28);
            hello.extend_from_slice(&MAGIC.to_le_bytes());
            hello.extend_from_slice(&PROTOCOL.to_le_bytes());
            hello.extend_from_slice(&(env.rank as u32).to_le_bytes());
            hello.extend_from_slice(&(env.world as u32).to_le_bytes());
            hello.extend_from_slice(&config_fingerprint.to_le_bytes());
            s.write_all(&hello)
                .map_err(|e| rdv(format!("sending the hello: {e}")))?;
            // Rank 0 answers once every rank has joined; that may take up to the timeout.
            let status = read_status(&mut s).map_err(|e| {
                rdv(format!(
                    "waiting for rank 0 to admit every rank: {}",
                    describe_io(&e)
                ))
            })?;
            if !status.is_empty() {
                return Err(rdv(format!("rank 0 refused this rank: {status}")));
            }
            Peers::Leaf(s)
        };
        Ok(Comm {
            rank: env.rank,
            world: env.world,
            local_rank: env.local_rank,
            timeout,
            peers,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank on this node.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this rank writes metrics and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Sums `buf` over all ranks in rank order; every rank ends with the same bits.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        match &self.peers {
            Peers::Single => Ok(()),
            Peers::Leaf(s) => {
                self.leaf_send(s, Op::AllReduce, f32_bytes(buf))?;
                self.leaf_recv_into(s, Op::AllReduce, f32_bytes_mut(buf))
            }
            Peers::Root(conns) => {
                let mut other = vec![0f32; buf.len()];
                for (i, s) in conns.iter().enumerate() {
                    self.root_recv(conns, i, s, Op::AllReduce, f32_bytes_mut(&mut other))?;
                    for (x, y) in buf.iter_mut().zip(&other) {
                        *x += *y;
                    }
                }
                for (i, s) in conns.iter().enumerate() {
                    self.root_send(conns, i, s, Op::AllReduce, f32_bytes(buf))?;
                }
                Ok(())
            }
        }
    }

    /// Replaces `buf` on every rank with rank 0's bytes (same length on every rank).
    pub fn broadcast_bytes(&self, buf: &mut Vec<u8>) -> Result<()> {
        match &self.peers {
            Peers::Single => Ok(()),
            Peers::Leaf(s) => {
                // The length comes first, so ranks need not know it.
                let len = self.leaf_recv(s, Op::Broadcast, 8)?;
                let n = u64::from_le_bytes(len[..].try_into().unwrap()) as usize;
                *buf = self.leaf_recv(s, Op::Broadcast, n)?;
                Ok(())
            }
            Peers::Root(conns) => {
                for (i, s) in conns.iter().enumerate() {
                    self.root_send(
                        conns,
                        i,
                        s,
                        Op::Broadcast,
                        &(buf.len() as u64).to_le_bytes(),
                    )?;
                    self.root_send(conns, i, s, Op::Broadcast, buf)?;
                }
                Ok(())
            }
        }
    }

    /// Replaces `buf` on every rank with rank 0's values (same length on every rank).
    pub fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut bytes = if self.rank == 0 {
            f32_bytes(buf).to_vec()
        } else {
            Vec::new()
        };
        self.broadcast_bytes(&mut bytes)?;
        if bytes.len() != buf.len() * 4 {
            return Err(TrainError::DistProtocol(format!(
                "rank {}: broadcast of {} bytes into a buffer of {} f32",
                self.rank,
                bytes.len(),
                buf.len()
            )));
        }
        f32_bytes_mut(buf).copy_from_slice(&bytes);
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.peers {
            Peers::Single => Ok(()),
            Peers::Leaf(s) => {
                self.leaf_send(s, Op::Barrier, &[])?;
                self.leaf_recv(s, Op::Barrier, 0)?;
                Ok(())
            }
            Peers::Root(conns) => {
                for (i, s) in conns.iter().enumerate() {
                    self.root_recv(conns, i, s, Op::Barrier, &mut [])?;
                }
                for (i, s) in conns.iter().enumerate() {
                    self.root_send(conns, i, s, Op::Barrier, &[])?;
                }
                Ok(())
            }
        }
    }

    /// Every rank's `mine` (of any length) at rank 0, in rank order; None on the other ranks.
    pub fn gather_f32(&self, mine: &[f32]) -> Result<Option<Vec<Vec<f32>>>> {
        match &self.peers {
            Peers::Single => Ok(Some(vec![mine.to_vec()])),
            Peers::Leaf(s) => {
                self.leaf_send(s, Op::Gather, f32_bytes(mine))?;
                Ok(None)
            }
            Peers::Root(conns) => {
                let mut all = vec![mine.to_vec()];
                for (i, mut s) in conns.iter().enumerate() {
                    let peer = i + 1;
                    let r = (|| -> Result<Vec<f32>> {
                        let op = Op::Gather;
                        let (got, len) =
                            read_header(&mut s).map_err(|e| self.lost(peer, op, &e))?;
                        if len % 4 != 0 {
                            return Err(TrainError::DistProtocol(format!(
                                "rank 0: a gather of {len} bytes from rank {peer}"
                            )));
                        }
                        self.check_frame(peer, op, got, len, len as usize)?;
                        let mut v = vec![0f32; len as usize / 4];
                        s.read_exact(f32_bytes_mut(&mut v))
                            .map_err(|e| self.lost(peer, op, &e))?;
                        Ok(v)
                    })();
                    all.push(r.map_err(|e| self.abort(conns, e))?);
                }
                Ok(Some(all))
            }
        }
    }

    /// Every rank's `mine` concatenated in rank order, on every rank.
    pub fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        if self.world == 1 {
            return Ok(mine.to_vec());
        }
        let mut bytes = match self.gather_f32(mine)? {
            Some(all) => {
                let mut b = Vec::with_capacity(all.iter().map(|v| v.len() * 4).sum());
                for v in &all {
                    b.extend_from_slice(f32_bytes(v));
                }
                b
            }
            None => Vec::new(),
        };
        self.broadcast_bytes(&mut bytes)?;
        if bytes.len() % 4 != 0 {
            return Err(TrainError::DistProtocol(format!(
                "rank {}: an all-gather of {} bytes",
                self.rank,
                bytes.len()
            )));
        }
        let mut out = vec![0f32; bytes.len() / 4];
        f32_bytes_mut(&mut out).copy_from_slice(&bytes);
        Ok(out)
    }

    /// The ranks whose `value` differs from rank 0's (the same list on every rank).
    pub fn differing_ranks(&self, value: u64) -> Result<Vec<usize>> {
        match &self.peers {
            Peers::Single => Ok(Vec::new()),
            Peers::Leaf(s) => {
                self.leaf_send(s, Op::Check, &value.to_le_bytes())?;
                let len = self.leaf_recv(s, Op::Check, 8)?;
                let n = u64::from_le_bytes(len[..].try_into().unwrap()) as usize;
                let list = self.leaf_recv(s, Op::Check, n * 8)?;
                Ok(list
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
                    .collect())
            }
            Peers::Root(conns) => {
                let mut differ = Vec::new();
                let mut b = [0u8; 8];
                for (i, s) in conns.iter().enumerate() {
                    self.root_recv(conns, i, s, Op::Check, &mut b)?;
                    if u64::from_le_bytes(b) != value {
                        differ.push(i + 1);
                    }
                }
                let out = (differ.len() as u64).to_le_bytes();
                let list: Vec<u8> = differ
                    .iter()
                    .flat_map(|&r| (r as u64).to_le_bytes())
                    .collect();
                for (i, s) in conns.iter().enumerate() {
                    self.root_send(conns, i, s, Op::Check, &out)?;
                    self.root_send(conns, i, s, Op::Check, &list)?;
                }
                Ok(differ)
            }
        }
    }

    fn lost(&self, peer: usize, op: Op, e: &std::io::Error) -> TrainError {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            TrainError::PeerTimeout {
                rank: self.rank,
                peer,
                during: op.name().into(),
                secs: self.timeout.as_secs(),
            }
        } else {
            TrainError::PeerLost {
                rank: self.rank,
                peer,
                during: op.name().into(),
                reason: describe_io(e),
            }
        }
    }

    /// Rank 0 tells every other rank why the job stops (best effort), then returns `err`.
    fn abort(&self, conns: &[TcpStream], err: TrainError) -> TrainError {
        let msg = err.to_string().into_bytes();
        for s in conns {
            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
            let _ = write_frame(s, Op::Abort, &msg);
            // Half-close and drain what the rank is still sending, so closing the socket does
            // not reset the connection (a reset can discard the abort frame unread).
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let until = std::time::Instant::now() + Duration::from_millis(300);
        for mut s in conns {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
            let mut sink = [0u8; 1 << 16];
            while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
        }
        err
    }

    fn root_recv(
        &self,
        conns: &[TcpStream],
        i: usize,
        mut s: &TcpStream,
        op: Op,
        out: &mut [u8],
    ) -> Result<()> {
        let peer = i + 1;
        let r = (|| -> Result<()> {
            let (got, len) = read_header(&mut s).map_err(|e| self.lost(peer, op, &e))?;
            self.check_frame(peer, op, got, len, out.len())?;
            s.read_exact(out).map_err(|e| self.lost(peer, op, &e))
        })();
        r.map_err(|e| self.abort(conns, e))
    }

    fn root_send(
        &self,
        conns: &[TcpStream],
        i: usize,
        s: &TcpStream,
        op: Op,
        data: &[u8],
    ) -> Result<()> {
        write_frame(s, op, data).map_err(|e| self.abort(conns, self.lost(i + 1, op, &e)))
    }

    fn leaf_send(&self, s: &TcpStream, op: Op, data: &[u8]) -> Result<()> {
        write_frame(s, op, data).map_err(|e| {
            // Rank 0 may have sent why it stops before it closed: report that reason.
            self.pending_abort(s, op)
                .unwrap_or_else(|| self.lost(0, op, &e))
        })
    }

    /// An abort frame already waiting on `s` (read within a short timeout), if there is one.
    fn pending_abort(&self, mut s: &TcpStream, op: Op) -> Option<TrainError> {
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let (got, n) = read_header(&mut s).ok()?;
        if got != Some(Op::Abort) {
            return None;
        }
        let mut msg = vec![0u8; n.min(1 << 16) as usize];
        s.read_exact(&mut msg).ok()?;
        Some(TrainError::PeerAborted {
            rank: self.rank,
            during: op.name().into(),
            reason: String::from_utf8_lossy(&msg).into_owned(),
        })
    }

    fn leaf_recv(&self, mut s: &TcpStream, op: Op, len: usize) -> Result<Vec<u8>> {
        let (got, n) = read_header(&mut s).map_err(|e| self.lost(0, op, &e))?;
        if got == Some(Op::Abort) {
            let mut msg = vec![0u8; n.min(1 << 16) as usize];
            s.read_exact(&mut msg).map_err(|e| self.lost(0, op, &e))?;
            return Err(TrainError::PeerAborted {
                rank: self.rank,
                during: op.name().into(),
                reason: String::from_utf8_lossy(&msg).into_owned(),
            });
        }
        self.check_frame(0, op, got, n, len)?;
        let mut out = vec![0u8; len];
        s.read_exact(&mut out).map_err(|e| self.lost(0, op, &e))?;
        Ok(out)
    }

    fn leaf_recv_into(&self, mut s: &TcpStream, op: Op, out: &mut [u8]) -> Result<()> {
        let (got, n) = read_header(&mut s).map_err(|e| self.lost(0, op, &e))?;
        if got == Some(Op::Abort) {
            let mut msg = vec![0u8; n.min(1 << 16) as usize];
            s.read_exact(&mut msg).map_err(|e| self.lost(0, op, &e))?;
            return Err(TrainError::PeerAborted {
                rank: self.rank,
                during: op.name().into(),
                reason: String::from_utf8_lossy(&msg).into_owned(),
            });
        }
        self.check_frame(0, op, got, n, out.len())?;
        s.read_exact(out).map_err(|e| self.lost(0, op, &e))
    }

    fn check_frame(
        &self,
        peer: usize,
        want: Op,
        got: Option<Op>,
        len: u64,
        want_len: usize,
    ) -> Result<()> {
        if got != Some(want) {
            return Err(TrainError::DistProtocol(format!(
                "rank {} expected a {} from rank {peer} and got a {}: the ranks fell out of step",
                self.rank,
                want.name(),
                got.map_or("malformed frame", |o| o.name())
            )));
        }
        if len != want_len as u64 {
            return Err(TrainError::DistProtocol(format!(
                "rank {} expected {want_len} bytes of {} from rank {peer} and got {len}: the \
                 ranks disagree on the buffer (model or config differ)",
                self.rank,
                want.name()
            )));
        }
        Ok(())
    }
}

fn setup(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let t = Some(timeout.max(Duration::from_millis(1)));
    s.set_read_timeout(t)?;
    s.set_write_timeout(t)
}

fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::UnexpectedEof => "connection closed (the process exited)".into(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            format!("connection broken (the process exited): {e}")
        }
        _ => e.to_string(),
    }
}

fn write_frame(mut s: &TcpStream, op: Op, data: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 12];
    head[0..4].copy_from_slice(&(op as u32).to_le_bytes());
    head[4..12].copy_from_slice(&(data.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(data)
}

fn read_header(s: &mut &TcpStream) -> std::io::Result<(Option<Op>, u64)> {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok((
        Op::from_u32(u32::from_le_bytes(head[0..4].try_into().unwrap())),
        u64::from_le_bytes(head[4..12].try_into().unwrap()),
    ))
}

fn write_status(s: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    s.write_all(&(msg.len() as u32).to_le_bytes())?;
    s.write_all(msg.as_bytes())
}

fn read_status(s: &mut TcpStream) -> std::io::Result<String> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let mut msg = vec![0u8; u32::from_le_bytes(n).min(1 << 16) as usize];
    s.read_exact(&mut msg)?;
    Ok(String::from_utf8_lossy(&msg).into_owned())
}

// f32 buffers go on the wire as their in-memory bytes, little-endian (every platform the trainer
// runs on); a big-endian build would need byte swaps here.
#[cfg(not(target_endian = "little"))]
compile_error!("the TCP collectives send f32 buffers as little-endian bytes");

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any alignment suits u8; the length is 4 bytes per value.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A free TCP port on this machine (for a launcher on one node that was given none).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| TrainError::Rendezvous {
        rank: 0,
        addr: "127.0.0.1:0".into(),
        reason: format!("cannot find a free port: {e}"),
    })?;
    Ok(l.local_addr()
        .map(|a| a.port())
        .unwrap_or(DEFAULT_MASTER_PORT))
}
