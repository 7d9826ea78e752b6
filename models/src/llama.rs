//! LLaMA-family decoder (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation
//! Language Models"); reference: transformers `models/llama/modeling_llama.py` and
//! llama.cpp `src/models/llama.cpp`.
//!
//! Pre-norm residual blocks: `h = x + Attn(RMSNorm(x))`, `y = h + MLP(RMSNorm(h))`, with
//! RoPE, grouped-query attention and a SwiGLU MLP `down(silu(gate(x)) * up(x))`.
//! Weights are immutable; the KV cache is the run state, allocated once, passed `&mut`.
//!
//! The Qwen families are this graph with two optional parts (see `decoder_family.rs`):
//! Qwen2 adds q/k/v projection biases, Qwen3 a per-head RMSNorm on queries and keys before
//! RoPE ("QK-norm"), with a head size that need not be `d_model / n_heads`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use vidllm_core::gguf::FileBytes;
use vidllm_shaders::device::BindingCap;
use vidllm_shaders::{Mask, silu_mul};

use crate::decoder_family::Family;
use crate::framefusion::{FrameFusion, last_row_attention};
use crate::kv_cache::KvCache;
use crate::quant_linear::{QuantLinear, StackedLinear};
use crate::rms_norm::RmsNorm;
use crate::rope::{Rope, RopeStyle};

/// Resolved decoder configuration (no options).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which of the graph's optional parts the checkpoint has.
    pub family: Family,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    /// Positions the model was trained for.
    pub max_context: usize,
}

/// Token embedding table kept on the host in its file format; rows are dequantised when
/// looked up (a few KB per token), so the device holds only the output projection.
pub struct HostEmbedding {
    pub ty: vidllm_core::ggml::GgmlType,
    /// In the model file's mapping where it is one (a GGUF opened natively: only the pages
    /// of rows looked up come into memory; SmolLM2's table is 30 MB of Q8_0), else owned.
    pub bytes: FileBytes,
    pub d_model: usize,
}

impl HostEmbedding {
    /// # Shapes
    /// - returns `[tokens.len(), d_model]`
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> Tensor<2> {
        let out: Vec<f32> = tokens.iter().flat_map(|&t| self.row(t)).collect();
        Tensor::from_data(TensorData::new(out, [tokens.len(), self.d_model]), device)
    }

    /// Token `t`'s row, dequantised (`d_model` values).
    pub fn row(&self, t: u32) -> Vec<f32> {
        let row = self.ty.bytes_for(self.d_model as u64).expect("row is whole blocks") as usize;
        vidllm_core::ggml::dequantize(self.ty, &self.bytes[t as usize * row..(t as usize + 1) * row], self.d_model)
    }

    pub fn rows(&self) -> usize {
        let row = self.ty.bytes_for(self.d_model as u64).unwrap_or(1) as usize;
        self.bytes.len() / row
    }
}

pub struct Attention {
    /// The query, key and value projections, in that order, as one product.
    pub qkv: StackedLinear,
    pub o: QuantLinear,
    /// Qwen2-style projection biases (absent for LLaMA).
    pub q_bias: Option<Tensor<1>>,
    pub k_bias: Option<Tensor<1>>,
    pub v_bias: Option<Tensor<1>>,
    /// Qwen3's QK-norm: RMSNorm over each head's `d_head` values, shared by all heads.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

pub struct Mlp {
    /// The gate and up projections, in that order, as one product.
    pub gate_up: StackedLinear,
    pub down: QuantLinear,
}

pub struct Block {
    pub attn_norm: RmsNorm,
    pub attn: Attention,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: HostEmbedding,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// Output projection (the embedding matrix itself when tied).
    pub lm_head: QuantLinear,
    pub rope: Rope,
    pub device: Device,
    /// The binding cap of the device it was loaded onto: prefill chunks are sized under it.
    pub cap: BindingCap,
    /// This decoder among those loaded in the process: a recorded decode step
    /// ([`crate::step_graph`]) replays only with the weights it was recorded with.
    pub id: u64,
}

impl Attention {
    /// `positions`: each row's RoPE position (consecutive except after a reduced video).
    /// Returns the output (plus `residual` where given, in the output projection's
    /// kernel), and the rotated queries and keys (FrameFusion ranks tokens by the last
    /// row's attention).
    ///
    /// # Shapes
    /// - x: `[t, d_model]` -> `[t, d_model]`, q `[1, n_heads, t, d_head]`, k `[1, n_kv_heads, t, d_head]`
    #[allow(clippy::too_many_arguments)]
    fn forward_parts(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        positions: &[usize],
        cache: &mut KvCache,
        layer: usize,
        mask: &CausalMask,
        residual: Option<Tensor<2>>,
    ) -> (Tensor<2>, Tensor<4>, Tensor<4>) {
        let [q, k, v] = self.heads(self.qkv.forward(x), cfg, rope, At::Rows(positions));
        let ctx = self.attend(q.clone(), k.clone(), v, cfg, cache, layer, mask);
        let out = match residual {
            Some(r) => self.o.forward_add(ctx, r),
            None => self.o.forward(ctx),
        };
        (out, q, k)
    }

