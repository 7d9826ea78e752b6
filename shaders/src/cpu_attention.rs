//! The CPU's attention: `softmax(q k^T scale + mask) v`, fused per block of query rows.
//!
//! The composed form (a GEMM for the scores, a pass each for the scale, the mask, the
//! softmax's maximum, exponentials and sums, then a GEMM with `v`) writes and rereads the
//! whole `[rows, keys]` score matrix several times and takes its exponentials one libm
//! call at a time: a fifth of a 512-token prefill. Here a block of [`R`] query rows
//! computes its scores in registers against the keys (transposed once per call, so that
//! sixteen keys are one vector), takes the softmax's numerators in place with a vectorised
//! `exp`, and accumulates the values, the block's scores staying in L1; each row's output
//! is then divided by its sum of exponentials (64 values, where dividing the weights was a
//! pass over every key). Keys a causal row may not see are not computed at all.
//!
//! Keys and values come as [`Rows`]: f32 rows read in place, or rows of GGML blocks (a
//! quantised KV cache: F16, Q8_0, Q4_0) dequantised [`C`] rows at a time into a buffer that
//! stays in L1, where they are read. No f32 copy of the context is made on the decode
//! path; prefill's transposed keys are written from the blocks directly.
//!
//! # Shapes
//! - q: `[heads, rows, d]`; k, v: `[heads, keys, d]` -> `[heads, rows, d]`

use rayon::prelude::*;
use vidllm_core::ggml::{BlockQ4_0, BlockQ8_0, GgmlType, QK};

/// Query rows per block (they share each load of the keys).
const R: usize = 4;
/// Keys per vector of scores.
const L: usize = 16;
/// Rows of a quantised head dequantised at a time (a multiple of [`L`]).
const C: usize = 64;
/// Keys, or value columns, per pass on AVX-512: four vectors, so that a block's rows have
/// 16 independent sums in registers. One vector (4 sums, each waiting on its last FMA)
/// left the FMA units idle most of the time: a prefill's attention ran at 130-140 GFLOP/s.
#[cfg(target_arch = "x86_64")]
const WIDTH: usize = 4 * L;

/// One head's keys or values, `[keys, d]`.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// f32 values, read in place.
    F32(&'a [f32]),
    /// Rows of `ty` blocks (F16, Q8_0 or Q4_0), `stride` bytes apart, each `d` values from
    /// its first byte.
    Packed { ty: GgmlType, bytes: &'a [u8], stride: usize },
}

impl<'a> Rows<'a> {
    /// Block types a head's rows may be packed in.
    pub const PACKED: [GgmlType; 3] = [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0];

    /// Whether it holds at least `keys` rows of `d` values.
    fn holds(&self, keys: usize, d: usize) -> bool {
        match *self {
            Rows::F32(x) => x.len() >= keys * d,
            Rows::Packed { ty, bytes, stride } => {
                Self::PACKED.contains(&ty)
                    && d.is_multiple_of(QK)
                    && stride >= d / ty.block_elems() * ty.block_bytes()
                    && (keys == 0 || bytes.len() >= (keys - 1) * stride + d / ty.block_elems() * ty.block_bytes())
            }
        }
    }

    /// All `keys` rows as f32: in place for [`Rows::F32`], else dequantised into `buf`
    /// (grown to hold them).
    fn whole<'b>(&self, keys: usize, d: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        if let Rows::Packed { .. } = self {
            buf.resize(keys * d, 0.0);
        }
        self.get(0, keys, d, buf)
    }

    /// Rows `j0..j0 + n` as f32: in place for [`Rows::F32`], else dequantised into `buf`.
    #[inline(always)]
    fn get<'b>(&self, j0: usize, n: usize, d: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Rows::F32(x) => &x[j0 * d..(j0 + n) * d],
            Rows::Packed { ty, bytes, stride } => {
                let out = &mut buf[..n * d];
                let bytes = &bytes[j0 * stride..];
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the features were just detected.
                    unsafe { x86::dequantize_rows(ty, bytes, stride, d, out) };
                    return out;
                }
                for (j, row) in out.chunks_exact_mut(d).enumerate() {
                    dequantize_row(ty, &bytes[j * stride..], row);
                }
                out
            }
        }
    }
}

/// One row of `ty` blocks from the start of `src` into `out` (its length the row's),
/// written so that it vectorises where the caller's target features allow. Exact: a
/// block's scale times an 8-bit code is an f32 with no rounding.
#[inline(always)]
fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F16 => {
            for (o, h) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([h[0], h[1]]));
            }
        }
        GgmlType::Q8_0 => {
            let blocks: &[BlockQ8_0] = bytemuck::cast_slice(&src[..out.len() / QK * size_of::<BlockQ8_0>()]);
            for (o, b) in out.chunks_exact_mut(QK).zip(blocks) {
                let d = f16_to_f32(u16::from_le_bytes(b.d));
                for (o, &q) in o.iter_mut().zip(&b.qs) {
                    *o = d * q as f32;
                }
            }
        }
        GgmlType::Q4_0 => {
            let blocks: &[BlockQ4_0] = bytemuck::cast_slice(&src[..out.len() / QK * size_of::<BlockQ4_0>()]);
            for (o, b) in out.chunks_exact_mut(QK).zip(blocks) {
                let d = f16_to_f32(u16::from_le_bytes(b.d));
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b.qs) {
                    *l = d * ((q & 15) as i32 - 8) as f32;
                    *h = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        other => unreachable!("{} rows are not read by the attention", other.name()),
    }
}

/// IEEE half to f32 without branches (so that it vectorises): the magnitude's bits moved
/// into place and rescaled by `2^112`, which is exact for normal and subnormal halves;
/// infinities and NaNs get the all-ones exponent back.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000);
    let special = if h & 0x7c00 == 0x7c00 { 0x7f80_0000 } else { 0 };
    f32::from_bits(((h & 0x8000) << 16) | magnitude.to_bits() | special)
}

/// Which keys a query row may see.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mask {
    /// Every key.
    None,
    /// Row `i` of every run of `t` rows is the query at position `start + i` and sees
    /// keys `0..=start + i` (the query heads of a group folded into the rows).
    Causal { t: usize, start: usize },
}

impl Mask {
    /// The additive form, `[rows, keys]`: 0 where a row sees a key, -inf elsewhere; `None`
    /// for [`Mask::None`] or where every row sees every key.
    pub fn bias(self, rows: usize, keys: usize) -> Option<Vec<f32>> {
        if (0..rows).all(|r| self.visible(r, keys) == keys) {
            return None;
        }
        let mut m = vec![0f32; rows * keys];
        for (r, row) in m.chunks_exact_mut(keys).enumerate() {
            row[self.visible(r, keys)..].fill(f32::NEG_INFINITY);
        }
        Some(m)
    }

    /// Keys row `row` sees, of `keys`.
    pub fn visible(self, row: usize, keys: usize) -> usize {
        match self {
            Mask::None => keys,
            Mask::Causal { t, start } => (start + row % t + 1).min(keys),
        }
    }
}

