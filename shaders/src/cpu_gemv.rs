//! The CPU's decode product on AVX-512: rows of quantised weights against one row of
//! activations, or a few (`cpu_int.rs` has the arithmetic and the other instruction sets).
//!
//! A few rows is a batched decode step (a server decoding several sequences): each weight
//! block is read from memory and turned into codes once, then met by every activation
//! row, so the step costs about one pass over the weights, not one per sequence. Each
//! row's arithmetic is exactly the one-row product's, so a sequence's logits do not
//! depend on what it was batched with.
//!
//! A chunk of 32 weights is one 512-bit register of i16 codes and `vpmaddwd` with the
//! chunk's 32 activations gives 16 i32 lanes. What costs is the scaling: a scale per
//! chunk (the weight block's times the activations') broadcast and multiplied chunk by
//! chunk takes more instructions than the product itself. So sixteen chunks' products are
//! summed lane-wise in a transposing tree ([`reduce16`], in i32: exact), leaving one i32
//! per chunk in one register, then converted and scaled by a vector of sixteen scales at
//! once:
//!
//! - 32-element types: a band of weight rows is walked as one sequence of blocks, sixteen
//!   at a time whatever row they belong to, so that a row whose length is not a multiple
//!   of 512 (SmolLM2's 576) leaves no ragged group per row: per row, a ragged group cost
//!   a whole tree, gather and reduction, and made such rows slower than on AVX2. Each
//!   block's scaled product is stored, and each row sums its own. The codes are built in
//!   the register from the block (nibbles, the fifth bit by mask, the IQ4_NL table by
//!   shuffle); Q4_0 and Q5_0 codes are centred (`c - 8`, `c - 16`) so that their offset
//!   vanishes; the sixteen blocks' f16 scales (and Q4_1 / Q5_1 minima) are gathered and
//!   converted as one vector.
//! - K super-blocks: codes and maps from [`IntCodes::codes`], a super-block per step; the
//!   types with a map per 16 split each product into its halves before the tree.
//!
//! `tests::matvec_matches_f64` checks every type against the f64 product.

use vidllm_core::ggml::GgmlType;

use crate::cpu_int::{IntActs, QB};
use crate::cpu_vnni::PairRow;

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

/// Most activation rows one product takes (a batched decode step; longer inputs are
/// prefills, for `cpu_gemm`).
pub const MAX_ROWS: usize = 16;

/// `y = W x` for `m` rows of activations `acts` (1 to [`MAX_ROWS`]) and `W` (`[n, acts.k]`,
/// blocks of `ty`), bands of weight rows split over the thread pool (on hot workers,
/// `cpu_hot.rs`), on the quickest kernel this processor has for `ty`. `y` is `[m, n]`.
///
/// # Panics
/// Where the processor lacks the kernels ([`available`]), `acts` has no row or more than
/// [`MAX_ROWS`], or `w` is not `n` rows of `acts.k`.
pub fn matvec(ty: GgmlType, w: &[u8], n: usize, acts: &IntActs) -> Vec<f32> {
    let kernel = if crate::cpu_vnni::covers(ty) && crate::cpu_vnni::available() { Kernel::Vnni } else { Kernel::Widening };
    matvec_with(ty, w, n, acts, kernel)
}

/// The AVX-512 decode kernels. Both give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Codes widened to i16 and `vpmaddwd` (this file): every integer type.
    Widening,
    /// `vpdpbusd` on the codes as bytes (`cpu_vnni.rs`): the 32-element types, AVX-512 VNNI.
    Vnni,
}

