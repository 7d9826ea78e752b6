//! vidllm kernels: matrix products against weights kept in GGML's block layout.
//!
//! A quantised matrix `W [n, k]` is uploaded byte for byte as it sits in the GGUF file,
//! as u32 words in an int tensor; nothing is widened to f16 or f32 on the device. One
//! backend extension, [`QuantOps`], computes `y = x W^T` from those words:
//! - wgpu / WebGPU (`Cube`): CubeCL kernels, a GEMV for decode and a shared-memory tiled
//!   matmul for prefill (`cube.rs`);
//! - CPU (`Flex`): in Rust, parallel over output rows (`cpu.rs`); block types on an
//!   integer path, activations quantised to 16 bits (`cpu_int.rs`).
//!
//! Model code calls [`QuantMatrix::forward`] and never branches on the device.

use burn::backend::{
    Backend, backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{DType, Int, Tensor, TensorCreationOptions, TensorData};
use vidllm_core::ggml::GgmlType;

pub use crate::cpu_attention::Mask;
use crate::device::Placement;

mod block;
pub mod check;
// Compiled either way (burn-flex is a direct dependency); without `cpu` nothing dispatches
// to it, and the linker drops it.
pub mod cpu;
pub mod cpu_attention;
// Off x86-64 the batched kernels' instruction-set enum is empty (`available()` is false):
// what follows its choice is unreachable there, and its parameters unused.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused, unreachable_code))]
pub mod cpu_gemm;
#[cfg_attr(not(target_arch = "x86_64"), allow(unused, unreachable_code))]
pub mod cpu_gemm_lanes;
pub mod cpu_gemv;
pub mod cpu_hot;
pub mod cpu_int;
mod cpu_pages;
pub mod cpu_repack;
pub mod cpu_vnni;
#[cfg(feature = "gpu")]
pub mod cube;
pub mod device;
pub mod preprocess;

/// Largest number of rows of `x` that takes the GEMV path (decode, small batches).
pub const GEMV_MAX_M: usize = 8;

/// The values of a decode step that its kernels read from a small u32 tensor when they
/// run (the `*_step` ops), not from the launch: a step recorded once (a wgpu graph,
/// `models/src/step_graph.rs`) replays at any position. `[STEP_WORDS]` values:
/// the RoPE position of the step's token, ...
pub const STEP_POSITION: u32 = 0;
/// ... the cache row it is written to, ...
pub const STEP_ROW: u32 = 1;
/// ... and the keys its query attends to (the row, plus one).
pub const STEP_KEYS: u32 = 2;
/// Values in a step tensor.
pub const STEP_WORDS: usize = 3;

/// Elements the kernels take at a time along a row: a 32-element block, a K sub-block,
/// or 32 F16 / BF16 values.
pub const GROUP: usize = 32;

#[backend_extension(Cube: cfg(feature = "gpu"), Flex: cfg(feature = "cpu"))]
pub trait QuantOps: Backend {
    /// `y[m, n] = sum_k x[m, k] * W[n, k]`, with `W` GGML blocks (or F16 / BF16 values) of
    /// type `ty` (a [`GgmlType::id`]) packed little-endian into u32 `words`.
    ///
    /// `kernels` (a [`Placement::product_id`]) picks wgpu's kernels ([`device::MatmulKernels`]) and
    /// the CPU's activation precision ([`cpu_int::ActBits`]).
    ///
    /// # Shapes
    /// - x: `[m, k]` (f32), words: `[ceil(n * row_bytes / 4) + 1]`
    /// - returns `[m, n]` (f32)
    fn q_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, ty: u32, n: usize, k: usize, kernels: u32) -> FloatTensor<Self>;

    /// [`QuantOps::q_matmul`] for rows that belong to different sequences (a batched
    /// decode step): each row's result is exactly what `q_matmul` gives that row alone,
    /// so a sequence's output does not depend on what it is batched with, while the
    /// weights are still read once for all the rows.
    ///
    /// # Shapes
    /// - as [`QuantOps::q_matmul`]
    fn q_matmul_rows(x: FloatTensor<Self>, words: IntTensor<Self>, ty: u32, n: usize, k: usize, kernels: u32) -> FloatTensor<Self>;

    /// `residual + x W^T`: [`QuantOps::q_matmul`] joining the residual stream, as a
    /// transformer block's output projections do. wgpu adds each value as the product
    /// writes it (one dispatch where the add after the product was another); every value
    /// is the f32 sum `residual + product` that the add took.
    ///
    /// # Shapes
    /// - as [`QuantOps::q_matmul`]; residual: `[m, n]` (f32)
    #[allow(clippy::too_many_arguments)]
    fn q_matmul_add(
        x: FloatTensor<Self>,
        words: IntTensor<Self>,
        ty: u32,
        n: usize,
        k: usize,
        kernels: u32,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Scaled dot-product attention: `softmax(q k^T scale + bias) v`.
    ///
    /// `mask` says which keys each query row sees and `bias` is its additive form
    /// ([`Mask::bias`]; with [`Mask::None`], any tensor, unused), built once per forward
    /// pass by the caller: wgpu composes the op from matmuls, a softmax and the bias; the
    /// CPU backend fuses it (`cpu_attention.rs`) and skips the hidden keys.
    ///
    /// # Shapes
    /// - q: `[b, h, rows, d]`; k, v: `[b, h, keys, d]`; bias: `[1, 1, rows, keys]`
    /// - returns `[b, h, rows, d]`
    fn attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
        mask: Mask,
    ) -> FloatTensor<Self>;

    /// Write `x` into rows `start..start + t` of each head of a packed KV cache: `cache`
    /// holds `[heads, rows, words]` u32 words, each row `d` values of type `ty` (F16, Q8_0
    /// or Q4_0) from its first byte, zero-padded to whole words. Blocks are quantised as
    /// ggml's reference quantisers make them (`vidllm_core::ggml::quantize`). Returns the
    /// cache (written in place where it is not shared).
    ///
    /// # Shapes
    /// - cache: `[heads, rows, words]` (u32); x: `[heads, t, d]` (f32) -> `[heads, rows, words]`
    fn kv_write(cache: IntTensor<Self>, x: FloatTensor<Self>, ty: u32, start: usize) -> IntTensor<Self>;

    /// RMSNorm of each row, `x / sqrt(mean(x^2) + eps) * weight`, as one kernel (burn's
    /// ops compose it from six, each a dispatch on wgpu and a pass over memory on the CPU).
    ///
    /// # Shapes
    /// - x: `[rows, d]`, weight: `[d]` -> `[rows, d]`
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// SwiGLU's gating, `silu(gate) * up = gate / (1 + exp(-gate)) * up`, as one kernel
    /// (burn composes it from three), on the gate and up projections' joined output: no
    /// strided view of either is copied out first.
    ///
    /// # Shapes
    /// - gate_up: `[rows, 2 d]` (gate, then up, in each row) -> `[rows, d]`
    fn silu_mul(gate_up: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `x sigmoid(a (x + b x^3))`, value by value, as one kernel (burn composes it from
    /// five to seven): CLIP's QuickGELU is `a = 1.702, b = 0`, and GELU's tanh
    /// approximation, `0.5 x (1 + tanh(u))`, is `x sigmoid(2u)`: `a = 2 sqrt(2 / pi)`,
    /// `b = 0.044715`. With `b = 0` the cube is not taken (so that it cannot overflow).
    ///
    /// # Shapes
    /// - x: `[rows, d]` -> `[rows, d]`
    fn gelu_sigmoid(x: FloatTensor<Self>, a: f32, b: f32) -> FloatTensor<Self>;

    /// Rotary position embedding of `t` rows of `heads` heads each, the heads split out
    /// as attention reads them, in one kernel: row `i` is rotated for position
    /// `positions[i]` by that row of the `cos` / `sin` tables. The pairs are `(j, j + d/2)`
    /// when `halves` ("rotate_half", Hugging Face checkpoints), else `(2j, 2j + 1)` (GGUF).
    ///
    /// # Shapes
    /// - x: `[t, heads * d]`; cos, sin: `[max_pos, d / 2]`; positions: `t` values
    /// - returns `[1, heads, t, d]`
    fn rope_heads(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        positions: Vec<u32>,
        heads: usize,
        halves: bool,
    ) -> FloatTensor<Self>;

    /// [`QuantOps::attention`] over the first `keys` rows of packed caches (as
    /// [`QuantOps::kv_write`] writes them): the CPU reads the blocks where it uses them;
    /// wgpu decodes them as it reads them too (`kv_scores`, then `kv_softmax` and `kv_weigh`, or
    /// split over the keys `kv_mix`'s online softmax and `kv_mix_join`).
    ///
    /// # Shapes
    /// - q: `[1, heads, rows, d]`; k, v: `[heads, capacity, words]` (u32); bias: `[1, 1, rows, keys]`
    /// - returns `[1, heads, rows, d]`
    #[allow(clippy::too_many_arguments)]
    fn kv_attention(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        ty: u32,
        keys: usize,
        bias: FloatTensor<Self>,
        scale: f64,
        mask: Mask,
    ) -> FloatTensor<Self>;

    /// [`QuantOps::kv_write`] of one decode step's rows (`t` = 1) at row `step[STEP_ROW]`.
    ///
    /// # Shapes
    /// - cache: `[heads, rows, words]` (u32); x: `[heads, 1, d]`; step: `[STEP_WORDS]` (u32)
    fn kv_write_step(cache: IntTensor<Self>, x: FloatTensor<Self>, ty: u32, step: IntTensor<Self>) -> IntTensor<Self>;

    /// A decode step's RoPE and KV cache writes as one kernel: the queries and keys of
    /// the joined projection's row `qkv` rotated for position `step[STEP_POSITION]` as
    /// [`QuantOps::rope_heads_step`] rotates them, and the rotated keys and the values
    /// written to row `step[STEP_ROW]` of the packed caches `k` and `v` as
    /// [`QuantOps::kv_write_step`] writes them (caches with no rotation). Returns the
    /// rotated queries and the two caches (written in place where not shared).
    ///
    /// # Shapes
    /// - qkv: `[1, (heads + 2 kv_heads) d]` (queries, keys, values); cos, sin: `[max_pos, d / 2]`;
    ///   step: `[STEP_WORDS]` (u32); k, v: `[kv_heads, rows, words]` (u32)
    /// - returns `[1, heads, 1, d]` and the caches' shapes
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_step(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        step: IntTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        ty: u32,
        heads: usize,
        kv_heads: usize,
        halves: bool,
    ) -> (FloatTensor<Self>, IntTensor<Self>, IntTensor<Self>);

    /// [`QuantOps::kv_attention`] of a decode step (every query row sees every key) over
    /// the first `step[STEP_KEYS]` rows.
    ///
    /// # Shapes
    /// - q: `[1, heads, rows, d]`; k, v: `[heads, capacity, words]` (u32); step: `[STEP_WORDS]`
    /// - returns `[1, heads, rows, d]`
    fn kv_attention_step(
        q: FloatTensor<Self>,
        k: IntTensor<Self>,
        v: IntTensor<Self>,
        ty: u32,
        step: IntTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// [`QuantOps::rope_heads`] of one row at position `step[STEP_POSITION]`.
    ///
    /// # Shapes
    /// - x: `[1, heads * d]`; step: `[STEP_WORDS]` -> `[1, heads, 1, d]`
    fn rope_heads_step(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        step: IntTensor<Self>,
        heads: usize,
        halves: bool,
    ) -> FloatTensor<Self>;

    /// `t`'s storage overwritten with `values` (as many as it holds), in place: a recorded
    /// step's inputs are refreshed in the buffers it reads.
    fn overwrite_f32(t: FloatTensor<Self>, values: Vec<f32>) -> FloatTensor<Self>;

    /// [`QuantOps::overwrite_f32`] for a u32 tensor.
    fn overwrite_u32(t: IntTensor<Self>, values: Vec<u32>) -> IntTensor<Self>;

    /// `words` (a band of `n` rows of `k` values of type `ty`, packed as
    /// [`QuantMatrix::upload`] packs them) laid out as this device keeps weights, which
    /// its products then read: on the CPU, bands of the 32-element block types (Q8_0, Q4_0,
    /// Q4_1, Q5_0, Q5_1) of whole groups of sixteen rows are repacked where the processor
    /// has the kernel for them (`cpu_repack.rs`), and every
    /// band is noted to be moved into huge pages by [`settle_weights`]; on wgpu, unchanged.
    fn lay_out_weights(words: IntTensor<Self>, ty: u32, n: usize, k: usize) -> IntTensor<Self>;
}

/// Moves the weights loaded on the CPU since the last call into transparent huge pages,
/// where Linux has them ([`cpu_pages::settle_weights`]): call once a model is loaded.
/// Elsewhere, and for GPU weights, nothing happens. Returns the bytes advised.
pub fn settle_weights() -> usize {
    cpu_pages::settle_weights()
}

/// `softmax(q k^T scale + bias) v` on any device ([`QuantOps::attention`]).
///
/// # Shapes
/// - q: `[b, h, rows, d]`; k, v: `[b, h, keys, d]`; bias: `[1, 1, rows, keys]` -> `[b, h, rows, d]`
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>, scale: f64, mask: Mask) -> Tensor<4> {
    let out = <burn::backend::Dispatch as QuantOps>::attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        scale,
        mask,
    );
    Tensor::<4>::from_dispatch(out)
}

/// [`QuantOps::kv_write`] on any device.
pub fn kv_write(cache: Tensor<3, Int>, x: Tensor<3>, ty: GgmlType, start: usize) -> Tensor<3, Int> {
    let out = <burn::backend::Dispatch as QuantOps>::kv_write(cache.into_dispatch(), x.into_dispatch(), ty.id(), start);
    Tensor::<3, Int>::from_dispatch(out)
}

/// [`QuantOps::kv_attention`] on any device.
#[allow(clippy::too_many_arguments)]
pub fn kv_attention(
    q: Tensor<4>,
    k: Tensor<3, Int>,
    v: Tensor<3, Int>,
    ty: GgmlType,
    keys: usize,
    bias: Tensor<4>,
    scale: f64,
    mask: Mask,
) -> Tensor<4> {
    let out = <burn::backend::Dispatch as QuantOps>::kv_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        ty.id(),
        keys,
        bias.into_dispatch(),
        scale,
        mask,
    );
    Tensor::<4>::from_dispatch(out)
}

