//! SigLIP vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training");
//! reference: transformers `models/siglip/modeling_siglip.py` (`SiglipVisionTransformer`)
//! and the Idefics3 / SmolVLM copy of it (`models/smolvlm/modeling_smolvlm.py`,
//! `SmolVLMVisionTransformer`).
//!
//! Against CLIP's tower (`clip.rs`, whose encoder blocks it shares): the patch conv has a
//! bias, there is no class token and no pre-norm, the MLP uses GELU's tanh form, and a
//! `post_layernorm` closes the tower. The Idefics3 copy looks its position embeddings up
//! through NaViT-style buckets, so that smaller images reuse the grid's table; for a
//! full grid the buckets are not the identity (see [`Positions::Bucketed`]).

use burn::tensor::{Int, Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::device::{BindingCap, Placement};

use crate::clip::{AttentionProbe, ClipVisionConfig, EncoderLayer, VisionDefaults};
use crate::layers::{LayerNorm, vector};

/// transformers' defaults for a SigLIP `vision_config`'s missing fields, per config class.
pub struct SiglipDefaults;

impl SiglipDefaults {
    /// `SiglipVisionConfig()`.
    pub const SIGLIP: VisionDefaults = VisionDefaults {
        hidden_size: 768,
        num_attention_heads: 12,
        image_size: 224,
        patch_size: 16,
        hidden_act: "gelu_pytorch_tanh",
        layer_norm_eps: 1e-6,
    };
    /// `SmolVLMVisionConfig()` (and `Idefics3VisionConfig()`).
    pub const SMOLVLM: VisionDefaults = VisionDefaults {
        hidden_size: 1152,
        num_attention_heads: 16,
        image_size: 224,
        patch_size: 32,
        hidden_act: "gelu_pytorch_tanh",
        layer_norm_eps: 1e-6,
    };
}

/// How patches find their position embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Patch `k` takes row `k` (SigLIP).
    Identity,
    /// Idefics3 / SmolVLM: each axis coordinate `i` of an `nb`-patch side is bucketed as
    /// `bucketize(i / nb * (1 - 1e-6), arange(1/n, 1, 1/n), right=True)`; for a full grid
    /// that is `max(i - 1, 0)`, so rows and columns 0 and 1 share embeddings (kept: it is
    /// what the checkpoints were trained with).
    Bucketed,
}

impl Positions {
    /// Position ids of a full `n x n` patch grid, row-major.
    pub fn ids(self, n: usize) -> Vec<i64> {
        match self {
            Positions::Identity => (0..(n * n) as i64).collect(),
            Positions::Bucketed => {
                let b: Vec<usize> = (0..n).map(|i| bucket(i, n, n)).collect();
                b.iter().flat_map(|&r| b.iter().map(move |&c| (r * n + c) as i64)).collect()
            }
        }
    }
}

/// torch's `bucketize(i / nb * (1 - 1e-6), arange(1/n, 1.0, 1/n), right=True)` in f32:
/// how many boundaries lie at or below the coordinate.
fn bucket(i: usize, nb: usize, n: usize) -> usize {
    let coord = i as f32 / nb as f32 * (1.0 - 1e-6);
    let step = 1.0 / n as f64;
    // torch.arange(start, end, step) for float: ceil((end - start) / step) values
    // start + k * step, computed in double and stored in f32.
    let count = ((1.0 - step) / step).ceil() as usize;
    (0..count).filter(|&k| ((step + k as f64 * step) as f32) <= coord).count()
}

pub struct SiglipVisionTower {
    pub cfg: ClipVisionConfig,
    /// `[3 * p * p, d_model]`: the patch conv as a matmul over unfolded patches.
    patch_t: Tensor<2>,
    patch_bias: Tensor<1>,
    /// `[tokens, d_model]`: each patch's row of the position table, looked up at load.
    positions: Tensor<2>,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    cap: BindingCap,
}

