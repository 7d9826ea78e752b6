//! Every quantised matmul kernel (every block type; GEMV and tiled paths, and on wgpu both
//! the cooperative kernels and the per-unit ones) against an f64 product with the
//! dequantised weights, on every device. On the CPU, block types with
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
use vidllm_shaders::device::{MatmulKernels, Placement};
use vidllm_tests::{max_abs_diff, test_devices};

/// Every device, and on wgpu each kind of matmul kernel (a software GPU such as lavapipe
/// picks the per-unit ones itself; the cooperative ones are a hardware GPU's).
fn devices_and_kernels() -> Vec<(String, Placement)> {
    test_devices()
        .into_iter()
        .flat_map(|(name, at)| {
            if name == "cpu" {
                return vec![(name, at)];
            }
            [MatmulKernels::Cooperative, MatmulKernels::PerUnit]
                .into_iter()
                .map(|kind| (format!("{name}, {kind:?} kernels"), at.with_matmul(kind)))
                .collect()
        })
        .collect()
}

fn check(ty: GgmlType, m: usize, n: usize, k: usize) {
    let x = values(m * k, 3 + m as u64);
    let blocks = weight(ty, n, k, 7 + n as u64);
    let wq = dequantize(ty, &blocks, n * k);
    for (name, at) in devices_and_kernels() {
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

/// `forward_add` (the residual added where the product writes each value: GEMV, per-unit
/// and tiled kernels) gives bit for bit the add after the product, on every device.
#[test]
fn forward_add_is_the_add_after_the_product() {
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q6K] {
        for (m, n, k) in [(1, 1536, 768), (7, 1537, 768), (33, 200, 256)] {
            let x = values(m * k, 11 + m as u64);
            let r = values(m * n, 13 + n as u64);
            let blocks = weight(ty, n, k, 17 + n as u64);
            for (name, at) in devices_and_kernels() {
                let device = at.device.clone();
                let qm = QuantMatrix::upload(ty, &blocks, n, k, &at).unwrap();
                let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &device);
                let rt = Tensor::<2>::from_data(TensorData::new(r.clone(), [m, n]), &device);
                let after = (rt.clone() + qm.forward(xt.clone())).into_data().try_into_vec::<f32>().unwrap();
                let fused = qm.forward_add(xt, rt).into_data().try_into_vec::<f32>().unwrap();
                let same = after.iter().zip(&fused).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} m={m} n={n} k={k} on {name}: forward_add differs from the add after the product");
            }
        }
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

/// RMSNorm in f64 from the same f32 inputs.
fn rms_reference(x: &[f32], w: &[f32], d: usize, eps: f64) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(&v, &w)| (f64::from(v) * inv * f64::from(w)) as f32)
        })
        .collect()
}

/// The fused RMSNorm (one kernel) against f64 on every device: a decode row, a few odd
/// rows, a row shorter than the kernel's lanes, and more rows than one grid dimension
/// holds (WebGPU's 65,535 workgroups), from a column slice as a stacked projection gives.
#[test]
fn rms_norm_matches_f64() {
    for (rows, d) in [(1, 576), (7, 80), (3, 5), (70_000, 8)] {
        let wide = values(rows * (d + 3), 11 + rows as u64);
        let w = values(d, 5);
        let x: Vec<f32> = wide.chunks(d + 3).flat_map(|r| r[3..].to_vec()).collect();
        let expected = rms_reference(&x, &w, d, 1e-5);
        for (name, at) in test_devices() {
            let device = at.device.clone();
            let xt = Tensor::<2>::from_data(TensorData::new(wide.clone(), [rows, d + 3]), &device).narrow(1, 3, d);
            let wt = Tensor::<1>::from_data(TensorData::new(w.clone(), [d]), &device);
            let got = vidllm_shaders::rms_norm(xt, &wt, 1e-5).into_data().try_into_vec::<f32>().unwrap();
            let (diff, mag) = max_abs_diff(&got, &expected);
            println!("rms_norm {rows}x{d} on {name}: max |diff| {diff:.3e} (max |y| {mag:.2})");
            // f32 rounding: each of 64 lanes sums d / 64 squares, a 6-level tree joins
            // them, then a division, a square root and two products.
            let bound = (d.div_ceil(64) + 6 + 4) as f32 * f32::EPSILON * mag;
            assert!(diff <= bound, "rms_norm {rows}x{d} on {name}: diff {diff} over {bound}");
        }
    }
}

/// RoPE with the heads split out, in f64 from the same f32 tables: rows `[t, heads * d]`
/// -> `[heads, t, d]`.
fn rope_reference(x: &[f32], cos: &[f32], sin: &[f32], positions: &[usize], heads: usize, d: usize, halves: bool) -> Vec<f32> {
    let (t, half) = (positions.len(), d / 2);
    let mut y = vec![0f32; x.len()];
    for h in 0..heads {
        for (r, &p) in positions.iter().enumerate() {
            for j in 0..half {
                let (a, b) = if halves { (j, j + half) } else { (2 * j, 2 * j + 1) };
                let (x0, x1) = (f64::from(x[(r * heads + h) * d + a]), f64::from(x[(r * heads + h) * d + b]));
                let (c, s) = (f64::from(cos[p * half + j]), f64::from(sin[p * half + j]));
                y[(h * t + r) * d + a] = (x0 * c - x1 * s) as f32;
                y[(h * t + r) * d + b] = (x0 * s + x1 * c) as f32;
            }
        }
    }
    y
}

