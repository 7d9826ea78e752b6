//! The decode product on AVX-512 VNNI (Zen 4, Ice Lake and later) for the 32-element
//! block types: `cpu_gemv`'s walk over a band of weight rows, with `vpdpbusd` in place of
//! widening the codes and `vpmaddwd`.
//!
//! `vpdpbusd` multiplies unsigned bytes by signed bytes and sums each four products into
//! an i32 lane: 64 products an instruction, on codes as they come out of the block. The
//! activations stay 16-bit (`cpu_int.rs` says why). Each is split as `q = 256 hi + lo`,
//! `lo` its low byte (unsigned) and `hi` the rest (signed, -128..127), so
//!
//! ```text
//! sum c q = 256 sum c hi + sum c lo
//! ```
//!
//! exact in i32: a block's integer sum, and so the product, is `cpu_gemv`'s to the bit
//! (`tests::equals_the_widening_kernel`). Per kind of code:
//!
//! - Unsigned codes (Q4_0, Q4_1, Q5_0, Q5_1; 0..31): `c hi` with the codes as the
//!   unsigned operand, `lo c` with them as the signed one. Q4_0 and Q5_0 are read
//!   uncentred, and their offset comes off the block's sum afterwards: `sum (c - 8) q =
//!   sum c q - 8 sum q`, with `sum q` kept per activation block.
//! - Signed codes (Q8_0, IQ4_NL): `lo c` as above; for `c hi` the codes are made unsigned,
//!   `c + 128`, and `128 sum hi` comes off the block's sum afterwards, `sum hi` kept per
//!   activation block.
//!
//! Two blocks are decoded into one 512-bit register: the nibble types' 16 packed bytes of
//! each side by side, low nibbles then high, so the pair's elements lie as block A 0-15,
//! B 0-15, A 16-31, B 16-31 (four instructions for two blocks); Q8_0's as A then B. The
//! activations of every pair of consecutive blocks are laid out once per product in the
//! same order. Eight pairs' products are reduced to one i32 per block in a tree that
//! knows which lanes are whose, then scaled exactly as `cpu_gemv` scales them.
//!
//! On a 2-core Zen 4 (`cpu_int::tests::decode_row_dot_speed`, one thread, rows of 576,
//! in one run) a Q4_1 block took 1.46 ns against the widening kernel's 2.85 and the AVX2
//! row loop's 2.36; Q8_0 1.63 against 1.54 (its codes are whole bytes already, so
//! `vpdpbusd` saves less than the split costs, and the two kernels are level).
//!
//! With 8-bit activations (`ActBits::Int8`) `hi` is only their sign, and one `vpdpbusd` a
//! pair does, the codes (signed ones plus 128) as its unsigned operand: Q4_1 1.16 ns a
//! block against 1.32, Q8_0 1.33 against 1.56, Q5_0 1.65 against 1.82 (4,096 rows of
//! 1,536, one thread, medians of 31), the same integers as the widening kernel's.
//!
//! The 5-bit types (Q5_0, Q5_1) add 16 to the codes whose fifth bit is set, under a mask
//! made from the blocks' `qh` words in vector registers. On a later 2-core AMD EPYC host
//! (same test, one thread, 4,096 rows of 1,536, 31 passes), Q5_0 went from 1.73 ns a
//! block to 1.08 when the mask stopped being built in a general register (Q4_0 0.86,
//! Q4_1 0.92, the widening kernel's Q5_0 1.75). Q5_0 is most of llama.cpp's Q4_K_M of a
//! model whose rows (576) are not a multiple of 256, the K-quants' block.

use vidllm_core::ggml::GgmlType;

use crate::cpu_gemv::Wrapped;
use crate::cpu_int::{IntActs, QB};

/// Whether this processor runs these kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        crate::cpu_gemv::available() && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `ty` has a kernel here (the 32-element block types of the integer path).
pub fn covers(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Iq4Nl)
}

/// Whether `ty`'s codes are signed bytes (the others are 0..31).
fn signed(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Iq4Nl)
}

