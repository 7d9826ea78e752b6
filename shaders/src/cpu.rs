//! CPU implementation of [`QuantOps`] for the Flex backend.
//!
//! - Block types, any number of rows of `x`: the integer path (`cpu_int.rs`): `x`
//!   quantised to 16 bits once per product, weight blocks read as integer codes, integer
//!   SIMD dot products. From 4 rows on, on x86-64, as a register-tiled GEMM
//!   (`cpu_gemm.rs`, `cpu_gemm_lanes.rs`); one row on AVX-512 by `cpu_gemv.rs` (or
//!   `cpu_vnni.rs` where the processor has VNNI), on hot workers (`cpu_hot.rs`);
//!   otherwise row by row, each decoded block reused for up to 8 rows. Where the
//!   processor has VNNI, the 32-element block types' matrices are repacked on upload
//!   with sixteen rows side by side (`cpu_repack.rs`, [`QuantOps::lay_out_weights`]):
//!   decode reads them so, and each prefill task unpacks its band.
//! - Attention: fused (`cpu_attention.rs`).
//! - F16 / BF16 / F32, few rows: each unit of 32 values decoded into a small buffer and
//!   dotted with the rows of `x` in 16 f32 lanes (reads the packed row once; allocates
//!   nothing the size of the matrix).
//! - F16 / BF16 / F32 from `GEMM_MIN_M` rows of `x` on (prefill): tiles of rows are
//!   dequantised for the CPU backend's f32 GEMM.
//! - Output rows are split over threads; an AVX2+FMA build of the loops is picked at run
//!   time where the processor has it.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::{Shape, TensorData};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use vidllm_core::ggml::{GgmlType, QK, dequant_block};

use crate::QuantOps;
use crate::block::ty_from_id;
use crate::cpu_attention::Rows;
use crate::cpu_int::{self, ActBits, IntActs};
use crate::{cpu_gemm, cpu_gemv, cpu_repack};

/// Rows of `x` sharing one decode of a weight block.
const MC: usize = 8;
/// From this many rows of `x` on (prefill), the weight is dequantised into a transient f32
/// scratch and multiplied by the CPU backend's GEMM: the decode is amortised over the rows
/// and the GEMM is cache-blocked. The resident copy stays in blocks.
const GEMM_MIN_M: usize = 32;
/// Fewest output rows per parallel task; a matrix is split into about four tasks per
/// thread, since waking the pool costs as much as a small row block.
const MIN_ROWS_PER_TASK: usize = 16;

/// The values of a whole, contiguous f32 tensor, in place.
fn whole_f32(t: &FlexTensor) -> &[f32] {
    assert!(t.is_contiguous() && t.layout().start_offset() == 0, "a whole f32 tensor");
    let values = t.storage::<f32>();
    &values[..t.layout().shape().num_elements()]
}

/// A step tensor's values ([`crate::STEP_WORDS`] u32).
fn step_values(step: &FlexTensor) -> [u32; crate::STEP_WORDS] {
    let v = step.storage::<u32>();
    let at = step.layout().start_offset();
    std::array::from_fn(|i| v[at + i])
}

/// `t`'s values overwritten with `values` (its whole storage, from its start).
fn overwrite<E: burn::tensor::Element + bytemuck::Pod>(mut t: FlexTensor, values: &[E]) -> FlexTensor {
    assert!(t.is_contiguous() && t.layout().start_offset() == 0, "overwrite: a whole tensor");
    t.storage_mut::<E>()[..values.len()].copy_from_slice(values);
    t
}

/// Values from which the row-wise ops (RMSNorm, RoPE) split their rows over threads: a
/// decode step's rows are done before the pool would wake.
const PAR_MIN_VALUES: usize = 1 << 16;

/// Weight rows per parallel task for a product with `n` output rows ([`MIN_ROWS_PER_TASK`]).
pub(crate) fn rows_per_task(n: usize) -> usize {
    MIN_ROWS_PER_TASK.max(n.div_ceil(4 * rayon::current_num_threads()))
}

