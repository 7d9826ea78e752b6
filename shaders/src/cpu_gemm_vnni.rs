//! The batched integer product (prefill) on AVX-512 VNNI (Zen 4, Ice Lake and later):
//! `cpu_gemm`'s product, with the weight rows in the vector lanes instead of the elements.
//!
//! `cpu_gemm`'s kernels put 32 elements of one weight row in a register, so each chunk of
//! 32 and pair (weight row, activation row) takes a `vpmaddwd`, a conversion and an FMA,
//! and a Zen 4 runs both multiplies as two 256-bit halves on its two multiply pipes. Here a
//! register holds one pair of elements of 16 weight rows (a *panel*), and the activation
//! row's pair is broadcast, so `vpdpwssd` adds 32 products into 16 i32 lanes that are
//! already the 16 outputs. The lanes stay integer across a whole slot (a chunk of 32, or
//! a half of 16 for the types with a map per 16): per slot and pair of tiles there are 16
//! (or 8) `vpdpwssd`, then one conversion, one multiplication by the panel's weight scales
//! and one FMA by the activation row's `d`, where `cpu_gemm` takes 16 multiplies per chunk.
//! No horizontal sums: each accumulator is 16 adjacent values of a row of `y`.
//!
//! The arithmetic is the integer path's (`cpu_int.rs`), so the sums are the same integers:
//! within a slot they fit i32 (at most 32 products of a code below 256 and an activation
//! below 2^15, under 2^28), and each slot is scaled in f32 as `cpu_gemm` scales it.
//!
//! A band is widened once per task, and a task takes every activation row (the tile of six
//! rows is what stays in L1); with `cpu_gemm`'s 128-row tasks the widening was a fifth of
//! a prefill. It decodes the 16 rows of a panel side by side and transposes their pairs
//! 16 x 16 in registers.
//!
//! On a 2-core Zen 4 (`cpu_gemm::speed::prefill_product_speed`, one thread, 256 x 1536 x
//! 576, in one run), in multiply-adds a nanosecond, this kernel against `cpu_gemm`'s
//! AVX-512 one: Q4_1 85.3 / 42.4, Q5_0 84.1 / 41.8, Q8_0 94.1 / 46.2, Q4_K 86.5 / 42.7,
//! Q6_K 60.5 / 29.6 (its slots are halves of 16). At 32 rows 55-68 against 36-42; at 8
//! rows, where the widening dominates, 25-35 against 21-31.
//!
//! # Shapes
//! - a band of `nw` weight rows is widened to `ceil(nw / 32)` pairs of panels; a panel is
//!   `[k / 2, 16]` i32 (two i16 codes each, elements `2t`, `2t + 1` of lane `l`'s row)
//! - scales: `[panels, slots, 16]`; offsets: `[panels, k / 16, 16]`

use std::ops::Range;

use crate::cpu_gemm::Out;
use crate::cpu_int::{G, IntActs, IntCodes, QB};
use vidllm_core::ggml::{QK_K, blocks};

/// Weight rows per panel (one 512-bit register of i32 lanes).
pub(crate) const LANES: usize = 16;
/// Panels per register tile.
const NP: usize = 2;
/// Weight rows per register tile: what a band is a multiple of.
pub(crate) const TILE_ROWS: usize = NP * LANES;
/// Activation rows per register tile: `NP x RA` i32 and as many f32 accumulators, two
/// panel registers and a broadcast fit the 32 vector registers.
const RA: usize = 6;

/// Whether this processor runs the kernel.
pub(crate) fn runs() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
/// AVX-512 F, BW and VNNI ([`runs`]); `out` covers `rows.len() x nw` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn task<B: IntCodes>(wband: &[u8], nw: usize, acts: &IntActs, rows: Range<usize>, out: Out) {
    let k = acts.k;
    let (nch, ng) = (k / QB, k / G);
    let slots = if B::SHARED32 { nch } else { ng };
    let mut panels = PANELS.take();
    widen::<B>(wband, nw, k, &mut panels);
    for i0 in rows.clone().step_by(RA) {
        // Rows past the end repeat the last one; their results are dropped.
        let xi: [usize; RA] = std::array::from_fn(|i| (i0 + i).min(rows.end - 1));
        let valid_rows = RA.min(rows.end - i0);
        for (t, j0) in (0..nw).step_by(TILE_ROWS).enumerate() {
            let p0 = t * NP;
            let tile = Tile {
                w: panels.codes[p0 * k / 2 * LANES..].as_ptr(),
                k,
                x: xi.map(|x| acts.qs[x * k..].as_ptr()),
                xd: xi.map(|x| acts.d[x * nch..].as_ptr()),
                scale: panels.scale[p0 * slots * LANES..].as_ptr(),
                offset: panels.offset.as_ptr().wrapping_add(p0 * ng * LANES),
                dsums: xi.map(|x| acts.dsums[x * ng..].as_ptr()),
            };
            // SAFETY: the tile's pointers cover its panels and rows; features as ours.
            let acc = unsafe { avx512::tile::<B>(&tile) };
            for (p, acc) in acc.iter().enumerate() {
                let j = j0 + p * LANES;
                if j >= nw {
                    break;
                }
                let mask: u16 = if nw - j >= LANES { !0 } else { (1 << (nw - j)) - 1 };
                for (i, v) in acc.iter().enumerate().take(valid_rows) {
                    // SAFETY: inside the task's rectangle; the mask keeps to its width.
                    unsafe { avx512::store(out.at.add((i0 + i - rows.start) * out.ld + j), mask, *v) };
                }
            }
        }
    }
    PANELS.set(panels);
}

