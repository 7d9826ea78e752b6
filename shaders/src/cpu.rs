//! CPU implementation of [`QuantOps`] for the Flex backend.
//!
//! Same arithmetic as the GPU kernels (f32 activations, weights dequantised on the fly),
//! arranged for the CPU's vector units:
//! - per block, `sum_j q_j x_j` is accumulated in 16 independent lanes (the compiler
//!   vectorises the lane loop), scaled by `d`; the block's constant term (`m` for Q4_1,
//!   `-8 d` for Q4_0) multiplies the precomputed block sum of `x`;
//! - each decoded weight block is reused for up to `MC` rows of `x` (prefill);
//! - the other types (K-quants, Q5, IQ4, F16, BF16) decode each block into a small buffer
//!   (monomorphised per block struct, so the decoding inlines and vectorises) and dot it
//!   with the rows of `x`: decode reads the packed row once and allocates nothing the size
//!   of the matrix;
//! - from `GEMM_MIN_M` rows of `x` on, tiles of rows are dequantised for the GEMM;
//! - output rows are split over threads; an AVX2+FMA build of the same loop is picked at
//!   run time where the processor has it.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{Shape, TensorData};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use vidllm_core::ggml::{Block, BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType, QK, blocks, dequant_block};

use crate::QuantOps;
use crate::block::ty_from_id;

/// Rows of `x` sharing one decode of a weight block.
const MC: usize = 8;
/// From this many rows of `x` on (prefill), the weight is dequantised into a transient f32
/// scratch and multiplied by the CPU backend's GEMM: the decode is amortised over the rows
/// and the GEMM is cache-blocked. The resident copy stays in blocks.
const GEMM_MIN_M: usize = 32;
/// Fewest output rows per parallel task; a matrix is split into about four tasks per
/// thread, since waking the pool costs as much as a small row block.
const MIN_ROWS_PER_TASK: usize = 16;

impl QuantOps for Flex {
    fn q_matmul(x: FlexTensor, words: FlexTensor, ty: u32, n: usize, k: usize) -> FlexTensor {
        let ty = ty_from_id(ty);
        let m = x.layout().shape().num_elements() / k;
        let w: &[u8] = bytemuck::cast_slice(words.storage::<u32>());
        if m >= GEMM_MIN_M {
            return gemm_by_row_tiles(ty, x, w, m, n, k);
        }
        let x = x.into_data().try_into_vec::<f32>().expect("q_matmul: x must be f32");
        // The row kernels below cover the 32-element legacy types; every other type (the K
        // quants, Q5, IQ4, F16, BF16) is decoded block by block into a small buffer.
        let y = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => q_matmul_cpu(ty, &x, w, m, n, k),
            _ => q_matmul_decoded(ty, &x, w, m, n, k),
        };
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }
}

/// `y[m, n] = sum_k x[m, k] * deq(W)[n, k]` for Q4_0, Q4_1 or Q8_0 blocks `w` (`n` rows
/// of `k / 32`).
pub fn q_matmul_cpu(ty: GgmlType, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let nb = k / QK;
    // Block sums of x: the constant term of each block multiplies them.
    let xsum: Vec<f32> = x.chunks_exact(QK).map(|b| b.iter().sum()).collect();
    by_weight_rows(w, nb * ty.block_bytes(), m, n, |wrow, out| row(ty, wrow, x, &xsum, m, k, out))
}

/// `y[m, n]` from one task per band of weight rows: `dot(wrow, out)` writes row `r` of `W`
/// against every row of `x` into `out` (`m` values), and the `[n, m]` result is transposed.
fn by_weight_rows(w: &[u8], row_bytes: usize, m: usize, n: usize, dot: impl Fn(&[u8], &mut [f32]) + Sync) -> Vec<f32> {
    let mut yt = vec![0f32; n * m]; // transposed: [n, m]
    let rows_per_task = MIN_ROWS_PER_TASK.max(n.div_ceil(4 * rayon::current_num_threads()));
    yt.par_chunks_mut(m * rows_per_task).enumerate().for_each(|(task, out)| {
        let r0 = task * rows_per_task;
        for (i, orow) in out.chunks_mut(m).enumerate() {
            dot(&w[(r0 + i) * row_bytes..(r0 + i + 1) * row_bytes], orow);
        }
    });
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for r in 0..n {
        for i in 0..m {
            y[i * n + r] = yt[r * m + i];
        }
    }
    y
}

/// `y[m, n]` for few rows of `x` (decode) and any block type: every weight block is
/// decoded once into a buffer that stays in L1 and used for each row of `x`. Reads the
/// packed weights once; nothing the size of the matrix is allocated.
fn q_matmul_decoded(ty: GgmlType, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    by_weight_rows(w, row_bytes, m, n, |wrow, out| decoded_row(ty, wrow, x, m, k, out))
}

