//! MERV's pre-fusion projectors and its feature fusion (Chung et al. 2025, "Unifying
//! Specialized Visual Encoders for Video Language Models"); reference:
//! github.com/princetonvisualai/merv (`merv/models/vidlms/merv.py`,
//! `merv/util/nn_utils.py`).
//!
//! Each encoder's features are pooled to one common grid (16 frames x 8 x 8, so that the
//! encoders line up token for token in space and time) and projected to the decoder's
//! width. The fusion is one attention step with a single learned query: the keys are the
//! encoders' token means, the values the encoders' whole sequences, and there is no value
//! or output projection, so the visual tokens are a convex mix of the four sequences. The
//! mixing weights are the paper's "which encoder answered" signal.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;

use crate::layers::Linear;
use crate::pllava_pool::pool3d;

/// Pool, then project (MERV's `3davg+linear`).
pub struct PreFusionProjector {
    /// `(T, h, w)` every encoder is pooled to.
    pub pool: [usize; 3],
    pub linear: Linear,
}

impl PreFusionProjector {
    /// Load `{prefix}.weight` `[d_text, d_encoder]` and `{prefix}.bias`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        pool: [usize; 3],
        d_encoder: usize,
        d_text: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self { pool, linear: Linear::load(ck, prefix, d_text, d_encoder, device)? })
    }

    /// # Shapes
    /// - features: `[t, h, w, d_encoder]` (frame-major grid) -> `[T * h' * w', d_text]`
    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        self.linear.forward(self.pooled(features))
    }

    /// The pooling alone (of the features, or of the tower's queries and keys laid out as
    /// they are).
    ///
    /// # Shapes
    /// - x: `[t, h, w, c]` -> `[T * h' * w', c]`
    pub fn pooled(&self, x: Tensor<4>) -> Tensor<2> {
        let device = x.device();
        let t = x.dims()[0];
        // Time is already aligned when every encoder gives `T` steps; otherwise it is
        // pooled too (adaptive bins), as `AdaptiveAvgPool3d` does.
        pool3d(x, self.pool, (t != self.pool[0]).then_some(t), &device)
    }
}

/// The learned-query fusion: `nn.MultiheadAttention(embed_dim, 1 head, kdim = vdim =
/// d_text)` of which only the query and key projections are used.
pub struct FeatureFusion {
    /// `[1, embed]`
    query: Tensor<2>,
    q_proj: Linear,
    k_proj: Linear,
    pub embed_dim: usize,
}

/// The fused visual tokens and each encoder's weight.
pub struct Fused {
    /// `[tokens, d_text]`
    pub tokens: Tensor<2>,
    /// `[encoders]`, summing to 1.
    pub weights: Tensor<1>,
}

impl FeatureFusion {
    /// Load `{prefix}.query` `[1, embed]`, `{prefix}.q_proj.*` `[embed, embed]` and
    /// `{prefix}.k_proj.*` `[embed, d_text]`; `embed` is read from the query's shape.
    pub fn load(ck: &Checkpoint, prefix: &str, d_text: usize, device: &Device) -> Result<Self, LoadError> {
        let qname = format!("{prefix}.query");
        let (q, shape) = ck.f32(&qname)?;
        let embed = match shape.as_slice() {
            [1, e] | [e] if *e > 0 => *e,
            other => return Err(LoadError::Unsupported(format!("{qname}: shape {other:?}, want [1, embed_dim]"))),
        };
        let q = Tensor::<1>::from_data(TensorData::new(q, [embed]), device);
        Ok(Self {
            query: q.reshape([1, embed]),
            q_proj: Linear::load(ck, &format!("{prefix}.q_proj"), embed, embed, device)?,
            k_proj: Linear::load(ck, &format!("{prefix}.k_proj"), embed, d_text, device)?,
            embed_dim: embed,
        })
    }

    /// `w = softmax_e((Q Wq + bq)(mean(X_e) Wk + bk)^T / sqrt(embed))`, output `sum_e w_e X_e`.
    ///
    /// # Shapes
    /// - sequences: `encoders x [tokens, d_text]` -> tokens `[tokens, d_text]`, weights `[encoders]`
    pub fn forward(&self, sequences: Vec<Tensor<2>>) -> Fused {
        let e = sequences.len();
        let [n, d] = sequences[0].dims();
        let stacked = Tensor::stack::<3>(sequences, 0); // [e, n, d]
        let keys = stacked.clone().mean_dim(1).reshape([e, d]);
        let q = self.q_proj.forward(self.query.clone()); // [1, embed]
        let k = self.k_proj.forward(keys); // [e, embed]
        let scores = q.matmul(k.transpose()) / (self.embed_dim as f64).sqrt(); // [1, e]
        let weights = softmax(scores, 1).reshape([e]);
        let tokens = (stacked * weights.clone().reshape([e, 1, 1])).sum_dim(0).reshape([n, d]);
        Fused { tokens, weights }
    }
}
