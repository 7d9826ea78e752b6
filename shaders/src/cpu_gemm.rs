//! The CPU's batched integer product (prefill): many rows of activations against a
//! quantised matrix, in register tiles.
//!
//! The arithmetic is the integer path's (`cpu_int.rs`): activations quantised to 16 bits
//! per 32, weights read as integer codes with an affine map per 16, and per chunk of 32
//! elements `d_x a_w sum(c q)` accumulated in f32 lanes, `b_w d_x sum(q)` added at the end.
//! What changes is the order of the work, which is what a GEMM is about:
//!
//! - A task owns a rectangle of `y`: a block of activation rows and a band of weight rows.
//!   It widens the band's codes to i16 once (the band fits in L2), then walks the
//!   activation rows [`RA`] at a time (that tile stays in L1) across the band [`RW`]
//!   weight rows at a time.
//! - The micro-kernel keeps `RW x RA` accumulators in registers: each chunk of weight
//!   codes loaded is used for `RA` activation rows, each chunk of activations for `RW`
//!   weight rows. Per pair and chunk it is one `vpmaddwd`, one conversion and one FMA
//!   whose scale (`d_x a_w`, built for the whole tile beforehand) comes from memory.
//!
//! Before this, each weight row streamed every activation row through the caches once
//! (`pp512` was 0.45x llama.cpp). Where the processor has AVX-512 VNNI, the tasks run
//! `cpu_gemm_vnni.rs`'s kernel, with the weight rows in the lanes.
//!
//! # Shapes
//! - weights: `n` rows of `k / B::ELEMS` blocks; activations: [`IntActs`], `m` rows of `k`
//! - `y`: `[m, n]`, row-major

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu_hot::SendPtr;
use crate::cpu_int::{G, IntActs, IntCodes, QB};
use vidllm_core::ggml::{GgmlType, blocks};

/// Weight rows per register tile.
pub const RW: usize = 4;
/// Activation rows per register tile.
pub const RA: usize = 4;
/// Pairs (weight row, activation row) per tile.
const PAIRS: usize = RW * RA;
/// Most activation rows per task: 4 MiB of i16 activations at k = 1536 would not stay in
/// L2 while the band is swept, 128 rows (384 KiB) do.
const MAX_TASK_ROWS: usize = 128;
/// Bytes of widened codes a band may take: it is swept once per tile of activation rows
/// and stays in L2 next to that tile.
const BAND_BYTES: usize = 192 << 10;

/// Whether this processor has a batched kernel (x86-64 with AVX2 or AVX-512); elsewhere
/// (WebAssembly, other architectures) products go row by row through `cpu_int::row_dot`.
pub fn available() -> bool {
    kernel_isa().is_some()
}

#[derive(Clone, Copy, Debug)]
enum Isa {
    /// `cpu_gemm_vnni.rs`: weight rows in the lanes, `vpdpwssd`.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    /// Whether this processor runs the kernel.
    fn runs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => crate::cpu_gemm_vnni::runs(),
                Isa::Avx512 => has!("avx512f") && has!("avx512bw"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {}
    }
}

impl Isa {
    /// Blocks of activation rows the tasks split `m` rows into. `cpu_gemm`'s tasks take
    /// at most [`MAX_TASK_ROWS`] (a task's rows stay in L2 while its band is swept).
    /// `cpu_gemm_vnni` sweeps its band once per tile of six rows, whatever the task's rows,
    /// and widens the band once per task: its tasks are as tall as the product, unless
    /// there are too few tiles of weight rows to give every thread about four tasks; then
    /// the rows are split, down to 64 a task.
    fn row_blocks(self, m: usize, n: usize, threads: usize) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => (4 * threads).div_ceil(n.div_ceil(self.tile_rows())).min(m.div_ceil(64)).max(1),
            _ => m.div_ceil(MAX_TASK_ROWS),
        }
    }

    /// Weight rows per register tile: a band is a multiple of it.
    fn tile_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => crate::cpu_gemm_vnni::TILE_ROWS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx2 => RW,
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!(),
        }
    }
}

