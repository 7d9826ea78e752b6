//! The register tiles of the batched integer product (`cpu_gemm`): the weight rows in the
//! vector lanes, the activations broadcast.
//!
//! A register holds one pair of elements of 16 weight rows (a *panel*, one 512-bit
//! register or two 256-bit ones), and the activation row's pair (two i16 as one i32) is
//! broadcast. A pairwise multiply-add then gives 16 i32 lanes that are already 16 outputs:
//! no horizontal sums. The lanes stay integer across a slot (a chunk of 32, or a half of
//! 16 for the types with a map per 16), then take one conversion, one multiplication by
//! the panel's weight scales and one FMA by the activation row's `d`:
//!
//! - AVX-512 VNNI (Zen 4, Ice Lake and later): `vpdpwssd`, 32 multiply-adds an
//!   instruction; tiles of two panels x six activation rows.
//! - AVX2: `vpmaddwd` and `vpaddd`; tiles of one panel (two registers) x three rows.
//!
//! The first tiles (until 2026-12-05) held 32 elements of one weight row per register: a
//! `vpmaddwd`, a conversion and an FMA per 32 values and pair, two of them multiplies on
//! the two multiply pipes. On a 2-core Zen 4 (`cpu_gemm::speed::prefill_product_speed`,
//! one thread, 256 x 1536 x 576), in multiply-adds a nanosecond, AVX-512 VNNI lanes
//! against the old AVX-512 tiles: Q4_1 85.3 / 42.4, Q5_0 84.1 / 41.8, Q8_0 94.1 / 46.2,
//! Q4_K 86.5 / 42.7, Q6_K 60.5 / 29.6 (slots of 16); AVX2 lanes against the old AVX2
//! tiles (Zen 4 runs 256-bit instructions at full width, as Zen 3 does): Q4_1 60.1-60.7
//! / 29.5, Q5_0 58.3-59.4 / 29.4, Q8_0 65.9-68.1 / 44.4, Q4_K 61.0-61.2 / 29.9, Q6_K
//! 38.6-39.5 / 28.3 (the old tiles' figures from an earlier run). At 8 rows, where the
//! widening dominates, the AVX-512 lanes were level with the old AVX-512 tiles or ahead
//! (25-35 against 21-31).
//!
//! The arithmetic is the integer path's (`cpu_int.rs`), so the sums are the same integers:
//! within a slot they fit i32 (at most 32 products of a code below 256 and an activation
//! below 2^15, under 2^28), and each slot is scaled in f32.
//!
//! With 8-bit activations (`ActBits::Int8`) the AVX-512 tile takes *byte panels*: four
//! codes of a row to a word, unsigned (signed codes plus 128), against four activation
//! bytes broadcast, by `vpdpbusd`; a slot's sum then loses `128 sum q` for the signed
//! types. The integer sums are the i16 panels' (`cpu_gemm::tests::byte_panels_equal_word_panels`);
//! the types whose two halves of 32 share one offset add it once per 32 (a fifth of
//! Q4_1's instructions were the offsets). One thread, 512 x 1536 x 576 (K types x 1536),
//! multiply-adds a ns, 8-bit against 16-bit: Q4_1 144 / 87, Q5_0 141 / 86, Q8_0 156 / 97,
//! Q4_K 138 / 87, Q6_K 112 / 63. AVX2 reads the same codes from the i16 panels.
//!
//! A band is widened once per task (`cpu_gemm` makes tasks as tall as the product): the
//! 16 rows of a panel are decoded side by side and their pairs transposed 16 x 16 in
//! registers. Scattering each pair to its lane, with 128-row tasks, took a fifth of a
//! prefill.
//!
//! # Shapes
//! - a band of `nw` weight rows is widened to `ceil(nw / 32)` pairs of panels; a panel is
//!   `[k / 2, 16]` i32 (two i16 codes each, elements `2t`, `2t + 1` of lane `l`'s row), or
//!   with bytes `[ceil(k / 64) * 16, 16]` i32 (four codes each, zero past `k`)
//! - scales: `[panels, slots, 16]`; offsets: `[panels, k / 16, 16]`

