//! Float32 products on Intel AMX tiles for inference (the T5 encoder's linear layers, through
//! `linear::InferenceLinear`): `C = A·B` from bf16 tile products
//! ("bf16×3"), about 2.5 times the float32 AVX-512 product's speed on the T5-base shapes.
//!
//! Invariants enforced here:
//! - Every float32 operand `x` is cut into bf16 pieces, each the nearest-even rounding of what
//!   the previous ones leave: [`Split::Two`] `x ≈ x₀ + x₁`, [`Split::Three`] `x ≈ x₀ + x₁ + x₂`.
//!   `C` is the sum of the piece products of order ≤ 1 (`a₀b₀ + a₀b₁ + a₁b₀`, 3 tile products)
//!   or ≤ 2 (those and `a₀b₂ + a₁b₁ + a₂b₀`, 6). Each bf16 product is exact in float32 and
//!   TDPBF16PS accumulates in float32. What is dropped is about 2⁻¹⁸ (Two) or 2⁻²⁷ (Three) of
//!   each product: a result differs from the exact product by about 4e-6 (Two) or 1e-7 (Three,
//!   float32's own level) of the result's largest magnitude; the tests bound both. Plain bf16
//!   operands would give about 2e-3.
//! - It runs only where [`available`]: the CPU reports AMX-TILE and AMX-BF16 and Linux grants
//!   this process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). `LLAMAGEN_AMX=0` in
//!   the environment turns it off; callers then use [`crate::sgemm`].
//! - Packed layout, both operands: 32-row blocks of `A` (32-column blocks of `B`), and per block,
//!   per 32-wide slice of the shared dimension `k`, two 1 KiB tiles per piece side by side: piece
//!   0 of the first 16 rows (columns), piece 0 of the second 16, then piece 1, ... `A` tiles are
//!   row-major (16 rows × 32 bf16); `B` tiles interleave pairs of `k` (16 pairs × 16 columns × 2),
//!   the layout TDPBF16PS reads. Padding (rows, columns, `k`) is zero.
//! - `B` (a weight) is packed once, at load; `A` is packed per call. Each thread configures the
//!   tiles on entry and releases them on exit, and owns whole 32-column blocks of `C`.

use rayon::prelude::*;

/// bf16 elements in one tile (16 rows × 64 bytes).
const TILE: usize = 512;

/// How many bf16 pieces each float32 operand is cut into (see the module invariants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Two pieces, 3 tile products: about 4e-6 relative error, 2.5 times float32's speed.
    Two,
    /// Three pieces, 6 tile products: float32-level error, about 1.3 times its speed.
    Three,
}

impl Split {
    fn pieces(self) -> usize {
        match self {
            Split::Two => 2,
            Split::Three => 3,
        }
    }

    /// bf16 elements of one 32-wide `k` slice of a 32-row (column) block: two tiles per piece.
    fn step(self) -> usize {
        2 * self.pieces() * TILE
    }
}
/// Bytes of packed `A` to keep in L2 while the column blocks of `B` pass by.
const A_BLOCK_BYTES: usize = 1 << 20;

/// Whether AMX products run on this CPU and in this process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    if std::env::var("LLAMAGEN_AMX").is_ok_and(|v| v.trim() == "0") {
        return false;
    }
    // CPUID leaf 7, subleaf 0: EDX bit 24 is AMX-TILE, bit 22 AMX-BF16.
    let l7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (tile, bf16) = ((l7.edx >> 24) & 1 == 1, (l7.edx >> 22) & 1 == 1);
    if !(tile && bf16) {
        return false;
    }
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes only reads or sets this process's permission mask.
    unsafe {
        if libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) != 0
        {
            return false;
        }
        let mut mask: u64 = 0;
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_GET_XCOMP_PERM,
            &mut mask as *mut u64,
        ) == 0
            && (mask >> XFEATURE_XTILEDATA) & 1 == 1
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// bf16 bits of `x`, rounded to nearest even.
#[inline(always)]
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Up to three bf16 pieces of `x`, each the rounding of what the previous ones leave.
#[inline(always)]
fn split(x: f32) -> [u16; 3] {
    let p0 = bf16(x);
    let r1 = x - f32::from_bits((p0 as u32) << 16);
    let p1 = bf16(r1);
    let r2 = r1 - f32::from_bits((p1 as u32) << 16);
    [p0, p1, bf16(r2)]
}