    /// One token of each of several sequences, each at its own position in its own cache:
    /// the projections run as one product over the rows, the attention per sequence.
    ///
    /// # Shapes
    /// - x: `[caches.len(), d_model]` -> same
    fn forward_batch(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
        mask: &CausalMask,
    ) -> Tensor<2> {
        let positions: Vec<usize> = caches.iter().map(|c| c.next_position()).collect();
        let [q, k, v] = self.heads(self.qkv.forward_rows(x), cfg, rope, At::Rows(&positions));
        let row = |t: &Tensor<4>, i: usize| t.clone().narrow(2, i, 1);
        let ctx =
            caches.iter_mut().enumerate().map(|(i, c)| self.attend(row(&q, i), row(&k, i), row(&v, i), cfg, c, layer, mask)).collect();
        self.o.forward_rows(Tensor::cat(ctx, 0))
    }

    /// Queries, keys and values of `t` rows (the stacked projection's outputs), biases and
    /// QK-norm applied, heads split out; queries and keys rotated for `positions` (each
    /// row's RoPE position).
    ///
    /// # Shapes
    /// - qkv: `[t, n_heads * d_head]`, `[t, n_kv_heads * d_head]` twice -> `[1, n_heads, t, d_head]`,
    ///   and `[1, n_kv_heads, t, d_head]` twice
    fn heads(&self, qkv: Vec<Tensor<2>>, cfg: &LlamaConfig, rope: &Rope, at: At) -> [Tensor<4>; 3] {
        let [t, _] = qkv[0].dims();
        let (h, kvh, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        let proj = |y: Tensor<2>, b: &Option<Tensor<1>>, norm: &Option<RmsNorm>, heads: usize| {
            let y = match b {
                Some(b) => y + b.clone().unsqueeze::<2>(),
                None => y,
            };
            // QK-norm normalises each head's vector on its own: rows of d_head values.
            match norm {
                Some(n) => n.forward(y.reshape([t * heads, dh])).reshape([t, heads * dh]),
                None => y,
            }
        };
        let [q, k, v]: [Tensor<2>; 3] = qkv.try_into().expect("q, k and v");
        let rotate = |y: Tensor<2>, heads: usize| match at {
            At::Rows(positions) => rope.heads(y, heads, positions),
            At::Step(step) => rope.heads_step(y, heads, step),
        };
        let q = rotate(proj(q, &self.q_bias, &self.q_norm, h), h);
        let k = rotate(proj(k, &self.k_bias, &self.k_norm, kvh), kvh);
        let v = proj(v, &self.v_bias, &None, kvh).reshape([1, t, kvh, dh]).swap_dims(1, 2);
        [q, k, v]
    }

    /// Append rotated keys and values at the layer's next row, then attend the queries over
    /// the whole prefix (the caller advances `cache.len` once every layer has run).
    ///
    /// # Shapes
    /// - q: `[1, n_heads, t, d_head]`, k and v: `[1, n_kv_heads, t, d_head]` -> `[t, n_heads * d_head]`
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        cfg: &LlamaConfig,
        cache: &mut KvCache,
        layer: usize,
        mask: &CausalMask,
    ) -> Tensor<2> {
        let t = q.dims()[2];
        let (h, kvh, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        // Grouped-query attention without copying K/V: query heads j*r..(j+1)*r share KV
        // head j, so fold the group into the row axis.
        let r = h / kvh;
        let q = q.reshape([1, kvh, r * t, dh]);
        let ctx = cache.attend(layer, q, k, v, mask.bias.clone(), (dh as f64).powf(-0.5), mask.rule); // [1, kvh, r*t, dh]
        ctx.reshape([1, h, t, dh]).swap_dims(1, 2).reshape([t, h * dh])
    }

    /// [`Attention::forward_parts`] for a decode step whose position, cache row and keys
    /// a step tensor holds ([`crate::step_graph`]): nothing in it depends on them, so it
    /// can be recorded once and replayed. Returns `residual` plus the output.
    ///
    /// # Shapes
    /// - x, residual: `[1, d_model]` -> `[1, d_model]`
    #[allow(clippy::too_many_arguments)]
    fn forward_step(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        step: &Tensor<1, Int>,
        cache: &mut KvCache,
        layer: usize,
        residual: Tensor<2>,
    ) -> Tensor<2> {
        let (h, kvh, dh) = (cfg.n_heads, cfg.n_kv_heads, cfg.d_head);
        let scale = (dh as f64).powf(-0.5);
        // With no biases or QK-norm between the projection and RoPE, the joined row goes
        // straight to one kernel that rotates and writes the cache.
        let plain =
            [&self.q_bias, &self.k_bias, &self.v_bias].iter().all(|b| b.is_none()) && self.q_norm.is_none() && self.k_norm.is_none();
        let ctx = if plain && cache.fuses_rope() {
            cache.attend_step_rope(layer, self.qkv.forward_joined(x), rope, [h, kvh], step, scale)
        } else {
            let [q, k, v] = self.heads(self.qkv.forward(x), cfg, rope, At::Step(step));
            cache.attend_step(layer, q.reshape([1, kvh, h / kvh, dh]), k, v, step, scale)
        }; // [1, kvh, r, dh]
        self.o.forward_add(ctx.reshape([1, h * dh]), residual)
    }
}

/// Where a pass's rows go: RoPE positions known on the host, or a decode step's, read
/// from its step tensor by the kernels.
#[derive(Clone, Copy)]
enum At<'a> {
    Rows(&'a [usize]),
    Step(&'a Tensor<1, Int>),
}

/// Which keys each query row sees: row `(g, i)` (query head `g` of a group, position
/// `start + i`) sees key `j` iff `j <= start + i`. The rule, and its additive form
/// `[1, 1, r * t, start + t]` for the backends that compose attention.
struct CausalMask {
    rule: Mask,
    bias: Tensor<4>,
    /// The cache rows before the first query row.
    start: usize,
}

fn causal_mask(r: usize, t: usize, start: usize, device: &Device) -> CausalMask {
    let rule = Mask::Causal { t, start };
    let (rows, keys) = (r * t, start + t);
    match rule.bias(rows, keys) {
        Some(bias) => CausalMask { rule, bias: Tensor::from_data(TensorData::new(bias, [1, 1, rows, keys]), device), start },
        // One token sees every key.
        None => CausalMask { rule: Mask::None, bias: Tensor::zeros([1, 1, 1, 1], device), start },
    }
}

impl Mlp {
    /// `residual` plus the MLP's output, added in the down projection's kernel.
    ///
    /// # Shapes
    /// - x, residual: `[t, d_model]` -> `[t, d_model]`
    fn forward_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        self.down.forward_add(silu_mul(self.gate_up.forward_joined(x)), residual)
    }

    /// The MLP's output (without the residual) for rows of different sequences, each row's
    /// product its own ([`QuantLinear::forward_rows`]).
    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.down.forward_rows(silu_mul(self.gate_up.forward_rows_joined(x)))
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        positions: &[usize],
        cache: &mut KvCache,
        layer: usize,
        mask: &CausalMask,
    ) -> Tensor<2> {
        // Each residual add runs in the kernel of the projection it follows.
        let h = self.attn.forward_parts(self.attn_norm.forward(x.clone()), cfg, rope, positions, cache, layer, mask, Some(x)).0;
        self.mlp.forward_add(self.mlp_norm.forward(h.clone()), h)
    }

