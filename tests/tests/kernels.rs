//! Every quantised matmul kernel (every block type; GEMV and tiled paths) against an f64
//! product with the dequantised weights, on every device. On the CPU, block types with
//! multiply activations quantised to 16 bits (`cpu_int.rs`); the reference there is the
//! product with those activations. Weights come from
//! `vidllm_shaders::check`: Q4_0, Q4_1, Q8_0, F16 and BF16 quantised, the types only
//! llama.cpp's quantizer writes (K quants, Q5, IQ4) random blocks with finite scales (their
//! decoding is checked against gguf-py in `ggml_blocks.rs`).

use burn::tensor::{Tensor, TensorData};
use vidllm_core::ggml::{GgmlType, dequantize, quantize};
use vidllm_shaders::QuantMatrix;
use vidllm_shaders::check::{reference, values, weight, within_rounding};
use vidllm_shaders::cpu::multiplied_activations;
use vidllm_tests::{max_abs_diff, test_devices};

fn check(ty: GgmlType, m: usize, n: usize, k: usize) {
    let x = values(m * k, 3 + m as u64);
    let blocks = weight(ty, n, k, 7 + n as u64);
    let wq = dequantize(ty, &blocks, n * k);
    for (name, at) in test_devices() {
        let multiplied = if name == "cpu" { multiplied_activations(ty, &x, k) } else { x.clone() };
        let expected = reference(&multiplied, &wq, m, n, k);
        let device = at.device.clone();
        let qm = QuantMatrix::upload(ty, &blocks, n, k, &at).unwrap();
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
        let got = qm.forward(xt).into_data().try_into_vec::<f32>().unwrap();
        let (diff, mag) = max_abs_diff(&got, &expected);
        println!("{ty:?} m={m} n={n} k={k} on {name}: max |diff| {diff:.3e} (max |y| {mag:.2})");
        assert!(within_rounding(diff, mag, k), "{ty:?} m={m} n={n} k={k} on {name}: diff {diff}");
    }
}

const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

#[test]
fn gemv_single_row() {
    for ty in TYPES {
        check(ty, 1, 1536, 576);
        check(ty, 1, 576, 1536);
    }
}

#[test]
fn gemv_small_batch_odd_rows() {
    for ty in TYPES {
        check(ty, 7, 1537, 576);
        check(ty, 3, 5, 32);
    }
}

#[test]
fn tiled_prefill_odd_shapes() {
    for ty in TYPES {
        check(ty, 33, 1536, 576);
        check(ty, 9, 49, 96);
        check(ty, 70, 200, 160);
    }
}

/// The types of llama.cpp's K-quant mixes (Q4_K_M and friends), their fallbacks for rows
/// that are not whole 256-element blocks, and 16-bit float files.
const FILE_TYPES: [GgmlType; 11] = [
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Iq4Xs,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Iq4Nl,
    GgmlType::F16,
    GgmlType::Bf16,
];

#[test]
fn file_types_gemv_and_tiled() {
    for ty in FILE_TYPES {
        let k = ty.block_elems().max(32) * 3;
        check(ty, 1, 67, k);
        check(ty, 5, 33, k);
        check(ty, 37, 70, 2 * k);
    }
}

#[test]
fn upload_keeps_blocks_as_they_are() {
    let at = vidllm_tests::cpu();
    let blocks = quantize(GgmlType::Q4_1, &values(64 * 32, 1));
    let qm = QuantMatrix::upload(GgmlType::Q4_1, &blocks, 64, 32, &at).unwrap();
    // One spare word for unaligned reads at the end, nothing else.
    assert_eq!(qm.device_bytes(), blocks.len() + 4);
    assert!(QuantMatrix::upload(GgmlType::Q4_1, &blocks[1..], 64, 32, &at).is_err());
}
