//! The 32-element block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) repacked for the CPU's
//! decode product: sixteen rows side by side, so that one register holds four codes (or
//! four bytes of packed nibbles) of each of sixteen rows, and `vpdpbusd` against four
//! activation bytes broadcast gives sixteen outputs' partial sums at once.
//!
//! In the file's layout (`cpu_vnni.rs` reads it) a register holds the codes of one or
//! two blocks, so every block's integer sum has to be gathered out of its lanes by a
//! transposing tree, its scale picked out of the block headers, and then each row's
//! blocks summed apart (`cpu_gemv::x86::sum_rows`). On a 2-core Zen 4 that is about six
//! cycles a Q8_0 block in cache, where its two `vpdpbusd` take one: the decode step was
//! bound by instructions on one thread, not by memory. With the rows in the lanes (as
//! `cpu_gemm_lanes.rs` lays out prefill's panels, and as llama.cpp's CPU_REPACK buffers
//! hold weights for its GEMV), the lanes are the outputs: per block of sixteen rows the
//! `vpdpbusd`s, then one conversion and one FMA by the sixteen rows' scales (and one by
//! their minima). No tree, no gathered headers, no row sums.
//!
//! `decode_row_dot_speed`, rows of 576, one thread, ns a block, file layout's VNNI
//! kernel -> repacked: Q8_0 1.70 -> 0.49 in cache, 1.99 -> 1.28 from memory; Q5_0 1.93
//! -> 0.61, 1.96 -> 0.87; Q4_1 1.57 -> 0.47, 1.57 -> 0.82; Q4_0 1.53 -> 0.42; Q5_1
//! 1.91 -> 0.63.
//!
//! # Layout
//! A band of `n` rows (a multiple of [`ROWS`]) of `nb` blocks, per group of sixteen rows,
//! per block `b`, sixteen blocks' bytes ([`group_block`]):
//! - each f16 field of the sixteen rows' block `b` (the scale; the minimum of Q4_1 and
//!   Q5_1) in 32 bytes;
//! - the rest of each block in 4-byte pieces, piece `p` of the sixteen rows side by
//!   side in 64 bytes, row `r`'s at byte `4 r`: Q8_0's eight pieces of codes (codes
//!   `4p..4p + 4`); the nibble types' `qh` word (Q5_0, Q5_1), then four pieces of packed
//!   nibbles (piece `c`: elements `4c..4c + 4` in the low nibbles, `16 + 4c..` in the
//!   high ones).
//!
//! A group takes the `16 * row_bytes` bytes its rows took in the file, so a band of whole
//! groups is repacked in place, and a run of whole groups is itself a repacked band.
//!
//! The arithmetic is `cpu_vnni.rs`'s: 16-bit activations split into a signed high byte
//! and an unsigned low byte (`q = 256 hi + lo`); Q8_0's codes made unsigned (`c + 128`)
//! for the high bytes' product and `32768 sum hi` taken off afterwards; the nibble
//! types' codes (0..31) read uncentred and their offset's `8 sum q` or `16 sum q` taken
//! off. So each block's integer sum is exactly the file layout's; each is scaled by the
//! weight's and the activation block's scales. Only the order in which a row's blocks are
//! added differs (block by block, by an FMA, rather than by lanes and a tree), so the
//! products are as exact, not the same bits. At 8 bits (`ActBits::Int8`) one `vpdpbusd`
//! a piece does.
//!
//! Where it is used: the CPU backend repacks a band of whole groups when it is uploaded
//! ([`applies`]: AVX-512 VNNI, and BITALG for the fifth bits; `VIDLLM_CPU_REPACK` not
//! `0`), decodes with [`matvec`], and unpacks a prefill task's band back into the file's
//! layout ([`unpack`]) for `cpu_gemm`, whose panels it builds from there.

use std::sync::OnceLock;

use vidllm_core::ggml::GgmlType;

use crate::cpu_int::{IntActs, QB};

/// Weight rows side by side in a group.
pub const ROWS: usize = 16;
/// Bytes of a block's pieces in a lane (one `vpdpbusd` lane: four codes of Q8_0).
const PER_LANE: usize = 4;

