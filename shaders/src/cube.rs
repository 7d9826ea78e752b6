//! CubeCL kernels for [`QuantOps`] on the cube backend (wgpu natively, WebGPU in the
//! browser; compiled to WGSL, no f16 shader feature needed).
//!
//! Weights are read as little-endian u32 words; a block's bytes need not be word-aligned
//! (Q4_0 blocks are 18 bytes), so reads go through `byte_at` / `word_at`. f16 scales are
//! decoded with integer arithmetic for the same reason.
//!
//! Both kernels walk a row in groups of 32 elements: a whole block of the 32-element types,
//! one of the 8 sub-blocks of a 256-element K super-block (`sub`).
//! - `gemv`: one cube computes `ROWS` outputs; its 32 lanes per output stride over the
//!   row's groups and meet in a shared-memory tree sum. Grid `(ceil(n/ROWS), m)`.
//! - `gemv_units`: the same product for a GPU that is a CPU (lavapipe, SwiftShader): each
//!   unit walks whole rows of W with no shared memory and no barrier. Such a device runs a
//!   cube's units as a few SIMD lanes on one thread and pays for every barrier with a
//!   switch between them; there `gemv` cost about 70 µs a cube whatever its work
//!   (SwiftShader, `profile_webgpu_step.mjs --gpu-times`). It also pays for every load
//!   lane by lane (lavapipe's loads from a buffer are a loop over the lanes), so a unit
//!   takes a register tile: `UNIT_RB` outputs by `UNIT_MB` rows of `x`, each weight decoded
//!   once for the tile's rows of `x` and each value of `x` loaded once for its outputs
//!   (for a lone row of `x`, `UNIT_RB_ONE` outputs), four values a load ([`tile_x4`]). It
//!   decodes codes, scales and indices with no shift ([`nibble`], [`half_from`]):
//!   SwiftShader's JIT (Subzero) has no vector shift by a vector and shifts lane by lane,
//!   which was half its decode step. Grid `(ceil(n/(units*rb)), ceil(m/mb))` with `units`
//!   from [`unit_rows`] (a software GPU runs a cube on one thread, so there must be enough
//!   of them), or `m` rows one at a time for rows of different sequences
//!   (`q_matmul_rows`), so that a batched row equals its product alone.
//! - `tiled`: 32x32 output tile per cube of 16x16 units, each unit 2x2 outputs; one group
//!   (32 k) of `x` and of dequantised `W` staged in shared memory per step.
//!
//! Q4_0, Q4_1 and Q8_0 have hand-arranged dot products (and Q5_0, Q5_1, Q4_K, Q5_K and Q6_K
//! in `gemv_units`); the other types decode element by element (`elem`), from the same field
//! offsets as the CPU's typed blocks.

use burn::tensor::{DType, Shape, TensorData};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::bytes::Bytes;
use cubecl::prelude::*;

use vidllm_core::ggml::{GgmlType, KVALUES_IQ4NL, Layout};

use crate::block::ty_from_id;
use crate::device::MatmulKernels;
use crate::{GEMV_MAX_M, QuantOps, STEP_KEYS, STEP_POSITION, STEP_ROW};

const TYPE_Q4_0: u32 = GgmlType::Q4_0.id();
const TYPE_Q4_1: u32 = GgmlType::Q4_1.id();
const TYPE_Q8_0: u32 = GgmlType::Q8_0.id();
const TYPE_Q5_0: u32 = GgmlType::Q5_0.id();
const TYPE_Q5_1: u32 = GgmlType::Q5_1.id();
const TYPE_IQ4_NL: u32 = GgmlType::Iq4Nl.id();
const TYPE_Q2_K: u32 = GgmlType::Q2K.id();
const TYPE_Q3_K: u32 = GgmlType::Q3K.id();
const TYPE_Q4_K: u32 = GgmlType::Q4K.id();
const TYPE_Q5_K: u32 = GgmlType::Q5K.id();
const TYPE_Q6_K: u32 = GgmlType::Q6K.id();
const TYPE_IQ4_XS: u32 = GgmlType::Iq4Xs.id();
const TYPE_F16: u32 = GgmlType::F16.id();
const TYPE_BF16: u32 = GgmlType::Bf16.id();

/// The IQ4 grid, four signed bytes per word: the literals in `iq4_value` are
/// `KVALUES_IQ4NL` packed so (checked here at compile time).
const fn kvalue_word(i: usize) -> u32 {
    let k = KVALUES_IQ4NL;
    u32::from_le_bytes([k[4 * i] as u8, k[4 * i + 1] as u8, k[4 * i + 2] as u8, k[4 * i + 3] as u8])
}
const _: () = assert!(
    kvalue_word(0) == 0xbfad_9881 && kvalue_word(1) == 0xf6ea_ddcf && kvalue_word(2) == 0x2619_0d01 && kvalue_word(3) == 0x7159_4535
);

/// Field offsets of type `ty`'s blocks, from the typed layouts in `vidllm_core::ggml`.
/// Evaluated while a kernel is expanded (`comptime!`), so they are constants in the WGSL.
fn lay(ty: u32) -> Layout {
    ty_from_id(ty).layout()
}

/// 32-element groups per block: 1, or 8 for the 256-element K types (F16 / BF16 are
/// launched with 32 values as their "block").
fn groups(ty: u32) -> u32 {
    (ty_from_id(ty).block_elems() / 32).max(1) as u32
}

/// Whether the type has a hand-arranged dot product (else `elem` decodes it).
fn legacy(ty: u32) -> bool {
    ty == TYPE_Q4_0 || ty == TYPE_Q4_1 || ty == TYPE_Q8_0
}

/// Whether every block of `ty` starts on a word, with its codes (and fifth bits) on words
/// too: then a word of codes is one load, with no test of its alignment (a branch that a
/// software GPU pays for on every word).
fn word_aligned(ty: u32) -> bool {
    let l = lay(ty);
    ty_from_id(ty).block_bytes().is_multiple_of(4) && l.qs.is_multiple_of(4) && l.qh.is_multiple_of(4)
}

/// Whether `ty` keeps 32 values as 16 bytes of nibble pairs (Q4_0, Q4_1), with a fifth bit
/// each in a `qh` word (Q5_0, Q5_1).
fn nibbles(ty: u32) -> bool {
    ty == TYPE_Q4_0 || ty == TYPE_Q4_1 || ty == TYPE_Q5_0 || ty == TYPE_Q5_1
}

/// Outputs per GEMV cube (one per `UNIT_POS_Y`).
const ROWS: u32 = 4;
/// Lanes per output in the GEMV.
const LANES: u32 = 32;
/// Units per cube of the per-unit GEMV, and the fewest it takes to make `UNIT_CUBES` cubes
/// ([`unit_rows`]); SIMD lanes are 4 (SwiftShader) or 8 (lavapipe on AVX2).
const UNIT_ROWS: u32 = 64;
const UNIT_ROWS_MIN: u32 = 8;
const UNIT_CUBES: u32 = 16;
/// Its tile when there are several rows of `x`: `UNIT_RB` outputs by `UNIT_MB` rows of `x`
/// a unit. On lavapipe (pp64, one run each) tiles of 1x16, 4x16, 8x16, 16x16 and 32x16
/// prefilled at 8.7, 23, 37, 46 and 51 tok/s (8x8: 35, 16x8: 44, 16x32: 48); on
/// SwiftShader 16x16 was the fastest tried for a 17-token prompt (2.2 s of GPU time,
/// 32x16 2.6 s, 16x8 2.6 s).
const UNIT_MB: u32 = 16;
const UNIT_RB: u32 = 16;
/// Outputs a unit for a lone row of `x` (decode). SwiftShader's decode step took 460, 491,
/// 506 and 591 ms of GPU time at 4, 8, 2 and 16 when codes were shifted out; decoded with
/// no shift (natively on SwiftShader, Q4_1, two rounds) it ran 4.5-4.6 tok/s at 8, 4.1-4.3
/// at 4 and 3.6-3.8 at 2, Q8_0 alike at 4 and 8; lavapipe decoded alike at 4 and 8.
const UNIT_RB_ONE: u32 = 8;
/// Output tile edge of the tiled kernel, and its k step (one block).
const TILE: u32 = 32;
/// Padded shared-memory row, against bank conflicts.
const TS: u32 = TILE + 1;

impl QuantOps for CubeBackend {
    /// Composed: the scores by a matmul, scaled, the bias added, a softmax, a matmul with
    /// `v` (burn's own fallback); the bias carries the mask.
    fn attention(q: CubeTensor, k: CubeTensor, v: CubeTensor, bias: CubeTensor, scale: f64, mask: crate::Mask) -> CubeTensor {
        let options = burn::backend::ops::AttentionModuleOptions { scale: Some(scale), ..Default::default() };
        let bias = (mask != crate::Mask::None).then_some(bias);
        burn::backend::ops::attention::attention_fallback::<CubeBackend>(q, k, v, None, bias, options)
    }

    /// One unit per row (head and position): each row's words are written by its unit only.
    fn kv_write(cache: CubeTensor, x: CubeTensor, ty: u32, start: usize) -> CubeTensor {
        let [_, rows, _] = cache.meta.shape().dims::<3>();
        let [_, t, _] = x.meta.shape().dims::<3>();
        assert!(start + t <= rows, "kv_write: rows {start}..{} of {rows}", start + t);
        pack_rows(cache, x, ty, start, None)
    }

    /// [`QuantOps::kv_write`]'s kernel, reading the row from `step` when it runs.
    fn kv_write_step(cache: CubeTensor, x: CubeTensor, ty: u32, step: CubeTensor) -> CubeTensor {
        pack_rows(cache, x, ty, 0, Some(step))
    }

    /// One launch of [`rope_kv`], where the queries' and keys' RoPE and the two cache
    /// writes took four.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_step(
        qkv: CubeTensor,
        cos: CubeTensor,
        sin: CubeTensor,
        step: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        ty: u32,
        heads: usize,
        kv_heads: usize,
        halves: bool,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        let d = qkv.meta.shape().num_elements() / (heads + 2 * kv_heads);
        let [_, rows, words] = k.meta.shape().dims::<3>();
        let qkv = into_contiguous(qkv);
        let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
        let (k, v) = (writable(k), writable(v));
        let q = empty_f32(&qkv, [1, heads, 1, d]);
        let units = ((heads * d) + 2 * kv_heads) as u32;
        let client = qkv.client.clone();
        rope_kv::launch(
            &client,
            grid(units.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            qkv.into_buffer_arg(),
            cos.into_buffer_arg(),
            sin.into_buffer_arg(),
            step.into_buffer_arg(),
            q.clone().into_buffer_arg(),
            k.clone().into_buffer_arg(),
            v.clone().into_buffer_arg(),
            heads as u32,
            kv_heads as u32,
            d as u32,
            rows as u32,
            words as u32,
            ty,
            halves,
        );
        (q, k, v)
    }