    /// [`Block::forward`] for a decode step ([`Attention::forward_step`]).
    pub(crate) fn forward_step(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        step: &Tensor<1, Int>,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<2> {
        let h = self.attn.forward_step(self.attn_norm.forward(x.clone()), cfg, rope, step, cache, layer, x);
        self.mlp.forward_add(self.mlp_norm.forward(h.clone()), h)
    }

    /// [`Block::forward`] for one token of each of several sequences.
    fn forward_batch(
        &self,
        x: Tensor<2>,
        cfg: &LlamaConfig,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
        mask: &CausalMask,
    ) -> Tensor<2> {
        let h = x.clone() + self.attn.forward_batch(self.attn_norm.forward(x), cfg, rope, caches, layer, mask);
        h.clone() + self.mlp.forward_rows(self.mlp_norm.forward(h))
    }
}

/// A FrameFusion prefill between read-backs: the rows alive, where each layer's attention
/// stands, and the step waiting for values (see [`Llama::fused_advance`]).
pub struct FusedPrefill {
    /// Each prompt row's RoPE position.
    positions: Vec<usize>,
    /// The prompt rows the current rows are.
    alive: Vec<usize>,
    /// The rows layer 0 attended to (after the merge before it).
    first: Vec<usize>,
    /// The rows each layer attended to so far.
    held: Vec<Vec<usize>>,
    /// The next layer to run.
    layer: usize,
    /// The rows the next [`FrameFusion::apply`] reduces: before the layers (`None`) or
    /// after that layer's attention (the residual added).
    pending: Option<(Option<usize>, Tensor<2>)>,
    /// Values to read before anything else runs.
    need: Option<Tensor<1>>,
}

/// What a FrameFusion prefill needs next: these values read back, or nothing more (the
/// last row's logits, `[1, vocab_size]`).
pub enum Fused {
    Read(Tensor<1>),
    Logits(Tensor<2>),
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every position (teacher forcing, parity tests).
    All,
    /// None (an inner prefill chunk).
    None,
}

/// Prompt tokens run per pass during prefill.
pub const PREFILL_CHUNK: usize = 256;

impl Llama {
    /// Run `tokens` at the cache's next positions, appending them to the cache.
    ///
    /// # Shapes
    /// - returns `[1 or tokens.len(), vocab_size]`
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Tensor<2> {
        if let ([token], Logits::Last) = (tokens, which)
            && let Some(logits) = self.decode_step(*token, cache)
        {
            return logits;
        }
        self.forward_embeds(self.embed.lookup(tokens, &self.device), cache, which)
    }

