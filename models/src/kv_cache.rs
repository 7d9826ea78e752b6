//! The decoder's KV cache: the rotated keys and the values of every layer, in f32 or packed
//! in GGML blocks (`--kv f16|q8_0|q4_0`, llama.cpp's `--cache-type-k` / `--cache-type-v`).
//!
//! A packed cache is written a row (one head at one position) at a time, quantised as
//! ggml's reference quantisers do, and attention reads the blocks: the CPU where it uses
//! them (a few rows at a time into L1), wgpu in two kernels that decode each key and value
//! row as they read it (`vidllm_shaders::kv_attention`). Q8_0 keeps a key or value in 8.5
//! bits, Q4_0 in 4.5, against f32's 32.
//!
//! Keys and values are rotated before they are quantised, as llama.cpp does for its
//! quantised caches (its `attn_rot`, after QuaRot, Ashkboos et al. 2024): a few channels
//! of a head carry most of its magnitude, and one block scale per 32 values spends the
//! 4 or 8 bits on them. An orthonormal Walsh-Hadamard matrix `H` spreads every channel
//! over all of them; queries get the same rotation as keys (`(H q) . (H k) = q . k`), and
//! the attention's output is rotated back (`H H = I`), so only the rounding changes.
//!
//! # Shapes
//! - f32: per layer `[1, n_kv_heads, rows, d_head]`
//! - packed: per layer `[n_kv_heads, rows, words]` u32, each row `d_head` values of the type,
//!   padded to a word

use burn::tensor::{DType, Device, Int, Tensor, TensorCreationOptions, TensorData};
use vidllm_core::ggml::GgmlType;
use vidllm_shaders::{Mask, attention, kv_attention, kv_attention_step, kv_row_words, kv_write, kv_write_step};

use crate::step_graph::StepGraphState;

use crate::llama::LlamaConfig;
use crate::rope::Rope;

/// What the cache keeps its keys and values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 4] = [KvType::F32, KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// The name `--kv` takes (llama.cpp's).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// The block type of a packed cache (`None`: f32 tensors).
    pub fn packed(self) -> Option<GgmlType> {
        match self {
            KvType::F32 => None,
            KvType::F16 => Some(GgmlType::F16),
            KvType::Q8_0 => Some(GgmlType::Q8_0),
            KvType::Q4_0 => Some(GgmlType::Q4_0),
        }
    }

    /// Whether a decoder with heads of `d_head` can keep its cache in this type: the
    /// block types hold whole blocks of 32 per row.
    pub fn fits(self, d_head: usize) -> bool {
        self == KvType::F32 || d_head.is_multiple_of(32)
    }

    /// Bytes of keys and values one position takes in every layer.
    pub fn bytes_per_token(self, cfg: &LlamaConfig) -> usize {
        let row = match self.packed() {
            None => cfg.d_head * 4,
            Some(ty) => kv_row_words(ty, cfg.d_head) * 4,
        };
        2 * cfg.n_layers * cfg.n_kv_heads * row
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|t| t.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|t| t.name()).collect();
            format!("unknown KV cache type {s:?} (one of {})", names.join(", "))
        })
    }
}

/// The KV cache type a front end asks for (`--kv`, Python's `kv=`, the browser's `kv`):
/// one type, or `auto`, the default: f16 where the decoder's heads are whole blocks of 32
/// values ([`KvType::fits`]), f32 where they are not.
///
/// f16 is llama.cpp's default too. Measured against f32 on SmolLM2-135M (2026-12-04):
/// - it takes half the memory (22.0 against 43.9 MiB per 1,000 tokens);
/// - its logits stay within 0.021 of f32's, with the same argmax at every position of the
///   parity cases;
/// - on the CPU, prefill is unchanged and decode at depth 1,024 is 1-18% faster;
/// - on lavapipe, decode at depth 512 is 37% faster, and a 256-token prefill 9% slower;
/// - in Chromium on SwiftShader, a decode step takes 453 dispatches instead of 753.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvChoice {
    #[default]
    Auto,
    Fixed(KvType),
}

