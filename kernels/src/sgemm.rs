//! Single-precision matrix multiply for the CPU hot paths (convolutions, T5 and GPT linear
//! layers).
//!
//! Invariants enforced here:
//! - `sgemm` computes `C = A·B` or `C += A·B` (`accumulate`) for any element strides of `A` and
//!   `B`; the columns of `C` are contiguous (`C[i, j]` at `c + i·c_rs + j`).
//! - At most `SMALL_M` rows of `A` with contiguous rows, times a `B` with contiguous columns
//!   (token-by-token sampling), are dot products that read `B` once.
//! - Otherwise, on x86-64 CPUs with AVX-512F, it packs `A` into `MR` (8)-row panels and `B` into
//!   `NR` (48)-column panels (BLIS-style blocking: `KC` of the shared dimension, `MC` rows of `A`,
//!   `NC` columns of `B`) and runs an 8×48 register-tile kernel; elsewhere it calls the `gemm`
//!   crate with the same arguments. All paths differ only by float32 summation order.
//! - With `threads > 1`, a `C` with at least `2·NR` columns per thread is split into one slab
//!   of whole `NR` panels per thread, each an independent single-threaded product that packs
//!   its own `B` (nothing serial, no synchronisation per block); a narrower `C` runs its blocks
//!   of `MC` rows in parallel instead. Either way each thread writes only its own part of `C`.
//! - A producer that builds `B` itself (a convolution's patch matrix) writes it straight into
//!   the packed panel layout ([`PackedB`]), one `KC`-row block at a time, just before the block
//!   is multiplied (`sgemm_produced`): `B` is never stored whole nor copied again. Without
//!   AVX-512 the same panels are multiplied one by one through `sgemm`.

use rayon::prelude::*;

/// Rows of the register tile (broadcast from packed `A`).
const MR: usize = 8;
/// Columns of the register tile (three 16-float vectors of packed `B`).
const NR: usize = 48;
/// 16-float vectors per register-tile row.
const NV: usize = NR / 16;
/// Shared-dimension block: one packed `B` panel (`KC × NR` floats, 48 KiB) stays near L1.
const KC: usize = 256;
/// Row block of `A` (`MC × KC` floats, 96 KiB) that stays in L2.
const MC: usize = 96;
/// Column block of `B` (`KC × NC` floats, 2 MiB).
const NC: usize = 2016;

/// Pointer wrapper for the rows of `C` that parallel row blocks write.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Whether the AVX-512 kernel runs on this CPU.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`.
///
/// # Safety
/// The pointers and strides must address `m×k`, `k×n` and `m×n` valid elements; `C` must not
/// overlap `A` or `B`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    (a, a_rs, a_cs): (*const f32, isize, isize),
    (b, b_rs, b_cs): (*const f32, isize, isize),
    (c, c_rs): (*mut f32, isize),
    accumulate: bool,
    threads: usize,
) {
    unsafe {
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                // Raw writes: C may be uninitialised memory (`uninit_buffer`), which must not be
                // seen through a `&mut [f32]`.
                for i in 0..m {
                    std::ptr::write_bytes(c.offset(i as isize * c_rs), 0, n);
                }
            }
            return;
        }
        if m <= SMALL_M && a_cs == 1 && b_rs == 1 {
            return small_m(
                (m, n, k),
                (a, a_rs),
                (b, b_cs),
                (c, c_rs),
                accumulate,
                threads,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            return by_column_slabs(n, b_cs, (b, c), threads, |(n, b, c), threads| {
                avx512::sgemm(
                    (m, n, k),
                    (a, a_rs, a_cs),
                    BSource::Strided(b, b_rs, b_cs),
                    (c, c_rs),
                    accumulate,
                    threads,
                    None,
                )
            });
        }
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        gemm::gemm(
            m, n, k, c, 1, c_rs, accumulate, a, a_cs, a_rs, b, b_cs, b_rs, 1.0, 1.0, false, false,
            false, par,
        );
    }
}