/// Whether this processor runs the repacked kernel for `ty` (Q8_0, Q4_0, Q4_1: AVX-512
/// VNNI; Q5_0, Q5_1 also BITALG, whose `vpshufbitqmb` picks the codes' fifth bits out of
/// the 16 rows' `qh` words into a mask).
pub fn available(ty: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match ty {
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => crate::cpu_vnni::available(),
            GgmlType::Q5_0 | GgmlType::Q5_1 => crate::cpu_vnni::available() && has!("avx512bitalg"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        false
    }
}

/// Whether the CPU keeps a band of `n` rows of `k` values of type `ty` repacked (and so
/// must read it so): Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1, whole groups of sixteen rows,
/// where [`available`] and `VIDLLM_CPU_REPACK` is not `0`. The same answer for the same
/// band every time in a process: the upload and the products agree on the layout.
pub fn applies(ty: GgmlType, n: usize, k: usize) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("VIDLLM_CPU_REPACK").map_or(true, |v| v != "0"));
    on && available(ty) && n > 0 && n.is_multiple_of(ROWS) && k.is_multiple_of(QB)
}

/// Bytes of one block of each of a group's rows (sixteen blocks' worth).
pub fn group_block(ty: GgmlType) -> usize {
    ROWS * ty.block_bytes()
}

/// The f16 fields a block of `ty` starts with: its scale, and the minimum of Q4_1 and
/// Q5_1.
fn halves(ty: GgmlType) -> usize {
    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { 2 } else { 1 }
}

/// Where byte `i` of row `r`'s block of `ty` lies in its repacked group block: each f16
/// field of the sixteen rows in 32 bytes (the scales, then the minima), then the rest of
/// the block in 4-byte pieces, piece `p` of each row side by side in 64 bytes. (Q8_0:
/// eight pieces of codes; Q4_0, Q4_1: four pieces of packed nibbles; Q5_0, Q5_1: `qh`,
/// then those four.)
fn repacked_at(ty: GgmlType, r: usize, i: usize) -> usize {
    let head = 2 * halves(ty);
    if i < head {
        return 2 * ROWS * (i / 2) + 2 * r + i % 2;
    }
    let i = i - head;
    ROWS * head + i / PER_LANE * ROWS * PER_LANE + r * PER_LANE + i % PER_LANE
}

/// Repacks `band` (whole groups of sixteen rows of `nb` blocks of `ty`, the file's
/// layout) in place, a group at a time through a group-sized buffer.
pub fn repack(ty: GgmlType, band: &mut [u8], nb: usize) {
    let (bb, gb) = (ty.block_bytes(), group_block(ty));
    assert!(band.len().is_multiple_of(nb * gb), "cpu_repack: not whole groups of {ROWS} rows");
    let mut file = vec![0u8; nb * gb];
    for g in band.chunks_exact_mut(nb * gb) {
        file.copy_from_slice(g);
        for b in 0..nb {
            let out = &mut g[b * gb..][..gb];
            for r in 0..ROWS {
                for (i, &v) in file[(r * nb + b) * bb..][..bb].iter().enumerate() {
                    out[repacked_at(ty, r, i)] = v;
                }
            }
        }
    }
}

/// The file's layout of a repacked band (whole groups of `nb` blocks of `ty` a row), into
/// `out` (as long as `band`). Each prefill task unpacks its band: on AVX-512 by
/// transposes in registers (Q8_0 byte by byte went at 3.5 GB/s, a few percent of a
/// prefill; by transposes 22 GB/s in L2).
pub fn unpack(ty: GgmlType, band: &[u8], nb: usize, out: &mut [u8]) {
    let gb = group_block(ty);
    assert!(band.len().is_multiple_of(nb * gb) && out.len() == band.len(), "cpu_repack: not whole groups of {ROWS} rows");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_gemv::available() {
        // SAFETY (both): AVX-512 F and BW are here; the lengths were checked.
        match ty {
            GgmlType::Q8_0 => return unsafe { x86::unpack_q8_0(band, nb, out) },
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                return unsafe { x86::unpack_nibbles(band, nb, halves(ty), ty.block_bytes(), out) };
            }
            _ => {}
        }
    }
    unpack_bytes(ty, band, nb, out);
}