impl KvChoice {
    /// The type a decoder with heads of `d_head` keeps its cache in.
    pub fn resolve(self, d_head: usize) -> KvType {
        match self {
            KvChoice::Fixed(ty) => ty,
            KvChoice::Auto if KvType::F16.fits(d_head) => KvType::F16,
            KvChoice::Auto => KvType::F32,
        }
    }
}

impl From<KvType> for KvChoice {
    fn from(ty: KvType) -> Self {
        KvChoice::Fixed(ty)
    }
}

impl std::fmt::Display for KvChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvChoice::Auto => f.write_str("auto"),
            KvChoice::Fixed(ty) => ty.fmt(f),
        }
    }
}

impl std::str::FromStr for KvChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(KvChoice::Auto);
        }
        s.parse().map(KvChoice::Fixed).map_err(|e: String| e.replace(" (one of ", " (auto, or one of "))
    }
}

/// Per-layer storage.
enum Store {
    F32 {
        k: Vec<Tensor<4>>,
        v: Vec<Tensor<4>>,
    },
    Packed {
        ty: GgmlType,
        k: Vec<Tensor<3, Int>>,
        v: Vec<Tensor<3, Int>>,
        rotation: Option<Box<Rotation>>,
        /// What stands in a layer's place while its tensor is moved out to be written
        /// (see [`KvCache::attend`]): made once, never written, shared by every layer. Made
        /// per write, it was two uploads a layer per step, and wgpu's queue submits the
        /// recorded work before every upload (74 submits a SmolLM2 decode step, not 25).
        placeholder: Box<Tensor<3, Int>>,
    },
}

/// The Walsh-Hadamard rotations of a quantised cache, where heads are whole multiples of
/// 64 channels (llama.cpp's rule): keys and queries by the largest power-of-two block
/// (from 64) that divides the head, values and the output by blocks of 64.
struct Rotation {
    keys: Tensor<2>,
    values: Tensor<2>,
}

impl Rotation {
    fn new(ty: GgmlType, d_head: usize, device: &Device) -> Option<Self> {
        if ty == GgmlType::F16 || !d_head.is_multiple_of(64) {
            return None;
        }
        let mut n = 64;
        while d_head.is_multiple_of(2 * n) {
            n *= 2;
        }
        Some(Self { keys: hadamard(n, device), values: hadamard(64, device) })
    }
}

/// The orthonormal Walsh-Hadamard matrix of order `n` (a power of two), Sylvester's:
/// `H[i][j] = (-1)^popcount(i & j) / sqrt(n)`. Symmetric, and its own inverse.
fn hadamard(n: usize, device: &Device) -> Tensor<2> {
    let scale = 1.0 / (n as f32).sqrt();
    let h: Vec<f32> = (0..n * n).map(|e| if ((e / n) & (e % n)).count_ones().is_multiple_of(2) { scale } else { -scale }).collect();
    Tensor::from_data(TensorData::new(h, [n, n]), device)
}

/// `x` with each run of `h`'s order along its last axis multiplied by `h` (symmetric).
///
/// # Shapes
/// - x: `[a, b, c, d]`, h: `[n, n]` with `n` dividing `d` -> `[a, b, c, d]`
fn rotate(x: Tensor<4>, h: &Tensor<2>) -> Tensor<4> {
    let dims = x.dims();
    let n = h.dims()[0];
    x.reshape([dims.iter().product::<usize>() / n, n]).matmul(h.clone()).reshape(dims)
}

