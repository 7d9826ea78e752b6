//! A video-language model in the page (Video-LLaVA, PLLaVA or LLaVA-NeXT-Video, by the
//! folder's `config.json`): frames in, visual tokens kept for follow-up questions, a
//! streamed answer out.
//!
//! Frames reach the device one of two ways: on WebGPU, straight from the browser's
//! decoder into a texture (`begin_frames` / `add_frame` / `encode_video`); on the CPU
//! backend, as RGBA bytes read from a canvas (`encode_video_rgba`).

use std::collections::VecDeque;
use std::rc::Rc;

use burn::tensor::{Int, Tensor};
use vidllm_core::gguf::Gguf;
use vidllm_core::preprocess::PreprocessConfig;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_models::layers::TowerWeights;
use vidllm_models::live_window::LiveWindow;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::mmproj::{Mmproj, load_pair};
use vidllm_models::model_files::{Folder, ModelFiles};
use vidllm_models::token_budget::{Budget, Reduce, ReductionReport};
use vidllm_models::video_model::{LoadOptions, VideoModel};
use vidllm_models::{Conversation, KvChoice, Model, Prompt};
use vidllm_shaders::preprocess::{preprocess_planes, rgb_planes, unpack_rgba_words};
use wasm_bindgen::prelude::*;

use crate::gpu::{FrameTexture, Opened, open_device};
use crate::{gen_err, js_err, kv_type, params, stream_to_js};

/// The last video's frames as they reached the device, kept so a page can show or check them.
// One value a video: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Frames {
    Words { words: Tensor<3, Int>, width: usize },
    Rgb { rgb: Vec<u8> },
}

#[wasm_bindgen]
pub struct VideoRuntime {
    conv: Conversation,
    pre: PreprocessConfig,
    /// The model's own frame sampling (its processor's).
    sampling: Sampling,
    opened: Opened,
    gathering: Option<FrameTexture>,
    frames: Option<Frames>,
    /// The visual-token budget the next video is encoded under.
    budget: Option<Budget>,
    /// What the budget did to the last video (FrameFusion's part once asked about).
    reduction: Option<ReductionReport>,
    /// A live video's rolling window, with each frame as it reached the device.
    live: Option<Live>,
}

/// A live video: the window of encoded frames, their pixels as the device received them
/// (for read-back), and the last question's window: its frames' pixels and report (JSON).
struct Live {
    window: LiveWindow,
    frames: VecDeque<Rc<Frames>>,
    asked: Vec<Rc<Frames>>,
    report: Option<String>,
}

impl VideoRuntime {
    fn of(folder: Folder, opened: Opened, context: usize, kv: KvChoice) -> Result<Self, JsError> {
        let mut conv = Conversation::new(Rc::new(Model::Video(folder.model)), Rc::new(folder.tok), context);
        conv.set_kv(kv).map_err(js_err)?;
        Ok(VideoRuntime {
            conv,
            pre: folder.pre,
            sampling: folder.sampling,
            opened,
            gathering: None,
            frames: None,
            budget: None,
            reduction: None,
            live: None,
        })
    }
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
    /// A model folder's files, already fetched or picked: names and contents (the
    /// config files of `folder_files()` that exist, and the safetensors shards). Read by
    /// the same loader as native folders. (Positional, as js/vidllm.js's `loadFolder` calls
    /// it: the options object is unpacked there.)
    #[allow(clippy::too_many_arguments)]
    pub async fn load(
        names: Vec<String>,
        files: Vec<js_sys::Uint8Array>,
        gpu: bool,
        context: usize,
        binding_cap: Option<f64>,
        lora_alpha: Option<f32>,
        vision_quant: Option<String>,
        kv: Option<String>,
    ) -> Result<VideoRuntime, JsError> {
        let kv = kv_type(kv)?;
        let tower = match vision_quant {
            None => TowerWeights::F32,
            Some(q) => q.parse::<TowerWeights>().map_err(|e| JsError::new(&format!("visionQuant: {e}")))?,
        };
        let files = ModelFiles::Memory(names.into_iter().zip(files).map(|(n, b)| (n, b.to_vec())).collect());
        if let Some(config) = files.text("config.json").map_err(js_err)? {
            VideoModel::registration(&config).map_err(js_err)?;
        }
        let opened = open_device(gpu, binding_cap.map(|c| c as u64)).await?;
        let opts = LoadOptions { quant: QuantChoice::Q4_1, tower, lora_alpha, ..Default::default() };
        let folder = files.load(opts, &opened.placement()).map_err(js_err)?;
        Self::of(folder, opened, context, kv)
    }

