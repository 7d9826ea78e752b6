//! LLaVA-NeXT-Video (Zhang et al. 2024, "LLaVA-NeXT: A Strong Zero-shot Video
//! Understanding Model"); reference: transformers
//! `models/llava_next_video/modeling_llava_next_video.py`.
//!
//! Per frame: CLIP `hidden_states[vision_feature_layer]`, class token dropped, the token
//! grid average-pooled with a `spatial_pool_stride` window (24x24 -> 12x12 at 336 px),
//! **then** the projector. Video placeholders take `t * pooled` tokens. (Images use
//! LLaVA-NeXT's any-resolution tiling, which vidllm does not implement yet.)

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::{GenerateError, LoadError};

use crate::clip::{ClipVisionConfig, ClipVisionConfigJson, ClipVisionTower};
use crate::fastvid::tower_salience;
use crate::llama::{Llama, LlamaConfig};
use crate::llama_hf::{LlamaConfigJson, LlamaNames, Plain, QuantChoice, load_llama_hf};
use crate::llava::{MultiModalProjector, feature_layer_index, find_prefix, read_config, vicuna};
use crate::merge::Visual;
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, FrameShare, FramesAlone, LoadOptions, parse_config};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;

#[derive(Debug, Clone, Deserialize)]
pub struct LlavaNextVideoConfigJson {
    pub vision_config: ClipVisionConfigJson,
    pub text_config: LlamaConfigJson,
    pub video_token_index: Option<u32>,
    pub vision_feature_layer: Option<i64>,
    pub vision_feature_select_strategy: Option<String>,
    pub spatial_pool_mode: Option<String>,
    pub spatial_pool_stride: Option<usize>,
    pub projector_hidden_act: Option<String>,
}

mod names {
    pub const TOWER: [&str; 4] = ["vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.", "model.vision_tower."];
    pub const PROJECTOR: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];
    pub const LANGUAGE: [&str; 3] = ["language_model.model.", "model.language_model.", "language_model."];
    pub const LM_HEAD: [&str; 2] = ["language_model.lm_head.weight", "lm_head.weight"];
}

pub struct LlavaNextVideo {
    pub vision_tower: ClipVisionTower,
    pub projector: MultiModalProjector,
    pub decoder: Llama,
    pub video_token: u32,
    pub feature_layer: usize,
    pub pool_stride: usize,
}

impl LlavaNextVideo {
    pub fn load(dir: &Path, quant: QuantChoice, at: &Placement) -> Result<Self, LoadError> {
        let cfg: LlavaNextVideoConfigJson = read_config(dir)?;
        Self::from_checkpoint(&Checkpoint::open_dir(dir)?, &cfg, &LoadOptions { quant, ..Default::default() }, at)
    }