/// Keys and values of every layer; `len` is the next row.
///
/// A row's RoPE position is its row number plus the positions skipped before it: a
/// reduced video whose kept tokens keep their original positions (FastVID) leaves gaps,
/// and what follows continues after the unreduced video ([`KvCache::next_position`]).
///
/// Storage grows as positions are written, doubling from [`KvCache::FIRST_ROWS`] up to
/// `capacity`, so a conversation pays for the context it uses rather than the context it
/// may use: SmolLM2's full 4096-token cache is 189 MB in f32, and `serve --parallel 8`
/// holds eight. Growing copies the rows written so far (amortised once per position); what
/// attention reads is the same either way.
pub struct KvCache {
    store: Store,
    kv: KvType,
    pub len: usize,
    /// Most positions the cache holds (the context).
    pub capacity: usize,
    /// `(row, skipped)`: the RoPE positions jump by `skipped` just before `row`, rows ascending.
    gaps: Vec<(usize, usize)>,
    /// Per layer, the rows (layer 0's numbering, ascending) that layer does not hold: a
    /// reduction inside the decoder (FrameFusion) dropped them after an earlier layer had
    /// attended to them. Empty where every layer holds every row.
    dropped: Vec<Vec<usize>>,
    /// Per layer, rows written in the pass under way and not yet counted in `len`.
    staged: Vec<usize>,
    /// The decode step recorded over this cache's buffers ([`crate::step_graph`]).
    graph: StepGraphState,
}

impl KvCache {
    /// Rows allocated before any grows.
    pub const FIRST_ROWS: usize = 256;

    /// An f32 cache for up to `capacity` positions, its storage allocated as they are used.
    pub fn new(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Self {
        Self::typed(KvType::F32, cfg, capacity, device)
    }

    /// A cache of type `kv` for up to `capacity` positions, allocated as they are used.
    ///
    /// # Panics
    /// If `kv` does not fit the heads ([`KvType::fits`]; front ends refuse it first).
    pub fn typed(kv: KvType, cfg: &LlamaConfig, capacity: usize, device: &Device) -> Self {
        Self::with_rows_typed(kv, cfg, capacity, capacity.min(Self::FIRST_ROWS), device)
    }

    /// An f32 cache whose storage for all `capacity` positions is allocated now.
    pub fn full(cfg: &LlamaConfig, capacity: usize, device: &Device) -> Self {
        Self::with_rows(cfg, capacity, capacity, device)
    }

    /// An f32 cache for up to `capacity` positions whose storage starts at `rows` positions.
    pub fn with_rows(cfg: &LlamaConfig, capacity: usize, rows: usize, device: &Device) -> Self {
        Self::with_rows_typed(KvType::F32, cfg, capacity, rows, device)
    }

    /// A cache of type `kv` for up to `capacity` positions whose storage starts at `rows`.
    pub fn with_rows_typed(kv: KvType, cfg: &LlamaConfig, capacity: usize, rows: usize, device: &Device) -> Self {
        assert!(kv.fits(cfg.d_head), "a {kv} KV cache needs heads of whole 32-value blocks, not {}", cfg.d_head);
        let layers = cfg.n_layers;
        let store = match kv.packed() {
            None => {
                let zeros = || Tensor::<4>::zeros([1, cfg.n_kv_heads, rows, cfg.d_head], device);
                Store::F32 { k: (0..layers).map(|_| zeros()).collect(), v: (0..layers).map(|_| zeros()).collect() }
            }
            Some(ty) => {
                let words = kv_row_words(ty, cfg.d_head);
                let zeros = || packed_zeros(cfg.n_kv_heads, rows, words, device);
                Store::Packed {
                    ty,
                    k: (0..layers).map(|_| zeros()).collect(),
                    v: (0..layers).map(|_| zeros()).collect(),
                    rotation: Rotation::new(ty, cfg.d_head, device).map(Box::new),
                    placeholder: Box::new(packed_zeros(1, 1, 1, device)),
                }
            }
        };
        Self {
            store,
            kv,
            len: 0,
            capacity,
            gaps: Vec::new(),
            dropped: vec![Vec::new(); layers],
            staged: vec![0; layers],
            graph: StepGraphState::None,
        }
    }

    /// What the keys and values are kept in.
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    /// Forget everything after row `len` (for reuse of a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        let len = self.len;
        self.gaps.retain(|&(row, _)| row < len);
        for d in &mut self.dropped {
            d.retain(|&row| row < len);
        }
        self.staged.fill(0);
    }