/// Whether a pair of `ty`'s blocks lies in halves (nibble types: A 0-15, B 0-15, A 16-31,
/// B 16-31) rather than whole (Q8_0: A, then B).
fn halves(ty: GgmlType) -> bool {
    ty != GgmlType::Q8_0
}

/// Bytes per pair of blocks in [`PairRow::bytes`]: 64 low bytes, then 64 high.
const PAIR: usize = 4 * QB;

/// One row of activations as `vpdpbusd`'s operands, for a walk over a band's blocks as one
/// sequence (see [`Wrapped`], whose scales it carries).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct PairRow {
    /// Per block `f` of the wrapped row (`0..nb + 16`): the low bytes of blocks `f` and
    /// `f + 1` in the pair's order, then their high bytes.
    bytes: Vec<u8>,
    /// Per wrapped block, what comes off its integer sum: `o sum q` for the codes' offset
    /// `o` (Q4_0's 8, Q5_0's 16), `32768 sum hi` for signed codes (`128 sum q` at 8 bits),
    /// else 0.
    correction: Vec<i32>,
    wrapped: Wrapped,
    /// The activations are 8-bit codes ([`crate::cpu_int::ActBits::Int8`]): the low bytes
    /// are the codes themselves (as signed bytes), and one `vpdpbusd` a pair does.
    eight: bool,
}

