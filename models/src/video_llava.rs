//! Video-LLaVA (Lin et al. 2023, "Video-LLaVA: Learning United Visual Representation by
//! Alignment Before Projection"); reference: transformers
//! `models/video_llava/modeling_video_llava.py`.
//!
//! Each frame goes through the CLIP video tower on its own (no temporal attention);
//! `hidden_states[vision_feature_layer]` keeps the class token for video (8 x 257 tokens at
//! 224 px); images drop it under the "default" strategy. A two-layer MLP projector (GELU)
//! maps the features into the decoder's embedding space, where they replace the
//! `<video>` / `<image>` placeholder ids, images first.

use burn::tensor::Tensor;
use serde::Deserialize;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::{GenerateError, LoadError};

use crate::clip::{ClipVisionConfig, ClipVisionConfigJson, ClipVisionTower};
use crate::fastvid::tower_salience;
use crate::llama::Llama;
use crate::llama_hf::{LlamaConfigJson, LlamaNames, Plain, QuantChoice, load_llama_hf};
use crate::llava::{MultiModalProjector, feature_layer_index, find_prefix, read_config, vicuna};
use crate::merge::Visual;
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, FrameShare, FramesAlone, LoadOptions, Preprocessing, parse_config};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;
use vidllm_shaders::preprocess::preprocess_planes;

/// `VideoLlavaConfig` as in `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VideoLlavaConfigJson {
    pub vision_config: ClipVisionConfigJson,
    pub text_config: LlamaConfigJson,
    pub image_token_index: Option<u32>,
    pub video_token_index: Option<u32>,
    pub projector_hidden_act: Option<String>,
    pub vision_feature_layer: Option<i64>,
    pub vision_feature_select_strategy: Option<String>,
    pub multimodal_projector_bias: Option<bool>,
}

/// Which vision tokens the image path keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the class token.
    Default,
    /// Keep every token.
    Full,
}

/// Placeholder ids and feature choices, resolved.
#[derive(Debug, Clone)]
pub struct VisualConfig {
    pub image_token: u32,
    pub video_token: u32,
    /// Index into `hidden_states` (0 = embeddings).
    pub feature_layer: usize,
    pub image_select: FeatureSelect,
}

/// Key prefixes across transformers <=4.51 (and what 4.52+ still writes), the in-memory
/// 4.52-5.5 layout, and >=5.6 (no `vision_model.`).
pub mod names {
    pub const VIDEO_TOWER: [&str; 4] =
        ["video_tower.vision_model.", "model.video_tower.vision_model.", "video_tower.", "model.video_tower."];
    pub const IMAGE_TOWER: [&str; 4] =
        ["image_tower.vision_model.", "model.image_tower.vision_model.", "image_tower.", "model.image_tower."];
    pub const PROJECTOR: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];
    pub const LANGUAGE: [&str; 3] = ["language_model.model.", "model.language_model.", "language_model."];
    pub const LM_HEAD: [&str; 2] = ["language_model.lm_head.weight", "lm_head.weight"];
    pub const TOWER_PROBE: &str = "embeddings.patch_embedding.weight";
}

pub struct VideoLlava {
    pub video_tower: ClipVisionTower,
    pub image_tower: Option<ClipVisionTower>,
    pub projector: MultiModalProjector,
    pub decoder: Llama,
    pub visual: VisualConfig,
}

impl VideoLlava {
    /// Load a Hugging Face folder.
    pub fn load(dir: &std::path::Path, quant: QuantChoice, at: &Placement) -> Result<Self, LoadError> {
        let cfg: VideoLlavaConfigJson = read_config(dir)?;
        Self::from_checkpoint(&Checkpoint::open_dir(dir)?, &cfg, &LoadOptions { quant, ..Default::default() }, at)
    }

