//! vidllm in the browser: load a GGUF decoder onto WebGPU and stream its answer.
//!
//! Browsers forbid blocking on the GPU, so every read-back here is `into_data_async`;
//! the model graph and the 4-bit kernels are the native ones, compiled to WGSL.

use burn::tensor::{Device, Tensor};
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::{Sampler, SamplerConfig};
use vidllm_core::stream::TextStream;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{KvCache, Llama, Logits, load_llama};
use wasm_bindgen::prelude::*;

mod gpu;
mod video;

pub use video::VideoRuntime;

thread_local! {
    /// Why the runtime last failed for good: a panic's message, or the GPU device's loss.
    static FAILURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

pub(crate) fn record_failure(why: String) {
    web_sys::console::error_1(&JsValue::from_str(&format!("vidllm: {why}")));
    FAILURE.with(|f| *f.borrow_mut() = Some(why));
}

/// Keep a panic's message (an allocation the GPU refused, a bug) so the page can show it:
/// in wasm a panic aborts with a bare "unreachable".
#[wasm_bindgen(start)]
pub fn start() {
    std::panic::set_hook(Box::new(|info| record_failure(info.to_string())));
}

/// The message of the failure that stopped the runtime, if any.
#[wasm_bindgen]
pub fn last_failure() -> Option<String> {
    FAILURE.with(|f| f.borrow().clone())
}

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

/// Refuse input that would not fit the context (with room for one answer token),
/// before any state changes.
fn check_room(cache: &KvCache, input: usize) -> Result<(), JsError> {
    if cache.len + input + 1 > cache.capacity {
        return Err(js_err(format!(
            "the prompt needs {} tokens of context but the context holds {}",
            cache.len + input + 1,
            cache.capacity
        )));
    }
    Ok(())
}

/// How to sample and where the pieces go.
struct Generation<'a> {
    max_tokens: usize,
    temperature: f32,
    seed: u64,
    on_piece: &'a js_sys::Function,
    should_stop: &'a js_sys::Function,
}

/// Prefill `input` (its embeddings given), then sample token by token, reading every
/// logits row back asynchronously. `history` gets the input and the sampled tokens.
async fn stream_answer(
    model: &Llama,
    tok: &Tokenizer,
    cache: &mut KvCache,
    history: &mut Vec<u32>,
    input: &[u32],
    embeds: Tensor<2>,
    g: Generation<'_>,
) -> Result<Vec<u32>, JsError> {
    check_room(cache, input.len())?;
    if let Some(bad) = input.iter().find(|&&t| t as usize >= model.cfg.vocab_size) {
        return Err(js_err(format!("token id {bad} is outside the vocabulary")));
    }
    let mut sampler = Sampler::new(SamplerConfig { temperature: g.temperature, seed: g.seed, ..Default::default() });
    let mut detok = TextStream::new();
    let mut logits = read_row(model.forward_embeds(embeds, cache, Logits::Last)).await?;
    history.extend_from_slice(input);
    let mut out = Vec::new();
    while out.len() < g.max_tokens {
        let id = sampler.sample(&logits, history);
        if tok.is_eog(id) {
            break;
        }
        history.push(id);
        out.push(id);
        let text = detok.push(tok, id);
        g.on_piece.call2(&JsValue::NULL, &JsValue::from_str(&text), &JsValue::from(id)).map_err(callback_err)?;
        let stop = g.should_stop.call0(&JsValue::NULL).map_err(callback_err)?.as_bool().unwrap_or(false);
        if stop || out.len() == g.max_tokens || cache.len + 1 >= cache.capacity {
            break;
        }
        logits = read_row(model.forward(&[id], cache, Logits::Last)).await?;
    }
    let tail = detok.finish();
    if !tail.is_empty() {
        g.on_piece.call2(&JsValue::NULL, &JsValue::from_str(&tail), &JsValue::NULL).map_err(callback_err)?;
    }
    Ok(out)
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
    /// Load GGUF bytes. `gpu`: WebGPU (initialised asynchronously), else the CPU backend;
    /// `binding_cap`: bytes one storage binding may hold, below the device's own limit.
    pub async fn load_gguf(bytes: Vec<u8>, gpu: bool, context: usize, binding_cap: Option<f64>) -> Result<Runtime, JsError> {
        let file_bytes = bytes.len();
        let device = gpu::open_device(gpu, binding_cap.map(|c| c as u64)).await?.device;
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
        self.tok.chat_tokens(user).map_err(js_err)
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
        check_room(&self.cache, input.len())?;
        let embeds = self.model.embed.lookup(&input, &self.device);
        let opts = Generation { max_tokens, temperature, seed, on_piece, should_stop };
        self.history.truncate(self.cache.len);
        stream_answer(&self.model, &self.tok, &mut self.cache, &mut self.history, &input, embeds, opts).await
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

    /// Row bands of the output head (more than one when it exceeds the binding cap).
    pub fn head_bands(&self) -> usize {
        match &self.model.lm_head {
            vidllm_models::quant_linear::QuantLinear::Blocks(m) => m.bands(),
            vidllm_models::quant_linear::QuantLinear::Dense(b) => b.len(),
        }
    }
}
