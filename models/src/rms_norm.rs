//! RMSNorm (Zhang & Sennrich 2019): `y = x / sqrt(mean(x^2) + eps) * weight`, in f32.

use burn::tensor::Tensor;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[d_model]`
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    /// # Shapes
    /// - x: `[t, d_model]` -> `[t, d_model]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        // One kernel on every device (`vidllm_shaders::rms_norm`).
        vidllm_shaders::rms_norm(x, &self.weight, self.eps)
    }
}
