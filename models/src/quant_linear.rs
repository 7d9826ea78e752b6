//! A linear layer without bias whose weight stays in its file format on the device:
//! GGML blocks through the `QuantOps` kernels, or plain f32 for float files.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::LoadError;
use vidllm_core::ggml::{GgmlType, dequantize};
use vidllm_shaders::QuantMatrix;
use vidllm_shaders::device::Placement;

#[derive(Debug, Clone)]
pub enum QuantLinear {
    /// `W [out, in]` in its file's blocks (or F16 / BF16 values), decoded in the kernels.
    Blocks(QuantMatrix),
    /// Float `W^T [in, out]`, ready for `x.matmul`, in column bands each within one
    /// storage binding (one band unless the matrix is larger than the device allows).
    Dense(Vec<Tensor<2>>),
}

impl QuantLinear {
    /// Build from the raw bytes of a `[out, in]` weight of type `ty`.
    pub fn from_raw(name: &str, ty: GgmlType, bytes: &[u8], out: usize, inp: usize, at: &Placement) -> Result<Self, LoadError> {
        // Block types and 16-bit floats stay as the file has them; F16 / BF16 rows that are
        // not whole groups of 32 (never seen in practice) are widened instead.
        if ty.is_quantized() || (ty.stays_packed() && inp.is_multiple_of(vidllm_shaders::GROUP)) {
            let m = QuantMatrix::upload(ty, bytes, out, inp, at)
                .map_err(|e| LoadError::BadTensor { name: name.to_string(), reason: e.to_string() })?;
            return Ok(Self::Blocks(m));
        }
        let w = dequantize(ty, bytes, out * inp);
        let rows = at.cap.per_binding(inp * 4, 0);
        let bands = w
            .chunks(rows * inp)
            .map(|band| Tensor::<2>::from_data(TensorData::new(band.to_vec(), [band.len() / inp, inp]), &at.device).transpose())
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