/// The fused RoPE (one kernel, heads split out) against f64 on every device: both pair
/// layouts; consecutive positions (a prompt, a decode step) and listed ones (a reduced
/// video's kept tokens, a batched decode step); queries sliced out of a stacked product.
#[test]
fn rope_heads_matches_f64() {
    let max_pos = 40;
    for (heads, d) in [(3, 64), (2, 16)] {
        let half = d / 2;
        let (cos, sin) = (values(max_pos * half, 21), values(max_pos * half, 22));
        for positions in [vec![9], (4..9).collect(), vec![0, 1, 5, 6, 30, 39], vec![7, 3, 3]] {
            let t = positions.len();
            let wide = values(t * (heads * d + 8), 31 + t as u64);
            let x: Vec<f32> = wide.chunks(heads * d + 8).flat_map(|r| r[8..].to_vec()).collect();
            for halves in [false, true] {
                let expected = rope_reference(&x, &cos, &sin, &positions, heads, d, halves);
                for (name, at) in test_devices() {
                    let device = at.device.clone();
                    let table = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [max_pos, half]), &device);
                    let xt = Tensor::<2>::from_data(TensorData::new(wide.clone(), [t, heads * d + 8]), &device).narrow(1, 8, heads * d);
                    let y = vidllm_shaders::rope_heads(xt, &table(&cos), &table(&sin), &positions, heads, halves);
                    assert_eq!(y.dims(), [1, heads, t, d]);
                    let got = y.into_data().try_into_vec::<f32>().unwrap();
                    let (diff, mag) = max_abs_diff(&got, &expected);
                    println!("rope {heads}x{d} at {positions:?} halves={halves} on {name}: max |diff| {diff:.3e} (max |y| {mag:.2})");
                    // Two products and a sum in f32, with |cos|, |sin| <= 1 and |x| <= 1.
                    let bound = 3.0 * f32::EPSILON;
                    assert!(diff <= bound, "rope {heads}x{d} at {positions:?} halves={halves} on {name}: diff {diff} over {bound}");
                }
            }
        }
    }
}

/// The towers' sigmoid-form GELUs (QuickGELU, and the tanh approximation as
/// `x sigmoid(2u)`) against f64 on every device, value by value, with values up to 12 in
/// size (saturated both ways, and results below f32's normal range): the argument `z`
/// rounds up to five times (each a relative error in `sigmoid` of up to `|z|` ulp), then
/// `exp` (WGSL's within `3 + 2|z|` ulp), a sum, a product and a division.
#[test]
fn gelu_sigmoid_matches_f64() {
    let (rows, d) = (3, 1537);
    let x: Vec<f32> = values(rows * d, 43).iter().map(|v| v * 12.0).collect();
    let tanh_a = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    for (name, at) in test_devices() {
        for (form, a, b) in [("quick", 1.702f32, 0f32), ("tanh", tanh_a as f32, 0.044_715f32)] {
            let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, d]), &at.device);
            let got = vidllm_shaders::gelu_sigmoid(t, a, b).into_data().try_into_vec::<f32>().unwrap();
            let mut worst = 0f64;
            for (&y, &v) in got.iter().zip(&x) {
                let v = f64::from(v);
                let z = f64::from(a) * (v + f64::from(b) * v * v * v);
                let expected = v / (1.0 + (-z).exp());
                let bound = (8.0 + 7.0 * z.abs()) * f64::from(f32::EPSILON) * expected.abs() + f64::from(f32::MIN_POSITIVE);
                let diff = (f64::from(y) - expected).abs();
                assert!(diff <= bound, "gelu_sigmoid ({form}) on {name}: x {v}: {y} against {expected}");
                worst = worst.max(diff / bound);
            }
            println!("gelu_sigmoid ({form}) {rows}x{d} on {name}: worst error {worst:.2} of its bound");
        }
    }
}

/// SwiGLU's fused gating (on gate and up side by side, as the stacked product gives them)
/// against f64 on every device, value by value: WGSL's `exp` is
/// within `3 + 2|x|` ulp, then a sum, a division and a product each round once.
#[test]
fn silu_mul_matches_f64() {
    let (rows, d) = (3, 1537);
    let gate: Vec<f32> = values(rows * d, 41).iter().map(|v| v * 12.0).collect();
    let up = values(rows * d, 42);
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let joined: Vec<f32> = gate.chunks(d).zip(up.chunks(d)).flat_map(|(g, u)| [g, u].concat()).collect();
        let gate_up = Tensor::<2>::from_data(TensorData::new(joined, [rows, 2 * d]), &device);
        let got = vidllm_shaders::silu_mul(gate_up).into_data().try_into_vec::<f32>().unwrap();
        let mut worst = 0f64;
        for ((&y, &g), &u) in got.iter().zip(&gate).zip(&up) {
            let (g, u) = (f64::from(g), f64::from(u));
            let expected = g / (1.0 + (-g).exp()) * u;
            let bound = (6.0 + 2.0 * g.abs()) * f64::from(f32::EPSILON) * expected.abs() + f64::from(f32::MIN_POSITIVE);
            let diff = (f64::from(y) - expected).abs();
            assert!(diff <= bound, "silu_mul on {name}: gate {g} up {u}: {y} against {expected}");
            worst = worst.max(diff / bound);
        }
        println!("silu_mul {rows}x{d} on {name}: worst error {worst:.2} of its bound");
    }
}