    /// Build from a checkpoint already open (from files or from memory) and its config.
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &LlavaNextVideoConfigJson, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        if cfg.spatial_pool_mode.as_deref().unwrap_or("average") != "average" {
            return Err(LoadError::Unsupported(format!("spatial_pool_mode {:?} (supported: average)", cfg.spatial_pool_mode)));
        }
        if cfg.vision_feature_select_strategy.as_deref().unwrap_or("default") != "default" {
            return Err(LoadError::Unsupported(format!(
                "vision_feature_select_strategy {:?} for video",
                cfg.vision_feature_select_strategy
            )));
        }
        if cfg.projector_hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(LoadError::Unsupported(format!("projector activation {:?}", cfg.projector_hidden_act)));
        }
        let vcfg = ClipVisionConfig { weights: opts.tower, ..ClipVisionConfig::try_from(&cfg.vision_config)? };
        let text = LlamaConfig::try_from(&cfg.text_config)?;
        let pool_stride = cfg.spatial_pool_stride.unwrap_or(2);
        if pool_stride == 0 || pool_stride > vcfg.grid() {
            return Err(LoadError::Unsupported(format!("spatial_pool_stride {pool_stride}")));
        }
        let tower = find_prefix(ck, &names::TOWER, "embeddings.patch_embedding.weight")?;
        let proj = find_prefix(ck, &names::PROJECTOR, "linear_1.weight")?;
        let model = find_prefix(ck, &names::LANGUAGE, "embed_tokens.weight")?;
        let lm_head = names::LM_HEAD.iter().find(|h| ck.contains(h)).map(|h| h.to_string());
        Ok(Self {
            vision_tower: ClipVisionTower::load(ck, &tower, vcfg.clone(), at)?,
            projector: MultiModalProjector::load(ck, &proj, vcfg.d_model, text.d_model, &at.device)?,
            decoder: load_llama_hf(ck, &LlamaNames { model, lm_head }, text, opts.quant, &Plain, at)?,
            video_token: cfg.video_token_index.unwrap_or(32000),
            feature_layer: feature_layer_index(cfg.vision_feature_layer.unwrap_or(-2), vcfg.n_layers)?,
            pool_stride,
        })
    }

    /// Tokens per frame after pooling.
    pub fn tokens_per_frame(&self) -> usize {
        let g = self.vision_tower.cfg.grid() / self.pool_stride;
        g * g
    }

    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t * tokens_per_frame, d_text]`
    pub fn video_features(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.projector.forward(self.pooled(self.vision_tower.hidden_state(pixels, self.feature_layer)))
    }

    /// Each frame's patches (class token dropped) average-pooled: the video's tokens before
    /// the projector, and the tower's probe pooled the same way.
    ///
    /// # Shapes
    /// - h: `[t, 1 + g * g, c]` -> `[t * tokens_per_frame, c]`
    fn pooled(&self, h: Tensor<3>) -> Tensor<2> {
        let [t, n, c] = h.dims();
        let g = self.vision_tower.cfg.grid();
        let device = h.device();
        avg_pool2d_frames(h.narrow(1, 1, n - 1).reshape([t, g, g, c]), self.pool_stride, &device)
    }
}

/// `[n / k, n]` matrix of `AvgPool(kernel = k, stride = k)` along one axis (floor mode).
pub fn window_avg_matrix(n: usize, k: usize) -> Vec<f32> {
    let n_out = n / k;
    let mut m = vec![0f32; n_out * n];
    for i in 0..n_out {
        for j in i * k..(i + 1) * k {
            m[i * n + j] = 1.0 / k as f32;
        }
    }
    m
}

/// 2-D `AvgPool2d(k, stride = k)` of each frame's token grid (LLaVA-NeXT-Video's pooler).
///
/// # Shapes
/// - x: `[t, h, w, d]` -> `[t * (h / k) * (w / k), d]`
pub fn avg_pool2d_frames(x: Tensor<4>, k: usize, device: &Device) -> Tensor<2> {
    let [t, h, w, d] = x.dims();
    let (ho, wo) = (h / k, w / k);
    let pw = Tensor::<2>::from_data(TensorData::new(window_avg_matrix(w, k), [wo, w]), device).unsqueeze::<3>();
    let ph = Tensor::<2>::from_data(TensorData::new(window_avg_matrix(h, k), [ho, h]), device).unsqueeze::<3>();
    let x = pw.matmul(x.reshape([t * h, w, d])); // [t*h, wo, d]
    ph.matmul(x.reshape([t, h, wo * d])).reshape([t * ho * wo, d])
}

impl FramesAlone for LlavaNextVideo {
    /// Each frame is encoded and pooled on its own: its share is its pooled tokens, and the
    /// probe's queries and keys are pooled as the frame's patches are.
    fn share(&self, pixels: Tensor<4>) -> FrameShare {
        let t = pixels.dims()[0];
        let (h, probe) = self.vision_tower.hidden_state_probed(pixels, self.feature_layer);
        let m = self.tokens_per_frame();
        let probe = probe.map(|p| {
            p.pooled(|x| {
                let c = x.dims()[2];
                self.pooled(x).reshape([t, m, c])
            })
        });
        FrameShare::with_salience(self.projector.forward(self.pooled(h)), probe.map(tower_salience))
    }

    fn video_of(&self, share: FrameShare) -> Visual {
        let rows = share.tokens.dims()[0];
        let visual = Visual::new(self.video_token, share.tokens, rows);
        Visual { salience: share.salience, ..visual }
    }
}

impl Architecture for LlavaNextVideo {
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Self::from_checkpoint(ck, &parse_config(config_json)?, opts, at)
    }

    fn decoder(&self) -> &Llama {
        &self.decoder
    }

    fn image_size(&self) -> usize {
        self.vision_tower.cfg.image_size
    }

    fn video(&self, pixels: Tensor<4>) -> Visual {
        let per_placeholder = pixels.dims()[0] * self.tokens_per_frame();
        Visual::new(self.video_token, self.video_features(pixels), per_placeholder)
    }

    fn frames_alone(&self) -> Option<&dyn FramesAlone> {
        Some(self)
    }

    /// Each frame's pooled grid.
    fn video_grid(&self, frames: usize) -> FrameGrid {
        let g = self.vision_tower.cfg.grid() / self.pool_stride;
        FrameGrid { frames, prefix: 0, rows: g, cols: g, placeholder_per_frame: false }
    }

    fn first_turn(&self, _tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError> {
        Ok(vicuna::first_turn(question, images.len(), if video.is_some() { "<video>\n" } else { "" }))
    }

    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String {
        vicuna::follow_up(tok, question)
    }
}