impl SiglipVisionTower {
    /// Load `{prefix}embeddings.*`, `{prefix}encoder.layers.*`, `{prefix}post_layernorm.*`.
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: ClipVisionConfig, positions: Positions, at: &Placement) -> Result<Self, LoadError> {
        let device = &at.device;
        let (d, p, g) = (cfg.d_model, cfg.patch_size, cfg.grid());
        let name = |s: &str| format!("{prefix}{s}");
        let w = ck.f32_shaped(&name("embeddings.patch_embedding.weight"), &[d, 3, p, p])?;
        let patch_t = Tensor::<2>::from_data(TensorData::new(w, [d, 3 * p * p]), device).transpose();
        let patch_bias = vector(ck, &name("embeddings.patch_embedding.bias"), d, device)?;
        let table = ck.f32_shaped(&name("embeddings.position_embedding.weight"), &[g * g, d])?;
        let table = Tensor::<2>::from_data(TensorData::new(table, [g * g, d]), device);
        let ids = Tensor::<1, Int>::from_data(TensorData::new(positions.ids(g), [g * g]), device);
        let positions = table.select(0, ids);
        let layers = (0..cfg.n_layers)
            .map(|i| EncoderLayer::load(ck, &name(&format!("encoder.layers.{i}.")), &cfg, at))
            .collect::<Result<Vec<_>, LoadError>>()?;
        let post_ln = LayerNorm::load(ck, &name("post_layernorm"), d, cfg.eps, device)?;
        Ok(Self { cfg, patch_t, patch_bias, positions, layers, post_ln, cap: at.cap })
    }

    /// Patches per image (no class token; `ClipVisionConfig::tokens` counts CLIP's).
    pub fn tokens(&self) -> usize {
        self.cfg.grid() * self.cfg.grid()
    }

    /// The last hidden state after `post_layernorm`, every patch.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` (s = the config's `image_size`) -> `[t, tokens, d_model]`
    pub fn forward(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.encode(pixels, self.layers.len(), true, false).0
    }

    /// [`SiglipVisionTower::forward`] and the attention probe of its last block (FastVID's
    /// salience).
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t, tokens, d_model]`, probe `[t, tokens, d_model]` each
    pub fn forward_probed(&self, pixels: Tensor<4>) -> (Tensor<3>, Option<AttentionProbe>) {
        self.encode(pixels, self.layers.len(), true, true)
    }

    /// The output of the first `blocks` blocks (`hidden_states[blocks]`), without the
    /// final norm: the features MERV takes from an inner block.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t, tokens, d_model]`
    pub fn hidden_state(&self, pixels: Tensor<4>, blocks: usize) -> Tensor<3> {
        self.encode(pixels, blocks, false, false).0
    }

    /// [`SiglipVisionTower::hidden_state`] and the attention probe of block `blocks`
    /// (none for 0).
    pub fn hidden_state_probed(&self, pixels: Tensor<4>, blocks: usize) -> (Tensor<3>, Option<AttentionProbe>) {
        self.encode(pixels, blocks, false, true)
    }

    /// The first `blocks` blocks, then `post_layernorm` where `post_norm`; with `probe`, the
    /// attention probe of the last of them.
    fn encode(&self, pixels: Tensor<4>, blocks: usize, post_norm: bool, probe: bool) -> (Tensor<3>, Option<AttentionProbe>) {
        let t = pixels.dims()[0];
        let batch = self.images_per_batch();
        if t > batch {
            // Images are independent: encode them in batches whose attention scores fit
            // one storage binding, then put the batches back together.
            return AttentionProbe::joined_batches(
                (0..t).step_by(batch).map(|s| self.encode(pixels.clone().narrow(0, s, batch.min(t - s)), blocks, post_norm, probe)),
            );
        }
        let (n, d) = (self.tokens(), self.cfg.d_model);
        let mut x = self.embed(pixels);
        let mut seen = None;
        for (i, layer) in self.layers[..blocks].iter().enumerate() {
            if probe && i + 1 == blocks {
                seen = Some(layer.probe(x.clone(), t, n, &self.cfg));
            }
            x = layer.forward(x, t, n, &self.cfg);
        }
        if post_norm {
            x = self.post_ln.forward(x);
        }
        (x.reshape([t, n, d]), seen)
    }

    /// Patch embeddings (conv with bias) plus positions.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t * tokens, d_model]`
    fn embed(&self, pixels: Tensor<4>) -> Tensor<2> {
        let [t, _, _, _] = pixels.dims();
        let (g, p, d) = (self.cfg.grid(), self.cfg.patch_size, self.cfg.d_model);
        let patches = pixels
            .reshape([t, 3, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5]) // [t, gy, gx, c, py, px]
            .reshape([t * g * g, 3 * p * p]);
        let x = patches.matmul(self.patch_t.clone()) + self.patch_bias.clone().unsqueeze::<2>();
        (x.reshape([t, g * g, d]) + self.positions.clone().unsqueeze::<3>()).reshape([t * g * g, d])
    }

    /// Images encoded together: as many as keep the largest activation, the attention
    /// scores `[images, heads, n, n]` or the MLP's `[images * n, intermediate]`, within one
    /// storage binding.
    fn images_per_batch(&self) -> usize {
        let (c, n) = (&self.cfg, self.tokens());
        self.cap.per_binding(4 * (c.n_heads * n * n).max(n * c.d_ff), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_torch() {
        // torch.bucketize(torch.arange(n) / n * (1 - 1e-6), torch.arange(1 / n, 1.0, 1 / n), right=True)
        for n in [16, 27, 32] {
            let want: Vec<usize> = (0..n).map(|i: usize| i.saturating_sub(1)).collect();
            assert_eq!((0..n).map(|i| bucket(i, n, n)).collect::<Vec<_>>(), want, "n = {n}");
        }
        assert_eq!(Positions::Bucketed.ids(3), vec![0, 0, 1, 0, 0, 1, 3, 3, 4]);
        assert_eq!(Positions::Identity.ids(2), vec![0, 1, 2, 3]);
    }
}
