//! CPU implementation of [`QuantOps`] for the Flex backend.
//!
//! Each output row `n` decodes its weight blocks once and reuses them for every row of
//! `x`, so prefill costs one decode per weight, like the GPU's tiled kernel.

use burn::tensor::TensorData;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use vidllm_core::ggml::{GgmlType, QK, dequant_block};

use crate::QuantOps;
use crate::block::ty_from_id;

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

/// Reference-grade CPU kernel: `y[m, n] = sum_k x[m, k] * deq(W)[n, k]`.
pub fn q_matmul_cpu(ty: GgmlType, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let row_bytes = k / QK * ty.block_bytes();
    // Rows of the transposed result, computed in parallel, then transposed back.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(m).enumerate().for_each(|(row, out)| {
        let wrow = &w[row * row_bytes..(row + 1) * row_bytes];
        let mut buf = [0f32; QK];
        for (b, blk) in wrow.chunks_exact(ty.block_bytes()).enumerate() {
            dequant_block(ty, blk, &mut buf);
            for (i, acc) in out.iter_mut().enumerate() {
                let xs = &x[i * k + b * QK..i * k + (b + 1) * QK];
                *acc += xs.iter().zip(&buf).map(|(a, b)| a * b).sum::<f32>();
            }
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
