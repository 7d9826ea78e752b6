//! Loading a LLaMA-family decoder (`llama`, `qwen2`, `qwen3`) from GGUF: the `{arch}.*` metadata keys and the
//! llama.cpp tensor names, in one place. Quantised matrices go to the device unchanged.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::ggml::dequantize;
use vidllm_core::gguf::{Gguf, TensorInfo};
use vidllm_shaders::device::Placement;

use crate::decoder_family::Family;
use crate::llama::{Attention, Block, HostEmbedding, Llama, LlamaConfig, Mlp, ROPE_TABLE_MAX};
use crate::quant_linear::{QuantLinear, RawWeight, StackedLinear};
use crate::rms_norm::RmsNorm;
use crate::rope::Rope;

/// llama.cpp's tensor names (`gguf-py/gguf/constants.py`).
mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";
    pub fn blk(i: usize, name: &str) -> String {
        format!("blk.{i}.{name}")
    }
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const ATTN_Q: &str = "attn_q";
    pub const ATTN_K: &str = "attn_k";
    pub const ATTN_V: &str = "attn_v";
    pub const ATTN_OUT: &str = "attn_output.weight";
    pub const ATTN_Q_NORM: &str = "attn_q_norm.weight";
    pub const ATTN_K_NORM: &str = "attn_k_norm.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    pub const FFN_GATE: &str = "ffn_gate.weight";
    pub const FFN_UP: &str = "ffn_up.weight";
    pub const FFN_DOWN: &str = "ffn_down.weight";
}

/// Read the decoder configuration from `{arch}.*` keys.
pub fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig, LoadError> {
    let arch = g.str("general.architecture")?;
    if arch == "clip" {
        // The usual mix-up with llama.cpp's pairs: the vision file given as the model.
        return Err(LoadError::Unsupported(
            "this GGUF is an mmproj (general.architecture \"clip\": a vision encoder, not a decoder); \
             give it as the mmproj, beside its text GGUF"
                .into(),
        ));
    }
    let family = Family::from_name(arch).map_err(|_| {
        let known: Vec<&str> = Family::ALL.iter().map(|f| f.name()).collect();
        LoadError::Unsupported(format!("general.architecture {arch:?} (supported: {})", known.join(", ")))
    })?;
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| g.u64(&key(k)).map(|v| v as usize);
    let d_model = usize_key("embedding_length")?;
    let n_heads = usize_key("attention.head_count")?;
    let n_kv_heads = usize_key("attention.head_count_kv").unwrap_or(n_heads);
    let vocab_size = match usize_key("vocab_size") {
        Ok(v) => v,
        Err(_) => g.str_array("tokenizer.ggml.tokens")?.len(),
    };
    // Qwen3 states its head size (`attention.key_length`); LLaMA files may state the rotated
    // size instead, which is the whole head there.
    let d_head = usize_key("attention.key_length").or_else(|_| usize_key("rope.dimension_count")).unwrap_or(d_model / n_heads.max(1));
    let cfg = LlamaConfig {
        family,
        d_model,
        n_layers: usize_key("block_count")?,
        n_heads,
        n_kv_heads,
        d_head,
        d_ff: usize_key("feed_forward_length")?,
        vocab_size,
        rms_eps: g.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: g.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_style: family.gguf_rope(),
        max_context: usize_key("context_length")?,
    };
    check_config(&cfg)?;
    Ok(cfg)
}

fn check_config(c: &LlamaConfig) -> Result<(), LoadError> {
    let bad = |what: &str, v: usize| Err(LoadError::Absurd { what: what.into(), value: v as u64 });
    let limits = [
        ("embedding_length", c.d_model, 1 << 16),
        ("block_count", c.n_layers, 1 << 10),
        ("head_count", c.n_heads, 1 << 10),
        ("feed_forward_length", c.d_ff, 1 << 20),
        ("vocab_size", c.vocab_size, 1 << 22),
        ("context_length", c.max_context, 1 << 24),
    ];
    for (what, v, max) in limits {
        if v == 0 || v > max {
            return bad(what, v);
        }
    }
    if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
        return bad("head_count_kv", c.n_kv_heads);
    }
    if c.d_head == 0 || !c.d_head.is_multiple_of(2) || c.d_head * c.n_heads != c.d_model && c.d_head > c.d_model {
        return bad("rope.dimension_count", c.d_head);
    }
    Ok(())
}