    /// Run input embeddings (text and visual tokens already merged) at the cache's next
    /// positions.
    ///
    /// # Shapes
    /// - x: `[t, d_model]` -> `[1 or t, vocab_size]`
    pub fn forward_embeds(&self, x: Tensor<2>, cache: &mut KvCache, which: Logits) -> Tensor<2> {
        self.forward_embeds_at(x, None, cache, which)
    }

    /// [`Llama::forward_embeds`], row `i` at RoPE position `positions[i]` where given
    /// (ascending, from the cache's next position on): a reduced video's kept tokens at
    /// their places in the unreduced one. Attention still runs over the cache's rows.
    ///
    /// # Shapes
    /// - x: `[t, d_model]`, positions: `t` -> `[1 or t, vocab_size]`
    pub fn forward_embeds_at(&self, x: Tensor<2>, positions: Option<&[usize]>, cache: &mut KvCache, which: Logits) -> Tensor<2> {
        let t = x.dims()[0];
        let positions = cache.place(t, positions);
        let chunk = self.prefill_chunk(cache.capacity);
        if t > chunk {
            // Long prompts run in chunks: each attends to the cache so far, so the masked
            // half of the score matrix is never computed and peak memory stays bounded.
            let mut outs = Vec::new();
            for start in (0..t).step_by(chunk) {
                let len = chunk.min(t - start);
                let last = start + len == t;
                let want = if which == Logits::All {
                    Logits::All
                } else if last {
                    Logits::Last
                } else {
                    Logits::None
                };
                if let Some(y) = self.forward_chunk(x.clone().narrow(0, start, len), &positions[start..start + len], cache, want) {
                    outs.push(y);
                }
            }
            return Tensor::cat(outs, 0);
        }
        self.forward_chunk(x, &positions, cache, which).expect("logits were asked for")
    }

