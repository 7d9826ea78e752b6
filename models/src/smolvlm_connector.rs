//! The Idefics3 / SmolVLM connector (Laurençon et al. 2024, "Building and better
//! understanding vision-language models"; reference: transformers
//! `models/smolvlm/modeling_smolvlm.py`, `SmolVLMConnector`): a pixel shuffle that folds
//! each `r x r` block of patch features into one token (`r` = `scale_factor`), then one
//! linear map without bias (`modality_projection.proj`) into the decoder's width.
//!
//! So a 512 px SigLIP-B/16 image (32 x 32 = 1,024 patches of 768) becomes, with `r = 4`,
//! 64 tokens of 12,288 features, projected to the decoder's 576 or 960.

use burn::tensor::{Device, Tensor};
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;

use crate::layers::Linear;

pub struct SmolVlmConnector {
    /// `scale_factor`: the side of the blocks folded into one token.
    pub scale: usize,
    proj: Linear,
}

impl SmolVlmConnector {
    /// Load `{prefix}modality_projection.proj.weight` `[d_text, d_vis * scale^2]`.
    pub fn load(ck: &Checkpoint, prefix: &str, scale: usize, d_vis: usize, d_text: usize, device: &Device) -> Result<Self, LoadError> {
        let proj = Linear::load(ck, &format!("{prefix}modality_projection.proj"), d_text, d_vis * scale * scale, device)?;
        Ok(Self { scale, proj })
    }

    /// Tokens out for `patches` tokens in (a square grid whose side `scale` divides).
    pub fn tokens(&self, patches: usize) -> usize {
        patches / (self.scale * self.scale)
    }

    /// # Shapes
    /// - x: `[b, n, d_vis]` (n = g * g patches, row-major) -> `[b, n / r^2, d_text]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let y = pixel_shuffle(x, self.scale);
        let d = y.dims()[2];
        let out = self.proj.forward(y.reshape([b * self.tokens(n), d]));
        let d_text = out.dims()[1];
        out.reshape([b, self.tokens(n), d_text])
    }
}

/// transformers' `pixel_shuffle`: the `g x g` grid becomes `(g/r) x (g/r)` tokens; token
/// `(I, J)` concatenates, for each of the `r` rows `i` of its block, the features of the
/// `r` patches `(I r + i, J r .. J r + r)` in order (a space-to-depth).
///
/// # Shapes
/// - x: `[b, g * g, d]` -> `[b, (g / r)^2, d * r^2]`
pub fn pixel_shuffle(x: Tensor<3>, r: usize) -> Tensor<3> {
    let [b, n, d] = x.dims();
    let g = (n as f64).sqrt() as usize;
    debug_assert!(g * g == n && g.is_multiple_of(r), "{n} patches is not a square grid divisible by {r}");
    x.reshape([b, g, g / r, d * r]) // [b, h, w/r, r d]: r neighbours along a row joined
        .swap_dims(1, 2) // [b, w/r, h, r d]
        .reshape([b, g / r, g / r, d * r * r]) // [b, w/r, h/r, r^2 d]: r rows joined
        .swap_dims(1, 2) // [b, h/r, w/r, r^2 d]
        .reshape([b, n / (r * r), d * r * r])
}

/// The mean of each `r x r` block of patches that [`pixel_shuffle`] folds into one token,
/// in its token order.
///
/// # Shapes
/// - x: `[b, g * g, d]` -> `[b, (g / r)^2, d]`
pub fn block_mean(x: Tensor<3>, r: usize) -> Tensor<3> {
    let [b, n, d] = x.dims();
    let g = (n as f64).sqrt() as usize;
    x.reshape([b * g / r, r, g / r, r * d]) // [b h/r, r rows, w/r, r cols d]
        .mean_dim(1)
        .reshape([b * n / (r * r), r, d])
        .mean_dim(1)
        .reshape([b, n / (r * r), d])
}
