//! PLLaVA (Xu et al. 2024, "PLLaVA: Parameter-free LLaVA Extension from Images to Videos
//! for Video Dense Captioning"); reference: github.com/magic-research/PLLaVA
//! (`models/pllava/modeling_pllava.py`).
//!
//! Frames go through the CLIP tower one by one (`hidden_states[-2]`, class token dropped),
//! through the projector **first**, and are then average-pooled in 3-D over
//! `(T, h, w)` to `pooling_shape` (16 x 12 x 12 at inference: 2304 tokens). The decoder
//! carries LoRA adapters on `q_proj` / `v_proj`, merged at load time with a user-chosen
//! alpha (the paper's "post optimisation": trained with 32, served with 4):
//! `W = W0 + alpha / r * B A`.
//!
//! Folder format (what `vidllm` reads; see tests/fixtures/gen_pllava_fixtures.py):
//! `config.json` with `model_type: "pllava"`, `vision_config`, `text_config`,
//! `image_token_index` (the placeholder the video's tokens replace), `pooling_shape`,
//! `num_frames`, `vision_feature_layer`, and `lora: {r, alpha}`; `model.safetensors` with
//! `vision_tower.vision_model.*`, `multi_modal_projector.*` and the decoder under
//! `language_model.base_model.model.*` (PEFT: `.base_layer.weight`,
//! `.lora_A.default.weight`, `.lora_B.default.weight`) or already merged under
//! `language_model.*`.

use std::path::Path;

use burn::tensor::Tensor;
use serde::Deserialize;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::{GenerateError, LoadError};

use crate::clip::{ClipVisionConfig, ClipVisionConfigJson, ClipVisionTower};
use crate::fastvid::tower_salience;
use crate::llama::{Llama, LlamaConfig};
use crate::llama_hf::{LlamaConfigJson, LlamaNames, QuantChoice, WeightSource, load_llama_hf};
use crate::llava::{MultiModalProjector, feature_layer_index, find_prefix, read_config, vicuna};
use crate::merge::Visual;
use crate::pllava_pool::pool3d;
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, FrameShare, FramesAlone, LoadOptions, parse_config};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;

#[derive(Debug, Clone, Deserialize)]
pub struct LoraJson {
    pub r: Option<usize>,
    pub alpha: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PllavaConfigJson {
    pub vision_config: ClipVisionConfigJson,
    pub text_config: LlamaConfigJson,
    pub image_token_index: Option<u32>,
    pub pooling_shape: Option<[usize; 3]>,
    pub num_frames: Option<usize>,
    pub vision_feature_layer: Option<i64>,
    pub projector_hidden_act: Option<String>,
    pub lora: Option<LoraJson>,
}

mod names {
    pub const TOWER: [&str; 3] = ["vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower."];
    pub const PROJECTOR: [&str; 2] = ["multi_modal_projector.", "model.multi_modal_projector."];
    /// PEFT-wrapped decoder first, then plain (already merged) layouts.
    pub const LANGUAGE: [&str; 4] =
        ["language_model.base_model.model.model.", "language_model.model.", "model.language_model.", "language_model."];
    pub const LM_HEAD: [&str; 3] = ["language_model.base_model.model.lm_head.weight", "language_model.lm_head.weight", "lm_head.weight"];
    pub const BASE: &str = "base_layer.weight";
    pub const LORA_A: &str = "lora_A.default.weight";
    pub const LORA_B: &str = "lora_B.default.weight";
}

/// Merges PEFT LoRA adapters into the weights that have them: `W0 + alpha / r * B A`.
pub struct LoraMerge {
    pub alpha: f32,
}

impl WeightSource for LoraMerge {
    fn matrix(&self, ck: &Checkpoint, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, LoadError> {
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let base = format!("{stem}.{}", names::BASE);
        if !ck.contains(&base) {
            return ck.f32_shaped(name, &[out, inp]);
        }
        let mut w = ck.f32_shaped(&base, &[out, inp])?;
        let (a, ashape) = ck.f32(&format!("{stem}.{}", names::LORA_A))?; // [r, in]
        let r = ashape[0];
        if ashape != [r, inp] {
            return Err(LoadError::ShapeMismatch { name: format!("{stem}.{}", names::LORA_A), expected: vec![r, inp], got: ashape });
        }
        let b = ck.f32_shaped(&format!("{stem}.{}", names::LORA_B), &[out, r])?; // [out, r]
        let scale = self.alpha / r as f32;
        for i in 0..out {
            for k in 0..r {
                let s = scale * b[i * r + k];
                let row = &mut w[i * inp..(i + 1) * inp];
                for (wj, aj) in row.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *wj += s * aj;
                }
            }
        }
        Ok(w)
    }
}

pub struct Pllava {
    pub vision_tower: ClipVisionTower,
    pub projector: MultiModalProjector,
    pub decoder: Llama,
    pub image_token: u32,
    pub feature_layer: usize,
    /// `(T, h, w)` the frame tokens are pooled to.
    pub pooling_shape: [usize; 3],
    pub num_frames: usize,
}

impl Pllava {
    /// Load, merging LoRA with `lora_alpha` (default: 4, PLLaVA's serving value) and
    /// pooling to `pool` (default: the config's).
    pub fn load(
        dir: &Path,
        quant: QuantChoice,
        lora_alpha: Option<f32>,
        pool: Option<[usize; 3]>,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let cfg: PllavaConfigJson = read_config(dir)?;
        Self::from_checkpoint(&Checkpoint::open_dir(dir)?, &cfg, &LoadOptions { quant, lora_alpha, pool, ..Default::default() }, at)
    }

