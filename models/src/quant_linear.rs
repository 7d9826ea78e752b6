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
        Self::from_raw_stacked(name, ty, &[bytes], out, inp, at)
    }

    /// [`QuantLinear::from_raw`] of `[out_i, in]` weights of one type stacked into `[out, in]`
    /// (`parts`: their bytes, in order).
    pub fn from_raw_stacked(name: &str, ty: GgmlType, parts: &[&[u8]], out: usize, inp: usize, at: &Placement) -> Result<Self, LoadError> {
        // Block types and 16-bit floats stay as the file has them; F16 / BF16 rows that are
        // not whole groups of 32 (never seen in practice) are widened instead.
        if ty.is_quantized() || (ty.stays_packed() && inp.is_multiple_of(vidllm_shaders::GROUP)) {
            let m = QuantMatrix::upload_stacked(ty, parts, out, inp, at)
                .map_err(|e| LoadError::BadTensor { name: name.to_string(), reason: e.to_string() })?;
            return Ok(Self::Blocks(m));
        }
        let bytes = parts.concat();
        let w = dequantize(ty, &bytes, out * inp);
        let rows = at.cap.per_binding(inp * 4, 0);
        let bands = w
            .chunks(rows * inp)
            .map(|band| Tensor::<2>::from_data(TensorData::new(band.to_vec(), [band.len() / inp, inp]), &at.device).transpose())
            .collect();
        Ok(Self::Dense(bands))
    }

    /// [`QuantLinear::forward`] for rows of different sequences (a batched decode step):
    /// each row's result is its own product's for block and 16-bit weights (float
    /// weights go through the float matmul, whose sums may run in another order).
    ///
    /// # Shapes
    /// - x: `[m, in]` -> `[m, out]`
    pub fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Blocks(w) => w.forward_rows(x),
            Self::Dense(_) => self.forward(x),
        }
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

    /// `residual + x W^T`: the layer joining the residual stream (a block's attention
    /// output and down projections), in the product's own kernel for block weights
    /// ([`QuantMatrix::forward_add`]); the values are those of the add after the product.
    ///
    /// # Shapes
    /// - x: `[m, in]`, residual: `[m, out]` -> `[m, out]`
    pub fn forward_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Tensor<2> {
        match self {
            Self::Blocks(w) => w.forward_add(x, residual),
            Self::Dense(_) => residual + self.forward(x),
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

/// Linear layers applied to one input (a block's q, k and v; its gate and up), run as one
/// product where their weights share a type: the rows are stacked at load, so the input
/// is read (and on the CPU quantised) once, and a decode step runs one kernel, one
/// parallel region, where it ran two or three. Per output row the arithmetic is the
/// separate layers' own, so results are unchanged.
#[derive(Debug, Clone)]
pub struct StackedLinear {
    /// Output width of each layer, in order.
    outs: Vec<usize>,
    /// One stacked layer, or the layers one by one where their types differ (llama.cpp's
    /// mixes such as Q4_K_M give some `attn_v` more bits than `attn_q`).
    layers: Vec<QuantLinear>,
}

/// One layer's weight for [`StackedLinear::from_raw`]: name, type, raw `[out, in]` bytes, `out`.
pub type RawWeight<'a> = (&'a str, GgmlType, &'a [u8], usize);

impl StackedLinear {
    /// Build from the raw bytes of `[out_i, inp]` weights.
    pub fn from_raw(parts: &[RawWeight], inp: usize, at: &Placement) -> Result<Self, LoadError> {
        let outs: Vec<usize> = parts.iter().map(|p| p.3).collect();
        let ty = parts[0].1;
        if parts.len() == 1 || parts.iter().any(|p| p.1 != ty) {
            let layers = parts
                .iter()
                .map(|&(name, ty, bytes, out)| QuantLinear::from_raw(name, ty, bytes, out, inp, at))
                .collect::<Result<_, _>>()?;
            return Ok(Self { outs, layers });
        }
        // Rows are whole blocks, so stacking `[out_i, in]` matrices is concatenating bytes.
        let bytes: Vec<&[u8]> = parts.iter().map(|p| p.2).collect();
        let name = parts.iter().map(|p| p.0).collect::<Vec<_>>().join(" + ");
        Ok(Self { layers: vec![QuantLinear::from_raw_stacked(&name, ty, &bytes, outs.iter().sum(), inp, at)?], outs })
    }

    /// # Shapes
    /// - x: `[m, in]` -> one `[m, out_i]` per layer
    pub fn forward(&self, x: Tensor<2>) -> Vec<Tensor<2>> {
        self.each(x, QuantLinear::forward)
    }

    /// [`StackedLinear::forward`] for rows of different sequences ([`QuantLinear::forward_rows`]).
    pub fn forward_rows(&self, x: Tensor<2>) -> Vec<Tensor<2>> {
        self.each(x, QuantLinear::forward_rows)
    }

    /// The products side by side, as one `[m, sum out_i]` tensor (no split: the stacked
    /// matrix's output as it is).
    pub fn forward_joined(&self, x: Tensor<2>) -> Tensor<2> {
        self.joined(x, QuantLinear::forward)
    }

    /// [`StackedLinear::forward_joined`] for rows of different sequences.
    pub fn forward_rows_joined(&self, x: Tensor<2>) -> Tensor<2> {
        self.joined(x, QuantLinear::forward_rows)
    }

    fn joined(&self, x: Tensor<2>, product: impl Fn(&QuantLinear, Tensor<2>) -> Tensor<2>) -> Tensor<2> {
        match self.layers.as_slice() {
            [stacked] => product(stacked, x),
            layers => Tensor::cat(layers.iter().map(|l| product(l, x.clone())).collect(), 1),
        }
    }

    fn each(&self, x: Tensor<2>, product: impl Fn(&QuantLinear, Tensor<2>) -> Tensor<2>) -> Vec<Tensor<2>> {
        match self.layers.as_slice() {
            [stacked] => product(stacked, x).split_with_sizes(self.outs.clone(), 1),
            layers => layers.iter().map(|l| product(l, x.clone())).collect(),
        }
    }

    /// Bytes of device memory held by the weights.
    pub fn device_bytes(&self) -> usize {
        self.layers.iter().map(QuantLinear::device_bytes).sum()
    }
}