    /// Kernels that read the packed rows where they use them, with no f32 copy of the
    /// context: `kv_scores` (each query row against each key row, scaled, the bias
    /// added), then `kv_softmax` (each row of scores made its weights in place) and
    /// `kv_weigh` (the weighted sum of the value rows); when few rows meet many keys (a
    /// decode step), `kv_mix` (the softmax taken online over parts of the keys, side by
    /// side) and `kv_mix_join` instead.
    fn kv_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        ty: u32,
        keys: usize,
        bias: CubeTensor,
        scale: f64,
        mask: crate::Mask,
    ) -> CubeTensor {
        // Without a mask the bias is not read (`attend_packed` binds a stand-in).
        let bias = (mask != crate::Mask::None).then(|| into_contiguous(bias));
        attend_packed(q, k, v, ty, keys, bias, None, scale)
    }

    /// [`QuantOps::kv_attention`]'s kernels over every row the cache holds, each key past
    /// `step[STEP_KEYS]` skipped when they run: the grids depend on the cache's size only.
    fn kv_attention_step(q: CubeTensor, k: CubeTensor, v: CubeTensor, ty: u32, step: CubeTensor, scale: f64) -> CubeTensor {
        let [_, cap, _] = k.meta.shape().dims::<3>();
        attend_packed(q, k, v, ty, cap, None, Some(step), scale)
    }

    /// One cube of [`NORM_LANES`] units per row: a strided sum of squares, a shared-memory
    /// tree sum, then the row scaled. On a software GPU one unit per row takes the same sums
    /// in the same order ([`rms_rows_units`]).
    fn rms_norm(x: CubeTensor, weight: CubeTensor, eps: f64) -> CubeTensor {
        let [rows, d] = x.meta.shape().dims::<2>();
        let x = into_contiguous(x);
        let weight = into_contiguous(weight);
        let out = empty_f32(&x, [rows, d]);
        let client = x.client.clone();
        if is_software(&client) {
            rms_rows_units::launch(
                &client,
                grid((rows as u32).div_ceil(NORM_UNITS)),
                CubeDim::new_1d(NORM_UNITS),
                x.into_buffer_arg(),
                weight.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                rows as u32,
                d as u32,
                eps as f32,
            );
            return out;
        }
        rms_rows::launch(
            &client,
            grid(rows as u32),
            CubeDim::new_1d(NORM_LANES),
            x.into_buffer_arg(),
            weight.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            rows as u32,
            d as u32,
            eps as f32,
        );
        out
    }

    /// One unit per value.
    fn silu_mul(gate_up: CubeTensor) -> CubeTensor {
        let [rows, width] = gate_up.meta.shape().dims::<2>();
        let d = width / 2;
        let gate_up = into_contiguous(gate_up);
        let out = empty_f32(&gate_up, [rows, d]);
        let units = (rows * d) as u32;
        let client = gate_up.client.clone();
        silu_mul_values::launch(
            &client,
            grid(units.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            gate_up.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            units,
            d as u32,
        );
        out
    }

    /// One unit per value.
    fn gelu_sigmoid(x: CubeTensor, a: f32, b: f32) -> CubeTensor {
        let [rows, d] = x.meta.shape().dims::<2>();
        let x = into_contiguous(x);
        let units = (rows * d) as u32;
        let out = empty_f32(&x, [rows, d]);
        let client = x.client.clone();
        gelu_sigmoid_values::launch(
            &client,
            grid(units.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            x.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            units,
            a,
            b,
        );
        out
    }

    /// One unit per rotated pair. Consecutive positions (a prompt, a decode step) are a
    /// scalar start, so a step uploads nothing; others are uploaded as a list.
    fn rope_heads(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, positions: Vec<u32>, heads: usize, halves: bool) -> CubeTensor {
        let start = positions.first().copied().unwrap_or(0);
        let listed = positions.windows(2).any(|w| w[1] != w[0] + 1);
        // Unlisted, the list is not read: the cosines stand in (bound twice, read-only).
        let list = listed.then(|| {
            let t = positions.len();
            <CubeBackend as burn::backend::ops::IntTensorOps<CubeBackend>>::int_from_data(TensorData::new(positions, [t]), &x.device)
        });
        rotate_pairs(x, cos, sin, list, start, heads, halves)
    }

    /// The step's position (`step[STEP_POSITION]`) is the one-entry list the kernel reads.
    fn rope_heads_step(x: CubeTensor, cos: CubeTensor, sin: CubeTensor, step: CubeTensor, heads: usize, halves: bool) -> CubeTensor {
        assert_eq!(x.meta.shape().dims::<2>()[0], 1, "rope_heads_step: one row");
        rotate_pairs(x, cos, sin, Some(step), 0, heads, halves)
    }

    /// Written in place with the client's buffer write: the tensor keeps its buffer.
    fn overwrite_f32(t: CubeTensor, values: Vec<f32>) -> CubeTensor {
        let len = values.len() * 4;
        overwrite(t, Bytes::from_elems(values), len)
    }

    fn overwrite_u32(t: CubeTensor, values: Vec<u32>) -> CubeTensor {
        let len = values.len() * 4;
        overwrite(t, Bytes::from_elems(values), len)
    }

    /// The file's layout, which the kernels read; the device's own memory: nothing for
    /// the host to settle.
    fn lay_out_weights(words: CubeTensor, _ty: u32, _n: usize, _k: usize) -> CubeTensor {
        words
    }

    /// The cooperative GEMV computes each row on its own already; past its rows, the tiled
    /// matmul's per-row sums run in the same order whatever the other rows are. The
    /// per-unit kernel takes one row of `x` at a time here, as for a lone row.
    fn q_matmul_rows(x: CubeTensor, words: CubeTensor, ty: u32, n: usize, k: usize, kernels: u32) -> CubeTensor {
        q_product(x, words, ty, n, k, kernels, true, None)
    }

    fn q_matmul(x: CubeTensor, words: CubeTensor, ty: u32, n: usize, k: usize, kernels: u32) -> CubeTensor {
        q_product(x, words, ty, n, k, kernels, false, None)
    }

    /// The residual is added where each output value is written ([`with_residual`]).
    fn q_matmul_add(x: CubeTensor, words: CubeTensor, ty: u32, n: usize, k: usize, kernels: u32, residual: CubeTensor) -> CubeTensor {
        q_product(x, words, ty, n, k, kernels, false, Some(residual))
    }
}

/// [`QuantOps::q_matmul`] on wgpu; `one_by_one`: the per-unit kernel takes each row of `x`
/// as it takes a lone row; `residual` (`[m, n]`): added to each output value as it is
/// written ([`QuantOps::q_matmul_add`]).
#[allow(clippy::too_many_arguments)]
fn q_product(
    x: CubeTensor,
    words: CubeTensor,
    ty: u32,
    n: usize,
    k: usize,
    kernels: u32,
    one_by_one: bool,
    residual: Option<CubeTensor>,
) -> CubeTensor {
    let gt = ty_from_id(ty);
    let x = into_contiguous(x);
    let m = x.meta.shape().num_elements() / k;
    let out = empty_f32(&x, [m, n]);
    let add = residual.is_some();
    // Without a residual it is not read: `x` stands in (both bindings read-only).
    let res = match residual {
        Some(r) => {
            assert_eq!(r.meta.shape().num_elements(), m * n, "q_matmul_add: the residual is [m, n]");
            into_contiguous(r)
        }
        None => x.clone(),
    };
    // Bytes per block, or per group of 32 for F16 / BF16 (blocks of one element).
    let bb = (gt.block_bytes() * (crate::GROUP / gt.block_elems()).max(1)) as u32;
    let nb = (k / crate::GROUP) as u32;
    let client = x.client.clone();
    let per_unit = match MatmulKernels::from_id(kernels) {
        MatmulKernels::Auto => is_software(&client),
        MatmulKernels::Cooperative => false,
        MatmulKernels::PerUnit => true,
    };
    if per_unit {
        let mb = if m == 1 || one_by_one { 1 } else { UNIT_MB };
        let rb = if mb == 1 { UNIT_RB_ONE } else { UNIT_RB };
        let units = unit_rows(n as u32, m as u32, rb, mb);
        let count = CubeCount::Static((n as u32).div_ceil(units * rb), (m as u32).div_ceil(mb), 1);
        gemv_units::launch(
            &client,
            count,
            CubeDim::new_1d(units),
            words.into_buffer_arg(),
            x.into_buffer_arg(),
            res.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            m as u32,
            n as u32,
            nb,
            bb,
            ty,
            rb,
            mb,
            add,
        );
    } else if m <= GEMV_MAX_M {
        let count = CubeCount::Static((n as u32).div_ceil(ROWS), m as u32, 1);
        gemv::launch(
            &client,
            count,
            CubeDim::new_2d(LANES, ROWS),
            words.into_buffer_arg(),
            x.into_buffer_arg(),
            res.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            n as u32,
            nb,
            bb,
            ty,
            add,
        );
    } else {
        let count = CubeCount::Static((n as u32).div_ceil(TILE), (m as u32).div_ceil(TILE), 1);
        tiled::launch(
            &client,
            count,
            CubeDim::new_2d(16, 16),
            words.into_buffer_arg(),
            x.into_buffer_arg(),
            res.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            m as u32,
            n as u32,
            nb,
            bb,
            ty,
            add,
        );
    }
    out
}

/// Units per cube of the per-unit GEMV for `n` outputs and `m` rows of `x`: `UNIT_ROWS`, or
/// fewer where that would make fewer than `UNIT_CUBES` cubes. A software GPU runs a cube on
/// one thread, so a 576-output product in cubes of 512 outputs kept one of two threads
/// waiting for most of it.
fn unit_rows(n: u32, m: u32, rb: u32, mb: u32) -> u32 {
    let mut units = UNIT_ROWS;
    while units > UNIT_ROWS_MIN && n.div_ceil(units * rb) * m.div_ceil(mb) < UNIT_CUBES {
        units /= 2;
    }
    units
}

/// Whether the device is a CPU under a GPU API (lavapipe natively, a browser's fallback
/// adapter such as SwiftShader): CubeCL's wgpu runtime reports no physical card for those.
fn is_software(client: &cubecl::client::Client) -> bool {
    client.properties().identity.physical.is_none()
}

/// A new f32 tensor of `dims` on `like`'s device (every kernel here writes f32 outputs).
fn empty_f32<const D: usize>(like: &CubeTensor, dims: [usize; D]) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), Shape::new(dims), DType::F32)
}

/// `t` itself, to be written in place, or its copy where another tensor shares the storage.
fn writable(t: CubeTensor) -> CubeTensor {
    if t.can_mut() { t } else { t.copy() }
}

/// `kv_pack` over `x`'s rows (`[heads, t, d]`) into `cache`, from row `start`, or from the
/// row `step` holds.
fn pack_rows(cache: CubeTensor, x: CubeTensor, ty: u32, start: usize, step: Option<CubeTensor>) -> CubeTensor {
    let [heads, rows, words] = cache.meta.shape().dims::<3>();
    let [_, t, d] = x.meta.shape().dims::<3>();
    let x = into_contiguous(x);
    let cache = writable(cache);
    let units = (heads * t) as u32;
    let client = x.client.clone();
    let dynamic = step.is_some();
    // Not read: a one-word buffer stands in (the cache, written, may not).
    let step = step.unwrap_or_else(|| empty_u32(&x, 1));
    kv_pack::launch(
        &client,
        grid(units.div_ceil(KV_UNITS)),
        CubeDim::new_1d(KV_UNITS),
        x.into_buffer_arg(),
        step.into_buffer_arg(),
        cache.clone().into_buffer_arg(),
        units,
        t as u32,
        rows as u32,
        start as u32,
        words as u32,
        d as u32,
        ty,
        dynamic,
    );
    cache
}

/// `kv_scores`, then `kv_softmax` and `kv_weigh`, or `kv_mix` and `kv_mix_join` split
/// over the keys, over the first `keys` rows of packed caches; with `step`, `keys` is the
/// scores' row length and `step[STEP_KEYS]` the keys that count.
#[allow(clippy::too_many_arguments)]
fn attend_packed(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    ty: u32,
    keys: usize,
    bias: Option<CubeTensor>,
    step: Option<CubeTensor>,
    scale: f64,
) -> CubeTensor {
    let [_, heads, qrows, d] = q.meta.shape().dims::<4>();
    let [_, cap, words] = k.meta.shape().dims::<3>();
    let q = into_contiguous(q);
    let client = q.client.clone();
    let scores = empty_f32(&q, [heads, qrows, keys]);
    let (masked, dynamic) = (bias.is_some(), step.is_some());
    // What is not read stands in for what is absent (bound twice, both read-only; the
    // output may not stand in, as WebGPU forbids a buffer bound both read-only and
    // writable in one dispatch): the queries for the bias, the keys for the step.
    let bias = bias.unwrap_or_else(|| q.clone());
    let step_k = step.clone().unwrap_or_else(|| k.clone());
    let step_v = step.unwrap_or_else(|| v.clone());
    // Tiles of query rows by keys: a decode step has a few rows (a group's heads).
    let rq = (qrows as u32).min(SCORE_ROWS);
    let units = (heads as u32) * (qrows as u32).div_ceil(rq) * (keys as u32).div_ceil(SCORE_KEYS);
    kv_scores::launch(
        &client,
        grid(units.div_ceil(KV_UNITS)),
        CubeDim::new_1d(KV_UNITS),
        q.into_buffer_arg(),
        k.into_buffer_arg(),
        bias.into_buffer_arg(),
        step_k.into_buffer_arg(),
        scores.clone().into_buffer_arg(),
        units,
        qrows as u32,
        keys as u32,
        cap as u32,
        words as u32,
        d as u32,
        scale as f32,
        ty,
        masked,
        dynamic,
        rq,
        SCORE_KEYS,
    );
    let out = empty_f32(&scores, [1, heads, qrows, d]);
    let units = (heads * qrows * d) as u32;
    // Few rows (a decode step: one per head) over many keys: each unit of one pass
    // would walk every key in turn while most of a GPU idles (an H200 ran 9 cubes of
    // 64 for SmolLM2's decode), so the keys are cut into parts mixed side by side and
    // joined after (flash-decoding).
    let parts = (keys as u32).div_ceil(MIX_PART_KEYS);
    if parts >= 2 && units < MIX_SPLIT_BELOW {
        // Each part's unnormalised sums and its maximum and sum of exponentials.
        let rows = heads * qrows * parts as usize;
        let (mixed, stats) = (empty_f32(&scores, [rows, d]), empty_f32(&scores, [rows, 2]));
        kv_mix::launch(
            &client,
            grid((units * parts).div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            scores.into_buffer_arg(),
            v.into_buffer_arg(),
            step_v.into_buffer_arg(),
            mixed.clone().into_buffer_arg(),
            stats.clone().into_buffer_arg(),
            units * parts,
            qrows as u32,
            keys as u32,
            cap as u32,
            words as u32,
            d as u32,
            parts,
            ty,
            dynamic,
        );
        kv_mix_join::launch(
            &client,
            grid(units.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            mixed.into_buffer_arg(),
            stats.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            units,
            d as u32,
            parts,
        );
    } else {
        // One pass: the scores made the softmax's weights in place, then weighed.
        let rows = (heads * qrows) as u32;
        kv_softmax::launch(
            &client,
            grid(rows.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            scores.clone().into_buffer_arg(),
            step_v.clone().into_buffer_arg(),
            rows,
            keys as u32,
            dynamic,
        );
        let rq = (qrows as u32).min(WEIGH_ROWS);
        let rc = if (d as u32).is_multiple_of(WEIGH_CHANNELS) { WEIGH_CHANNELS } else { 1 };
        let units = (heads as u32) * (qrows as u32).div_ceil(rq) * (d as u32 / rc);
        kv_weigh::launch(
            &client,
            grid(units.div_ceil(KV_UNITS)),
            CubeDim::new_1d(KV_UNITS),
            scores.into_buffer_arg(),
            v.into_buffer_arg(),
            step_v.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            units,
            qrows as u32,
            keys as u32,
            cap as u32,
            words as u32,
            d as u32,
            ty,
            dynamic,
            rq,
            rc,
        );
    }
    out
}

/// `rope_pairs` over `x`'s rows: positions from `start` on, or from `list`.
fn rotate_pairs(
    x: CubeTensor,
    cos: CubeTensor,
    sin: CubeTensor,
    list: Option<CubeTensor>,
    start: u32,
    heads: usize,
    halves: bool,
) -> CubeTensor {
    let [t, width] = x.meta.shape().dims::<2>();
    let d = width / heads;
    let x = into_contiguous(x);
    let (cos, sin) = (into_contiguous(cos), into_contiguous(sin));
    let out = empty_f32(&x, [1, heads, t, d]);
    let listed = list.is_some();
    let list = list.unwrap_or_else(|| cos.clone());
    let units = (heads * t * d / 2) as u32;
    let client = x.client.clone();
    rope_pairs::launch(
        &client,
        grid(units.div_ceil(KV_UNITS)),
        CubeDim::new_1d(KV_UNITS),
        x.into_buffer_arg(),
        cos.into_buffer_arg(),
        sin.into_buffer_arg(),
        list.into_buffer_arg(),
        out.clone().into_buffer_arg(),
        units,
        t as u32,
        heads as u32,
        d as u32,
        start,
        listed,
        halves,
    );
    out
}

/// `t`'s buffer overwritten with `len` bytes (its whole, contiguous storage).
fn overwrite(t: CubeTensor, bytes: Bytes, len: usize) -> CubeTensor {
    assert!(t.is_contiguous() && t.meta.shape().num_elements() * 4 == len, "overwrite: a whole tensor of that size");
    t.client.write(&t.handle, bytes);
    t
}

/// A new u32 tensor of `len` values on `like`'s device, not initialised.
fn empty_u32(like: &CubeTensor, len: usize) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), Shape::new([len]), DType::U32)
}