    /// One decode step of several sequences: `tokens[i]` runs at position `caches[i].len`
    /// of its own cache, and the products of every layer run once over all the rows (what
    /// a server decoding `--parallel` requests together needs: the weights are read once
    /// per step, not once per sequence). The products keep each row's arithmetic its
    /// own ([`QuantLinear::forward_rows`]), so a sequence's logits do not depend on the
    /// batch. Each cache must have a free position.
    ///
    /// # Shapes
    /// - returns `[tokens.len(), vocab_size]`: row `i` is sequence `i`'s next-token logits
    pub fn forward_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Tensor<2> {
        assert_eq!(tokens.len(), caches.len(), "one token per sequence");
        assert!(caches.iter().all(|c| c.len < c.capacity), "a cache is full");
        if let [cache] = caches {
            return self.forward(tokens, cache, Logits::Last);
        }
        // One query row per sequence sees every key of its own cache.
        let mask = causal_mask(self.cfg.n_heads / self.cfg.n_kv_heads, 1, 0, &self.device);
        let mut x = self.embed.lookup(tokens, &self.device);
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward_batch(x, &self.cfg, &self.rope, caches, layer, &mask);
        }
        for c in caches.iter_mut() {
            let next = c.next_position();
            c.advance(&[next]);
        }
        self.lm_head.forward_rows(self.norm.forward(x))
    }

    /// Tokens per prefill step: [`PREFILL_CHUNK`], fewer where the step's attention scores
    /// `[heads, chunk, context]` or logits `[chunk, vocab]` would outgrow one storage binding.
    pub fn prefill_chunk(&self, context: usize) -> usize {
        self.cap.per_binding(4 * (self.cfg.n_heads * context).max(self.cfg.vocab_size), 0).min(PREFILL_CHUNK)
    }

    /// A video prompt's prefill with FrameFusion: the rows go through the layers one
    /// layer at a time (each layer's attention in chunks of [`Llama::prefill_chunk`]
    /// rows), and between layers the method merges and drops visual rows. A row dropped
    /// after layer `k` stays in the cache of layers `..=k`; kept rows keep their RoPE
    /// positions. The prompt must start the conversation (an empty cache) and end in text.
    ///
    /// The values the method chooses by are read with `into_data` here;
    /// [`Llama::fused_begin`] and [`Llama::fused_advance`] run the same pass for a caller
    /// that reads them itself (a browser awaits WebGPU's read-backs).
    ///
    /// # Shapes
    /// - x: `[t, d_model]` -> `[1, vocab_size]` (the last row's logits)
    pub fn forward_fused(&self, x: Tensor<2>, cache: &mut KvCache, fusion: &mut FrameFusion) -> Result<Tensor<2>, String> {
        let mut run = self.fused_begin(x, cache, fusion)?;
        let mut values = None;
        loop {
            match self.fused_advance(&mut run, cache, fusion, values.take())? {
                Fused::Read(t) => values = Some(crate::framefusion::floats(t.into_data())?),
                Fused::Logits(logits) => return Ok(logits),
            }
        }
    }

    /// Start a FrameFusion prefill (see [`Llama::forward_fused`]); [`Llama::fused_advance`]
    /// runs it.
    pub fn fused_begin(&self, x: Tensor<2>, cache: &mut KvCache, fusion: &mut FrameFusion) -> Result<FusedPrefill, String> {
        if cache.len != 0 {
            return Err("FrameFusion reduces a video in the prompt that starts a conversation".into());
        }
        if !fusion.ends_in_text() {
            return Err("FrameFusion: the prompt must end in text after the video".into());
        }
        let t = x.dims()[0];
        let positions = cache.place(t, None);
        let need = fusion.query(None, &x, None);
        Ok(FusedPrefill {
            positions,
            alive: (0..t).collect(),
            first: Vec::new(),
            held: Vec::new(),
            layer: 0,
            pending: Some((None, x)),
            need,
        })
    }