use std::ops::Range;

use crate::cpu_gemm::Out;
use crate::cpu_int::{G, IntActs, IntCodes, QB};
use vidllm_core::ggml::{QK_K, blocks};

/// Weight rows per panel.
pub(crate) const LANES: usize = 16;
/// Weight rows a band is a multiple of: two panels, the AVX-512 tile's width.
pub(crate) const TILE_ROWS: usize = 2 * LANES;

/// Elements per slot of `B`: the span its lanes stay integer across, a chunk of 32 where
/// both halves share a map, else a half of 16.
const fn slot_len<B: IntCodes>() -> usize {
    if B::SHARED32 { QB } else { G }
}

/// A register-tile kernel.
#[derive(Clone, Copy, Debug)]
pub enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// Whether this processor runs it.
    fn runs(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Kernel::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Kernel::Avx2 => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {}
    }
}

/// Every kernel this processor runs, best first.
pub(crate) fn kernels() -> impl Iterator<Item = Kernel> {
    #[cfg(target_arch = "x86_64")]
    let all = [Kernel::Avx512Vnni, Kernel::Avx2];
    #[cfg(not(target_arch = "x86_64"))]
    let all: [Kernel; 0] = [];
    all.into_iter().filter(|k| k.runs())
}

/// A band of weight rows in panels (see the module's `# Shapes`).
#[derive(Default)]
struct Panels {
    codes: Vec<i32>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

thread_local! {
    static PANELS: std::cell::RefCell<Panels> = std::cell::RefCell::new(Panels::default());
}

/// One task of `cpu_gemm::matmul`: activation rows `rows` against the `nw` weight rows of
/// `wband`, into its rectangle `out`.
///
/// # Safety
/// `kernel` [`runs`](Kernel::runs) here; `out` covers `rows.len() x nw` values.
#[cfg_attr(not(target_arch = "x86_64"), allow(clippy::extra_unused_type_parameters))]
pub(crate) unsafe fn task<B: IntCodes>(kernel: Kernel, wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
    // SAFETY: the caller's.
    unsafe {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::task::<B>(wband, nw, acts, rows, out),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::task::<B>(wband, nw, acts, rows, out),
        }
    }
}

/// Where a tile writes: `rows x cols` values of `y` from `at`, rows `ld` apart.
#[derive(Clone, Copy)]
struct Dest {
    at: *mut f32,
    ld: usize,
    rows: usize,
    cols: usize,
}

/// One register tile's operands: `NP` panels against `RA` activation rows.
struct Tile<const RA: usize> {
    /// The tile's first panel; the next one follows it (`kw * 16` words on).
    w: *const i32,
    k: usize,
    /// Words of a panel's row: `k` codes, padded to whole transposes.
    kw: usize,
    /// `RA` rows of `k` activation codes in the panels' width (i16, or bytes at 8 bits),
    /// read four bytes (a pair or a quad) at a time; their `d` per chunk of 32 and `d sum
    /// q` per 16.
    x: [*const u8; RA],
    /// With byte panels, the codes' integer sums per 16 (else dangling).
    xsums: [*const i32; RA],
    xd: [*const f32; RA],
    dsums: [*const f32; RA],
    /// The first panel's scales per slot, and offsets per 16 (dangling for the types
    /// without); the next panel's follow them.
    scale: *const f32,
    offset: *const f32,
}

