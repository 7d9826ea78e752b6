//! MERV (Chung et al. 2025, "Unifying Specialized Visual Encoders for Video Language
//! Models"); reference: github.com/princetonvisualai/merv (`merv/models/vidlms/merv.py`).
//!
//! Four frozen video encoders see the same clip, each prepared its own way:
//! LanguageBind's video tower (`languagebind.rs`), DINOv2 with registers (`dinov2.rs`),
//! ViViT (`vivit.rs`) and SigLIP (`siglip.rs`). One decode of 32 frames
//! (`np.linspace(0, N - 1, 32)`) serves all of them: ViViT takes the 32, the others every
//! second frame (16). Each encoder's features are pooled to 16 x 8 x 8 and projected to the
//! decoder's width, and one learned query mixes the four sequences into 1,024 visual
//! tokens (`merv_fusion.rs`). They go right after BOS, before `In: {question}\nOut:`, and a
//! LLaMA-2 decoder answers. The mixing weights are kept for the answer's report
//! (`Architecture::encoder_weights`). An image is a clip of 32 copies of it, as MERV feeds one.
//!
//! Where the runtime departs from MERV's code: MERV's LanguageBind transform ends in a
//! random horizontal flip (p = 0.5) that stays on at inference; the runtime never flips,
//! so its answers are deterministic (MERV's own are not).
//!
//! Folder format (written by `tools/merv_convert.py` from MERV's released checkpoint and
//! the encoders' own releases; tests/fixtures/gen_merv_fixtures.py writes a tiny one):
//! - `config.json`: `model_type: "merv"`, `num_frames` (32), `pool` (`[16, 8, 8]`),
//!   `prompt` (`"In: {msg}\nOut:"`), `text_config` (LLaMA), optionally
//!   `video_token_index` (the id that stands for the visual tokens in the prompt's ids;
//!   by default the last, padding, row of the embedding table), and `encoders`, in
//!   fusion order, each `{name, model_type, config, feature_layer, frames, drop_prefix,
//!   preprocess}`:
//!   - `model_type` one of `languagebind_video`, `dinov2_with_registers`, `vivit`,
//!     `siglip_vision_model`, and `config` that encoder's own Hugging Face config
//!     (DINOv2's position table is resampled from its `image_size` to the frames' size);
//!   - `feature_layer`: the `hidden_states` index features are taken at (negative from
//!     the end), or `"last"` for `last_hidden_state`;
//!   - `frames`: 16 or 32 of the clip's 32; `drop_prefix`: leading tokens dropped (class
//!     token, registers);
//!   - `preprocess`: `{backend: "pil_uint8" | "torch_float", resize: "shortest_edge" |
//!     "squash", size, crop, interpolation: "bilinear" | "bicubic", antialias, rescale,
//!     mean, std}` (see [`Prep`]).
//! - `model.safetensors`: `encoders.{name}.*` (each encoder under its own release's key
//!   names), `projectors.{name}.{weight,bias}`, `fusion.query` `[1, E]`,
//!   `fusion.{q_proj,k_proj}.{weight,bias}`, and `language_model.model.*` /
//!   `language_model.lm_head.weight`.
//! - the LLaMA tokenizer files.

use std::cell::RefCell;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson, Resample, Resize, resample_weights};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_core::{GenerateError, LoadError};
use vidllm_shaders::device::Placement;
use vidllm_shaders::preprocess::{normalise_planes, preprocess_planes};

use crate::clip::{ClipVisionConfig, ClipVisionConfigJson};
use crate::dinov2::{Dinov2ConfigJson, Dinov2Tower};
use crate::fastvid::tower_salience;
use crate::languagebind::{LanguageBindConfigJson, LanguageBindVideoTower};
use crate::layers::TowerWeights;
use crate::llama::{Llama, LlamaConfig};
use crate::llama_hf::{LlamaConfigJson, LlamaNames, Plain, load_llama_hf};
use crate::llava::feature_layer_index;
use crate::merge::Visual;
use crate::merv_fusion::{FeatureFusion, PreFusionProjector};
use crate::siglip::{Positions, SiglipDefaults, SiglipVisionTower};
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, LoadOptions, Preprocessing, parse_config};
use crate::vivit::{VivitConfigJson, VivitTower};