/// The best kernel this processor runs.
fn kernel_isa() -> Option<Isa> {
    isas().next()
}

/// Every kernel this processor runs, best first.
fn isas() -> impl Iterator<Item = Isa> {
    #[cfg(target_arch = "x86_64")]
    let all = [Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2];
    #[cfg(not(target_arch = "x86_64"))]
    let all: [Isa; 0] = [];
    all.into_iter().filter(|isa| isa.runs())
}

/// `y = x W^T` for `W` (`n` rows of type `ty`, packed) and the quantised rows of `x`,
/// split into tasks over the thread pool.
///
/// # Panics
/// If no batched kernel is [`available`], if `ty` is not a block type, or if the shapes do
/// not agree.
pub fn matmul(ty: GgmlType, w: &[u8], n: usize, acts: &IntActs) -> Vec<f32> {
    matmul_on(kernel_isa().expect("cpu_gemm::matmul: no batched kernel on this processor"), ty, w, n, acts)
}

fn matmul_on(isa: Isa, ty: GgmlType, w: &[u8], n: usize, acts: &IntActs) -> Vec<f32> {
    let (m, k) = (acts.rows(), acts.k);
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    // The words holding W may end in padding.
    assert!(k.is_multiple_of(ty.block_elems()) && w.len() >= n * row_bytes, "cpu_gemm::matmul: W is not n rows of k");
    // Bands of whole tiles, small enough to stay in L2, and enough tasks to keep every
    // thread busy (about four each: the last ones balance the load).
    let threads = rayon::current_num_threads();
    let row_blocks = isa.row_blocks(m, n, threads);
    let task_rows = m.div_ceil(row_blocks);
    let tile_rows = isa.tile_rows();
    let band_cap = (BAND_BYTES / (2 * k)).max(tile_rows) / tile_rows * tile_rows;
    let bands_wanted = (4 * threads).div_ceil(row_blocks).max(n.div_ceil(band_cap));
    let band = n.div_ceil(bands_wanted).div_ceil(tile_rows) * tile_rows;
    let tasks: Vec<(Range<usize>, Range<usize>)> = (0..m)
        .step_by(task_rows)
        .flat_map(|i0| (0..n).step_by(band).map(move |j0| (i0..(i0 + task_rows).min(m), j0..(j0 + band).min(n))))
        .collect();
    // Each task writes its rectangle of y in place: the rectangles are disjoint and cover
    // y, so every value is written once (a copy of each task's part into y, and the
    // zeroing of a fresh y, were a twentieth of a prefill).
    let mut y = Vec::<f32>::with_capacity(m * n);
    let base = SendPtr(y.as_mut_ptr());
    tasks.par_iter().for_each(|(rows, cols)| {
        let wband = &w[cols.start * row_bytes..cols.end * row_bytes];
        // SAFETY: inside y's capacity; no other task writes this rectangle.
        let out = Out { at: unsafe { base.get().add(rows.start * n + cols.start) }, ld: n };
        vidllm_core::with_block!(ty, B => task::<B>(isa, wband, cols.len(), acts, rows.clone(), out),
            else unreachable!("float types take the f32 path"));
    });
    // SAFETY: the tasks wrote all m * n values.
    unsafe { y.set_len(m * n) };
    y
}

/// Where a task writes its rectangle of `y`: value `(i, j)` of the rectangle at
/// `at + i * ld + j`.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) at: *mut f32,
    pub(crate) ld: usize,
}

/// A band of weight rows widened for the micro-kernel.
///
/// # Shapes
/// - `codes`: `[rows, k]` i16
/// - `scale`: `[rows, slots]`, the map's scale per slot (a chunk of 32 where both halves
///   share it, else a half of 16)
/// - `offset`: `[rows, k / 16]`, the map's offset per 16
/// - `tile_scale`: `[rows / RW, slots, PAIRS]`, each tile's scales spread over the pairs
///   (`scale` of row `r` at pair `r * RA + i`), the layout the kernels read
#[derive(Default)]
struct Band {
    codes: Vec<i16>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    tile_scale: Vec<f32>,
}

