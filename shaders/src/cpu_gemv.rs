//! The CPU's decode product on AVX-512: one row of quantised weights against one row of
//! activations (`cpu_int.rs` has the arithmetic and the other instruction sets).
//!
//! A chunk of 32 weights is one 512-bit register of i16 codes and `vpmaddwd` with the
//! chunk's 32 activations gives 16 i32 lanes. What costs is the scaling: a scale per
//! chunk (the weight block's times the activations') broadcast and multiplied chunk by
//! chunk takes more instructions than the product itself. So sixteen chunks' products are
//! summed lane-wise in a transposing tree ([`reduce16`], in i32: exact), leaving one i32
//! per chunk in one register, then converted and scaled by a vector of sixteen scales at
//! once:
//!
//! - 32-element types: the codes are built in the register from the block (nibbles, the
//!   fifth bit by mask, the IQ4_NL table by shuffle); Q4_0 and Q5_0 codes are centred
//!   (`c - 8`, `c - 16`) so that their offset vanishes; the sixteen blocks' f16 scales
//!   (and Q4_1 / Q5_1 minima) are gathered and converted as one vector.
//! - K super-blocks: codes and maps from [`IntCodes::codes`], a super-block per step; the
//!   types with a map per 16 split each product into its halves before the tree.
//!
//! `cpu_int::tests` checks every type against the f64 product.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::row_dot;

