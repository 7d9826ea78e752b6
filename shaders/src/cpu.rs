//! CPU implementation of [`QuantOps`] for the Flex backend.
//!
//! Same arithmetic as the GPU kernels (f32 activations, weights dequantised on the fly),
//! arranged for the CPU's vector units:
//! - per block, `sum_j q_j x_j` is accumulated in 16 independent lanes (the compiler
//!   vectorises the lane loop), scaled by `d`; the block's constant term (`m` for Q4_1,
//!   `-8 d` for Q4_0) multiplies the precomputed block sum of `x`;
//! - each decoded weight block is reused for up to `MC` rows of `x` (prefill);
//! - output rows are split over threads; an AVX2+FMA build of the same loop is picked at
//!   run time where the processor has it.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{Shape, TensorData};
use burn_flex::{Flex, FlexTensor};
use half::f16;
use rayon::prelude::*;
use vidllm_core::ggml::{GgmlType, QK, dequant_block};

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
        let y = q_matmul_cpu(ty, &x, w, m, n, k);
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }
}

/// `y[m, n] = sum_k x[m, k] * deq(W)[n, k]` for GGML blocks `w` (`n` rows of `k / 32`).
pub fn q_matmul_cpu(ty: GgmlType, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let nb = k / QK;
    // Block sums of x: the constant term of each block multiplies them.
    let xsum: Vec<f32> = x.chunks_exact(QK).map(|b| b.iter().sum()).collect();
    let row_bytes = nb * ty.block_bytes();
    let mut yt = vec![0f32; n * m]; // transposed: [n, m]
    let rows_per_task = MIN_ROWS_PER_TASK.max(n.div_ceil(4 * rayon::current_num_threads()));
    yt.par_chunks_mut(m * rows_per_task).enumerate().for_each(|(task, out)| {
        let r0 = task * rows_per_task;
        for (i, orow) in out.chunks_mut(m).enumerate() {
            let wrow = &w[(r0 + i) * row_bytes..(r0 + i + 1) * row_bytes];
            row(ty, wrow, x, &xsum, m, k, orow);
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

/// Rows of `W` dequantised at a time for the prefill GEMM: the f32 scratch stays small
/// (2 MiB at k = 1024) whatever the matrix.
const GEMM_TILE_ROWS: usize = 512;

/// `x W^T` through the CPU backend's GEMM, `W` dequantised one tile of rows at a time.
fn gemm_by_row_tiles(ty: GgmlType, x: FlexTensor, w: &[u8], m: usize, n: usize, k: usize) -> FlexTensor {
    let x = <Flex as FloatTensorOps<Flex>>::float_reshape(x, Shape::new([m, k]));
    let row_bytes = k / QK * ty.block_bytes();
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
    let row_bytes = k / QK * ty.block_bytes();
    let mut rows = vec![0f32; n * k];
    rows.par_chunks_mut(k).enumerate().for_each(|(r, out)| {
        let src = &w[r * row_bytes..(r + 1) * row_bytes];
        for (b, blk) in src.chunks_exact(ty.block_bytes()).enumerate() {
            dequant_block(ty, blk, &mut out[b * QK..(b + 1) * QK]);
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

/// `W_row . x` for Q4_0 (`Q4_1 = false`) or Q4_1 blocks.
#[inline(always)]
fn dot_q4<const Q4_1: bool>(wrow: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let bb = if Q4_1 { 20 } else { 18 };
    let qoff = if Q4_1 { 4 } else { 2 };
    let mut acc = [0f32; 16];
    let mut constant = 0f32;
    for ((blk, xb), xs) in wrow.chunks_exact(bb).zip(x.chunks_exact(QK)).zip(xsum) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let bias = if Q4_1 { f16::from_le_bytes([blk[2], blk[3]]).to_f32() } else { -8.0 * d };
        let qs: &[u8; 16] = blk[qoff..qoff + 16].try_into().expect("16 quant bytes");
        let (xl, xh) = xb.split_at(16);
        let mut p = [0f32; 16];
        for j in 0..16 {
            p[j] = (qs[j] & 15) as f32 * xl[j] + (qs[j] >> 4) as f32 * xh[j];
        }
        for j in 0..16 {
            acc[j] += d * p[j];
        }
        constant += bias * xs;
    }
    acc.iter().sum::<f32>() + constant
}

/// `W_row . x` for Q8_0 blocks.
#[inline(always)]
fn dot_q8(wrow: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (blk, xb) in wrow.chunks_exact(34).zip(x.chunks_exact(QK)) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let qs: &[u8; 32] = blk[2..34].try_into().expect("32 quant bytes");
        let mut p = [0f32; 16];
        for j in 0..16 {
            p[j] = qs[j] as i8 as f32 * xb[j] + qs[16 + j] as i8 as f32 * xb[16 + j];
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
fn decode(ty: GgmlType, b: &[u8]) -> Decoded {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    match ty {
        GgmlType::Q8_0 => {
            for j in 0..16 {
                lo[j] = b[2 + j] as i8 as f32 * d;
                hi[j] = b[18 + j] as i8 as f32 * d;
            }
            Decoded { lo, hi, bias: 0.0 }
        }
        _ => {
            let q4_1 = ty == GgmlType::Q4_1;
            let qs = if q4_1 { &b[4..20] } else { &b[2..18] };
            for j in 0..16 {
                lo[j] = (qs[j] & 15) as f32 * d;
                hi[j] = (qs[j] >> 4) as f32 * d;
            }
            // Q4_0: (q - 8) d = q d - 8 d; Q4_1: q d + m.
            let bias = if q4_1 { f16::from_le_bytes([b[2], b[3]]).to_f32() } else { -8.0 * d };
            Decoded { lo, hi, bias }
        }
    }
}

/// `FMA`: fused multiply-add instructions are available (else `mul_add` would be a slow
/// library call, so plain multiply and add are used).
#[inline(always)]
fn row_generic<const FMA: bool>(ty: GgmlType, wrow: &[u8], x: &[f32], xsum: &[f32], m: usize, k: usize, out: &mut [f32]) {
    if m == 1 {
        // Decode: one row of x; a loop per type keeps the accumulators in registers.
        out[0] = match ty {
            GgmlType::Q4_0 => dot_q4::<false>(wrow, x, xsum),
            GgmlType::Q4_1 => dot_q4::<true>(wrow, x, xsum),
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