/// [`unpack`] byte by byte.
fn unpack_bytes(ty: GgmlType, band: &[u8], nb: usize, out: &mut [u8]) {
    let (bb, gb) = (ty.block_bytes(), group_block(ty));
    for (g, o) in band.chunks_exact(nb * gb).zip(out.chunks_exact_mut(nb * gb)) {
        for b in 0..nb {
            let packed = &g[b * gb..][..gb];
            for r in 0..ROWS {
                for (i, v) in o[(r * nb + b) * bb..][..bb].iter_mut().enumerate() {
                    *v = packed[repacked_at(ty, r, i)];
                }
            }
        }
    }
}

/// One row of activations as the kernel reads it: the bytes it broadcasts four at a
/// time, and per block what comes off the integer sum and the activations' scale.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct LaneRow {
    /// 16-bit activations: the high bytes (signed); 8-bit: the codes.
    hi: Vec<i8>,
    /// 16-bit activations: the low bytes (unsigned); 8-bit: empty.
    lo: Vec<u8>,
    /// Per block, what comes off its integer sum: Q8_0's codes are made unsigned (`c +
    /// 128`) for the product with the high bytes (or the 8-bit codes), so `32768 sum hi`
    /// (`128 sum q`); Q4_0's and Q5_0's are read uncentred, so `8 sum q` and `16 sum q`.
    correction: Vec<i32>,
    /// Per block, for the types with a minimum (Q4_1, Q5_1): `d sum q`, which the
    /// weights' minimum multiplies. Else empty.
    dsum: Vec<f32>,
    /// Per block: the activations' scale.
    d: Vec<f32>,
}

