//! LanguageBind's video encoder (Zhu et al. 2024, "LanguageBind: Extending Video-Language
//! Pretraining to N-modality by Language-based Semantic Alignment"); reference:
//! github.com/PKU-YuanGroup/LanguageBind (`languagebind/video/modeling_video.py`,
//! `CLIPEncoderLayer` with `add_time_attn`).
//!
//! A CLIP ViT (`clip.rs`: patches, class token, positions, `pre_layrnorm`, pre-norm blocks)
//! whose every block first mixes time: frames are taken in groups of the config's
//! `num_frames` (8 in the release, so MERV's 16 frames are two groups attended apart), a
//! learned temporal embedding is added to every token of frame `i` of a group, and then
//! each token position attends across the group's frames:
//! `x + temporal_attn(temporal_layer_norm1(x))` over `(batch * tokens, frames)`
//! sequences. The class token takes part like any patch. The spatial CLIP block follows
//! unchanged. `hidden_states[k]` is the output of block k, as in CLIP.

use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::Placement;

use crate::clip::{AttentionProbe, ClipVisionConfig, ClipVisionConfigJson, ClipVisionTower, SelfAttention};
use crate::layers::{LayerNorm, TowerWeights};

/// LanguageBind's `vision_config`: CLIP's fields plus the temporal ones.
#[derive(Debug, Clone, Deserialize)]
pub struct LanguageBindConfigJson {
    #[serde(flatten)]
    pub clip: ClipVisionConfigJson,
    pub add_time_attn: Option<bool>,
    /// Frames one temporal attention spans (a group).
    pub num_frames: Option<usize>,
}

/// The temporal half of a LanguageBind block.
struct TemporalMixing {
    /// `[group, d]`: added to every token of the group's frame `i`.
    embedding: Tensor<2>,
    ln: LayerNorm,
    attn: SelfAttention,
}

pub struct LanguageBindVideoTower {
    pub clip: ClipVisionTower,
    /// One per block; empty when the config has no temporal attention (plain CLIP).
    temporal: Vec<TemporalMixing>,
    /// Frames per temporal group.
    pub group: usize,
}

impl LanguageBindVideoTower {
    /// Load from `{prefix}embeddings.*`, `{prefix}pre_layrnorm.*` and
    /// `{prefix}encoder.layers.{i}.*`, whose temporal tensors are `temporal_embedding`,
    /// `temporal_layer_norm1.*` and `temporal_attn.{q,k,v,out}_proj.*`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &LanguageBindConfigJson,
        weights: TowerWeights,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let ccfg = ClipVisionConfig { weights, ..ClipVisionConfig::try_from(&cfg.clip)? };
        let clip = ClipVisionTower::load(ck, prefix, ccfg.clone(), at)?;
        let (d, device) = (ccfg.d_model, &at.device);
        let group = cfg.num_frames.unwrap_or(8);
        if group == 0 {
            return Err(LoadError::Unsupported("LanguageBind vision_config: num_frames 0".into()));
        }
        let temporal = match cfg.add_time_attn.unwrap_or(true) {
            false => Vec::new(),
            true => (0..ccfg.n_layers)
                .map(|i| {
                    let l = |s: &str| format!("{prefix}encoder.layers.{i}.{s}");
                    let emb = ck.f32_shaped(&l("temporal_embedding"), &[1, group, d])?;
                    Ok(TemporalMixing {
                        embedding: Tensor::from_data(TensorData::new(emb, [group, d]), device),
                        ln: LayerNorm::load(ck, &l("temporal_layer_norm1"), d, ccfg.eps, device)?,
                        attn: SelfAttention::load(
                            ck,
                            ["q_proj", "k_proj", "v_proj", "out_proj"].map(|p| l(&format!("temporal_attn.{p}"))),
                            d,
                            weights,
                            at,
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, LoadError>>()?,
        };
        Ok(Self { clip, temporal, group: if cfg.add_time_attn.unwrap_or(true) { group } else { 1 } })
    }

    /// `hidden_states[index]` (0 = embeddings, k = after block k), every token kept.
    /// Frames must come in whole groups.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]`, t a multiple of [`Self::group`] -> `[t, tokens, d_model]`
    pub fn hidden_state(&self, pixels: Tensor<4>, index: usize) -> Result<Tensor<3>, LoadError> {
        Ok(self.run(pixels, index, false)?.0)
    }

    /// [`LanguageBindVideoTower::hidden_state`] and the attention probe of block `index`'s
    /// spatial attention, after its temporal mixing (FastVID's salience; none for `index` 0).
    pub fn hidden_state_probed(&self, pixels: Tensor<4>, index: usize) -> Result<(Tensor<3>, Option<AttentionProbe>), LoadError> {
        self.run(pixels, index, true)
    }

    fn run(&self, pixels: Tensor<4>, index: usize, probe: bool) -> Result<(Tensor<3>, Option<AttentionProbe>), LoadError> {
        let t = pixels.dims()[0];
        if !t.is_multiple_of(self.group) {
            return Err(LoadError::Unsupported(format!(
                "LanguageBind attends frames in groups of {}: {t} frames is not whole groups",
                self.group
            )));
        }
        // Groups are independent: encode as many whole groups together as fit a binding.
        let batch = (self.clip.frames_per_batch() / self.group).max(1) * self.group;
        if t > batch {
            let parts = (0..t).step_by(batch).map(|s| self.run(pixels.clone().narrow(0, s, batch.min(t - s)), index, probe));
            return Ok(AttentionProbe::joined_batches(parts.collect::<Result<Vec<_>, _>>()?));
        }
        let cfg = &self.clip.cfg;
        let (n, d) = (cfg.tokens(), cfg.d_model);
        let mut x = self.clip.embed(pixels);
        let mut seen = None;
        for (i, layer) in self.clip.layers[..index].iter().enumerate() {
            if let Some(tm) = self.temporal.get(i) {
                x = self.mix_time(tm, x, t / self.group, n, d);
            }
            if probe && i + 1 == index {
                seen = Some(layer.probe(x.clone(), t, n, cfg));
            }
            x = layer.forward(x, t, n, cfg);
        }
        Ok((x.reshape([t, n, d]), seen))
    }

    /// The temporal embedding, then attention across each group's frames, token by token.
    ///
    /// # Shapes
    /// - x: `[groups * group * n, d]` (frame-major) -> same
    fn mix_time(&self, tm: &TemporalMixing, x: Tensor<2>, groups: usize, n: usize, d: usize) -> Tensor<2> {
        let g = self.group;
        let x = x.reshape([groups, g, n, d]);
        // LanguageBind skips the embedding for one-frame groups (images).
        let x = if g > 1 { x + tm.embedding.clone().reshape([1, g, 1, d]) } else { x };
        // (b t) n d -> (b n) t d: one sequence per token position.
        let seqs = x.clone().swap_dims(1, 2).reshape([groups * n * g, d]);
        let mixed = tm.attn.forward(tm.ln.forward(seqs), groups * n, g, self.clip.cfg.n_heads);
        let mixed = mixed.reshape([groups, n, g, d]).swap_dims(1, 2);
        (x + mixed).reshape([groups * g * n, d])
    }
}