/// [`QuantOps::kv_write_step`] on any device.
pub fn kv_write_step(cache: Tensor<3, Int>, x: Tensor<3>, ty: GgmlType, step: &Tensor<1, Int>) -> Tensor<3, Int> {
    let out = <burn::backend::Dispatch as QuantOps>::kv_write_step(
        cache.into_dispatch(),
        x.into_dispatch(),
        ty.id(),
        step.clone().into_dispatch(),
    );
    Tensor::<3, Int>::from_dispatch(out)
}

/// [`QuantOps::rope_kv_step`] on any device: the rotated queries `[1, heads, 1, d]` and the
/// two caches.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_step(
    qkv: Tensor<2>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    step: &Tensor<1, Int>,
    k: Tensor<3, Int>,
    v: Tensor<3, Int>,
    ty: GgmlType,
    heads: usize,
    kv_heads: usize,
    halves: bool,
) -> (Tensor<4>, Tensor<3, Int>, Tensor<3, Int>) {
    let [t, width] = qkv.dims();
    let d = 2 * cos.dims()[1];
    assert!(t == 1 && width == (heads + 2 * kv_heads) * d, "rope_kv_step: {t} rows of {width} for {heads} + 2 x {kv_heads} heads of {d}");
    let (q, k, v) = <burn::backend::Dispatch as QuantOps>::rope_kv_step(
        qkv.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        step.clone().into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        ty.id(),
        heads,
        kv_heads,
        halves,
    );
    (Tensor::<4>::from_dispatch(q), Tensor::<3, Int>::from_dispatch(k), Tensor::<3, Int>::from_dispatch(v))
}