impl LaneRow {
    /// Row `row` of `acts`, for weights of type `ty`.
    pub(crate) fn new(acts: &IntActs, row: usize, ty: GgmlType) -> Self {
        let (k, nb) = (acts.k, acts.k / QB);
        let d = acts.d[row * nb..][..nb].to_vec();
        // What the codes' offset multiplies: the sum of the activations' codes.
        let offset = match ty {
            GgmlType::Q8_0 => 128,
            GgmlType::Q4_0 => 8,
            GgmlType::Q5_0 => 16,
            _ => 0,
        };
        let dsum = if halves(ty) == 2 {
            let ds = &acts.dsums[row * 2 * nb..][..2 * nb];
            ds.chunks_exact(2).map(|p| p[0] + p[1]).collect()
        } else {
            Vec::new()
        };
        if let Some(bytes) = &acts.bytes {
            let q = &bytes.qs[row * k..][..k];
            let correction = block_sums(q, |v| offset * v as i32);
            return Self { hi: q.to_vec(), lo: Vec::new(), correction, dsum, d };
        }
        let q = &acts.qs[row * k..][..k];
        let hi: Vec<i8> = q.iter().map(|&v| (v >> 8) as i8).collect();
        let lo = q.iter().map(|&v| v as u8).collect();
        let correction =
            if ty == GgmlType::Q8_0 { block_sums(q, |v| 32768 * (v >> 8) as i32) } else { block_sums(q, |v| offset * v as i32) };
        Self { hi, lo, correction, dsum, d }
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn eight(&self) -> bool {
        self.lo.is_empty()
    }
}

/// `f` summed over each block of 32 values.
fn block_sums<T: Copy>(values: &[T], f: impl Fn(T) -> i32) -> Vec<i32> {
    values.chunks_exact(QB).map(|b| b.iter().map(|&v| f(v)).sum()).collect()
}

/// `y = W x` for `m` rows of activations (1 to `cpu_gemv::MAX_ROWS`) and `W` repacked
/// (`n` rows of `acts.k` of type `ty`), groups of rows split over the thread pool (on hot
/// workers). `y` is `[m, n]`; each row's values are what that row alone gives.
///
/// # Panics
/// Where the processor lacks the kernel ([`available`]), or the shapes do not agree.
pub fn matvec(ty: GgmlType, w: &[u8], n: usize, acts: &IntActs) -> Vec<f32> {
    assert!(available(ty), "cpu_repack::matvec: no repacked kernel for {} on this processor", ty.name());
    let (m, nb, bb) = (acts.rows(), acts.k / QB, ty.block_bytes());
    assert!((1..=crate::cpu_gemv::MAX_ROWS).contains(&m), "cpu_repack::matvec: 1 to {} rows (got {m})", crate::cpu_gemv::MAX_ROWS);
    assert!(n.is_multiple_of(ROWS) && acts.k.is_multiple_of(QB) && w.len() >= n * nb * bb, "cpu_repack::matvec: not n rows of k");
    let rows: Vec<LaneRow> = (0..m).map(|i| LaneRow::new(acts, i, ty)).collect();
    // Weight-row major, `[n, m]`: each task's rows are one contiguous run.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = crate::cpu::rows_per_task(n).next_multiple_of(ROWS);
    crate::cpu_hot::for_each_chunk_mut(&mut yt, rows_per_task * m, |task, out| {
        let band = &w[task * rows_per_task * nb * bb..][..out.len() / m * nb * bb];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were checked; the band is whole groups of `nb` blocks, and
        // `out` holds `m` values for each of its rows.
        unsafe {
            match ty {
                GgmlType::Q8_0 => x86::rows_dot(band, nb, &rows, out),
                GgmlType::Q4_0 => x86::rows_dot_nibbles::<false, false>(band, nb, &rows, out),
                GgmlType::Q4_1 => x86::rows_dot_nibbles::<false, true>(band, nb, &rows, out),
                GgmlType::Q5_0 => x86::rows_dot_nibbles::<true, false>(band, nb, &rows, out),
                _ => x86::rows_dot_nibbles::<true, true>(band, nb, &rows, out),
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (band, &rows);
    });
    crate::cpu::weight_row_major_to_y(yt, m, n)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LaneRow, PER_LANE, ROWS};
    use crate::cpu_int::QB;

    /// A repacked Q8_0 group block: 32 bytes of scales, eight 64-byte pieces of codes.
    const Q8_0_BLOCK: usize = ROWS * 34;

    /// A repacked group block of a nibble type: sixteen blocks of 18 bytes (scale and
    /// nibbles), 22 with `qh` (`FIFTH`), 2 more with a minimum (`MIN`).
    const fn nibbles_block(fifth: bool, min: bool) -> usize {
        ROWS * (18 + 4 * fifth as usize + 2 * min as usize)
    }

    /// How far ahead of the block being read to fetch weights (bytes), into L2: as
    /// `cpu_vnni.rs` found best for Q8_0.
    const PREFETCH: usize = 2048;

    /// `out[r * m + i] = W_r . x_i` for the rows of a repacked band and the `m` rows.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI ([`super::available`]); `band` is whole groups of `nb`
    /// blocks, `out` `m` values for each of its rows, the rows made for `nb` blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_dot(band: &[u8], nb: usize, rows: &[LaneRow], out: &mut [f32]) {
        rows_dot_of(band, nb * Q8_0_BLOCK, rows, out, |group, row, fetch| {
            // SAFETY: as ours.
            unsafe { if row.eight() { group_dot::<true>(group, nb, row, fetch) } else { group_dot::<false>(group, nb, row, fetch) } }
        })
    }

    /// [`rows_dot`] for the nibble types: Q4_0 and Q4_1, or with `FIFTH` Q5_0 and Q5_1;
    /// `MIN`: Q4_1 and Q5_1.
    ///
    /// # Safety
    /// As [`rows_dot`], and AVX-512 BITALG where `FIFTH` ([`super::available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_dot_nibbles<const FIFTH: bool, const MIN: bool>(band: &[u8], nb: usize, rows: &[LaneRow], out: &mut [f32]) {
        rows_dot_of(band, nb * nibbles_block(FIFTH, MIN), rows, out, |group, row, fetch| {
            // SAFETY: as ours.
            unsafe {
                match (FIFTH, row.eight()) {
                    (false, false) => nibbles_dot::<false, MIN>(group, nb, row, fetch),
                    (false, true) => nibbles_dot::<true, MIN>(group, nb, row, fetch),
                    (true, false) => nibbles_dot_fifth::<false, MIN>(group, nb, row, fetch),
                    (true, true) => nibbles_dot_fifth::<true, MIN>(group, nb, row, fetch),
                }
            }
        })
    }