/// Scaled dot-product attention: `q` `[heads, rows, d]` (f32), and each head's keys and
/// values `[keys, d]` (views of a cache, not copied).
///
/// # Panics
/// If the lengths do not agree with the shapes.
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &[f32], k: &[Rows], v: &[Rows], rows: usize, keys: usize, d: usize, scale: f32, mask: Mask) -> Vec<f32> {
    let heads = k.len();
    assert!(q.len() == heads * rows * d && v.len() == heads, "attention: shapes");
    assert!(k.iter().chain(v).all(|x| x.holds(keys, d)), "attention: keys and values of every head");
    // A decode step (one block of rows per head) reads each key once: its scores come
    // straight from the keys' rows, without a transposed copy of the whole context
    // (which at 1,024 keys and more cost as much as the attention: written and read
    // again, per layer and token).
    if rows <= R && direct_scores_available(d) {
        let mut out = vec![0f32; heads * rows * d];
        if keys <= SPLIT_KEYS {
            out.par_chunks_mut(rows * d).enumerate().for_each(|(h, out)| {
                let head = Head { keys_by: KeysBy::Rows(k[h]), v: v[h], d, first: 0, keys, scale, mask };
                block(&head, &q[h * rows * d..][..out.len()], 0, out, None);
            });
        } else {
            split_keys(q, k, v, rows, keys, d, scale, mask, &mut out);
        }
        return out;
    }
    // Keys transposed per head, `[heads, d, padded keys]`, zero past the last key. The
    // buffer is kept per thread: a fresh one past malloc's mmap threshold is zeroed and
    // page-faulted in on every call.
    thread_local!(static KT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    // An odd number of cache lines per channel: a power-of-two stride (1,024 keys: 4 KiB)
    // put every channel of a tile in one L1 set, and the score loop, which reads all the
    // channels of a tile, thrashed it.
    let kp = (keys.div_ceil(L) | 1) * L;
    KT.with_borrow_mut(|kt| {
        if kt.len() < heads * d * kp {
            kt.resize(heads * d * kp, 0.0);
        }
        let kt = &mut kt[..heads * d * kp];
        kt.par_chunks_mut(d * kp).zip(k.par_iter()).for_each(|(kt, k)| {
            transpose_keys(k.whole(keys, d, &mut Vec::new()), d, kp, kt);
            for channel in kt.chunks_exact_mut(kp) {
                channel[keys..].fill(0.0);
            }
        });
        // Packed values widened once per head, not once per block of rows: every block
        // reads them all (up to its last visible key).
        let mut widened = vec![Vec::new(); heads];
        let v: Vec<Rows> = v.par_iter().zip(widened.par_iter_mut()).map(|(v, buf)| Rows::F32(v.whole(keys, d, buf))).collect();
        let mut out = vec![0f32; heads * rows * d];
        // Tasks: blocks of rows of one head.
        out.par_chunks_mut(rows * d).enumerate().for_each(|(h, out)| {
            let head =
                Head { keys_by: KeysBy::Transposed { kt: &kt[h * d * kp..][..d * kp], kp }, v: v[h], d, first: 0, keys, scale, mask };
            out.par_chunks_mut(R * d).enumerate().for_each(|(b, out)| {
                block(&head, &q[(h * rows + b * R) * d..][..out.len()], b * R, out, None);
            });
        });
        out
    })
}

/// Keys per task of a decode step's attention past which a head's keys are split
/// ([`split_keys`]).
const SPLIT_KEYS: usize = 256;

/// A decode step's attention with each head's keys split into runs of [`SPLIT_KEYS`],
/// one task each, as flash-decoding does: SmolLM2 has 3 key-value heads, so on 2 threads
/// (or a browser's 8) a task per head left threads idle while the others read a long
/// context's keys and values, at a video prompt's 2,000 tokens a third of a decode step.
/// Each run gives its rows' unnormalised weighted sums of values with the run's largest
/// score and its sum of exponentials; the runs are then combined, each scaled by
/// `e^(top - largest top)`, and divided by the combined sum. The runs depend on `keys`
/// alone, so the result does not depend on the number of threads.
#[allow(clippy::too_many_arguments)]
fn split_keys(q: &[f32], k: &[Rows], v: &[Rows], rows: usize, keys: usize, d: usize, scale: f32, mask: Mask, out: &mut [f32]) {
    let (heads, runs) = (k.len(), keys.div_ceil(SPLIT_KEYS));
    // Per task: the rows' sums `[rows, d]`, then each row's (top, sum of exponentials).
    let part = rows * d + 2 * R;
    let mut parts = vec![0f32; heads * runs * part];
    crate::cpu_hot::for_each_chunk_mut(&mut parts, part, |task, p| {
        let (h, run) = (task / runs, task % runs);
        let first = run * SPLIT_KEYS;
        let head = Head { keys_by: KeysBy::Rows(k[h]), v: v[h], d, first, keys: (first + SPLIT_KEYS).min(keys), scale, mask };
        let (sums, stats) = p.split_at_mut(rows * d);
        let mut tops = [[0f32; 2]; R];
        block(&head, &q[h * rows * d..][..rows * d], 0, sums, Some(&mut tops));
        stats.copy_from_slice(tops.as_flattened());
    });
    for (h, out) in out.chunks_exact_mut(rows * d).enumerate() {
        let head_parts = &parts[h * runs * part..][..runs * part];
        for (r, out) in out.chunks_exact_mut(d).enumerate() {
            let stat = |run: usize| -> [f32; 2] { std::array::from_fn(|i| head_parts[run * part + rows * d + 2 * r + i]) };
            // Every row sees the first key, so some run has a finite top.
            let top = (0..runs).map(stat).filter(|s| s[1] > 0.0).fold(f32::NEG_INFINITY, |a, s| a.max(s[0]));
            let mut total = 0f32;
            out.fill(0.0);
            for run in 0..runs {
                let [run_top, sum] = stat(run);
                if sum == 0.0 {
                    continue;
                }
                let w = exp(run_top - top);
                total += w * sum;
                for (o, &x) in out.iter_mut().zip(&head_parts[run * part + r * d..][..d]) {
                    *o += w * x;
                }
            }
            let inv = 1.0 / total;
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// Whether [`KeysBy::Rows`] can be scored here: whole vectors of channels, and on x86-64
/// AVX-512 (an AVX2 processor keeps the transposed keys, whose tiles its 16 registers
/// hold); elsewhere (WebAssembly's `simd128`) by [`scores_from_rows`], which spares a
/// decode step the transposed copy of every head's keys and values, and the three
/// parallel passes that make it (each a wake-up of the pool's threads in a browser).
fn direct_scores_available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        d.is_multiple_of(L) && has!("avx512f") && has!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    d.is_multiple_of(L)
}

/// `x` (`[rows, cols]`, row-major) transposed to `[cols, rows]`, by [`transpose_keys`]'s
/// tiles.
pub fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    transpose_into(x, rows, cols, &mut t, rows);
    t
}

/// `x` (`[rows, cols]`, row-major) into `dst` as `cols` lines `stride` apart, each
/// starting with the `rows` values of its column, by [`transpose_keys`]'s tiles.
pub(crate) fn transpose_into(x: &[f32], rows: usize, cols: usize, dst: &mut [f32], stride: usize) {
    assert!(x.len() == rows * cols && stride >= rows, "transpose_into: {rows} x {cols} values");
    transpose_keys(x, cols, stride, dst);
}

/// One head's keys `k` (`[keys, d]`) into `kt` (`[d, kp]`); the padding past `keys` is left
/// as it is.
///
/// A decode step transposes every key of the context, per layer, for three query rows:
/// one element at a time this was a twelfth of a decode step's time at 500 tokens of
/// context. AVX-512 moves tiles of 16 keys by 16 channels through registers.
fn transpose_keys(k: &[f32], d: usize, kp: usize, kt: &mut [f32]) {
    let done = {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            unsafe { x86::transpose_tiles(k, d, kp, kt) }
        } else {
            0
        }
        #[cfg(not(target_arch = "x86_64"))]
        0
    };
    // What no tile covered: the keys past the last whole tile, and the channels past the
    // last whole tile of the tiled keys.
    let tiled_channels = if done > 0 { d / L * L } else { 0 };
    for (j, key) in k.chunks_exact(d).enumerate() {
        let from = if j < done { tiled_channels } else { 0 };
        for (c, &x) in key.iter().enumerate().skip(from) {
            kt[c * kp + j] = x;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use vidllm_core::ggml::{BlockQ4_0, BlockQ8_0, GgmlType, QK};

    use super::{L, R, WIDTH, Weights};

    /// Vectors per wide pass.
    const V: usize = WIDTH / L;

    /// [`super::score_keys`] for [`WIDTH`] keys from `j0`: `R x V` sums side by side, each
    /// over the channels in order, one `vfmadd` per channel as there.
    ///
    /// # Safety
    /// AVX-512 F; `kt` holds channels of `kp >= j0 + WIDTH` keys; `scores` holds `R` rows of
    /// `span >= j0 + WIDTH`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_keys_wide(kt: &[f32], kp: usize, qt: &[[f32; R]], j0: usize, span: usize, scores: &mut [f32]) -> usize {
        debug_assert!(j0 + WIDTH <= kp && j0 + WIDTH <= span && scores.len() >= (R - 1) * span + j0 + WIDTH);
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (keys_c, qc) in kt.chunks_exact(kp).zip(qt) {
            let k: [__m512; V] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(keys_c.as_ptr().add(j0 + i * L)) });
            for (acc, &x) in acc.iter_mut().zip(qc) {
                let x = _mm512_set1_ps(x);
                for (a, &k) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(x, k, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (i, &a) in acc.iter().enumerate() {
                // SAFETY: within row `r` of `span`, as the caller promises.
                unsafe { _mm512_storeu_ps(scores.as_mut_ptr().add(r * span + j0 + i * L), a) };
            }
        }
        WIDTH
    }

    /// [`super::softmax`] sixteen lanes at a time, the last vector masked: the same
    /// maximum, the same exponentials ([`super::exp_with`]'s fused steps, in its order),
    /// the same lane sums added up in the same order.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax(row: &mut [f32], scale: f32) -> [f32; 2] {
        let n = row.len();
        let tail = |j: usize| -> __mmask16 { if j + L <= n { !0 } else { (1u16 << (n - j)) - 1 } };
        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..n).step_by(L) {
            let m = tail(j);
            // SAFETY: the mask covers only the row's values.
            let s = unsafe { _mm512_maskz_loadu_ps(m, row.as_ptr().add(j)) };
            // `if s > top { s } else { top }` lane by lane: vmaxps returns its second
            // operand where the first is NaN or both are zeros.
            top = _mm512_mask_max_ps(top, m, s, top);
        }
        // SAFETY: a vector is sixteen f32 lanes.
        let lanes: [f32; L] = unsafe { std::mem::transmute(top) };
        let top = _mm512_set1_ps(lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }) * scale);
        let scale = _mm512_set1_ps(scale);
        let mut sum = _mm512_setzero_ps();
        for j in (0..n).step_by(L) {
            let m = tail(j);
            // SAFETY: as above.
            let s = unsafe { _mm512_maskz_loadu_ps(m, row.as_ptr().add(j)) };
            let e = exp(_mm512_fmsub_ps(s, scale, top));
            sum = _mm512_mask_add_ps(sum, m, sum, e);
            // SAFETY: as above.
            unsafe { _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, e) };
        }
        // SAFETY: as above.
        let lanes: [f32; L] = unsafe { std::mem::transmute(sum) };
        let sum = lanes.iter().sum::<f32>();
        // SAFETY: a vector is sixteen f32 lanes.
        let top: [f32; L] = unsafe { std::mem::transmute(top) };
        [top[0], sum]
    }

    /// [`super::exp_with`] (fused) on sixteen lanes, step for step.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, c(-87.0)), c(88.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, c(super::LOG2E)));
        let r = _mm512_fnmadd_ps(n, c(super::LN2_LO), _mm512_fnmadd_ps(n, c(super::LN2_HI), x));
        let mut p = c(super::EXP_TAYLOR[0]);
        for &k in &super::EXP_TAYLOR[1..] {
            p = _mm512_fmadd_ps(r, p, c(k));
        }
        let two_n = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127))));
        _mm512_mul_ps(p, two_n)
    }

    /// [`super::mix_values`] for [`WIDTH`] columns from `c0`: `R x V` sums side by side,
    /// each over the keys in order.
    ///
    /// # Safety
    /// AVX-512 F; `c0 + WIDTH <= d`; `values` rows of `d`; `out` at least `n` rows of `d`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn mix_values_wide(
        weights: Weights,
        values: &[f32],
        d: usize,
        c0: usize,
        n: usize,
        carry: bool,
        out: &mut [f32],
    ) -> usize {
        let Weights { scores, span, j0 } = weights;
        debug_assert!(c0 + WIDTH <= d && out.len() >= n * d && n <= R);
        assert!(scores.len() >= (R - 1) * span + j0 + values.len() / d, "weights for every value row");
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if carry {
            for (r, acc) in acc.iter_mut().enumerate().take(n) {
                for (i, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r < n` of `out`, columns within `d`.
                    *a = unsafe { _mm512_loadu_ps(out.as_ptr().add(r * d + c0 + i * L)) };
                }
            }
        }
        for (j, value) in values.chunks_exact(d).enumerate() {
            let x: [__m512; V] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(value.as_ptr().add(c0 + i * L)) });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: within `scores`, as asserted above.
                let p = _mm512_set1_ps(unsafe { *scores.get_unchecked(r * span + j0 + j) });
                for (a, &x) in acc.iter_mut().zip(&x) {
                    *a = _mm512_fmadd_ps(p, x, *a);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(n) {
            for (i, &a) in acc.iter().enumerate() {
                // SAFETY: as for the carry.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * d + c0 + i * L), a) };
            }
        }
        WIDTH
    }

    /// [`super::dequantize_row`] for each row of `d` values of `out` (rows `stride` bytes
    /// apart in `bytes`), sixteen values a vector: halves widened by `vcvtph2ps`, codes
    /// sign- or zero-extended to 32 bits, converted and scaled. The same values.
    ///
    /// # Safety
    /// AVX-512 F and BW. `ty` is F16, Q8_0 or Q4_0; `d` a multiple of 32; each row's
    /// blocks held in `bytes` from its multiple of `stride`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn dequantize_rows(ty: GgmlType, bytes: &[u8], stride: usize, d: usize, out: &mut [f32]) {
        let half = |h: [u8; 2]| _mm512_set1_ps(super::f16_to_f32(u16::from_le_bytes(h)));
        for (j, row) in out.chunks_exact_mut(d).enumerate() {
            let src = &bytes[j * stride..];
            match ty {
                GgmlType::F16 => {
                    let src = &src[..2 * d];
                    for (o, h) in row.chunks_exact_mut(L).zip(src.chunks_exact(2 * L)) {
                        // SAFETY: 16 halves in, 16 floats out.
                        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast()))) };
                    }
                }
                GgmlType::Q8_0 => {
                    let blocks: &[BlockQ8_0] = bytemuck::cast_slice(&src[..d / QK * size_of::<BlockQ8_0>()]);
                    for (o, b) in row.chunks_exact_mut(QK).zip(blocks) {
                        let scale = half(b.d);
                        for (o, q) in o.chunks_exact_mut(L).zip(b.qs.chunks_exact(L)) {
                            // SAFETY: 16 codes in, 16 floats out.
                            unsafe {
                                let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().cast())));
                                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_mul_ps(scale, q));
                            }
                        }
                    }
                }
                GgmlType::Q4_0 => {
                    let blocks: &[BlockQ4_0] = bytemuck::cast_slice(&src[..d / QK * size_of::<BlockQ4_0>()]);
                    for (o, b) in row.chunks_exact_mut(QK).zip(blocks) {
                        let scale = half(b.d);
                        // SAFETY: 16 bytes of codes in, 32 floats out.
                        unsafe {
                            let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.qs.as_ptr().cast()));
                            let eight = _mm512_set1_epi32(8);
                            let lo = _mm512_sub_epi32(_mm512_and_si512(codes, _mm512_set1_epi32(15)), eight);
                            let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(codes), eight);
                            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_mul_ps(scale, _mm512_cvtepi32_ps(lo)));
                            _mm512_storeu_ps(o.as_mut_ptr().add(L), _mm512_mul_ps(scale, _mm512_cvtepi32_ps(hi)));
                        }
                    }
                }
                other => unreachable!("{} rows are not read by the attention", other.name()),
            }
        }
    }

    /// The whole 16 x 16 tiles of [`super::transpose_keys`]; returns how many keys they
    /// covered (their channels past the last whole tile are left to the caller).
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_tiles(k: &[f32], d: usize, kp: usize, kt: &mut [f32]) -> usize {
        let keys = k.len() / d;
        let (key_tiles, channel_tiles) = (keys / L, d / L);
        assert!(kp >= keys && kt.len() >= (d.max(1) - 1) * kp + keys, "transpose_tiles: room for the keys");
        for j0 in (0..key_tiles * L).step_by(L) {
            for c0 in (0..channel_tiles * L).step_by(L) {
                // SAFETY: rows j0..j0 + 16 of k hold channels c0..c0 + 16; rows c0..c0 + 16
                // of kt hold keys j0..j0 + 16 (asserted above).
                unsafe {
                    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(k.as_ptr().add((j0 + i) * d + c0)));
                    for (c, col) in transpose16(r).into_iter().enumerate() {
                        _mm512_storeu_ps(kt.as_mut_ptr().add((c0 + c) * kp + j0), col);
                    }
                }
            }
        }
        if channel_tiles == 0 { 0 } else { key_tiles * L }
    }

    /// `scores[r * span + j] = q_r . k_j` for each row of `q` (`[n, d]`) and key of `k`
    /// (`[keys, d]`), sixteen keys at a time: each key's products summed lane-wise over
    /// its channels, then the sixteen reduced together
    /// ([`crate::cpu_gemm::avx512::reduce16`]). Keys past the last are scored 0.
    ///
    /// # Safety
    /// AVX-512 F and BW; `d` a multiple of 16; `scores` holds `n` rows of `span >= keys`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn scores_from_rows(q: &[f32], k: &[f32], d: usize, span: usize, scores: &mut [f32]) {
        let keys = k.len() / d;
        for (r, q) in q.chunks_exact(d).enumerate() {
            for j0 in (0..keys).step_by(L) {
                let tile = &k[j0 * d..(j0 + L).min(keys) * d];
                let mut acc = [_mm512_setzero_ps(); L];
                for (a, key) in acc.iter_mut().zip(tile.chunks_exact(d)) {
                    for (kc, qc) in key.chunks_exact(L).zip(q.chunks_exact(L)) {
                        // SAFETY: 16 floats each.
                        *a = unsafe { _mm512_fmadd_ps(_mm512_loadu_ps(kc.as_ptr()), _mm512_loadu_ps(qc.as_ptr()), *a) };
                    }
                }
                let sums = crate::cpu_gemm::avx512::reduce16(acc);
                let room = &mut scores[r * span + j0..][..L];
                // SAFETY: 16 floats.
                unsafe { _mm512_storeu_ps(room.as_mut_ptr(), sums) };
            }
        }
    }

    /// Vector `c` of the result is lane `c` of the sixteen inputs: pairs of 32-bit lanes
    /// interleaved, then 64-bit pairs (within each 128-bit quarter, one column of four
    /// rows), then the quarters gathered.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let t: [__m512; 16] =
            std::array::from_fn(|i| if i % 2 == 0 { _mm512_unpacklo_ps(r[i], r[i + 1]) } else { _mm512_unpackhi_ps(r[i - 1], r[i]) });
        // u[4 g + m]: column 4 q + m of rows 4 g..4 g + 4, in quarter q.
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, m) = (i / 4, i % 4);
            let (a, b) = (_mm512_castps_pd(t[4 * g + m / 2]), _mm512_castps_pd(t[4 * g + 2 + m / 2]));
            _mm512_castpd_ps(if m % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) })
        });
        let mut out = [_mm512_setzero_ps(); 16];
        for m in 0..4 {
            let v_lo = _mm512_shuffle_f32x4::<0x44>(u[m], u[4 + m]);
            let v_hi = _mm512_shuffle_f32x4::<0xEE>(u[m], u[4 + m]);
            let w_lo = _mm512_shuffle_f32x4::<0x44>(u[8 + m], u[12 + m]);
            let w_hi = _mm512_shuffle_f32x4::<0xEE>(u[8 + m], u[12 + m]);
            out[m] = _mm512_shuffle_f32x4::<0x88>(v_lo, w_lo);
            out[4 + m] = _mm512_shuffle_f32x4::<0xDD>(v_lo, w_lo);
            out[8 + m] = _mm512_shuffle_f32x4::<0x88>(v_hi, w_hi);
            out[12 + m] = _mm512_shuffle_f32x4::<0xDD>(v_hi, w_hi);
        }
        out
    }
}

/// How a head's keys are read for the scores.
#[derive(Clone, Copy)]
enum KeysBy<'a> {
    /// Transposed, `[d, kp]`, zero past the last key: sixteen keys are one vector.
    Transposed { kt: &'a [f32], kp: usize },
    /// As they lie, `[keys, d]` ([`direct_scores_available`]): a decode step.
    Rows(Rows<'a>),
}

/// What every block of query rows of one head reads.
struct Head<'a> {
    keys_by: KeysBy<'a>,
    /// The values, `[keys, d]`.
    v: Rows<'a>,
    d: usize,
    /// The first key read ([`KeysBy::Rows`] only; 0 otherwise): the keys before it are
    /// another task's ([`split_keys`]).
    first: usize,
    /// One past the last key read.
    keys: usize,
    scale: f32,
    mask: Mask,
}

/// `n <= R` query rows (`q`, `[n, d]`) from row `r0` of one head, into `out`. With
/// `tops`, the weights are left unnormalised: each row's sum of `e^(s scale - top)` over
/// its keys (`top` its largest scaled score) goes to `tops[r]` as `[top, sum]`, a sum of 0
/// for a row that sees none of the head's keys.
fn block(head: &Head, q: &[f32], r0: usize, out: &mut [f32], tops: Option<&mut [[f32; 2]; R]>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            #[target_feature(enable = "avx512f")]
            fn avx512(head: &Head, q: &[f32], r0: usize, out: &mut [f32], tops: Option<&mut [[f32; 2]; R]>) {
                block_generic::<true, true>(head, q, r0, out, tops)
            }
            // SAFETY: the feature was just detected.
            return unsafe { avx512(head, q, r0, out, tops) };
        }
        if has!("avx2") && has!("fma") {
            #[target_feature(enable = "avx2,fma")]
            fn avx2(head: &Head, q: &[f32], r0: usize, out: &mut [f32], tops: Option<&mut [[f32; 2]; R]>) {
                block_generic::<true, false>(head, q, r0, out, tops)
            }
            // SAFETY: the features were just detected.
            return unsafe { avx2(head, q, r0, out, tops) };
        }
    }
    block_generic::<false, false>(head, q, r0, out, tops)
}

/// `a b + c`: one fused instruction where the caller's target has FMA (`FMA`), a multiply
/// and an add elsewhere (WebAssembly's `simd128` has no fused form; `mul_add` would be a
/// libm call there).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Written on arrays of [`L`] lanes so that it vectorises on every target. `WIDE` (AVX-512
/// only) takes [`WIDTH`] keys, or value columns, per pass: each sum is still taken in the
/// same order, so the result does not depend on it.
#[inline(always)]
fn block_generic<const FMA: bool, const WIDE: bool>(
    head: &Head,
    q: &[f32],
    r0: usize,
    out: &mut [f32],
    mut tops: Option<&mut [[f32; 2]; R]>,
) {
    let &Head { keys_by, v, d, first, keys, scale, mask } = head;
    let n = out.len() / d;
    // Keys each row sees, counted from `first`.
    let seen: [usize; R] = std::array::from_fn(|r| if r < n { mask.visible(r0 + r, keys).saturating_sub(first) } else { 0 });
    let most = seen.iter().copied().max().unwrap_or(0);
    let span = most.next_multiple_of(L);
    // Scores of the block's rows, `[R, span]`.
    let mut scores = vec![0f32; R * span];
    match keys_by {
        KeysBy::Transposed { kt, kp } => {
            assert_eq!(first, 0, "transposed keys are read from the first");
            // The block's queries by channel, `[d][R]` (rows past the block's end repeat
            // its first): channels and keys are walked by iterators, without an index
            // check per multiply-add.
            let qt: Vec<[f32; R]> = (0..d).map(|c| std::array::from_fn(|r| q[if r < n { r } else { 0 } * d + c])).collect();
            let mut j0 = 0;
            while j0 < span {
                #[cfg(target_arch = "x86_64")]
                if WIDE && j0 + WIDTH <= span {
                    // SAFETY: `WIDE` only where AVX-512 was detected; `WIDTH` keys from `j0`
                    // are within every channel's `kp` and every row's `span`.
                    j0 += unsafe { x86::score_keys_wide(kt, kp, &qt, j0, span, &mut scores) };
                    continue;
                }
                j0 += score_keys::<FMA>(kt, kp, &qt, j0, span, &mut scores);
            }
        }
        KeysBy::Rows(k) => {
            // Packed keys are scored C at a time from their dequantised rows.
            let step = if let Rows::F32(_) = k { most.max(1) } else { C };
            let mut buf = vec![0f32; if step == C { C * d } else { 0 }];
            for j0 in (0..most).step_by(step) {
                let k = k.get(first + j0, step.min(most - j0), d, &mut buf);
                #[cfg(target_arch = "x86_64")]
                if WIDE {
                    // SAFETY: `WIDE` is AVX-512, and on x86-64 `Rows` is chosen only where
                    // `direct_scores_available` found F and BW; `q` is `n` rows of `d`
                    // channels; the keys' scores land in columns `j0..` of rows of `span`,
                    // and `j0 + step` rounded up to `L` is within `span`.
                    unsafe { x86::scores_from_rows(&q[..n * d], k, d, span, &mut scores[j0..]) };
                    continue;
                }
                scores_from_rows::<FMA>(&q[..n * d], k, d, span, &mut scores[j0..]);
            }
        }
    }
    // Each row's weights stay unnormalised: its output is divided by their sum once the
    // values are mixed (d values, not another pass over every key's weight).
    let mut sums = [1f32; R];
    for r in 0..n {
        let row = &mut scores[r * span..][..seen[r]];
        #[cfg(target_arch = "x86_64")]
        let top_sum = if WIDE {
            // SAFETY: `WIDE` only where AVX-512 was detected.
            unsafe { x86::softmax(row, scale) }
        } else {
            softmax::<FMA>(row, scale)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let top_sum = softmax::<FMA>(row, scale);
        sums[r] = top_sum[1];
        if let Some(tops) = tops.as_deref_mut() {
            tops[r] = top_sum;
        }
        // The keys past this row's last (computed for a longer row of the block) weigh
        // nothing.
        scores[r * span + seen[r]..(r + 1) * span].fill(0.0);
    }
    // Rows past the block's end (scored as a copy of its first) weigh nothing either.
    scores[n * span..].fill(0.0);
    // The weighted sum of the values, L columns at a time with the block's rows in
    // registers: each load of a value row serves every row of the block, each weight read
    // from its row of `scores`. Packed values are read C rows at a time, the sums carried
    // in `out` between them (the same additions in the same order).
    let step = if let Rows::F32(_) = v { most.max(1) } else { C };
    let mut buf = vec![0f32; if step == C { C * d } else { 0 }];
    for j0 in (0..most).step_by(step) {
        let values = v.get(first + j0, step.min(most - j0), d, &mut buf);
        let weights = Weights { scores: &scores, span, j0 };
        let mut c0 = 0;
        while c0 < d {
            #[cfg(target_arch = "x86_64")]
            if WIDE && c0 + WIDTH <= d {
                // SAFETY: `WIDE` only where AVX-512 was detected; `WIDTH` columns from
                // `c0` are within each row of `d`.
                c0 += unsafe { x86::mix_values_wide(weights, values, d, c0, n, j0 > 0, out) };
                continue;
            }
            c0 += mix_values::<FMA>(weights, values, d, c0, n, j0 > 0, out);
        }
    }
    if tops.is_none() {
        // (A row that sees no key, which only a split decode step's run has, sums to 0
        // and stays 0.)
        for (row, &sum) in out.chunks_exact_mut(d).zip(&sums).filter(|(_, s)| **s > 0.0) {
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// A row of scores into its softmax's numerators, in place: the maximum in lanes, then
/// the exponentials and their sum. Returns the scaled maximum and the sum of the
/// exponentials (`[-inf, 0]` for an empty row); the caller divides by the sum once the
/// values are mixed.
#[inline(always)]
fn softmax<const FMA: bool>(row: &mut [f32], scale: f32) -> [f32; 2] {
    let mut top = [f32::NEG_INFINITY; L];
    for c in row.chunks(L) {
        for (t, &s) in top.iter_mut().zip(c) {
            *t = if s > *t { s } else { *t };
        }
    }
    let top = top.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }) * scale;
    let mut sum = [0f32; L];
    for c in row.chunks_mut(L) {
        for (s, acc) in c.iter_mut().zip(sum.iter_mut()) {
            *s = exp_with::<FMA>(madd::<FMA>(*s, scale, -top));
            *acc += *s;
        }
    }
    [top, sum.iter().sum::<f32>()]
}

/// A block's weights for the keys from `j0`: row `r`'s for key `j0 + j` is
/// `scores[r * span + j0 + j]`.
#[derive(Clone, Copy)]
struct Weights<'a> {
    scores: &'a [f32],
    span: usize,
    j0: usize,
}

/// The scores of one vector of keys from key `j0` (transposed, `[d, kp]`) for the
/// block's queries by channel (`qt`, `[d][R]`), into columns `j0..` of `scores` (rows of
/// `span`). Returns the keys done.
#[inline(always)]
fn score_keys<const FMA: bool>(kt: &[f32], kp: usize, qt: &[[f32; R]], j0: usize, span: usize, scores: &mut [f32]) -> usize {
    let mut acc = [[0f32; L]; R];
    for (keys_c, qc) in kt.chunks_exact(kp).zip(qt) {
        let kv: &[f32; L] = keys_c[j0..j0 + L].try_into().expect("L keys");
        for (acc, &x) in acc.iter_mut().zip(qc) {
            for (a, &k) in acc.iter_mut().zip(kv) {
                *a = madd::<FMA>(x, k, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        scores[r * span + j0..][..L].copy_from_slice(acc);
    }
    L
}

/// `scores[r * span + j] = q_r . k_j` for each row of `q` (`[n, d]`) and key of `k`
/// (`[keys, d]`, `d` a multiple of [`L`]): each key's products summed in [`L`] lanes over
/// its channels, the lanes then folded in halves. The portable form of
/// `x86::scores_from_rows` (WebAssembly's decode steps).
#[inline(always)]
fn scores_from_rows<const FMA: bool>(q: &[f32], k: &[f32], d: usize, span: usize, scores: &mut [f32]) {
    for (r, q) in q.chunks_exact(d).enumerate() {
        for (j, key) in k.chunks_exact(d).enumerate() {
            let mut acc = [0f32; L];
            for (kc, qc) in key.chunks_exact(L).zip(q.chunks_exact(L)) {
                for ((a, &x), &y) in acc.iter_mut().zip(kc).zip(qc) {
                    *a = madd::<FMA>(x, y, *a);
                }
            }
            let mut w = L;
            while w > 1 {
                w /= 2;
                for i in 0..w {
                    acc[i] += acc[i + w];
                }
            }
            scores[r * span + j] = acc[0];
        }
    }
}

/// Columns `c0..` (a vector of them, or what is left) of the weighted sum of `values`
/// (`[keys, d]`) by `weights`, into the block's first `n` rows of `out`
/// (`[n, d]`), added to what `out` holds where `carry` (an earlier run of keys). Returns
/// the columns done.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mix_values<const FMA: bool>(weights: Weights, values: &[f32], d: usize, c0: usize, n: usize, carry: bool, out: &mut [f32]) -> usize {
    let w = L.min(d - c0);
    let mut acc = [[0f32; L]; R];
    if carry {
        for (r, acc) in acc.iter_mut().enumerate().take(n) {
            acc[..w].copy_from_slice(&out[r * d + c0..][..w]);
        }
    }
    let Weights { scores, span, j0 } = weights;
    for (j, value) in values.chunks_exact(d).enumerate() {
        let p: [f32; R] = std::array::from_fn(|r| scores[r * span + j0 + j]);
        // Whole vectors read in place: a copy of a run-time length is a call to memcpy.
        let x: [f32; L] = match value[c0..].first_chunk::<L>() {
            Some(x) if w == L => *x,
            _ => {
                let mut x = [0f32; L];
                x[..w].copy_from_slice(&value[c0..][..w]);
                x
            }
        };
        for (acc, &p) in acc.iter_mut().zip(&p) {
            for (a, &x) in acc.iter_mut().zip(&x) {
                *a = madd::<FMA>(p, x, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate().take(n) {
        out[r * d + c0..][..w].copy_from_slice(&acc[..w]);
    }
    w
}

/// `e^x` for f32, branch-free so that it vectorises: `x = n ln 2 + r` with `|r| <= ln 2 / 2`,
/// a degree-6 polynomial for `e^r` (relative error below 2e-7, about two f32 ulps), then
/// `2^n` put into the exponent. Large negative `x` (a masked score) gives 0.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// [`exp`] with its multiply-adds fused where `FMA` (the softmax's, on x86-64: 6 fewer
/// instructions a vector, and `x86::exp` makes the same ones).
#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    // Horner's rule from the highest coefficient: 1 + r (1 + r (1/2 + ...)).
    let p = EXP_TAYLOR[1..].iter().fold(EXP_TAYLOR[0], |p, &k| madd::<FMA>(r, p, k));
    // 2^n from n's bits: `n + 127 + 2^23` holds n's biased exponent in its low mantissa
    // bits, which the shift moves into place. The same bits as `(n as i32 + 127) << 23`,
    // without Rust's saturating cast, which goes one lane at a time.
    p * f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that n ln 2 is exact in the high part.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Taylor coefficients of `e^r`, 1/k!, from the highest (k = 6) down to k = 0.
const EXP_TAYLOR: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiled transpose is the element-by-element one, for key and channel counts on
    /// and off the tile size.
    #[test]
    fn keys_transpose_exactly() {
        for (keys, d) in [(16, 16), (37, 64), (40, 20), (5, 64), (33, 8)] {
            let k = crate::check::values(keys * d, 4);
            let kp = keys.next_multiple_of(L);
            let mut got = vec![0f32; d * kp];
            transpose_keys(&k, d, kp, &mut got);
            for j in 0..keys {
                for c in 0..d {
                    assert_eq!(got[c * kp + j], k[j * d + c], "keys {keys}, d {d}: key {j} channel {c}");
                }
            }
            // Unpadded, as `transposed` lays out a matrix.
            let t = transposed(&k, keys, d);
            for j in 0..keys {
                for c in 0..d {
                    assert_eq!(t[c * keys + j], k[j * d + c], "transposed {keys} x {d}: ({j}, {c})");
                }
            }
        }
    }

    #[test]
    fn exp_scales_by_the_cast_s_powers_of_two() {
        // Every n the clamped argument gives.
        for n in -127..=128 {
            let n = n as f32;
            assert_eq!((n + (127.0 + 8_388_608.0)).to_bits() << 23, ((n as i32 + 127) as u32) << 23, "{n}");
        }
    }

    #[test]
    fn exp_is_within_two_ulps() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            // Unfused (the portable path) and fused (x86-64's softmax).
            for got in [exp(x), exp_with::<true>(x)] {
                assert!(((got as f64 - want) / want).abs() < 2.5e-7, "exp({x}) = {got}, want {want}");
            }
            x += 0.0137;
        }
        assert_eq!(exp(-1e30), exp(-87.0));
        assert_eq!(exp_with::<true>(-1e30), exp_with::<true>(-87.0));
    }

    /// Against the f64 softmax-weighted sum, causal and not, with rows that do not fill
    /// a block and keys that do not fill a vector; and decode-shaped calls (a block of rows
    /// or less per head, whole vectors of channels: the keys scored by rows on AVX-512).
    #[test]
    fn attention_matches_f64() {
        let shapes = [
            (3, 2 * 7, 23, 20, [Mask::None, Mask::Causal { t: 7, start: 16 }]),
            (3, 3, 37, 64, [Mask::None, Mask::Causal { t: 1, start: 36 }]),
            (2, 4, 16, 32, [Mask::Causal { t: 2, start: 13 }, Mask::Causal { t: 1, start: 9 }]),
            // Decode steps whose keys are split into runs (`split_keys`), the last run
            // short; with two tokens a step, one row sees none of the last run's key.
            (3, 3, 300, 64, [Mask::None, Mask::Causal { t: 1, start: 299 }]),
            (
                2,
                4,
                2 * SPLIT_KEYS + 1,
                64,
                [Mask::Causal { t: 2, start: 2 * SPLIT_KEYS - 1 }, Mask::Causal { t: 4, start: 2 * SPLIT_KEYS - 3 }],
            ),
        ];
        for (heads, rows, keys, d, masks) in shapes {
            check_attention(heads, rows, keys, d, masks);
        }
    }

    /// Keys and values in each packed type, rows padded to whole words as the KV cache
    /// keeps them: decode shapes (keys scored by rows, several chunks of [`C`]) and
    /// prefill shapes (keys transposed), against f64 on the dequantised values.
    #[test]
    fn packed_attention_matches_f64() {
        for ty in Rows::PACKED {
            check_packed(ty, 3, 3, 150, 64, [Mask::None, Mask::Causal { t: 1, start: 149 }]);
            check_packed(ty, 2, 2 * 7, 70, 32, [Mask::None, Mask::Causal { t: 7, start: 63 }]);
            check_packed(ty, 3, 3, 3 * SPLIT_KEYS + 40, 64, [Mask::None, Mask::Causal { t: 1, start: 3 * SPLIT_KEYS + 39 }]);
        }
    }

    /// AVX-512's wide passes take each sum in the same order as one vector at a time: the
    /// same bits, for f32 and packed values carried over several runs of [`C`] keys, whole
    /// passes and a tail of keys and of columns.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn wide_passes_sum_in_the_same_order() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return eprintln!("no AVX-512 here: nothing to compare");
        }
        #[target_feature(enable = "avx512f")]
        fn both(head: &Head, q: &[f32], r0: usize, one: &mut [f32], wide: &mut [f32]) {
            block_generic::<true, false>(head, q, r0, one, None);
            block_generic::<true, true>(head, q, r0, wide, None);
        }
        let (keys, d) = (150, 80);
        let (k, v, q) = (crate::check::values(keys * d, 2), crate::check::values(keys * d, 3), crate::check::values(R * d, 1));
        let kp = (keys.div_ceil(L) | 1) * L;
        let mut kt = vec![0f32; d * kp];
        transpose_keys(&k, d, kp, &mut kt);
        let packed = vidllm_core::ggml::quantize(GgmlType::F16, &v);
        let f16 = Rows::Packed { ty: GgmlType::F16, bytes: &packed, stride: d * 2 };
        for v in [Rows::F32(&v), f16] {
            for (r0, mask) in [(0, Mask::None), (3, Mask::Causal { t: 8, start: keys - 8 }), (0, Mask::Causal { t: keys, start: 0 })] {
                let head = Head { keys_by: KeysBy::Transposed { kt: &kt, kp }, v, d, first: 0, keys, scale: 0.3, mask };
                let (mut one, mut wide) = (vec![0f32; R * d], vec![0f32; R * d]);
                // SAFETY: the feature was just detected.
                unsafe { both(&head, &q, r0, &mut one, &mut wide) };
                assert!(one.iter().zip(&wide).all(|(a, b)| a.to_bits() == b.to_bits()), "{mask:?} from row {r0}");
            }
        }
    }

    /// Keys scored by rows on the portable path (WebAssembly's decode steps; natively
    /// AVX-512 scores them), f32 and packed, over several runs of [`C`] keys: the block
    /// against f64.
    #[test]
    fn portable_rows_match_f64() {
        let (keys, d) = (150, 64);
        let (k, v, q) = (crate::check::values(keys * d, 2), crate::check::values(keys * d, 3), crate::check::values(R * d, 1));
        let kq = vidllm_core::ggml::quantize(GgmlType::F16, &k);
        let kh = vidllm_core::ggml::dequantize(GgmlType::F16, &kq, keys * d);
        for (keys_by, kf) in [(Rows::F32(&k), &k), (Rows::Packed { ty: GgmlType::F16, bytes: &kq, stride: d * 2 }, &kh)] {
            for (n, mask) in [(1, Mask::None), (R, Mask::Causal { t: R, start: keys - R })] {
                let head = Head { keys_by: KeysBy::Rows(keys_by), v: Rows::F32(&v), d, first: 0, keys, scale: 0.3, mask };
                let mut out = vec![0f32; n * d];
                block_generic::<false, false>(&head, &q[..n * d], 0, &mut out, None);
                for i in 0..n {
                    let seen = mask.visible(i, keys);
                    let s: Vec<f64> =
                        (0..seen).map(|j| (0..d).map(|c| q[i * d + c] as f64 * kf[j * d + c] as f64).sum::<f64>() * 0.3).collect();
                    let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - top).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..seen).map(|j| e[j] / z * v[j * d + c] as f64).sum();
                        let g = out[i * d + c] as f64;
                        assert!((g - want).abs() < 1e-5 * want.abs().max(1.0), "{keys_by:?} {mask:?} row {i} [{c}]: {g} vs {want}");
                    }
                }
            }
        }
    }

    /// One run of a split decode step on the portable path (WebAssembly): keys from
    /// `first`, weights left unnormalised, against f64 with the run's own top.
    #[test]
    fn portable_runs_match_f64() {
        let (keys, d, first) = (300, 64, 130);
        let (k, v, q) = (crate::check::values(keys * d, 2), crate::check::values(keys * d, 3), crate::check::values(R * d, 1));
        for (n, mask) in [(1, Mask::None), (R, Mask::Causal { t: R, start: keys - R })] {
            let head = Head { keys_by: KeysBy::Rows(Rows::F32(&k)), v: Rows::F32(&v), d, first, keys, scale: 0.3, mask };
            let (mut out, mut tops) = (vec![0f32; n * d], [[0f32; 2]; R]);
            block_generic::<false, false>(&head, &q[..n * d], 0, &mut out, Some(&mut tops));
            for i in 0..n {
                let s: Vec<f64> = (first..mask.visible(i, keys))
                    .map(|j| (0..d).map(|c| q[i * d + c] as f64 * k[j * d + c] as f64).sum::<f64>() * 0.3)
                    .collect();
                let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                assert!((tops[i][0] as f64 - top).abs() < 1e-5 * top.abs().max(1.0), "row {i}: top {} vs {top}", tops[i][0]);
                let e: Vec<f64> = s.iter().map(|x| (x - tops[i][0] as f64).exp()).collect();
                let z: f64 = e.iter().sum();
                assert!((tops[i][1] as f64 - z).abs() < 1e-5 * z, "row {i}: sum {} vs {z}", tops[i][1]);
                for c in 0..d {
                    let want: f64 = e.iter().enumerate().map(|(j, e)| e * v[(first + j) * d + c] as f64).sum();
                    let g = out[i * d + c] as f64;
                    assert!((g - want).abs() < 1e-5 * want.abs().max(z), "{mask:?} row {i} [{c}]: {g} vs {want}");
                }
            }
        }
    }

    fn check_attention(heads: usize, rows: usize, keys: usize, d: usize, masks: [Mask; 2]) {
        let k = crate::check::values(heads * keys * d, 2);
        let v = crate::check::values(heads * keys * d, 3);
        let (kh, vh) = (k.chunks(keys * d).map(Rows::F32).collect::<Vec<_>>(), v.chunks(keys * d).map(Rows::F32).collect::<Vec<_>>());
        check(&kh, &vh, &k, &v, rows, keys, d, masks);
    }

    /// [`check_attention`] with keys and values packed in `ty`.
    fn check_packed(ty: GgmlType, heads: usize, rows: usize, keys: usize, d: usize, masks: [Mask; 2]) {
        let stride = (d / ty.block_elems() * ty.block_bytes()).next_multiple_of(4);
        let pack = |x: &[f32]| -> Vec<u8> {
            let mut out = vec![0u8; heads * keys * stride];
            for (row, o) in x.chunks(d).zip(out.chunks_mut(stride)) {
                let q = vidllm_core::ggml::quantize(ty, row);
                o[..q.len()].copy_from_slice(&q);
            }
            out
        };
        let unpack = |b: &[u8]| -> Vec<f32> { b.chunks(stride).flat_map(|r| vidllm_core::ggml::dequantize(ty, r, d)).collect() };
        let (kb, vb) = (pack(&crate::check::values(heads * keys * d, 2)), pack(&crate::check::values(heads * keys * d, 3)));
        fn head(ty: GgmlType, b: &[u8], keys: usize, stride: usize) -> Vec<Rows<'_>> {
            b.chunks(keys * stride).map(|bytes| Rows::Packed { ty, bytes, stride }).collect()
        }
        check(&head(ty, &kb, keys, stride), &head(ty, &vb, keys, stride), &unpack(&kb), &unpack(&vb), rows, keys, d, masks);
    }

    /// `attention` over `kh` / `vh` against f64 over the values they hold (`k`, `v`).
    #[allow(clippy::too_many_arguments)]
    fn check(kh: &[Rows], vh: &[Rows], k: &[f32], v: &[f32], rows: usize, keys: usize, d: usize, masks: [Mask; 2]) {
        let heads = kh.len();
        let q = crate::check::values(heads * rows * d, 1);
        let scale = 0.3;
        for mask in masks {
            let got = attention(&q, kh, vh, rows, keys, d, scale, mask);
            for h in 0..heads {
                for i in 0..rows {
                    let seen = mask.visible(i, keys);
                    let s: Vec<f64> = (0..seen)
                        .map(|j| {
                            (0..d).map(|c| q[(h * rows + i) * d + c] as f64 * k[(h * keys + j) * d + c] as f64).sum::<f64>() * scale as f64
                        })
                        .collect();
                    let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - top).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..seen).map(|j| e[j] / z * v[(h * keys + j) * d + c] as f64).sum();
                        let g = got[(h * rows + i) * d + c] as f64;
                        assert!(
                            (g - want).abs() < 1e-5 * want.abs().max(1.0),
                            "{:?} {rows}x{keys}x{d} {mask:?} head {h} row {i} [{c}]: {g} vs {want}",
                            kh[0]
                        );
                    }
                }
            }
        }
    }

    /// The portable row widening (WebAssembly, processors without AVX-512) against
    /// ggml's block decoding.
    #[test]
    fn rows_widen_as_ggml_decodes_them() {
        for ty in Rows::PACKED {
            let x: Vec<f32> = crate::check::values(96, 9).iter().map(|v| v * 5.0).collect();
            let bytes = vidllm_core::ggml::quantize(ty, &x);
            let mut got = vec![0f32; 96];
            dequantize_row(ty, &bytes, &mut got);
            assert_eq!(got, vidllm_core::ggml::dequantize(ty, &bytes, 96), "{}", ty.name());
        }
    }

    /// Halves to f32 as `half` converts them, every one of the 65,536 (NaNs as NaNs).
    #[test]
    fn halves_widen_exactly() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Time of a prefill's attention (SmolLM2-135M: 9 heads, d = 64, causal) over its own
    /// keys, f32 and in an f16 cache, on every core:
    /// `cargo test --release -p vidllm-shaders --lib prefill_attention_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn prefill_attention_speed() {
        let (heads, d) = (9, 64);
        for ty in [GgmlType::F32, GgmlType::F16] {
            for rows in [512, 1024, 1600] {
                let q = crate::check::values(heads * rows * d, 3);
                let kv: Vec<Vec<f32>> = (0..2 * heads).map(|i| crate::check::values(rows * d, 5 + i as u64)).collect();
                let packed: Vec<Vec<u8>> = kv.iter().map(|x| vidllm_core::ggml::quantize(ty, x)).collect();
                let rows_of = |i: usize| match ty {
                    GgmlType::F32 => Rows::F32(&kv[i]),
                    _ => Rows::Packed { ty, bytes: &packed[i], stride: d * 2 },
                };
                let (k, v): (Vec<Rows>, Vec<Rows>) = ((0..heads).map(rows_of).collect(), (heads..2 * heads).map(rows_of).collect());
                // 1,024 rows: a vision tower's frame (SigLIP at 512 px), every key seen.
                let mask = if rows == 1024 { Mask::None } else { Mask::Causal { t: rows, start: 0 } };
                let mut times: Vec<f64> = (0..9)
                    .map(|_| {
                        let t0 = std::time::Instant::now();
                        std::hint::black_box(attention(&q, &k, &v, rows, rows, d, 0.125, mask));
                        t0.elapsed().as_secs_f64() * 1e3
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                let pairs = if rows == 1024 { rows * rows } else { rows * rows / 2 };
                let gflop = (heads * pairs * d * 4) as f64 / 1e9; // two products, two flops each
                eprintln!("{} {rows} rows: {:.2} ms median, {:.0} GFLOP/s", ty.name(), times[4], gflop / times[4] * 1e3);
            }
        }
    }

    /// Time of one decode step's attention (SmolLM2-135M: 3 key-value heads of 3 query
    /// heads, d = 64) at a few context lengths, in the pool as vidllm-native runs it:
    /// `RAYON_NUM_THREADS=1 cargo test --release -p vidllm-shaders --lib decode_attention_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn decode_attention_speed() {
        let (heads, rows, d) = (3, 3, 64);
        let pool = rayon::ThreadPoolBuilder::new().use_current_thread().build().unwrap();
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            for keys in [64, 256, 1024, 2048] {
                let q = crate::check::values(heads * rows * d, 3);
                let kv: Vec<Vec<f32>> = (0..2 * heads).map(|i| crate::check::values(keys * d, 5 + i as u64)).collect();
                let packed: Vec<Vec<u8>> = kv.iter().map(|x| vidllm_core::ggml::quantize(ty, x)).collect();
                let stride = d / ty.block_elems() * ty.block_bytes();
                let rows_of = |i: usize| match ty {
                    GgmlType::F32 => Rows::F32(&kv[i]),
                    _ => Rows::Packed { ty, bytes: &packed[i], stride },
                };
                let (k, v): (Vec<Rows>, Vec<Rows>) = ((0..heads).map(rows_of).collect(), (heads..2 * heads).map(rows_of).collect());
                let mask = Mask::Causal { t: rows, start: keys - 1 };
                let mut times: Vec<f64> = pool.install(|| {
                    (0..2001)
                        .map(|_| {
                            let t0 = std::time::Instant::now();
                            std::hint::black_box(attention(&q, &k, &v, rows, keys, d, 0.125, mask));
                            t0.elapsed().as_secs_f64() * 1e6
                        })
                        .collect()
                });
                times.sort_by(f64::total_cmp);
                eprintln!("{} keys {keys}: {:.2} us median ({:.2} quickest)", ty.name(), times[times.len() / 2], times[0]);
            }
        }
    }
}