/// [`QuantOps::kv_attention_step`] on any device.
pub fn kv_attention_step(q: Tensor<4>, k: Tensor<3, Int>, v: Tensor<3, Int>, ty: GgmlType, step: &Tensor<1, Int>, scale: f64) -> Tensor<4> {
    let out = <burn::backend::Dispatch as QuantOps>::kv_attention_step(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        ty.id(),
        step.clone().into_dispatch(),
        scale,
    );
    Tensor::<4>::from_dispatch(out)
}

/// [`QuantOps::rope_heads_step`] on any device.
///
/// # Shapes
/// - x: `[1, heads * d]` -> `[1, heads, 1, d]`
pub fn rope_heads_step(x: Tensor<2>, cos: &Tensor<2>, sin: &Tensor<2>, step: &Tensor<1, Int>, heads: usize, halves: bool) -> Tensor<4> {
    let [t, width] = x.dims();
    let half = cos.dims()[1];
    assert!(t == 1 && width == heads * 2 * half, "rope_heads_step: {t} rows of {width} for {heads} heads of {}", 2 * half);
    let out = <burn::backend::Dispatch as QuantOps>::rope_heads_step(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        step.clone().into_dispatch(),
        heads,
        halves,
    );
    Tensor::<4>::from_dispatch(out)
}