    /// Rows layer `layer` holds: `len`, less those a reduction inside the decoder dropped
    /// before that layer.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.len - self.dropped[layer].len()
    }

    /// The row layer `layer` writes next: its rows, plus those written in the pass under way.
    pub fn next_row(&self, layer: usize) -> usize {
        self.layer_len(layer) + self.staged[layer]
    }

    /// The RoPE position of the next row.
    pub fn next_position(&self) -> usize {
        self.len + self.gaps.iter().map(|&(_, skipped)| skipped).sum::<usize>()
    }

    /// The RoPE positions of the next `t` rows when `positions` (ascending, starting at or
    /// after [`KvCache::next_position`]) says where they go, else consecutive ones.
    ///
    /// # Panics
    /// If `positions` is not `t` ascending positions from the next one on.
    pub fn place(&self, t: usize, positions: Option<&[usize]>) -> Vec<usize> {
        let next = self.next_position();
        match positions {
            None => (next..next + t).collect(),
            Some(p) => {
                assert!(
                    p.len() == t && p.first().is_none_or(|&f| f >= next) && p.windows(2).all(|w| w[0] < w[1]),
                    "positions out of order"
                );
                p.to_vec()
            }
        }
    }

    /// Record that the next `positions.len()` rows were written at `positions` (what
    /// [`KvCache::place`] gave) in every layer, then advance `len` past them.
    pub fn advance(&mut self, positions: &[usize]) {
        self.staged.fill(0);
        self.record(positions);
    }

    /// [`KvCache::advance`] for a pass that dropped rows between layers: layer 0 wrote the
    /// rows at `positions`, and layer `l` all of them but `dropped[l]` (indices into
    /// `positions`, ascending; a later layer drops at least what an earlier one did).
    pub fn advance_dropping(&mut self, positions: &[usize], dropped: &[Vec<usize>]) {
        let base = self.len;
        for (l, d) in dropped.iter().enumerate() {
            debug_assert_eq!(self.staged[l], positions.len() - d.len(), "layer {l} wrote what it kept");
            self.dropped[l].extend(d.iter().map(|&i| base + i));
        }
        self.staged.fill(0);
        self.record(positions);
    }

    /// Count layer 0's new rows, at `positions`, recording where they skip positions.
    fn record(&mut self, positions: &[usize]) {
        let mut expect = self.next_position();
        for (i, &p) in positions.iter().enumerate() {
            if p > expect {
                self.gaps.push((self.len + i, p - expect));
            }
            expect = p + 1;
        }
        self.len += positions.len();
    }

    /// Positions the storage holds now.
    pub fn rows(&self) -> usize {
        match &self.store {
            Store::F32 { k, .. } => k.first().map_or(0, |t| t.dims()[2]),
            Store::Packed { k, .. } => k.first().map_or(0, |t| t.dims()[1]),
        }
    }

    pub fn device_bytes(&self) -> usize {
        match &self.store {
            Store::F32 { k, v } => k.iter().chain(v).map(|t| t.shape().num_elements() * 4).sum(),
            Store::Packed { k, v, .. } => k.iter().chain(v).map(|t| t.shape().num_elements() * 4).sum(),
        }
    }

    /// Make layer `layer`'s storage hold positions `..end`: double it (at least to `end`,
    /// at most to `capacity`), keeping the rows written.
    fn reserve(&mut self, layer: usize, end: usize) {
        let rows = self.rows_of(layer);
        if end <= rows {
            return;
        }
        assert!(end <= self.capacity, "KV cache overflow: position {end} of {}", self.capacity);
        self.drop_graph();
        let grown = end.max(rows * 2).min(self.capacity);
        match &mut self.store {
            Store::F32 { k, v } => {
                for t in [&mut k[layer], &mut v[layer]] {
                    let [b, heads, _, dh] = t.dims();
                    let extra = Tensor::<4>::zeros([b, heads, grown - rows, dh], &t.device());
                    let old = std::mem::replace(t, extra.clone());
                    *t = Tensor::cat(vec![old, extra], 2);
                }
            }
            Store::Packed { k, v, .. } => {
                for t in [&mut k[layer], &mut v[layer]] {
                    let [heads, _, words] = t.dims();
                    let extra = packed_zeros(heads, grown - rows, words, &t.device());
                    let old = std::mem::replace(t, extra.clone());
                    *t = Tensor::cat(vec![old, extra], 1);
                }
            }
        }
    }

    fn rows_of(&self, layer: usize) -> usize {
        match &self.store {
            Store::F32 { k, .. } => k[layer].dims()[2],
            Store::Packed { k, .. } => k[layer].dims()[1],
        }
    }

    /// Append this step's keys and values to layer `layer` at [`KvCache::next_row`], then
    /// attend the queries over the whole prefix (the caller advances `len` once every layer
    /// has run). Queries of a group share their key-value head, folded into the rows.
    ///
    /// # Shapes
    /// - q: `[1, n_kv_heads, r * t, d_head]`; k, v: `[1, n_kv_heads, t, d_head]`
    /// - bias: `[1, 1, r * t, len + t]` (see [`vidllm_shaders::attention`])
    /// - returns `[1, n_kv_heads, r * t, d_head]`
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &mut self,
        layer: usize,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        bias: Tensor<4>,
        scale: f64,
        mask: Mask,
    ) -> Tensor<4> {
        let [_, kvh, t, dh] = k.dims();
        let start = self.next_row(layer);
        let end = start + t;
        // A recording holds the buffers it wrote; a pass without it may replace them.
        self.drop_graph();
        self.reserve(layer, end);
        self.staged[layer] += t;
        // The cache tensors are moved out (a small placeholder left behind) rather than
        // cloned: a clone shares the storage, and writing into shared storage copies all
        // of it, the whole context's keys and values per layer and token (190 MB a token
        // for SmolLM2 at a 4096-token f32 context).
        match &mut self.store {
            Store::F32 { k: ks, v: vs } => {
                let range = [0..1, 0..kvh, start..end, 0..dh];
                let old_k = std::mem::replace(&mut ks[layer], k.clone());
                ks[layer] = old_k.slice_assign(range.clone(), k);
                let old_v = std::mem::replace(&mut vs[layer], v.clone());
                vs[layer] = old_v.slice_assign(range, v);
                let keys = ks[layer].clone().narrow(2, 0, end); // [1, kvh, s, dh]
                let values = vs[layer].clone().narrow(2, 0, end);
                attention(q, keys, values, bias, scale, mask)
            }
            store => attend_packed(
                store,
                layer,
                [q, k, v],
                |cache, x, ty| kv_write(cache, x, ty, start),
                |q, ks, vs, ty| kv_attention(q, ks, vs, ty, end, bias, scale, mask),
            ),
        }
    }
}