/// Byte `off` of the word buffer.
#[cube]
fn byte_at(w: &[u32], off: u32) -> u32 {
    (w[(off >> 2) as usize] >> ((off & 3) * 8)) & 0xff
}

/// Four bytes starting at any byte offset (the buffer carries a spare word at the end).
#[cube]
fn word_at(w: &[u32], off: u32) -> u32 {
    let i = (off >> 2) as usize;
    let s = (off & 3) * 8;
    let mut v = w[i];
    if s != 0 {
        v = (v >> s) | (w[i + 1] << (32 - s));
    }
    v
}

/// IEEE half at an even byte offset, widened to f32.
#[cube]
fn f16_at(w: &[u32], off: u32) -> f32 {
    half_in(w[(off >> 2) as usize], (off & 2) != 0)
}

/// The IEEE half in the low 16 bits of `word`, widened to f32.
#[cube]
fn half_lo(word: u32) -> f32 {
    half_from((word & 0x8000) * 65536, f32::cast_from(i32::cast_from(word & 0x7fff)))
}

/// The IEEE half in the high 16 bits of `word`, widened to f32.
#[cube]
fn half_hi(word: u32) -> f32 {
    half_from(word & 0x8000_0000, high_em(word))
}

/// The IEEE half in the high (`high`) or low 16 bits of `word`, widened to f32: the half
/// picked before the one conversion.
#[cube]
fn half_in(word: u32, high: bool) -> f32 {
    let sign = select(high, word & 0x8000_0000, (word & 0x8000) * 65536);
    let em = select(high, high_em(word), f32::cast_from(i32::cast_from(word & 0x7fff)));
    half_from(sign, em)
}

/// The high 16 bits of `word`, with no shift.
#[cube]
fn high_half(word: u32) -> u32 {
    let low15 = u32::reinterpret(high_em(word) + 8_388_608.0f32) & 0x7fff;
    low15 | select((word & 0x8000_0000) != 0, 0x8000u32, 0u32)
}

/// The exponent-and-mantissa bits (15) of the half in the high 16 bits of `word`, as f32:
/// brought down by a conversion and a power-of-two multiply (both exact) rather than a
/// shift, which SwiftShader's JIT runs lane by lane.
#[cube]
fn high_em(word: u32) -> f32 {
    f32::cast_from(i32::cast_from(word & 0x7fff_0000)) * comptime![1.0f32 / 65536.0]
}

/// A half from its sign bit (in place for f32, bit 31) and its exponent-and-mantissa bits
/// `em` (`0..0x8000`, an integer as f32), with no shift:
/// - `em + 2^23`'s low mantissa bits are `em`, and times `2^13` (wrapping: the exponent
///   bits go out at the top) they are in f32's fields, to be rebiased;
/// - a zero or subnormal (exponent 0, `em` the mantissa) is `em 2^-24`.
///
/// Each case is computed and one is selected, with no branch: a software GPU pays for a
/// branch whose lanes may differ.
#[cube]
fn half_from(sign: u32, em: f32) -> f32 {
    let moved = u32::reinterpret(em + 8_388_608.0f32) * 8192;
    // Exponent 1..30: rebias by 127 - 15 = 112; 31 (infinity, NaN) becomes 255.
    let bias = select(em >= 31744.0f32, comptime![(255u32 - 31) << 23], comptime![112u32 << 23]);
    let wide = f32::reinterpret(sign | (moved + bias));
    let small = f32::reinterpret(sign | u32::reinterpret(em * 5.960_464_5e-8));
    select(em < 1024.0f32, small, wide)
}

/// Scale, min (Q4_1; 0 otherwise) and first quant byte offset of the block at `base`.
#[cube]
fn block_header(w: &[u32], base: u32, #[comptime] ty: u32) -> (f32, f32, u32) {
    let d = f16_at(w, base + comptime![lay(ty).d as u32]);
    let mut mn = 0.0f32;
    if comptime![ty == TYPE_Q4_1] {
        mn = f16_at(w, base + comptime![lay(ty).m as u32]);
    }
    (d, mn, base + comptime![lay(ty).qs as u32])
}

/// A byte (0..256) as a signed value.
#[cube]
fn signed_byte(b: u32) -> i32 {
    i32::cast_from(b) - i32::cast_from((b >> 7) * 256)
}

/// Little-endian u16 at an even byte offset.
#[cube]
fn u16_at(w: &[u32], off: u32) -> u32 {
    (w[(off >> 2) as usize] >> ((off & 2) * 8)) & 0xffff
}

/// `KVALUES_IQ4NL[q]`.
#[cube]
fn iq4_value(q: u32) -> f32 {
    let low = select(q < 4, 0xbfad_9881u32, 0xf6ea_ddcfu32);
    let high = select(q < 12, 0x2619_0d01u32, 0x7159_4535u32);
    let word = select(q < 8, low, high);
    f32::cast_from(signed_byte((word >> ((q & 3) * 8)) & 0xff))
}

/// The 2-bit field of element `i` (0..256) in 64 bytes at `at`, stored as Q2_K, Q3_K and
/// Q6_K store them: halves of 128, each 32 bytes of four 2-bit fields.
#[cube]
fn crumb(w: &[u32], at: u32, i: u32) -> u32 {
    (byte_at(w, at + 32 * (i / 128) + i % 32) >> (2 * ((i % 128) / 32))) & 3
}

/// Element `i` of the block at `base`, dequantised, for the types without a hand-arranged
/// dot product (`i` < 32, or < 256 for the K types). Mirrors `Block::dequantize` in
/// `vidllm_core::ggml`, from the same field offsets.
#[cube]
fn elem(w: &[u32], base: u32, i: u32, #[comptime] ty: u32) -> f32 {
    let d = f16_at(w, base + comptime![lay(ty).d as u32]);
    let mn_at = base + comptime![lay(ty).m as u32];
    let sc_at = base + comptime![lay(ty).scales as u32];
    let qh_at = base + comptime![lay(ty).qh as u32];
    let qs_at = base + comptime![lay(ty).qs as u32];
    let mut v = 0.0f32;
    if comptime![ty == TYPE_F16] {
        v = f16_at(w, base + 2 * i);
    } else if comptime![ty == TYPE_BF16] {
        v = f32::reinterpret(u16_at(w, base + 2 * i) << 16);
    } else if comptime![ty == TYPE_Q5_0 || ty == TYPE_Q5_1] {
        let lo = (byte_at(w, qs_at + (i & 15)) >> (4 * (i >> 4))) & 15;
        let q = f32::cast_from(lo | (((word_at(w, qh_at) >> i) & 1) << 4));
        if comptime![ty == TYPE_Q5_0] {
            v = (q - 16.0) * d;
        } else {
            v = q * d + f16_at(w, mn_at);
        }
    } else if comptime![ty == TYPE_IQ4_NL] {
        v = iq4_value((byte_at(w, qs_at + (i & 15)) >> (4 * (i >> 4))) & 15) * d;
    } else if comptime![ty == TYPE_Q2_K] {
        let sc = byte_at(w, sc_at + i / 16);
        let q = f32::cast_from(crumb(w, qs_at, i));
        v = d * f32::cast_from(sc & 15) * q - f16_at(w, mn_at) * f32::cast_from(sc >> 4);
    } else if comptime![ty == TYPE_Q3_K] {
        let j = i / 16;
        let low = (byte_at(w, sc_at + j % 8) >> (4 * (j / 8))) & 15;
        let high = (byte_at(w, sc_at + 8 + j % 4) >> (2 * (j / 4))) & 3;
        let sc = f32::cast_from(i32::cast_from(low | (high << 4)) - 32);
        // The high bit is stored inverted: a clear bit subtracts 4.
        let hbit = (byte_at(w, qh_at + i % 32) >> (i / 32)) & 1;
        let q = f32::cast_from(i32::cast_from(crumb(w, qs_at, i)) - 4 * (1 - i32::cast_from(hbit)));
        v = d * sc * q;
    } else if comptime![ty == TYPE_Q4_K || ty == TYPE_Q5_K] {
        let (a, b) = k_scale_min(w, base, i / 32, ty);
        let mut q = (byte_at(w, qs_at + 32 * (i / 64) + i % 32) >> (4 * ((i % 64) / 32))) & 15;
        if comptime![ty == TYPE_Q5_K] {
            q |= ((byte_at(w, qh_at + i % 32) >> (i / 32)) & 1) << 4;
        }
        v = a * f32::cast_from(q) - b;
    } else if comptime![ty == TYPE_Q6_K] {
        let low = (byte_at(w, qs_at + 64 * (i / 128) + i % 64) >> (4 * ((i % 128) / 64))) & 15;
        let q = i32::cast_from(low | (crumb(w, qh_at, i) << 4)) - 32;
        let sc = signed_byte(byte_at(w, sc_at + i / 16));
        v = d * f32::cast_from(sc) * f32::cast_from(q);
    } else if comptime![ty == TYPE_IQ4_XS] {
        let j = i / 32;
        let k = i % 32;
        let sh_at = base + comptime![lay(ty).scales_h as u32];
        let ls = ((byte_at(w, sc_at + j / 2) >> (4 * (j % 2))) & 15) | (((u16_at(w, sh_at) >> (2 * j)) & 3) << 4);
        let q = (byte_at(w, qs_at + 16 * j + (k & 15)) >> (4 * (k >> 4))) & 15;
        v = d * f32::cast_from(i32::cast_from(ls) - 32) * iq4_value(q);
    }
    v
}

/// Sub-block `j`'s scale and min of the Q4_K / Q5_K block at `base`, times the block's `d`
/// and `dmin`: its values are `scale * q - min`. k_scale_min's packing: sub-blocks 0-3 in
/// the low 6 bits of bytes 0-7; 4-7 split between bytes 8-11 and the top bits of bytes
/// 0-7. Both are read (in bounds) and selected.
#[cube]
fn k_scale_min(w: &[u32], base: u32, j: u32, #[comptime] ty: u32) -> (f32, f32) {
    let d = f16_at(w, base + comptime![lay(ty).d as u32]);
    let dmin = f16_at(w, base + comptime![lay(ty).m as u32]);
    let sc_at = base + comptime![lay(ty).scales as u32];
    let first = j < 4;
    let b_j = byte_at(w, sc_at + j);
    let b_j4 = byte_at(w, sc_at + j + 4);
    let b_jm4 = byte_at(w, sc_at + ((j + 4) & 7));
    let sc = select(first, b_j & 63, (b_j4 & 15) | ((b_jm4 >> 6) << 4));
    let m = select(first, b_j4 & 63, (b_j4 >> 4) | ((b_j >> 6) << 4));
    (d * f32::cast_from(sc), dmin * f32::cast_from(m))
}

/// Sub-block `sub`'s 6-bit scale and min in a Q4_K / Q5_K block's three scale words, as
/// `k_scale_min` packs them, picked with masks and powers of two instead of shifts: the
/// same for every row, so chosen once a block. Sub-blocks 0-3: the low 6 bits of byte
/// `sub` of the first word (scale) and of the second (min). 4-7 (`i = sub - 4`): the low
/// (scale) and high (min) nibble of byte `i` of the third word, plus the top two bits of
/// byte `i` of the first (scale) and second (min) words as bits 4-5.
#[derive(CubeType)]
struct KScaleFields {
    /// Of the first and second words: 63 or 0xc0 at byte `i`.
    low_mask: u32,
    low_scale: f32,
    /// Of the third word: 0 (sub-blocks 0-3), else 15 (scale) and 0xf0 (min) at byte `i`.
    sc_mask: u32,
    m_mask: u32,
    sc_scale: f32,
    m_scale: f32,
}

#[cube]
impl KScaleFields {
    fn of_sub(sub: u32) -> KScaleFields {
        let i = sub & 3;
        let first = sub < 4;
        let at = select(i == 0, 1u32, select(i == 1, 256u32, select(i == 2, 65536u32, 16_777_216u32)));
        let down = select(i == 0, 1.0f32, select(i == 1, 1.0f32 / 256.0, select(i == 2, 1.0f32 / 65536.0, 1.0f32 / 16_777_216.0)));
        KScaleFields {
            low_mask: select(first, 63u32, 0xc0u32) * at,
            // Bits 6-7 of a byte become bits 4-5: down by 4.
            low_scale: select(first, down, down * 0.25f32),
            sc_mask: select(first, 0u32, 15u32 * at),
            m_mask: select(first, 0u32, 0xf0u32 * at),
            sc_scale: down,
            m_scale: down * 0.0625f32,
        }
    }

    /// The sub-block's (scale, min), integers as f32, from the block's scale words.
    fn scale_min(&self, s0: u32, s1: u32, s2: u32) -> (f32, f32) {
        let sc = f32::cast_from(s0 & self.low_mask) * self.low_scale + f32::cast_from(s2 & self.sc_mask) * self.sc_scale;
        let m = f32::cast_from(s1 & self.low_mask) * self.low_scale + f32::cast_from(s2 & self.m_mask) * self.m_scale;
        (sc, m)
    }
}