/// A step tensor (`[STEP_WORDS]` u32 values) on `device`.
pub fn step_tensor(values: [u32; STEP_WORDS], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::U32);
    Tensor::from_data(TensorData::new(values.to_vec(), [STEP_WORDS]), opts)
}

/// [`QuantOps::overwrite_f32`] on any device: `t` keeps its buffer.
pub fn overwrite_f32<const D: usize>(t: &mut Tensor<D>, values: Vec<f32>) {
    assert_eq!(t.shape().num_elements(), values.len(), "overwrite_f32: as many values as the tensor holds");
    let out = <burn::backend::Dispatch as QuantOps>::overwrite_f32(t.clone().into_dispatch(), values);
    *t = Tensor::<D>::from_dispatch(out);
}

/// [`QuantOps::overwrite_u32`] on any device: `t` keeps its buffer.
pub fn overwrite_u32<const D: usize>(t: &mut Tensor<D, Int>, values: Vec<u32>) {
    assert_eq!(t.shape().num_elements(), values.len(), "overwrite_u32: as many values as the tensor holds");
    let out = <burn::backend::Dispatch as QuantOps>::overwrite_u32(t.clone().into_dispatch(), values);
    *t = Tensor::<D, Int>::from_dispatch(out);
}

/// [`QuantOps::rms_norm`] on any device.
///
/// # Shapes
/// - x: `[rows, d]`, weight: `[d]` -> `[rows, d]`
pub fn rms_norm(x: Tensor<2>, weight: &Tensor<1>, eps: f64) -> Tensor<2> {
    let out = <burn::backend::Dispatch as QuantOps>::rms_norm(x.into_dispatch(), weight.clone().into_dispatch(), eps);
    Tensor::<2>::from_dispatch(out)
}

