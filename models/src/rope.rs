//! Rotary position embedding (Su et al. 2021, RoFormer).
//!
//! `inv_freq[i] = theta^(-2i/d)`; position `p` rotates pair i by `p * inv_freq[i]`.
//! Which elements form a pair depends on the checkpoint:
//! - `Interleaved`: `(x[2i], x[2i+1])`, what GGUF llama tensors need (llama.cpp permutes
//!   q/k rows at conversion);
//! - `Halves`: `(x[i], x[i + d/2])` ("rotate_half"), Hugging Face checkpoints.

use burn::tensor::{Device, Int, Tensor, TensorData};
use vidllm_core::ggml::GgmlType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    Interleaved,
    Halves,
}

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_pos, d_head / 2]`
    cos: Tensor<2>,
    sin: Tensor<2>,
    style: RopeStyle,
}

impl Rope {
    pub fn new(d_head: usize, theta: f64, max_pos: usize, style: RopeStyle, device: &Device) -> Self {
        let half = d_head / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                // f64 angles, like llama.cpp's cache: exact for long contexts.
                let inv = theta.powf(-2.0 * i as f64 / d_head as f64);
                let a = p as f64 * inv;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [max_pos, half]), device);
        Self { cos: t(cos), sin: t(sin), style }
    }

    /// Split `t` rows of `heads` heads out (as attention reads them) and rotate row `i`
    /// for position `positions[i]`: one kernel on every device
    /// (`vidllm_shaders::rope_heads`).
    ///
    /// # Shapes
    /// - x: `[t, heads * d_head]` -> `[1, heads, t, d_head]`
    pub fn heads(&self, x: Tensor<2>, heads: usize, positions: &[usize]) -> Tensor<4> {
        vidllm_shaders::rope_heads(x, &self.cos, &self.sin, positions, heads, self.style == RopeStyle::Halves)
    }

    /// [`Rope::heads`] of a decode step's row, at the position its step tensor holds when
    /// the kernel runs ([`vidllm_shaders::STEP_POSITION`]).
    ///
    /// # Shapes
    /// - x: `[1, heads * d_head]` -> `[1, heads, 1, d_head]`
    pub fn heads_step(&self, x: Tensor<2>, heads: usize, step: &Tensor<1, Int>) -> Tensor<4> {
        vidllm_shaders::rope_heads_step(x, &self.cos, &self.sin, step, heads, self.style == RopeStyle::Halves)
    }

    /// A decode step's queries and keys rotated as [`Rope::heads_step`] rotates them, the
    /// rotated keys and the values written into the step's row of the packed caches `k`
    /// and `v`, in one kernel (`vidllm_shaders::rope_kv_step`). Returns the queries and
    /// the caches.
    ///
    /// # Shapes
    /// - qkv: `[1, (heads + 2 kv_heads) d_head]`; k, v: `[kv_heads, rows, words]` ->
    ///   `[1, heads, 1, d_head]` and the caches
    #[allow(clippy::too_many_arguments)]
    pub fn kv_step(
        &self,
        qkv: Tensor<2>,
        step: &Tensor<1, Int>,
        k: Tensor<3, Int>,
        v: Tensor<3, Int>,
        ty: GgmlType,
        heads: usize,
        kv_heads: usize,
    ) -> (Tensor<4>, Tensor<3, Int>, Tensor<3, Int>) {
        let halves = self.style == RopeStyle::Halves;
        vidllm_shaders::rope_kv_step(qkv, &self.cos, &self.sin, step, k, v, ty, heads, kv_heads, halves)
    }
}