#[derive(Debug, Clone, Deserialize)]
pub struct MervConfigJson {
    pub encoders: Vec<EncoderJson>,
    pub num_frames: Option<usize>,
    pub pool: Option<[usize; 3]>,
    pub video_token_index: Option<u32>,
    pub prompt: Option<String>,
    pub text_config: LlamaConfigJson,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EncoderJson {
    pub name: String,
    pub model_type: String,
    pub config: serde_json::Value,
    pub feature_layer: serde_json::Value,
    pub frames: usize,
    pub drop_prefix: Option<usize>,
    pub preprocess: PrepJson,
}

/// How MERV prepares one encoder's frames (its dataset transforms at inference).
#[derive(Debug, Clone, Deserialize)]
pub struct PrepJson {
    pub resize: String,
    pub size: usize,
    pub crop: Option<usize>,
    pub interpolation: String,
    pub antialias: bool,
    pub rescale: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// `pil_uint8` (PIL's resize on 8-bit pictures, torchvision's transforms on PIL
    /// images; the default) or `torch_float` (LanguageBind's: normalised float tensors
    /// resized by `F.interpolate`).
    pub backend: Option<String>,
}

/// How an encoder's frames are prepared.
#[derive(Debug, Clone)]
pub enum Prep {
    /// PIL-exact, through the shared preprocessing (`vidllm_shaders::preprocess`).
    Pil(PreprocessConfig),
    /// LanguageBind's video transform: `/255`, normalise, shorter side to `size` by
    /// `F.interpolate(bilinear, align_corners=False)` without antialiasing and without
    /// 8-bit rounding, then a centre crop whose offset is Python's `round` (ties to even).
    TorchFloat { size: usize, crop: usize, rescale: f32, mean: [f32; 3], std: [f32; 3] },
}

impl Prep {
    /// The side frames come out at.
    fn side(&self) -> Option<usize> {
        match self {
            Prep::Pil(c) => match (c.crop, c.resize) {
                (Some((h, w)), _) | (None, Resize::Exact(h, w)) if h == w => Some(h),
                _ => None,
            },
            Prep::TorchFloat { crop, .. } => Some(*crop),
        }
    }

    /// # Shapes
    /// - x: `[t, 3, h, w]` RGB planes 0..=255 -> `[t, 3, s, s]`
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Prep::Pil(c) => preprocess_planes(x, c),
            Prep::TorchFloat { size, crop, rescale, mean, std } => {
                let device = x.device();
                let [t, _, h, w] = x.dims();
                let norm = PreprocessConfig { rescale: *rescale, mean: *mean, std: *std, ..PreprocessConfig::clip(*size) };
                let x = normalise_planes(x, &norm);
                let (rh, rw) = norm.resized(h, w);
                let weights = |n_in: usize, n_out: usize| {
                    let m = resample_weights(n_in, n_out, 0..n_out, Resample::BilinearNoAntialias);
                    Tensor::<2>::from_data(TensorData::new(m, [n_out, n_in]), &device)
                };
                let x = x.reshape([t * 3 * h, w]).matmul(weights(w, rw).transpose()); // [t*3*h, rw]
                let x = weights(h, rh).unsqueeze::<3>().matmul(x.reshape([t * 3, h, rw])); // [t*3, rh, rw]
                let offset = |n: usize| round_half_even(n.saturating_sub(*crop) as f64 / 2.0);
                x.reshape([t, 3, rh, rw]).narrow(2, offset(rh), *crop).narrow(3, offset(rw), *crop)
            }
        }
    }
}

/// Python's `round` on a non-negative half-integer or integer: ties to even.
fn round_half_even(v: f64) -> usize {
    let f = v.floor();
    let r = if v - f == 0.5 { if (f as usize).is_multiple_of(2) { f } else { f + 1.0 } } else { v.round() };
    r as usize
}