/// [`QuantOps::silu_mul`] on any device.
///
/// # Shapes
/// - gate_up: `[rows, 2 d]` -> `[rows, d]`
pub fn silu_mul(gate_up: Tensor<2>) -> Tensor<2> {
    assert!(gate_up.dims()[1].is_multiple_of(2), "silu_mul: an odd row of gate and up");
    Tensor::<2>::from_dispatch(<burn::backend::Dispatch as QuantOps>::silu_mul(gate_up.into_dispatch()))
}

/// [`QuantOps::gelu_sigmoid`] on any device.
pub fn gelu_sigmoid(x: Tensor<2>, a: f32, b: f32) -> Tensor<2> {
    Tensor::<2>::from_dispatch(<burn::backend::Dispatch as QuantOps>::gelu_sigmoid(x.into_dispatch(), a, b))
}

/// [`QuantOps::rope_heads`] on any device.
///
/// # Shapes
/// - x: `[t, heads * d]`; cos, sin: `[max_pos, d / 2]` -> `[1, heads, t, d]`
pub fn rope_heads(x: Tensor<2>, cos: &Tensor<2>, sin: &Tensor<2>, positions: &[usize], heads: usize, halves: bool) -> Tensor<4> {
    let [t, width] = x.dims();
    let [max_pos, half] = cos.dims();
    assert!(
        positions.len() == t && width == heads * 2 * half,
        "rope_heads: {t} rows of {width} for {} positions, {heads} heads of {}",
        positions.len(),
        2 * half
    );
    assert!(positions.iter().all(|&p| p < max_pos), "rope_heads: a position past the table's {max_pos}");
    let positions = positions.iter().map(|&p| p as u32).collect();
    let out = <burn::backend::Dispatch as QuantOps>::rope_heads(
        x.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        positions,
        heads,
        halves,
    );
    Tensor::<4>::from_dispatch(out)
}