impl KvCache {
    /// [`KvCache::attend`] for a decode step whose row and keys the step tensor holds when
    /// the kernels run ([`crate::step_graph`]), on a packed cache whose storage already
    /// holds the row ([`KvCache::reserve_step`]). Nothing is counted: the caller advances.
    ///
    /// # Shapes
    /// - q: `[1, n_kv_heads, r, d_head]`; k, v: `[1, n_kv_heads, 1, d_head]` -> `[1, n_kv_heads, r, d_head]`
    pub(crate) fn attend_step(
        &mut self,
        layer: usize,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        step: &Tensor<1, Int>,
        scale: f64,
    ) -> Tensor<4> {
        attend_packed(
            &mut self.store,
            layer,
            [q, k, v],
            |cache, x, ty| kv_write_step(cache, x, ty, step),
            |q, ks, vs, ty| kv_attention_step(q, ks, vs, ty, step, scale),
        )
    }

    /// Whether a decode step can rotate its queries and keys and write its keys and values
    /// in one kernel ([`KvCache::attend_step_rope`]): a packed cache with no rotation.
    pub(crate) fn fuses_rope(&self) -> bool {
        matches!(self.store, Store::Packed { rotation: None, .. })
    }

    /// [`KvCache::attend_step`] from the joined projection's row, unrotated: RoPE and the
    /// cache writes in one kernel ([`Rope::kv_step`]), then the attention.
    ///
    /// # Shapes
    /// - qkv: `[1, (n_heads + 2 n_kv_heads) d_head]` -> `[1, n_kv_heads, n_heads / n_kv_heads, d_head]`
    pub(crate) fn attend_step_rope(
        &mut self,
        layer: usize,
        qkv: Tensor<2>,
        rope: &Rope,
        [heads, kv_heads]: [usize; 2],
        step: &Tensor<1, Int>,
        scale: f64,
    ) -> Tensor<4> {
        let Store::Packed { ty, k: ks, v: vs, rotation: None, placeholder } = &mut self.store else {
            panic!("attend_step_rope: a packed cache with no rotation (KvCache::fuses_rope)");
        };
        let old_k = std::mem::replace(&mut ks[layer], placeholder.as_ref().clone());
        let old_v = std::mem::replace(&mut vs[layer], placeholder.as_ref().clone());
        let (q, k, v) = rope.kv_step(qkv, step, old_k, old_v, *ty, heads, kv_heads);
        (ks[layer], vs[layer]) = (k, v);
        let [_, _, _, dh] = q.dims();
        let q = q.reshape([1, kv_heads, heads / kv_heads, dh]);
        kv_attention_step(q, ks[layer].clone(), vs[layer].clone(), *ty, step, scale)
    }