impl QuantOps for Flex {
    /// Fused (`cpu_attention.rs`); the mask is read from `mask`, the bias not used.
    fn attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, _bias: FlexTensor, scale: f64, mask: crate::Mask) -> FlexTensor {
        let dims = |t: &FlexTensor| -> [usize; 4] { t.layout().shape().dims::<4>() };
        let ([b, h, rows, d], [_, _, keys, _]) = (dims(&q), dims(&k));
        let data = |t: FlexTensor| t.into_data().try_into_vec::<f32>().expect("attention: f32 tensors");
        // Keys and values are views of the KV cache: read in place where each head's rows
        // are contiguous (always, for the cache), copied otherwise.
        let (k, v) = (contiguous_heads(k), contiguous_heads(v));
        let (kh, vh): (Vec<Rows>, Vec<Rows>) =
            (head_slices(&k, b * h).into_iter().map(Rows::F32).collect(), head_slices(&v, b * h).into_iter().map(Rows::F32).collect());
        let out = crate::cpu_attention::attention(&data(q), &kh, &vh, rows, keys, d, scale as f32, mask);
        FlexTensor::from_data(TensorData::new(out, [b, h, rows, d]))
    }

    /// Each row quantised by `vidllm_core::ggml::quantize` into the cache's bytes.
    fn kv_write(cache: FlexTensor, x: FlexTensor, ty: u32, start: usize) -> FlexTensor {
        let ty = ty_from_id(ty);
        let [_, rows, words] = cache.layout().shape().dims::<3>();
        let [_, t, d] = x.layout().shape().dims::<3>();
        assert!(start + t <= rows, "kv_write: rows {start}..{} of {rows}", start + t);
        assert!(cache.is_contiguous() && cache.layout().start_offset() == 0, "kv_write: a whole cache");
        let x = x.into_data().try_into_vec::<f32>().expect("kv_write: x must be f32");
        let mut cache = cache;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(cache.storage_mut::<u32>());
        let stride = words * 4;
        for (r, row) in x.chunks_exact(d).enumerate() {
            let (h, i) = (r / t, r % t);
            let q = vidllm_core::ggml::quantize(ty, row);
            bytes[(h * rows + start + i) * stride..][..q.len()].copy_from_slice(&q);
        }
        cache
    }

    /// The fused attention (`cpu_attention.rs`) reading the cache's blocks in place.
    fn kv_attention(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        ty: u32,
        keys: usize,
        _bias: FlexTensor,
        scale: f64,
        mask: crate::Mask,
    ) -> FlexTensor {
        let ty = ty_from_id(ty);
        let [b, h, rows, d] = q.layout().shape().dims::<4>();
        let [heads, capacity, words] = k.layout().shape().dims::<3>();
        assert!(heads == b * h && keys <= capacity, "kv_attention: {heads} heads of {capacity} rows for {b}x{h} heads and {keys} keys");
        let stride = words * 4;
        fn heads_of(t: &FlexTensor, ty: GgmlType, capacity: usize, stride: usize) -> Vec<Rows<'_>> {
            assert!(t.is_contiguous() && t.layout().start_offset() == 0, "kv_attention: a whole cache");
            let bytes: &[u8] = bytemuck::cast_slice(t.storage::<u32>());
            bytes.chunks_exact(capacity * stride).map(|bytes| Rows::Packed { ty, bytes, stride }).collect()
        }
        let q = q.into_data().try_into_vec::<f32>().expect("kv_attention: q must be f32");
        let (kh, vh) = (heads_of(&k, ty, capacity, stride), heads_of(&v, ty, capacity, stride));
        let out = crate::cpu_attention::attention(&q, &kh, &vh, rows, keys, d, scale as f32, mask);
        FlexTensor::from_data(TensorData::new(out, [b, h, rows, d]))
    }

    /// The step's values read here, then [`QuantOps::kv_write`].
    fn kv_write_step(cache: FlexTensor, x: FlexTensor, ty: u32, step: FlexTensor) -> FlexTensor {
        let row = step_values(&step)[crate::STEP_ROW as usize] as usize;
        Self::kv_write(cache, x, ty, row)
    }

    /// The step's values read here, then [`QuantOps::kv_attention`] with no mask.
    fn kv_attention_step(q: FlexTensor, k: FlexTensor, v: FlexTensor, ty: u32, step: FlexTensor, scale: f64) -> FlexTensor {
        let keys = step_values(&step)[crate::STEP_KEYS as usize] as usize;
        let unused = q.clone();
        Self::kv_attention(q, k, v, ty, keys, unused, scale, crate::Mask::None)
    }

    /// The rotations and the writes one after the other ([`QuantOps::rope_heads_step`],
    /// [`QuantOps::kv_write_step`]): on the CPU they are a few hundred values.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_step(
        qkv: FlexTensor,
        cos: FlexTensor,
        sin: FlexTensor,
        step: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        ty: u32,
        heads: usize,
        kv_heads: usize,
        halves: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let d = qkv.layout().shape().num_elements() / (heads + 2 * kv_heads);
        let values = qkv.into_data().try_into_vec::<f32>().expect("rope_kv_step: f32 projections");
        let part = |from: usize, n: usize, shape: Vec<usize>| {
            FlexTensor::from_data(TensorData::new(values[from * d..(from + n) * d].to_vec(), shape))
        };
        let q = Self::rope_heads_step(part(0, heads, vec![1, heads * d]), cos.clone(), sin.clone(), step.clone(), heads, halves);
        let keys = Self::rope_heads_step(part(heads, kv_heads, vec![1, kv_heads * d]), cos, sin, step.clone(), kv_heads, halves);
        let keys = <Flex as FloatTensorOps<Flex>>::float_reshape(keys, Shape::new([kv_heads, 1, d]));
        let k = Self::kv_write_step(k, keys, ty, step.clone());
        let v = Self::kv_write_step(v, part(heads + kv_heads, kv_heads, vec![kv_heads, 1, d]), ty, step);
        (q, k, v)
    }

    /// The step's values read here, then [`QuantOps::rope_heads`].
    fn rope_heads_step(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, step: FlexTensor, heads: usize, halves: bool) -> FlexTensor {
        let position = step_values(&step)[crate::STEP_POSITION as usize];
        Self::rope_heads(x, cos, sin, vec![position], heads, halves)
    }

    fn overwrite_f32(t: FlexTensor, values: Vec<f32>) -> FlexTensor {
        overwrite(t, &values)
    }

    fn overwrite_u32(t: FlexTensor, values: Vec<u32>) -> FlexTensor {
        overwrite(t, &values)
    }

    /// Bands of the 32-element block types repacked for the decode kernel where it runs
    /// ([`cpu_repack::applies`]), in place; every band noted for the huge pages.
    fn lay_out_weights(mut words: FlexTensor, ty: u32, n: usize, k: usize) -> FlexTensor {
        let ty = ty_from_id(ty);
        if cpu_repack::applies(ty, n, k) {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(words.storage_mut::<u32>());
            let nb = k / ty.block_elems();
            cpu_repack::repack(ty, &mut bytes[..n * nb * ty.block_bytes()], nb);
        }
        crate::cpu_pages::note_weights(bytemuck::cast_slice(words.storage::<u32>()));
        words
    }

    /// Row by row, the sum of squares in f64 (as ggml sums it); rows split over threads
    /// from [`PAR_MIN_VALUES`] values on.
    fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f64) -> FlexTensor {
        let [rows, d] = x.layout().shape().dims::<2>();
        let w = whole_f32(&weight);
        let mut y = x.into_data().try_into_vec::<f32>().expect("rms_norm: f32 rows");
        let norm = |row: &mut [f32]| {
            let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / d as f64;
            let inv = (1.0 / (ms + eps).sqrt()) as f32;
            row.iter_mut().zip(w).for_each(|(v, &w)| *v = *v * inv * w);
        };
        if y.len() >= PAR_MIN_VALUES {
            y.par_chunks_mut(d).for_each(norm);
        } else {
            y.chunks_mut(d).for_each(norm);
        }
        FlexTensor::from_data(TensorData::new(y, [rows, d]))
    }

    /// With the attention's branch-free `exp`, so the loop vectorises; a prefill's values
    /// are split over threads.
    fn silu_mul(gate_up: FlexTensor) -> FlexTensor {
        let [rows, width] = gate_up.layout().shape().dims::<2>();
        let d = width / 2;
        let gate_up = gate_up.into_data().try_into_vec::<f32>().expect("silu_mul: f32 rows");
        let mut y = vec![0f32; rows * d];
        let gated = |(out, row): (&mut [f32], &[f32])| gate_values(out, &row[..d], &row[d..]);
        if y.len() >= PAR_MIN_VALUES {
            y.par_chunks_mut(d).zip(gate_up.par_chunks(width)).for_each(gated);
        } else {
            y.chunks_mut(d).zip(gate_up.chunks(width)).for_each(gated);
        }
        FlexTensor::from_data(TensorData::new(y, [rows, d]))
    }

    /// With the attention's branch-free `exp`, so the loop vectorises; split over
    /// threads from [`PAR_MIN_VALUES`] on. In place: a vision tower's MLP activations are
    /// the largest tensors of its pass (100 MB for 8 SigLIP frames at 512 px), and a fresh
    /// output of that size is a fresh mapping whose every page faults in, zeroed.
    fn gelu_sigmoid(x: FlexTensor, a: f32, b: f32) -> FlexTensor {
        let [rows, d] = x.layout().shape().dims::<2>();
        let mut y = x.into_data().try_into_vec::<f32>().expect("gelu_sigmoid: f32 values");
        let gated = |x: &mut [f32]| gelu_sigmoid_values(x, a, b);
        if y.len() >= PAR_MIN_VALUES {
            y.par_chunks_mut(PAR_MIN_VALUES / 4).for_each(gated);
        } else {
            gated(&mut y);
        }
        FlexTensor::from_data(TensorData::new(y, [rows, d]))
    }

    /// Head by head and row by row, into the `[heads, t, d]` order.
    fn rope_heads(x: FlexTensor, cos: FlexTensor, sin: FlexTensor, positions: Vec<u32>, heads: usize, halves: bool) -> FlexTensor {
        let [t, width] = x.layout().shape().dims::<2>();
        let d = width / heads;
        let half = d / 2;
        let x = x.into_data().try_into_vec::<f32>().expect("rope_heads: f32 rows");
        // The tables cover every position the model takes (a megabyte or more each): read
        // in place, never copied per call.
        let (cos, sin) = (whole_f32(&cos), whole_f32(&sin));
        let mut y = vec![0f32; x.len()];
        let head = |(h, out): (usize, &mut [f32])| {
            for (r, &p) in positions.iter().enumerate() {
                let (c, s) = (&cos[p as usize * half..][..half], &sin[p as usize * half..][..half]);
                let src = &x[(r * heads + h) * d..][..d];
                let dst = &mut out[r * d..][..d];
                for j in 0..half {
                    let (a, b) = if halves { (j, j + half) } else { (2 * j, 2 * j + 1) };
                    let (x0, x1) = (src[a], src[b]);
                    dst[a] = x0 * c[j] - x1 * s[j];
                    dst[b] = x0 * s[j] + x1 * c[j];
                }
            }
        };
        if y.len() >= PAR_MIN_VALUES {
            y.par_chunks_mut(t * d).enumerate().for_each(head);
        } else {
            y.chunks_mut(t * d).enumerate().for_each(head);
        }
        FlexTensor::from_data(TensorData::new(y, [1, heads, t, d]))
    }

    /// In groups of at most [`cpu_gemv::MAX_ROWS`] rows, each on a path whose per-row
    /// arithmetic is the one-row product's: block types through the AVX-512 decode kernel
    /// (which meets each weight block with every row of the group) or the row-by-row loop,
    /// float types through the decoding loop (never the tiled GEMM of long inputs).
    fn q_matmul_rows(x: FlexTensor, words: FlexTensor, ty: u32, n: usize, k: usize, kernels: u32) -> FlexTensor {
        let m = x.layout().shape().num_elements() / k;
        if m <= 1 {
            return Self::q_matmul(x, words, ty, n, k, kernels);
        }
        let bits = ActBits::from_kernels(kernels);
        let ty = ty_from_id(ty);
        let w: &[u8] = bytemuck::cast_slice(words.storage::<u32>());
        let x = x.into_data().try_into_vec::<f32>().expect("q_matmul_rows: x must be f32");
        let row_bytes = k / ty.block_elems() * ty.block_bytes();
        let repacked = cpu_repack::applies(ty, n, k);
        let group = |rows: &[f32]| -> Vec<f32> {
            let g = rows.len() / k;
            if repacked {
                return cpu_repack::matvec(ty, w, n, &IntActs::quantize_to(rows, k, bits));
            }
            if !cpu_int::takes_integer_path(ty) {
                return q_matmul_decoded(ty, rows, w, g, n, k);
            }
            let acts = IntActs::quantize_to(rows, k, bits);
            if cpu_gemv::available() {
                return cpu_gemv::matvec(ty, w, n, &acts);
            }
            by_weight_rows(w, row_bytes, g, n, |wrow, out| cpu_int::row_dot(ty, wrow, &acts, out))
        };
        let y: Vec<f32> = x.chunks(cpu_gemv::MAX_ROWS * k).flat_map(group).collect();
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }

    /// The product, then the add: on the CPU the add is one pass over `[m, n]` values.
    fn q_matmul_add(x: FlexTensor, words: FlexTensor, ty: u32, n: usize, k: usize, kernels: u32, residual: FlexTensor) -> FlexTensor {
        let y = Self::q_matmul(x, words, ty, n, k, kernels);
        <Flex as FloatTensorOps<Flex>>::float_add(residual, y)
    }

    /// `kernels` names wgpu's kernels (the CPU has one set) and, here, the activations'
    /// precision ([`ActBits::from_kernels`]).
    fn q_matmul(x: FlexTensor, words: FlexTensor, ty: u32, n: usize, k: usize, kernels: u32) -> FlexTensor {
        let ty = ty_from_id(ty);
        let m = x.layout().shape().num_elements() / k;
        let w: &[u8] = bytemuck::cast_slice(words.storage::<u32>());
        let integer = cpu_int::takes_integer_path(ty);
        if m >= GEMM_MIN_M && !integer {
            return gemm_by_row_tiles(ty, x, w, m, n, k);
        }
        let x = x.into_data().try_into_vec::<f32>().expect("q_matmul: x must be f32");
        let y = if integer {
            let acts = IntActs::quantize_to(&x, k, ActBits::from_kernels(kernels));
            let layout = if cpu_repack::applies(ty, n, k) { cpu_gemm::Layout::Repacked } else { cpu_gemm::Layout::File };
            if m >= cpu_gemm::MIN_ROWS && cpu_gemm::available() {
                return FlexTensor::from_data(TensorData::new(cpu_gemm::matmul(ty, w, layout, n, &acts), [m, n]));
            }
            if layout == cpu_gemm::Layout::Repacked {
                return FlexTensor::from_data(TensorData::new(cpu_repack::matvec(ty, w, n, &acts), [m, n]));
            }
            if m == 1 && cpu_gemv::available() {
                return FlexTensor::from_data(TensorData::new(cpu_gemv::matvec(ty, w, n, &acts), [m, n]));
            }
            by_weight_rows(w, k / ty.block_elems() * ty.block_bytes(), m, n, |wrow, out| cpu_int::row_dot(ty, wrow, &acts, out))
        } else {
            q_matmul_decoded(ty, &x, w, m, n, k)
        };
        FlexTensor::from_data(TensorData::new(y, [m, n]))
    }
}

