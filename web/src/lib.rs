//! vidllm in the browser: load a GGUF decoder onto WebGPU and stream its answer.
//!
//! Browsers forbid blocking on the GPU, so every read-back here is `into_data_async`;
//! the model graph and the 4-bit kernels are the native ones, compiled to WGSL.

use burn::tensor::{Device, Tensor};
use vidllm_core::chat::{Message, render};
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::{Sampler, SamplerConfig};
use vidllm_core::stream::TextStream;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{KvCache, Llama, Logits, load_llama};
use wasm_bindgen::prelude::*;

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn callback_err(e: JsValue) -> JsError {
    js_err(format!("callback failed: {e:?}"))
}

async fn read_row(t: Tensor<2>) -> Result<Vec<f32>, JsError> {
    let data = t.into_data_async().await.map_err(|e| js_err(format!("device: {e:?}")))?;
    data.try_into_vec::<f32>().map_err(|e| js_err(format!("device: {e:?}")))
}

/// A decoder on a WebGPU (or CPU) device, with its conversation state.
#[wasm_bindgen]
pub struct Runtime {
    model: Llama,
    tok: Tokenizer,
    device: Device,
    cache: KvCache,
    /// Tokens whose keys and values are in the cache, plus the last sampled one.
    history: Vec<u32>,
    file_bytes: usize,
}

#[wasm_bindgen]
impl Runtime {
    /// Load GGUF bytes. `gpu`: WebGPU (initialised asynchronously), else the CPU backend.
    pub async fn load_gguf(bytes: Vec<u8>, gpu: bool, context: usize) -> Result<Runtime, JsError> {
        let file_bytes = bytes.len();
        let device = if gpu {
            Device::wgpu_options().init_async().await.map_err(|e| js_err(format!("WebGPU: {e}")))?
        } else {
            Device::flex()
        };
        let g = Gguf::from_bytes(bytes).map_err(js_err)?;
        let tok = Tokenizer::from_gguf(&g).map_err(js_err)?;
        let model = load_llama(&g, &device).map_err(js_err)?;
        let context = context.clamp(2, model.rope_positions());
        let cache = KvCache::new(&model.cfg, context, &device);
        Ok(Runtime { model, tok, device, cache, history: Vec::new(), file_bytes })
    }

    /// Token ids of `text` (special-token text parsed; BOS as the model asks).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, JsError> {
        self.tok.encode(text, self.tok.add_bos).map_err(js_err)
    }

    /// The model's chat template applied to one user message, tokenised.
    pub fn chat_tokens(&self, user: &str) -> Result<Vec<u32>, JsError> {
        let template = self.tok.chat_template.as_deref().ok_or_else(|| js_err("the model has no chat template"))?;
        let piece = |id: Option<u32>| id.map(|i| String::from_utf8_lossy(self.tok.token_bytes(i)).into_owned()).unwrap_or_default();
        let text = render(template, &[Message::new("user", user)], &piece(self.tok.bos), &piece(self.tok.eos)).map_err(js_err)?;
        self.tok.encode(&text, self.tok.add_bos).map_err(js_err)
    }

    /// Forget the conversation.
    pub fn reset(&mut self) {
        self.cache.truncate(0);
        self.history.clear();
    }

    /// Generate after `prompt`, calling `on_piece(text, id)` per token; returns the ids.
    /// `should_stop()` is polled between tokens (an `AbortSignal`'s `aborted`).
    pub async fn generate(
        &mut self,
        prompt: Vec<u32>,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsError> {
        let pending: Vec<u32> = self.history[self.cache.len..].to_vec();
        let input = [pending.as_slice(), &prompt].concat();
        if input.is_empty() {
            return Err(js_err("prompt is empty"));
        }
        if self.cache.len + input.len() + 1 > self.cache.capacity {
            return Err(js_err(format!("prompt has {} tokens but the context holds {}", self.cache.len + input.len(), self.cache.capacity)));
        }
        if let Some(bad) = input.iter().find(|&&t| t as usize >= self.model.cfg.vocab_size) {
            return Err(js_err(format!("token id {bad} is outside the vocabulary")));
        }
        let mut sampler = Sampler::new(SamplerConfig { temperature, seed, ..Default::default() });
        let mut detok = TextStream::new();
        let mut logits = read_row(self.model.forward(&input, &mut self.cache, Logits::Last)).await?;
        self.history.extend_from_slice(&prompt);
        let mut out = Vec::new();
        while out.len() < max_tokens {
            let id = sampler.sample(&logits, &self.history);
            if self.tok.is_eog(id) {
                break;
            }
            self.history.push(id);
            out.push(id);
            let text = detok.push(&self.tok, id);
            on_piece.call2(&JsValue::NULL, &JsValue::from_str(&text), &JsValue::from(id)).map_err(callback_err)?;
            let stop = should_stop.call0(&JsValue::NULL).map_err(callback_err)?.as_bool().unwrap_or(false);
            if stop || out.len() == max_tokens || self.cache.len + 1 >= self.cache.capacity {
                break;
            }
            logits = read_row(self.model.forward(&[id], &mut self.cache, Logits::Last)).await?;
        }
        let tail = detok.finish();
        if !tail.is_empty() {
            on_piece.call2(&JsValue::NULL, &JsValue::from_str(&tail), &JsValue::NULL).map_err(callback_err)?;
        }
        Ok(out)
    }

    /// Device memory held by the weights, from the runtime's own allocations.
    pub fn weights_device_bytes(&self) -> usize {
        self.model.weights_device_bytes()
    }

    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    pub fn device_name(&self) -> String {
        format!("{:?}", self.device)
    }
}
