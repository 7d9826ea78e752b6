//! A video-language model in the page (Video-LLaVA, PLLaVA or LLaVA-NeXT-Video, by the
//! folder's `config.json`): frames in, visual tokens kept for follow-up questions, a
//! streamed answer out.
//!
//! Frames reach the device one of two ways: on WebGPU, straight from the browser's
//! decoder into a texture (`begin_frames` / `add_frame` / `encode_video`); on the CPU
//! backend, as RGBA bytes read from a canvas (`encode_video_rgba`).

use burn::tensor::{Int, Tensor};
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::KvCache;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::{Visual, merge_embeddings};
use vidllm_models::video_model::{Arch, LoadOptions, VideoModel};
use vidllm_shaders::preprocess::{preprocess_planes, rgb_planes, unpack_rgba_words};
use wasm_bindgen::prelude::*;

use crate::gpu::{FrameTexture, Opened, open_device};
use crate::{Generation, js_err, stream_answer};

/// The last video's frames as they reached the device, kept so a page can show or check them.
enum Frames {
    Words { words: Tensor<3, Int>, width: usize },
    Rgb { rgb: Vec<u8> },
}

#[wasm_bindgen]
pub struct VideoRuntime {
    model: VideoModel,
    arch: Arch,
    tok: Tokenizer,
    pre: PreprocessConfig,
    opened: Opened,
    gathering: Option<FrameTexture>,
    video: Option<Visual>,
    frames: Option<Frames>,
    /// Pixel batches of still images (Video-LLaVA), encoded with the first question.
    images: Vec<Tensor<4>>,
    cache: KvCache,
    /// Tokens whose keys and values are in the cache, plus the last sampled one.
    history: Vec<u32>,
}

/// `t` RGBA frames of `h` x `w` (packed, frame after frame), alpha dropped.
fn rgb_of(rgba: &[u8], t: usize, h: usize, w: usize) -> Result<Vec<u8>, JsError> {
    if t == 0 || rgba.len() != t * h * w * 4 {
        return Err(js_err(format!("expected {t} frames of {w}x{h} RGBA ({} bytes), got {} bytes", t * h * w * 4, rgba.len())));
    }
    Ok(rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect())
}

#[wasm_bindgen]
impl VideoRuntime {
    /// A model folder's files, already fetched: `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` and `preprocessor_config.json` (texts, the last two
    /// optional) and the safetensors shards as `(name, bytes)` pairs.
    #[allow(clippy::too_many_arguments)]
    pub async fn load(
        config: String,
        tokenizer: String,
        tokenizer_config: Option<String>,
        preprocessor: Option<String>,
        shard_names: Vec<String>,
        shards: Vec<js_sys::Uint8Array>,
        gpu: bool,
        context: usize,
        binding_cap: Option<f64>,
        lora_alpha: Option<f32>,
    ) -> Result<VideoRuntime, JsError> {
        let arch = Arch::of_config(&config).map_err(js_err)?;
        let opened = open_device(gpu, binding_cap.map(|c| c as u64)).await?;
        let buffers = shard_names.into_iter().zip(shards).map(|(n, b)| (n, b.to_vec())).collect();
        let ck = Checkpoint::from_buffers(buffers).map_err(js_err)?;
        let opts = LoadOptions { quant: QuantChoice::Q4_1, lora_alpha, pool: None };
        let model = VideoModel::from_checkpoint(&config, &ck, opts, &opened.device).map_err(js_err)?;
        drop(ck);
        let tok = Tokenizer::from_hf_json(&tokenizer, tokenizer_config.as_deref()).map_err(js_err)?;
        let json: PreprocessorJson = match preprocessor {
            Some(p) => serde_json::from_str(&p).map_err(|e| js_err(format!("preprocessor_config.json: {e}")))?,
            None => PreprocessorJson::default(),
        };
        let pre = json.resolve(&PreprocessConfig::clip(model.image_size())).map_err(js_err)?;
        let context = context.clamp(2, model.decoder().rope_positions());
        let cache = KvCache::new(&model.decoder().cfg, context, &opened.device);
        Ok(VideoRuntime {
            model,
            arch,
            tok,
            pre,
            opened,
            gathering: None,
            video: None,
            frames: None,
            images: Vec::new(),
            cache,
            history: Vec::new(),
        })
    }