/// `B` (`k × n`) packed for [`gemm`].
#[derive(Debug)]
pub struct PackedB {
    n: usize,
    k: usize,
    split: Split,
    /// 32-wide slices of `k`.
    slices: usize,
    data: Tiles,
}

/// bf16 storage whose tile rows (64 bytes) each sit in one cache line.
#[derive(Default, Debug)]
struct Tiles(Vec<Line>);

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

impl Tiles {
    fn zeroed(len: usize) -> Self {
        let mut t = Self::default();
        t.resize(len);
        t
    }

    /// Holds `len` elements (a multiple of 32); new lines are zero, kept ones keep their values.
    fn resize(&mut self, len: usize) {
        debug_assert_eq!(len % 32, 0);
        self.0.resize(len / 32, Line([0; 32]));
    }

    fn as_slice(&self) -> &[u16] {
        // SAFETY: `Line` is 32 `u16`s with no padding.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 32) }
    }

    fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 32) }
    }
}

impl PackedB {
    /// Packs `B = Wᵀ` for a weight `w` stored `(n, k)` row-major (a linear layer's
    /// `(out, in)`).
    pub fn from_weight(w: &[f32], n: usize, k: usize, split_: Split) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n}×{k}");
        let (slices, step, pieces) = (k.div_ceil(32), split_.step(), split_.pieces());
        let mut data = Tiles::zeroed(n.div_ceil(32) * slices * step);
        data.as_mut_slice()
            .par_chunks_mut(slices * step)
            .enumerate()
            .for_each(|(blk, out)| {
                for j in 0..32.min(n - blk * 32) {
                    let (half, col) = (j / 16, j % 16);
                    let row = &w[(blk * 32 + j) * k..][..k];
                    for (kk, &x) in row.iter().enumerate() {
                        let p = split(x);
                        let at = (kk / 32) * step + half * TILE + ((kk % 32) / 2) * 32 + col * 2;
                        for (piece, &v) in p.iter().enumerate().take(pieces) {
                            out[at + piece * 2 * TILE + kk % 2] = v;
                        }
                    }
                }
            });
        Self {
            n,
            k,
            split: split_,
            slices,
            data,
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// Packs `m` rows of `A` (row `i` at `a[i·lda..][..k]`) in 32-row blocks.
/// Every element of `out` is written (padding with zeros), so `out` may hold anything before.
fn pack_a(a: &[f32], (m, k, lda): (usize, usize, usize), b: &PackedB, out: &mut Tiles) {
    let (slices, step) = (b.slices, b.split.step());
    out.resize(m.div_ceil(32) * slices * step);
    out.as_mut_slice()
        .par_chunks_mut(slices * step)
        .enumerate()
        .for_each(|(blk, out)| {
            for i in 0..32 {
                let base = (i / 16) * TILE + (i % 16) * 32;
                let row = blk * 32 + i;
                for s in 0..slices {
                    let at = s * step + base;
                    let (p0, rest) = out[at..].split_at_mut(2 * TILE);
                    let valid = if row < m { 32.min(k - s * 32) } else { 0 };
                    let src = &a[(row * lda + s * 32).min(a.len())..][..valid];
                    if b.split == Split::Two {
                        // SAFETY: AMX CPUs have AVX-512 (F, BW).
                        unsafe { split_row::<2>(src, [&mut p0[..32], &mut rest[..32]]) };
                    } else {
                        let (p1, rest) = rest.split_at_mut(2 * TILE);
                        // SAFETY: as above.
                        unsafe {
                            split_row::<3>(src, [&mut p0[..32], &mut p1[..32], &mut rest[..32]])
                        };
                    }
                }
            }
        });
}

thread_local! {
    /// Packed `A` of this thread's last product, kept for the next one.
    static PACKED_A: std::cell::Cell<Tiles> = const { std::cell::Cell::new(Tiles(Vec::new())) };
}

/// The `P` pieces of each of `x` (up to 32 floats) into `out`, zeros after `x.len()`; in
/// AVX-512 registers.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f,avx512bw"))]
unsafe fn split_row<const P: usize>(x: &[f32], mut out: [&mut [u16]; P]) {
    assert!(out.iter().all(|o| o.len() == 32));
    #[cfg(target_arch = "x86_64")]
    if x.len() == 32 {
        use std::arch::x86_64::*;
        // SAFETY: 32 floats are read and 32 u16 written per piece (`out` rows are 32 long).
        unsafe {
            for half in 0..2 {
                let mut rest = _mm512_loadu_ps(x.as_ptr().add(16 * half));
                for o in out.iter_mut() {
                    // bf16(x), as `bf16`: add 0x7fff plus the kept lowest bit, keep the top half.
                    let bits = _mm512_castps_si512(rest);
                    let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
                    let top = _mm512_srli_epi32::<16>(_mm512_add_epi32(
                        bits,
                        _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)),
                    ));
                    let piece = _mm512_cvtepi32_epi16(top);
                    _mm256_storeu_si256(o.as_mut_ptr().add(16 * half).cast(), piece);
                    let back = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(top));
                    rest = _mm512_sub_ps(rest, back);
                }
            }
        }
        return;
    }
    let mut rest = [0f32; 32];
    for (r, &v) in rest.iter_mut().zip(x) {
        *r = v;
    }
    for o in out {
        let o: &mut [u16; 32] = o.try_into().expect("32 lanes");
        for (o, r) in o.iter_mut().zip(rest.iter_mut()) {
            *o = bf16(*r);
            *r -= f32::from_bits((*o as u32) << 16);
        }
    }
}