    /// llama.cpp's pair, already fetched or picked: a text GGUF and its `mmproj` GGUF
    /// (as `convert_hf_to_gguf.py` and `--mmproj` write them). Read by the same loader as
    /// `vidllm-native ask --mmproj`.
    pub async fn load_gguf_pair(
        text: js_sys::Uint8Array,
        mmproj: js_sys::Uint8Array,
        gpu: bool,
        context: usize,
        binding_cap: Option<f64>,
        kv: Option<String>,
    ) -> Result<VideoRuntime, JsError> {
        let kv = kv_type(kv)?;
        let mm = Gguf::from_bytes(mmproj.to_vec()).map_err(|e| js_err(format!("mmproj: {e}")))?;
        Mmproj::read(&mm).map_err(js_err)?;
        let text = Gguf::from_bytes(text.to_vec()).map_err(js_err)?;
        let opened = open_device(gpu, binding_cap.map(|c| c as u64)).await?;
        let folder = load_pair(&text, &mm, &opened.placement()).map_err(js_err)?;
        Self::of(folder, opened, context, kv)
    }

    fn model(&self) -> &VideoModel {
        self.conv.model().video().expect("a video-language model")
    }

    pub fn architecture(&self) -> String {
        self.model().model_type().into()
    }

    /// The model's own frame sampling: the policy's name (`hf`; `smolvlm` for SmolVLM2)...
    pub fn default_sampling(&self) -> String {
        self.sampling.name().into()
    }

    /// ...its rate, for a rate-based policy (else 1)...
    pub fn default_fps(&self) -> f64 {
        self.sampling.fps().unwrap_or(1.0)
    }

    /// ...and the frames it takes (the most, for a rate-based one).
    pub fn default_frames(&self) -> usize {
        self.sampling.frames()
    }

    pub fn supports_images(&self) -> bool {
        self.model().supports_images()
    }

    /// Whether the model takes a video (Idefics3 takes still images only).
    pub fn supports_video(&self) -> bool {
        self.model().supports_video()
    }

    /// Whether frames can go straight to the GPU (`begin_frames`); else use `*_rgba`.
    pub fn gpu_frames(&self) -> bool {
        self.opened.wgpu.is_some()
    }