/// The task's loops, inlined into each instruction set's `task`: widen the band, then
/// sweep it with tiles of `NP` panels x `RA` activation rows.
#[inline(always)]
fn task_body<B: IntCodes, C: PanelCode, const RA: usize, const NP: usize>(
    wband: &[u8],
    nw: usize,
    acts: &IntActs,
    rows: Range<usize>,
    out: Out,
    transpose: impl Fn([*const i32; LANES], *mut i32),
    tile: impl Fn(&Tile<RA>, Dest),
) {
    let k = acts.k;
    let (nch, ng, slots) = (k / QB, k / G, k / slot_len::<B>());
    let mut panels = PANELS.take();
    let kw = widen::<B, C>(wband, nw, k, &mut panels, transpose);
    let bytes = acts.bytes.as_ref().filter(|_| C::PER_WORD == 4);
    assert!(C::PER_WORD == 2 || bytes.is_some(), "cpu_gemm_lanes: byte panels need 8-bit activations");
    for i0 in rows.clone().step_by(RA) {
        // Rows past the end repeat the last one; their results are dropped.
        let xi: [usize; RA] = std::array::from_fn(|i| (i0 + i).min(rows.end - 1));
        for (t, j0) in (0..nw).step_by(NP * LANES).enumerate() {
            let p0 = t * NP;
            let operands = Tile {
                w: panels.codes[p0 * kw * LANES..].as_ptr(),
                k,
                kw,
                x: xi.map(|x| bytes.map_or(acts.qs[x * k..].as_ptr() as *const u8, |b| b.qs[x * k..].as_ptr() as *const u8)),
                xsums: xi.map(|x| bytes.map_or(std::ptr::null(), |b| b.sums[x * ng..].as_ptr())),
                xd: xi.map(|x| acts.d[x * nch..].as_ptr()),
                dsums: xi.map(|x| acts.dsums[x * ng..].as_ptr()),
                scale: panels.scale[p0 * slots * LANES..].as_ptr(),
                offset: panels.offset.as_ptr().wrapping_add(p0 * ng * LANES),
            };
            // SAFETY: inside the task's rectangle.
            let at = unsafe { out.at.add((i0 - rows.start) * out.ld + j0) };
            tile(&operands, Dest { at, ld: out.ld, rows: RA.min(rows.end - i0), cols: (nw - j0).min(NP * LANES) });
        }
    }
    PANELS.set(panels);
}

/// A code as a panel holds it: `i16` (two to a word, for `vpdpwssd` / `vpmaddwd`) or
/// `u8` (four to a word, for `vpdpbusd`, whose code operand is unsigned: signed codes are
/// stored plus 128, and the kernel takes `128 sum q` off each slot's sum).
pub(crate) trait PanelCode: Copy + Default {
    const PER_WORD: usize;
    fn from_code(c: u8, signed: bool) -> Self;
}

impl PanelCode for i16 {
    const PER_WORD: usize = 2;
    #[inline(always)]
    fn from_code(c: u8, signed: bool) -> Self {
        if signed { c as i8 as i16 } else { c as i16 }
    }
}

impl PanelCode for u8 {
    const PER_WORD: usize = 4;
    #[inline(always)]
    fn from_code(c: u8, signed: bool) -> Self {
        if signed { c ^ 0x80 } else { c }
    }
}

