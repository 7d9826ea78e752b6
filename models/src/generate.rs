//! Generation's vocabulary: the parameters of an answer, its pieces, its timings, and the
//! two ways a logits row comes back from the device. The turn state machine that uses
//! them is `conversation.rs`.

use burn::tensor::Tensor;
use vidllm_core::GenerateError;
use vidllm_core::sampler::SamplerConfig;
use web_time::Duration;

/// One generated token and the text it completed.
#[derive(Debug, Clone)]
pub struct Piece {
    pub id: u32,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends when the text contains one of these (it is not emitted).
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self { max_tokens: 256, sampler: SamplerConfig::default(), stop: Vec::new() }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prefill: Duration,
    pub generated: usize,
    pub decode: Duration,
}

impl Timings {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens that needed a forward pass of their own.
    pub fn decode_tok_s(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Read a `[1, vocab]` logits tensor back to the host.
pub fn read_row(t: Tensor<2>) -> Result<Vec<f32>, GenerateError> {
    let data = t.try_into_data().map_err(|e| GenerateError::Device(format!("{e:?}")))?;
    data.try_into_vec::<f32>().map_err(|e| GenerateError::Device(format!("{e:?}")))
}

/// [`read_row`] without blocking: what a browser must use (WebGPU forbids waiting).
pub async fn read_row_async(t: Tensor<2>) -> Result<Vec<f32>, GenerateError> {
    let data = t.into_data_async().await.map_err(|e| GenerateError::Device(format!("{e:?}")))?;
    data.try_into_vec::<f32>().map_err(|e| GenerateError::Device(format!("{e:?}")))
}