/// `t` (`[b, h, n, d]`, f32) itself where each head's `n x d` values are contiguous and
/// the strides of the outer axes non-negative, else a contiguous copy.
fn contiguous_heads(t: FlexTensor) -> FlexTensor {
    let l = t.layout();
    let [_, _, _, d] = l.shape().dims::<4>();
    let st = l.strides();
    if st[3] == 1 && st[2] == d as isize && st[0] >= 0 && st[1] >= 0 {
        return t;
    }
    let shape = l.shape().clone();
    FlexTensor::from_data(TensorData::new(t.into_data().try_into_vec::<f32>().expect("attention: f32 tensors"), shape))
}

/// The `n x d` values of each of the `heads` heads of `t` (`[b, h, n, d]`, laid out as
/// [`contiguous_heads`] leaves it), in place.
fn head_slices(t: &FlexTensor, heads: usize) -> Vec<&[f32]> {
    let (l, data) = (t.layout(), t.storage::<f32>());
    let [_, h, n, d] = l.shape().dims::<4>();
    let st = l.strides();
    (0..heads).map(|i| &data[l.start_offset() + (i / h) * st[0] as usize + (i % h) * st[1] as usize..][..n * d]).collect()
}

/// The activations the CPU backend multiplies `W` (of type `ty`) by, for `x` in rows of
/// `k`: `x` quantised to 16 bits where the product takes the integer path (block
/// types), `x` itself otherwise. A product is exact to f32
/// rounding against these: what the kernel tests check.
pub fn multiplied_activations(ty: GgmlType, x: &[f32], k: usize) -> Vec<f32> {
    if cpu_int::takes_integer_path(ty) { IntActs::quantize(x, k).dequantize() } else { x.to_vec() }
}