/// One weight row against every row of `x`, on the best instruction set available.
fn decoded_row(ty: GgmlType, wrow: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { decoded_row_avx2(ty, wrow, x, m, k, out) };
    }
    decoded_row_generic(ty, wrow, x, m, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decoded_row_avx2(ty: GgmlType, wrow: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    decoded_row_generic(ty, wrow, x, m, k, out)
}

/// Monomorphised per block type, so that the block's decoding is inlined into the
/// (AVX2) loop that uses it.
#[inline(always)]
fn decoded_row_generic(ty: GgmlType, wrow: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    vidllm_core::with_block!(ty, B => decoded_row_units(B::ELEMS, size_of::<B>(), wrow, x, m, k, out,
        |src: &[u8], dst: &mut [f32]| bytemuck::from_bytes::<B>(src).dequantize(dst)), else match ty {
        // Float types: 32 values at a time.
        GgmlType::F16 => decoded_row_units(QK, 2 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, b)| *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        }),
        GgmlType::Bf16 => decoded_row_units(QK, 2 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            // bf16 is the top half of an f32.
            dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, b)| *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        }),
        _ => decoded_row_units(QK, 4 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
    })
}

/// The row in units of `unit` values (`unit_bytes` bytes each), each decoded by `decode`
/// into a buffer and dotted with every row of `x` in 16 independent lanes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decoded_row_units(
    unit: usize,
    unit_bytes: usize,
    wrow: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    out: &mut [f32],
    decode: impl Fn(&[u8], &mut [f32]),
) {
    let mut buf = [0f32; 256];
    let mut acc = [[0f32; 16]; MC];
    for m0 in (0..m).step_by(MC) {
        let mc = MC.min(m - m0);
        acc[..mc].iter_mut().for_each(|a| *a = [0f32; 16]);
        for (u, bytes) in wrow.chunks_exact(unit_bytes).enumerate() {
            let wv = &mut buf[..unit];
            decode(bytes, wv);
            for (i, lane) in acc[..mc].iter_mut().enumerate() {
                let xr = &x[(m0 + i) * k + u * unit..][..unit];
                for (wc, xc) in wv.chunks_exact(16).zip(xr.chunks_exact(16)) {
                    for j in 0..16 {
                        lane[j] += wc[j] * xc[j];
                    }
                }
            }
        }
        for i in 0..mc {
            out[m0 + i] = acc[i].iter().sum();
        }
    }
}

/// Rows of `W` dequantised at a time for the prefill GEMM: the f32 scratch stays small
/// (2 MiB at k = 1024) whatever the matrix.
const GEMM_TILE_ROWS: usize = 512;

/// `x W^T` through the CPU backend's GEMM, `W` dequantised one tile of rows at a time.
fn gemm_by_row_tiles(ty: GgmlType, x: FlexTensor, w: &[u8], m: usize, n: usize, k: usize) -> FlexTensor {
    let x = <Flex as FloatTensorOps<Flex>>::float_reshape(x, Shape::new([m, k]));
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    let tiles: Vec<FlexTensor> = (0..n)
        .step_by(GEMM_TILE_ROWS)
        .map(|r0| {
            let rows = GEMM_TILE_ROWS.min(n - r0);
            let bytes = &w[r0 * row_bytes..(r0 + rows) * row_bytes];
            let tile = FlexTensor::from_data(TensorData::new(dequantize_rows(ty, bytes, rows, k), [rows, k]));
            // A transposed view: the GEMM reads it through strides, no copy.
            let tile_t = <Flex as FloatTensorOps<Flex>>::float_transpose(tile);
            <Flex as FloatTensorOps<Flex>>::float_matmul(x.clone(), tile_t) // [m, rows]
        })
        .collect();
    if tiles.len() == 1 {
        return tiles.into_iter().next().expect("one tile");
    }
    <Flex as FloatTensorOps<Flex>>::float_cat(tiles, 1)
}

/// `W` `[n, k]` in f32 from its blocks, rows decoded in parallel.
fn dequantize_rows(ty: GgmlType, w: &[u8], n: usize, k: usize) -> Vec<f32> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let row_bytes = k / be * bb;
    let mut rows = vec![0f32; n * k];
    rows.par_chunks_mut(k).enumerate().for_each(|(r, out)| {
        let src = &w[r * row_bytes..(r + 1) * row_bytes];
        for (blk, o) in src.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
            dequant_block(ty, blk, o);
        }
    });
    rows
}

