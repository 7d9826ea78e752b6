//! Inputs for checking the matmul kernels: deterministic activations and weights of any
//! packed type, and the f64 product every device is compared with: by the kernel tests,
//! and in the browser package for WebGPU (`checkKernels()`), since what a GPU driver
//! computes is worth checking where the model will run.

use half::f16;
use vidllm_core::ggml::{GgmlType, quantize};

/// `n` values in [-1, 1) from a xorshift stream (the same on every platform).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// An `[n, k]` weight of type `ty`: Q4_0, Q4_1, Q8_0, F16 and BF16 quantised from
/// [`values`]; the types only llama.cpp's quantizer writes (K quants, Q5, IQ4) as random
/// blocks whose f16 scales are finite and small (every bit pattern of the rest is valid).
pub fn weight(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    if matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::F32) {
        return quantize(ty, &values(n * k, seed));
    }
    let count = n * k / ty.block_elems();
    let mut out: Vec<u8> = values(count * ty.block_bytes(), seed).iter().map(|v| ((v + 1.0) * 127.99) as u8).collect();
    let scales = values(2 * count, seed ^ 0x5ca1e);
    let l = ty.layout();
    for (b, blk) in out.chunks_exact_mut(ty.block_bytes()).enumerate() {
        let mut put = |at: usize, v: f32| blk[at..at + 2].copy_from_slice(&f16::from_f32(v * 0.02).to_le_bytes());
        put(l.d, scales[2 * b]);
        // The minimum (Q4_1, Q5_1) or dmin (Q2_K, Q4_K, Q5_K).
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q2K | GgmlType::Q4K | GgmlType::Q5K) {
            put(l.m, scales[2 * b + 1]);
        }
    }
    out
}

/// `y[m, n] = sum_k x[m, k] w[n, k]`, summed in f64.
pub fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
            y[i * n + j] = s as f32;
        }
    }
    y
}

/// Whether a product over `k` terms differs from its reference (whose largest magnitude is
/// `max_abs`) by no more than f32 rounding of a k-long sum: the bound every kernel check uses.
pub fn within_rounding(max_diff: f32, max_abs: f32, k: usize) -> bool {
    max_diff <= 2e-5 * (k as f32).sqrt() * max_abs.max(1.0)
}

/// The row length a kernel check of `ty` uses: three 32-element groups, or two K super-blocks.
pub fn check_k(ty: GgmlType) -> usize {
    if ty.block_elems() > crate::GROUP { 2 * ty.block_elems() } else { 3 * crate::GROUP }
}