/// Runs `f((n_s, b_s, c_s), threads_s)` either once on the whole product (`threads` for its row
/// blocks) or, when `C` has at least `2·NR` columns per thread, in parallel on one slab of
/// whole `NR`-column panels per thread (`B` and `C` offset to the slab, one thread each).
///
/// # Safety
/// `b` and `c` address the `n` columns of `B` (column stride `b_cs`) and `C` (contiguous).
#[cfg(target_arch = "x86_64")]
unsafe fn by_column_slabs(
    n: usize,
    b_cs: isize,
    (b, c): (*const f32, *mut f32),
    threads: usize,
    f: impl Fn((usize, *const f32, *mut f32), usize),
) {
    /// The product closure, shared by the slab threads: it holds raw pointers to `A` and `B`,
    /// which are only read, and each call writes only its own slab of `C`.
    struct Shared<F>(F);
    unsafe impl<F> Sync for Shared<F> {}
    let panels = n.div_ceil(NR);
    if threads <= 1 || panels < 2 * threads {
        return f((n, b, c), threads);
    }
    let (bu, cu) = (b as usize, c as usize);
    let f = Shared(f);
    (0..threads).into_par_iter().for_each(|t| {
        let f = &f;
        let (p0, p1) = (panels * t / threads, panels * (t + 1) / threads);
        let (j0, j1) = (p0 * NR, (p1 * NR).min(n));
        // SAFETY: slab t covers columns [j0, j1) of B and C; the slabs do not overlap.
        let (b, c) = unsafe {
            (
                (bu as *const f32).offset(j0 as isize * b_cs),
                (cu as *mut f32).add(j0),
            )
        };
        (f.0)((j1 - j0, b, c), 1)
    });
}

/// At most this many rows of `A` (token-by-token sampling) take dot products instead of
/// packed panels: the product is bound by reading `B` once.
const SMALL_M: usize = 4;
/// Columns of `C` per parallel work item of the dot-product path.
const SMALL_M_BLOCK: usize = 64;
/// The dot products of one work item: `SMALL_M` rows × `SMALL_M_BLOCK` columns, on the stack.
type SmallOut = [[f32; SMALL_M_BLOCK]; SMALL_M];