    /// Build from a checkpoint already open (from files or from memory) and its config.
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &PllavaConfigJson, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        let (quant, lora_alpha, pool) = (opts.quant, opts.lora_alpha, opts.pool);
        if cfg.projector_hidden_act.as_deref().is_some_and(|a| a != "gelu") {
            return Err(LoadError::Unsupported(format!("projector activation {:?}", cfg.projector_hidden_act)));
        }
        let vcfg = ClipVisionConfig { weights: opts.tower, ..ClipVisionConfig::try_from(&cfg.vision_config)? };
        let text = LlamaConfig::try_from(&cfg.text_config)?;
        let pooling_shape = pool.or(cfg.pooling_shape).unwrap_or([16, 12, 12]);
        if pooling_shape.contains(&0) {
            return Err(LoadError::Unsupported(format!("pooling shape {pooling_shape:?}")));
        }
        let tower = find_prefix(ck, &names::TOWER, "embeddings.patch_embedding.weight")?;
        let vision_tower = ClipVisionTower::load(ck, &tower, vcfg.clone(), at)?;
        let proj = find_prefix(ck, &names::PROJECTOR, "linear_1.weight")?;
        let projector = MultiModalProjector::load(ck, &proj, vcfg.d_model, text.d_model, &at.device)?;
        let model = find_prefix(ck, &names::LANGUAGE, "embed_tokens.weight")?;
        let lm_head = names::LM_HEAD.iter().find(|h| ck.contains(h)).map(|h| h.to_string());
        let lora = LoraMerge { alpha: lora_alpha.unwrap_or(4.0) };
        let decoder = load_llama_hf(ck, &LlamaNames { model, lm_head }, text, quant, &lora, at)?;
        Ok(Self {
            vision_tower,
            projector,
            decoder,
            image_token: cfg.image_token_index.unwrap_or(32000),
            feature_layer: feature_layer_index(cfg.vision_feature_layer.unwrap_or(-2), vcfg.n_layers)?,
            pooling_shape,
            num_frames: cfg.num_frames.unwrap_or(16),
        })
    }

    /// Tokens a video becomes after pooling.
    pub fn video_tokens(&self) -> usize {
        self.pooling_shape.iter().product()
    }

    /// Projected (not yet pooled) frame features, class token dropped.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[t, grid, grid, d_text]`
    pub fn projected(&self, pixels: Tensor<4>) -> Tensor<4> {
        self.project(self.vision_tower.hidden_state(pixels, self.feature_layer))
    }