/// Element `j` (0..32) of group `sub` of the block at `base`, dequantised.
#[cube]
fn dequant(w: &[u32], base: u32, sub: u32, j: u32, #[comptime] ty: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime![!legacy(ty)] {
        v = elem(w, base, sub * 32 + j, ty);
    }
    if comptime![legacy(ty)] {
        v = dequant_legacy(w, base, j, ty);
    }
    v
}

/// Element `j` (0..32) of a Q4_0 / Q4_1 / Q8_0 block at `base`, dequantised.
#[cube]
fn dequant_legacy(w: &[u32], base: u32, j: u32, #[comptime] ty: u32) -> f32 {
    let (d, mn, qs) = block_header(w, base, ty);
    if comptime![ty == TYPE_Q8_0] {
        let b = byte_at(w, qs + j);
        f32::cast_from(i32::cast_from(b) - i32::cast_from((b >> 7) * 256)) * d
    } else {
        let b = byte_at(w, qs + (j & 15));
        let q = f32::cast_from(select(j < 16, b & 15, b >> 4));
        // Q4_0: (q - 8) d (mn is 0); Q4_1: q d + m.
        let offset = comptime![if ty == TYPE_Q4_0 { 8.0f32 } else { 0.0f32 }];
        (q - offset) * d + mn
    }
}

/// Dot product of group `sub` of the weight block at `base` with 32 values of `x` from `xo`.
#[cube]
fn group_dot(w: &[u32], base: u32, sub: u32, x: &[f32], xo: u32, #[comptime] ty: u32) -> f32 {
    let mut acc = 0.0f32;
    if comptime![!legacy(ty)] {
        for j in 0..32u32 {
            acc += elem(w, base, sub * 32 + j, ty) * x[(xo + j) as usize];
        }
    } else {
        acc = block_dot(w, base, x, xo, ty);
    }
    acc
}

/// Dot product of one Q4_0 / Q4_1 / Q8_0 block with 32 values of `x` starting at `xo`.
#[cube]
fn block_dot(w: &[u32], base: u32, x: &[f32], xo: u32, #[comptime] ty: u32) -> f32 {
    let (d, mn, qs) = block_header(w, base, ty);
    let mut acc = 0.0f32;
    let mut xsum = 0.0f32;
    if comptime![ty == TYPE_Q8_0] {
        for i in 0..8u32 {
            let word = word_at(w, qs + i * 4);
            for b in 0..4u32 {
                let q = (word >> (b * 8)) & 0xff;
                let qv = i32::cast_from(q) - i32::cast_from((q >> 7) * 256);
                acc += f32::cast_from(qv) * x[(xo + i * 4 + b) as usize];
            }
        }
    } else {
        for i in 0..4u32 {
            let word = word_at(w, qs + i * 4);
            for b in 0..4u32 {
                let byte = (word >> (b * 8)) & 0xff;
                let xl = x[(xo + i * 4 + b) as usize];
                let xh = x[(xo + 16 + i * 4 + b) as usize];
                acc += f32::cast_from(byte & 15) * xl + f32::cast_from(byte >> 4) * xh;
                xsum += xl + xh;
            }
        }
    }
    // Q4_0: (q - 8) d; Q4_1: q d + m; Q8_0: q d.
    let mut r = acc * d;
    if comptime![ty == TYPE_Q4_0] {
        r = (acc - 8.0 * xsum) * d;
    } else if comptime![ty == TYPE_Q4_1] {
        r = acc * d + mn * xsum;
    }
    r
}

// Written as a load, an add and a store: the form the kernel code was checked in on every device.
#[allow(clippy::assign_op_pattern)]
#[cube]
fn tree_step(sums: &mut [f32], slot: u32, lane: u32, #[comptime] stride: u32) {
    if lane < stride {
        sums[slot as usize] = sums[slot as usize] + sums[(slot + stride) as usize];
    }
    sync_cube();
}