impl PairRow {
    /// Row `row` of `acts`, for weights of type `ty`.
    pub(crate) fn new(acts: &IntActs, row: usize, ty: GgmlType) -> Self {
        let nb = acts.k / QB;
        // Each block's low and high bytes, in element order.
        let (mut lo, mut hi) = (vec![0u8; nb * QB], vec![0u8; nb * QB]);
        for (i, &v) in acts.qs[row * acts.k..][..acts.k].iter().enumerate() {
            (lo[i], hi[i]) = (v as u8, (v >> 8) as u8);
        }
        // Runs of 16 elements (block, first element) in the pair's order.
        let runs: [(usize, usize); 4] = if halves(ty) { [(0, 0), (1, 0), (0, 16), (1, 16)] } else { [(0, 0), (0, 16), (1, 0), (1, 16)] };
        let mut bytes = vec![0u8; (nb + 16) * PAIR];
        for (f, pair) in bytes.chunks_exact_mut(PAIR).enumerate() {
            let (half_lo, half_hi) = pair.split_at_mut(2 * QB);
            for (r, &(side, e)) in runs.iter().enumerate() {
                let at = (f + side) % nb * QB + e;
                half_lo[16 * r..][..16].copy_from_slice(&lo[at..at + 16]);
                half_hi[16 * r..][..16].copy_from_slice(&hi[at..at + 16]);
            }
        }
        let block = |f: usize| &acts.qs[(row * nb + f) * QB..][..QB];
        let sum = |f: usize, part: fn(i16) -> i32| block(f).iter().map(|&v| part(v)).sum::<i32>();
        let eight = acts.bytes.is_some();
        let per_block: Vec<i32> = (0..nb)
            .map(|f| match ty {
                GgmlType::Q4_0 => 8 * sum(f, |v| v as i32),
                GgmlType::Q5_0 => 16 * sum(f, |v| v as i32),
                _ if signed(ty) && eight => 128 * sum(f, |v| v as i32),
                _ if signed(ty) => 32768 * sum(f, |v| (v >> 8) as i32),
                _ => 0,
            })
            .collect();
        let correction = (0..nb + 16).map(|f| per_block[f % nb]).collect();
        Self { bytes, correction, wrapped: Wrapped::scales(acts, row), eight }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{PAIR, PairRow};
    use crate::cpu_int::IntCodes;
    use vidllm_core::ggml::{BlockIq4Nl, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlType, KVALUES_IQ4NL, blocks};

    /// How far ahead of the block being read to fetch weights (bytes): into L1, but Q8_0's
    /// into L2. On a 2-core Zen 4 (`decode_row_dot_speed`, one thread, 131,072 rows of 576,
    /// from memory), Q8_0 took 2.9 ns a block fetched into L1 and 2.0 into L2; Q4_1 and
    /// Q5_0 were level or slower into L2 (1.50 / 1.66 ns, 2.01 / 2.03), and further ahead
    /// (4 KiB) slower for all three.
    const PREFETCH: usize = 2048;

    /// `out[r * m + i] = W_r . x_i` for the rows of a band (`nb` blocks each) and the `m`
    /// activation rows `rows`.
    ///
    /// # Safety
    /// AVX-512 F, BW, VL and VNNI ([`super::available`]); `B` is one of [`super::covers`];
    /// `band` is `out.len() / m` rows of `nb` blocks, and `rows` were made for `B`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(crate) unsafe fn rows_dot<B: IntCodes>(band: &[u8], nb: usize, rows: &[PairRow], out: &mut [f32]) {
        let m = rows.len();
        let heads = Heads::new(std::mem::size_of::<B>());
        // The band in runs of SUB rows, whose block products stay in L1 until summed.
        let row_bytes = nb * std::mem::size_of::<B>();
        let eight = rows.first().is_some_and(|r| r.eight);
        // A decode step makes about a thousand of these calls: the products go to this
        // thread's buffer, not a fresh one each time (its allocation, zeroing and freeing
        // were 1.2-1.4% of each thread's samples decoding Q8_0). Every value read is
        // written first.
        thread_local! {
            static VALS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        VALS.with_borrow_mut(|vals| {
            if vals.len() < m * SUB * nb {
                vals.resize(m * SUB * nb, 0.0);
            }
            for (band, out) in band.chunks(SUB * row_bytes).zip(out.chunks_mut(SUB * m)) {
                let vals = &mut vals[..m * band.len() / row_bytes * nb];
                // SAFETY: as ours.
                unsafe {
                    if eight {
                        run_dot::<B, true>(band, nb, rows, &heads, vals);
                    } else {
                        run_dot::<B, false>(band, nb, rows, &heads, vals);
                    }
                    crate::cpu_gemv::x86::sum_rows(vals, nb, m, out);
                }
            }
        })
    }

    /// Weight rows summed per run in [`rows_dot`].
    const SUB: usize = 64;

    /// `vals[i * blocks + f]`: block `f` of `band` against activation row `i`, scaled.
    /// `EIGHT`: the rows are 8-bit codes, one `vpdpbusd` a pair with the codes (signed ones
    /// plus 128) as the unsigned operand.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn run_dot<B: IntCodes, const EIGHT: bool>(band: &[u8], nb: usize, rows: &[PairRow], heads: &Heads, vals: &mut [f32]) {
        let blks = blocks::<B>(band);
        let signed = super::signed(B::TYPE);
        let corrected = signed || matches!(B::TYPE, GgmlType::Q4_0 | GgmlType::Q5_0);
        // Byte offsets of sixteen consecutive blocks.
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(std::mem::size_of::<B>() as i32),
        );
        for f0 in (0..blks.len()).step_by(16) {
            let n = (blks.len() - f0).min(16);
            let mask: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
            let a0 = f0 % nb;
            let mut codes = [_mm512_setzero_si512(); 8];
            let mut decode = |p: usize| {
                let a = &blks[f0 + 2 * p];
                if p.is_multiple_of(2) {
                    // A prefetch does not fault, wherever it points.
                    let ahead = (a as *const B as *const i8).wrapping_add(PREFETCH);
                    if B::TYPE == GgmlType::Q8_0 {
                        _mm_prefetch::<_MM_HINT_T1>(ahead);
                    } else {
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                    }
                }
                // A missing second block (the band's last step) is read as the first again:
                // its lanes are never stored.
                codes[p] = pair_codes::<B>(a, blks.get(f0 + 2 * p + 1).filter(|_| 2 * p + 1 < n).unwrap_or(a));
            };
            if n == 16 {
                // A constant count: unrolled, the codes stay in registers.
                (0..8).for_each(&mut decode);
            } else {
                (0..n.div_ceil(2)).for_each(&mut decode);
            }
            // Every type's block starts with its f16 scale; Q4_1 and Q5_1 follow it with the
            // f16 minimum: 4 bytes of each block.
            let dm = if n == 16 {
                // SAFETY: sixteen blocks from `f0` lie in the band.
                unsafe { heads.read(blks[f0..].as_ptr() as *const u8) }
            } else {
                // SAFETY: the mask keeps the gather to the band's blocks.
                unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, offsets, blks[f0..].as_ptr() as *const i32) }
            };
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            let min = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
            for (i, row) in rows.iter().enumerate() {
                let mut p = [_mm512_setzero_si512(); 8];
                let mut product = |j: usize| {
                    // SAFETY: the row holds a pair at every block up to 16 past the row's.
                    let (lo, hi) = unsafe {
                        let at = row.bytes.as_ptr().add((a0 + 2 * j) * PAIR);
                        (_mm512_loadu_si512(at as *const __m512i), _mm512_loadu_si512(at.add(PAIR / 2) as *const __m512i))
                    };
                    let c = codes[j];
                    // Signed codes as unsigned, `c + 128`, against `hi` (or the 8-bit codes).
                    let cu = if signed { _mm512_xor_si512(c, _mm512_set1_epi8(-128)) } else { c };
                    if EIGHT {
                        p[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cu, lo);
                        return;
                    }
                    let high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), cu, hi);
                    p[j] = _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(high), lo, c);
                };
                if n == 16 {
                    (0..8).for_each(&mut product);
                } else {
                    (0..n.div_ceil(2)).for_each(&mut product);
                }
                let mut sums = if super::halves(B::TYPE) { reduce_pairs::<true>(p) } else { reduce_pairs::<false>(p) };
                // SAFETY (both blocks): the wrapped arrays hold 16 past any block of the row;
                // the mask keeps the store to this step's blocks.
                unsafe {
                    if corrected {
                        sums = _mm512_sub_epi32(sums, _mm512_loadu_si512(row.correction.as_ptr().add(a0) as *const __m512i));
                    }
                    let wr = &row.wrapped;
                    let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(d, _mm512_loadu_ps(wr.d.as_ptr().add(a0))));
                    if matches!(B::TYPE, GgmlType::Q4_1 | GgmlType::Q5_1) {
                        v = _mm512_fmadd_ps(min, _mm512_loadu_ps(wr.dsum.as_ptr().add(a0)), v);
                    }
                    _mm512_mask_storeu_ps(vals.as_mut_ptr().add(i * blks.len() + f0), mask, v);
                }
            }
        }
    }

    /// The first 4 bytes of sixteen consecutive blocks (an f16 scale, and a minimum or
    /// codes) as one i32 each, picked out of the blocks loaded whole by word permutes: a
    /// 512-bit gather costs a Zen 4 about as much as decoding four pairs of blocks.
    struct Heads {
        /// Bytes of sixteen blocks.
        span: usize,
        /// The index of each output word within its window of 64 words (the same for
        /// every window).
        idx: __m512i,
        /// Per window, which output words it holds; the first `count` are used (sixteen
        /// blocks of the largest type, Q8_0's 34 bytes, span five).
        masks: [__mmask32; 5],
        count: usize,
    }

    impl Heads {
        /// For blocks of `size` bytes (even: every 32-element type's is).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn new(size: usize) -> Self {
            let span = 16 * size;
            // Output word j is word `size / 2 * (j / 2) + j % 2` of the blocks.
            let src: [usize; 32] = std::array::from_fn(|j| size / 2 * (j / 2) + j % 2);
            let count = span.div_ceil(128);
            assert!(count <= 5, "Heads: blocks of {size} bytes");
            let idx: [i16; 32] = std::array::from_fn(|j| (src[j] % 64) as i16);
            // SAFETY: 32 i16.
            let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) };
            let masks = std::array::from_fn(|c| (0..32).filter(|&j| src[j] / 64 == c).fold(0u32, |m, j| m | 1 << j));
            Self { span, idx, masks, count }
        }

        /// # Safety
        /// `at` points at sixteen whole blocks of this size.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn read(&self, at: *const u8) -> __m512i {
            let mut out = _mm512_setzero_si512();
            for (c, &mask) in self.masks[..self.count].iter().enumerate() {
                // The window's two 64-byte halves, masked to the sixteen blocks.
                let half = |h: usize| {
                    let start = 128 * c + 64 * h;
                    let len = self.span.saturating_sub(start).min(64);
                    let m: __mmask64 = if len == 64 { !0 } else { (1u64 << len) - 1 };
                    // SAFETY: the mask keeps the load to the blocks.
                    unsafe { _mm512_maskz_loadu_epi8(m, at.add(start.min(self.span)) as *const i8) }
                };
                out = _mm512_mask_mov_epi16(out, mask, _mm512_permutex2var_epi16(half(0), self.idx, half(1)));
            }
            out
        }
    }

    /// Bit `FIFTH[e]` of `qa | qb << 32` is the fifth bit of a pair's element `e` (A 0-15,
    /// B 0-15, A 16-31, B 16-31): the byte that holds it, and the bit within that byte.
    const FIFTH: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut e = 0;
        while e < 64 {
            let (block, i) = if e < 16 {
                (0, e)
            } else if e < 32 {
                (1, e - 16)
            } else if e < 48 {
                (0, e - 16)
            } else {
                (1, e - 32)
            };
            t[e] = (32 * block + i) as u8;
            e += 1;
        }
        t
    };
    static FIFTH_BYTE: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut e = 0;
        while e < 64 {
            t[e] = FIFTH[e] / 8;
            e += 1;
        }
        t
    };
    static FIFTH_BIT: [u8; 64] = {
        let mut t = [0u8; 64];
        let mut e = 0;
        while e < 64 {
            t[e] = 1 << (FIFTH[e] % 8);
            e += 1;
        }
        t
    };

    /// Two blocks' codes as 64 bytes, in the pair's order (see the module).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn pair_codes<B: IntCodes>(a: &B, b: &B) -> __m512i {
        let (a, b) = (bytemuck::bytes_of(a), bytemuck::bytes_of(b));
        // The 16 packed bytes of each, side by side; low nibbles, then high.
        let nibbles = |qa: &[u8; 16], qb: &[u8; 16]| {
            // SAFETY: 16 bytes each.
            let y = unsafe {
                _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(qa.as_ptr() as *const __m128i)),
                    _mm_loadu_si128(qb.as_ptr() as *const __m128i),
                )
            };
            _mm512_and_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(y), _mm256_srli_epi16::<4>(y)), _mm512_set1_epi8(15))
        };
        // The fifth bit of each element: bit i of a block's qh is its element i. Both qh
        // words go into every 64-bit lane (`qa` low, `qb` high); each element's byte of
        // them is picked by a shuffle and its bit tested, so the mask is made in vector
        // registers. (Built as a 64-bit integer and moved to a mask register, it cost as
        // much as the rest of the pair's work.)
        let fifth = |c: __m512i, qa: [u8; 4], qb: [u8; 4]| {
            let both = _mm512_mask_set1_epi32(_mm512_set1_epi32(i32::from_le_bytes(qa)), 0xaaaa, i32::from_le_bytes(qb));
            // SAFETY: 64 bytes each.
            let (at, bit) = unsafe {
                (_mm512_loadu_si512(FIFTH_BYTE.as_ptr() as *const __m512i), _mm512_loadu_si512(FIFTH_BIT.as_ptr() as *const __m512i))
            };
            let set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(both, at), bit);
            _mm512_mask_add_epi8(c, set, c, _mm512_set1_epi8(16))
        };
        match B::TYPE {
            GgmlType::Q4_0 => {
                let (a, b): (&BlockQ4_0, &BlockQ4_0) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                nibbles(&a.qs, &b.qs)
            }
            GgmlType::Q4_1 => {
                let (a, b): (&BlockQ4_1, &BlockQ4_1) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                nibbles(&a.qs, &b.qs)
            }
            GgmlType::Q5_0 => {
                let (a, b): (&BlockQ5_0, &BlockQ5_0) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                fifth(nibbles(&a.qs, &b.qs), a.qh, b.qh)
            }
            GgmlType::Q5_1 => {
                let (a, b): (&BlockQ5_1, &BlockQ5_1) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                fifth(nibbles(&a.qs, &b.qs), a.qh, b.qh)
            }
            GgmlType::Q8_0 => {
                let (a, b): (&BlockQ8_0, &BlockQ8_0) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                // SAFETY: 32 bytes each.
                unsafe {
                    _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)),
                        _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i),
                    )
                }
            }
            GgmlType::Iq4Nl => {
                let (a, b): (&BlockIq4Nl, &BlockIq4Nl) = (bytemuck::from_bytes(a), bytemuck::from_bytes(b));
                // SAFETY: 16 bytes.
                let table = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) });
                _mm512_shuffle_epi8(table, nibbles(&a.qs, &b.qs))
            }
            other => unreachable!("{} has no VNNI kernel", other.name()),
        }
    }

    /// Lane `j` of the result is block `j`'s sum: eight pairs' `vpdpbusd` lanes, block A's
    /// in the 128-bit quarters 0 and 2 of its pair's vector when `HALVES`, else 0 and 1.
    /// A transposing tree of unpacks and 128-bit shuffles, exact in i32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn reduce_pairs<const HALVES: bool>(v: [__m512i; 8]) -> __m512i {
        // Within each quarter: [x0 + x2, y0 + y2, x1 + x3, y1 + y3] of two vectors x, y.
        let a: [__m512i; 4] = std::array::from_fn(|p| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_epi32(v[2 * p], v[2 * p + 1]))
        });
        // Within each quarter, lane t: the quarter's sum of vector 4 q + t.
        let b: [__m512i; 2] = std::array::from_fn(|q| {
            _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * q], a[2 * q + 1]), _mm512_unpackhi_epi64(a[2 * q], a[2 * q + 1]))
        });
        // Each block's two quarters summed: lanes 0-3 blocks 0, 2, 4, 6; 4-7 blocks 1, 3, 5,
        // 7; 8-11 blocks 8, 10, 12, 14; 12-15 blocks 9, 11, 13, 15.
        let c = if HALVES {
            _mm512_add_epi32(_mm512_shuffle_i32x4::<0b01_00_01_00>(b[0], b[1]), _mm512_shuffle_i32x4::<0b11_10_11_10>(b[0], b[1]))
        } else {
            _mm512_add_epi32(_mm512_shuffle_i32x4::<0b10_00_10_00>(b[0], b[1]), _mm512_shuffle_i32x4::<0b11_01_11_01>(b[0], b[1]))
        };
        _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15), c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check;
    use crate::cpu_int::ActBits;

    /// Every covered type, 1 to 16 rows of activations at 16 and 8 bits, rows of 2, 3 (a
    /// pair across two rows), 18 and 48 blocks, 37 weight rows (bands ending mid-step, an
    /// odd last step): the product equals the widening AVX-512 kernel's to the bit.
    #[test]
    fn equals_the_widening_kernel() {
        if !available() {
            eprintln!("cpu_vnni: no AVX-512 VNNI here, nothing to check");
            return;
        }
        for ty in GgmlType::ALL.into_iter().filter(|t| covers(*t)) {
            for blocks in [2, 3, 18, 48] {
                let (n, k) = (37, blocks * QB);
                let w = check::weight(ty, n, k, 5);
                for (m, bits) in [1, 3, crate::cpu_gemv::MAX_ROWS].into_iter().flat_map(|m| [(m, ActBits::Int16), (m, ActBits::Int8)]) {
                    let acts = IntActs::quantize_to(&check::values(m * k, 13), k, bits);
                    let vnni = crate::cpu_gemv::matvec_with(ty, &w, n, &acts, crate::cpu_gemv::Kernel::Vnni);
                    let widening = crate::cpu_gemv::matvec_with(ty, &w, n, &acts, crate::cpu_gemv::Kernel::Widening);
                    let same = vnni.iter().zip(&widening).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{} k={k} m={m} {bits:?}: {:?} vs {:?}", ty.name(), &vnni[..4], &widening[..4]);
                }
            }
        }
    }
}