impl PrepJson {
    fn resolve(&self) -> Result<Prep, LoadError> {
        let rescale = self.rescale.unwrap_or(1.0 / 255.0);
        let bad = || {
            LoadError::Unsupported(format!(
                "MERV preprocess: {:?} resize, {:?} interpolation, antialias {}, backend {:?}",
                self.resize, self.interpolation, self.antialias, self.backend
            ))
        };
        if self.backend.as_deref() == Some("torch_float") {
            return match (self.resize.as_str(), self.interpolation.as_str(), self.antialias, self.crop) {
                ("shortest_edge", "bilinear", false, Some(crop)) if crop <= self.size => {
                    Ok(Prep::TorchFloat { size: self.size, crop, rescale, mean: self.mean, std: self.std })
                }
                _ => Err(bad()),
            };
        }
        if !matches!(self.backend.as_deref(), None | Some("pil_uint8")) || !self.antialias {
            return Err(bad());
        }
        let resize = match self.resize.as_str() {
            "shortest_edge" => Resize::ShortestEdge(self.size),
            "squash" => Resize::Exact(self.size, self.size),
            _ => return Err(bad()),
        };
        let resample = match self.interpolation.as_str() {
            "bilinear" => Resample::Bilinear,
            "bicubic" => Resample::Bicubic,
            _ => return Err(bad()),
        };
        Ok(Prep::Pil(PreprocessConfig { resize, crop: self.crop.map(|c| (c, c)), resample, rescale, mean: self.mean, std: self.std }))
    }
}

/// One encoder's tower.
enum Tower {
    LanguageBind(Box<LanguageBindVideoTower>),
    Dinov2(Box<Dinov2Tower>),
    Vivit(Box<VivitTower>),
    Siglip(Box<SiglipVisionTower>),
}

/// An encoder with what MERV puts around it: its frames, its preprocessing, the layer its
/// features come from, and its projector.
pub struct Encoder {
    pub name: String,
    tower: Tower,
    /// Blocks run (`hidden_states[blocks]`); ViViT always runs all and its final norm.
    blocks: usize,
    /// Frames taken of the clip (every `clip / frames`-th).
    pub frames: usize,
    drop_prefix: usize,
    pub prep: Prep,
    projector: PreFusionProjector,
    /// Where its weights live and it runs (MERV's encoders may each have a device).
    pub device: Device,
}