    /// Run a FrameFusion prefill up to the next values the method needs read back, or to
    /// its end: `values` are those the last [`Fused::Read`] asked for (`None` at first).
    pub fn fused_advance(
        &self,
        run: &mut FusedPrefill,
        cache: &mut KvCache,
        fusion: &mut FrameFusion,
        mut values: Option<Vec<f32>>,
    ) -> Result<Fused, String> {
        if let Some(need) = run.need.take() {
            return Ok(Fused::Read(need));
        }
        let chunk = self.prefill_chunk(cache.capacity);
        loop {
            // The step the values were read for: merge before the layers, or reduce after a
            // layer's attention, then that layer's MLP.
            let x = match run.pending.take() {
                Some((None, x)) => {
                    let (x, kept) = fusion.apply(None, x, values.take())?;
                    if let Some(kept) = kept {
                        run.alive = kept;
                    }
                    run.first = run.alive.clone();
                    x
                }
                Some((Some(layer), h)) => {
                    let (h, kept) = fusion.apply(Some(layer), h, values.take())?;
                    if let Some(kept) = kept {
                        run.alive = kept.iter().map(|&i| run.alive[i]).collect();
                    }
                    // The MLP in chunks too: its hidden rows are the widest tensors of the pass.
                    let block = &self.blocks[layer];
                    let n = h.dims()[0];
                    let normed = block.mlp_norm.forward(h.clone());
                    let rows = |t: &Tensor<2>, s: usize| t.clone().narrow(0, s, chunk.min(n - s));
                    let mlp: Vec<Tensor<2>> =
                        (0..n).step_by(chunk.max(1)).map(|s| block.mlp.forward_add(rows(&normed, s), rows(&h, s))).collect();
                    run.layer = layer + 1;
                    Tensor::cat(mlp, 0)
                }
                None => return Err("FrameFusion: the prefill has nothing to run".into()),
            };
            if run.layer == self.blocks.len() {
                return Ok(Fused::Logits(self.fused_end(run, x, cache, fusion)));
            }
            let (h, attention) = self.fused_attention(run, x, cache, chunk, fusion.wants_attention());
            run.held.push(run.alive.clone());
            let need = fusion.query(Some(run.layer), &h, attention);
            run.pending = Some((Some(run.layer), h));
            if let Some(need) = need {
                return Ok(Fused::Read(need));
            }
        }
    }

    /// Layer `run.layer`'s attention over the rows alive, `chunk` rows at a time, the
    /// residual added; with the last row's attention over them where the method wants it.
    fn fused_attention(
        &self,
        run: &FusedPrefill,
        x: Tensor<2>,
        cache: &mut KvCache,
        chunk: usize,
        want: bool,
    ) -> (Tensor<2>, Option<Tensor<1>>) {
        let layer = run.layer;
        let block = &self.blocks[layer];
        let r = self.cfg.n_heads / self.cfg.n_kv_heads;
        let scale = (self.cfg.d_head as f64).powf(-0.5);
        let n = run.alive.len();
        let at: Vec<usize> = run.alive.iter().map(|&i| run.positions[i]).collect();
        let normed = block.attn_norm.forward(x.clone());
        let (mut outs, mut keys, mut last_q) = (Vec::new(), Vec::new(), None);
        for start in (0..n).step_by(chunk.max(1)) {
            let len = chunk.min(n - start);
            let mask = causal_mask(r, len, cache.next_row(layer), &self.device);
            let rows = normed.clone().narrow(0, start, len);
            let residual = x.clone().narrow(0, start, len);
            let (out, q, k) =
                block.attn.forward_parts(rows, &self.cfg, &self.rope, &at[start..start + len], cache, layer, &mask, Some(residual));
            outs.push(out);
            if want {
                keys.push(k);
                last_q = Some(q.narrow(2, len - 1, 1));
            }
        }
        let attention = last_q.map(|q| last_row_attention(q, Tensor::cat(keys, 2), scale));
        (Tensor::cat(outs, 0), attention)
    }