    /// Build from a checkpoint already open (from files or from memory) and its config.
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &VideoLlavaConfigJson, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        if cfg.projector_hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(LoadError::Unsupported(format!("projector activation {:?}", cfg.projector_hidden_act)));
        }
        let vcfg = ClipVisionConfig { weights: opts.tower, ..ClipVisionConfig::try_from(&cfg.vision_config)? };
        let text = crate::llama::LlamaConfig::try_from(&cfg.text_config)?;
        let visual = VisualConfig {
            image_token: cfg.image_token_index.unwrap_or(32000),
            video_token: cfg.video_token_index.unwrap_or(32001),
            feature_layer: feature_layer_index(cfg.vision_feature_layer.unwrap_or(-2), vcfg.n_layers)?,
            image_select: match cfg.vision_feature_select_strategy.as_deref().unwrap_or("default") {
                "default" => FeatureSelect::Default,
                "full" => FeatureSelect::Full,
                o => return Err(LoadError::Unsupported(format!("vision_feature_select_strategy {o:?}"))),
            },
        };
        let video_prefix = find_prefix(ck, &names::VIDEO_TOWER, names::TOWER_PROBE)?;
        let video_tower = ClipVisionTower::load(ck, &video_prefix, vcfg.clone(), at)?;
        let image_tower = match find_prefix(ck, &names::IMAGE_TOWER, names::TOWER_PROBE) {
            Ok(p) => Some(ClipVisionTower::load(ck, &p, vcfg.clone(), at)?),
            Err(_) => None,
        };
        let proj_prefix = find_prefix(ck, &names::PROJECTOR, "linear_1.weight")?;
        let projector = MultiModalProjector::load(ck, &proj_prefix, vcfg.d_model, text.d_model, &at.device)?;
        let model = find_prefix(ck, &names::LANGUAGE, "embed_tokens.weight")?;
        let lm_head = names::LM_HEAD.iter().find(|h| ck.contains(h)).map(|h| h.to_string());
        let decoder = load_llama_hf(ck, &LlamaNames { model, lm_head }, text, opts.quant, &Plain, at)?;
        Ok(Self { video_tower, image_tower, projector, decoder, visual })
    }

    /// Tokens one video of `t` frames becomes (class tokens kept).
    pub fn video_tokens(&self, t: usize) -> usize {
        t * self.video_tower.cfg.tokens()
    }

    /// Selected vision hidden state of each frame (class token kept).
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t, tokens, d_vis]`
    pub fn video_hidden(&self, pixels: Tensor<4>) -> Tensor<3> {
        self.video_tower.hidden_state(pixels, self.visual.feature_layer)
    }

    /// Projected video features, frame-major.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t * tokens, d_text]`
    pub fn video_features(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.project(self.video_hidden(pixels))
    }

    /// # Shapes
    /// - h: `[t, tokens, d_vis]` -> `[t * tokens, d_text]`
    fn project(&self, h: Tensor<3>) -> Tensor<2> {
        let [t, n, d] = h.dims();
        self.projector.forward(h.reshape([t * n, d]))
    }

    /// Projected image features (class token dropped under "default").
    ///
    /// # Shapes
    /// - pixels: `[b, 3, s, s]` -> `[b * tokens', d_text]`
    pub fn image_features(&self, pixels: Tensor<4>) -> Tensor<2> {
        let tower = self.image_tower.as_ref().unwrap_or(&self.video_tower);
        let h = tower.hidden_state(pixels, self.visual.feature_layer);
        let [b, n, d] = h.dims();
        let h = match self.visual.image_select {
            FeatureSelect::Default => h.narrow(1, 1, n - 1),
            FeatureSelect::Full => h,
        };
        let n = h.dims()[1];
        self.projector.forward(h.reshape([b * n, d]))
    }
}

impl FramesAlone for VideoLlava {
    /// The video tower sees each frame alone: a frame's share is its projected tokens.
    /// Every token of a frame (its class token too) is a video token: the probe's keys are
    /// taken as they are.
    fn share(&self, pixels: Tensor<4>) -> FrameShare {
        let (h, probe) = self.video_tower.hidden_state_probed(pixels, self.visual.feature_layer);
        FrameShare::with_salience(self.project(h), probe.map(tower_salience))
    }

    fn video_of(&self, share: FrameShare) -> Visual {
        let t = share.tokens.dims()[0] / self.video_tower.cfg.tokens();
        let visual = Visual::new(self.visual.video_token, share.tokens, self.video_tokens(t));
        Visual { salience: share.salience, ..visual }
    }
}

impl Architecture for VideoLlava {
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Self::from_checkpoint(ck, &parse_config(config_json)?, opts, at)
    }

    fn decoder(&self) -> &Llama {
        &self.decoder
    }

    fn image_size(&self) -> usize {
        self.video_tower.cfg.image_size
    }

    fn video(&self, pixels: Tensor<4>) -> Visual {
        let per_placeholder = self.video_tokens(pixels.dims()[0]);
        Visual::new(self.visual.video_token, self.video_features(pixels), per_placeholder)
    }

    fn frames_alone(&self) -> Option<&dyn FramesAlone> {
        Some(self)
    }

    /// Each frame: CLIP's class token, then its patch grid.
    fn video_grid(&self, frames: usize) -> FrameGrid {
        let g = self.video_tower.cfg.grid();
        FrameGrid { frames, prefix: 1, rows: g, cols: g, placeholder_per_frame: false }
    }

    fn supports_images(&self) -> bool {
        true
    }

    fn images(&self, planes: Vec<Tensor<4>>, prep: &Preprocessing) -> Result<Visual, LoadError> {
        let pixels: Vec<Tensor<4>> = planes.into_iter().map(|p| preprocess_planes(p, &prep.images)).collect();
        let n = pixels.len();
        if n == 0 {
            return Err(LoadError::Unsupported("no images were given".into()));
        }
        let features = Tensor::cat(pixels.into_iter().map(|p| self.image_features(p)).collect(), 0);
        let per_placeholder = features.dims()[0] / n;
        Ok(Visual::new(self.visual.image_token, features, per_placeholder))
    }

    /// `USER: <image>\n...<video>\n{question} ASSISTANT:` (images first, as their
    /// features fill the prompt first).
    fn first_turn(&self, _tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError> {
        Ok(vicuna::first_turn(question, images.len(), if video.is_some() { "<video>\n" } else { "" }))
    }

    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String {
        vicuna::follow_up(tok, question)
    }
}
