//! What the LLaVA family shares (Video-LLaVA, PLLaVA, LLaVA-NeXT-Video): the two-layer
//! projector, the choice of vision hidden state, checkpoint key prefixes, and the
//! Vicuna-style conversation its checkpoints were tuned on. Reference: transformers
//! `models/llava/modeling_llava.py`.

use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};
use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::tokenizer::Tokenizer;

use crate::layers::Linear;

/// Resolve `vision_feature_layer` (negative counts from the end of `hidden_states`, which
/// has `n_layers + 1` entries) to an index.
pub fn feature_layer_index(layer: i64, n_layers: usize) -> Result<usize, LoadError> {
    let n = n_layers as i64 + 1;
    let idx = if layer < 0 { n + layer } else { layer };
    if !(0..n).contains(&idx) {
        return Err(LoadError::Unsupported(format!("vision_feature_layer {layer} with {n_layers} layers")));
    }
    Ok(idx as usize)
}

/// Projector `linear_2(gelu(linear_1(x)))`.
pub struct MultiModalProjector {
    linear_1: Linear,
    linear_2: Linear,
}

impl MultiModalProjector {
    pub fn load(ck: &Checkpoint, prefix: &str, d_vis: usize, d_text: usize, device: &Device) -> Result<Self, LoadError> {
        Ok(Self {
            linear_1: Linear::load(ck, &format!("{prefix}linear_1"), d_text, d_vis, device)?,
            linear_2: Linear::load(ck, &format!("{prefix}linear_2"), d_text, d_text, device)?,
        })
    }

    /// # Shapes
    /// - x: `[n, d_vis]` -> `[n, d_text]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(gelu(self.linear_1.forward(x)))
    }
}

/// The first prefix under which `probe` exists: the three transformers layouts.
pub fn find_prefix(ck: &Checkpoint, candidates: &[&str], probe: &str) -> Result<String, LoadError> {
    candidates
        .iter()
        .find(|p| ck.contains(&format!("{p}{probe}")))
        .map(|p| p.to_string())
        .ok_or_else(|| LoadError::MissingTensor(format!("{}{probe} (or any of {candidates:?})", candidates[0])))
}

pub fn read_config<T: for<'de> Deserialize<'de>>(dir: &std::path::Path) -> Result<T, LoadError> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|source| LoadError::Open { path: p.display().to_string(), source })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Unsupported(format!("{}: {e}", p.display())))
}

/// The Vicuna-style turns of the LLaVA family: `USER: {placeholders}{question} ASSISTANT:`.
pub mod vicuna {
    use super::Tokenizer;

    /// A first turn: `<image>\n` per image (their features fill the prompt first), then
    /// the video's own placeholder line (`video`, e.g. `"<video>\n"`; empty for none).
    pub fn first_turn(question: &str, n_images: usize, video: &str) -> String {
        format!("USER: {}{video}{question} ASSISTANT:", "<image>\n".repeat(n_images))
    }

    /// A later turn: close the last answer with EOS, open a new one.
    pub fn follow_up(tok: &Tokenizer, question: &str) -> String {
        format!("{}USER: {question} ASSISTANT:", tok.token_text(tok.eos))
    }
}