/// [`matvec`] on the given kernel.
///
/// # Panics
/// As [`matvec`]; also where `kernel` is [`Kernel::Vnni`] and the processor or `ty` has
/// none ([`crate::cpu_vnni::available`], [`crate::cpu_vnni::covers`]).
pub fn matvec_with(ty: GgmlType, w: &[u8], n: usize, acts: &IntActs, kernel: Kernel) -> Vec<f32> {
    assert!(available(), "cpu_gemv::matvec: no AVX-512 on this processor");
    let vnni = kernel == Kernel::Vnni;
    assert!(!vnni || (crate::cpu_vnni::covers(ty) && crate::cpu_vnni::available()), "cpu_gemv::matvec: no VNNI kernel for {}", ty.name());
    let m = acts.rows();
    let row_bytes = acts.k / ty.block_elems() * ty.block_bytes();
    // The words holding W may end in padding.
    assert!((1..=MAX_ROWS).contains(&m), "cpu_gemv::matvec: 1 to {MAX_ROWS} rows of activations (got {m})");
    assert!(acts.k.is_multiple_of(ty.block_elems()) && w.len() >= n * row_bytes, "cpu_gemv::matvec: not n rows of k");
    let (wrapped, pairs): (Vec<Wrapped>, Vec<PairRow>) = match (vnni, ty.block_elems() == QB) {
        (true, _) => (Vec::new(), (0..m).map(|i| PairRow::new(acts, i, ty)).collect()),
        (false, true) => ((0..m).map(|i| Wrapped::new(acts, i)).collect(), Vec::new()),
        (false, false) => (Vec::new(), Vec::new()),
    };
    // Weight-row major, `[n, m]`: each task's rows are one contiguous run.
    let mut yt = vec![0f32; n * m];
    let rows_per_task = crate::cpu::rows_per_task(n);
    crate::cpu_hot::for_each_chunk_mut(&mut yt, rows_per_task * m, |task, out| {
        let band = &w[task * rows_per_task * row_bytes..][..out.len() / m * row_bytes];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were checked; the band is `out.len() / m` rows of `acts.k`,
        // and the VNNI rows were made for `ty`.
        vidllm_core::with_block!(ty, B => unsafe {
            if vnni {
                crate::cpu_vnni::x86::rows_dot::<B>(band, acts.k / QB, &pairs, out)
            } else {
                x86::rows_dot::<B>(band, acts, &wrapped, out)
            }
        }, else unreachable!("float types take the f32 path"));
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (band, &wrapped, &pairs);
    });
    crate::cpu::weight_row_major_to_y(yt, m, n)
}

/// One row of activations laid out for the walk over a band's blocks as one sequence:
/// weight block `f` of the band (row `f / nb`, block `f % nb`) meets activation block
/// `f % nb`. Each array runs on past the row by sixteen blocks, wrapping around it, so a
/// step starting at block `f` reads its sixteen blocks' operands from `f % nb` on in one go.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Wrapped {
    /// The 16-bit activations, `(nb + 16) * 32`.
    qs: Vec<i16>,
    /// The blocks' scales, `nb + 16`.
    pub(crate) d: Vec<f32>,
    /// Per block, its scale times the sum of its codes (for the types with a minimum).
    pub(crate) dsum: Vec<f32>,
}

impl Wrapped {
    /// Row `row` of `acts`.
    fn new(acts: &IntActs, row: usize) -> Self {
        let nb = acts.k / QB;
        let block = |f: usize| row * nb + f % nb;
        Self { qs: (0..nb + 16).flat_map(|f| acts.qs[block(f) * QB..][..QB].iter().copied()).collect(), ..Self::scales(acts, row) }
    }