/// `C[m×n] = A[m×k] · B`, `A`'s row `i` at `a[i·lda..][..k]`, `C`'s at `c[i·ldc..][..n]`.
///
/// # Panics
/// If [`available`] is false, or the slices are too short for the shapes.
pub fn gemm(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    assert!(available(), "AMX products are not available here");
    let (n, k) = (b.n, b.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "A is too short");
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "C is too short");
    // The calling thread's buffer (a product nested in this one's wait finds an empty one).
    let mut held = PACKED_A.take();
    pack_a(a, (m, k, lda), b, &mut held);
    let (slices, step) = (b.slices, b.split.step());
    let pa = held.as_slice();
    let (mblocks, nblocks) = (m.div_ceil(32), n.div_ceil(32));
    let block_bytes = slices * step * 2;
    let mc = (A_BLOCK_BYTES / block_bytes).max(1);
    let threads = threads.clamp(1, nblocks);
    let per = nblocks.div_ceil(threads);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let bdata = b.data.as_slice();
    let panel = slices * step;
    let kernel = match b.split {
        Split::Two => block2,
        Split::Three => block3,
    };
    (0..threads).into_par_iter().for_each(|t| {
        // The whole wrapper is captured, not its (non-Send) pointer field.
        #[allow(clippy::redundant_locals)]
        let c_ptr = c_ptr;
        let (n0, n1) = (t * per, ((t + 1) * per).min(nblocks));
        let mut scratch = Scratch([0.0; 1024]);
        // SAFETY: `available()` holds, so this process may use tiles; the tile config is this
        // thread's own and is released before the closure returns.
        unsafe { tile_config() };
        for i0 in (0..mblocks).step_by(mc) {
            let i1 = (i0 + mc).min(mblocks);
            for j in n0..n1 {
                let cols = 32.min(n - j * 32);
                for i in i0..i1 {
                    // A whole block goes straight to C; a ragged one through `scratch`.
                    let whole = cols == 32 && (i + 1) * 32 <= m;
                    let (out, stride) = if whole {
                        // SAFETY: rows i·32.. i·32+32 ≤ m and columns j·32.. j·32+32 ≤ n of C,
                        // which only this thread writes (its own column blocks).
                        (unsafe { c_ptr.0.add(i * 32 * ldc + j * 32) }, ldc)
                    } else {
                        (scratch.0.as_mut_ptr(), 32)
                    };
                    // SAFETY: both blocks hold `slices` steps of the split's tiles; `out` has 32
                    // rows of 32 floats at `stride`.
                    unsafe {
                        kernel(
                            pa.as_ptr().add(i * panel),
                            bdata.as_ptr().add(j * panel),
                            slices,
                            (out, stride),
                        )
                    };
                    if whole {
                        continue;
                    }
                    for r in 0..32.min(m - i * 32) {
                        // SAFETY: row `i·32 + r < m` and columns `j·32 .. j·32 + cols ≤ n` of C,
                        // which only this thread writes (its own column blocks).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                c_ptr.0.add((i * 32 + r) * ldc + j * 32),
                                cols,
                            )
                        };
                        dst.copy_from_slice(&scratch.0[r * 32..][..cols]);
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state.
        unsafe { tile_release() };
    });
    PACKED_A.set(held);
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

#[repr(C, align(64))]
struct Scratch([f32; 1024]);

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Eight tiles of 16 rows × 64 bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_config() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    unsafe {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig, options(nostack));
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn tile_release() {
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// `A` piece `$p` (both 16-row halves) into tiles 4-5.
macro_rules! load_a {
    ($p:literal) => {
        concat!(
            "tileloadd tmm4, [{a} + {s}*1 + ",
            $p,
            "*2048]\n",
            "tileloadd tmm5, [{a} + {s}*1 + ",
            $p,
            "*2048 + 1024]\n"
        )
    };
}

/// `B` piece `$p` (both 16-column halves) into tiles 6-7.
macro_rules! load_b {
    ($p:literal) => {
        concat!(
            "tileloadd tmm6, [{b} + {s}*1 + ",
            $p,
            "*2048]\n",
            "tileloadd tmm7, [{b} + {s}*1 + ",
            $p,
            "*2048 + 1024]\n"
        )
    };
}

/// The four tile products of the loaded halves into the accumulators 0-3.
macro_rules! products {
    () => {
        concat!(
            "tdpbf16ps tmm0, tmm4, tmm6\n",
            "tdpbf16ps tmm1, tmm4, tmm7\n",
            "tdpbf16ps tmm2, tmm5, tmm6\n",
            "tdpbf16ps tmm3, tmm5, tmm7\n"
        )
    };
}

/// One 32×32 block of `C` into `out` (row stride `stride` floats), over `slices` slices of
/// `$step` bytes: tiles 0-3 accumulate it, 4-5 hold an `A` piece (two 16-row halves), 6-7 a `B`
/// piece (two 16-column halves); `$body` is one slice's loads and products.
macro_rules! block_kernel {
    ($name:ident, $step:literal, $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        unsafe fn $name(
            a: *const u16,
            b: *const u16,
            slices: usize,
            (out, stride): (*mut f32, usize),
        ) {
            unsafe {
                std::arch::asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "2:",
                    $body,
                    concat!("add {a}, ", $step),
                    concat!("add {b}, ", $step),
                    "dec {n}",
                    "jnz 2b",
                    "tilestored [{c} + {cs}*1], tmm0",
                    "tilestored [{c} + {cs}*1 + 64], tmm1",
                    "tilestored [{c2} + {cs}*1], tmm2",
                    "tilestored [{c2} + {cs}*1 + 64], tmm3",
                    a = inout(reg) a => _,
                    b = inout(reg) b => _,
                    n = inout(reg) slices => _,
                    s = in(reg) 64usize,
                    c = in(reg) out,
                    c2 = in(reg) out.add(16 * stride),
                    cs = in(reg) stride * 4,
                    options(nostack)
                );
            }
        }

        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $name(_: *const u16, _: *const u16, _: usize, _: (*mut f32, usize)) {
            unreachable!("AMX is x86-64 only")
        }
    };
}

// Two pieces: a₀b₀, a₀b₁, a₁b₀ (10 tile loads per slice).
block_kernel!(
    block2,
    "4096",
    concat!(
        load_a!(0),
        load_b!(0),
        products!(),
        load_b!(1),
        products!(),
        load_a!(1),
        load_b!(0),
        products!()
    )
);

// Three pieces: a₀b₀, a₀b₁, a₀b₂, a₁b₁, a₁b₀, a₂b₀ (16 tile loads per slice).
block_kernel!(
    block3,
    "6144",
    concat!(
        load_a!(0),
        load_b!(0),
        products!(),
        load_b!(1),
        products!(),
        load_b!(2),
        products!(),
        load_a!(1),
        load_b!(1),
        products!(),
        load_b!(0),
        products!(),
        load_a!(2),
        products!()
    )
);

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_config() {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_release() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "xsave")]
    unsafe fn xcr0() -> u64 {
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against a float64 product, for shapes with ragged rows, columns and `k`, strided `A` and
    /// `C`, one and two threads. The error bound is float32-like; plain bf16 operands (checked
    /// too) are two orders of magnitude worse, so the split is what the bound measures. Three
    /// pieces must be within a few times a float32 dot product's own error (summed in order).
    #[test]
    fn matches_float64_product() {
        if !available() {
            // Then the contract is the fallback: where the CPU reports AMX and the kernel has
            // enabled its tile state (XCR0 bits 17-18), the process must get it unless turned
            // off; and the product refuses to run (callers take `sgemm`).
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::x86_64::__cpuid_count;
                let edx = __cpuid_count(7, 0).edx;
                let osxsave = (__cpuid_count(1, 0).ecx >> 27) & 1 == 1;
                // SAFETY: XGETBV is available when CPUID reports OSXSAVE.
                let xcr0 = if osxsave { unsafe { xcr0() } } else { 0 };
                let enabled = (edx >> 24) & 1 == 1 && (edx >> 22) & 1 == 1 && (xcr0 >> 17) & 3 == 3;
                let off = std::env::var("LLAMAGEN_AMX").is_ok_and(|v| v.trim() == "0");
                assert!(
                    off || !enabled,
                    "this CPU and kernel support AMX but the process was not granted it"
                );
            }
            let b = PackedB::from_weight(&[1.0; 4], 2, 2, Split::Two);
            let refused = std::panic::catch_unwind(|| {
                gemm(1, &[1.0, 2.0], 2, &b, &mut [0.0; 2], 2, 1);
            });
            assert!(refused.is_err());
            return;
        }
        for (m, n, k, threads, split_, bound) in [
            (1, 1, 1, 1, Split::Two, 2e-5),
            (37, 50, 70, 1, Split::Two, 2e-5),
            (64, 64, 64, 2, Split::Two, 2e-5),
            (100, 2304, 768, 2, Split::Two, 2e-5),
            (33, 768, 2048, 2, Split::Two, 2e-5),
            (1, 1, 1, 1, Split::Three, 0.0),
            (37, 50, 70, 1, Split::Three, 0.0),
            (100, 2304, 768, 2, Split::Three, 0.0),
            (33, 768, 2048, 2, Split::Three, 0.0),
        ] {
            let (lda, ldc) = (k + 3, n + 5);
            let a = rand(m * lda, 1 + m as u64);
            let w = rand(n * k, 7 + n as u64);
            let b = PackedB::from_weight(&w, n, k, split_);
            let mut c = vec![f32::NAN; m * ldc];
            gemm(m, &a, lda, &b, &mut c, ldc, threads);
            let (mut err, mut err_bf16, mut err_f32, mut scale) = (0f64, 0f64, 0f64, 0f64);
            let r = |x: f32| f32::from_bits((bf16(x) as u32) << 16) as f64;
            for i in 0..m {
                for j in 0..n {
                    let (mut e, mut e16, mut e32) = (0f64, 0f64, 0f32);
                    for kk in 0..k {
                        e += a[i * lda + kk] as f64 * w[j * k + kk] as f64;
                        e16 += r(a[i * lda + kk]) * r(w[j * k + kk]);
                        e32 += a[i * lda + kk] * w[j * k + kk];
                    }
                    err = err.max((c[i * ldc + j] as f64 - e).abs());
                    err_bf16 = err_bf16.max((e16 - e).abs());
                    err_f32 = err_f32.max((e32 as f64 - e).abs());
                    scale = scale.max(e.abs());
                }
                // Padding columns of C are not touched.
                assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
            }
            let (rel, rel16, rel32) = (err / scale, err_bf16 / scale, err_f32 / scale);
            eprintln!(
                "{m}×{n}×{k} {split_:?}: relative error {rel:.2e}, plain bf16 {rel16:.2e}, \
                 float32 {rel32:.2e}"
            );
            let bound = if split_ == Split::Three {
                4.0 * rel32 + 1e-7
            } else {
                bound
            };
            assert!(
                rel < bound,
                "{m}×{n}×{k} {split_:?}: relative error {rel:e}"
            );
            assert!(
                k < 32 || rel16 > 20.0 * rel,
                "{m}×{n}×{k}: bf16 {rel16:e} vs {rel:e}"
            );
        }
    }
}