    pub fn weights_device_bytes(&self) -> usize {
        self.model().decoder().weights_device_bytes()
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

    /// Encode the gathered frames as the video, taken at `times` (seconds) of a video
    /// `duration` seconds long; a new conversation starts. Returns the number of visual
    /// tokens.
    pub async fn encode_video(&mut self, times: Vec<f64>, duration: f64) -> Result<usize, JsError> {
        let (planes, words, width) = self.gathered_planes()?;
        self.frames = Some(Frames::Words { words, width });
        self.set_video(planes, times, duration).await
    }

    /// Encode `t` RGBA frames of `h` x `w` (packed, frame after frame) as the video.
    pub async fn encode_video_rgba(
        &mut self,
        rgba: Vec<u8>,
        t: usize,
        h: usize,
        w: usize,
        times: Vec<f64>,
        duration: f64,
    ) -> Result<usize, JsError> {
        let rgb = rgb_of(&rgba, t, h, w)?;
        let frames: Vec<&[u8]> = rgb.chunks_exact(h * w * 3).collect();
        let planes = rgb_planes(&frames, h, w, &self.opened.device);
        self.frames = Some(Frames::Rgb { rgb });
        self.set_video(planes, times, duration).await
    }

    async fn set_video(&mut self, planes: Tensor<4>, times: Vec<f64>, duration: f64) -> Result<usize, JsError> {
        let t = planes.dims()[0];
        if !self.model().supports_video() {
            return Err(js_err(format!("{} takes still images only, not a video", self.model().model_type())));
        }
        if times.len() != t || !times.iter().chain([&duration]).all(|x| x.is_finite() && *x >= 0.0) {
            return Err(js_err(format!("{t} frames need {t} finite frame times (got {}) and a finite duration", times.len())));
        }
        let e = self.model().encode_video_async(preprocess_planes(planes, &self.pre), self.budget.as_ref()).await.map_err(js_err)?;
        self.reduction = e.reduction.clone();
        let n = e.visual.features.dims()[0];
        self.conv.set_video(e.visual.clone(), e.times(&FrameTimes { times, duration }));
        Ok(n)
    }

    /// Add the gathered frame (one) as a still image, asked about with the next first question.
    pub fn encode_image(&mut self) -> Result<(), JsValue> {
        let (planes, _, _) = self.gathered_planes()?;
        self.add_image(planes)
    }

    pub fn encode_image_rgba(&mut self, rgba: Vec<u8>, h: usize, w: usize) -> Result<(), JsValue> {
        let rgb = rgb_of(&rgba, 1, h, w)?;
        self.add_image(rgb_planes(&[&rgb], h, w, &self.opened.device))
    }

    fn add_image(&mut self, planes: Tensor<4>) -> Result<(), JsValue> {
        // The model's processor prepares it (resize and crop, or tiles).
        self.conv.add_image(planes).map_err(gen_err)
    }

    /// Encode the next videos under a visual-token budget: at most `max_visual_tokens`
    /// (none: no budget), reduced by `reduce` (`none` refuses a larger video, `slowfast`,
    /// `maxinfo`, `fastvid`, `framefusion`), `frames` being the frames
    /// asked for (MaxInfo keeps at most those of its candidates).
    pub fn set_budget(&mut self, max_visual_tokens: Option<usize>, reduce: Option<String>, frames: usize) -> Result<(), JsError> {
        self.budget = match max_visual_tokens {
            None => None,
            Some(max) => {
                let reduce: Reduce = reduce.as_deref().unwrap_or("none").parse().map_err(js_err)?;
                Some(Budget::new(max, reduce, frames).map_err(js_err)?)
            }
        };
        Ok(())
    }

    /// What the budget did to the last video: JSON (`method`, `tokens_before`,
    /// `tokens_after`, `frames_before`, `frames_after`, `reduce_ms`, `note`), or none.
    pub fn last_reduction(&self) -> Option<String> {
        self.reduction.as_ref().map(|r| serde_json::to_string(r).expect("a report serialises"))
    }

    /// Forget the video, the images and the conversation.
    pub fn clear_visuals(&mut self) {
        self.frames = None;
        self.conv.clear_visuals();
    }

    /// Start a new conversation about the same video (its encoding is kept).
    pub fn reset_conversation(&mut self) {
        self.conv.reset();
    }

    /// The last video's frames as the device received them: RGB bytes, frame after frame.
    pub async fn frames_rgb(&self) -> Result<Vec<u8>, JsError> {
        match &self.frames {
            None => Err(js_err("no video was encoded")),
            Some(f) => rgb_of_frames(f).await,
        }
    }

    /// Start a live video: a rolling window of the newest `window` frames, each encoded
    /// when it arrives where the model encodes frames alone (the window's visual-token
    /// budget is the one `set_budget` gave).
    pub fn live_begin(&mut self, window: usize) -> Result<(), JsError> {
        if !self.model().supports_video() {
            return Err(js_err(format!("{} takes still images only, not a video", self.model().model_type())));
        }
        self.live =
            Some(Live { window: LiveWindow::new(window).map_err(js_err)?, frames: VecDeque::new(), asked: Vec::new(), report: None });
        Ok(())
    }

    /// Add the picture `source` shows now as the live video's frame number `index`, taken
    /// at `time` seconds of the stream (on WebGPU: straight into a texture).
    pub fn live_add_frame(&mut self, source: JsValue, index: f64, time: f64) -> Result<(), JsError> {
        let [w, h] = frame_size(&source)?;
        self.begin_frames(1, w, h)?;
        self.add_frame(source)?;
        let (planes, words, width) = self.gathered_planes()?;
        self.live_push(planes, Frames::Words { words, width }, index, time)
    }

    /// `live_add_frame` on the CPU backend: one RGBA frame of `h` x `w`.
    pub fn live_add_frame_rgba(&mut self, rgba: Vec<u8>, h: usize, w: usize, index: f64, time: f64) -> Result<(), JsError> {
        let rgb = rgb_of(&rgba, 1, h, w)?;
        let planes = rgb_planes(&[&rgb], h, w, &self.opened.device);
        self.live_push(planes, Frames::Rgb { rgb }, index, time)
    }

    fn live_push(&mut self, planes: Tensor<4>, held: Frames, index: f64, time: f64) -> Result<(), JsError> {
        if !(index.is_finite() && index >= 0.0 && time.is_finite() && time >= 0.0) {
            return Err(js_err(format!("a live frame needs a frame number and a time (got {index}, {time})")));
        }
        let pixels = preprocess_planes(planes, &self.pre);
        let model = self.conv.model().video().expect("a video-language model");
        let live = self.live.as_mut().ok_or_else(|| js_err("no live video: call live_begin first"))?;
        live.window.push(model, pixels, index as u64, time);
        live.frames.push_back(Rc::new(held));
        while live.frames.len() > live.window.len() {
            live.frames.pop_front();
        }
        Ok(())
    }

    /// Answer `question` from the live window as it stands, in a new conversation.
    #[allow(clippy::too_many_arguments)]
    pub async fn live_ask(
        &mut self,
        question: String,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsValue> {
        let model = self.conv.model().video().expect("a video-language model");
        let live = self.live.as_mut().ok_or_else(|| js_err("no live video: call live_begin first"))?;
        let v = live.window.video(model, self.budget.as_ref()).map_err(gen_err)?;
        live.asked = live.frames.iter().cloned().collect();
        let frames: Vec<_> = v.seen().map(|(index, time)| serde_json::json!({"index": index, "time": time})).collect();
        let mut report = serde_json::json!({"frames": frames, "frame_encodes": live.window.frame_encodes(),
                                            "encoded_at_question": v.encoded_now, "reduction": v.encoded.reduction,
                                            "visual_tokens": v.encoded.visual.features.dims()[0]});
        live.report = Some(report.to_string());
        let mut reduction = v.encoded.reduction.clone();
        self.frames = None;
        self.conv.clear_visuals();
        self.conv.set_video(v.encoded.visual, v.times);
        self.conv.ask(Prompt::Question(&question), params(max_tokens, temperature, seed)).map_err(gen_err)?;
        let (tokens, fusion) = stream_to_js(&mut self.conv, on_piece, should_stop).await?;
        // FrameFusion's count is known once the prefill ran.
        if let (Some(r), Some(fusion), Some(live)) = (reduction.as_mut(), &fusion, self.live.as_mut()) {
            r.after_prefill(fusion);
            report["reduction"] = serde_json::json!(r);
            live.report = Some(report.to_string());
        }
        Ok(tokens)
    }

    /// What the last live question's window was (JSON: `frames`, `frame_encodes`,
    /// `encoded_at_question`, `reduction`, `visual_tokens`), or none.
    pub fn live_report(&self) -> Option<String> {
        self.live.as_ref().and_then(|l| l.report.clone())
    }

    /// The frames of the last live question's window as the device received them: RGB
    /// bytes, frame after frame.
    pub async fn live_frames_rgb(&self) -> Result<Vec<u8>, JsError> {
        let live = self.live.as_ref().ok_or_else(|| js_err("no live video"))?;
        if live.asked.is_empty() {
            return Err(js_err("no question was asked about the live video yet"));
        }
        let mut rgb = Vec::new();
        for f in &live.asked {
            rgb.extend(rgb_of_frames(f).await?);
        }
        Ok(rgb)
    }

    /// Stop the live video (its window is freed).
    pub fn live_end(&mut self) {
        self.live = None;
    }

    /// Answer `question`: the first question of a conversation carries the video (and
    /// images); later ones continue it, the video already in the KV cache.
    pub async fn ask(
        &mut self,
        question: String,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsValue> {
        self.conv.ask(Prompt::Question(&question), params(max_tokens, temperature, seed)).map_err(gen_err)?;
        let (tokens, fusion) = stream_to_js(&mut self.conv, on_piece, should_stop).await?;
        // FrameFusion's count is known once the prefill ran.
        if let (Some(r), Some(fusion)) = (self.reduction.as_mut(), &fusion) {
            r.after_prefill(fusion);
        }
        Ok(tokens)
    }
}

/// Frames as the device received them, read back: RGB bytes, frame after frame.
async fn rgb_of_frames(frames: &Frames) -> Result<Vec<u8>, JsError> {
    match frames {
        Frames::Rgb { rgb } => Ok(rgb.clone()),
        Frames::Words { words, width } => {
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

/// The size of a frame source (`ImageBitmap`, `VideoFrame`, `<video>`, canvas, ...).
fn frame_size(source: &JsValue) -> Result<[u32; 2], JsError> {
    let get = |names: [&str; 3]| {
        names.iter().find_map(|n| js_sys::Reflect::get(source, &JsValue::from_str(n)).ok().and_then(|v| v.as_f64()).filter(|v| *v > 0.0))
    };
    match (get(["displayWidth", "videoWidth", "width"]), get(["displayHeight", "videoHeight", "height"])) {
        (Some(w), Some(h)) => Ok([w as u32, h as u32]),
        _ => Err(js_err("a live frame's source has no size")),
    }
}
