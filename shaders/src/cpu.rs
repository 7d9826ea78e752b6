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

use burn::tensor::TensorData;
use burn_flex::{Flex, FlexTensor};
use half::f16;
use rayon::prelude::*;
use vidllm_core::ggml::{GgmlType, QK};

use crate::QuantOps;
use crate::block::ty_from_id;

/// Rows of `x` sharing one decode of a weight block.
const MC: usize = 8;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 16;

impl QuantOps for Flex {
    fn q_matmul(x: FlexTensor, words: FlexTensor, ty: u32, n: usize, k: usize) -> FlexTensor {
        let ty = ty_from_id(ty);
        let m = x.layout().shape().num_elements() / k;
        let x = x.into_data().try_into_vec::<f32>().expect("q_matmul: x must be f32");
        let w: &[u8] = bytemuck::cast_slice(words.storage::<u32>());
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
    yt.par_chunks_mut(m * ROWS_PER_TASK).enumerate().for_each(|(task, out)| {
        let r0 = task * ROWS_PER_TASK;
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