/// `y[m, n]` from one task per band of weight rows: `dot(wrow, out)` writes row `r` of `W`
/// against every row of `x` into `out` (`m` values), and the `[n, m]` result is transposed.
fn by_weight_rows(w: &[u8], row_bytes: usize, m: usize, n: usize, dot: impl Fn(&[u8], &mut [f32]) + Sync) -> Vec<f32> {
    let mut yt = vec![0f32; n * m]; // transposed: [n, m]
    let rows_per_task = rows_per_task(n);
    // On hot workers: where no AVX-512 decode kernel exists (AVX2, wasm's simd128), this is
    // the decode step's product, and a wake-up of rayon's sleeping workers per product
    // costs about as much as the product (in the browser, an `Atomics.notify` and a wait).
    crate::cpu_hot::for_each_chunk_mut(&mut yt, m * rows_per_task, |task, out| {
        let r0 = task * rows_per_task;
        for (i, orow) in out.chunks_mut(m).enumerate() {
            dot(&w[(r0 + i) * row_bytes..(r0 + i + 1) * row_bytes], orow);
        }
    });
    weight_row_major_to_y(yt, m, n)
}

/// `y[m, n]` from the weight-row-major `[n, m]` layout the row-band tasks write (each
/// task's rows one contiguous run); no copy for one row.
pub(crate) fn weight_row_major_to_y(yt: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (r, ys) in yt.chunks_exact(m).enumerate() {
        for (i, v) in ys.iter().enumerate() {
            y[i * n + r] = *v;
        }
    }
    y
}