/// The tree sum of the 32 lanes `slot - lane ..` into `slot - lane` (`lane` < 32).
#[cube]
fn tree_sum32(sums: &mut [f32], slot: u32, lane: u32) {
    tree_step(sums, slot, lane, 16u32);
    tree_step(sums, slot, lane, 8u32);
    tree_step(sums, slot, lane, 4u32);
    tree_step(sums, slot, lane, 2u32);
    tree_step(sums, slot, lane, 1u32);
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gemv(w: &[u32], x: &[f32], res: &[f32], out: &mut [f32], n: u32, nb: u32, bb: u32, #[comptime] ty: u32, #[comptime] add: bool) {
    let lane = UNIT_POS_X;
    let row = CUBE_POS_X * ROWS + UNIT_POS_Y;
    let mrow = CUBE_POS_Y;
    let k = nb * 32;
    let per = comptime![groups(ty)];
    let mut partial = 0.0f32;
    if row < n {
        let row_base = row * (nb / per) * bb;
        let mut b = lane;
        while b < nb {
            partial += group_dot(w, row_base + (b / per) * bb, b % per, x, mrow * k + b * 32, ty);
            b += LANES;
        }
    }
    let mut sums = Shared::<[f32]>::new_slice(comptime![(LANES * ROWS) as usize]);
    let slot = UNIT_POS_Y * LANES + lane;
    sums[slot as usize] = partial;
    sync_cube();
    tree_sum32(&mut sums, slot, lane);
    if lane == 0 && row < n {
        let at = mrow * n + row;
        out[at as usize] = with_residual(res, at, sums[slot as usize], add);
    }
}

#[cube(launch)]
fn gemv_units(
    w: &[u32],
    x4: &[Vector<f32, Const<4>>],
    res: &[f32],
    out: &mut [f32],
    m: u32,
    n: u32,
    nb: u32,
    bb: u32,
    #[comptime] ty: u32,
    #[comptime] rb: u32,
    #[comptime] mb: u32,
    #[comptime] add: bool,
) {
    let row0 = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) * rb;
    let m0 = CUBE_POS_Y * mb;
    let per = comptime![groups(ty)];
    if row0 < n {
        // Where each weight row and each row of `x` starts, once: rows past `n` read the
        // last row again and rows past `m` the last row of `x`; neither is written.
        // Types whose blocks are whole words (`aligned`) count in words, so that no load's
        // index needs a shift (SwiftShader's JIT shifts lane by lane); the others in bytes.
        let aligned = comptime![word_aligned(ty)];
        let bw = bb / 4;
        let row_bytes = (nb / per) * bb;
        let mut wrow = Array::<u32>::new(comptime![rb as usize]);
        #[unroll]
        for rr in 0..rb {
            let row = u32::min(row0 + rr, n - 1);
            wrow[rr as usize] = if comptime![aligned] { row * ((nb / per) * bw) } else { row * row_bytes };
        }
        // `x` is read four values at a time: its rows and blocks start on multiples of 4.
        let mut xrow4 = Array::<u32>::new(comptime![mb as usize]);
        #[unroll]
        for r in 0..mb {
            xrow4[r as usize] = u32::min(m0 + r, m - 1) * (nb * 8);
        }
        // Place values of a word's four low nibbles, of its four high ones, and Q8_0's.
        let mut lo_places = Array::<f32>::new(4usize);
        let mut hi_places = Array::<f32>::new(4usize);
        let mut q8_places = Array::<f32>::new(4usize);
        let mut ones = Array::<f32>::new(4usize);
        #[unroll]
        for s in 0..4u32 {
            lo_places[s as usize] = comptime![place(8 * s)];
            hi_places[s as usize] = comptime![place(8 * s + 4)];
            q8_places[s as usize] = Q8_PLACE;
            ones[s as usize] = 1.0f32;
        }
        let mut acc = Array::<f32>::new(comptime![(rb * mb) as usize]);
        #[unroll]
        for i in 0..rb * mb {
            acc[i as usize] = 0.0f32;
        }
        let mut d = Array::<f32>::new(comptime![rb as usize]);
        let mut mn = Array::<f32>::new(comptime![rb as usize]);
        let mut qs = Array::<u32>::new(comptime![rb as usize]);
        let mut word = Array::<u32>::new(comptime![rb as usize]);
        let mut high = Array::<u32>::new(comptime![rb as usize]);
        let mut qh = Array::<u32>::new(comptime![rb as usize]);
        let mut wv = Array::<f32>::new(comptime![rb as usize]);
        let mut wh = Array::<f32>::new(comptime![rb as usize]);
        // Q4_0 / Q5_0 / Q8_0 / Q6_K (`halves`): each row's code word, whether its codes
        // start half-way into one, and its next word.
        let mut qw = Array::<u32>::new(comptime![rb as usize]);
        let mut odd = Array::<bool>::new(comptime![rb as usize]);
        let mut nxt = Array::<u32>::new(comptime![rb as usize]);
        // The step's code word of each row, realigned where it starts half-way (Q4_0,
        // Q5_0); Q8_0's byte masks and multipliers, 4 a row.
        let mut cur = Array::<u32>::new(comptime![rb as usize]);
        let mut cmask = Array::<u32>::new(comptime![(4 * rb) as usize]);
        let mut cup = Array::<u32>::new(comptime![(4 * rb) as usize]);
        // The hand-arranged types sum `x q` over a block's (or sub-block's) integer codes
        // and `x` itself, then scale once: `sum x (d q + c) = d sum x q + c sum x`. Per
        // weight that is a decode and one multiply-add, where scaling each weight first
        // took three more operations (software GPUs run every one of them).
        let coded = comptime![nibbles(ty) || ty == TYPE_Q8_0 || ty == TYPE_Q4_K || ty == TYPE_Q5_K];
        let mut bacc = Array::<f32>::new(comptime![(rb * mb) as usize]);
        let mut xsum = Array::<f32>::new(comptime![mb as usize]);
        // The values of `x` a word step's codes meet, `xs[r * XS_COLS + slot]`, four columns
        // a load ([`tile_x4`]). For a lone row of `x` (`ahead`) all are loaded before the
        // step's arithmetic: SwiftShader picks a broadcast, vector or lane-by-lane load at run
        // time, a branch each, and Q8_0's decode ran 5% faster with its loads ahead (Q4_1's
        // the same). A tile of several rows stages four columns at a time: LLVM (lavapipe)
        // prefilled 20% slower with a nibble word's eight staged, and there its low codes
        // take their four columns before its high codes take theirs.
        let mut xs = Array::<f32>::new(comptime![(XS_COLS * mb) as usize]);
        let mut xq = Array::<f32>::new(comptime![(XS_COLS * mb) as usize]);
        let ahead = comptime![mb == 1];
        // The block's start in its row (in words where `aligned`, else in bytes) and the
        // group `sub` in it, counted rather than divided (a software GPU divides and shifts
        // lane by lane).
        let blk_step = if comptime![aligned] { bw } else { bb };
        let mut blk = 0u32;
        let mut sub = 0u32;
        // Q4_0 / Q5_0 / Q8_0 / Q6_K blocks (18, 22, 34, 210 bytes) start on a word or half-way into
        // one (`halves`): each row's start as a word and whether it is half-way (once), and
        // the block's place in its row counted in half-words, so that no index needs a shift.
        let halves = comptime![!aligned && (legacy(ty) || ty == TYPE_Q5_0 || ty == TYPE_Q6_K)];
        let mut rw = Array::<u32>::new(comptime![rb as usize]);
        let mut rodd = Array::<bool>::new(comptime![rb as usize]);
        if comptime![halves] {
            #[unroll]
            for rr in 0..rb {
                rw[rr as usize] = wrow[rr as usize] >> 2;
                rodd[rr as usize] = (wrow[rr as usize] & 2) != 0;
            }
        }
        let block_halves = bb / 2;
        let block_words = block_halves / 2;
        let block_odd = (block_halves & 1) == 1;
        let mut blk_words = 0u32;
        let mut blk_odd = false;
        for b in 0..nb {
            if comptime![coded] {
                tile_open(&mut bacc, &mut xsum, rb, mb);
            }
            if comptime![ty == TYPE_Q4_1 || ty == TYPE_Q5_1] {
                // `d` and `m` share the block's first word; Q5_1's `qh` is the second.
                #[unroll]
                for rr in 0..rb {
                    let at = wrow[rr as usize] + blk;
                    let head = w[at as usize];
                    d[rr as usize] = half_lo(head);
                    mn[rr as usize] = half_hi(head);
                    if comptime![ty == TYPE_Q5_1] {
                        high[rr as usize] = w[(at + comptime![lay(ty).qh as u32 / 4]) as usize];
                    }
                    qs[rr as usize] = at + comptime![lay(ty).qs as u32 / 4];
                }
            }
            if comptime![halves && ty != TYPE_Q6_K] {
                // Each row's block start (`start`, and whether half-way); `d` there, then
                // Q5_0's `qh` (4 bytes), then the codes: their word `qw`, whether they start
                // half-way (`odd`, the block's opposite), and that word.
                #[unroll]
                for rr in 0..rb {
                    let o = rodd[rr as usize];
                    let start = rw[rr as usize] + blk_words + u32::cast_from(o && blk_odd);
                    let half_way = o != blk_odd;
                    let head = w[start as usize];
                    d[rr as usize] = half_in(head, half_way);
                    mn[rr as usize] = 0.0f32;
                    let mut q = start + u32::cast_from(half_way);
                    if comptime![ty == TYPE_Q5_0] {
                        let second = w[(start + 1) as usize];
                        high[rr as usize] = select(half_way, second, high_half(head) | (second * 65536));
                        q += 1;
                    }
                    odd[rr as usize] = !half_way;
                    qw[rr as usize] = q;
                    word[rr as usize] = w[q as usize];
                }
            }
            if comptime![nibbles(ty)] {
                // Q4_0 / Q4_1 / Q5_0 / Q5_1: byte `i` of the codes holds value `i` (low
                // half) and value `i + 16` (high half); a word of each weight row at a time.
                // Q5's fifth bits (bit `i` of the block's `qh` word) make it most of a
                // Q4_K_M file whose rows are not whole 256-value super-blocks.
                let five = comptime![ty == TYPE_Q5_0 || ty == TYPE_Q5_1];
                let offset = comptime![match ty {
                    TYPE_Q4_0 => 8.0f32,
                    TYPE_Q5_0 => 16.0f32,
                    _ => 0.0f32,
                }];
                // A weight is `d (q - offset) + m`: `c = m - offset d` goes with `sum x`.
                #[unroll]
                for rr in 0..rb {
                    mn[rr as usize] -= offset * d[rr as usize];
                }
                // Q4_0 and Q5_0 blocks (18 and 22 bytes) put their codes on a word or
                // half-way into one, a row at a time: those rows' words are realigned once a
                // word step (`half_words_realign`), and decoded as the others.
                // Bit `4 j` of the `qh` words: the fifth bits of word `j`'s low codes are it
                // times `1 << s`.
                let mut bit = 1u32;
                for j in 0..4u32 {
                    if comptime![aligned] {
                        tile_words(w, &qs, j, &mut cur, rb);
                    } else {
                        half_words_next(w, &qw, j, &mut nxt, rb);
                        half_words_realign(&word, &nxt, &odd, &mut cur, rb);
                    }
                    // The codes stay at their place values (`nibble`), the values of `x` they
                    // meet scaled to match.
                    if comptime![ahead] {
                        tile_x4(x4, &xrow4, b * 8 + j, &mut xs, &mut xq, &lo_places, 0u32, mb);
                        tile_x4(x4, &xrow4, b * 8 + j + 4, &mut xs, &mut xq, &hi_places, 4u32, mb);
                        #[unroll]
                        for s in 0..4u32 {
                            #[unroll]
                            for rr in 0..rb {
                                wv[rr as usize] = nibble_code(cur[rr as usize], high[rr as usize], bit, s, 0u32, five);
                                wh[rr as usize] = nibble_code(cur[rr as usize], high[rr as usize], bit, s, 1u32, five);
                            }
                            tile_fma(&mut bacc, &mut xsum, &wv, &xs, &xq, s, rb, mb, true);
                            tile_fma(&mut bacc, &mut xsum, &wh, &xs, &xq, comptime![s + 4], rb, mb, true);
                        }
                    } else {
                        // Several rows of `x`: the word's low codes with four columns of each
                        // row (one load of four each), then its high codes with four more.
                        #[unroll]
                        for half in 0..2u32 {
                            let places = if comptime![half == 0] { &lo_places } else { &hi_places };
                            tile_x4(x4, &xrow4, b * 8 + j + comptime![4 * half], &mut xs, &mut xq, places, 0u32, mb);
                            #[unroll]
                            for s in 0..4u32 {
                                #[unroll]
                                for rr in 0..rb {
                                    wv[rr as usize] = nibble_code(cur[rr as usize], high[rr as usize], bit, s, half, five);
                                }
                                tile_fma(&mut bacc, &mut xsum, &wv, &xs, &xq, s, rb, mb, true);
                            }
                        }
                    }
                    bit *= 16u32;
                    if comptime![!aligned] {
                        half_words_advance(&mut word, &nxt, rb);
                    }
                }
                tile_close(&mut acc, &bacc, &xsum, &d, &mn, rb, mb, true);
            } else if comptime![ty == TYPE_Q8_0] {
                // A Q8_0 block is 34 bytes, so its codes start on a word or half-way into
                // one, a row at a time. Code `c` of a word step is the byte `at[c]` of the
                // step's word or, past its middle when the codes start half-way, of the next
                // one: masked there and multiplied up to the top byte (an i32 whose
                // conversion is exact), with no shift. (Realigning the word, as Q4_0 and
                // Q5_0 do, cost more than it saved on four codes a word: SwiftShader's decode
                // 5.0-5.3 -> 4.7-4.8 tok/s.)
                #[unroll]
                for rr in 0..rb {
                    let half = odd[rr as usize];
                    #[unroll]
                    for c in 0..4u32 {
                        let i = (rr * 4 + c) as usize;
                        cmask[i] = select(half, comptime![0xffu32 << (8 * ((c + 2) % 4))], comptime![0xffu32 << (8 * c)]);
                        cup[i] = select(half, comptime![1u32 << (24 - 8 * ((c + 2) % 4))], comptime![1u32 << (24 - 8 * c)]);
                    }
                }
                for j in 0..8u32 {
                    half_words_next(w, &qw, j, &mut nxt, rb);
                    tile_x4(x4, &xrow4, b * 8 + j, &mut xs, &mut xq, &q8_places, 0u32, mb);
                    #[unroll]
                    for s in 0..4u32 {
                        #[unroll]
                        for rr in 0..rb {
                            let i = (rr * 4 + s) as usize;
                            let mut src = word[rr as usize];
                            if comptime![s >= 2] {
                                src = select(odd[rr as usize], nxt[rr as usize], src);
                            }
                            let top = (src & cmask[i]) * cup[i];
                            // The code times 2^24; the values of `x` carry the 2^-24.
                            wv[rr as usize] = f32::cast_from(i32::cast_from(top));
                        }
                        tile_fma(&mut bacc, &mut xsum, &wv, &xs, &xq, s, rb, mb, false);
                    }
                    half_words_advance(&mut word, &nxt, rb);
                }
                tile_close(&mut acc, &bacc, &xsum, &d, &mn, rb, mb, false);
            } else if comptime![ty == TYPE_Q4_K || ty == TYPE_Q5_K] {
                // Q4_K / Q5_K: the sub-block's scale and min once, then its 32 codes, the
                // nibbles of 32 bytes (low for even sub-blocks, high for odd), Q5_K's fifth
                // bit from bit `sub` of 32 more.
                // The sub-block's nibble of byte `s` (the same for every row): its mask and
                // scale, as `nibble` takes them; the top one (an odd sub-block's byte 3)
                // takes the u32 conversion. Q5_K's fifth bit of byte `s` is bit `sub` of
                // its byte in `qh`.
                let odd_sub = (sub & 1) == 1;
                let mut kmask = Array::<u32>::new(4usize);
                let mut kscale = Array::<f32>::new(4usize);
                let mut k16 = Array::<f32>::new(4usize);
                #[unroll]
                for s in 0..4u32 {
                    kmask[s as usize] = select(odd_sub, comptime![0xf0u32 << (8 * s)], comptime![0xfu32 << (8 * s)]);
                    kscale[s as usize] = select(odd_sub, comptime![place(8 * s + 4)], comptime![place(8 * s)]);
                    k16[s as usize] = select(odd_sub, comptime![sixteen(8 * s + 4)], comptime![sixteen(8 * s)]);
                }
                let sub_bit = 1u32 << sub;
                let fields = KScaleFields::of_sub(sub);
                #[unroll]
                for rr in 0..rb {
                    // `at` in words: `d` and `dmin` share the first, the scales the next three.
                    let at = wrow[rr as usize] + blk;
                    let head = w[at as usize];
                    let (sc, m) = fields.scale_min(w[(at + 1) as usize], w[(at + 2) as usize], w[(at + 3) as usize]);
                    d[rr as usize] = half_lo(head) * sc;
                    // A weight is `d q - m`.
                    mn[rr as usize] = -(half_hi(head) * m);
                    qs[rr as usize] = at + comptime![lay(ty).qs as u32 / 4] + 4 * (sub & 6);
                    qh[rr as usize] = at + comptime![lay(ty).qh as u32 / 4];
                }
                for j in 0..8u32 {
                    tile_words(w, &qs, j, &mut word, rb);
                    if comptime![ty == TYPE_Q5_K] {
                        tile_words(w, &qh, j, &mut high, rb);
                    }
                    tile_x4(x4, &xrow4, b * 8 + j, &mut xs, &mut xq, &kscale, 0u32, mb);
                    #[unroll]
                    for s in 0..4u32 {
                        #[unroll]
                        for rr in 0..rb {
                            // At its place value: `x` carries the sub-block's nibble scale.
                            let mut q = placed(word[rr as usize] & kmask[s as usize], comptime![s == 3]);
                            if comptime![ty == TYPE_Q5_K] {
                                q += fifth_bit(high[rr as usize], sub_bit * comptime![1u32 << (8 * s)], k16[s as usize]);
                            }
                            wv[rr as usize] = q;
                        }
                        tile_fma(&mut bacc, &mut xsum, &wv, &xs, &xq, s, rb, mb, true);
                    }
                }
                tile_close(&mut acc, &bacc, &xsum, &d, &mn, rb, mb, true);
            } else if comptime![ty == TYPE_Q6_K] {
                // Q6_K, 210 bytes: a block starts on a word or half-way into one, and so do
                // all its fields, so a row's words are realigned as Q5_0's. Group `sub` is
                // quarter `g` of half `h` of the block: its low nibbles are bytes `64 h +
                // 32 (g & 1)..` of `ql` (their high nibbles for `g >= 2`), its high two bits
                // bits `2 g..` of bytes `32 h..` of `qh`, its scales the i8s `8 h + 2 g` (values
                // 0-15) and the next (16-31); a weight is `d sc (q - 32)`. Per byte `s` of a
                // word the nibble stays at its place value (`x` carries it) and the high bits,
                // at theirs, are lifted to meet it: by 16 or 4, by `g`'s parity.
                let half = u32::cast_from(sub >= 4);
                let g = sub & 3;
                let high_nibbles = g >= 2;
                let g_odd = (g & 1) == 1;
                let at_g = select(g == 0, 1u32, select(g == 1, 4u32, select(g == 2, 16u32, 64u32)));
                let lift = select(g_odd, 4.0f32, 16.0f32);
                let mut lmask = Array::<u32>::new(4usize);
                let mut hmask = Array::<u32>::new(4usize);
                let mut lplace = Array::<f32>::new(4usize);
                #[unroll]
                for s in 0..4u32 {
                    lmask[s as usize] = select(high_nibbles, comptime![0xf0u32 << (8 * s)], comptime![0xfu32 << (8 * s)]);
                    hmask[s as usize] = comptime![3u32 << (8 * s)] * at_g;
                    lplace[s as usize] = select(high_nibbles, comptime![place(8 * s + 4)], comptime![place(8 * s)]);
                }
                // The scales' word holds the group's two at bytes 0-1 (even `g`) or 2-3:
                // each masked and multiplied up to the top byte, a signed i32 times 2^24.
                let sc0_mask = select(g_odd, 0x00ff_0000u32, 0x0000_00ffu32);
                let sc0_up = select(g_odd, 256u32, 16_777_216u32);
                let sc1_mask = select(g_odd, 0xff00_0000u32, 0x0000_ff00u32);
                let sc1_up = select(g_odd, 1u32, 65536u32);
                let mut dsc = Array::<f32>::new(comptime![(2 * rb) as usize]);
                let mut hcur = Array::<u32>::new(comptime![rb as usize]);
                let mut hnxt = Array::<u32>::new(comptime![rb as usize]);
                #[unroll]
                for rr in 0..rb {
                    let o = rodd[rr as usize];
                    let start = rw[rr as usize] + blk_words + u32::cast_from(o && blk_odd);
                    let half_way = o != blk_odd;
                    // `d` at byte 208 and the scales at 192: words 52 and 48 on.
                    let dd = half_in(w[(start + 52) as usize], half_way);
                    let sw = start + 48 + 2 * half + u32::cast_from(high_nibbles);
                    let sc_word = realign(w[sw as usize], w[(sw + 1) as usize], half_way);
                    let sc0 = f32::cast_from(i32::cast_from((sc_word & sc0_mask) * sc0_up)) * Q8_PLACE;
                    let sc1 = f32::cast_from(i32::cast_from((sc_word & sc1_mask) * sc1_up)) * Q8_PLACE;
                    dsc[(2 * rr) as usize] = dd * sc0;
                    dsc[(2 * rr + 1) as usize] = dd * sc1;
                    odd[rr as usize] = half_way;
                    let lw = start + 16 * half + 8 * u32::cast_from(g_odd);
                    let hw = start + 32 + 8 * half;
                    qw[rr as usize] = lw;
                    qh[rr as usize] = hw;
                    word[rr as usize] = w[lw as usize];
                    high[rr as usize] = w[hw as usize];
                }
                // Values 0-15 (scale 0), then 16-31 (scale 1): four word steps each.
                #[unroll]
                for part in 0..2u32 {
                    tile_open(&mut bacc, &mut xsum, rb, mb);
                    for jj in 0..4u32 {
                        let j = jj + comptime![4 * part];
                        half_words_next(w, &qw, j, &mut nxt, rb);
                        half_words_realign(&word, &nxt, &odd, &mut cur, rb);
                        half_words_advance(&mut word, &nxt, rb);
                        half_words_next(w, &qh, j, &mut hnxt, rb);
                        half_words_realign(&high, &hnxt, &odd, &mut hcur, rb);
                        half_words_advance(&mut high, &hnxt, rb);
                        tile_x4(x4, &xrow4, b * 8 + j, &mut xs, &mut xq, &lplace, 0u32, mb);
                        #[unroll]
                        for s in 0..4u32 {
                            #[unroll]
                            for rr in 0..rb {
                                let low = placed(cur[rr as usize] & lmask[s as usize], comptime![s == 3]);
                                let top = placed(hcur[rr as usize] & hmask[s as usize], comptime![s == 3]);
                                wv[rr as usize] = top * lift + low;
                            }
                            tile_fma(&mut bacc, &mut xsum, &wv, &xs, &xq, s, rb, mb, true);
                        }
                    }
                    #[unroll]
                    for rr in 0..rb {
                        let v = dsc[(2 * rr + part) as usize];
                        d[rr as usize] = v;
                        mn[rr as usize] = -32.0f32 * v;
                    }
                    tile_close(&mut acc, &bacc, &xsum, &d, &mn, rb, mb, true);
                }
            } else {
                for j4 in 0..8u32 {
                    tile_x4(x4, &xrow4, b * 8 + j4, &mut xs, &mut xq, &ones, 0u32, mb);
                    #[unroll]
                    for s in 0..4u32 {
                        #[unroll]
                        for rr in 0..rb {
                            let at = wrow[rr as usize] + blk;
                            wv[rr as usize] = dequant(w, if comptime![aligned] { at * 4 } else { at }, sub, 4 * j4 + s, ty);
                        }
                        tile_fma(&mut acc, &mut xsum, &wv, &xs, &xq, s, rb, mb, false);
                    }
                }
            }
            let next = sub + 1 == per;
            let carry = blk_odd && block_odd;
            blk_words = select(next, blk_words + block_words + u32::cast_from(carry), blk_words);
            blk_odd = select(next, blk_odd != block_odd, blk_odd);
            blk = select(next, blk + blk_step, blk);
            sub = select(next, 0u32, sub + 1);
        }
        #[unroll]
        for rr in 0..rb {
            #[unroll]
            for r in 0..mb {
                if row0 + rr < n && m0 + r < m {
                    let at = (m0 + r) * n + row0 + rr;
                    out[at as usize] = with_residual(res, at, acc[(rr * mb + r) as usize], add);
                }
            }
        }
    }
}

