//! Idefics3 (Laurençon et al. 2024, "Building and better understanding vision-language
//! models"); reference: transformers `models/idefics3/` (`modeling_idefics3.py`,
//! `processing_idefics3.py`, `image_processing_idefics3.py`), `model_type` `idefics3`.
//!
//! SmolVLM2 is Idefics3 made small and given video: transformers' SmolVLM modules are
//! Idefics3's (the same SigLIP tower with bucketed positions, pixel-shuffle connector, image
//! tiles and `<row_i_col_j>` prompt), so this file reuses [`SmolVlm`] for all of it and
//! only draws the line Idefics3 draws: still images only. Its processor has no video
//! processor and no video prompt, so a video is refused by name before any frame is
//! decoded, never run through a prompt the model was not trained on.

use burn::tensor::Tensor;
use vidllm_core::preprocess::PreprocessorJson;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_core::{GenerateError, LoadError};
use vidllm_shaders::device::Placement;

use crate::llama::Llama;
use crate::merge::Visual;
use crate::smolvlm::SmolVlm;
use crate::token_budget::FrameGrid;
use crate::video_model::{Architecture, LoadOptions, Preprocessing, parse_config};

/// Why a video is refused (one text for every front end).
pub const NO_VIDEO: &str =
    "idefics3 takes still images, not video (its processor has no video prompt); SmolVLM2 (smolvlm), its successor, takes video";

/// `Idefics3ForConditionalGeneration`: SmolVLM2's graph without video.
pub struct Idefics3(pub SmolVlm);

impl Architecture for Idefics3 {
    /// `Idefics3Config` has SmolVLM's fields and defaults (vision config, text config,
    /// `scale_factor` 2, `image_token_id` 128257), and the same checkpoint names.
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError> {
        Ok(Self(SmolVlm::from_checkpoint(ck, &parse_config(config_json)?, opts, at)?))
    }

    fn decoder(&self) -> &Llama {
        &self.0.decoder
    }

    fn image_size(&self) -> usize {
        self.0.image_size()
    }

    /// The image processor's config only (an Idefics3 folder has no video processor).
    fn read_preprocessor(&self, _video: &PreprocessorJson, image: &PreprocessorJson) -> Result<Preprocessing, LoadError> {
        self.0.read_preprocessor(image, image)
    }

    fn supports_video(&self) -> bool {
        false
    }

    /// Never reached through a front end (they ask [`Architecture::supports_video`] first);
    /// a caller that does gets frames encoded as global images, and `first_turn` refuses.
    fn video_grid(&self, frames: usize) -> FrameGrid {
        self.0.video_grid(frames)
    }

    fn video(&self, pixels: Tensor<4>) -> Visual {
        self.0.video(pixels)
    }

    fn supports_images(&self) -> bool {
        true
    }

    fn images(&self, planes: Vec<Tensor<4>>, prep: &Preprocessing) -> Result<Visual, LoadError> {
        self.0.images(planes, prep)
    }

    fn first_turn(&self, tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError> {
        if video.is_some() {
            return Err(GenerateError::Unsupported(NO_VIDEO.into()));
        }
        self.0.first_turn(tok, question, images, None)
    }

    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String {
        self.0.follow_up(tok, question)
    }
}