    pub fn architecture(&self) -> String {
        match self.arch {
            Arch::VideoLlava => "video_llava",
            Arch::Pllava => "pllava",
            Arch::LlavaNextVideo => "llava_next_video",
        }
        .into()
    }

    /// Frames the model expects per video.
    pub fn default_frames(&self) -> usize {
        self.model.default_frames()
    }

    pub fn supports_images(&self) -> bool {
        self.model.supports_images()
    }

    /// Whether frames can go straight to the GPU (`begin_frames`); else use `*_rgba`.
    pub fn gpu_frames(&self) -> bool {
        self.opened.wgpu.is_some()
    }

    pub fn weights_device_bytes(&self) -> usize {
        self.model.decoder().weights_device_bytes()
    }

    /// Start gathering `n` frames of `width` x `height` on the GPU.
    pub fn begin_frames(&mut self, n: u32, width: u32, height: u32) -> Result<(), JsError> {
        let (device, _) =
            self.opened.wgpu.as_ref().ok_or_else(|| js_err("frames go to the GPU only on WebGPU; give RGBA bytes on the CPU"))?;
        self.gathering = Some(FrameTexture::new(device, n, width, height)?);
        Ok(())
    }

    /// Copy the picture `source` shows now (an `ImageBitmap`, `VideoFrame`, `<video>`,
    /// `<img>`, canvas or `ImageData`) into the next frame slot, on the GPU.
    pub fn add_frame(&mut self, source: JsValue) -> Result<(), JsError> {
        let (_, queue) = self.opened.wgpu.as_ref().ok_or_else(|| js_err("no WebGPU device"))?;
        let g = self.gathering.as_mut().ok_or_else(|| js_err("call begin_frames first"))?;
        g.push(queue, source)
    }

    /// The gathered frames as pixel planes on the device `[t, 3, h, w]`, kept for read-back.
    fn gathered_planes(&mut self) -> Result<(Tensor<4>, Tensor<3, Int>, usize), JsError> {
        let g = self.gathering.take().ok_or_else(|| js_err("no frames were given (begin_frames, add_frame)"))?;
        let (device, queue) = self.opened.wgpu.as_ref().ok_or_else(|| js_err("no WebGPU device"))?;
        let width = g.width as usize;
        let words = g.into_words(device, queue, &self.opened.device)?;
        Ok((unpack_rgba_words(words.clone(), width), words, width))
    }

    /// Encode the gathered frames as the video; a new conversation starts. Returns the
    /// number of visual tokens.
    pub fn encode_video(&mut self) -> Result<usize, JsError> {
        let (planes, words, width) = self.gathered_planes()?;
        self.frames = Some(Frames::Words { words, width });
        Ok(self.set_video(planes))
    }

    /// Encode `t` RGBA frames of `h` x `w` (packed, frame after frame) as the video.
    pub fn encode_video_rgba(&mut self, rgba: Vec<u8>, t: usize, h: usize, w: usize) -> Result<usize, JsError> {
        let rgb = rgb_of(&rgba, t, h, w)?;
        let frames: Vec<&[u8]> = rgb.chunks_exact(h * w * 3).collect();
        let planes = rgb_planes(&frames, h, w, &self.opened.device);
        self.frames = Some(Frames::Rgb { rgb });
        Ok(self.set_video(planes))
    }

    fn set_video(&mut self, planes: Tensor<4>) -> usize {
        let visual = self.model.video(preprocess_planes(planes, &self.pre));
        let n = visual.per_placeholder;
        self.video = Some(visual);
        self.reset_conversation();
        n
    }