    /// Whether a decode step over this cache can be recorded: packed, every layer at the
    /// same row, a free row, and no recording refused before.
    pub(crate) fn steps_recordable(&self) -> bool {
        matches!(self.store, Store::Packed { .. })
            && !matches!(self.graph, StepGraphState::Unsupported(_))
            && self.len < self.capacity
            && self.dropped.iter().all(Vec::is_empty)
            && self.staged.iter().all(|&s| s == 0)
    }

    /// Every layer's storage made to hold rows `..end` (growing drops the recording).
    pub(crate) fn reserve_step(&mut self, end: usize) {
        for layer in 0..self.staged.len() {
            self.reserve(layer, end);
        }
    }

    pub(crate) fn graph_state_mut(&mut self) -> &mut StepGraphState {
        &mut self.graph
    }

    pub(crate) fn set_graph_state(&mut self, state: StepGraphState) {
        self.graph = state;
    }

    /// Why decode steps over this cache are not replayed, if they are not (`None`: they are
    /// replayed, or none has run yet).
    pub fn step_graph_refused(&self) -> Option<&str> {
        match &self.graph {
            StepGraphState::Unsupported(why) => Some(why),
            _ => None,
        }
    }

    /// Whether a recorded decode step is held.
    pub fn step_graph_ready(&self) -> bool {
        matches!(self.graph, StepGraphState::Ready(_))
    }

    /// The recording forgotten (a refusal is kept).
    fn drop_graph(&mut self) {
        if matches!(self.graph, StepGraphState::Ready(_)) {
            self.graph = StepGraphState::None;
        }
    }
}

