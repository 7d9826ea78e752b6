//! Small float layers shared by the vision towers and projectors: linear with bias and
//! LayerNorm, loaded from safetensors checkpoints in f32.

use burn::tensor::{Device, Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::cpu_attention::transposed;

/// `y = x W^T + b`, with `W^T` stored ready for `matmul`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`, laid out so: the CPU's GEMM (the `gemm` crate, which computes a
    /// row-major `x W^T` as `(W x^T)^T`) then reads it as a column-major left operand in
    /// place. As a transposed view of `[out, in]` it was repacked on one thread for every
    /// product, while the other threads waited: a tenth of a CLIP tower's time.
    pub weight_t: Tensor<2>,
    /// `[out]`
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    /// Load `{prefix}.weight` `[out, in]` and `{prefix}.bias` if present.
    pub fn load(ck: &Checkpoint, prefix: &str, out: usize, inp: usize, device: &Device) -> Result<Self, LoadError> {
        let w = ck.f32_shaped(&format!("{prefix}.weight"), &[out, inp])?;
        let weight_t = Tensor::<2>::from_data(TensorData::new(transposed(&w, out, inp), [inp, out]), device);
        let bname = format!("{prefix}.bias");
        let bias = match ck.contains(&bname) {
            true => Some(vector(ck, &bname, out, device)?),
            false => None,
        };
        Ok(Self { weight_t, bias })
    }

    /// # Shapes
    /// - x: `[m, in]` -> `[m, out]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight_t.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}

pub fn vector(ck: &Checkpoint, name: &str, n: usize, device: &Device) -> Result<Tensor<1>, LoadError> {
    let v = ck.f32_shaped(name, &[n])?;
    Ok(Tensor::from_data(TensorData::new(v, [n]), device))
}

/// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * w + b`, biased variance.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(ck: &Checkpoint, prefix: &str, n: usize, eps: f64, device: &Device) -> Result<Self, LoadError> {
        Ok(Self {
            weight: vector(ck, &format!("{prefix}.weight"), n, device)?,
            bias: vector(ck, &format!("{prefix}.bias"), n, device)?,
            eps,
        })
    }

    /// # Shapes
    /// - x: `[m, n]` -> `[m, n]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mean = x.clone().mean_dim(1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(1);
        let y = centered / (var + self.eps).sqrt();
        y * self.weight.clone().unsqueeze::<2>() + self.bias.clone().unsqueeze::<2>()
    }
}
