//! Q8_0 weights repacked for the CPU's decode product: sixteen rows side by side, so
//! that one register holds four codes of each of sixteen rows, and `vpdpbusd` against
//! four activation bytes broadcast gives sixteen outputs' partial sums at once.
//!
//! In the file's layout (`cpu_vnni.rs` reads it) a register holds the codes of one or
//! two blocks, so every block's integer sum has to be gathered out of its lanes by a
//! transposing tree, its scale picked out of the block headers, and then each row's
//! blocks summed apart (`cpu_gemv::x86::sum_rows`). On a 2-core Zen 4 that is about six
//! cycles a block in cache, where its two `vpdpbusd` take one: the decode step of a
//! Q8_0 model was bound by instructions on one thread, not by memory. With the rows in
//! the lanes (as `cpu_gemm_lanes.rs` lays out prefill's panels, and as llama.cpp's
//! CPU_REPACK buffers hold weights for its GEMV), the lanes are the outputs: per block
//! of sixteen rows, eight `vpdpbusd` pairs, then one conversion and one FMA by the
//! sixteen rows' scales. No tree, no gathered headers, no row sums.
//!
//! # Layout
//! A band of `n` rows (a multiple of [`ROWS`]) of `nb` blocks, per group of sixteen rows,
//! per block `b`, [`GROUP_BLOCK`] bytes (sixteen blocks' worth):
//! - the sixteen rows' f16 scales of block `b` (32 bytes);
//! - eight chunks of 64 bytes: chunk `c` holds codes `4c..4c + 4` of block `b` of each
//!   row, row `r`'s at byte `4 r`.
//!
//! A group takes the `16 * row_bytes` bytes its rows took in the file, so a band of whole
//! groups is repacked in place, and a run of whole groups is itself a repacked band.
//!
//! The arithmetic is `cpu_vnni.rs`'s: 16-bit activations split into a signed high byte
//! and an unsigned low byte (`q = 256 hi + lo`), the codes made unsigned (`c + 128`) for
//! the high bytes' product and `32768 sum hi` taken off afterwards, so each block's
//! integer sum is exactly the file layout's; each is scaled by the weight's and the
//! activation block's scales. Only the order in which a row's blocks are added differs
//! (block by block, by an FMA, rather than by lanes and a tree), so the products are as
//! exact, not the same bits. At 8 bits (`ActBits::Int8`) one `vpdpbusd` a chunk does,
//! with `128 sum q` taken off.
//!
//! Where it is used: the CPU backend repacks a Q8_0 band of whole groups when it is
//! uploaded ([`applies`]: AVX-512 VNNI, `VIDLLM_CPU_REPACK` not `0`), decodes with
//! [`matvec`], and unpacks a prefill task's band back into the file's layout
//! ([`unpack`]) for `cpu_gemm`, whose panels it builds from there.

use std::sync::OnceLock;

use vidllm_core::ggml::GgmlType;

use crate::cpu_int::{IntActs, QB};

/// Weight rows side by side in a group.
pub const ROWS: usize = 16;
/// Bytes of one block of each of a group's rows: sixteen f16 scales, then the codes.
pub const GROUP_BLOCK: usize = ROWS * 34;
/// Codes of a row per chunk (one `vpdpbusd` lane).
const PER_LANE: usize = 4;

/// Whether this processor runs the repacked kernel.
pub fn available() -> bool {
    crate::cpu_vnni::available()
}

/// Whether the CPU keeps a band of `n` rows of `k` values of type `ty` repacked (and so
/// must read it so): Q8_0, whole groups of sixteen rows, where [`available`] and
/// `VIDLLM_CPU_REPACK` is not `0`. The same answer for the same band every time in a
/// process: the upload and the products agree on the layout.
pub fn applies(ty: GgmlType, n: usize, k: usize) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| available() && std::env::var("VIDLLM_CPU_REPACK").map_or(true, |v| v != "0"));
    on && ty == GgmlType::Q8_0 && n > 0 && n.is_multiple_of(ROWS) && k.is_multiple_of(QB)
}