/// `C[i, j] (+)= Σ_p A[i, p]·B[p, j]` as dot products of contiguous rows of `A` and contiguous
/// columns of `B`, in parallel over blocks of columns.
unsafe fn small_m(
    (m, n, k): (usize, usize, usize),
    (a, a_rs): (*const f32, isize),
    (b, b_cs): (*const f32, isize),
    (c, c_rs): (*mut f32, isize),
    accumulate: bool,
    threads: usize,
) {
    #[inline(always)]
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let (xc, yc) = (x.chunks_exact(16), y.chunks_exact(16));
        let tail: f32 = xc
            .remainder()
            .iter()
            .zip(yc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (xs, ys) in xc.zip(yc) {
            for l in 0..16 {
                acc[l] += xs[l] * ys[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
    #[inline(always)]
    fn columns(
        rows: &[&[f32]],
        (b, b_cs): (usize, isize),
        k: usize,
        (j0, w): (usize, usize),
        out: &mut SmallOut,
    ) {
        for (jj, j) in (j0..j0 + w).enumerate() {
            // SAFETY: column j of B holds k elements (caller of `sgemm`).
            let col = unsafe {
                std::slice::from_raw_parts((b as *const f32).offset(j as isize * b_cs), k)
            };
            for (i, r) in rows.iter().enumerate() {
                out[i][jj] = dot(r, col);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn columns_avx2(
        rows: &[&[f32]],
        b: (usize, isize),
        k: usize,
        cols: (usize, usize),
        out: &mut SmallOut,
    ) {
        columns(rows, b, k, cols, out)
    }
    let rows: Vec<&[f32]> = (0..m)
        .map(|i| unsafe { std::slice::from_raw_parts(a.offset(i as isize * a_rs), k) })
        .collect();
    const BLOCK: usize = SMALL_M_BLOCK;
    let (bu, cu) = (b as usize, c as usize);
    let run = |blk: usize| {
        let j0 = blk * BLOCK;
        let w = BLOCK.min(n - j0);
        let mut out: SmallOut = [[0.0; BLOCK]; SMALL_M];
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // SAFETY: the CPU has AVX-512F; rows and columns hold k elements (caller).
            unsafe {
                match m {
                    1 => avx512::columns::<1>(&rows, (bu, b_cs), k, (j0, w), &mut out),
                    2 => avx512::columns::<2>(&rows, (bu, b_cs), k, (j0, w), &mut out),
                    3 => avx512::columns::<3>(&rows, (bu, b_cs), k, (j0, w), &mut out),
                    _ => avx512::columns::<4>(&rows, (bu, b_cs), k, (j0, w), &mut out),
                }
            }
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features the function was compiled for.
            unsafe { columns_avx2(&rows, (bu, b_cs), k, (j0, w), &mut out) };
        } else {
            columns(&rows, (bu, b_cs), k, (j0, w), &mut out);
        }
        #[cfg(not(target_arch = "x86_64"))]
        columns(&rows, (bu, b_cs), k, (j0, w), &mut out);
        for (i, o) in out[..m].iter().enumerate() {
            let o = &o[..w];
            // Row i of C, columns [j0, j0 + w): this block's alone.
            let dst = unsafe { (cu as *mut f32).offset(i as isize * c_rs + j0 as isize) };
            if accumulate {
                // SAFETY: as above; accumulating, C is initialised.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst, w) };
                dst.iter_mut().zip(o).for_each(|(d, s)| *d += s);
            } else {
                // SAFETY: as above. A raw copy: C may be uninitialised (`uninit_buffer`).
                unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), dst, w) };
            }
        }
    };
    let blocks = n.div_ceil(BLOCK);
    if threads > 1 && blocks > 1 {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// A left factor `A` (`m×k`) packed once for many products (a convolution kernel applied to
/// many tiles). Without AVX-512 it only records where `A` is.
pub struct PackedA {
    m: usize,
    k: usize,
    a: (usize, isize, isize),
    /// Panels per `KC` block of the shared dimension, then per `MC` block of rows.
    blocks: Vec<Vec<Vec<f32>>>,
}

impl PackedA {
    /// # Safety
    /// `a`, `rs`, `cs` must address `m×k` valid elements that outlive every use of the result.
    pub unsafe fn new(m: usize, k: usize, (a, rs, cs): (*const f32, isize, isize)) -> Self {
        let mut blocks = Vec::new();
        if has_avx512() {
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let row: Vec<Vec<f32>> = (0..m)
                    .step_by(MC)
                    .map(|ic| {
                        let mut ap = Vec::new();
                        // SAFETY: inside the `m×k` block the caller vouches for.
                        unsafe {
                            pack_a(
                                MC.min(m - ic),
                                kc,
                                a.offset(ic as isize * rs + pc as isize * cs),
                                rs,
                                cs,
                                &mut ap,
                            );
                        }
                        ap
                    })
                    .collect();
                blocks.push(row);
            }
        }
        Self {
            m,
            k,
            a: (a as usize, rs, cs),
            blocks,
        }
    }
}

/// A block of rows of a right factor `B` (`k×n`, `k ≤ KC`) in the packed panel layout, written
/// by its producer.
///
/// Layout: `⌈n/NR⌉` panels of `k × NR` floats (row-major); the columns past `n` of the last
/// panel are zero. The buffer is kept between uses ([`PackedB::reset`]).
#[derive(Default)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows in the block.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Makes room for `k` (at most `KC`) rows of `n` columns; every element must then be
    /// written before use, except the padding columns, which this zeroes.
    pub fn reset(&mut self, k: usize, n: usize) {
        assert!(k <= KC, "PackedB: {k} rows in one block (at most {KC})");
        let panels = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        self.data.resize(k * panels * NR, 0.0);
        if !n.is_multiple_of(NR) {
            let last = (panels - 1) * NR * k;
            for r in 0..k {
                self.data[last + r * NR + n % NR..last + (r + 1) * NR].fill(0.0);
            }
        }
    }

    /// Calls `f(run, done)` for the runs of `B[r, j..j + len]` that are contiguous in `data`
    /// (`done`: elements before the run).
    fn runs(&mut self, r: usize, j: usize, len: usize, mut f: impl FnMut(&mut [f32], usize)) {
        assert!(
            r < self.k && j + len <= self.n,
            "PackedB: B[{r}, {j}..{}] outside {}×{}",
            j + len,
            self.k,
            self.n
        );
        let ps = NR * self.k;
        let (mut j, end, mut done) = (j, j + len, 0);
        while j < end {
            let w = (NR - j % NR).min(end - j);
            let o = j / NR * ps + r * NR + j % NR;
            f(&mut self.data[o..o + w], done);
            j += w;
            done += w;
        }
    }

    /// `B[r, j..j + src.len()] = src`.
    pub fn copy(&mut self, r: usize, j: usize, src: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            // Runs are at most `NR` long: moved by masked vector loads and stores rather than a
            // `memcpy` call per run.
            return self.runs(r, j, src.len(), |run, done| unsafe {
                avx512::copy(run, &src[done..done + run.len()])
            });
        }
        self.runs(r, j, src.len(), |run, done| {
            run.copy_from_slice(&src[done..done + run.len()])
        });
    }

    /// `B[r, j..j + len] = 0`.
    pub fn zero(&mut self, r: usize, j: usize, len: usize) {
        self.runs(r, j, len, |run, _| run.fill(0.0));
    }
}

/// Writes rows `[r0, r0 + pb.k())` of a `B` with `n` columns into `pb` (`pb` comes reset).
pub type ProduceB<'a> = &'a (dyn Fn(usize, &mut PackedB) + Sync);

/// `C[m×n] (+)= A · B` with `A` packed beforehand and `B` written by `produce`, one block of at
/// most `KC` rows at a time.
///
/// # Safety
/// `c` and `c_rs` must address `m×n` valid elements and the `A` that `pa` was packed from must
/// still be alive.
pub unsafe fn sgemm_produced(
    pa: &PackedA,
    n: usize,
    produce: ProduceB,
    c: (*mut f32, isize),
    accumulate: bool,
    threads: usize,
) {
    let (m, k) = (pa.m, pa.k);
    let a = (pa.a.0 as *const f32, pa.a.1, pa.a.2);
    unsafe {
        if m == 0 || n == 0 || k == 0 {
            // Nothing to multiply: `B` is not read (C is zeroed unless accumulating).
            return sgemm(
                (m, n, k),
                a,
                (std::ptr::null(), 0, 0),
                c,
                accumulate,
                threads,
            );
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            return avx512::sgemm(
                (m, n, k),
                a,
                BSource::Produced(produce),
                c,
                accumulate,
                threads,
                Some(pa),
            );
        }
        produced_portable((m, n, k), a, produce, c, accumulate, threads)
    }
}

/// [`sgemm_produced`] without AVX-512: each produced block multiplied panel by panel,
/// `C[:, q·NR..] (+)= A[:, pc..pc + kc] · panel_q`.
///
/// # Safety
/// As for [`sgemm`], with `B` written by `produce`.
unsafe fn produced_portable(
    (m, n, k): (usize, usize, usize),
    a: (*const f32, isize, isize),
    produce: ProduceB,
    (c, c_rs): (*mut f32, isize),
    accumulate: bool,
    threads: usize,
) {
    let mut pb = PackedB::new();
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        pb.reset(kc, n);
        produce(pc, &mut pb);
        for q in 0..n.div_ceil(NR) {
            // SAFETY: columns [pc, pc + kc) of A and [q·NR, q·NR + w) of C (caller).
            unsafe {
                sgemm(
                    (m, NR.min(n - q * NR), kc),
                    (a.0.offset(pc as isize * a.2), a.1, a.2),
                    (pb.data[q * NR * kc..].as_ptr(), NR as isize, 1),
                    (c.add(q * NR), c_rs),
                    accumulate || pc > 0,
                    threads,
                );
            }
        }
    }
}

/// Where the AVX-512 path reads `B`: strided elements to pack per block, or packed panels.
#[derive(Clone, Copy)]
enum BSource<'a> {
    Strided(*const f32, isize, isize),
    Produced(ProduceB<'a>),
}

/// `C[m×n] (+)= A · B[k×n]` with `A` packed beforehand.
///
/// # Safety
/// As for [`sgemm`], and the `A` that `pa` was packed from must still be alive.
pub unsafe fn sgemm_packed(
    pa: &PackedA,
    n: usize,
    b: (*const f32, isize, isize),
    c: (*mut f32, isize),
    accumulate: bool,
    threads: usize,
) {
    let (m, k) = (pa.m, pa.k);
    let a = (pa.a.0 as *const f32, pa.a.1, pa.a.2);
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() && m > 0 && n > 0 && k > 0 {
            return by_column_slabs(n, b.2, (b.0, c.0), threads, |(n, b0, c0), threads| {
                avx512::sgemm(
                    (m, n, k),
                    a,
                    BSource::Strided(b0, b.1, b.2),
                    (c0, c.1),
                    accumulate,
                    threads,
                    Some(pa),
                )
            });
        }
        sgemm((m, n, k), a, b, c, accumulate, threads)
    }
}