/// u32 words per row of `d` values of `ty` in a packed KV cache (whole blocks, padded to a
/// word).
pub fn kv_row_words(ty: GgmlType, d: usize) -> usize {
    (d / ty.block_elems() * ty.block_bytes()).div_ceil(4)
}

/// A weight matrix `[n, k]` resident on a device in GGML block layout.
///
/// Stored as row bands, each small enough for one storage binding (the
/// [`device::BindingCap`] of its placement); most matrices are one band.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    bands: Vec<Band>,
    ty: GgmlType,
    n: usize,
    k: usize,
    /// What its products pass as `kernels` ([`Placement::product_id`]).
    kernels: u32,
}

/// Rows `n` of a [`QuantMatrix`], as u32 words.
#[derive(Debug, Clone)]
struct Band {
    words: Tensor<1, Int>,
    n: usize,
}

/// Why a matrix cannot be uploaded in block form.
#[derive(Debug, PartialEq)]
pub enum QuantError {
    NotQuantized(GgmlType),
    RowNotBlocks { k: usize, block: usize },
    WrongSize { expected: usize, got: usize },
}

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotQuantized(t) => write!(f, "{} is not a type the matmul kernels read in place", t.name()),
            Self::RowNotBlocks { k, block } => write!(f, "row length {k} is not a multiple of the {block}-element block"),
            Self::WrongSize { expected, got } => write!(f, "expected {expected} bytes of blocks, got {got}"),
        }
    }
}

impl std::error::Error for QuantError {}

impl QuantMatrix {
    /// Upload `bytes` (exactly `n` rows of `k / block_elems` blocks) to the placement's device,
    /// unchanged, in bands under its binding cap.
    pub fn upload(ty: GgmlType, bytes: &[u8], n: usize, k: usize, at: &Placement) -> Result<Self, QuantError> {
        Self::upload_stacked(ty, &[bytes], n, k, at)
    }

    /// [`QuantMatrix::upload`] of matrices of whole rows stacked (their bytes end to end,
    /// `n` rows in all), each band's words filled straight from the pieces: no stacked copy
    /// is made on the way, which left a hole in the heap per matrix.
    pub fn upload_stacked(ty: GgmlType, parts: &[&[u8]], n: usize, k: usize, at: &Placement) -> Result<Self, QuantError> {
        if !ty.stays_packed() {
            return Err(QuantError::NotQuantized(ty));
        }
        // The kernels walk rows in groups of 32 elements (F16 / BF16 included).
        let group = ty.block_elems().max(GROUP);
        if !k.is_multiple_of(group) {
            return Err(QuantError::RowNotBlocks { k, block: group });
        }
        let expected = n * k / ty.block_elems() * ty.block_bytes();
        let got = parts.iter().map(|p| p.len()).sum();
        if got != expected {
            return Err(QuantError::WrongSize { expected, got });
        }
        let row_bytes = expected / n.max(1);
        // Room for the padding and the spare word of each band.
        let rows_per_band = at.cap.per_binding(row_bytes, 8);
        let band_bytes = rows_per_band * row_bytes;
        let bands = (0..expected)
            .step_by(band_bytes.max(1))
            .map(|start| {
                let end = (start + band_bytes).min(expected);
                let words = pack_words(parts, start, end);
                let len = words.len();
                let opts = TensorCreationOptions::new(at.device.clone()).with_dtype(DType::U32);
                let words = Tensor::<1, Int>::from_data(TensorData::new(words, [len]), opts);
                let n = (end - start) / row_bytes;
                let words = <burn::backend::Dispatch as QuantOps>::lay_out_weights(words.into_dispatch(), ty.id(), n, k);
                Band { words: Tensor::from_dispatch(words), n }
            })
            .collect();
        Ok(Self { bands, ty, n, k, kernels: at.product_id() })
    }