impl Encoder {
    fn load(
        ck: &Checkpoint,
        j: &EncoderJson,
        clip: usize,
        pool: [usize; 3],
        d_text: usize,
        weights: TowerWeights,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let prefix = format!("encoders.{}.", j.name);
        let cfg = |what: &str| LoadError::Unsupported(format!("MERV encoder {} ({what}) config", j.name));
        let prep = j.preprocess.resolve()?;
        let layer = |n_layers: usize| -> Result<usize, LoadError> {
            match &j.feature_layer {
                serde_json::Value::Number(n) => feature_layer_index(n.as_i64().ok_or_else(|| cfg("feature_layer"))?, n_layers),
                serde_json::Value::String(s) if s == "last" => Ok(n_layers),
                _ => Err(cfg("feature_layer")),
            }
        };
        let side = prep.side().ok_or_else(|| LoadError::Unsupported(format!("MERV encoder {}: frames would not be square", j.name)))?;
        let (tower, blocks, d, default_prefix) = match j.model_type.as_str() {
            "languagebind_video" => {
                let c: LanguageBindConfigJson = serde_json::from_value(j.config.clone()).map_err(|_| cfg("languagebind"))?;
                let t = LanguageBindVideoTower::load(ck, &format!("{prefix}vision_model."), &c, weights, at)?;
                if !j.frames.is_multiple_of(t.group) {
                    return Err(LoadError::Unsupported(format!(
                        "MERV encoder {}: {} frames are not whole temporal groups of {}",
                        j.name, j.frames, t.group
                    )));
                }
                let (n, d) = (t.clip.cfg.n_layers, t.clip.cfg.d_model);
                (Tower::LanguageBind(Box::new(t)), layer(n)?, d, 1)
            }
            "dinov2_with_registers" => {
                let c: Dinov2ConfigJson = serde_json::from_value(j.config.clone()).map_err(|_| cfg("dinov2"))?;
                let t = Dinov2Tower::load(ck, &prefix, &c, side, weights, at)?;
                let (n, d, r) = (t.cfg.n_layers, t.cfg.d_model, t.registers);
                (Tower::Dinov2(Box::new(t)), layer(n)?, d, 1 + r)
            }
            "vivit" => {
                let c: VivitConfigJson = serde_json::from_value(j.config.clone()).map_err(|_| cfg("vivit"))?;
                let t = VivitTower::load(ck, &prefix, &c, weights, at)?;
                if j.frames != t.frames || j.feature_layer != serde_json::json!("last") {
                    return Err(LoadError::Unsupported(format!(
                        "MERV encoder {}: ViViT takes {} frames and gives its last hidden state",
                        j.name, t.frames
                    )));
                }
                let (n, d) = (t.cfg.n_layers, t.cfg.d_model);
                (Tower::Vivit(Box::new(t)), n, d, 1)
            }
            "siglip_vision_model" => {
                let c: ClipVisionConfigJson = serde_json::from_value(j.config.clone()).map_err(|_| cfg("siglip"))?;
                let vc = ClipVisionConfig { weights, ..c.resolve(&SiglipDefaults::SIGLIP)? };
                let t = SiglipVisionTower::load(ck, &format!("{prefix}vision_model."), vc, Positions::Identity, at)?;
                let (n, d) = (t.cfg.n_layers, t.cfg.d_model);
                (Tower::Siglip(Box::new(t)), layer(n)?, d, 0)
            }
            o => {
                return Err(LoadError::Unsupported(format!(
                    "MERV encoder {}: model_type {o:?} (languagebind_video, dinov2_with_registers, vivit, siglip_vision_model)",
                    j.name
                )));
            }
        };
        if j.frames == 0 || !clip.is_multiple_of(j.frames) {
            return Err(LoadError::Unsupported(format!("MERV encoder {}: {} frames of a {clip}-frame clip", j.name, j.frames)));
        }
        let projector = PreFusionProjector::load(ck, &format!("projectors.{}", j.name), pool, d, d_text, &at.device)?;
        Ok(Self {
            name: j.name.clone(),
            tower,
            blocks,
            frames: j.frames,
            drop_prefix: j.drop_prefix.unwrap_or(default_prefix),
            prep,
            projector,
            device: at.device.clone(),
        })
    }

    /// The encoder's frames of the clip, prepared its way.
    ///
    /// # Shapes
    /// - clip: `[clip, 3, h, w]` RGB planes (0..=255) -> `[frames, 3, s, s]`
    pub fn pixels(&self, clip: Tensor<4>) -> Tensor<4> {
        let t = clip.dims()[0];
        let step = t / self.frames;
        let clip = match step {
            1 => clip,
            _ => {
                let idx: Vec<i64> = (0..self.frames).map(|i| (i * step) as i64).collect();
                let device = clip.device();
                clip.select(0, Tensor::<1, Int>::from_data(TensorData::new(idx, [self.frames]), &device))
            }
        };
        self.prep.apply(clip)
    }

    /// The selected features as a frame-major grid, prefix tokens dropped.
    ///
    /// # Shapes
    /// - pixels: `[frames, 3, s, s]` -> `[steps, g, g, d]`
    pub fn features(&self, pixels: Tensor<4>) -> Tensor<4> {
        self.run(pixels, false).0
    }