/// The band's blocks decoded into panels; rows past `nw` (up to a whole tile) are zero.
/// Returns the words of a panel's row (`kw`): `k` codes padded to whole transposes of
/// 16 words (the padding is zero).
///
/// Per panel and run of blocks, the 16 rows' blocks are decoded side by side (codes
/// contiguous), then turned into the panel's layout by 16 x 16 transposes of their words
/// (`transpose`). A run is a block, or two 32-element blocks where a transpose takes 64
/// byte codes.
#[inline(always)]
fn widen<B: IntCodes, C: PanelCode>(
    wband: &[u8],
    nw: usize,
    k: usize,
    panels: &mut Panels,
    transpose: impl Fn([*const i32; LANES], *mut i32),
) -> usize {
    let npanels = nw.div_ceil(TILE_ROWS) * TILE_ROWS / LANES;
    let (gpb, spb) = (B::ELEMS / G, B::ELEMS / slot_len::<B>());
    let (slots, ng, row_blocks) = (k / slot_len::<B>(), k / G, k / B::ELEMS);
    // Codes a transpose takes from each row, and a run of them.
    let chunk = LANES * C::PER_WORD;
    let run = B::ELEMS.max(chunk);
    let kw = k.next_multiple_of(chunk) / C::PER_WORD;
    // Every word of the codes is written below; the small maps are zeroed for the rows
    // past the end.
    panels.codes.resize(npanels * kw * LANES, 0);
    panels.scale.clear();
    panels.scale.resize(npanels * slots * LANES, 0.0);
    panels.offset.clear();
    panels.offset.resize(if B::OFFSET { npanels * ng * LANES } else { 0 }, 0.0);
    let blks = blocks::<B>(wband);
    let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
    // The 16 rows' codes of one run, `[16, run]`: read as i32, each word is a pair or a
    // quad (the first element in the low bits). Packing the pairs as words here made
    // Q5_0's decode half as fast as Q4_1's.
    let mut rows = [[C::default(); QK_K]; LANES];
    for p in 0..npanels {
        let live = nw.saturating_sub(p * LANES).min(LANES);
        for col in 0..row_blocks {
            let at = col * B::ELEMS % run;
            for (l, row) in rows.iter_mut().enumerate() {
                let row = &mut row[at..at + B::ELEMS];
                if l >= live {
                    row.fill(C::default());
                    continue;
                }
                blks[(p * LANES + l) * row_blocks + col].codes(&mut c, &mut a, &mut b);
                row.iter_mut().zip(&c).for_each(|(v, &c)| *v = C::from_code(c, B::SIGNED));
                for s in 0..spb {
                    panels.scale[(p * slots + col * spb + s) * LANES + l] = if B::SHARED32 { a[2 * s] } else { a[s] };
                }
                if B::OFFSET {
                    for (g, &b) in b[..gpb].iter().enumerate() {
                        panels.offset[(p * ng + col * gpb + g) * LANES + l] = b;
                    }
                }
            }
            let filled = at + B::ELEMS;
            if filled < run && col + 1 < row_blocks {
                continue;
            }
            // The run is complete (or the row ends inside it): pad to whole transposes.
            let used = filled.next_multiple_of(chunk);
            rows.iter_mut().for_each(|r| r[filled..used].fill(C::default()));
            let first = (col * B::ELEMS - at) / C::PER_WORD;
            let dst = &mut panels.codes[(p * kw + first) * LANES..][..used / C::PER_WORD * LANES];
            for (t0, dst) in (0..used).step_by(chunk).zip(dst.chunks_exact_mut(LANES * LANES)) {
                // 16 rows of 16 words from code `t0`, and 256 words of `dst`.
                transpose(std::array::from_fn(|l| rows[l][t0..].as_ptr() as *const i32), dst.as_mut_ptr());
            }
        }
    }
    kw
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// Panels per tile.
    const NP: usize = 2;
    /// Activation rows per tile: `NP x RA` i32 and as many f32 accumulators, two panel
    /// registers and a broadcast fit the 32 vector registers.
    const RA: usize = 6;

    /// # Safety
    /// AVX-512 F, BW and VNNI; `out` covers `rows.len() x nw` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn task<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
        // SAFETY: `widen`'s rows and destination; features as ours.
        let transpose = |rows, dst| unsafe { transpose16(rows, dst) };
        if acts.bytes.is_some() {
            // SAFETY: the tile's pointers cover its panels and rows; features as ours.
            task_body::<B, u8, RA, NP>(wband, nw, acts, rows, out, transpose, |t, d| unsafe { tile::<B, true>(t, d) })
        } else {
            // SAFETY: as above.
            task_body::<B, i16, RA, NP>(wband, nw, acts, rows, out, transpose, |t, d| unsafe { tile::<B, false>(t, d) })
        }
    }

    /// Write the 16 x 16 words whose rows start at `rows` to `dst` transposed: word `l` of
    /// row `t` of `dst` is word `t` of row `l`.
    ///
    /// Pairs of rows interleaved by words, then by double words (each 128-bit block then
    /// holds four rows' words at one index), then the blocks gathered across registers.
    ///
    /// # Safety
    /// AVX-512 F; each row has 16 words, `dst` 256.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(rows: [*const i32; LANES], dst: *mut i32) {
        // SAFETY: the caller's.
        let r: [__m512i; 16] = std::array::from_fn(|l| unsafe { _mm512_loadu_si512(rows[l] as *const __m512i) });
        // Words: block j of a[2q] holds rows 2q, 2q+1 at indices 4j, 4j+1; of a[2q+1] at
        // 4j+2, 4j+3.
        let a: [__m512i; 16] = std::array::from_fn(|i| {
            let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 { _mm512_unpacklo_epi32(x, y) } else { _mm512_unpackhi_epi32(x, y) }
        });
        // Double words: block j of b[4q + e] holds rows 4q..4q+3 at index 4j + e.
        let b: [__m512i; 16] = std::array::from_fn(|i| {
            let (q, e) = (i / 4, i % 4);
            let (x, y) = (a[4 * q + e / 2], a[4 * q + 2 + e / 2]);
            if e % 2 == 0 { _mm512_unpacklo_epi64(x, y) } else { _mm512_unpackhi_epi64(x, y) }
        });
        // Index t = 4j + e: blocks j of b[e], b[4 + e], b[8 + e], b[12 + e], in order.
        for e in 0..4 {
            let lo = [_mm512_shuffle_i32x4::<0b10_00_10_00>(b[e], b[4 + e]), _mm512_shuffle_i32x4::<0b10_00_10_00>(b[8 + e], b[12 + e])];
            let hi = [_mm512_shuffle_i32x4::<0b11_01_11_01>(b[e], b[4 + e]), _mm512_shuffle_i32x4::<0b11_01_11_01>(b[8 + e], b[12 + e])];
            // lo: blocks (j=0, j=2) of rows 0-7, then of rows 8-15; hi: j = 1, 3.
            let out = [
                (0, _mm512_shuffle_i32x4::<0b10_00_10_00>(lo[0], lo[1])),
                (2, _mm512_shuffle_i32x4::<0b11_01_11_01>(lo[0], lo[1])),
                (1, _mm512_shuffle_i32x4::<0b10_00_10_00>(hi[0], hi[1])),
                (3, _mm512_shuffle_i32x4::<0b11_01_11_01>(hi[0], hi[1])),
            ];
            for (j, v) in out {
                // SAFETY: row 4j + e of `dst`.
                unsafe { _mm512_storeu_si512(dst.add((4 * j + e) * LANES) as *mut __m512i, v) };
            }
        }
    }

    /// Panel `p`'s rows against activation row `i`, 16 values of `y` per accumulator,
    /// offsets included, stored at `d`.
    ///
    /// With i16 panels, per pair of elements: two panel loads, `RA` broadcasts of the
    /// activations' pair, and `NP x RA` `vpdpwssd`. With byte panels (`BYTES`, 8-bit
    /// activations) the same per quad with `vpdpbusd`: twice the multiply-adds an
    /// instruction, and the same integer sums.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI; the tile's pointers cover its panels and rows (at `BYTES`,
    /// byte panels and the rows' bytes); `d` its values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<B: IntCodes, const BYTES: bool>(t: &Tile<RA>, d: Dest) {
        let k = t.k;
        let (slot_len, ng) = (slot_len::<B>(), k / G);
        let slots = k / slot_len;
        let mut acc = [[_mm512_setzero_ps(); RA]; NP];
        for s in 0..slots {
            let mut sums = [[_mm512_setzero_si512(); RA]; NP];
            // Codes a word holds: a pair of i16, or a quad of bytes.
            let per_word = if BYTES { 4 } else { 2 };
            for word in s * slot_len / per_word..(s + 1) * slot_len / per_word {
                // SAFETY: word `word` lies inside every panel and row.
                unsafe {
                    let w: [__m512i; NP] =
                        std::array::from_fn(|p| _mm512_loadu_si512(t.w.add((p * t.kw + word) * LANES) as *const __m512i));
                    for (i, &xi) in t.x.iter().enumerate() {
                        let x = _mm512_set1_epi32((xi.add(4 * word) as *const i32).read_unaligned());
                        for (sums, &w) in sums.iter_mut().zip(&w) {
                            sums[i] = if BYTES { _mm512_dpbusd_epi32(sums[i], w, x) } else { _mm512_dpwssd_epi32(sums[i], w, x) };
                        }
                    }
                }
            }
            if BYTES && B::SIGNED {
                // The codes were stored plus 128: sum (c + 128) q - 128 sum q.
                for (i, &xs) in t.xsums.iter().enumerate() {
                    let g = s * slot_len / G;
                    // SAFETY: the slot's groups of the row.
                    let q = unsafe { if slot_len == QB { *xs.add(g) + *xs.add(g + 1) } else { *xs.add(g) } };
                    let off = _mm512_set1_epi32(128 * q);
                    for sums in sums.iter_mut() {
                        sums[i] = _mm512_sub_epi32(sums[i], off);
                    }
                }
            }
            // SAFETY: slot `s` of every panel; chunk `s` (or its half's) of every row.
            unsafe {
                let chunk = s * slot_len / QB;
                for (p, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                    let ws = _mm512_loadu_ps(t.scale.add((p * slots + s) * LANES));
                    for ((a, &sum), &xd) in acc.iter_mut().zip(sums).zip(&t.xd) {
                        *a = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), ws), _mm512_set1_ps(*xd.add(chunk)), *a);
                    }
                }
            }
        }
        if B::OFFSET && BYTES && B::SHARED32 {
            // Both halves of a 32 share their offset: one FMA per 32 with the two halves'
            // `d sum q` added (at 8 bits the offsets were a fifth of Q4_1's instructions).
            for c in 0..k / QB {
                // SAFETY: groups `2c` and `2c + 1` of every panel and row.
                unsafe {
                    let ds: [__m512; RA] = std::array::from_fn(|i| _mm512_set1_ps(*t.dsums[i].add(2 * c) + *t.dsums[i].add(2 * c + 1)));
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let b = _mm512_loadu_ps(t.offset.add((p * ng + 2 * c) * LANES));
                        for (a, &ds) in acc.iter_mut().zip(&ds) {
                            *a = _mm512_fmadd_ps(b, ds, *a);
                        }
                    }
                }
            }
        } else if B::OFFSET {
            for g in 0..ng {
                // SAFETY: group `g` of every panel and row.
                unsafe {
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let b = _mm512_loadu_ps(t.offset.add((p * ng + g) * LANES));
                        for (a, &ds) in acc.iter_mut().zip(&t.dsums) {
                            *a = _mm512_fmadd_ps(b, _mm512_set1_ps(*ds.add(g)), *a);
                        }
                    }
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            let j = p * LANES;
            if j >= d.cols {
                break;
            }
            let mask: __mmask16 = if d.cols - j >= LANES { !0 } else { (1 << (d.cols - j)) - 1 };
            for (i, v) in acc.iter().enumerate().take(d.rows) {
                // SAFETY: inside `d`; the mask keeps to its width.
                unsafe { _mm512_mask_storeu_ps(d.at.add(i * d.ld + j), mask, *v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// Activation rows per tile (of one panel, two registers): six i32 and six f32
    /// accumulators, two panel registers and a broadcast fit the 16 vector registers.
    const RA: usize = 3;
    /// Lanes of a register.
    const H: usize = LANES / 2;

    /// # Safety
    /// AVX2 and FMA; `out` covers `rows.len() x nw` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
        // 8-bit activations are also in `qs`: the same integer sums through i16 panels.
        task_body::<B, i16, RA, 1>(
            wband,
            nw,
            acts,
            rows,
            out,
            // SAFETY: `widen`'s rows and destination; features as ours.
            |rows, dst| unsafe { transpose16(rows, dst) },
            // SAFETY: the tile's pointers cover its panel and rows; features as ours.
            |t, d| unsafe { tile::<B>(t, d) },
        )
    }

    /// As the AVX-512 `transpose16`, in four 8 x 8 blocks: block (a, b) of the rows is
    /// block (b, a) of `dst`.
    ///
    /// # Safety
    /// AVX2; each row has 16 words, `dst` 256.
    #[target_feature(enable = "avx2")]
    unsafe fn transpose16(rows: [*const i32; LANES], dst: *mut i32) {
        for a in 0..2 {
            for b in 0..2 {
                // SAFETY: the caller's.
                let r: [__m256i; 8] = std::array::from_fn(|l| unsafe { _mm256_loadu_si256(rows[H * a + l].add(H * b) as *const __m256i) });
                // Within each 128-bit half: rows' words interleaved, then double words, so
                // that u[e] holds column e (low half) and e + 4 (high half) of four rows.
                let t: [__m256i; 8] = std::array::from_fn(|i| {
                    let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                    if i % 2 == 0 { _mm256_unpacklo_epi32(x, y) } else { _mm256_unpackhi_epi32(x, y) }
                });
                let u: [__m256i; 8] = std::array::from_fn(|i| {
                    let (q, e) = (i / 4, i % 4);
                    let (x, y) = (t[4 * q + e / 2], t[4 * q + 2 + e / 2]);
                    if e % 2 == 0 { _mm256_unpacklo_epi64(x, y) } else { _mm256_unpackhi_epi64(x, y) }
                });
                for e in 0..4 {
                    let cols = [
                        (e, _mm256_permute2x128_si256::<0x20>(u[e], u[4 + e])),
                        (e + 4, _mm256_permute2x128_si256::<0x31>(u[e], u[4 + e])),
                    ];
                    for (c, v) in cols {
                        // SAFETY: row `8b + c` of `dst`, its words 8a..8a+8.
                        unsafe { _mm256_storeu_si256(dst.add((H * b + c) * LANES + H * a) as *mut __m256i, v) };
                    }
                }
            }
        }
    }

    /// The panel's rows against activation row `i` (lanes 0-7 and 8-15 in two registers),
    /// offsets included, stored at `d`.
    ///
    /// # Safety
    /// AVX2 and FMA; the tile's pointers cover its panel and rows; `d` its values.
    // Inlined into the task's loops, it spilled registers (Q6_K 39 -> 35 multiply-adds a
    // ns).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<B: IntCodes>(t: &Tile<RA>, d: Dest) {
        let k = t.k;
        let (slot_len, ng) = (slot_len::<B>(), k / G);
        let slots = k / slot_len;
        let mut acc = [[_mm256_setzero_ps(); RA]; 2];
        for s in 0..slots {
            let mut sums = [[_mm256_setzero_si256(); RA]; 2];
            for pair in s * slot_len / 2..(s + 1) * slot_len / 2 {
                // SAFETY: pair `pair` lies inside the panel and every row.
                unsafe {
                    let w: [__m256i; 2] = std::array::from_fn(|h| _mm256_loadu_si256(t.w.add(pair * LANES + H * h) as *const __m256i));
                    for (i, &xi) in t.x.iter().enumerate() {
                        let x = _mm256_set1_epi32((xi.add(4 * pair) as *const i32).read_unaligned());
                        for (sums, &w) in sums.iter_mut().zip(&w) {
                            sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(w, x));
                        }
                    }
                }
            }
            // SAFETY: slot `s` of the panel; chunk `s` (or its half's) of every row.
            unsafe {
                let chunk = s * slot_len / QB;
                for (h, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                    let ws = _mm256_loadu_ps(t.scale.add(s * LANES + H * h));
                    for ((a, &sum), &xd) in acc.iter_mut().zip(sums).zip(&t.xd) {
                        *a = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), ws), _mm256_set1_ps(*xd.add(chunk)), *a);
                    }
                }
            }
        }
        if B::OFFSET {
            for g in 0..ng {
                // SAFETY: group `g` of the panel and every row.
                unsafe {
                    for (h, acc) in acc.iter_mut().enumerate() {
                        let b = _mm256_loadu_ps(t.offset.add(g * LANES + H * h));
                        for (a, &ds) in acc.iter_mut().zip(&t.dsums) {
                            *a = _mm256_fmadd_ps(b, _mm256_set1_ps(*ds.add(g)), *a);
                        }
                    }
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let j = H * h;
            if j >= d.cols {
                break;
            }
            let n = (d.cols - j).min(H) as i32;
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            for (i, v) in acc.iter().enumerate().take(d.rows) {
                // SAFETY: inside `d`; the mask keeps to its width.
                unsafe { _mm256_maskstore_ps(d.at.add(i * d.ld + j), mask, *v) };
            }
        }
    }
}