/// One weight row against every row of `x`, on the best instruction set available.
fn row(ty: GgmlType, wrow: &[u8], x: &[f32], xsum: &[f32], m: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { row_avx2(ty, wrow, x, xsum, m, k, out) };
    }
    row_generic::<false>(ty, wrow, x, xsum, m, k, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(ty: GgmlType, wrow: &[u8], x: &[f32], xsum: &[f32], m: usize, k: usize, out: &mut [f32]) {
    row_generic::<true>(ty, wrow, x, xsum, m, k, out)
}

/// The 4-bit types: a scale, 16 bytes of nibbles, and a constant term per block.
trait Nibbles: Block {
    fn scale(&self) -> f32;
    /// What each element adds beyond `q * d` (given `d`): `-8 d` for Q4_0, `m` for Q4_1.
    /// It multiplies the block's sum of `x`.
    fn bias(&self, d: f32) -> f32;
    fn nibbles(&self) -> &[u8; QK / 2];
}

impl Nibbles for BlockQ4_0 {
    fn scale(&self) -> f32 {
        self.d()
    }
    fn bias(&self, d: f32) -> f32 {
        -8.0 * d
    }
    fn nibbles(&self) -> &[u8; QK / 2] {
        &self.qs
    }
}

impl Nibbles for BlockQ4_1 {
    fn scale(&self) -> f32 {
        self.d()
    }
    fn bias(&self, _d: f32) -> f32 {
        self.m()
    }
    fn nibbles(&self) -> &[u8; QK / 2] {
        &self.qs
    }
}

/// `W_row . x` for a row of 4-bit blocks.
#[inline(always)]
fn dot_q4<B: Nibbles>(wrow: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut constant = 0f32;
    for ((blk, xb), xs) in blocks::<B>(wrow).iter().zip(x.chunks_exact(QK)).zip(xsum) {
        let (d, qs) = (blk.scale(), blk.nibbles());
        let (xl, xh) = xb.split_at(16);
        let mut p = [0f32; 16];
        for j in 0..16 {
            p[j] = (qs[j] & 15) as f32 * xl[j] + (qs[j] >> 4) as f32 * xh[j];
        }
        for j in 0..16 {
            acc[j] += d * p[j];
        }
        constant += blk.bias(d) * xs;
    }
    acc.iter().sum::<f32>() + constant
}

/// `W_row . x` for Q8_0 blocks.
#[inline(always)]
fn dot_q8(wrow: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (blk, xb) in blocks::<BlockQ8_0>(wrow).iter().zip(x.chunks_exact(QK)) {
        let (d, qs) = (blk.d(), &blk.qs);
        let mut p = [0f32; 16];
        for j in 0..16 {
            p[j] = qs[j] as f32 * xb[j] + qs[16 + j] as f32 * xb[16 + j];
        }
        for j in 0..16 {
            acc[j] += d * p[j];
        }
    }
    acc.iter().sum()
}

/// A decoded block: `lo[j]` is element j, `hi[j]` element j + 16, already scaled by `d`
/// (but without the constant term), and the constant per unit of `sum(x)`.
struct Decoded {
    lo: [f32; 16],
    hi: [f32; 16],
    bias: f32,
}

#[inline(always)]
fn decode_nibbles<B: Nibbles>(b: &B) -> Decoded {
    let (d, qs) = (b.scale(), b.nibbles());
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    for j in 0..16 {
        lo[j] = (qs[j] & 15) as f32 * d;
        hi[j] = (qs[j] >> 4) as f32 * d;
    }
    Decoded { lo, hi, bias: b.bias(d) }
}

#[inline(always)]
fn decode(ty: GgmlType, b: &[u8]) -> Decoded {
    match ty {
        GgmlType::Q8_0 => {
            let b: &BlockQ8_0 = bytemuck::from_bytes(b);
            let d = b.d();
            let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
            for j in 0..16 {
                lo[j] = b.qs[j] as f32 * d;
                hi[j] = b.qs[16 + j] as f32 * d;
            }
            Decoded { lo, hi, bias: 0.0 }
        }
        GgmlType::Q4_1 => decode_nibbles(bytemuck::from_bytes::<BlockQ4_1>(b)),
        _ => decode_nibbles(bytemuck::from_bytes::<BlockQ4_0>(b)),
    }
}

/// `FMA`: fused multiply-add instructions are available (else `mul_add` would be a slow
/// library call, so plain multiply and add are used).
#[inline(always)]
fn row_generic<const FMA: bool>(ty: GgmlType, wrow: &[u8], x: &[f32], xsum: &[f32], m: usize, k: usize, out: &mut [f32]) {
    if m == 1 {
        // Decode: one row of x; a loop per type keeps the accumulators in registers.
        out[0] = match ty {
            GgmlType::Q4_0 => dot_q4::<BlockQ4_0>(wrow, x, xsum),
            GgmlType::Q4_1 => dot_q4::<BlockQ4_1>(wrow, x, xsum),
            _ => dot_q8(wrow, x),
        };
        return;
    }
    let nb = k / QK;
    let bb = ty.block_bytes();
    for m0 in (0..m).step_by(MC) {
        let mc = MC.min(m - m0);
        let mut acc = [[0f32; 16]; MC];
        let mut constant = [0f32; MC];
        for b in 0..nb {
            let blk = decode(ty, &wrow[b * bb..(b + 1) * bb]);
            for i in 0..mc {
                let xr = &x[(m0 + i) * k + b * QK..][..QK];
                let (xl, xh) = xr.split_at(16);
                let lane = &mut acc[i];
                for j in 0..16 {
                    lane[j] = if FMA {
                        blk.hi[j].mul_add(xh[j], blk.lo[j].mul_add(xl[j], lane[j]))
                    } else {
                        lane[j] + blk.lo[j] * xl[j] + blk.hi[j] * xh[j]
                    };
                }
                constant[i] += blk.bias * xsum[(m0 + i) * nb + b];
            }
        }
        for i in 0..mc {
            out[m0 + i] = acc[i].iter().sum::<f32>() + constant[i];
        }
    }
}