/// Packs rows `[0, mc)` × shared `[0, kc)` of `A` into `MR`-row panels, zero-padded.
///
/// Full panels of contiguous rows are transposed 8×8 at a time with AVX; full panels whose
/// columns are contiguous (a transposed `A`) copy one column per step.
unsafe fn pack_a(mc: usize, kc: usize, a: *const f32, rs: isize, cs: isize, out: &mut Vec<f32>) {
    unsafe {
        let panels = mc.div_ceil(MR);
        out.resize(panels * MR * kc, 0.0);
        for q in 0..panels {
            let dst = &mut out[q * MR * kc..(q + 1) * MR * kc];
            let h = MR.min(mc - q * MR);
            let first = a.offset((q * MR) as isize * rs);
            #[cfg(target_arch = "x86_64")]
            if h == MR && cs == 1 && has_avx512() {
                avx512::transpose8(kc, first, rs, (dst.as_mut_ptr(), MR));
                continue;
            }
            if h == MR && rs == 1 {
                for p in 0..kc {
                    let col = std::slice::from_raw_parts(first.offset(p as isize * cs), MR);
                    dst[p * MR..(p + 1) * MR].copy_from_slice(col);
                }
                continue;
            }
            for p in 0..kc {
                for i in 0..MR {
                    dst[p * MR + i] = if i < h {
                        *first.offset(i as isize * rs + p as isize * cs)
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Packs shared `[0, kc)` × columns `[0, nc)` of `B` into `NR`-column panels, zero-padded.
unsafe fn pack_b(kc: usize, nc: usize, b: *const f32, rs: isize, cs: isize, out: &mut [f32]) {
    unsafe {
        for q in 0..nc.div_ceil(NR) {
            let dst = &mut out[q * NR * kc..(q + 1) * NR * kc];
            let w = NR.min(nc - q * NR);
            let base = b.offset((q * NR) as isize * cs);
            if cs == 1 && w == NR {
                for p in 0..kc {
                    let src = &*(base.offset(p as isize * rs) as *const [f32; NR]);
                    dst[p * NR..(p + 1) * NR].copy_from_slice(src);
                }
            } else if cs == 1 {
                for p in 0..kc {
                    let src = std::slice::from_raw_parts(base.offset(p as isize * rs), w);
                    dst[p * NR..p * NR + w].copy_from_slice(src);
                    dst[p * NR + w..(p + 1) * NR].fill(0.0);
                }
            } else {
                if w < NR {
                    dst.fill(0.0);
                }
                let mut j = 0;
                // Contiguous columns (a transposed `B`, as in `x·Wᵀ`): 8 at a time, by 8×8
                // register transposes.
                #[cfg(target_arch = "x86_64")]
                if rs == 1 && has_avx512() {
                    while j + 8 <= w {
                        let cols = base.offset(j as isize * cs);
                        avx512::transpose8(kc, cols, cs, (dst.as_mut_ptr().add(j), NR));
                        j += 8;
                    }
                }
                for j in j..w {
                    let col = base.offset(j as isize * cs);
                    for p in 0..kc {
                        dst[p * NR + j] = *col.offset(p as isize * rs);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// `d[p·ds + i] = S[i, p]` for the 8 rows of `S` starting at `a` (row stride `rs`,
    /// contiguous along `p`) and `p < kc`: 8×8 blocks transposed in registers, then the tail.
    /// Packs `MR` (8) rows of `A` (`ds = MR`) or 8 contiguous columns of `B` (`ds = NR`).
    ///
    /// # Safety
    /// `a` addresses 8 rows of `kc` elements; `d` addresses `(kc − 1)·ds + 8` writable elements.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn transpose8(
        kc: usize,
        a: *const f32,
        rs: isize,
        (d, ds): (*mut f32, usize),
    ) {
        const _: () = assert!(MR == 8);
        unsafe {
            let row = |i: usize| a.offset(i as isize * rs);
            let mut p = 0;
            while p + 8 <= kc {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(row(i).add(p)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let cols = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (j, c) in cols.into_iter().enumerate() {
                    _mm256_storeu_ps(d.add((p + j) * ds), c);
                }
                p += 8;
            }
            for p in p..kc {
                for i in 0..8 {
                    *d.add(p * ds + i) = *row(i).add(p);
                }
            }
        }
    }

    /// `dst = src` (equal lengths).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn copy(dst: &mut [f32], src: &[f32]) {
        debug_assert_eq!(dst.len(), src.len());
        let (d, s, w) = (dst.as_mut_ptr(), src.as_ptr(), dst.len().min(src.len()));
        let mut t = 0;
        unsafe {
            while t + 16 <= w {
                _mm512_storeu_ps(d.add(t), _mm512_loadu_ps(s.add(t)));
                t += 16;
            }
            if t < w {
                let m = ((1u32 << (w - t)) - 1) as __mmask16;
                _mm512_mask_storeu_ps(d.add(t), m, _mm512_maskz_loadu_ps(m, s.add(t)));
            }
        }
    }

    /// The `MR`×`NR` register tile: `C[0..MR, 0..NR] (+)= Ap · Bp` over `kc` packed steps.
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, c_rs: isize, acc: bool) {
        unsafe {
            let mut acc_ = [[_mm512_setzero_ps(); NV]; MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                let mut bv = [_mm512_setzero_ps(); NV];
                for v in 0..NV {
                    bv[v] = _mm512_loadu_ps(b.add(16 * v));
                }
                for i in 0..MR {
                    let ai = _mm512_set1_ps(*a.add(i));
                    for v in 0..NV {
                        acc_[i][v] = _mm512_fmadd_ps(ai, bv[v], acc_[i][v]);
                    }
                }
                a = a.add(MR);
                b = b.add(NR);
            }
            for i in 0..MR {
                let p = c.offset(i as isize * c_rs);
                for v in 0..NV {
                    let mut x = acc_[i][v];
                    if acc {
                        x = _mm512_add_ps(x, _mm512_loadu_ps(p.add(16 * v)));
                    }
                    _mm512_storeu_ps(p.add(16 * v), x);
                }
            }
        }
    }

    /// Dot products of the `M` (≤ `SMALL_M`) rows with columns `j0..j0 + out[0].len()` of `B`,
    /// four columns at a time so that `4·M` independent accumulators hide the FMA latency and
    /// the product runs at the speed `B` streams from memory.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns<const M: usize>(
        rows: &[&[f32]],
        (b, b_cs): (usize, isize),
        k: usize,
        (j0, w): (usize, usize),
        out: &mut SmallOut,
    ) {
        unsafe {
            const C: usize = 4;
            let tail = k % 16;
            let kv = k - tail;
            let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
            let r: [*const f32; M] = std::array::from_fn(|i| rows[i].as_ptr());
            let mut jj = 0;
            while jj < w {
                let nc = C.min(w - jj);
                // Columns past the block's end repeat its first one; their sums are dropped.
                let cols: [*const f32; C] = std::array::from_fn(|c| {
                    let j = j0 + jj + if c < nc { c } else { 0 };
                    (b as *const f32).offset(j as isize * b_cs)
                });
                let mut acc = [[_mm512_setzero_ps(); C]; M];
                let mut p = 0;
                while p < kv {
                    let bv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(cols[c].add(p)));
                    for i in 0..M {
                        let av = _mm512_loadu_ps(r[i].add(p));
                        for c in 0..C {
                            acc[i][c] = _mm512_fmadd_ps(av, bv[c], acc[i][c]);
                        }
                    }
                    p += 16;
                }
                if tail > 0 {
                    let bv: [__m512; C] =
                        std::array::from_fn(|c| _mm512_maskz_loadu_ps(mask, cols[c].add(kv)));
                    for i in 0..M {
                        let av = _mm512_maskz_loadu_ps(mask, r[i].add(kv));
                        for c in 0..C {
                            acc[i][c] = _mm512_fmadd_ps(av, bv[c], acc[i][c]);
                        }
                    }
                }
                for i in 0..M {
                    for c in 0..nc {
                        out[i][jj + c] = _mm512_reduce_add_ps(acc[i][c]);
                    }
                }
                jj += C;
            }
        }
    }

    /// One `mc × nc` block of `C` from packed `A` (`ap`) and packed `B` (`bp`).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        (mc, nc, kc): (usize, usize, usize),
        ap: &[f32],
        bp: &[f32],
        c: *mut f32,
        c_rs: isize,
        acc: bool,
    ) {
        unsafe {
            let mut tmp = [0f32; MR * NR];
            for jq in 0..nc.div_ceil(NR) {
                let w = NR.min(nc - jq * NR);
                let bpanel = bp.as_ptr().add(jq * NR * kc);
                for iq in 0..mc.div_ceil(MR) {
                    let h = MR.min(mc - iq * MR);
                    let apanel = ap.as_ptr().add(iq * MR * kc);
                    let ct = c.offset((iq * MR) as isize * c_rs + (jq * NR) as isize);
                    if h == MR && w == NR {
                        kernel(kc, apanel, bpanel, ct, c_rs, acc);
                    } else {
                        kernel(kc, apanel, bpanel, tmp.as_mut_ptr(), NR as isize, false);
                        for i in 0..h {
                            let row = ct.offset(i as isize * c_rs);
                            let t = &tmp[i * NR..i * NR + w];
                            if acc {
                                std::slice::from_raw_parts_mut(row, w)
                                    .iter_mut()
                                    .zip(t)
                                    .for_each(|(d, s)| *d += s);
                            } else {
                                // A raw copy: C may be uninitialised (`uninit_buffer`).
                                std::ptr::copy_nonoverlapping(t.as_ptr(), row, w);
                            }
                        }
                    }
                }
            }
        }
    }

    thread_local! {
        static PACKED_B: std::cell::Cell<PackedB> = std::cell::Cell::new(PackedB::new());
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sgemm(
        (m, n, k): (usize, usize, usize),
        (a, a_rs, a_cs): (*const f32, isize, isize),
        b: BSource,
        (c, c_rs): (*mut f32, isize),
        accumulate: bool,
        threads: usize,
        packed: Option<&PackedA>,
    ) {
        unsafe {
            // Row blocks: MC rows, or fewer so that every thread gets a share.
            let mc_max = if packed.is_some() {
                MC
            } else if threads > 1 {
                m.div_ceil(threads).div_ceil(MR).max(1) * MR
            } else {
                MC
            }
            .min(MC);
            let blocks = m.div_ceil(mc_max);
            // The packed-B buffer of this thread, reused across calls (taken out, so a nested
            // call on the same thread, e.g. from rayon work stealing, gets a fresh one).
            let mut bp = PACKED_B.take();
            // A producer writes whole rows (one column block); strided `B` is packed per
            // `NC` columns.
            let ncb = match b {
                BSource::Strided(..) => {
                    bp.data.resize(KC * n.min(NC).div_ceil(NR) * NR, 0.0);
                    NC
                }
                BSource::Produced(_) => n,
            };
            let cp = SendPtr(c);
            let ap_ = a as usize;
            for jc in (0..n).step_by(ncb) {
                let nc = ncb.min(n - jc);
                for pc in (0..k).step_by(KC) {
                    let kc = KC.min(k - pc);
                    match b {
                        BSource::Strided(b, b_rs, b_cs) => pack_b(
                            kc,
                            nc,
                            b.offset(pc as isize * b_rs + jc as isize * b_cs),
                            b_rs,
                            b_cs,
                            &mut bp.data,
                        ),
                        BSource::Produced(produce) => {
                            bp.reset(kc, n);
                            produce(pc, &mut bp);
                        }
                    }
                    let acc = accumulate || pc > 0;
                    let bp = &bp.data[..];
                    let run = |ap: &mut Vec<f32>, blk: usize| {
                        let cp = cp;
                        let ic = blk * mc_max;
                        let mc = mc_max.min(m - ic);
                        let panels = match packed {
                            Some(pa) => &pa.blocks[pc / KC][blk][..],
                            None => {
                                let a0 = (ap_ as *const f32)
                                    .offset(ic as isize * a_rs + pc as isize * a_cs);
                                pack_a(mc, kc, a0, a_rs, a_cs, ap);
                                &ap[..]
                            }
                        };
                        block(
                            (mc, nc, kc),
                            panels,
                            bp,
                            cp.0.offset(ic as isize * c_rs + jc as isize),
                            c_rs,
                            acc,
                        );
                    };
                    if threads > 1 && blocks > 1 {
                        (0..blocks).into_par_iter().for_each_init(Vec::new, run);
                    } else {
                        let mut ap = Vec::new();
                        (0..blocks).for_each(|blk| run(&mut ap, blk));
                    }
                }
            }
            PACKED_B.set(bp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    /// Reproducible values in [-0.5, 0.5) (a linear congruential generator).
    fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
    }

    /// Every element of `c` within 1e-4 (relative) of `want + base`.
    fn assert_close(c: &[f32], want: &[f64], base: f64, what: &str) {
        for (i, (g, w)) in c.iter().zip(want).enumerate() {
            let w = w + base;
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what} at {i}: {g} vs {w}"
            );
        }
    }

    /// `B` produced block by block into the packed layout (runs that straddle panels, zeros),
    /// multiplied by the AVX-512 path and by the portable one, against a float64 triple loop.
    #[test]
    fn produced_b_matches_reference() {
        let mut rnd = uniform(7);
        for (m, n, k) in [(37, 2100, 600), (128, 1024, 300), (3, 50, 257), (9, 7, 5)] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            // Zeros at the ends of each row.
            let ends = |r: usize| ((r % 5).min(n), (n - (r % 3).min(n)).max((r % 5).min(n)));
            for r in 0..k {
                let (lo, hi) = ends(r);
                b[r * n..r * n + lo].fill(0.0);
                b[r * n + hi..(r + 1) * n].fill(0.0);
            }
            // The middle of each row is copied in two pieces.
            let produce = |r0: usize, pb: &mut PackedB| {
                for i in 0..pb.k() {
                    let r = r0 + i;
                    let (lo, hi) = ends(r);
                    pb.zero(i, 0, lo);
                    pb.zero(i, hi, n - hi);
                    let mid = lo + (hi - lo) / 3;
                    pb.copy(i, lo, &b[r * n + lo..r * n + mid]);
                    pb.copy(i, mid, &b[r * n + mid..r * n + hi]);
                }
            };
            let want = reference(m, n, k, &a, &b);
            for (portable, threads) in [(false, 2), (true, 1)] {
                let mut c = vec![5.0; m * n];
                let cc = (c.as_mut_ptr(), n as isize);
                unsafe {
                    if portable {
                        let a = (a.as_ptr(), k as isize, 1);
                        produced_portable((m, n, k), a, &produce, cc, true, threads);
                    } else {
                        let pa = PackedA::new(m, k, (a.as_ptr(), k as isize, 1));
                        sgemm_produced(&pa, n, &produce, cc, false, threads);
                    }
                }
                let base = if portable { 5.0 } else { 0.0 };
                assert_close(&c, &want, base, &format!("portable {portable} {m}×{n}×{k}"));
            }
        }
    }

    /// Odd sizes (partial tiles and blocks), both layouts of `B`, accumulation, one and two
    /// threads, against a float64 triple loop.
    #[test]
    fn matches_reference_on_edges_and_layouts() {
        let mut rnd = uniform(1);
        for (m, n, k) in [
            (1, 1, 1),
            (3, 200, 77),
            (2, 130, 16),
            (4, 67, 1000),
            (13, 33, 7),
            (100, 70, 300),
            (37, 2100, 260),
            (128, 96, 513),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let want = reference(m, n, k, &a, &b);
            // A packed once, then used like `sgemm`.
            let mut c = vec![3.0; m * n];
            unsafe {
                let pa = PackedA::new(m, k, (a.as_ptr(), k as isize, 1));
                sgemm_packed(
                    &pa,
                    n,
                    (b.as_ptr(), n as isize, 1),
                    (c.as_mut_ptr(), n as isize),
                    false,
                    2,
                );
            }
            assert_close(&c, &want, 0.0, &format!("packed {m}×{n}×{k}"));
            // A stored transposed (column-major): the packing copies columns.
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            for threads in [1, 2] {
                let mut c = vec![9.0; m * n];
                unsafe {
                    sgemm(
                        (m, n, k),
                        (at.as_ptr(), 1, m as isize),
                        (b.as_ptr(), n as isize, 1),
                        (c.as_mut_ptr(), n as isize),
                        false,
                        threads,
                    );
                }
                assert_close(
                    &c,
                    &want,
                    0.0,
                    &format!("{m}×{n}×{k} t{threads} A transposed"),
                );
            }
            for (threads, transposed, acc) in
                [(1, false, false), (2, true, false), (2, false, true)]
            {
                let mut c = vec![if acc { 1.0 } else { 7.0 }; m * n];
                unsafe {
                    let bspec = if transposed {
                        (bt.as_ptr(), 1, k as isize)
                    } else {
                        (b.as_ptr(), n as isize, 1)
                    };
                    sgemm(
                        (m, n, k),
                        (a.as_ptr(), k as isize, 1),
                        bspec,
                        (c.as_mut_ptr(), n as isize),
                        acc,
                        threads,
                    );
                }
                let base = if acc { 1.0 } else { 0.0 };
                let what = format!("{m}×{n}×{k} t{threads} T{transposed} acc{acc}");
                assert_close(&c, &want, base, &what);
            }
        }
    }
}