/// `y[m, n]` for few rows of `x` (decode) and a float type: every unit of 32 values is
/// decoded once into a buffer that stays in L1 and used for each row of `x`. Reads the
/// packed weights once; nothing the size of the matrix is allocated.
fn q_matmul_decoded(ty: GgmlType, x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    by_weight_rows(w, row_bytes, m, n, |wrow, out| decoded_row(ty, wrow, x, m, k, out))
}

/// `out = silu(gate) * up`, on the best instruction set available (the exp's rounding is
/// one instruction from SSE4.1 on, a library call below it).
fn gate_values(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { gate_values_avx512(out, gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { gate_values_avx2(out, gate, up) };
    }
    gate_values_generic(out, gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gate_values_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    gate_values_generic(out, gate, up)
}

/// The same loop on 16 lanes, as [`gelu_sigmoid_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gate_values_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) {
    gate_values_generic(out, gate, up)
}

#[inline(always)]
fn gate_values_generic(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *y = g / (1.0 + crate::cpu_attention::exp(-g)) * u;
    }
}

/// Each value `v` of `x` replaced by `v sigmoid(a (v + b v^3))`.
fn gelu_sigmoid_values(x: &mut [f32], a: f32, b: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { gelu_sigmoid_avx512(x, a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { gelu_sigmoid_avx2(x, a, b) };
    }
    gelu_sigmoid_generic(x, a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_sigmoid_avx2(x: &mut [f32], a: f32, b: f32) {
    gelu_sigmoid_generic(x, a, b)
}

/// The same loop on 16 lanes: 2.6 times the AVX2 loop's values a second on a Zen 4, one
/// thread (`activation_speed`), with the same values, lane for lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn gelu_sigmoid_avx512(x: &mut [f32], a: f32, b: f32) {
    gelu_sigmoid_generic(x, a, b)
}

/// `x sigmoid(z)` as `x / (1 + e)` for `z >= 0` and `x e / (1 + e)` below, with
/// `e = exp(-|z|) = h^2`, `h = exp(-|z| / 2)`, and `x e` taken as `(x h) h`: the
/// attention's `exp` stops at `e^-87`, `e` itself can fall below f32's normal range
/// (which GPUs flush to zero) where `x e` does not, and `h` reaches `e^-174`, past which
/// `x sigmoid(z)` is below the smallest f32 anyway.
#[inline(always)]
fn gelu_sigmoid_generic(x: &mut [f32], a: f32, b: f32) {
    let gate = |v: f32, z: f32| {
        let h = crate::cpu_attention::exp(-0.5 * z.abs());
        (if z >= 0.0 { v } else { v * h * h }) / (1.0 + h * h)
    };
    if b == 0.0 {
        for y in x.iter_mut() {
            *y = gate(*y, a * *y);
        }
    } else {
        for y in x.iter_mut() {
            let v = *y;
            *y = gate(v, a * (v + b * (v * v * v)));
        }
    }
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

/// Monomorphised per float type, so that the decoding is inlined into the (AVX2) loop
/// that uses it. Block types take the integer path (`cpu_int.rs`).
#[inline(always)]
fn decoded_row_generic(ty: GgmlType, wrow: &[u8], x: &[f32], m: usize, k: usize, out: &mut [f32]) {
    match ty {
        // 32 values at a time.
        GgmlType::F16 => decoded_row_units(QK, 2 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, b)| *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        }),
        GgmlType::Bf16 => decoded_row_units(QK, 2 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            // bf16 is the top half of an f32.
            dst.iter_mut().zip(src.chunks_exact(2)).for_each(|(d, b)| *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
        }),
        GgmlType::F32 => decoded_row_units(QK, 4 * QK, wrow, x, m, k, out, |src: &[u8], dst: &mut [f32]| {
            dst.iter_mut().zip(src.chunks_exact(4)).for_each(|(d, b)| *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        block => unreachable!("{} takes the integer path", block.name()),
    }
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

#[cfg(test)]
mod speed {
    /// Millions of values a second through the activations, per instruction set, one thread
    /// (each set's values checked equal to the portable loop's); run by hand:
    /// `RAYON_NUM_THREADS=1 cargo test --release -p vidllm-shaders --lib activation_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn activation_speed() {
        let x: Vec<f32> = (0..1 << 22).map(|i| ((i * 2_654_435_761usize) >> 11) as f32 / 1e5 - 10.0).collect();
        let up: Vec<f32> = x.iter().rev().copied().collect();
        let mut want = x.clone();
        super::gelu_sigmoid_generic(&mut want, 1.702, 0.0);
        let mut want_gate = vec![0f32; x.len()];
        super::gate_values_generic(&mut want_gate, &x, &up);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            type Gelu = unsafe fn(&mut [f32], f32, f32);
            type Gate = unsafe fn(&mut [f32], &[f32], &[f32]);
            let sets: [(&str, bool, Gelu, Gate); 2] = [
                ("avx2", has!("avx2") && has!("fma"), super::gelu_sigmoid_avx2, super::gate_values_avx2),
                ("avx512", has!("avx512f") && has!("fma"), super::gelu_sigmoid_avx512, super::gate_values_avx512),
            ];
            for (name, _, gelu, gate) in sets.into_iter().filter(|s| s.1) {
                let mut y = vec![0f32; x.len()];
                // The quickest of 7 runs of `f`, each after an untimed `prepare` (GELU
                // works in place: its input is put back first).
                let time = |y: &mut [f32], prepare: &dyn Fn(&mut [f32]), f: &mut dyn FnMut(&mut [f32])| {
                    (0..7)
                        .map(|_| {
                            prepare(y);
                            let t = std::time::Instant::now();
                            f(y);
                            t.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min)
                };
                // SAFETY: the features were detected above.
                let g = time(&mut y, &|y| y.copy_from_slice(&x), &mut |y| unsafe { gelu(y, 1.702, 0.0) });
                assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} gelu");
                // SAFETY: as above.
                let s = time(&mut y, &|_| {}, &mut |y| unsafe { gate(y, &x, &up) });
                assert!(y.iter().zip(&want_gate).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} swiglu");
                let rate = |t: f64| x.len() as f64 / t / 1e6;
                eprintln!("{name}: gelu {:.0}, swiglu {:.0} M values/s", rate(g), rate(s));
            }
        }
    }
}