/// What one task reuses across its tiles.
#[derive(Default)]
struct Scratch {
    band: Band,
    /// The activation tile's `d` per slot, spread over the pairs: `[slots, PAIRS]`.
    act_scale: Vec<f32>,
    /// The tile's `d_x a_w` per slot and pair, `[slots, PAIRS]`.
    scales: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// One register tile's operands, as the micro-kernels read them.
struct Tile {
    /// `RW` rows of `k` widened codes.
    w: [*const i16; RW],
    /// `RA` rows of `k` activations.
    x: [*const i16; RA],
    k: usize,
    /// `[slots, PAIRS]`, pair `r * RA + i`.
    scales: *const f32,
    /// `RW` rows of `k / 16` offsets, `RA` rows of `k / 16` activation sums (`d sum q`).
    offset: [*const f32; RW],
    dsums: [*const f32; RA],
}

/// One task: activation rows `rows` against the `nw` weight rows of `wband`, into its
/// rectangle `out`. (Only x86-64 has instruction sets here; elsewhere nothing calls it.)
#[cfg_attr(not(target_arch = "x86_64"), allow(clippy::extra_unused_type_parameters))]
fn task<B: IntCodes>(isa: Isa, wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
    // SAFETY: the kernels' features were detected (`isas`).
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => crate::cpu_gemm_vnni::task::<B>(wband, nw, acts, rows, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::task::<B>(wband, nw, acts, rows, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::task::<B>(wband, nw, acts, rows, out),
        }
    }
}

/// The task's loops, inlined into each instruction set's `task` (so that the scale
/// products vectorise with it); `kernel` gives the `PAIRS` sums of a tile, offsets
/// included.
#[inline(always)]
fn task_body<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out, kernel: impl Fn(&Tile) -> [f32; PAIRS]) {
    let k = acts.k;
    let (nch, ng) = (k / QB, k / G);
    let slots = if B::SHARED32 { nch } else { ng };
    // Taken out and put back rather than borrowed in a closure: a closure would be compiled
    // without the caller's target features, and this is where they matter.
    let mut scratch = SCRATCH.take();
    {
        let Scratch { band, act_scale, scales } = &mut scratch;
        widen_band::<B>(wband, nw, k, band);
        scales.resize(slots * PAIRS, 0.0);
        act_scale.resize(slots * PAIRS, 0.0);
        // A slot is a chunk of 32 or a half of one; the activations' d is per chunk.
        let chunk_of = |slot: usize| if B::SHARED32 { slot } else { slot / 2 };
        for i0 in rows.clone().step_by(RA) {
            // Rows past the end repeat the last one; their results are dropped.
            let xi: [usize; RA] = std::array::from_fn(|i| (i0 + i).min(rows.end - 1));
            for (slot, dst) in act_scale.chunks_exact_mut(PAIRS).enumerate() {
                for (pair, v) in dst.iter_mut().enumerate() {
                    *v = acts.d[xi[pair % RA] * nch + chunk_of(slot)];
                }
            }
            for j0 in (0..nw).step_by(RW) {
                let wj: [usize; RW] = std::array::from_fn(|r| (j0 + r).min(nw - 1));
                let tile_scale = &band.tile_scale[j0 / RW * slots * PAIRS..][..slots * PAIRS];
                scales.iter_mut().zip(tile_scale.iter().zip(act_scale.iter())).for_each(|(s, (a, d))| *s = a * d);
                let tile = Tile {
                    w: wj.map(|j| band.codes[j * k..].as_ptr()),
                    x: xi.map(|x| acts.qs[x * k..].as_ptr()),
                    k,
                    scales: scales.as_ptr(),
                    // Empty, and never read, for the types without offsets.
                    offset: wj.map(|j| band.offset.as_ptr().wrapping_add(j * ng)),
                    dsums: xi.map(|x| acts.dsums[x * ng..].as_ptr()),
                };
                let sums = kernel(&tile);
                for r in 0..RW.min(nw - j0) {
                    for i in 0..RA.min(rows.end - i0) {
                        // SAFETY: inside the task's rectangle (`matmul_on`).
                        unsafe { *out.at.add((i0 + i - rows.start) * out.ld + j0 + r) = sums[r * RA + i] };
                    }
                }
            }
        }
    }
    SCRATCH.set(scratch);
}