/// Repacks `band` (whole groups of sixteen Q8_0 rows of `nb` blocks, the file's layout)
/// in place, a group at a time through a group-sized buffer.
pub fn repack(band: &mut [u8], nb: usize) {
    let group = nb * GROUP_BLOCK;
    assert!(band.len().is_multiple_of(group), "cpu_repack: not whole groups of {ROWS} rows");
    let mut file = vec![0u8; group];
    for g in band.chunks_exact_mut(group) {
        file.copy_from_slice(g);
        let row_bytes = nb * 34;
        for b in 0..nb {
            let out = &mut g[b * GROUP_BLOCK..][..GROUP_BLOCK];
            for r in 0..ROWS {
                let blk = &file[r * row_bytes + b * 34..][..34];
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                for c in 0..QB / PER_LANE {
                    out[2 * ROWS + c * ROWS * PER_LANE + r * PER_LANE..][..PER_LANE].copy_from_slice(&blk[2 + c * PER_LANE..][..PER_LANE]);
                }
            }
        }
    }
}

/// The file's layout of a repacked band (whole groups of `nb` blocks a row), into `out`
/// (as long as `band`). Each prefill task unpacks its band: on AVX-512 by transposes in
/// registers (the byte copies below ran at 3.5 GB/s, a few percent of a prefill).
pub fn unpack(band: &[u8], nb: usize, out: &mut [u8]) {
    let group = nb * GROUP_BLOCK;
    assert!(band.len().is_multiple_of(group) && out.len() == band.len(), "cpu_repack: not whole groups of {ROWS} rows");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_gemv::available() {
        // SAFETY: AVX-512 F and BW are here; the lengths were checked.
        return unsafe { x86::unpack(band, nb, out) };
    }
    let row_bytes = nb * 34;
    for (g, o) in band.chunks_exact(group).zip(out.chunks_exact_mut(group)) {
        for b in 0..nb {
            let packed = &g[b * GROUP_BLOCK..][..GROUP_BLOCK];
            for r in 0..ROWS {
                let blk = &mut o[r * row_bytes + b * 34..][..34];
                blk[..2].copy_from_slice(&packed[2 * r..2 * r + 2]);
                for c in 0..QB / PER_LANE {
                    blk[2 + c * PER_LANE..][..PER_LANE]
                        .copy_from_slice(&packed[2 * ROWS + c * ROWS * PER_LANE + r * PER_LANE..][..PER_LANE]);
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
    /// Per block: `32768 sum hi` (16-bit), `128 sum q` (8-bit).
    correction: Vec<i32>,
    /// Per block: the activations' scale.
    d: Vec<f32>,
}

impl LaneRow {
    /// Row `row` of `acts`.
    pub(crate) fn new(acts: &IntActs, row: usize) -> Self {
        let (k, nb) = (acts.k, acts.k / QB);
        let d = acts.d[row * nb..][..nb].to_vec();
        if let Some(bytes) = &acts.bytes {
            let q = &bytes.qs[row * k..][..k];
            let correction = q.chunks_exact(QB).map(|b| 128 * b.iter().map(|&v| v as i32).sum::<i32>()).collect();
            return Self { hi: q.to_vec(), lo: Vec::new(), correction, d };
        }
        let q = &acts.qs[row * k..][..k];
        let hi: Vec<i8> = q.iter().map(|&v| (v >> 8) as i8).collect();
        let lo = q.iter().map(|&v| v as u8).collect();
        let correction = hi.chunks_exact(QB).map(|b| 32768 * b.iter().map(|&v| v as i32).sum::<i32>()).collect();
        Self { hi, lo, correction, d }
    }

    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn eight(&self) -> bool {
        self.lo.is_empty()
    }
}

/// `y = W x` for `m` rows of activations (1 to `cpu_gemv::MAX_ROWS`) and `W` repacked
/// (`n` rows of `acts.k`), groups of rows split over the thread pool (on hot workers). `y`
/// is `[m, n]`; each row's values are what that row alone gives.
///
/// # Panics
/// Where the processor lacks the kernel ([`available`]), or the shapes do not agree.
pub fn matvec(w: &[u8], n: usize, acts: &IntActs) -> Vec<f32> {
    assert!(available(), "cpu_repack::matvec: no AVX-512 VNNI on this processor");
    let (m, nb) = (acts.rows(), acts.k / QB);
    assert!((1..=crate::cpu_gemv::MAX_ROWS).contains(&m), "cpu_repack::matvec: 1 to {} rows (got {m})", crate::cpu_gemv::MAX_ROWS);
    assert!(n.is_multiple_of(ROWS) && acts.k.is_multiple_of(QB) && w.len() >= n * nb * 34, "cpu_repack::matvec: not n rows of k");
    let rows: Vec<LaneRow> = (0..m).map(|i| LaneRow::new(acts, i)).collect();
    // Weight-row major, `[n, m]`: each task's rows are one contiguous run.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = crate::cpu::rows_per_task(n).next_multiple_of(ROWS);
    crate::cpu_hot::for_each_chunk_mut(&mut yt, rows_per_task * m, |task, out| {
        let band = &w[task * rows_per_task * nb * 34..][..out.len() / m * nb * 34];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were checked; the band is whole groups of `nb` blocks, and
        // `out` holds `m` values for each of its rows.
        unsafe {
            x86::rows_dot(band, nb, &rows, out)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (band, &rows);
    });
    crate::cpu::weight_row_major_to_y(yt, m, n)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP_BLOCK, LaneRow, PER_LANE, ROWS};
    use crate::cpu_int::QB;

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
        let m = rows.len();
        for (group, out) in band.chunks_exact(nb * GROUP_BLOCK).zip(out.chunks_exact_mut(ROWS * m)) {
            for (i, row) in rows.iter().enumerate() {
                // SAFETY: as ours.
                let y = unsafe {
                    if row.eight() { group_dot::<true>(group, nb, row, i == 0) } else { group_dot::<false>(group, nb, row, i == 0) }
                };
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
    pub(super) unsafe fn unpack(band: &[u8], nb: usize, out: &mut [u8]) {
        let row_bytes = nb * 34;
        for (g, o) in band.chunks_exact(nb * GROUP_BLOCK).zip(out.chunks_exact_mut(nb * GROUP_BLOCK)) {
            for b in 0..nb {
                let packed = &g[b * GROUP_BLOCK..][..GROUP_BLOCK];
                // SAFETY: eight chunks of 64 bytes after the scales.
                let c: [__m512i; 8] =
                    std::array::from_fn(|c| unsafe { _mm512_loadu_si512(packed[2 * ROWS + 64 * c..].as_ptr() as *const __m512i) });
                // Within each quarter q (rows 4q..4q + 4): pairs of chunks interleaved.
                let lo: [__m512i; 4] = std::array::from_fn(|p| _mm512_unpacklo_epi32(c[2 * p], c[2 * p + 1]));
                let hi: [__m512i; 4] = std::array::from_fn(|p| _mm512_unpackhi_epi32(c[2 * p], c[2 * p + 1]));
                // words[j][h]: quarter q holds chunks 4h..4h + 4 of row 4q + j.
                let words: [[__m512i; 2]; 4] = [
                    [_mm512_unpacklo_epi64(lo[0], lo[1]), _mm512_unpacklo_epi64(lo[2], lo[3])],
                    [_mm512_unpackhi_epi64(lo[0], lo[1]), _mm512_unpackhi_epi64(lo[2], lo[3])],
                    [_mm512_unpacklo_epi64(hi[0], hi[1]), _mm512_unpacklo_epi64(hi[2], hi[3])],
                    [_mm512_unpackhi_epi64(hi[0], hi[1]), _mm512_unpackhi_epi64(hi[2], hi[3])],
                ];
                let quarter = |v: __m512i, q: usize| match q {
                    0 => _mm512_castsi512_si128(v),
                    1 => _mm512_extracti32x4_epi32::<1>(v),
                    2 => _mm512_extracti32x4_epi32::<2>(v),
                    _ => _mm512_extracti32x4_epi32::<3>(v),
                };
                for r in 0..ROWS {
                    let blk = &mut o[r * row_bytes + b * 34..][..34];
                    blk[..2].copy_from_slice(&packed[2 * r..2 * r + 2]);
                    let [first, second] = words[r % 4];
                    // SAFETY: 32 bytes after the scale.
                    unsafe {
                        _mm_storeu_si128(blk[2..].as_mut_ptr() as *mut __m128i, quarter(first, r / 4));
                        _mm_storeu_si128(blk[18..].as_mut_ptr() as *mut __m128i, quarter(second, r / 4));
                    }
                }
            }
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
            let blk = group[b * GROUP_BLOCK..].as_ptr();
            if fetch {
                for line in (0..GROUP_BLOCK).step_by(64) {
                    // A prefetch does not fault, wherever it points.
                    _mm_prefetch::<_MM_HINT_T1>(blk.wrapping_add(PREFETCH + line) as *const i8);
                }
            }
            // SAFETY (all reads): the group holds `GROUP_BLOCK` bytes from `blk`, and the
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
            let sum = if EIGHT { hi } else { _mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo) };
            let sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(row.correction[b]));
            let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk as *const __m256i) });
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, _mm512_set1_ps(row.d[b])), acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check;
    use crate::cpu_int::ActBits;

    #[test]
    fn unpack_undoes_repack() {
        for nb in [1, 2, 18] {
            let w = check::weight(GgmlType::Q8_0, 2 * ROWS, nb * QB, 3);
            let mut packed = w.clone();
            repack(&mut packed, nb);
            assert_ne!(packed, w);
            let mut back = vec![0u8; w.len()];
            unpack(&packed, nb, &mut back);
            assert_eq!(back, w, "nb={nb}");
        }
    }

    /// Rows of 1, 3, 18 and 48 blocks, 1 to 16 rows of activations at 16 and 8 bits:
    /// each value is the f64 product's to f32 rounding, and equal to what the file
    /// layout's VNNI kernel gives within the same bound.
    #[test]
    fn matvec_matches_f64() {
        if !available() {
            eprintln!("cpu_repack: no AVX-512 VNNI here, nothing to check");
            return;
        }
        for nb in [1, 3, 18, 48] {
            let (n, k) = (3 * ROWS, nb * QB);
            let w = check::weight(GgmlType::Q8_0, n, k, 5);
            let mut packed = w.clone();
            repack(&mut packed, nb);
            for (m, bits) in [1, 3, crate::cpu_gemv::MAX_ROWS].into_iter().flat_map(|m| [(m, ActBits::Int16), (m, ActBits::Int8)]) {
                let acts = IntActs::quantize_to(&check::values(m * k, 13), k, bits);
                let want = check::reference(&acts.dequantize(), &vidllm_core::ggml::dequantize(GgmlType::Q8_0, &w, n * k), m, n, k);
                let got = matvec(&packed, n, &acts);
                let max_abs = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let max_diff = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                assert!(check::within_rounding(max_diff, max_abs, k), "k={k} m={m} {bits:?}: max diff {max_diff:e} (max |y| {max_abs})");
            }
        }
    }

    /// The prefill product reads a repacked matrix (each task's band unpacked) exactly as
    /// it reads the file's layout: several tasks, bands ending at `n`.
    #[test]
    fn gemm_reads_repacked_bands() {
        use crate::cpu_gemm::{Layout, available as gemm, matmul};
        if !available() || !gemm() {
            eprintln!("cpu_repack: no AVX-512 VNNI here, nothing to check");
            return;
        }
        let (m, n, nb) = (133, 7 * ROWS, 18);
        let k = nb * QB;
        let w = check::weight(GgmlType::Q8_0, n, k, 5);
        let mut packed = w.clone();
        repack(&mut packed, nb);
        for bits in [ActBits::Int16, ActBits::Int8] {
            let acts = IntActs::quantize_to(&check::values(m * k, 17), k, bits);
            assert_eq!(
                matmul(GgmlType::Q8_0, &packed, Layout::Repacked, n, &acts),
                matmul(GgmlType::Q8_0, &w, Layout::File, n, &acts),
                "{bits:?}"
            );
        }
    }

    /// Several rows of activations at once give each row exactly its one-row product.
    #[test]
    fn rows_together_equal_rows_alone() {
        if !available() {
            eprintln!("cpu_repack: no AVX-512 VNNI here, nothing to check");
            return;
        }
        let (n, nb) = (2 * ROWS, 18);
        let k = nb * QB;
        let mut w = check::weight(GgmlType::Q8_0, n, k, 5);
        repack(&mut w, nb);
        for bits in [ActBits::Int16, ActBits::Int8] {
            for m in [2, 3, crate::cpu_gemv::MAX_ROWS] {
                let x = check::values(m * k, 11);
                let together = matvec(&w, n, &IntActs::quantize_to(&x, k, bits));
                for (i, row) in x.chunks_exact(k).enumerate() {
                    let alone = matvec(&w, n, &IntActs::quantize_to(row, k, bits));
                    assert_eq!(&together[i * n..(i + 1) * n], &alone[..], "m={m} row {i} {bits:?}");
                }
            }
        }
    }
}