    /// Add the gathered frame (one) as a still image, asked about with the next first question.
    pub fn encode_image(&mut self) -> Result<(), JsError> {
        let (planes, _, _) = self.gathered_planes()?;
        self.add_image(planes)
    }

    pub fn encode_image_rgba(&mut self, rgba: Vec<u8>, h: usize, w: usize) -> Result<(), JsError> {
        let rgb = rgb_of(&rgba, 1, h, w)?;
        self.add_image(rgb_planes(&[&rgb], h, w, &self.opened.device))
    }

    fn add_image(&mut self, planes: Tensor<4>) -> Result<(), JsError> {
        if !self.model.supports_images() {
            return Err(js_err(format!("images are supported for Video-LLaVA folders, not {}", self.architecture())));
        }
        self.images.push(preprocess_planes(planes, &self.pre));
        self.reset_conversation();
        Ok(())
    }

    /// Forget the video, the images and the conversation.
    pub fn clear_visuals(&mut self) {
        self.video = None;
        self.frames = None;
        self.images.clear();
        self.reset_conversation();
    }

    /// Start a new conversation about the same video (its encoding is kept).
    pub fn reset_conversation(&mut self) {
        self.cache.truncate(0);
        self.history.clear();
    }

    /// The last video's frames as the device received them: RGB bytes, frame after frame.
    pub async fn frames_rgb(&self) -> Result<Vec<u8>, JsError> {
        match &self.frames {
            None => Err(js_err("no video was encoded")),
            Some(Frames::Rgb { rgb }) => Ok(rgb.clone()),
            Some(Frames::Words { words, width }) => {
                let [t, h, row] = words.dims();
                let data = words.clone().into_data_async().await.map_err(|e| js_err(format!("device: {e:?}")))?;
                let v = data.try_into_vec::<u32>().map_err(|e| js_err(format!("device: {e:?}")))?;
                let mut rgb = Vec::with_capacity(t * h * width * 3);
                for r in v.chunks_exact(row) {
                    rgb.extend(r[..*width].iter().flat_map(|p| [*p as u8, (p >> 8) as u8, (p >> 16) as u8]));
                }
                Ok(rgb)
            }
        }
    }

    /// Answer `question`: the first question of a conversation carries the video (and
    /// images); later ones continue it, the video already in the KV cache.
    #[allow(clippy::too_many_arguments)]
    pub async fn ask(
        &mut self,
        question: String,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsError> {
        let (input, embeds) = if self.history.is_empty() {
            self.first_turn(&question)?
        } else {
            let turn = self.tok.encode(&VideoModel::follow_up(&self.tok, &question), false).map_err(js_err)?;
            let input = [&self.history[self.cache.len..], turn.as_slice()].concat();
            let embeds = self.model.decoder().embed.lookup(&input, &self.opened.device);
            (input, embeds)
        };
        crate::check_room(&self.cache, input.len())?;
        self.history.truncate(self.cache.len);
        let opts = Generation { max_tokens, temperature, seed, on_piece, should_stop };
        stream_answer(self.model.decoder(), &self.tok, &mut self.cache, &mut self.history, &input, embeds, opts).await
    }

    fn first_turn(&self, question: &str) -> Result<(Vec<u32>, Tensor<2>), JsError> {
        let mut visuals: Vec<Visual> = self.model.images(self.images.clone()).map_err(js_err)?.into_iter().collect();
        let text = match &self.video {
            Some(v) => {
                visuals.push(v.clone());
                self.model.first_turn(question, self.images.len())
            }
            None if !self.images.is_empty() => VideoModel::image_turn(question, self.images.len()),
            None => return Err(js_err("give a video (or an image) before asking")),
        };
        let ids = VideoModel::prompt_ids(&self.tok, &text, &visuals).map_err(js_err)?;
        let embeds = merge_embeddings(self.model.decoder(), &ids, &visuals).map_err(js_err)?;
        Ok((ids, embeds))
    }
}
