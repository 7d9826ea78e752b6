//! Loading a LLaMA-family decoder from a Hugging Face checkpoint (`LlamaForCausalLM` names
//! under a prefix), quantised on load into the same GGML blocks and kernels as GGUF files.

use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::ggml::{GgmlType, quantize};
use vidllm_core::gguf::FileBytes;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::Placement;

use crate::decoder_family::Family;
use crate::layers::vector;
use crate::llama::{Attention, Block, HostEmbedding, Llama, LlamaConfig, Mlp, ROPE_TABLE_MAX};
use crate::quant_linear::{QuantLinear, RawWeight, StackedLinear};
use crate::rms_norm::RmsNorm;
use crate::rope::{Rope, RopeStyle};

/// `LlamaConfig` / `text_config` fields as in `config.json` (4.x and 5.x spellings).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfigJson {
    /// `llama`, `qwen2` or `qwen3` (absent in some LLaVA `text_config`s: LLaMA).
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_parameters: Option<RopeParameters>,
    pub max_position_embeddings: Option<usize>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
    pub attention_bias: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

impl TryFrom<&LlamaConfigJson> for LlamaConfig {
    type Error = LoadError;
    fn try_from(j: &LlamaConfigJson) -> Result<Self, LoadError> {
        if j.hidden_act.as_deref().is_some_and(|a| a != "silu") {
            return Err(LoadError::Unsupported(format!("decoder activation {:?}", j.hidden_act)));
        }
        let scaled = j.rope_scaling.as_ref().is_some_and(|v| !v.is_null())
            || j.rope_parameters.as_ref().and_then(|p| p.rope_type.as_deref()).is_some_and(|t| t != "default");
        if scaled {
            return Err(LoadError::Unsupported("RoPE scaling is not supported yet".into()));
        }
        let family = Family::from_name(j.model_type.as_deref().unwrap_or("llama"))?;
        let d_model = j.hidden_size.unwrap_or(4096);
        let n_heads = j.num_attention_heads.unwrap_or(32);
        let theta = j.rope_parameters.as_ref().and_then(|p| p.rope_theta).or(j.rope_theta).unwrap_or(10_000.0);
        Ok(LlamaConfig {
            family,
            d_model,
            n_layers: j.num_hidden_layers.unwrap_or(32),
            n_heads,
            n_kv_heads: j.num_key_value_heads.unwrap_or(n_heads),
            d_head: j.head_dim.unwrap_or(d_model / n_heads.max(1)),
            d_ff: j.intermediate_size.unwrap_or(11008),
            vocab_size: j.vocab_size.unwrap_or(32000),
            rms_eps: j.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: theta,
            rope_style: RopeStyle::Halves,
            max_context: j.max_position_embeddings.unwrap_or(2048),
        })
    }
}

/// How the decoder's matrices are stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantChoice {
    Q4_0,
    Q4_1,
    Q8_0,
    F16,
    F32,
}

impl std::str::FromStr for QuantChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "q4_0" => Ok(Self::Q4_0),
            "q4_1" => Ok(Self::Q4_1),
            "q8_0" => Ok(Self::Q8_0),
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            o => Err(format!("unknown quantisation {o:?} (q4_0, q4_1, q8_0, f16, f32)")),
        }
    }
}

impl QuantChoice {
    fn ggml(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::F16 => GgmlType::F16,
            Self::F32 => GgmlType::F32,
        }
    }
}