    /// `x W^T`.
    ///
    /// # Shapes
    /// - x: `[m, k]` -> `[m, n]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.product(x, <burn::backend::Dispatch as QuantOps>::q_matmul)
    }

    /// `x W^T` for rows of different sequences, each row's result its own product's
    /// ([`QuantOps::q_matmul_rows`]).
    ///
    /// # Shapes
    /// - x: `[m, k]` -> `[m, n]`
    pub fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.product(x, <burn::backend::Dispatch as QuantOps>::q_matmul_rows)
    }

    /// `residual + x W^T` ([`QuantOps::q_matmul_add`]); a matrix stored in several bands
    /// adds after its product.
    ///
    /// # Shapes
    /// - x: `[m, k]`, residual: `[m, n]` -> `[m, n]`
    pub fn forward_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        match self.bands.as_slice() {
            [b] => Tensor::<2>::from_dispatch(<burn::backend::Dispatch as QuantOps>::q_matmul_add(
                x.into_dispatch(),
                b.words.clone().into_dispatch(),
                self.ty.id(),
                b.n,
                self.k,
                self.kernels,
                residual.into_dispatch(),
            )),
            _ => residual + self.forward(x),
        }
    }

    fn product(&self, x: Tensor<2>, op: DispatchProduct) -> Tensor<2> {
        let band = |b: &Band, x: Tensor<2>| {
            Tensor::<2>::from_dispatch(op(x.into_dispatch(), b.words.clone().into_dispatch(), self.ty.id(), b.n, self.k, self.kernels))
        };
        match self.bands.as_slice() {
            [one] => band(one, x),
            many => Tensor::cat(many.iter().map(|b| band(b, x.clone())).collect(), 1),
        }
    }

    /// Row bands the matrix is stored as (more than one only above the binding limit).
    pub fn bands(&self) -> usize {
        self.bands.len()
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    /// Bytes this matrix occupies on its device.
    pub fn device_bytes(&self) -> usize {
        self.bands.iter().map(|b| b.words.shape().num_elements() * 4).sum()
    }
}

/// One of [`QuantOps`]' products on the dispatching backend.
type DispatchProduct = fn(
    FloatTensor<burn::backend::Dispatch>,
    IntTensor<burn::backend::Dispatch>,
    u32,
    usize,
    usize,
    u32,
) -> FloatTensor<burn::backend::Dispatch>;

/// Little-endian u32 words of bytes `start..end` of `parts` laid end to end, zero-padded,
/// plus one spare word so that kernels may read an unaligned u32 at the very end without
/// leaving the buffer.
fn pack_words(parts: &[&[u8]], start: usize, end: usize) -> Vec<u32> {
    let mut words = vec![0u32; (end - start).div_ceil(4) + 1];
    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
    // `at`: where the part starts in the stacked bytes.
    let mut at = 0;
    for p in parts {
        let (lo, hi) = (start.max(at), end.min(at + p.len()));
        if lo < hi {
            bytes[lo - start..hi - start].copy_from_slice(&p[lo - at..hi - at]);
        }
        at += p.len();
    }
    // The bytes were copied in file order: each word is read little-endian (a no-op on
    // little-endian targets).
    for w in &mut words {
        *w = u32::from_le(*w);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::pack_words;

    #[test]
    fn stacked_parts_pack_as_their_concatenation() {
        let a: Vec<u8> = (0..10).collect();
        let b: Vec<u8> = (10..27).collect();
        let c: Vec<u8> = (27..33).collect();
        let whole = [a.as_slice(), &b, &c].concat();
        // Every band boundary, across and inside the parts, and odd lengths (zero padding).
        for start in 0..whole.len() {
            for end in start..=whole.len() {
                let packed = pack_words(&[&a, &b, &c], start, end);
                assert_eq!(packed.len(), (end - start).div_ceil(4) + 1, "{start}..{end}: the spare word");
                let mut bytes: Vec<u8> = packed.iter().flat_map(|w| w.to_le_bytes()).collect();
                assert!(bytes[end - start..].iter().all(|&x| x == 0), "{start}..{end}: padding");
                bytes.truncate(end - start);
                assert_eq!(bytes, &whole[start..end], "{start}..{end}");
            }
        }
    }
}
