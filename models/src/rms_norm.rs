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
        let ms = x.clone().powi_scalar(2).mean_dim(1); // [t, 1]
        let inv = (ms + self.eps).sqrt().recip();
        x * inv * self.weight.clone().unsqueeze::<2>()
    }
}
