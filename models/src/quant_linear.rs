//! A linear layer without bias whose weight stays in its file format on the device:
//! GGML blocks through the `QuantOps` kernels, or plain f32 for float files.

use burn::tensor::{Device, Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::ggml::{GgmlType, dequantize};
use vidllm_shaders::QuantMatrix;
use vidllm_shaders::device::per_binding;

#[derive(Debug, Clone)]
pub enum QuantLinear {
    /// Block-quantised `W [out, in]`.
    Blocks(QuantMatrix),
    /// Float `W^T [in, out]`, ready for `x.matmul`, in column bands each within one
    /// storage binding (one band unless the matrix is larger than the device allows).
    Dense(Vec<Tensor<2>>),
}

impl QuantLinear {
    /// Build from the raw bytes of a `[out, in]` weight of type `ty`.
    pub fn from_raw(name: &str, ty: GgmlType, bytes: &[u8], out: usize, inp: usize, device: &Device) -> Result<Self, LoadError> {
        if ty.is_quantized() {
            let m = QuantMatrix::upload(ty, bytes, out, inp, device)
                .map_err(|e| LoadError::BadTensor { name: name.to_string(), reason: e.to_string() })?;
            return Ok(Self::Blocks(m));
        }
        let w = dequantize(ty, bytes, out * inp);
        let rows = per_binding(inp * 4, 0);
        let bands = w
            .chunks(rows * inp)
            .map(|band| Tensor::<2>::from_data(TensorData::new(band.to_vec(), [band.len() / inp, inp]), device).transpose())
            .collect();
        Ok(Self::Dense(bands))
    }

    /// # Shapes
    /// - x: `[m, in]` -> `[m, out]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Blocks(w) => w.forward(x),
            Self::Dense(bands) => match bands.as_slice() {
                [wt] => x.matmul(wt.clone()),
                many => Tensor::cat(many.iter().map(|wt| x.clone().matmul(wt.clone())).collect(), 1),
            },
        }
    }

    /// Bytes of device memory held by the weight.
    pub fn device_bytes(&self) -> usize {
        match self {
            Self::Blocks(w) => w.device_bytes(),
            Self::Dense(bands) => bands.iter().map(|w| w.shape().num_elements() * 4).sum(),
        }
    }
}
