//! The video-language architectures vidllm runs, picked by `config.json`'s `model_type`,
//! behind one face: frames in (pixel batches), visual tokens out, and the prompt that
//! places them. Native `ask` and the browser runtime both drive models through this.

use burn::tensor::{Device, Tensor};
use serde::de::DeserializeOwned;
use vidllm_core::error::LoadError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::tokenizer::Tokenizer;

use crate::Llama;
use crate::llama_hf::QuantChoice;
use crate::llava_next_video::LlavaNextVideo;
use crate::merge::{Visual, expand_placeholders};
use crate::pllava::Pllava;
use crate::video_llava::VideoLlava;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    VideoLlava,
    Pllava,
    LlavaNextVideo,
}

impl Arch {
    /// The architecture a `config.json` names; unsupported ones are refused by name.
    pub fn of_config(config_json: &str) -> Result<Self, LoadError> {
        let v: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| LoadError::Unsupported(format!("config.json is not JSON: {e}")))?;
        match v["model_type"].as_str() {
            Some("video_llava") => Ok(Self::VideoLlava),
            Some("pllava") => Ok(Self::Pllava),
            Some("llava_next_video") => Ok(Self::LlavaNextVideo),
            other => Err(LoadError::Unsupported(format!(
                "config.json: unsupported architecture {:?} (supported: video_llava, pllava, llava_next_video)",
                other.unwrap_or("missing model_type")
            ))),
        }
    }
}

/// Load-time choices a user may override.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// How the decoder's matrices are stored on the device.
    pub quant: QuantChoice,
    /// PLLaVA: LoRA alpha used when merging (default 4).
    pub lora_alpha: Option<f32>,
    /// PLLaVA: pool frame tokens to `(T, H, W)` (default: the config's).
    pub pool: Option<[usize; 3]>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { quant: QuantChoice::Q4_1, lora_alpha: None, pool: None }
    }
}

pub enum VideoModel {
    VideoLlava(VideoLlava),
    Pllava(Pllava),
    LlavaNextVideo(LlavaNextVideo),
}

fn parse<T: DeserializeOwned>(config_json: &str) -> Result<T, LoadError> {
    serde_json::from_str(config_json).map_err(|e| LoadError::Unsupported(format!("config.json: {e}")))
}

impl VideoModel {
    /// A Hugging Face-format folder on disk.
    pub fn load(dir: &std::path::Path, opts: LoadOptions, device: &Device) -> Result<Self, LoadError> {
        let p = dir.join("config.json");
        let config = std::fs::read_to_string(&p).map_err(|source| LoadError::Open { path: p.display().to_string(), source })?;
        // An unsupported architecture is named before any weights are looked for.
        Arch::of_config(&config)?;
        Self::from_checkpoint(&config, &Checkpoint::open_dir(dir)?, opts, device)
    }

    /// A model from its `config.json` text and an open checkpoint (files or memory).
    pub fn from_checkpoint(config_json: &str, ck: &Checkpoint, opts: LoadOptions, device: &Device) -> Result<Self, LoadError> {
        Ok(match Arch::of_config(config_json)? {
            Arch::VideoLlava => Self::VideoLlava(VideoLlava::from_checkpoint(ck, &parse(config_json)?, opts.quant, device)?),
            Arch::Pllava => {
                Self::Pllava(Pllava::from_checkpoint(ck, &parse(config_json)?, opts.quant, opts.lora_alpha, opts.pool, device)?)
            }
            Arch::LlavaNextVideo => Self::LlavaNextVideo(LlavaNextVideo::from_checkpoint(ck, &parse(config_json)?, opts.quant, device)?),
        })
    }

    pub fn decoder(&self) -> &Llama {
        match self {
            Self::VideoLlava(m) => &m.decoder,
            Self::Pllava(m) => &m.decoder,
            Self::LlavaNextVideo(m) => &m.decoder,
        }
    }

    /// Frame side the vision tower takes.
    pub fn image_size(&self) -> usize {
        match self {
            Self::VideoLlava(m) => m.video_tower.cfg.image_size,
            Self::Pllava(m) => m.vision_tower.cfg.image_size,
            Self::LlavaNextVideo(m) => m.vision_tower.cfg.image_size,
        }
    }

    /// Frames the model was trained on (PLLaVA's `num_frames`; 8 otherwise).
    pub fn default_frames(&self) -> usize {
        match self {
            Self::Pllava(m) => m.num_frames,
            _ => 8,
        }
    }

    pub fn supports_images(&self) -> bool {
        matches!(self, Self::VideoLlava(_))
    }

    /// The video's visual tokens and the placeholder they fill.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]`
    pub fn video(&self, pixels: Tensor<4>) -> Visual {
        match self {
            Self::VideoLlava(m) => {
                let per = m.video_tokens(pixels.dims()[0]);
                Visual { token: m.visual.video_token, features: m.video_features(pixels), per_placeholder: per }
            }
            Self::Pllava(m) => Visual { token: m.image_token, features: m.video_features(pixels), per_placeholder: m.video_tokens() },
            Self::LlavaNextVideo(m) => {
                let per = pixels.dims()[0] * m.tokens_per_frame();
                Visual { token: m.video_token, features: m.video_features(pixels), per_placeholder: per }
            }
        }
    }

    /// Still images, each its own `<image>` placeholder (Video-LLaVA only).
    pub fn images(&self, pixels: Vec<Tensor<4>>) -> Result<Option<Visual>, LoadError> {
        if pixels.is_empty() {
            return Ok(None);
        }
        let Self::VideoLlava(m) = self else {
            return Err(LoadError::Unsupported("images with a video are supported for Video-LLaVA folders only".into()));
        };
        let n = pixels.len();
        let feats = Tensor::cat(pixels.into_iter().map(|p| m.image_features(p)).collect(), 0);
        let per = feats.dims()[0] / n;
        Ok(Some(Visual { token: m.visual.image_token, features: feats, per_placeholder: per }))
    }

    /// The first turn: Vicuna-style `USER: ... ASSISTANT:` with the placeholders.
    pub fn first_turn(&self, question: &str, n_images: usize) -> String {
        match self {
            Self::VideoLlava(_) | Self::LlavaNextVideo(_) => VideoLlava::conversation(question, n_images),
            Self::Pllava(_) => format!("USER: <image>\n{question} ASSISTANT:"),
        }
    }

    /// A first turn about still images only (Video-LLaVA).
    pub fn image_turn(question: &str, n_images: usize) -> String {
        format!("USER: {}{question} ASSISTANT:", "<image>\n".repeat(n_images))
    }

    /// A later turn: close the last answer, open a new one.
    pub fn follow_up(tok: &Tokenizer, question: &str) -> String {
        format!("{}USER: {question} ASSISTANT:", tok.token_text(tok.eos))
    }

    /// Token ids of a first-turn `text`, each placeholder expanded to its visual tokens.
    pub fn prompt_ids(tok: &Tokenizer, text: &str, visuals: &[Visual]) -> Result<Vec<u32>, LoadError> {
        let mut ids = tok.encode(text, tok.add_bos)?;
        for v in visuals {
            ids = expand_placeholders(&ids, v.token, v.per_placeholder);
        }
        Ok(ids)
    }
}