struct Loader<'a> {
    g: &'a Gguf,
    at: &'a Placement,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo, LoadError> {
        self.g.tensor(name).ok_or_else(|| LoadError::MissingTensor(name.to_string()))
    }

    fn check_shape(&self, t: &TensorInfo, expected: &[usize]) -> Result<(), LoadError> {
        if t.shape() != expected {
            return Err(LoadError::ShapeMismatch { name: t.name.clone(), expected: expected.to_vec(), got: t.shape() });
        }
        Ok(())
    }

    /// A weight `[out, in]`.
    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<QuantLinear, LoadError> {
        let t = self.info(name)?;
        self.check_shape(t, &[out, inp])?;
        QuantLinear::from_raw(name, t.ty, self.g.tensor_bytes(t), out, inp, self.at)
    }

    /// Weights `[out_i, inp]` of one input, stacked into one product where their types agree.
    fn stacked(&self, parts: &[(&str, usize)], inp: usize) -> Result<StackedLinear, LoadError> {
        let infos = parts.iter().map(|&(name, out)| {
            let t = self.info(name)?;
            self.check_shape(t, &[out, inp])?;
            Ok((name, t))
        });
        let infos = infos.collect::<Result<Vec<_>, LoadError>>()?;
        let raw: Vec<RawWeight> = infos.iter().zip(parts).map(|((name, t), p)| (*name, t.ty, self.g.tensor_bytes(t), p.1)).collect();
        StackedLinear::from_raw(&raw, inp, self.at)
    }

    /// A float vector `[n]` (norm weights, biases), any float or block type.
    fn vector(&self, name: &str, n: usize) -> Result<Tensor<1>, LoadError> {
        let t = self.info(name)?;
        self.check_shape(t, &[n])?;
        let v = dequantize(t.ty, self.g.tensor_bytes(t), n);
        Ok(Tensor::from_data(TensorData::new(v, [n]), &self.at.device))
    }

    fn optional_vector(&self, name: &str, n: usize) -> Result<Option<Tensor<1>>, LoadError> {
        if self.g.tensor(name).is_none() {
            return Ok(None);
        }
        self.vector(name, n).map(Some)
    }

    fn norm(&self, name: &str, cfg: &LlamaConfig) -> Result<RmsNorm, LoadError> {
        Ok(RmsNorm { weight: self.vector(name, cfg.d_model)?, eps: cfg.rms_eps })
    }

    /// A per-head norm `[d_head]`, present exactly when the family has QK-norm.
    fn head_norm(&self, name: &str, cfg: &LlamaConfig) -> Result<Option<RmsNorm>, LoadError> {
        if !cfg.family.qk_norm() {
            return Ok(None);
        }
        Ok(Some(RmsNorm { weight: self.vector(name, cfg.d_head)?, eps: cfg.rms_eps }))
    }

    /// A q/k/v bias: required where the family always has them, else used when present.
    fn bias(&self, name: &str, n: usize, cfg: &LlamaConfig) -> Result<Option<Tensor<1>>, LoadError> {
        if cfg.family.always_qkv_bias() {
            return self.vector(name, n).map(Some);
        }
        self.optional_vector(name, n)
    }

    fn block(&self, i: usize, c: &LlamaConfig) -> Result<Block, LoadError> {
        let n = |s: &str| names::blk(i, s);
        let (q_out, kv_out) = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head);
        let attn = Attention {
            qkv: self.stacked(
                &[
                    (&n(&format!("{}.weight", names::ATTN_Q)), q_out),
                    (&n(&format!("{}.weight", names::ATTN_K)), kv_out),
                    (&n(&format!("{}.weight", names::ATTN_V)), kv_out),
                ],
                c.d_model,
            )?,
            o: self.linear(&n(names::ATTN_OUT), c.d_model, q_out)?,
            q_bias: self.bias(&n(&format!("{}.bias", names::ATTN_Q)), q_out, c)?,
            k_bias: self.bias(&n(&format!("{}.bias", names::ATTN_K)), kv_out, c)?,
            v_bias: self.bias(&n(&format!("{}.bias", names::ATTN_V)), kv_out, c)?,
            q_norm: self.head_norm(&n(names::ATTN_Q_NORM), c)?,
            k_norm: self.head_norm(&n(names::ATTN_K_NORM), c)?,
        };
        let mlp = Mlp {
            gate_up: self.stacked(&[(&n(names::FFN_GATE), c.d_ff), (&n(names::FFN_UP), c.d_ff)], c.d_model)?,
            down: self.linear(&n(names::FFN_DOWN), c.d_model, c.d_ff)?,
        };
        Ok(Block { attn_norm: self.norm(&n(names::ATTN_NORM), c)?, attn, mlp_norm: self.norm(&n(names::FFN_NORM), c)?, mlp })
    }
}

/// Load the decoder in `g` onto the placement's device.
pub fn load_llama(g: &Gguf, at: &Placement) -> Result<Llama, LoadError> {
    let cfg = config_from_gguf(g)?;
    let l = Loader { g, at };
    let emb = l.info(names::TOKEN_EMBD)?;
    l.check_shape(emb, &[cfg.vocab_size, cfg.d_model])?;
    let embed = HostEmbedding { ty: emb.ty, bytes: g.kept_tensor(emb), d_model: cfg.d_model };
    // The weights are copied to the device, and the file's pages they came from are let go
    // of as loading goes, so that memory peaks at the copies, not the copies and the file.
    // The output projection (the largest matrix, 30 MB of SmolLM2's 94) goes first, while
    // little else is held.
    // Tied output: without `output.weight`, the embedding matrix projects to the vocabulary.
    let head_name = if g.tensor(names::OUTPUT).is_some() { names::OUTPUT } else { names::TOKEN_EMBD };
    let lm_head = l.linear(head_name, cfg.vocab_size, cfg.d_model)?;
    g.release_pages();
    let blocks = (0..cfg.n_layers)
        .map(|i| {
            let block = l.block(i, &cfg);
            g.release_pages();
            block
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rope_len = cfg.max_context.min(ROPE_TABLE_MAX);
    let rope = Rope::new(cfg.d_head, cfg.rope_theta, rope_len, cfg.rope_style, &at.device);
    let norm = l.norm(names::OUTPUT_NORM, &cfg)?;
    // Every decode step reads the whole of them: in huge pages on the CPU.
    vidllm_shaders::settle_weights();
    Ok(Llama { norm, cfg, embed, blocks, lm_head, rope, device: at.device.clone(), cap: at.cap, id: crate::step_graph::next_model_id() })
}