    /// [`Encoder::features`] and, where `probe`, the salience of its tokens pooled to the
    /// common grid ([`tower_salience`] of the feature block's queries and keys, which are
    /// laid out and pooled as the features are): `[T * h * w]`.
    fn run(&self, pixels: Tensor<4>, probe: bool) -> (Tensor<4>, Option<Tensor<1>>) {
        let t = pixels.dims()[0];
        let (h, seen, steps) = match (&self.tower, probe) {
            (Tower::LanguageBind(tw), true) => {
                let (h, p) = tw.hidden_state_probed(pixels, self.blocks).expect("frames checked at load");
                (h, p, t)
            }
            (Tower::LanguageBind(tw), false) => (tw.hidden_state(pixels, self.blocks).expect("frames checked at load"), None, t),
            (Tower::Dinov2(tw), true) => {
                let (h, p) = tw.hidden_state_probed(pixels, self.blocks);
                (h, p, t)
            }
            (Tower::Dinov2(tw), false) => (tw.hidden_state(pixels, self.blocks), None, t),
            (Tower::Siglip(tw), true) => {
                let (h, p) = tw.hidden_state_probed(pixels, self.blocks);
                (h, p, t)
            }
            (Tower::Siglip(tw), false) => (tw.hidden_state(pixels, self.blocks), None, t),
            (Tower::Vivit(tw), probe) => {
                let (x, p) = match probe {
                    true => tw.forward_probed(pixels),
                    false => tw.forward(pixels).map(|x| (x, None)),
                }
                .expect("frames and size checked at load");
                let [n, d] = x.dims();
                (x.reshape([1, n, d]), p, tw.steps())
            }
        };
        let grid = |h: Tensor<3>| {
            let [b, n, d] = h.dims();
            let patches = n - self.drop_prefix;
            let per_step = b * patches / steps;
            let g = (per_step as f64).sqrt() as usize;
            h.narrow(1, self.drop_prefix, patches).reshape([steps, g, g, d])
        };
        let [frames, rows, cols] = self.projector.pool;
        let salience = seen.map(|p| {
            tower_salience(p.pooled(|x| {
                let d = x.dims()[2];
                self.projector.pooled(grid(x)).reshape([frames, rows * cols, d])
            }))
        });
        (grid(h), salience)
    }

    /// Pooled and projected: `[T * h * w, d_text]`.
    pub fn projected(&self, features: Tensor<4>) -> Tensor<2> {
        self.projector.forward(features)
    }
}

pub struct Merv {
    pub encoders: Vec<Encoder>,
    pub fusion: FeatureFusion,
    decoder: Llama,
    /// Frames of the clip every encoder's frames are taken from.
    pub clip_frames: usize,
    pool: [usize; 3],
    video_token: u32,
    prompt: String,
    /// The last video's mixing weights, one per encoder (read when reported).
    last_weights: RefCell<Option<Tensor<1>>>,
    /// Run the encoders concurrently, each on a thread of its own: natively, by default
    /// when they are spread over devices (`LoadOptions::encoder_placements`), and with
    /// `VIDLLM_MERV_CONCURRENT=1` (`0`: never). Off on one device: on a 2-core CPU, where
    /// each encoder's kernels already use every core, it took 1.36x as long
    /// (`tests/scripts/bench_merv.py`).
    pub concurrent: bool,
}