/// A packed cache's attention pass over layer `layer`: queries, keys and values rotated
/// where the type asks for it, the keys and values written by `write`, the queries
/// attended by `attend`, the output rotated back. The layer's tensors are moved out (the
/// placeholder left behind) rather than cloned: a clone shares the storage, and writing
/// into shared storage copies all of it.
///
/// # Shapes
/// - q: `[1, n_kv_heads, r * t, d_head]`; k, v: `[1, n_kv_heads, t, d_head]` -> like q
fn attend_packed(
    store: &mut Store,
    layer: usize,
    [q, k, v]: [Tensor<4>; 3],
    write: impl Fn(Tensor<3, Int>, Tensor<3>, GgmlType) -> Tensor<3, Int>,
    attend: impl FnOnce(Tensor<4>, Tensor<3, Int>, Tensor<3, Int>, GgmlType) -> Tensor<4>,
) -> Tensor<4> {
    let Store::Packed { ty, k: ks, v: vs, rotation, placeholder } = store else {
        panic!("attend_packed: an f32 cache");
    };
    let [_, kvh, t, dh] = k.dims();
    let (q, k, v) = match rotation {
        Some(r) => (rotate(q, &r.keys), rotate(k, &r.keys), rotate(v, &r.values)),
        None => (q, k, v),
    };
    let old_k = std::mem::replace(&mut ks[layer], placeholder.as_ref().clone());
    ks[layer] = write(old_k, k.reshape([kvh, t, dh]), *ty);
    let old_v = std::mem::replace(&mut vs[layer], placeholder.as_ref().clone());
    vs[layer] = write(old_v, v.reshape([kvh, t, dh]), *ty);
    let out = attend(q, ks[layer].clone(), vs[layer].clone(), *ty);
    match rotation {
        Some(r) => rotate(out, &r.values),
        None => out,
    }
}

/// `[heads, rows, words]` zero u32 words.
fn packed_zeros(heads: usize, rows: usize, words: usize, device: &Device) -> Tensor<3, Int> {
    let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::U32);
    Tensor::from_data(TensorData::new(vec![0u32; heads * rows * words], [heads, rows, words]), opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_heads_fit() {
        for kv in KvType::ALL {
            assert_eq!(kv.name().parse::<KvType>(), Ok(kv));
            assert_eq!(kv.name().to_uppercase().parse::<KvType>(), Ok(kv));
        }
        let err = "q5_1".parse::<KvType>().unwrap_err();
        assert!(err.contains("f32, f16, q8_0, q4_0"), "{err}");
        assert!(KvType::Q8_0.fits(64) && KvType::Q4_0.fits(96) && KvType::F16.fits(32));
        assert!(!KvType::Q8_0.fits(80) && !KvType::F16.fits(48) && KvType::F32.fits(80));
    }

    /// `auto` is the default, f16 where the heads fit it and f32 where they do not; a named
    /// type is kept as named (`set_kv` refuses it if it does not fit).
    #[test]
    fn the_default_choice_is_f16_where_heads_fit() {
        assert_eq!(KvChoice::default(), KvChoice::Auto);
        assert_eq!("auto".parse::<KvChoice>(), Ok(KvChoice::Auto));
        assert_eq!("Q8_0".parse::<KvChoice>(), Ok(KvChoice::Fixed(KvType::Q8_0)));
        let err = "q5".parse::<KvChoice>().unwrap_err();
        assert!(err.contains("unknown KV cache type \"q5\" (auto, or one of f32, f16, q8_0, q4_0)"), "{err}");
        assert_eq!(KvChoice::Auto.resolve(64), KvType::F16);
        assert_eq!(KvChoice::Auto.resolve(128), KvType::F16);
        assert_eq!(KvChoice::Auto.resolve(48), KvType::F32);
        assert_eq!(KvChoice::Auto.resolve(8), KvType::F32);
        assert_eq!(KvChoice::Fixed(KvType::F32).resolve(64), KvType::F32);
        assert_eq!(KvChoice::Fixed(KvType::Q4_0).resolve(48), KvType::Q4_0);
        assert_eq!(KvChoice::Auto.to_string(), "auto");
    }

    /// The Sylvester matrices are orthonormal and their own inverses (what lets the
    /// output be rotated back with the same matrix).
    #[test]
    fn hadamard_is_its_own_inverse() {
        let device = Device::flex();
        for n in [64, 128] {
            let h = hadamard(n, &device);
            let hh: Vec<f32> = h.clone().matmul(h).into_data().try_into_vec().unwrap();
            for (i, v) in hh.iter().enumerate() {
                let want = if i / n == i % n { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-6, "n {n} [{}, {}]: {v}", i / n, i % n);
            }
        }
    }
}