    /// Row `row` of `acts`'s scales alone (`qs` left empty), for a kernel that lays out
    /// the activations its own way.
    pub(crate) fn scales(acts: &IntActs, row: usize) -> Self {
        let nb = acts.k / QB;
        let block = |f: usize| row * nb + f % nb;
        Self {
            qs: Vec::new(),
            d: (0..nb + 16).map(|f| acts.d[block(f)]).collect(),
            dsum: (0..nb + 16).map(|f| acts.dsums[2 * block(f)] + acts.dsums[2 * block(f) + 1]).collect(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::Wrapped;
    use crate::cpu_int::{G, IntActs, IntCodes, QB};
    use vidllm_core::ggml::{BlockIq4Nl, BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, GgmlType, KVALUES_IQ4NL, QK_K, blocks};

    /// `out[r * m + i] = W_r . x_i` for the rows of a band and the `m` rows of `acts`.
    ///
    /// # Safety
    /// AVX-512 F, BW and VL ([`super::available`]); `band` is `out.len() / m` rows of
    /// `acts.k` elements, and `wrapped` holds each row's layout when `B` has 32 elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn rows_dot<B: IntCodes>(band: &[u8], acts: &IntActs, wrapped: &[Wrapped], out: &mut [f32]) {
        let m = acts.rows();
        if B::ELEMS == QB {
            // SAFETY: as ours.
            return unsafe { rows_dot_32::<B>(band, acts.k / QB, wrapped, out) };
        }
        let row_bytes = band.len() / (out.len() / m).max(1);
        for (wrow, o) in band.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
            for (i, o) in o.iter_mut().enumerate() {
                // SAFETY: as ours.
                *o = unsafe { row_dot_k::<B>(wrow, acts, i) };
            }
        }
    }

    /// How far ahead of the block being read to fetch weights (bytes).
    const PREFETCH: usize = 2048;

    /// 32-element blocks of a band, sixteen at a time across row boundaries: each block's
    /// codes are built once, then for each activation row its `d_w d_x sum(c q)` (plus
    /// `m_w d_x sum(q)`) is stored, and summed per weight row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows_dot_32<B: IntCodes>(band: &[u8], nb: usize, wrapped: &[Wrapped], out: &mut [f32]) {
        let m = wrapped.len();
        let blks = blocks::<B>(band);
        // `[m, blocks]`: activation row i's scaled product with each block.
        let mut vals = vec![0f32; m * blks.len()];
        // Byte offsets of sixteen consecutive blocks.
        let offsets = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(std::mem::size_of::<B>() as i32),
        );
        for f0 in (0..blks.len()).step_by(16) {
            let n = (blks.len() - f0).min(16);
            let mask: __mmask16 = if n == 16 { !0 } else { (1 << n) - 1 };
            // Where this step's blocks start in the wrapped rows.
            let a0 = f0 % nb;
            let mut codes = [_mm512_setzero_si512(); 16];
            let mut decode = |j: usize| {
                let blk = &blks[f0 + j];
                if j.is_multiple_of(4) {
                    // A prefetch does not fault, wherever it points.
                    _mm_prefetch::<_MM_HINT_T0>((blk as *const B as *const i8).wrapping_add(PREFETCH));
                }
                codes[j] = codes32::<B>(blk);
            };
            if n == 16 {
                // A constant count: unrolled, the codes stay in registers.
                (0..16).for_each(&mut decode);
            } else {
                (0..n).for_each(&mut decode);
            }
            // Every type's block starts with its f16 scale; Q4_1 and Q5_1 follow it with the
            // f16 minimum: 4 bytes of each block gathered.
            // SAFETY: the mask keeps the gather to the band's blocks.
            let dm = unsafe { _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, offsets, blks[f0..].as_ptr() as *const i32) };
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
            let min = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
            for (i, wr) in wrapped.iter().enumerate() {
                let mut p = [_mm512_setzero_si512(); 16];
                let mut product = |j: usize| {
                    // SAFETY: the wrapped row holds 16 blocks past any block of the row.
                    let x = unsafe { _mm512_loadu_si512(wr.qs.as_ptr().add((a0 + j) * QB) as *const __m512i) };
                    p[j] = _mm512_madd_epi16(codes[j], x);
                };
                if n == 16 {
                    (0..16).for_each(&mut product);
                } else {
                    (0..n).for_each(&mut product);
                }
                let sums = _mm512_cvtepi32_ps(reduce16(p));
                // SAFETY: the wrapped arrays hold 16 past any block of the row; the mask
                // keeps the store to this step's blocks.
                unsafe {
                    let mut v = _mm512_mul_ps(sums, _mm512_mul_ps(d, _mm512_loadu_ps(wr.d.as_ptr().add(a0))));
                    if matches!(B::TYPE, GgmlType::Q4_1 | GgmlType::Q5_1) {
                        v = _mm512_fmadd_ps(min, _mm512_loadu_ps(wr.dsum.as_ptr().add(a0)), v);
                    }
                    _mm512_mask_storeu_ps(vals.as_mut_ptr().add(i * blks.len() + f0), mask, v);
                }
            }
        }
        // SAFETY: the features are ours.
        unsafe { sum_rows(&vals, nb, m, out) }
    }

    /// `out[r * m + i]`: the sum of weight row `r`'s `nb` block products with activation
    /// row `i`, from `vals` (`[m, blocks]`), in the same order whatever the kernel: sixteen
    /// weight rows at a time, each row's chunks of 16 summed lane-wise, then the sixteen
    /// reduced together ([`crate::cpu_gemm::avx512::reduce16`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn sum_rows(vals: &[f32], nb: usize, m: usize, out: &mut [f32]) {
        let n = out.len() / m;
        for (i, vals) in vals.chunks_exact(vals.len() / m).enumerate() {
            for r0 in (0..n).step_by(16) {
                let rows = (n - r0).min(16);
                let mut acc = [_mm512_setzero_ps(); 16];
                for (a, row) in acc.iter_mut().zip(vals[r0 * nb..(r0 + rows) * nb].chunks_exact(nb)) {
                    for c in row.chunks(16) {
                        let mask: __mmask16 = if c.len() == 16 { !0 } else { (1 << c.len()) - 1 };
                        // SAFETY: the mask keeps the load to the chunk.
                        *a = _mm512_add_ps(*a, unsafe { _mm512_maskz_loadu_ps(mask, c.as_ptr()) });
                    }
                }
                let mut sums = [0f32; 16];
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), crate::cpu_gemm::avx512::reduce16(acc)) };
                for (r, s) in sums[..rows].iter().enumerate() {
                    out[(r0 + r) * m + i] = *s;
                }
            }
        }
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
    unsafe fn row_dot_k<B: IntCodes>(wrow: &[u8], acts: &IntActs, row: usize) -> f32 {
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
            // The super-block's first element in the activations.
            let e0 = row * acts.k + bi * QK_K;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check;
    use crate::cpu_int::takes_integer_path;
    use vidllm_core::ggml::QK_K;

    /// [`matvec`] agrees with the f64 product on the quantised activations: for 32-element
    /// types, rows of 2 blocks (several rows per step), 18 (a step across two rows) and 48
    /// (whole steps); 37 rows, so that bands end mid-step.
    #[test]
    fn matvec_matches_f64() {
        if !available() {
            eprintln!("cpu_gemv: no AVX-512 here, nothing to check");
            return;
        }
        for ty in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)) {
            let ks: &[usize] = if ty.block_elems() == QB { &[2 * QB, 18 * QB, 48 * QB] } else { &[QK_K, 3 * QK_K] };
            for &k in ks {
                let n = 37;
                let w = check::weight(ty, n, k, 5);
                let acts = IntActs::quantize(&check::values(k, 9), k);
                let want = check::reference(&acts.dequantize(), &vidllm_core::ggml::dequantize(ty, &w, n * k), 1, n, k);
                let got = matvec(ty, &w, n, &acts);
                let max_abs = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let max_diff = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
                assert!(check::within_rounding(max_diff, max_abs, k), "{} k={k}: max diff {max_diff:e} (max |y| {max_abs})", ty.name());
            }
        }
    }

    /// Several rows of activations at once (a batched decode step) give each row exactly
    /// its one-row product, for every type, 1 to [`MAX_ROWS`] rows.
    #[test]
    fn rows_together_equal_rows_alone() {
        if !available() {
            eprintln!("cpu_gemv: no AVX-512 here, nothing to check");
            return;
        }
        for ty in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)) {
            let k = if ty.block_elems() == QB { 18 * QB } else { 3 * QK_K };
            let n = 37;
            let w = check::weight(ty, n, k, 5);
            for m in [2, 3, 8, MAX_ROWS] {
                let x = check::values(m * k, 11);
                let together = matvec(ty, &w, n, &IntActs::quantize(&x, k));
                for (i, row) in x.chunks_exact(k).enumerate() {
                    let alone = matvec(ty, &w, n, &IntActs::quantize(row, k));
                    assert_eq!(&together[i * n..(i + 1) * n], &alone[..], "{} m={m} row {i}", ty.name());
                }
            }
        }
    }
}