/// The band's blocks decoded to codes (widened to i16) and affine maps.
#[inline(always)]
fn widen_band<B: IntCodes>(wband: &[u8], nw: usize, k: usize, band: &mut Band) {
    use vidllm_core::ggml::QK_K;
    let (gpb, spb) = (B::ELEMS / G, if B::SHARED32 { B::ELEMS / QB } else { B::ELEMS / G });
    band.codes.resize(nw * k, 0);
    band.scale.resize(nw * k / B::ELEMS * spb, 0.0);
    band.offset.resize(if B::OFFSET { nw * k / G } else { 0 }, 0.0);
    let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
    for (bi, blk) in blocks::<B>(wband).iter().enumerate() {
        blk.codes(&mut c, &mut a, &mut b);
        let dst = &mut band.codes[bi * B::ELEMS..(bi + 1) * B::ELEMS];
        if B::SIGNED {
            dst.iter_mut().zip(&c).for_each(|(d, &c)| *d = c as i8 as i16);
        } else {
            dst.iter_mut().zip(&c).for_each(|(d, &c)| *d = c as i16);
        }
        let scale = &mut band.scale[bi * spb..(bi + 1) * spb];
        if B::SHARED32 {
            scale.iter_mut().enumerate().for_each(|(s, v)| *v = a[2 * s]);
        } else {
            scale.copy_from_slice(&a[..gpb]);
        }
        if B::OFFSET {
            band.offset[bi * gpb..(bi + 1) * gpb].copy_from_slice(&b[..gpb]);
        }
    }
    let slots = band.scale.len() / nw;
    band.tile_scale.resize(nw.div_ceil(RW) * slots * PAIRS, 0.0);
    for (t, tile) in band.tile_scale.chunks_exact_mut(slots * PAIRS).enumerate() {
        for (slot, dst) in tile.chunks_exact_mut(PAIRS).enumerate() {
            for (pair, v) in dst.iter_mut().enumerate() {
                // Rows past the band repeat the last one, as in `task_body`.
                *v = band.scale[(t * RW + pair / RA).min(nw - 1) * slots + slot];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn task<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
        // SAFETY: the tile's pointers cover its rows (`task_body`); features as ours.
        task_body::<B>(wband, nw, acts, rows, out, |t| unsafe { kernel::<B>(t) })
    }

    /// `RW x RA` dot products over `k` (a multiple of 32), one 512-bit register per chunk
    /// of 32 i16. `B::SHARED32`: one scale per chunk and pair; otherwise one per half, the
    /// halves being lanes 0-7 and 8-15 of `vpmaddwd`'s result. The offsets' products go
    /// into the same accumulators (every lane is summed in the end).
    ///
    /// # Safety
    /// AVX-512 F and BW; the tile's pointers cover their rows.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn kernel<B: IntCodes>(t: &Tile) -> [f32; PAIRS] {
        let (nch, ng) = (t.k / 32, t.k / 16);
        let mut acc = [_mm512_setzero_ps(); PAIRS];
        for ch in 0..nch {
            // SAFETY: chunk `ch` lies inside every row; the scales cover every slot.
            unsafe {
                let xs: [__m512i; RA] = std::array::from_fn(|i| _mm512_loadu_si512(t.x[i].add(32 * ch) as *const __m512i));
                for r in 0..RW {
                    let wv = _mm512_loadu_si512(t.w[r].add(32 * ch) as *const __m512i);
                    for i in 0..RA {
                        let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(wv, xs[i]));
                        let sp = t.scales.add(r * RA + i);
                        let a = &mut acc[r * RA + i];
                        if B::SHARED32 {
                            *a = _mm512_fmadd_ps(p, _mm512_set1_ps(*sp.add(ch * PAIRS)), *a);
                        } else {
                            // Each half its scale: one vector of the two (lanes 0-7 the
                            // first, 8-15 the second: a broadcast with the upper half
                            // replaced by the other's), then one FMA. On a Zen 4, which
                            // runs a 512-bit FMA as two 256-bit halves, two masked FMAs
                            // took 1.5x as long (Q6_K 20.5 -> 30.5 multiply-adds a ns in
                            // `prefill_product_speed`, one thread; the AVX2 kernel 31.3).
                            let s0 = _mm512_castps_pd(_mm512_set1_ps(*sp.add(2 * ch * PAIRS)));
                            let s1 = _mm256_castps_pd(_mm256_set1_ps(*sp.add((2 * ch + 1) * PAIRS)));
                            *a = _mm512_fmadd_ps(p, _mm512_castpd_ps(_mm512_insertf64x4::<1>(s0, s1)), *a);
                        }
                    }
                }
            }
        }
        if B::OFFSET {
            for g in (0..ng).step_by(16) {
                let mask: __mmask16 = if ng - g >= 16 { !0 } else { (1 << (ng - g)) - 1 };
                // SAFETY: the mask keeps the loads inside the rows of ng values.
                unsafe {
                    let ds: [__m512; RA] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, t.dsums[i].add(g)));
                    for r in 0..RW {
                        let b = _mm512_maskz_loadu_ps(mask, t.offset[r].add(g));
                        for i in 0..RA {
                            acc[r * RA + i] = _mm512_fmadd_ps(b, ds[i], acc[r * RA + i]);
                        }
                    }
                }
            }
        }
        let mut sums = [0f32; PAIRS];
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(acc)) };
        sums
    }

    /// Lane `p` of the result is the sum of the 16 lanes of `v[p]`: a transposing tree of
    /// unpacks and 128-bit shuffles (45 instructions where 16 separate reductions take 128).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) fn reduce16(v: [__m512; 16]) -> __m512 {
        // Pairs: within each 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
        let a: [__m512; 8] =
            std::array::from_fn(|p| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1])));
        // Quads: within each 128-bit block, one partial sum of each of four vectors.
        let b: [__m512; 4] = std::array::from_fn(|q| {
            let (x, y) = (_mm512_castps_pd(a[2 * q]), _mm512_castps_pd(a[2 * q + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
        });
        // The four 128-bit blocks of each summed: blocks (0, 1) and (2, 3) first.
        let c01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(b[0], b[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(b[0], b[1]));
        let c23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(b[2], b[3]), _mm512_shuffle_f32x4::<0b11_01_11_01>(b[2], b[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(c01, c23), _mm512_shuffle_f32x4::<0b11_01_11_01>(c01, c23))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::cpu_int::avx2::hsum;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
        // SAFETY: the tile's pointers cover its rows (`task_body`); features as ours.
        task_body::<B>(wband, nw, acts, rows, out, |t| unsafe { kernel::<B>(t) })
    }

    /// As the AVX-512 kernel, in 256-bit registers: a chunk is two (elements 0-15 and
    /// 16-31, whose `vpmaddwd` sums are the two halves). Sixteen registers hold two weight
    /// rows' accumulators at a time, so the tile is taken in two passes.
    ///
    /// # Safety
    /// AVX2 and FMA; the tile's pointers cover their rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel<B: IntCodes>(t: &Tile) -> [f32; PAIRS] {
        let (nch, ng) = (t.k / 32, t.k / 16);
        let mut sums = [0f32; PAIRS];
        for r0 in (0..RW).step_by(2) {
            let mut acc = [[_mm256_setzero_ps(); RA]; 2];
            for ch in 0..nch {
                // SAFETY: chunk `ch` lies inside every row; the scales cover every slot.
                unsafe {
                    for (rr, acc) in acc.iter_mut().enumerate() {
                        let r = r0 + rr;
                        let wl = _mm256_loadu_si256(t.w[r].add(32 * ch) as *const __m256i);
                        let wh = _mm256_loadu_si256(t.w[r].add(32 * ch + 16) as *const __m256i);
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let pl = _mm256_madd_epi16(wl, _mm256_loadu_si256(t.x[i].add(32 * ch) as *const __m256i));
                            let ph = _mm256_madd_epi16(wh, _mm256_loadu_si256(t.x[i].add(32 * ch + 16) as *const __m256i));
                            let sp = t.scales.add(r * RA + i);
                            if B::SHARED32 {
                                // One scale: the halves summed in i32 (at most 2^25).
                                *acc = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(_mm256_add_epi32(pl, ph)),
                                    _mm256_set1_ps(*sp.add(ch * PAIRS)),
                                    *acc,
                                );
                            } else {
                                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl), _mm256_set1_ps(*sp.add(2 * ch * PAIRS)), *acc);
                                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ph), _mm256_set1_ps(*sp.add((2 * ch + 1) * PAIRS)), *acc);
                            }
                        }
                    }
                }
            }
            if B::OFFSET {
                for g in (0..ng).step_by(8) {
                    let n = (ng - g).min(8) as i32;
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    // SAFETY: the mask keeps the loads inside the rows of ng values.
                    unsafe {
                        for (rr, acc) in acc.iter_mut().enumerate() {
                            let b = _mm256_maskload_ps(t.offset[r0 + rr].add(g), mask);
                            for (i, acc) in acc.iter_mut().enumerate() {
                                *acc = _mm256_fmadd_ps(b, _mm256_maskload_ps(t.dsums[i].add(g), mask), *acc);
                            }
                        }
                    }
                }
            }
            for (rr, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate() {
                    sums[(r0 + rr) * RA + i] = hsum(*a);
                }
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_int::takes_integer_path;

    /// Every kernel the processor runs, every block type, shapes with ragged tiles and
    /// several tasks: each value equals the f64 product of the dequantised weights with
    /// the quantised activations, to f32 rounding.
    #[test]
    fn batched_product_matches_f64() {
        for (isa, ty) in isas().flat_map(|isa| GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)).map(move |t| (isa, t))) {
            let (m, n, k) = (133, 38, 2 * vidllm_core::ggml::QK_K);
            let w = crate::check::weight(ty, n, k, 3);
            let x = crate::check::values(m * k, 4);
            let acts = IntActs::quantize(&x, k);
            let (xq, wf) = (acts.dequantize(), vidllm_core::ggml::dequantize(ty, &w, n * k));
            let y = matmul_on(isa, ty, &w, n, &acts);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|t| xq[i * k + t] as f64 * wf[j * k + t] as f64).sum();
                    let got = y[i * n + j];
                    let mag = want.abs().max(1.0) as f32;
                    assert!(
                        crate::check::within_rounding((got - want as f32).abs(), mag, k),
                        "{isa:?} {ty:?} y[{i}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Integer multiply-adds per nanosecond of a prefill-sized product, per kernel; run by
    /// hand: `RAYON_NUM_THREADS=1 cargo test --release --workspace --lib cpu_gemm::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn prefill_product_speed() {
        // `M=16` and the like time short prompts' products; `TYPE=q5_0` one type; `REPS=200`
        // for a profile.
        let m = std::env::var("M").ok().and_then(|m| m.parse().ok()).unwrap_or(512);
        let (n, k) = (1536, 576);
        let only = std::env::var("TYPE").ok();
        let reps = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
            if only.as_deref().is_some_and(|t| t != ty.name()) {
                continue;
            }
            let kk = if ty.block_elems() == 32 { k } else { 1536 };
            let w = crate::check::weight(ty, n, kk, 3);
            let acts = IntActs::quantize(&crate::check::values(m * kk, 4), kk);
            for isa in isas() {
                let best = (0..reps)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(matmul_on(isa, ty, &w, n, &acts));
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                eprintln!("{:>5} {isa:?}: {:.1} MAC/ns", ty.name(), (m * n * kk) as f64 / best / 1e9);
            }
        }
    }
}