    /// # Shapes
    /// - h: `[t, 1 + grid * grid, d_vis]` -> `[t, grid, grid, d_text]`
    fn project(&self, h: Tensor<3>) -> Tensor<4> {
        let [t, n, d] = h.dims();
        let g = self.vision_tower.cfg.grid();
        let h = h.narrow(1, 1, n - 1).reshape([t * (n - 1), d]);
        let p = self.projector.forward(h);
        let dt = p.dims()[1];
        p.reshape([t, g, g, dt])
    }

    /// Frames' grids `[t, grid, grid, c]` pooled to the video's tokens `[T * h * w, c]`,
    /// short clips repeated first.
    fn pool(&self, x: Tensor<4>) -> Tensor<2> {
        let t = x.dims()[0];
        let device = x.device();
        let repeat = (t < self.num_frames).then_some(self.num_frames);
        pool3d(x, self.pooling_shape, repeat, &device)
    }

    /// Pooled video tokens: projector first, then `AdaptiveAvgPool3d`. Clips shorter than
    /// `num_frames` are repeated up to it first, as PLLaVA does; a single image is
    /// repeated `num_frames` times.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> `[T * h * w, d_text]`
    pub fn video_features(&self, pixels: Tensor<4>) -> Tensor<2> {
        self.pool(self.projected(pixels))
    }
}

impl FramesAlone for Pllava {
    /// The tower and the projector see each frame alone; the pooling spans frames, so a
    /// frame's share is its projected grid and its probe's patches (class token dropped),
    /// and the window is pooled at question time, the probe in 3-D as the patches (a
    /// pooled time step is a frame of the salience).
    fn share(&self, pixels: Tensor<4>) -> FrameShare {
        let (h, probe) = self.vision_tower.hidden_state_probed(pixels, self.feature_layer);
        let p = self.project(h);
        let [t, g, _, d] = p.dims();
        let probe = probe.map(|p| {
            p.pooled(|x| {
                let n = x.dims()[1];
                x.narrow(1, 1, n - 1)
            })
        });
        FrameShare { tokens: p.reshape([t * g * g, d]), salience: None, probe }
    }

    fn video_of(&self, share: FrameShare) -> Visual {
        let g = self.vision_tower.cfg.grid();
        let [rows, d] = share.tokens.dims();
        let t = rows / (g * g);
        let [frames, h, w] = self.pooling_shape;
        let salience = share.probe.map(|p| {
            tower_salience(p.pooled(|x| {
                let c = x.dims()[2];
                self.pool(x.reshape([t, g, g, c])).reshape([frames, h * w, c])
            }))
        });
        let visual = Visual::new(self.image_token, self.pool(share.tokens.reshape([t, g, g, d])), self.video_tokens());
        Visual { salience, ..visual }
    }
}

impl Architecture for Pllava {
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Self::from_checkpoint(ck, &parse_config(config_json)?, opts, at)
    }

    fn decoder(&self) -> &Llama {
        &self.decoder
    }

    fn image_size(&self) -> usize {
        self.vision_tower.cfg.image_size
    }

    fn default_frames(&self) -> usize {
        self.num_frames
    }

    /// The pooled video fills one `<image>` placeholder, as PLLaVA's prompts write it.
    fn video(&self, pixels: Tensor<4>) -> Visual {
        Visual::new(self.image_token, self.video_features(pixels), self.video_tokens())
    }

    fn frames_alone(&self) -> Option<&dyn FramesAlone> {
        Some(self)
    }

    /// The pooled time steps, each a pooled grid.
    fn video_grid(&self, _frames: usize) -> FrameGrid {
        let [frames, rows, cols] = self.pooling_shape;
        FrameGrid { frames, prefix: 0, rows, cols, placeholder_per_frame: false }
    }

    fn first_turn(
        &self,
        _tok: &Tokenizer,
        question: &str,
        _images: &[Visual],
        _video: Option<&FrameTimes>,
    ) -> Result<String, GenerateError> {
        Ok(vicuna::first_turn(question, 0, "<image>\n"))
    }

    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String {
        vicuna::follow_up(tok, question)
    }
}
