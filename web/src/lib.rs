//! vidllm in the browser: load a GGUF decoder onto WebGPU and stream its answer.
//!
//! Browsers forbid blocking on the GPU, so every read-back here is `into_data_async`;
//! the model graph and the 4-bit kernels are the native ones, compiled to WGSL.

use burn::tensor::{Device, Tensor};
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::{Sampler, SamplerConfig};
use vidllm_core::stream::TextStream;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson};
use vidllm_core::safetensors::Checkpoint;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::{Visual, expand_placeholders, merge_embeddings};
use vidllm_models::video_llava::{VideoLlava, VideoLlavaConfigJson};
use vidllm_models::{KvCache, Llama, Logits, load_llama};
use vidllm_shaders::preprocess::preprocess;
use wasm_bindgen::prelude::*;

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn callback_err(e: JsValue) -> JsError {
    js_err(format!("callback failed: {e:?}"))
}

/// WebGPU (initialised asynchronously, as browsers require) or the CPU backend.
async fn open_device(gpu: bool) -> Result<Device, JsError> {
    if gpu {
        Device::wgpu_options().init_async().await.map_err(|e| js_err(format!("WebGPU: {e}")))
    } else {
        Ok(Device::flex())
    }
}

async fn read_row(t: Tensor<2>) -> Result<Vec<f32>, JsError> {
    let data = t.into_data_async().await.map_err(|e| js_err(format!("device: {e:?}")))?;
    data.try_into_vec::<f32>().map_err(|e| js_err(format!("device: {e:?}")))
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
    if cache.len + input.len() + 1 > cache.capacity {
        return Err(js_err(format!("prompt has {} tokens but the context holds {}", cache.len + input.len(), cache.capacity)));
    }
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
    /// Load GGUF bytes. `gpu`: WebGPU (initialised asynchronously), else the CPU backend.
    pub async fn load_gguf(bytes: Vec<u8>, gpu: bool, context: usize) -> Result<Runtime, JsError> {
        let file_bytes = bytes.len();
        let device = open_device(gpu).await?;
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
}

/// A Video-LLaVA model in the browser: frames in, a streamed answer out.
#[wasm_bindgen]
pub struct VideoRuntime {
    model: VideoLlava,
    tok: Tokenizer,
    pre: PreprocessConfig,
    device: Device,
}

#[wasm_bindgen]
impl VideoRuntime {
    /// A Video-LLaVA folder's files, already fetched: `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` and `preprocessor_config.json` (texts, the last two
    /// optional) and `model.safetensors` (bytes).
    pub async fn load(
        config: String,
        tokenizer: String,
        tokenizer_config: Option<String>,
        preprocessor: Option<String>,
        weights: Vec<u8>,
        gpu: bool,
    ) -> Result<VideoRuntime, JsError> {
        let device = open_device(gpu).await?;
        let cfg: VideoLlavaConfigJson = serde_json::from_str(&config).map_err(|e| js_err(format!("config.json: {e}")))?;
        let ck = Checkpoint::from_buffers(vec![("model.safetensors".into(), weights)]).map_err(js_err)?;
        let model = VideoLlava::from_checkpoint(&ck, &cfg, QuantChoice::Q4_1, &device).map_err(js_err)?;
        let tok = Tokenizer::from_hf_json(&tokenizer, tokenizer_config.as_deref()).map_err(js_err)?;
        let json: PreprocessorJson = match preprocessor {
            Some(p) => serde_json::from_str(&p).map_err(|e| js_err(format!("preprocessor_config.json: {e}")))?,
            None => PreprocessorJson::default(),
        };
        let pre = json.resolve(&PreprocessConfig::clip(model.video_tower.cfg.image_size)).map_err(js_err)?;
        Ok(VideoRuntime { model, tok, pre, device })
    }

    /// Tokens `frames` frames become.
    pub fn visual_tokens(&self, frames: usize) -> usize {
        self.model.video_tokens(frames)
    }

    /// Answer `question` about `t` RGBA frames of `h` x `w` (packed, frame after frame).
    #[allow(clippy::too_many_arguments)]
    pub async fn ask(
        &self,
        rgba: Vec<u8>,
        t: usize,
        h: usize,
        w: usize,
        question: String,
        max_tokens: usize,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsError> {
        if t == 0 || rgba.len() != t * h * w * 4 {
            return Err(js_err(format!("expected {t} frames of {w}x{h} RGBA ({} bytes), got {} bytes", t * h * w * 4, rgba.len())));
        }
        let rgb: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        let frames: Vec<&[u8]> = rgb.chunks_exact(h * w * 3).collect();
        let pixels = preprocess(&frames, h, w, &self.pre, &self.device);
        let features = self.model.video_features(pixels);
        let visual = [Visual { token: self.model.visual.video_token, features, per_placeholder: self.model.video_tokens(t) }];
        let text = VideoLlava::conversation(&question, 0);
        let ids = expand_placeholders(&self.tok.encode(&text, self.tok.add_bos).map_err(js_err)?, self.model.visual.video_token, self.model.video_tokens(t));
        let embeds = merge_embeddings(&self.model.decoder, &ids, &visual).map_err(js_err)?;
        let mut cache = KvCache::new(&self.model.decoder.cfg, (ids.len() + max_tokens + 1).min(self.model.decoder.rope_positions()), &self.device);
        let mut history = Vec::new();
        let opts = Generation { max_tokens, temperature: 0.0, seed: 0, on_piece, should_stop };
        stream_answer(&self.model.decoder, &self.tok, &mut cache, &mut history, &ids, embeds, opts).await
    }
}