/// Nibble `k` (`0..8`, from the low end) of `word`, as f32: the word masked to it, converted
/// (exactly: four significant bits), left at its place value `q 2^4k`: the value of `x` it
/// meets carries the `2^-4k` ([`tile_x4`]), taken once for the tile's rows instead of once a
/// weight, and the product is the same. SwiftShader's JIT has no vector shift by a vector,
/// so a shift costs it a scalar shift a lane; masks, conversions and multiplies stay vector
/// instructions.
#[cube]
fn nibble(word: u32, #[comptime] k: u32) -> f32 {
    placed(word & comptime![0xfu32 << (4 * k)], comptime![k == 7])
}

/// What a value of `x` is scaled by to meet a code decoded at place value `2^e` ([`nibble`]).
const fn place(e: u32) -> f32 {
    1.0 / (1u64 << e) as f32
}

/// A Q5 code's fifth bit, 16, at the code's place value `2^e`.
const fn sixteen(e: u32) -> f32 {
    (16u64 << e) as f32
}

/// A masked word as f32, exactly (its few significant bits), at its place value. Below the
/// top nibble it is a positive i32, whose conversion is one instruction (the u32 one, `top`,
/// takes several).
#[cube]
fn placed(part: u32, #[comptime] top: bool) -> f32 {
    if comptime![top] { f32::cast_from(part) } else { f32::cast_from(i32::cast_from(part)) }
}

/// The code of byte `s`'s low (`half` 0) or high (1) nibble of a Q4 / Q5 word step's `word`,
/// at its place value ([`nibble`]); with `five`, plus its fifth bit from the block's `qh`
/// word `high` (bit `4 j` of it is word step `j`'s, `bit` = `16^j`).
#[cube]
fn nibble_code(word: u32, high: u32, bit: u32, #[comptime] s: u32, #[comptime] half: u32, #[comptime] five: bool) -> f32 {
    let mut q = nibble(word, comptime![2 * s + half]);
    if comptime![five] {
        q += fifth_bit(high, bit * comptime![1u32 << (s + 16 * half)], comptime![sixteen(8 * s + 4 * half)]);
    }
    q
}

/// `sixteen` (16 at the code's place value) where `h` has the bit `mask` set, else 0: a Q5
/// code's fifth bit, with no shift.
#[cube]
fn fifth_bit(h: u32, mask: u32, sixteen: f32) -> f32 {
    select((h & mask) != 0, sixteen, 0.0f32)
}

/// Word `j` of each of a tile's `rb` weight blocks' codes (`qs`: their word indices; types
/// whose blocks are whole words).
#[cube]
fn tile_words(w: &[u32], qs: &Array<u32>, j: u32, word: &mut Array<u32>, #[comptime] rb: u32) {
    #[unroll]
    for rr in 0..rb {
        word[rr as usize] = w[(qs[rr as usize] + j) as usize];
    }
}

/// The word after step `j`'s of each row of codes that start on a word or half-way into
/// one (`qw`: their first words), into `nxt`; at the
/// end of the step it becomes the next step's word ([`half_words_advance`]), so each word
/// is loaded once.
#[cube]
fn half_words_next(w: &[u32], qw: &Array<u32>, j: u32, nxt: &mut Array<u32>, #[comptime] rb: u32) {
    #[unroll]
    for rr in 0..rb {
        nxt[rr as usize] = w[(qw[rr as usize] + j + 1) as usize];
    }
}

/// Each row's code word for the step (`cur`): `word`, or where the row's codes start
/// half-way into it (`odd`), its high half then the low half of `nxt` ([`realign`]).
#[cube]
fn half_words_realign(word: &Array<u32>, nxt: &Array<u32>, odd: &Array<bool>, cur: &mut Array<u32>, #[comptime] rb: u32) {
    #[unroll]
    for rr in 0..rb {
        cur[rr as usize] = realign(word[rr as usize], nxt[rr as usize], odd[rr as usize]);
    }
}

/// The word at `w0` where `half_way` is false, else the four bytes from its middle: its
/// high half then the low half of the next word `w1`, with no shift.
#[cube]
fn realign(w0: u32, w1: u32, half_way: bool) -> u32 {
    select(half_way, high_half(w0) | (w1 * 65536), w0)
}

/// The end of a word step of such rows: the next word becomes the word.
#[cube]
fn half_words_advance(word: &mut Array<u32>, nxt: &Array<u32>, #[comptime] rb: u32) {
    #[unroll]
    for rr in 0..rb {
        word[rr as usize] = nxt[rr as usize];
    }
}

/// Q8_0's codes are decoded at place value 2^24 (the top byte of an i32).
const Q8_PLACE: f32 = 1.0 / 16_777_216.0;

/// Values of `x` a tile stages per row of `x`: one word step's (8 for nibble pairs).
const XS_COLS: u32 = 8;

/// Columns `4 i4..4 i4 + 4` of each of the tile's rows of `x` (`x4`: `x` as vectors of four;
/// `xrow4`: each row's start in them) into slots `slot..slot + 4` of `xs` (`xs[r * XS_COLS +
/// slot + s]`), and column `s` times `place[s]` (the inverse of the place value its codes
/// are decoded at, a power of two, so the products are unchanged) into `xq`. One load for
/// four values: a software GPU takes each load lane by lane, and in the browser each also
/// takes Tint's bounds clamp (natively CubeCL turns naga's off). Lavapipe prefilled 10%
/// faster with it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_x4(
    x4: &[Vector<f32, Const<4>>],
    xrow4: &Array<u32>,
    i4: u32,
    xs: &mut Array<f32>,
    xq: &mut Array<f32>,
    place: &Array<f32>,
    #[comptime] slot: u32,
    #[comptime] mb: u32,
) {
    #[unroll]
    for r in 0..mb {
        let v = x4[(xrow4[r as usize] + i4) as usize];
        #[unroll]
        for s in 0..4u32 {
            let at = comptime![(r * XS_COLS + slot + s) as usize];
            let e = v.extract(comptime![s as usize]);
            xs[at] = e;
            xq[at] = e * place[s as usize];
        }
    }
}

/// A tile's products with one column of `x` (loaded by [`tile_x4`] into `slot` of `xs` and,
/// scaled to its codes' place value, of `xq`): `acc[rr * mb + r] += wq[rr] * xq[r * XS_COLS +
/// slot]`, each value of `x` taken once for the `rb` weights (or integer codes, into a block's
/// sums); with `with_sum`, each (unscaled) is also added to its row's `xsum`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_fma(
    acc: &mut Array<f32>,
    xsum: &mut Array<f32>,
    wq: &Array<f32>,
    xs: &Array<f32>,
    xq: &Array<f32>,
    #[comptime] slot: u32,
    #[comptime] rb: u32,
    #[comptime] mb: u32,
    #[comptime] with_sum: bool,
) {
    #[unroll]
    for r in 0..mb {
        if comptime![with_sum] {
            xsum[r as usize] += xs[comptime![(r * XS_COLS + slot) as usize]];
        }
        let xv = xq[comptime![(r * XS_COLS + slot) as usize]];
        #[unroll]
        for rr in 0..rb {
            let a = (rr * mb + r) as usize;
            acc[a] += wq[rr as usize] * xv;
        }
    }
}

/// A block's sums (of `x q` and of `x`) start at zero.
#[cube]
fn tile_open(bacc: &mut Array<f32>, xsum: &mut Array<f32>, #[comptime] rb: u32, #[comptime] mb: u32) {
    #[unroll]
    for i in 0..rb * mb {
        bacc[i as usize] = 0.0f32;
    }
    #[unroll]
    for r in 0..mb {
        xsum[r as usize] = 0.0f32;
    }
}

/// A block's sums into the tile: `acc[rr * mb + r] += d[rr] bacc[rr * mb + r]`, plus
/// `c[rr] xsum[r]` with `with_sum`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn tile_close(
    acc: &mut Array<f32>,
    bacc: &Array<f32>,
    xsum: &Array<f32>,
    d: &Array<f32>,
    c: &Array<f32>,
    #[comptime] rb: u32,
    #[comptime] mb: u32,
    #[comptime] with_sum: bool,
) {
    #[unroll]
    for rr in 0..rb {
        #[unroll]
        for r in 0..mb {
            let a = (rr * mb + r) as usize;
            let mut v = d[rr as usize] * bacc[a];
            if comptime![with_sum] {
                v += c[rr as usize] * xsum[r as usize];
            }
            acc[a] += v;
        }
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn tiled(w: &[u32], x: &[f32], res: &[f32], out: &mut [f32], m: u32, n: u32, nb: u32, bb: u32, #[comptime] ty: u32, #[comptime] add: bool) {
    let tx = UNIT_POS_X;
    let ty_ = UNIT_POS_Y;
    let tid = ty_ * 16 + tx;
    let n0 = CUBE_POS_X * TILE;
    let m0 = CUBE_POS_Y * TILE;
    let k = nb * 32;
    let per = comptime![groups(ty)];
    let row_bytes = (nb / per) * bb;
    let mut xs = Shared::<[f32]>::new_slice(comptime![(TILE * TS) as usize]);
    let mut ws = Shared::<[f32]>::new_slice(comptime![(TILE * TS) as usize]);
    let mut a00 = 0.0f32;
    let mut a01 = 0.0f32;
    let mut a10 = 0.0f32;
    let mut a11 = 0.0f32;
    for kb in 0..nb {
        // Stage 32x32 of x and 32 rows x 32 k of dequantised W: 4 values per unit each.
        for r in 0..4u32 {
            let idx = tid + r * 256;
            let rr = idx / TILE;
            let cc = idx % TILE;
            let mut xv = 0.0f32;
            if m0 + rr < m {
                xv = x[((m0 + rr) * k + kb * 32 + cc) as usize];
            }
            xs[(rr * TS + cc) as usize] = xv;
            let mut wv = 0.0f32;
            if n0 + rr < n {
                wv = dequant(w, (n0 + rr) * row_bytes + (kb / per) * bb, kb % per, cc, ty);
            }
            ws[(rr * TS + cc) as usize] = wv;
        }
        sync_cube();
        for kk in 0..TILE {
            let x0 = xs[(ty_ * TS + kk) as usize];
            let x1 = xs[((ty_ + 16) * TS + kk) as usize];
            let w0 = ws[(tx * TS + kk) as usize];
            let w1 = ws[((tx + 16) * TS + kk) as usize];
            a00 += x0 * w0;
            a01 += x0 * w1;
            a10 += x1 * w0;
            a11 += x1 * w1;
        }
        sync_cube();
    }
    let (r0, r1, c0, c1) = (m0 + ty_, m0 + ty_ + 16, n0 + tx, n0 + tx + 16);
    if r0 < m && c0 < n {
        out[(r0 * n + c0) as usize] = with_residual(res, r0 * n + c0, a00, add);
    }
    if r0 < m && c1 < n {
        out[(r0 * n + c1) as usize] = with_residual(res, r0 * n + c1, a01, add);
    }
    if r1 < m && c0 < n {
        out[(r1 * n + c0) as usize] = with_residual(res, r1 * n + c0, a10, add);
    }
    if r1 < m && c1 < n {
        out[(r1 * n + c1) as usize] = with_residual(res, r1 * n + c1, a11, add);
    }
}

/// A product's output value `v` at `at`, plus the residual `res[at]` where `add`: a
/// transformer block's output projections join the residual stream in the product's own
/// kernel (`QuantOps::q_matmul_add`), one dispatch where the add was another. `res + v`
/// is the f32 sum the add after the product took.
#[cube]
fn with_residual(res: &[f32], at: u32, v: f32, #[comptime] add: bool) -> f32 {
    if comptime![add] { res[at as usize] + v } else { v }
}

/// Units per cube of the KV cache kernels.
const KV_UNITS: u32 = 64;

/// f32 to IEEE half bits, rounded to nearest, ties to even (as `half` and ggml convert):
/// the mantissa's dropped bits decide, and a carry may round up into the exponent (to
/// infinity past 65504); subnormal halves shift the implicit bit in.
#[cube]
fn half_bits(x: f32) -> u32 {
    let b = u32::reinterpret(x);
    let sign = (b >> 16) & 0x8000;
    let e = (b >> 23) & 0xff;
    let m = b & 0x7f_ffff;
    let mut out = sign;
    if e == 0xff {
        out = sign | 0x7c00 | select(m != 0, 0x200u32, 0u32);
    } else if e > 142 {
        out = sign | 0x7c00;
    } else if e >= 113 {
        let base = ((e - 112) << 10) | (m >> 13);
        let rest = m & 0x1fff;
        let mut up = 0u32;
        if rest > 0x1000 {
            up = 1;
        } else if rest == 0x1000 {
            up = base & 1;
        }
        out = sign | (base + up);
    } else if e >= 102 {
        let mm = m | 0x80_0000;
        let shift = 126 - e;
        let base = mm >> shift;
        let rest = mm & ((1u32 << shift) - 1);
        let halfway = 1u32 << (shift - 1);
        let mut up = 0u32;
        if rest > halfway {
            up = 1;
        } else if rest == halfway {
            up = base & 1;
        }
        out = sign | (base + up);
    }
    out
}

/// Byte `off` of the word buffer set to `b`.
#[cube]
fn set_byte(w: &mut [u32], off: u32, b: u32) {
    let i = (off >> 2) as usize;
    let s = (off & 3) * 8;
    w[i] = (w[i] & !(0xffu32 << s)) | ((b & 0xff) << s);
}

/// `|v|` rounded half away from zero (C's `roundf`), exactly: `|v| - floor(|v|)` has no
/// rounding error.
#[cube]
fn round_away(v: f32) -> f32 {
    let a = f32::abs(v);
    let f = f32::floor(a);
    let r = select(a - f >= 0.5f32, f + 1.0f32, f);
    select(v < 0.0f32, -r, r)
}

/// Rows of `x` (`[heads, t, d]`) into the packed cache (`[heads, rows, words]`) at row
/// `start` of each head (`dynamic`: at row `step[STEP_ROW]`, so that a recorded decode
/// step writes where the step it replays is): unit `u` writes head `u / t`'s position
/// `u % t`.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn kv_pack(
    x: &[f32],
    step: &[u32],
    cache: &mut [u32],
    units: u32,
    t: u32,
    rows: u32,
    start: u32,
    words: u32,
    d: u32,
    #[comptime] ty: u32,
    #[comptime] dynamic: bool,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let mut first = start;
        if comptime![dynamic] {
            first = step[STEP_ROW as usize];
        }
        let row = ((u / t) * rows + first + u % t) * words;
        // Not rotated: `x` stands in for the tables.
        pack_row(x, u * d, x, x, 0u32, false, cache, row, d, ty, false);
    }
}