impl Merv {
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &MervConfigJson, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        let text = LlamaConfig::try_from(&cfg.text_config)?;
        // The id standing for the visual tokens until their features replace it: no text
        // produces it. By default the embedding table's last row, one of the rows MERV pads
        // its vocabulary with (to a multiple of 64) that no token uses.
        let video_token = cfg.video_token_index.unwrap_or(text.vocab_size.saturating_sub(1) as u32);
        let pool = cfg.pool.unwrap_or([16, 8, 8]);
        let clip_frames = cfg.num_frames.unwrap_or(32);
        if cfg.encoders.is_empty() || pool.contains(&0) || clip_frames == 0 {
            return Err(LoadError::Unsupported(format!(
                "MERV config: {} encoders, pool {pool:?}, {clip_frames} frames",
                cfg.encoders.len()
            )));
        }
        // One device an encoder where asked (the paper's scaling proposal), in fusion order,
        // the list repeated when shorter; the fusion and the decoder stay on `at`.
        let encoders = cfg
            .encoders
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let placed = opts.encoder_placements.get(i % opts.encoder_placements.len().max(1)).unwrap_or(at);
                Encoder::load(ck, e, clip_frames, pool, text.d_model, opts.tower, placed)
            })
            .collect::<Result<Vec<_>, LoadError>>()?;
        let fusion = FeatureFusion::load(ck, "fusion", text.d_model, &at.device)?;
        let lm_head = ["language_model.lm_head.weight"].into_iter().find(|h| ck.contains(h)).map(String::from);
        let names = LlamaNames { model: "language_model.model.".into(), lm_head };
        let decoder = load_llama_hf(ck, &names, text, opts.quant, &Plain, at)?;
        let prompt = cfg.prompt.clone().unwrap_or_else(|| "In: {msg}\nOut:".into());
        if !prompt.contains("{msg}") {
            return Err(LoadError::Unsupported(format!("MERV config: prompt {prompt:?} has no {{msg}}")));
        }
        // Encoders on devices of their own run at once by default (the point of placing
        // them); on one device only when asked.
        let spread = encoders.iter().any(|e| e.device != encoders[0].device);
        let asked = std::env::var("VIDLLM_MERV_CONCURRENT").ok();
        let concurrent = !cfg!(target_family = "wasm") && asked.as_deref().map_or(spread, |v| v == "1");
        Ok(Self { encoders, fusion, decoder, clip_frames, pool, video_token, prompt, last_weights: RefCell::new(None), concurrent })
    }

    /// A clip of exactly [`Self::clip_frames`] frames from `t` given ones: frames picked
    /// `np.linspace(0, t - 1, clip)` (repeated when fewer, one frame 32 times).
    ///
    /// # Shapes
    /// - frames: `[t, 3, h, w]` -> `[clip, 3, h, w]`
    pub fn clip(&self, frames: Tensor<4>) -> Tensor<4> {
        let t = frames.dims()[0];
        if t == self.clip_frames {
            return frames;
        }
        let n = self.clip_frames;
        let idx: Vec<i64> = (0..n).map(|i| if n == 1 { 0 } else { ((t - 1) as f64 * i as f64 / (n - 1) as f64) as i64 }).collect();
        frames.clone().select(0, Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &frames.device()))
    }

    /// Each encoder's projected tokens, in fusion order.
    ///
    /// # Shapes
    /// - frames: `[t, 3, h, w]` RGB planes -> encoders x `[T * h * w, d_text]`
    pub fn projected(&self, frames: Tensor<4>) -> Vec<Tensor<2>> {
        self.encoded(frames, false).into_iter().map(|(tokens, _)| tokens).collect()
    }

    /// [`Merv::projected`], each encoder's tokens with their salience from its tower where
    /// `probe` ([`Encoder::run`]).
    fn encoded(&self, frames: Tensor<4>, probe: bool) -> Vec<(Tensor<2>, Option<Tensor<1>>)> {
        let clip = self.clip(frames);
        // An encoder on a device of its own takes the clip there; its tokens come back to
        // the fusion's device.
        let home = clip.device();
        let run = |e: &Encoder, clip: Tensor<4>| {
            let clip = if e.device == home { clip } else { clip.to_device(&e.device) };
            let (features, salience) = e.run(e.pixels(clip), probe);
            let tokens = e.projected(features);
            match e.device == home {
                true => (tokens, salience),
                false => (tokens.to_device(&home), salience.map(|s| s.to_device(&home))),
            }
        };
        // The encoders are independent until the fusion: natively each may run on a thread
        // of its own (on a GPU, each thread submits its own stream of work).
        #[cfg(not(target_family = "wasm"))]
        if self.concurrent {
            return std::thread::scope(|s| {
                let running: Vec<_> = self
                    .encoders
                    .iter()
                    .map(|e| {
                        s.spawn({
                            let c = clip.clone();
                            move || run(e, c)
                        })
                    })
                    .collect();
                running.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
            });
        }
        self.encoders.iter().map(|e| run(e, clip.clone())).collect()
    }

    /// Rows of the decoder's embedding table.
    pub fn decoder_vocab(&self) -> usize {
        self.decoder.cfg.vocab_size
    }

    fn tokens(&self) -> usize {
        self.pool.iter().product()
    }
}

