//! Small layers shared by the vision towers and projectors: linear with bias and
//! LayerNorm, loaded from safetensors checkpoints in f32; a tower's linear layers may be
//! stored as Q8_0 blocks instead ([`TowerWeights`]).

use burn::tensor::{Device, Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::ggml::{GgmlType, quantize};
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::QuantMatrix;
use vidllm_shaders::cpu_attention::transposed;
use vidllm_shaders::device::Placement;

/// How a vision tower's linear layers (attention and MLP) are stored on the device: a
/// load option, as `--quant` is the decoder's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TowerWeights {
    /// As the checkpoint's floats, widened to f32: transformers' own arithmetic.
    #[default]
    F32,
    /// Quantised on load to GGML's Q8_0 (32 weights and one f16 scale a block), as
    /// llama.cpp's `mmproj-*-Q8_0.gguf` files store them, and run by the block kernels:
    /// on the CPU the integer path, at about twice the f32 GEMM's multiply-adds a second.
    /// Rows not whole blocks of 32 stay f32.
    Q8_0,
}

impl std::str::FromStr for TowerWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q8_0" => Ok(Self::Q8_0),
            o => Err(format!("unknown vision tower weights {o:?} (f32, q8_0)")),
        }
    }
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    /// `[out]`
    pub bias: Option<Tensor<1>>,
}

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `W^T` `[in, out]`, laid out so: the CPU's GEMM (the `gemm` crate, which computes a
    /// row-major `x W^T` as `(W x^T)^T`) then reads it as a column-major left operand in
    /// place. As a transposed view of `[out, in]` it was repacked on one thread for every
    /// product, while the other threads waited: a tenth of a CLIP tower's time. (Boxed: a
    /// tensor is several times a block matrix's size.)
    Dense(Box<Tensor<2>>),
    /// `W` `[out, in]` in GGML blocks ([`TowerWeights::Q8_0`]).
    Blocks(QuantMatrix),
}

impl Linear {
    /// Load `{prefix}.weight` `[out, in]` and `{prefix}.bias` if present, in f32.
    pub fn load(ck: &Checkpoint, prefix: &str, out: usize, inp: usize, device: &Device) -> Result<Self, LoadError> {
        let w = ck.f32_shaped(&format!("{prefix}.weight"), &[out, inp])?;
        let weight = LinearWeight::Dense(Box::new(Tensor::<2>::from_data(TensorData::new(transposed(&w, out, inp), [inp, out]), device)));
        Ok(Self { weight, bias: Self::load_bias(ck, prefix, out, device)? })
    }

    /// [`Linear::load`], the weight stored as `weights` says.
    pub fn load_as(
        ck: &Checkpoint,
        prefix: &str,
        out: usize,
        inp: usize,
        weights: TowerWeights,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        if weights == TowerWeights::F32 || !inp.is_multiple_of(GgmlType::Q8_0.block_elems()) {
            return Self::load(ck, prefix, out, inp, &at.device);
        }
        let name = format!("{prefix}.weight");
        let w = ck.f32_shaped(&name, &[out, inp])?;
        let blocks = QuantMatrix::upload(GgmlType::Q8_0, &quantize(GgmlType::Q8_0, &w), out, inp, at)
            .map_err(|e| LoadError::BadTensor { name, reason: e.to_string() })?;
        Ok(Self { weight: LinearWeight::Blocks(blocks), bias: Self::load_bias(ck, prefix, out, &at.device)? })
    }

    fn load_bias(ck: &Checkpoint, prefix: &str, out: usize, device: &Device) -> Result<Option<Tensor<1>>, LoadError> {
        let name = format!("{prefix}.bias");
        match ck.contains(&name) {
            true => Ok(Some(vector(ck, &name, out, device)?)),
            false => Ok(None),
        }
    }

    /// # Shapes
    /// - x: `[m, in]` -> `[m, out]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = match &self.weight {
            LinearWeight::Dense(wt) => x.matmul((**wt).clone()),
            LinearWeight::Blocks(w) => w.forward(x),
        };
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