/// The band's blocks decoded into panels; rows past `nw` (up to a whole tile) are zero.
///
/// Per panel and column of blocks, the 16 rows' blocks are decoded side by side (codes to
/// i16, contiguous), then turned into the panel's layout by 16 x 16 transposes of their
/// pairs: scattering each pair to its lane took a fifth of a prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn widen<B: IntCodes>(wband: &[u8], nw: usize, k: usize, panels: &mut Panels) {
    let npanels = nw.div_ceil(TILE_ROWS) * NP;
    let (gpb, spb) = (B::ELEMS / G, if B::SHARED32 { B::ELEMS / QB } else { B::ELEMS / G });
    let (slots, ng, row_blocks) = (k / B::ELEMS * spb, k / G, k / B::ELEMS);
    // Every word of the codes is written below; the small maps are zeroed for the rows
    // past the end.
    panels.codes.resize(npanels * k / 2 * LANES, 0);
    panels.scale.clear();
    panels.scale.resize(npanels * slots * LANES, 0.0);
    panels.offset.clear();
    panels.offset.resize(if B::OFFSET { npanels * ng * LANES } else { 0 }, 0.0);
    let blks = blocks::<B>(wband);
    let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
    // The 16 rows' codes of one column of blocks, `[16, ELEMS]` i16: read as i32, each
    // word is a pair (element 2t in the low half).
    let mut rows = [[0i16; QK_K]; LANES];
    for p in 0..npanels {
        let live = nw.saturating_sub(p * LANES).min(LANES);
        for col in 0..row_blocks {
            for (l, row) in rows.iter_mut().enumerate() {
                let row = &mut row[..B::ELEMS];
                if l >= live {
                    row.fill(0);
                    continue;
                }
                blks[(p * LANES + l) * row_blocks + col].codes(&mut c, &mut a, &mut b);
                if B::SIGNED {
                    row.iter_mut().zip(&c).for_each(|(v, &c)| *v = c as i8 as i16);
                } else {
                    row.iter_mut().zip(&c).for_each(|(v, &c)| *v = c as i16);
                }
                for s in 0..spb {
                    panels.scale[(p * slots + col * spb + s) * LANES + l] = if B::SHARED32 { a[2 * s] } else { a[s] };
                }
                if B::OFFSET {
                    for (g, &b) in b[..gpb].iter().enumerate() {
                        panels.offset[(p * ng + col * gpb + g) * LANES + l] = b;
                    }
                }
            }
            let dst = &mut panels.codes[(p * k / 2 + col * B::ELEMS / 2) * LANES..][..B::ELEMS / 2 * LANES];
            for (t0, dst) in (0..B::ELEMS / 2).step_by(LANES).zip(dst.chunks_exact_mut(LANES * LANES)) {
                // SAFETY: 16 rows of 16 words from `t0` (ELEMS / 2 is a multiple of 16), and
                // 256 words of `dst`.
                unsafe { avx512::transpose16(std::array::from_fn(|l| rows[l][2 * t0..].as_ptr() as *const i32), dst.as_mut_ptr()) };
            }
        }
    }
}

/// One register tile's operands.
struct Tile {
    /// The tile's first panel; the next one follows it (`k / 2 * 16` words on).
    w: *const i32,
    k: usize,
    /// `RA` rows of `k` activations, their `d` per chunk of 32 and `d sum q` per 16.
    x: [*const i16; RA],
    xd: [*const f32; RA],
    dsums: [*const f32; RA],
    /// The panels' scales per slot, and offsets per 16 (dangling for the types without).
    scale: *const f32,
    offset: *const f32,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

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

    /// Store the lanes of `v` that `mask` keeps at `at`.
    ///
    /// # Safety
    /// AVX-512 F; the kept lanes' addresses are writable.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store(at: *mut f32, mask: u16, v: __m512) {
        // SAFETY: the caller's.
        unsafe { _mm512_mask_storeu_ps(at, mask, v) }
    }

    /// The tile's `NP x RA` accumulators: 16 values of `y` each (panel `p`'s rows against
    /// activation row `i`), offsets included.
    ///
    /// Per pair of elements: two panel loads, `RA` broadcasts of the activations' pair, and
    /// `NP x RA` `vpdpwssd`.
    ///
    /// # Safety
    /// AVX-512 F, BW and VNNI; the tile's pointers cover its panels and rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<B: IntCodes>(t: &Tile) -> [[__m512; RA]; NP] {
        let k = t.k;
        let (slot_len, ng) = (if B::SHARED32 { QB } else { G }, k / G);
        let slots = k / slot_len;
        let mut acc = [[_mm512_setzero_ps(); RA]; NP];
        for s in 0..slots {
            let mut sums = [[_mm512_setzero_si512(); RA]; NP];
            for pair in s * slot_len / 2..(s + 1) * slot_len / 2 {
                // SAFETY: pair `pair` lies inside every panel and row.
                unsafe {
                    let w: [__m512i; NP] =
                        std::array::from_fn(|p| _mm512_loadu_si512(t.w.add((p * k / 2 + pair) * LANES) as *const __m512i));
                    for (i, &xi) in t.x.iter().enumerate() {
                        let x = _mm512_set1_epi32((xi.add(2 * pair) as *const i32).read_unaligned());
                        for (sums, &w) in sums.iter_mut().zip(&w) {
                            sums[i] = _mm512_dpwssd_epi32(sums[i], w, x);
                        }
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
        if B::OFFSET {
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
        acc
    }
}