/// Where a decoder matrix comes from: the checkpoint as is, or with adapters merged.
pub trait WeightSource {
    /// The `[out, in]` matrix called `name`, row-major.
    fn matrix(&self, ck: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, LoadError>;
}

/// The checkpoint's weights unchanged.
pub struct Plain;

impl WeightSource for Plain {
    fn matrix(&self, ck: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, LoadError> {
        ck.f32_shaped(name, &[out, inp])
    }
}

/// Where the decoder's tensors are: `{model}embed_tokens.weight`, `{model}layers.N...`,
/// `{model}norm.weight`, and the output head.
pub struct LlamaNames {
    pub model: String,
    pub lm_head: Option<String>,
}

/// Load the decoder. q/k/v biases are read where the checkpoint has them (transformers
/// saves them exactly when `attention_bias` is set) and required for Qwen2.
pub fn load_llama_hf(
    ck: &Checkpoint,
    names: &LlamaNames,
    cfg: LlamaConfig,
    quant: QuantChoice,
    source: &dyn WeightSource,
    at: &Placement,
) -> Result<Llama, LoadError> {
    let device = &at.device;
    let n = |s: &str| format!("{}{s}", names.model);
    // Rows that are not whole blocks stay in f32.
    let ty_for = |inp: usize| if inp.is_multiple_of(32) { quant.ggml() } else { GgmlType::F32 };
    let linear = |name: &str, out: usize, inp: usize| -> Result<QuantLinear, LoadError> {
        let w = source.matrix(ck, name, out, inp)?;
        let ty = ty_for(inp);
        QuantLinear::from_raw(name, ty, &quantize(ty, &w), out, inp, at)
    };
    let stacked = |parts: &[(&str, usize)], inp: usize| -> Result<StackedLinear, LoadError> {
        let ty = ty_for(inp);
        let bytes = parts
            .iter()
            .map(|&(name, out)| Ok(quantize(ty, &source.matrix(ck, name, out, inp)?)))
            .collect::<Result<Vec<_>, LoadError>>()?;
        let raw: Vec<RawWeight> = parts.iter().zip(&bytes).map(|(&(name, out), b)| (name, ty, b.as_slice(), out)).collect();
        StackedLinear::from_raw(&raw, inp, at)
    };
    let norm =
        |name: &str| -> Result<RmsNorm, LoadError> { Ok(RmsNorm { weight: vector(ck, name, cfg.d_model, device)?, eps: cfg.rms_eps }) };
    let (q_out, kv_out) = (cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head);
    let bias_of = |name: &str, n: usize| -> Result<Option<burn::tensor::Tensor<1>>, LoadError> {
        if !cfg.family.always_qkv_bias() && !ck.contains(name) {
            return Ok(None);
        }
        vector(ck, name, n, device).map(Some)
    };
    let head_norm = |name: &str| -> Result<Option<RmsNorm>, LoadError> {
        if !cfg.family.qk_norm() {
            return Ok(None);
        }
        Ok(Some(RmsNorm { weight: vector(ck, name, cfg.d_head, device)?, eps: cfg.rms_eps }))
    };
    let blocks = (0..cfg.n_layers)
        .map(|i| {
            let l = |s: &str| n(&format!("layers.{i}.{s}"));
            let block = Block {
                attn_norm: norm(&l("input_layernorm.weight"))?,
                attn: Attention {
                    qkv: stacked(
                        &[
                            (&l("self_attn.q_proj.weight"), q_out),
                            (&l("self_attn.k_proj.weight"), kv_out),
                            (&l("self_attn.v_proj.weight"), kv_out),
                        ],
                        cfg.d_model,
                    )?,
                    o: linear(&l("self_attn.o_proj.weight"), cfg.d_model, q_out)?,
                    q_bias: bias_of(&l("self_attn.q_proj.bias"), q_out)?,
                    k_bias: bias_of(&l("self_attn.k_proj.bias"), kv_out)?,
                    v_bias: bias_of(&l("self_attn.v_proj.bias"), kv_out)?,
                    q_norm: head_norm(&l("self_attn.q_norm.weight"))?,
                    k_norm: head_norm(&l("self_attn.k_norm.weight"))?,
                },
                mlp_norm: norm(&l("post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up: stacked(&[(&l("mlp.gate_proj.weight"), cfg.d_ff), (&l("mlp.up_proj.weight"), cfg.d_ff)], cfg.d_model)?,
                    down: linear(&l("mlp.down_proj.weight"), cfg.d_model, cfg.d_ff)?,
                },
            };
            // The block is on the device in its own format: let the files' pages go, so
            // that memory peaks at the copies, not the copies and the files.
            ck.release_pages();
            Ok(block)
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let emb_name = n("embed_tokens.weight");
    let emb = ck.f32_shaped(&emb_name, &[cfg.vocab_size, cfg.d_model])?;
    let embed = HostEmbedding {
        ty: GgmlType::F32,
        bytes: FileBytes::Owned(emb.iter().flat_map(|v| v.to_le_bytes()).collect()),
        d_model: cfg.d_model,
    };
    // Tied embeddings: save_pretrained omits lm_head.weight.
    let head = names.lm_head.as_deref().filter(|h| ck.contains(h)).unwrap_or(&emb_name);
    let lm_head = linear(head, cfg.vocab_size, cfg.d_model)?;
    ck.release_pages();
    let rope = Rope::new(cfg.d_head, cfg.rope_theta, cfg.max_context.min(ROPE_TABLE_MAX), cfg.rope_style, device);
    let norm = norm(&n("norm.weight"))?;
    // Every decode step reads the whole of them: in huge pages on the CPU.
    vidllm_shaders::settle_weights();
    Ok(Llama { norm, cfg, embed, blocks, lm_head, rope, device: device.clone(), cap: at.cap, id: crate::step_graph::next_model_id() })
}

/// The decoder configuration of a `*ForCausalLM` folder (`LlamaForCausalLM`,
/// `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): the `config.json` text.
pub fn causal_lm_config(config_json: &str) -> Result<LlamaConfig, LoadError> {
    let j: LlamaConfigJson = serde_json::from_str(config_json).map_err(|e| LoadError::Unsupported(format!("config.json: {e}")))?;
    LlamaConfig::try_from(&j)
}

/// A `*ForCausalLM` checkpoint (`model.*`, `lm_head.weight` unless tied), quantised on load.
pub fn load_causal_lm(ck: &Checkpoint, cfg: LlamaConfig, quant: QuantChoice, at: &Placement) -> Result<Llama, LoadError> {
    let names = LlamaNames { model: "model.".into(), lm_head: Some("lm_head.weight".into()) };
    load_llama_hf(ck, &names, cfg, quant, &Plain, at)
}