impl Architecture for Merv {
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Self::from_checkpoint(ck, &parse_config(config_json)?, opts, at)
    }

    fn decoder(&self) -> &Llama {
        &self.decoder
    }

    fn image_size(&self) -> usize {
        self.encoders[0].prep.side().unwrap_or(224)
    }

    fn default_frames(&self) -> usize {
        self.clip_frames
    }

    /// Frames reach the model as they were decoded (RGB planes, 0..=255): each encoder
    /// prepares its own from them. MERV samples `np.linspace(0, N - 1, 32)`.
    fn read_preprocessor(&self, _video: &PreprocessorJson, _image: &PreprocessorJson) -> Result<Preprocessing, LoadError> {
        let raw =
            PreprocessConfig { resize: Resize::None, crop: None, rescale: 1.0, mean: [0.0; 3], std: [1.0; 3], ..PreprocessConfig::clip(1) };
        Ok(Preprocessing { pixels: raw.clone(), sampling: Sampling::Linspace { n: self.clip_frames }, images: raw, tiles: None })
    }

    fn video(&self, pixels: Tensor<4>) -> Visual {
        let fused = self.fusion.forward(self.projected(pixels));
        *self.last_weights.borrow_mut() = Some(fused.weights);
        Visual::new(self.video_token, fused.tokens, self.tokens())
    }

    /// Each encoder's salience from its own feature block, pooled to the common grid as
    /// its features are; the video's is their mix by the fusion's weights, as the tokens
    /// are mixed (each frame's still a distribution over its tokens).
    fn video_probed(&self, pixels: Tensor<4>) -> Visual {
        let (tokens, saliences): (Vec<_>, Vec<_>) = self.encoded(pixels, true).into_iter().unzip();
        let fused = self.fusion.forward(tokens);
        let salience = saliences.into_iter().collect::<Option<Vec<Tensor<1>>>>().map(|s| {
            let e = s.len();
            (Tensor::stack::<2>(s, 0) * fused.weights.clone().reshape([e, 1])).sum_dim(0).reshape([self.tokens()])
        });
        *self.last_weights.borrow_mut() = Some(fused.weights);
        Visual { salience, ..Visual::new(self.video_token, fused.tokens, self.tokens()) }
    }

    fn video_grid(&self, _frames: usize) -> FrameGrid {
        let [t, rows, cols] = self.pool;
        FrameGrid { frames: t, prefix: 0, rows, cols, placeholder_per_frame: false }
    }

    fn supports_images(&self) -> bool {
        true
    }

    /// One image, as a clip of copies of it.
    fn images(&self, planes: Vec<Tensor<4>>, _prep: &Preprocessing) -> Result<Visual, LoadError> {
        match <[Tensor<4>; 1]>::try_from(planes) {
            Ok([one]) => Ok(self.video(one)),
            Err(p) => Err(LoadError::Unsupported(format!("MERV takes one image or one video, not {} images", p.len()))),
        }
    }

    /// MERV's prompt; the visual tokens go right after BOS ([`Architecture::visuals_after_bos`]).
    fn first_turn(&self, _tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError> {
        if !images.is_empty() && video.is_some() {
            return Err(GenerateError::Unsupported("MERV takes one image or one video, not both".into()));
        }
        Ok(self.prompt.replace("{msg}", question.trim()))
    }

    fn visuals_after_bos(&self) -> bool {
        true
    }

    /// The last answer closed with EOS, then the prompt again.
    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String {
        format!("{}{}", tok.token_text(tok.eos), self.prompt.replace("{msg}", question))
    }

    fn encoder_names(&self) -> Option<Vec<String>> {
        Some(self.encoders.iter().map(|e| e.name.clone()).collect())
    }

    fn encoder_weights(&self) -> Option<Vec<(String, f32)>> {
        let w = self.last_weights.borrow().clone()?;
        let v = w.into_data().try_into_vec::<f32>().ok()?;
        Some(self.encoders.iter().map(|e| e.name.clone()).zip(v).collect())
    }
}
