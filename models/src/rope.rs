//! Rotary position embedding (Su et al. 2021, RoFormer).
//!
//! `inv_freq[i] = theta^(-2i/d)`; position `p` rotates pair i by `p * inv_freq[i]`.
//! Which elements form a pair depends on the checkpoint:
//! - `Interleaved`: `(x[2i], x[2i+1])`, what GGUF llama tensors need (llama.cpp permutes
//!   q/k rows at conversion);
//! - `Halves`: `(x[i], x[i + d/2])` ("rotate_half"), Hugging Face checkpoints.

use burn::tensor::{Device, Int, Tensor, TensorData};

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

    /// Rotate `x` for positions `start..start + t`.
    ///
    /// # Shapes
    /// - x: `[b, h, t, d_head]` -> same
    pub fn forward(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let t = x.dims()[2];
        self.rotate(x, self.cos.clone().narrow(0, start, t), self.sin.clone().narrow(0, start, t))
    }

    /// Rotate row `i` of `x` for position `positions[i]`: one token of each of several
    /// sequences, each at its own place (a batched decode step).
    ///
    /// # Shapes
    /// - x: `[b, h, positions.len(), d_head]` -> same
    pub fn forward_at(&self, x: Tensor<4>, positions: &[usize]) -> Tensor<4> {
        let ids: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [positions.len()]), &self.cos.device());
        self.rotate(x, self.cos.clone().select(0, ids.clone()), self.sin.clone().select(0, ids))
    }

    /// # Shapes
    /// - x: `[b, h, t, d_head]`, cos and sin: `[t, d_head / 2]` -> `[b, h, t, d_head]`
    fn rotate(&self, x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let cos = cos.reshape([1, 1, t, half, 1]);
        let sin = sin.reshape([1, 1, t, half, 1]);
        let pairs = match self.style {
            RopeStyle::Interleaved => x.reshape([b, h, t, half, 2]),
            // [b,h,t,2,half] -> [b,h,t,half,2]
            RopeStyle::Halves => x.reshape([b, h, t, 2, half]).swap_dims(3, 4),
        };
        let x0 = pairs.clone().narrow(4, 0, 1);
        let x1 = pairs.narrow(4, 1, 1);
        let y0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
        let y1 = x0 * sin + x1 * cos;
        let y = Tensor::cat(vec![y0, y1], 4); // [b,h,t,half,2]
        match self.style {
            RopeStyle::Interleaved => y.reshape([b, h, t, d]),
            RopeStyle::Halves => y.swap_dims(3, 4).reshape([b, h, t, d]),
        }
    }
}