/// Value `c` of the row of `d` values at `x[src..]`, rotated for position `p` where `rot`
/// (the pair it belongs to as [`rope_pairs`] pairs them, by the same expressions).
#[allow(clippy::too_many_arguments)]
#[cube]
fn row_value(
    x: &[f32],
    src: u32,
    c: u32,
    cos: &[f32],
    sin: &[f32],
    p: u32,
    d: u32,
    #[comptime] rot: bool,
    #[comptime] halves: bool,
) -> f32 {
    let mut v = x[(src + c) as usize];
    if comptime![rot] {
        let half = d / 2;
        // Pair `j` is `(a, b)`; `c` is its first value or its second.
        let mut j = c / 2;
        let mut first = (c & 1) == 0;
        let mut a = 2 * j;
        let mut b = a + 1;
        if comptime![halves] {
            first = c < half;
            j = select(first, c, c - half);
            a = j;
            b = j + half;
        }
        let cs = cos[(p * half + j) as usize];
        let sn = sin[(p * half + j) as usize];
        let x0 = x[(src + a) as usize];
        let x1 = x[(src + b) as usize];
        v = select(first, x0 * cs - x1 * sn, x0 * sn + x1 * cs);
    }
    v
}

/// The row of `d` values at `x[src..]` (rotated for position `p` where `rot`,
/// [`row_value`]) packed into `cache` from word `row`: f16 pairs, or Q8_0 / Q4_0 blocks
/// as ggml's reference quantisers make them.
#[allow(clippy::too_many_arguments)]
#[cube]
fn pack_row(
    x: &[f32],
    src: u32,
    cos: &[f32],
    sin: &[f32],
    p: u32,
    #[comptime] rot: bool,
    cache: &mut [u32],
    row: u32,
    d: u32,
    #[comptime] ty: u32,
    #[comptime] halves: bool,
) {
    if comptime![ty == TYPE_F16] {
        for i in 0..d / 2 {
            let lo = half_bits(row_value(x, src, 2 * i, cos, sin, p, d, rot, halves));
            let hi = half_bits(row_value(x, src, 2 * i + 1, cos, sin, p, d, rot, halves));
            cache[(row + i) as usize] = lo | (hi << 16);
        }
    } else {
        let bb = comptime![ty_from_id(ty).block_bytes() as u32];
        for blk in 0..d / 32 {
            let at = blk * 32;
            let base = row * 4 + blk * bb;
            // Q8_0: the largest magnitude maps to 127; Q4_0: the signed value of largest
            // magnitude maps to -8 (ggml's reference quantisers).
            let mut top = 0.0f32;
            for j in 0..32u32 {
                let v = row_value(x, src, at + j, cos, sin, p, d, rot, halves);
                if f32::abs(v) > f32::abs(top) {
                    top = v;
                }
            }
            let mut dd = f32::abs(top) / 127.0f32;
            if comptime![ty == TYPE_Q4_0] {
                dd = top / -8.0f32;
            }
            let id = select(dd != 0.0f32, 1.0f32 / dd, 0.0f32);
            let h = half_bits(dd);
            set_byte(cache, base, h & 0xff);
            set_byte(cache, base + 1, h >> 8);
            if comptime![ty == TYPE_Q8_0] {
                for j in 0..32u32 {
                    let v = row_value(x, src, at + j, cos, sin, p, d, rot, halves);
                    let q = f32::clamp(round_away(v * id), -127.0f32, 127.0f32);
                    set_byte(cache, base + 2 + j, u32::cast_from(i32::cast_from(q)) & 0xff);
                }
            } else {
                for j in 0..16u32 {
                    let v0 = row_value(x, src, at + j, cos, sin, p, d, rot, halves);
                    let v1 = row_value(x, src, at + j + 16, cos, sin, p, d, rot, halves);
                    let q0 = u32::min(u32::cast_from(v0 * id + 8.5f32), 15);
                    let q1 = u32::min(u32::cast_from(v1 * id + 8.5f32), 15);
                    set_byte(cache, base + 2 + j, q0 | (q1 << 4));
                }
            }
        }
    }
}

/// A decode step's RoPE and KV cache writes as one launch ([`QuantOps::rope_kv_step`]):
/// `qkv` is the joined projection's row (`heads` query heads, then `kv_heads` key heads,
/// then as many value heads, `d` values each); the position and the cache row are the
/// step tensor's. Units `..heads * d` each write one rotated query value into `q_out`
/// (`[heads, d]`, [`row_value`]); the next `kv_heads` units each write one key row,
/// rotated, and the last `kv_heads` one value row, as [`kv_pack`] packs them.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn rope_kv(
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    step: &[u32],
    q_out: &mut [f32],
    k_cache: &mut [u32],
    v_cache: &mut [u32],
    heads: u32,
    kv_heads: u32,
    d: u32,
    rows: u32,
    words: u32,
    #[comptime] ty: u32,
    #[comptime] halves: bool,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    let q_units = heads * d;
    let p = step[STEP_POSITION as usize];
    if u < q_units {
        // Value `u % d` of head `u / d`: the row starts at `u - u % d`.
        let c = u % d;
        q_out[u as usize] = row_value(qkv, u - c, c, cos, sin, p, d, true, halves);
    } else if u < q_units + 2 * kv_heads {
        // Key head `r`, or value head `r - kv_heads`: either's row starts `(heads + r) d`
        // into `qkv`.
        let r = u - q_units;
        let src = (heads + r) * d;
        let key = r < kv_heads;
        let g = select(key, r, r - kv_heads);
        let row = (g * rows + step[STEP_ROW as usize]) * words;
        if key {
            pack_row(qkv, src, cos, sin, p, true, k_cache, row, d, ty, halves);
        } else {
            pack_row(qkv, src, cos, sin, p, false, v_cache, row, d, ty, halves);
        }
    }
}

/// Value `c` of row `row` of a packed cache's head (`base`: the row's first byte).
#[cube]
fn kv_value(cache: &[u32], base: u32, c: u32, #[comptime] ty: u32) -> f32 {
    let mut v = 0.0f32;
    if comptime![ty == TYPE_F16] {
        v = f16_at(cache, base + 2 * c);
    }
    if comptime![ty != TYPE_F16] {
        let bb = comptime![ty_from_id(ty).block_bytes() as u32];
        v = dequant_legacy(cache, base + (c / 32) * bb, c % 32, ty);
    }
    v
}

/// Scores of queries (`[heads, qrows, d]`) against the first `keys` rows of a packed key
/// cache (`[heads, cap, words]`), read in place: `scale` times the dot product, plus the
/// bias (`[qrows, keys]`, every head) when `masked`. `dynamic`: `keys` is the scores' row
/// length only, and the first `step[STEP_KEYS]` keys are scored (a recorded decode step).
///
/// Unit `u` takes a tile of `rq` query rows by `rk` keys of one head (key tile
/// `u % ceil(keys / rk)`, then row tile, then head): each value of a query row is loaded
/// once for `rk` keys and each key value once for `rq` rows. A device that is a CPU pays
/// for every load lane by lane, so the tile cuts its loads about fourfold. A masked key's
/// score is its bias (-inf) whatever the dot product, and a tile with every key masked
/// (half of a causal prefill's) skips its dot products.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn kv_scores(
    q: &[f32],
    cache: &[u32],
    bias: &[f32],
    step: &[u32],
    out: &mut [f32],
    units: u32,
    qrows: u32,
    keys: u32,
    cap: u32,
    words: u32,
    d: u32,
    scale: f32,
    #[comptime] ty: u32,
    #[comptime] masked: bool,
    #[comptime] dynamic: bool,
    #[comptime] rq: u32,
    #[comptime] rk: u32,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    let mut live = keys;
    if comptime![dynamic] {
        live = step[STEP_KEYS as usize];
    }
    let kblocks = keys.div_ceil(rk);
    let qblocks = qrows.div_ceil(rq);
    let key0 = (u % kblocks) * rk;
    let row0 = (u / kblocks % qblocks) * rq;
    let head = u / kblocks / qblocks;
    if u < units && key0 < live {
        // Rows and keys past the ends read the last one again and are not written.
        let mut bias_v = Array::<f32>::new(comptime![(rq * rk) as usize]);
        let mut acc = Array::<f32>::new(comptime![(rq * rk) as usize]);
        let mut seen = false;
        #[unroll]
        for i in 0..rq {
            #[unroll]
            for j in 0..rk {
                let mut b = 0.0f32;
                if comptime![masked] {
                    let (r, key) = (u32::min(row0 + i, qrows - 1), u32::min(key0 + j, live - 1));
                    b = bias[(r * keys + key) as usize];
                }
                bias_v[(i * rk + j) as usize] = b;
                acc[(i * rk + j) as usize] = 0.0f32;
                seen = seen || b > f32::new(f32::MIN);
            }
        }
        if seen {
            let mut qa = Array::<u32>::new(comptime![rq as usize]);
            #[unroll]
            for i in 0..rq {
                qa[i as usize] = (head * qrows + u32::min(row0 + i, qrows - 1)) * d;
            }
            let mut kw = Array::<u32>::new(comptime![rk as usize]);
            #[unroll]
            for j in 0..rk {
                kw[j as usize] = (head * cap + u32::min(key0 + j, live - 1)) * words;
            }
            let mut klo = Array::<f32>::new(comptime![rk as usize]);
            let mut khi = Array::<f32>::new(comptime![rk as usize]);
            if comptime![ty == TYPE_F16] {
                // A word holds two values of a key row.
                for c2 in 0..d / 2 {
                    #[unroll]
                    for j in 0..rk {
                        let word = cache[(kw[j as usize] + c2) as usize];
                        klo[j as usize] = half_lo(word);
                        khi[j as usize] = half_hi(word);
                    }
                    #[unroll]
                    for i in 0..rq {
                        let ql = q[(qa[i as usize] + 2 * c2) as usize];
                        let qh = q[(qa[i as usize] + 2 * c2 + 1) as usize];
                        #[unroll]
                        for j in 0..rk {
                            let a = (i * rk + j) as usize;
                            acc[a] += ql * klo[j as usize] + qh * khi[j as usize];
                        }
                    }
                }
            } else {
                for c in 0..d {
                    #[unroll]
                    for j in 0..rk {
                        klo[j as usize] = kv_value(cache, kw[j as usize] * 4, c, ty);
                    }
                    #[unroll]
                    for i in 0..rq {
                        let qv = q[(qa[i as usize] + c) as usize];
                        #[unroll]
                        for j in 0..rk {
                            let a = (i * rk + j) as usize;
                            acc[a] += qv * klo[j as usize];
                        }
                    }
                }
            }
        }
        #[unroll]
        for i in 0..rq {
            #[unroll]
            for j in 0..rk {
                if row0 + i < qrows && key0 + j < live {
                    let a = (i * rk + j) as usize;
                    let b = bias_v[a];
                    let s = select(b > f32::new(f32::MIN), acc[a] * scale + b, b);
                    out[((head * qrows + row0 + i) * keys + key0 + j) as usize] = s;
                }
            }
        }
    }
}

/// Each row of scores (`[rows, keys]`) made its softmax in place, one unit a row: the
/// maximum, then each key's exponential (0 for a masked key) written and summed, then each
/// scaled by the sum's inverse (all 0 in a row with every key masked). Before [`kv_weigh`],
/// each exponential is taken once a key instead of once a key and channel. `dynamic`: only
/// the first `step[STEP_KEYS]` keys count.
#[cube(launch)]
fn kv_softmax(scores: &mut [f32], step: &[u32], rows: u32, keys: u32, #[comptime] dynamic: bool) {
    let r = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if r < rows {
        let mut live = keys;
        if comptime![dynamic] {
            live = step[STEP_KEYS as usize];
        }
        let at = r * keys;
        // The lowest finite value stands for minus infinity, as in `kv_mix`.
        let mut top = f32::new(f32::MIN);
        for key in 0..live {
            top = f32::max(top, scores[(at + key) as usize]);
        }
        let mut sum = 0.0f32;
        for key in 0..live {
            let s = scores[(at + key) as usize];
            let e = select(s > f32::new(f32::MIN), f32::exp(s - top), 0.0f32);
            scores[(at + key) as usize] = e;
            sum += e;
        }
        let inv = select(sum > 0.0f32, 1.0f32 / sum, 0.0f32);
        for key in 0..live {
            scores[(at + key) as usize] *= inv;
        }
    }
}