/// Whether this processor runs these kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use crate::cpu_int::{G, IntActs, IntCodes, QB};
    use vidllm_core::ggml::{BlockIq4Nl, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlType, KVALUES_IQ4NL, QK_K, blocks};

    /// `W_row . x` for one row of activations.
    ///
    /// # Safety
    /// AVX-512 F, BW and VL ([`super::available`]); `wrow` is one row of `acts.k` elements
    /// and `acts` holds one row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn row_dot<B: IntCodes>(wrow: &[u8], acts: &IntActs) -> f32 {
        // SAFETY: as ours.
        unsafe { if B::ELEMS == QB { row_dot_32::<B>(wrow, acts) } else { row_dot_k::<B>(wrow, acts) } }
    }

    /// How far ahead of the block being read to fetch weights (bytes).
    const PREFETCH: usize = 2048;

    /// 32-element blocks, sixteen at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn row_dot_32<B: IntCodes>(wrow: &[u8], acts: &IntActs) -> f32 {
        let blks = blocks::<B>(wrow);
        let mut acc = _mm512_setzero_ps();
        // Byte offsets of sixteen consecutive blocks.
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(std::mem::size_of::<B>() as i32),
        );
        for b0 in (0..blks.len()).step_by(16) {
            let n = (blks.len() - b0).min(16);
            let mask: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
            let mut p = [_mm512_setzero_si512(); 16];
            let mut product = |j: usize| {
                let blk = &blks[b0 + j];
                if j.is_multiple_of(4) {
                    // A prefetch does not fault, wherever it points.
                    _mm_prefetch::<_MM_HINT_T0>((blk as *const B as *const i8).wrapping_add(PREFETCH));
                }
                // SAFETY: block b0 + j's 32 activations lie in the row.
                let x = unsafe { _mm512_loadu_si512(acts.qs.as_ptr().add((b0 + j) * QB) as *const __m512i) };
                p[j] = _mm512_madd_epi16(codes32::<B>(blk), x);
            };
            if n == 16 {
                // A constant count: unrolled, the products stay in registers.
                (0..16).for_each(&mut product);
            } else {
                (0..n).for_each(&mut product);
            }
            let sums = _mm512_cvtepi32_ps(reduce16(p));
            // Every type's block starts with its f16 scale; Q4_1 and Q5_1 follow it with the
            // f16 minimum: 4 bytes of each block gathered.
            // SAFETY: the mask keeps the gather to the row's blocks.
            let dm = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, offsets, blks[b0..].as_ptr() as *const i32) };
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            // SAFETY: the mask keeps the load to the row's blocks.
            let dx = unsafe { _mm512_maskz_loadu_ps(mask, acts.d.as_ptr().add(b0)) };
            acc = _mm512_fmadd_ps(sums, _mm512_mul_ps(d, dx), acc);
            if matches!(B::TYPE, GgmlType::Q4_1 | GgmlType::Q5_1) {
                let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
                // d sum(q) per block: the two halves' sums, added.
                let ds = block_sums(acts, b0, n);
                acc = _mm512_fmadd_ps(m, ds, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `d sum(q)` of blocks `b0..b0 + n` (up to 16), one per lane: the sums per 16, paired.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn block_sums(acts: &IntActs, b0: usize, n: usize) -> __m512 {
        let lanes = 2 * n;
        let m0: __mmask16 = if lanes >= 16 { !0 } else { (1 << lanes) - 1 };
        let m1: __mmask16 = if lanes <= 16 {
            0
        } else if lanes >= 32 {
            !0
        } else {
            (1 << (lanes - 16)) - 1
        };
        // SAFETY: the masks keep the loads to the 2 n sums of the blocks.
        let (a, b) = unsafe {
            (_mm512_maskz_loadu_ps(m0, acts.dsums.as_ptr().add(2 * b0)), _mm512_maskz_loadu_ps(m1, acts.dsums.as_ptr().add(2 * b0 + 16)))
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b))
    }

    /// A 32-element block's codes as 32 i16. Q4_0 and Q5_0 come out centred (their
    /// offset is then zero).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    fn codes32<B: IntCodes>(blk: &B) -> __m512i {
        let bytes = bytemuck::bytes_of(blk);
        // Low nibbles are elements 0-15, high nibbles 16-31.
        let nibbles = |qs: &[u8; 16]| {
            // SAFETY: 16 bytes.
            let q = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15))
        };
        // The fifth bit of element i is bit i of qh.
        let fifth = |c: __m256i, qh: [u8; 4]| _mm256_mask_add_epi8(c, u32::from_le_bytes(qh), c, _mm256_set1_epi8(16));
        match B::TYPE {
            GgmlType::Q4_0 => {
                let b: &BlockQ4_0 = bytemuck::from_bytes(bytes);
                _mm512_cvtepi8_epi16(_mm256_sub_epi8(nibbles(&b.qs), _mm256_set1_epi8(8)))
            }
            GgmlType::Q4_1 => {
                let b: &BlockQ4_1 = bytemuck::from_bytes(bytes);
                _mm512_cvtepu8_epi16(nibbles(&b.qs))
            }
            GgmlType::Q5_0 => {
                let b: &BlockQ5_0 = bytemuck::from_bytes(bytes);
                _mm512_cvtepi8_epi16(_mm256_sub_epi8(fifth(nibbles(&b.qs), b.qh), _mm256_set1_epi8(16)))
            }
            GgmlType::Q5_1 => {
                let b: &BlockQ5_1 = bytemuck::from_bytes(bytes);
                _mm512_cvtepu8_epi16(fifth(nibbles(&b.qs), b.qh))
            }
            GgmlType::Q8_0 => {
                let b: &BlockQ8_0 = bytemuck::from_bytes(bytes);
                // SAFETY: 32 bytes.
                _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(b.qs.as_ptr() as *const __m256i) })
            }
            GgmlType::Iq4Nl => {
                let b: &BlockIq4Nl = bytemuck::from_bytes(bytes);
                // SAFETY: 16 bytes.
                let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
                _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles(&b.qs)))
            }
            other => unreachable!("{} is not a 32-element block type", other.name()),
        }
    }

    /// K super-blocks, one per step: codes and maps from [`IntCodes::codes`], the chunks'
    /// products reduced to one i32 per affine group, scaled as a vector.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn row_dot_k<B: IntCodes>(wrow: &[u8], acts: &IntActs) -> f32 {
        let (mut c, mut a, mut b) = ([0u8; QK_K], [0f32; QK_K / G], [0f32; QK_K / G]);
        let mut acc = _mm512_setzero_ps();
        // Lane l of a group vector is group l; its chunk is l / 2.
        let chunk_of_group = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        // The first lane of each group's pair, for the types that share a map per 32.
        let even_groups = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        for (bi, blk) in blocks::<B>(wrow).iter().enumerate() {
            for line in (0..std::mem::size_of::<B>()).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>((blk as *const B as *const i8).wrapping_add(PREFETCH + line));
            }
            blk.codes(&mut c, &mut a, &mut b);
            let e0 = bi * QK_K;
            let mut p = [_mm512_setzero_si512(); 16];
            for ch in 0..QK_K / QB {
                // SAFETY: the code buffer holds 256 codes; the chunk's activations lie in the row.
                let prod = unsafe {
                    let w = _mm256_loadu_si256(c.as_ptr().add(ch * QB) as *const __m256i);
                    let w = if B::SIGNED { _mm512_cvtepi8_epi16(w) } else { _mm512_cvtepu8_epi16(w) };
                    _mm512_madd_epi16(w, _mm512_loadu_si512(acts.qs.as_ptr().add(e0 + ch * QB) as *const __m512i))
                };
                if B::SHARED32 {
                    p[ch] = prod;
                } else {
                    // Lanes 0-7 are group 2 ch, lanes 8-15 group 2 ch + 1.
                    p[2 * ch] = _mm512_maskz_mov_epi32(0x00ff, prod);
                    p[2 * ch + 1] = _mm512_maskz_mov_epi32(0xff00, prod);
                }
            }
            let sums = _mm512_cvtepi32_ps(reduce16(p));
            // SAFETY: 16 maps; 8 activation scales and 16 sums of this super-block.
            unsafe {
                let maps = _mm512_loadu_ps(a.as_ptr());
                let dx = _mm512_castps256_ps512(_mm256_loadu_ps(acts.d.as_ptr().add(e0 / QB)));
                let scale = if B::SHARED32 {
                    // Lanes 0-7 are the chunks (8-15 hold zero sums).
                    _mm512_mul_ps(_mm512_permutexvar_ps(even_groups, maps), dx)
                } else {
                    _mm512_mul_ps(maps, _mm512_permutexvar_ps(chunk_of_group, dx))
                };
                acc = _mm512_fmadd_ps(sums, scale, acc);
                if B::OFFSET {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(b.as_ptr()), _mm512_loadu_ps(acts.dsums.as_ptr().add(e0 / G)), acc);
                }
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// Lane `j` of the result is the sum of the 16 lanes of `v[j]` (exact in i32: a
    /// transposing tree of unpacks and 128-bit shuffles).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    pub(crate) fn reduce16(v: [__m512i; 16]) -> __m512i {
        // Pairs: within each 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
        let a: [__m512i; 8] = std::array::from_fn(|p| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_epi32(v[2 * p], v[2 * p + 1]))
        });
        // Quads: within each 128-bit block, one partial sum of each of four vectors.
        let b: [__m512i; 4] = std::array::from_fn(|q| {
            _mm512_add_epi32(_mm512_unpacklo_epi64(a[2 * q], a[2 * q + 1]), _mm512_unpackhi_epi64(a[2 * q], a[2 * q + 1]))
        });
        // The four 128-bit blocks of each summed.
        let c01 = _mm512_add_epi32(_mm512_shuffle_i32x4::<0b10_00_10_00>(b[0], b[1]), _mm512_shuffle_i32x4::<0b11_01_11_01>(b[0], b[1]));
        let c23 = _mm512_add_epi32(_mm512_shuffle_i32x4::<0b10_00_10_00>(b[2], b[3]), _mm512_shuffle_i32x4::<0b11_01_11_01>(b[2], b[3]));
        _mm512_add_epi32(_mm512_shuffle_i32x4::<0b10_00_10_00>(c01, c23), _mm512_shuffle_i32x4::<0b11_01_11_01>(c01, c23))
    }
}