    /// After the last layer: record what each layer's cache holds, and the last row's logits.
    fn fused_end(&self, run: &mut FusedPrefill, x: Tensor<2>, cache: &mut KvCache, fusion: &mut FrameFusion) -> Tensor<2> {
        let t = run.positions.len();
        debug_assert_eq!(run.alive.last(), Some(&(t - 1)), "text rows are never dropped");
        // What each layer did not hold, as indices into layer 0's rows.
        let first = &run.first;
        let dropped: Vec<Vec<usize>> =
            run.held.iter().map(|rows| (0..first.len()).filter(|&i| rows.binary_search(&first[i]).is_err()).collect()).collect();
        let at: Vec<usize> = first.iter().map(|&i| run.positions[i]).collect();
        cache.advance_dropping(&at, &dropped);
        fusion.set_layer_rows(std::mem::take(&mut run.held));
        let n = x.dims()[0];
        self.lm_head.forward(self.norm.forward(x.narrow(0, n - 1, 1)))
    }

    fn forward_chunk(&self, x: Tensor<2>, positions: &[usize], cache: &mut KvCache, which: Logits) -> Option<Tensor<2>> {
        let t = x.dims()[0];
        // A mask depends only on the rows the layer holds: one for every layer, unless a
        // reduction inside the decoder left the layers different rows.
        let r = self.cfg.n_heads / self.cfg.n_kv_heads;
        let mut mask = causal_mask(r, t, cache.next_row(0), &self.device);
        let mut x = x;
        for (layer, block) in self.blocks.iter().enumerate() {
            if t > 1 && cache.next_row(layer) != mask.start {
                mask = causal_mask(r, t, cache.next_row(layer), &self.device);
            }
            x = block.forward(x, &self.cfg, &self.rope, positions, cache, layer, &mask);
        }
        cache.advance(positions);
        let x = match which {
            Logits::Last => x.narrow(0, t - 1, 1),
            Logits::All => x,
            Logits::None => return None,
        };
        Some(self.lm_head.forward(self.norm.forward(x)))
    }

    /// Bytes of device memory held by the weights (not the KV cache).
    pub fn weights_device_bytes(&self) -> usize {
        let lin = |l: &QuantLinear| l.device_bytes();
        let norm = |n: &RmsNorm| n.weight.shape().num_elements() * 4;
        let head_norm = |n: &Option<RmsNorm>| n.as_ref().map(norm).unwrap_or(0);
        let bias = |b: &Option<Tensor<1>>| b.as_ref().map(|b| b.shape().num_elements() * 4).unwrap_or(0);
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let a = &b.attn;
                a.qkv.device_bytes()
                    + lin(&a.o)
                    + bias(&a.q_bias)
                    + bias(&a.k_bias)
                    + bias(&a.v_bias)
                    + head_norm(&a.q_norm)
                    + head_norm(&a.k_norm)
                    + b.mlp.gate_up.device_bytes()
                    + lin(&b.mlp.down)
                    + norm(&b.attn_norm)
                    + norm(&b.mlp_norm)
            })
            .sum();
        // RoPE tables are derived state, counted with the weights since they live as long.
        blocks + norm(&self.norm) + lin(&self.lm_head) + self.rope_table_bytes()
    }

    /// Bytes of the RoPE cos / sin tables (part of [`Llama::weights_device_bytes`]).
    pub fn rope_table_bytes(&self) -> usize {
        2 * self.rope_positions() * self.cfg.d_head / 2 * 4
    }
}

/// Longest RoPE table built up front; contexts beyond this are refused at load time.
pub const ROPE_TABLE_MAX: usize = 8192;

impl Llama {
    /// Positions covered by the RoPE table (the usable context).
    pub fn rope_positions(&self) -> usize {
        self.cfg.max_context.min(ROPE_TABLE_MAX)
    }
}