/// Query rows and keys per unit of [`kv_scores`], and query rows and channels per unit of
/// [`kv_weigh`].
const SCORE_ROWS: u32 = 4;
const SCORE_KEYS: u32 = 4;
const WEIGH_ROWS: u32 = 4;
const WEIGH_CHANNELS: u32 = 8;
/// Keys per part when [`kv_mix`] is split.
const MIX_PART_KEYS: u32 = 128;
/// Split [`kv_mix`] when one pass would have fewer units than this (256 cubes of 64).
const MIX_SPLIT_BELOW: u32 = 16_384;

/// A decode step's attention, split over the keys (flash-decoding): from the scores
/// (`[heads, qrows, keys]`) and a packed value cache (`[heads, cap, words]`), unit `u`
/// takes channel `u % d` of head and query row `u / d / parts` and part `u / d % parts`
/// of the keys ([`MIX_PART_KEYS`] each). It runs the part's softmax online (a running
/// maximum and sum) while it weights the value rows' channel, and writes its unnormalised
/// sum to `out` (`[heads * qrows * parts, d]`) and the part's maximum and sum of
/// exponentials to `stats` (`[heads * qrows * parts, 2]`), for [`kv_mix_join`].
///
/// `dynamic`: `keys` is the scores' row length only, and the first `step[STEP_KEYS]` keys
/// count (a recorded decode step; parts past them see no key).
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn kv_mix(
    scores: &[f32],
    cache: &[u32],
    step: &[u32],
    out: &mut [f32],
    stats: &mut [f32],
    units: u32,
    qrows: u32,
    keys: u32,
    cap: u32,
    words: u32,
    d: u32,
    parts: u32,
    #[comptime] ty: u32,
    #[comptime] dynamic: bool,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let c = u % d;
        let row_part = u / d;
        let hr = row_part / parts;
        let row0 = (hr / qrows) * cap;
        let sa = hr * keys;
        let mut live = keys;
        if comptime![dynamic] {
            live = step[STEP_KEYS as usize];
        }
        let first = (row_part % parts) * MIX_PART_KEYS;
        let end = u32::min(live, first + MIX_PART_KEYS);
        // The lowest finite value stands for minus infinity (WGSL has no literal for it);
        // a masked key (bias -inf or the lowest value) adds nothing.
        let mut top = f32::new(f32::MIN);
        let mut sum = 0.0f32;
        let mut acc = 0.0f32;
        for key in first..end {
            let s = scores[(sa + key) as usize];
            if s > top {
                // A new maximum: what was summed so far is rescaled to it (nothing was,
                // before the first key that counts).
                if top > f32::new(f32::MIN) {
                    let r = f32::exp(top - s);
                    sum *= r;
                    acc *= r;
                }
                top = s;
            }
            if s > f32::new(f32::MIN) {
                let e = f32::exp(s - top);
                sum += e;
                acc += e * kv_value(cache, (row0 + key) * words * 4, c, ty);
            }
        }
        out[u as usize] = acc;
        if c == 0 {
            stats[(2 * row_part) as usize] = top;
            stats[(2 * row_part + 1) as usize] = sum;
        }
    }
}

/// The attention's output from the softmax's weights (`[heads, qrows, keys]`, see
/// [`kv_softmax`]) and a packed value cache (`[heads, cap, words]`), in one pass over the
/// keys. Unit `u` takes a tile of `rq` query rows by `rc` channels of one head (channel
/// tile `u % (d / rc)`, then row tile, then head): each weight is loaded once for `rc`
/// channels and each value once for `rq` rows. A key whose weights are all 0 in the tile
/// (masked) is skipped. `dynamic`: only the first `step[STEP_KEYS]` keys count.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn kv_weigh(
    weights: &[f32],
    cache: &[u32],
    step: &[u32],
    out: &mut [f32],
    units: u32,
    qrows: u32,
    keys: u32,
    cap: u32,
    words: u32,
    d: u32,
    #[comptime] ty: u32,
    #[comptime] dynamic: bool,
    #[comptime] rq: u32,
    #[comptime] rc: u32,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    let cblocks = d / rc;
    let qblocks = qrows.div_ceil(rq);
    let c0 = (u % cblocks) * rc;
    let row0 = (u / cblocks % qblocks) * rq;
    let head = u / cblocks / qblocks;
    if u < units {
        let mut live = keys;
        if comptime![dynamic] {
            live = step[STEP_KEYS as usize];
        }
        // Rows past the end read the last one again and are not written.
        let mut wa = Array::<u32>::new(comptime![rq as usize]);
        #[unroll]
        for i in 0..rq {
            wa[i as usize] = (head * qrows + u32::min(row0 + i, qrows - 1)) * keys;
        }
        let mut acc = Array::<f32>::new(comptime![(rq * rc) as usize]);
        #[unroll]
        for a in 0..rq * rc {
            acc[a as usize] = 0.0f32;
        }
        let mut p = Array::<f32>::new(comptime![rq as usize]);
        let mut v = Array::<f32>::new(comptime![rc as usize]);
        let rows = head * cap;
        for key in 0..live {
            let mut any = false;
            #[unroll]
            for i in 0..rq {
                let w = weights[(wa[i as usize] + key) as usize];
                p[i as usize] = w;
                any = any || w > 0.0f32;
            }
            if any {
                let base = (rows + key) * words;
                if comptime![ty == TYPE_F16 && rc.is_multiple_of(2)] {
                    // A word holds two channels (`c0` is even).
                    #[unroll]
                    for c2 in 0..rc / 2 {
                        let word = cache[(base + c0 / 2 + c2) as usize];
                        v[(2 * c2) as usize] = half_lo(word);
                        v[(2 * c2 + 1) as usize] = half_hi(word);
                    }
                } else {
                    #[unroll]
                    for c in 0..rc {
                        v[c as usize] = kv_value(cache, base * 4, c0 + c, ty);
                    }
                }
                #[unroll]
                for i in 0..rq {
                    #[unroll]
                    for c in 0..rc {
                        let a = (i * rc + c) as usize;
                        acc[a] += p[i as usize] * v[c as usize];
                    }
                }
            }
        }
        #[unroll]
        for i in 0..rq {
            if row0 + i < qrows {
                #[unroll]
                for c in 0..rc {
                    out[((head * qrows + row0 + i) * d + c0 + c) as usize] = acc[(i * rc + c) as usize];
                }
            }
        }
    }
}

/// The parts of a split [`kv_mix`] joined: unit `u` takes channel `u % d` of row `u / d`,
/// rescales each part's sums to the largest maximum of the parts that saw a key, and
/// divides. A part whose keys were all masked (sum 0) adds nothing.
#[cube(launch)]
fn kv_mix_join(partial: &[f32], stats: &[f32], out: &mut [f32], units: u32, d: u32, parts: u32) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let c = u % d;
        let first = (u / d) * parts;
        let mut top = f32::new(f32::MIN);
        for p in 0..parts {
            let i = (2 * (first + p)) as usize;
            if stats[i + 1] > 0.0f32 && stats[i] > top {
                top = stats[i];
            }
        }
        let mut sum = 0.0f32;
        let mut acc = 0.0f32;
        for p in 0..parts {
            let i = (2 * (first + p)) as usize;
            if stats[i + 1] > 0.0f32 {
                let r = f32::exp(stats[i] - top);
                sum += stats[i + 1] * r;
                acc += partial[((first + p) * d + c) as usize] * r;
            }
        }
        out[u as usize] = select(sum > 0.0f32, acc / sum, 0.0f32);
    }
}

/// Units per cube of the RMSNorm kernel (one cube per row).
const NORM_LANES: u32 = 64;
/// Most cubes along one grid dimension (WebGPU's `maxComputeWorkgroupsPerDimension`).
const GRID_X: u32 = 65535;

/// `cubes` cubes as a grid of at most [`GRID_X`] per row; a kernel numbers its cube
/// `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X` and skips those past `cubes`.
fn grid(cubes: u32) -> CubeCount {
    let cubes = cubes.max(1);
    CubeCount::Static(cubes.min(GRID_X), cubes.div_ceil(GRID_X), 1)
}

/// Row `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X` of `x` (`[rows, d]`), RMS-normalised and
/// scaled by `w`: each unit squares and sums every `NORM_LANES`-th value, the sums meet
/// in a tree, and each unit writes its values times `1 / sqrt(mean + eps)` and the weight.
#[cube(launch)]
fn rms_rows(x: &[f32], w: &[f32], out: &mut [f32], rows: u32, d: u32, eps: f32) {
    let row = CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X;
    let lane = UNIT_POS_X;
    let mut partial = 0.0f32;
    if row < rows {
        let mut i = lane;
        while i < d {
            let v = x[(row * d + i) as usize];
            partial += v * v;
            i += NORM_LANES;
        }
    }
    let mut sums = Shared::<[f32]>::new_slice(comptime![NORM_LANES as usize]);
    sums[lane as usize] = partial;
    sync_cube();
    tree_step(&mut sums, lane, lane, 32u32);
    tree_sum32(&mut sums, lane, lane);
    if row < rows {
        let inv = 1.0f32 / f32::sqrt(sums[0] / f32::cast_from(d) + eps);
        let mut i = lane;
        while i < d {
            let at = (row * d + i) as usize;
            out[at] = x[at] * inv * w[i as usize];
            i += NORM_LANES;
        }
    }
}

/// Rows a cube of [`rms_rows_units`] takes.
const NORM_UNITS: u32 = 16;

/// [`rms_rows`] for a software GPU, one unit per row: the same [`NORM_LANES`] strided sums
/// of squares and the same tree, in one unit's registers, so the same values. SwiftShader
/// pays for each barrier of `rms_rows` with a switch between its lanes: 0.19 ms a
/// 576-value row in Chromium, 61 rows a decode step.
#[allow(clippy::assign_op_pattern)]
#[cube(launch)]
fn rms_rows_units(x: &[f32], w: &[f32], out: &mut [f32], rows: u32, d: u32, eps: f32) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * NORM_UNITS + UNIT_POS_X;
    if row < rows {
        let base = row * d;
        let mut sums = Array::<f32>::new(comptime![NORM_LANES as usize]);
        for lane in 0..NORM_LANES {
            let mut partial = 0.0f32;
            let mut i = lane;
            while i < d {
                let v = x[(base + i) as usize];
                partial += v * v;
                i += NORM_LANES;
            }
            sums[lane as usize] = partial;
        }
        #[unroll]
        for level in 0..6u32 {
            let stride = comptime![NORM_LANES >> (level + 1)];
            for i in 0..stride {
                sums[i as usize] = sums[i as usize] + sums[(i + stride) as usize];
            }
        }
        let inv = 1.0f32 / f32::sqrt(sums[0] / f32::cast_from(d) + eps);
        for i in 0..d {
            let at = (base + i) as usize;
            out[at] = x[at] * inv * w[i as usize];
        }
    }
}

/// One rotated pair per unit: pair `j` of head `h` of row `r` of `x` (`[t, heads, d]`),
/// rotated for position `start + r` (or `list[r]`), written to `out[h, r]` (`[heads, t, d]`).
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn rope_pairs(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    list: &[u32],
    out: &mut [f32],
    units: u32,
    t: u32,
    heads: u32,
    d: u32,
    start: u32,
    #[comptime] listed: bool,
    #[comptime] halves: bool,
) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let half = d / 2;
        let j = u % half;
        let hr = u / half;
        let r = hr % t;
        let h = hr / t;
        let mut p = start + r;
        if comptime![listed] {
            p = list[r as usize];
        }
        let c = cos[(p * half + j) as usize];
        let s = sin[(p * half + j) as usize];
        let mut a = 2 * j;
        let mut b = 2 * j + 1;
        if comptime![halves] {
            a = j;
            b = j + half;
        }
        let src = (r * heads + h) * d;
        let dst = (h * t + r) * d;
        let x0 = x[(src + a) as usize];
        let x1 = x[(src + b) as usize];
        out[(dst + a) as usize] = x0 * c - x1 * s;
        out[(dst + b) as usize] = x0 * s + x1 * c;
    }
}

/// `x sigmoid(a (x + b x^3))`, value by value; the cube only where `b` is not zero.
#[cube(launch)]
fn gelu_sigmoid_values(x: &[f32], out: &mut [f32], units: u32, a: f32, b: f32) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let v = x[u as usize];
        let mut t = v;
        if b != 0.0f32 {
            t = v + b * (v * v * v);
        }
        // As the CPU's `gelu_sigmoid_generic`: x / (1 + e), or (x h) h / (1 + e) for
        // z < 0, e = h^2 = exp(-|z|): no inf / inf, and no flushed e^z taking x e^z to 0.
        // Below z = -80, sign(x) exp(z + ln|x|) instead: GPUs flush subnormal f32 to zero
        // and may regroup (x h) h as x (h h), which is subnormal from z = -87.3 while the
        // result is not (NVIDIA's Vulkan driver returned 0 for 1e-37 there); one exp of
        // a sum has no such intermediate, and 1 + e rounds to 1 from far above -80.
        let z = a * t;
        let y = if z < -80.0f32 {
            let e = f32::exp(z + f32::ln(f32::abs(v)));
            select(v < 0.0f32, -e, e)
        } else {
            let h = f32::exp(-0.5f32 * f32::abs(z));
            let mut num = v;
            if z < 0.0f32 {
                num = v * h * h;
            }
            num / (1.0f32 + h * h)
        };
        out[u as usize] = y;
    }
}

/// `silu(gate) * up`, value by value: value `c` of row `r` from `gate_up[r, c]` and
/// `gate_up[r, d + c]`.
#[cube(launch)]
fn silu_mul_values(gate_up: &[f32], out: &mut [f32], units: u32, d: u32) {
    let u = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * KV_UNITS + UNIT_POS_X;
    if u < units {
        let at = (u / d) * 2 * d + u % d;
        let g = gate_up[at as usize];
        out[u as usize] = g / (1.0f32 + f32::exp(-g)) * gate_up[(at + d) as usize];
    }
}