    /// Each group (`group_bytes`) of the band against each row, by `dot` (whose last
    /// argument says whether to fetch ahead: the first row's pass).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn rows_dot_of(band: &[u8], group_bytes: usize, rows: &[LaneRow], out: &mut [f32], dot: impl Fn(&[u8], &LaneRow, bool) -> __m512) {
        let m = rows.len();
        for (group, out) in band.chunks_exact(group_bytes).zip(out.chunks_exact_mut(ROWS * m)) {
            for (i, row) in rows.iter().enumerate() {
                let y = dot(group, row, i == 0);
                if m == 1 {
                    // SAFETY: sixteen values.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), y) };
                } else {
                    let mut v = [0f32; ROWS];
                    // SAFETY: sixteen values.
                    unsafe { _mm512_storeu_ps(v.as_mut_ptr(), y) };
                    for (r, v) in v.into_iter().enumerate() {
                        out[r * m + i] = v;
                    }
                }
            }
        }
    }

    /// [`super::unpack`]: per group and block, the eight chunks (a lane a row) transposed
    /// to each row's eight words by unpacks, then stored after the row's scale.
    ///
    /// # Safety
    /// AVX-512 F and BW; `band` and `out` are whole groups of `nb` blocks, as long.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn unpack_q8_0(band: &[u8], nb: usize, out: &mut [u8]) {
        let row_bytes = nb * 34;
        for (g, o) in band.chunks_exact(nb * Q8_0_BLOCK).zip(out.chunks_exact_mut(nb * Q8_0_BLOCK)) {
            for b in 0..nb {
                let packed = &g[b * Q8_0_BLOCK..][..Q8_0_BLOCK];
                // SAFETY (both): eight chunks of 64 bytes after the scales.
                let (first, second) = unsafe { (pieces_by_row(packed, 2 * ROWS), pieces_by_row(packed, 2 * ROWS + 256)) };
                for r in 0..ROWS {
                    let blk = &mut o[r * row_bytes + b * 34..][..34];
                    blk[..2].copy_from_slice(&packed[2 * r..2 * r + 2]);
                    // SAFETY: 32 bytes after the scale.
                    unsafe {
                        _mm_storeu_si128(blk[2..].as_mut_ptr() as *mut __m128i, quarter(first[r % 4], r / 4));
                        _mm_storeu_si128(blk[18..].as_mut_ptr() as *mut __m128i, quarter(second[r % 4], r / 4));
                    }
                }
            }
        }
    }

    /// [`super::unpack`] of the nibble types (`bb` bytes a block, `halves` f16 fields
    /// first): per group and block, the four pieces of nibbles transposed to each row's
    /// four words, stored after its f16 fields (and `qh`, the 4 bytes before them).
    ///
    /// # Safety
    /// AVX-512 F and BW; `band` and `out` are whole groups of `nb` blocks, as long.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn unpack_nibbles(band: &[u8], nb: usize, halves: usize, bb: usize, out: &mut [u8]) {
        let (row_bytes, gb) = (nb * bb, ROWS * bb);
        // The nibbles' first byte in a block, and their first piece in a group block.
        let (at, from) = (bb - 16, ROWS * (bb - 16));
        for (g, o) in band.chunks_exact(nb * gb).zip(out.chunks_exact_mut(nb * gb)) {
            for b in 0..nb {
                let packed = &g[b * gb..][..gb];
                // SAFETY: four pieces of 64 bytes from `from`.
                let words = unsafe { pieces_by_row(packed, from) };
                for r in 0..ROWS {
                    let blk = &mut o[r * row_bytes + b * bb..][..bb];
                    for f in 0..halves {
                        blk[2 * f..2 * f + 2].copy_from_slice(&packed[2 * ROWS * f + 2 * r..][..2]);
                    }
                    if at > 2 * halves {
                        // `qh`, after the f16 fields.
                        blk[2 * halves..at].copy_from_slice(&packed[2 * ROWS * halves + 4 * r..][..4]);
                    }
                    // SAFETY: the block's last 16 bytes.
                    unsafe { _mm_storeu_si128(blk[at..].as_mut_ptr() as *mut __m128i, quarter(words[r % 4], r / 4)) };
                }
            }
        }
    }

    /// Four pieces of sixteen rows (64 bytes each, from `at`) transposed: quarter `q` of
    /// word `j` holds the four pieces of row `4q + j`, in order.
    ///
    /// # Safety
    /// `packed` holds 256 bytes from `at`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pieces_by_row(packed: &[u8], at: usize) -> [__m512i; 4] {
        // SAFETY: the caller's.
        let c: [__m512i; 4] = std::array::from_fn(|c| unsafe { _mm512_loadu_si512(packed[at + 64 * c..].as_ptr() as *const __m512i) });
        // Within each quarter: pieces 0 and 1, then 2 and 3, interleaved by row.
        let (lo, hi) = (
            [_mm512_unpacklo_epi32(c[0], c[1]), _mm512_unpacklo_epi32(c[2], c[3])],
            [_mm512_unpackhi_epi32(c[0], c[1]), _mm512_unpackhi_epi32(c[2], c[3])],
        );
        [
            _mm512_unpacklo_epi64(lo[0], lo[1]),
            _mm512_unpackhi_epi64(lo[0], lo[1]),
            _mm512_unpacklo_epi64(hi[0], hi[1]),
            _mm512_unpackhi_epi64(hi[0], hi[1]),
        ]
    }

    /// 128-bit quarter `q` of `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn quarter(v: __m512i, q: usize) -> __m128i {
        match q {
            0 => _mm512_castsi512_si128(v),
            1 => _mm512_extracti32x4_epi32::<1>(v),
            2 => _mm512_extracti32x4_epi32::<2>(v),
            _ => _mm512_extracti32x4_epi32::<3>(v),
        }
    }

    /// The sixteen rows of one group against one activation row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn group_dot<const EIGHT: bool>(group: &[u8], nb: usize, row: &LaneRow, fetch: bool) -> __m512 {
        let flip = _mm512_set1_epi8(-128);
        let mut acc = _mm512_setzero_ps();
        // Four activation bytes as one i32, broadcast to every lane.
        let bytes4 = |p: *const u8| _mm512_set1_epi32(unsafe { (p as *const i32).read_unaligned() });
        for b in 0..nb {
            let blk = group[b * Q8_0_BLOCK..].as_ptr();
            if fetch {
                for line in (0..Q8_0_BLOCK).step_by(64) {
                    // A prefetch does not fault, wherever it points.
                    _mm_prefetch::<_MM_HINT_T1>(blk.wrapping_add(PREFETCH + line) as *const i8);
                }
            }
            // SAFETY (all reads): the group holds `Q8_0_BLOCK` bytes from `blk`, and the
            // row `QB` values of block `b`.
            let (mut hi, mut lo) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for c in 0..QB / PER_LANE {
                let w = unsafe { _mm512_loadu_si512(blk.add(2 * ROWS + c * ROWS * PER_LANE) as *const __m512i) };
                let at = b * QB + c * PER_LANE;
                // Signed codes as unsigned, `c + 128`, against the high bytes (or the 8-bit
                // codes); the low bytes (unsigned) against the codes as they are.
                hi = _mm512_dpbusd_epi32(hi, _mm512_xor_si512(w, flip), bytes4(unsafe { row.hi.as_ptr().add(at) } as *const u8));
                if !EIGHT {
                    lo = _mm512_dpbusd_epi32(lo, bytes4(unsafe { row.lo.as_ptr().add(at) }), w);
                }
            }
            // SAFETY: the block starts with the sixteen scales.
            acc = unsafe { add_block::<EIGHT>(acc, hi, lo, row, b, blk) };
        }
        acc
    }

    /// `acc` plus block `b`'s sixteen products: the integer sums (`256 hi + lo`, or `hi`
    /// at 8 bits) less the row's correction, times the weights' scales (the group block's
    /// first 32 bytes, at `blk`) and the activations'.
    ///
    /// # Safety
    /// `blk` points at a repacked group block.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_block<const EIGHT: bool>(acc: __m512, hi: __m512i, lo: __m512i, row: &LaneRow, b: usize, blk: *const u8) -> __m512 {
        let sum = if EIGHT { hi } else { _mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo) };
        let sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(row.correction[b]));
        // SAFETY: the caller's.
        let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk as *const __m256i) });
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(row.d[b])), acc)
    }

    /// [`group_dot`] for the nibble types: each piece of packed nibbles gives two
    /// registers of codes (elements `4c..4c + 4` from the low nibbles, `16 + 4c..` from
    /// the high ones). With `FIFTH` (Q5_0, Q5_1) the codes' fifth bits are added under
    /// masks that `vpshufbitqmb` picks from the rows' `qh` words (lane `l` of 64 bits holds
    /// rows `2l` and `2l + 1`). The codes (0..31) are read uncentred, as unsigned and as
    /// signed bytes alike; the offset's `8 sum q` or `16 sum q` comes off each block, and
    /// with `MIN` each block adds the rows' minima times the activations' `d sum q`.
    ///
    /// # Safety
    /// Inlined into a function with AVX-512 F, BW, VL and VNNI, and BITALG where `FIFTH`;
    /// the group is whole blocks, the row made for `nb` of them.
    #[inline(always)]
    unsafe fn nibbles_dot_body<const EIGHT: bool, const FIFTH: bool, const MIN: bool>(
        group: &[u8],
        nb: usize,
        row: &LaneRow,
        fetch: bool,
    ) -> __m512 {
        let gb = nibbles_block(FIFTH, MIN);
        // Where the `qh` words and the nibbles start, after the f16 fields.
        let qh_at = 2 * ROWS * (1 + MIN as usize);
        let nibbles_at = qh_at + if FIFTH { ROWS * PER_LANE } else { 0 };
        // SAFETY (all): the features are the caller's; every read lies in the group block
        // (`gb` bytes from `blk`) or in the row's block `b`.
        unsafe {
            let (nibble, sixteen) = (_mm512_set1_epi8(15), _mm512_set1_epi8(16));
            // Per byte of a 64-bit lane, the bit of the two rows' `qh` that holds the fifth
            // bit of its element, for a piece's first element 0: bytes 0-3 row 2l (bits 0-3),
            // bytes 4-7 row 2l + 1 (bits 32-35).
            let first_bits = _mm512_set1_epi64(i64::from_le_bytes([0, 1, 2, 3, 32, 33, 34, 35]));
            let mut acc = _mm512_setzero_ps();
            let bytes4 = |p: *const u8| _mm512_set1_epi32((p as *const i32).read_unaligned());
            for b in 0..nb {
                let blk = group[b * gb..].as_ptr();
                if fetch {
                    for line in (0..gb).step_by(64) {
                        // A prefetch does not fault, wherever it points.
                        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + line) as *const i8);
                    }
                }
                let qh = if FIFTH { _mm512_loadu_si512(blk.add(qh_at) as *const __m512i) } else { _mm512_setzero_si512() };
                let (mut hi, mut lo) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for c in 0..4 {
                    let w = _mm512_loadu_si512(blk.add(nibbles_at + c * ROWS * PER_LANE) as *const __m512i);
                    let halves = [_mm512_and_si512(w, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(w), nibble)];
                    for (half, mut codes) in halves.into_iter().enumerate() {
                        let e = 16 * half + PER_LANE * c;
                        if FIFTH {
                            let fifth = _mm512_bitshuffle_epi64_mask(qh, _mm512_add_epi8(first_bits, _mm512_set1_epi8(e as i8)));
                            codes = _mm512_mask_add_epi8(codes, fifth, codes, sixteen);
                        }
                        let at = b * QB + e;
                        hi = _mm512_dpbusd_epi32(hi, codes, bytes4(row.hi.as_ptr().add(at) as *const u8));
                        if !EIGHT {
                            lo = _mm512_dpbusd_epi32(lo, bytes4(row.lo.as_ptr().add(at)), codes);
                        }
                    }
                }
                acc = add_block::<EIGHT>(acc, hi, lo, row, b, blk);
                if MIN {
                    let mw = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(2 * ROWS) as *const __m256i));
                    acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(row.dsum[b]), acc);
                }
            }
            acc
        }
    }

    /// [`nibbles_dot_body`] for Q4_0 and Q4_1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn nibbles_dot<const EIGHT: bool, const MIN: bool>(group: &[u8], nb: usize, row: &LaneRow, fetch: bool) -> __m512 {
        // SAFETY: the features are ours; as the caller's.
        unsafe { nibbles_dot_body::<EIGHT, false, MIN>(group, nb, row, fetch) }
    }

    /// [`nibbles_dot_body`] for Q5_0 and Q5_1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512bitalg")]
    unsafe fn nibbles_dot_fifth<const EIGHT: bool, const MIN: bool>(group: &[u8], nb: usize, row: &LaneRow, fetch: bool) -> __m512 {
        // SAFETY: the features are ours; as the caller's.
        unsafe { nibbles_dot_body::<EIGHT, true, MIN>(group, nb, row, fetch) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check;
    use crate::cpu_int::ActBits;

    const TYPES: [GgmlType; 5] = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1];

    #[test]
    fn unpack_undoes_repack() {
        for ty in TYPES {
            for nb in [1, 2, 18] {
                let w = check::weight(ty, 2 * ROWS, nb * QB, 3);
                let mut packed = w.clone();
                repack(ty, &mut packed, nb);
                assert_ne!(packed, w);
                let (mut back, mut bytes) = (vec![0u8; w.len()], vec![0u8; w.len()]);
                unpack(ty, &packed, nb, &mut back);
                unpack_bytes(ty, &packed, nb, &mut bytes);
                assert_eq!(back, w, "{} nb={nb}", ty.name());
                assert_eq!(bytes, w, "{} nb={nb}: byte by byte", ty.name());
            }
        }
    }

    /// Rows of 1, 3, 18 and 48 blocks, 1 to 16 rows of activations at 16 and 8 bits:
    /// each value is the f64 product's to f32 rounding.
    #[test]
    fn matvec_matches_f64() {
        for ty in TYPES.into_iter().filter(|&t| available(t)) {
            for nb in [1, 3, 18, 48] {
                let (n, k) = (3 * ROWS, nb * QB);
                let w = check::weight(ty, n, k, 5);
                let mut packed = w.clone();
                repack(ty, &mut packed, nb);
                for (m, bits) in [1, 3, crate::cpu_gemv::MAX_ROWS].into_iter().flat_map(|m| [(m, ActBits::Int16), (m, ActBits::Int8)]) {
                    let acts = IntActs::quantize_to(&check::values(m * k, 13), k, bits);
                    let want = check::reference(&acts.dequantize(), &vidllm_core::ggml::dequantize(ty, &w, n * k), m, n, k);
                    let got = matvec(ty, &packed, n, &acts);
                    let max_abs = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let max_diff = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                    assert!(
                        check::within_rounding(max_diff, max_abs, k),
                        "{} k={k} m={m} {bits:?}: max diff {max_diff:e} (max |y| {max_abs})",
                        ty.name()
                    );
                }
            }
        }
    }

    /// The prefill product reads a repacked matrix (each task's band unpacked) exactly as
    /// it reads the file's layout: several tasks, bands ending at `n`.
    #[test]
    fn gemm_reads_repacked_bands() {
        use crate::cpu_gemm::{Layout, available as gemm, matmul};
        for ty in TYPES.into_iter().filter(|&t| available(t) && gemm()) {
            let (m, n, nb) = (133, 7 * ROWS, 18);
            let k = nb * QB;
            let w = check::weight(ty, n, k, 5);
            let mut packed = w.clone();
            repack(ty, &mut packed, nb);
            for bits in [ActBits::Int16, ActBits::Int8] {
                let acts = IntActs::quantize_to(&check::values(m * k, 17), k, bits);
                assert_eq!(
                    matmul(ty, &packed, Layout::Repacked, n, &acts),
                    matmul(ty, &w, Layout::File, n, &acts),
                    "{} {bits:?}",
                    ty.name()
                );
            }
        }
    }

    /// Several rows of activations at once give each row exactly its one-row product.
    #[test]
    fn rows_together_equal_rows_alone() {
        for ty in TYPES.into_iter().filter(|&t| available(t)) {
            let (n, nb) = (2 * ROWS, 18);
            let k = nb * QB;
            let mut w = check::weight(ty, n, k, 5);
            repack(ty, &mut w, nb);
            for bits in [ActBits::Int16, ActBits::Int8] {
                for m in [2, 3, crate::cpu_gemv::MAX_ROWS] {
                    let x = check::values(m * k, 11);
                    let together = matvec(ty, &w, n, &IntActs::quantize_to(&x, k, bits));
                    for (i, row) in x.chunks_exact(k).enumerate() {
                        let alone = matvec(ty, &w, n, &IntActs::quantize_to(row, k, bits));
                        assert_eq!(&together[i * n..(i + 1) * n], &alone[..], "{} m={m} row {i} {bits:?}", ty.name());
                    }
                }
            }
        }
    }
}
