//! The video-language architectures vidllm runs, behind one trait, [`Architecture`]:
//! frames in (pixel batches), visual tokens out, and the turns that place them. Which one
//! a folder holds is its `config.json`'s `model_type`, looked up in [`REGISTRY`].
//!
//! A new architecture is one file implementing [`Architecture`] plus one line in
//! [`REGISTRY`]; `Conversation`, `vidllm-native ask` and the browser take it from there.

use std::ops::Deref;

use burn::tensor::Tensor;
use serde::de::DeserializeOwned;
use vidllm_core::GenerateError;
use vidllm_core::error::LoadError;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;

use crate::Llama;
use crate::clip::AttentionProbe;
use crate::idefics3::Idefics3;
use crate::layers::TowerWeights;
use crate::llama_hf::QuantChoice;
use crate::llava_next_video::LlavaNextVideo;
use crate::merge::{Visual, expand_placeholders, expand_placeholders_counted};
use crate::merv::Merv;
use crate::pllava::Pllava;
use crate::smolvlm::SmolVlm;
use crate::token_budget::{Budget, FrameGrid, Reduce, Reduced, ReductionReport, reduce, reduce_async};
use crate::video_llava::VideoLlava;

/// Load-time choices a user may override.
#[derive(Clone)]
pub struct LoadOptions {
    /// How the decoder's matrices are stored on the device.
    pub quant: QuantChoice,
    /// How the vision towers' linear layers are stored on the device (f32 by default).
    pub tower: TowerWeights,
    /// PLLaVA: LoRA alpha used when merging (default 4).
    pub lora_alpha: Option<f32>,
    /// PLLaVA: pool frame tokens to `(T, H, W)` (default: the config's).
    pub pool: Option<[usize; 3]>,
    /// MERV: where each encoder runs, in fusion order (repeated when shorter); empty:
    /// where the model loads.
    pub encoder_placements: Vec<Placement>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { quant: QuantChoice::Q4_1, tower: TowerWeights::F32, lora_alpha: None, pool: None, encoder_placements: Vec::new() }
    }
}

/// How a model's frames and images are picked and prepared: the folder's preprocessor
/// configs read the way the model's processors read them.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    /// A video's frames.
    pub pixels: PreprocessConfig,
    /// The frames a video is sampled to unless the user says otherwise.
    pub sampling: Sampling,
    /// Still images (the image processor's config; with `tiles`, its filter and
    /// normalisation, the sizes coming from the tiling).
    pub images: PreprocessConfig,
    /// Idefics3 / SmolVLM: images cut into tiles plus a global view.
    pub tiles: Option<Tiling>,
}

/// An image processor that cuts pictures into tiles of the tower's side
/// (`TiledSizes` says where).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// `size.longest_edge`: the first resize.
    pub longest: usize,
    /// `max_image_size.longest_edge`: the tile side.
    pub tile: usize,
    /// `do_image_splitting`: cut into tiles (else one tile of the whole picture).
    pub split: bool,
}

/// A video-language model: a vision side that turns frames into visual tokens for a
/// LLaMA-family decoder, and the conversation format its checkpoints were tuned on.
pub trait Architecture {
    /// Build from a `config.json` (its text) and an open checkpoint (files or memory).
    fn load(config_json: &str, ck: &Checkpoint, opts: &LoadOptions, at: &Placement) -> Result<Self, LoadError>
    where
        Self: Sized;

    fn decoder(&self) -> &Llama;

    /// Frame side the vision tower takes.
    fn image_size(&self) -> usize;

    /// Frames a video is sampled to unless the user says otherwise.
    fn default_frames(&self) -> usize {
        8
    }

    /// The folder's preprocessor configs (the video processor's, the image processor's) as
    /// this model's processors read them. The LLaVA family: CLIP's processor at the tower's
    /// size, transformers' uniform sampling.
    fn read_preprocessor(&self, video: &PreprocessorJson, image: &PreprocessorJson) -> Result<Preprocessing, LoadError> {
        let clip = PreprocessConfig::clip(self.image_size());
        Ok(Preprocessing {
            pixels: video.resolve(&clip)?,
            sampling: Sampling::Hf { n: self.default_frames() },
            images: image.resolve(&clip)?,
            tiles: None,
        })
    }

    /// The video's visual tokens and the placeholder they fill.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]`
    fn video(&self, pixels: Tensor<4>) -> Visual;

    /// [`Architecture::video`] with FastVID's salience of each token taken from the vision
    /// tower ([`Visual::salience`], [`crate::fastvid::tower_salience`]): the feature block's
    /// queries and keys, pooled as the connector pools the features. A model that encodes
    /// frames alone gets it from its frames' share; without a tower to probe, the video
    /// alone, and FastVID takes the salience from the projected tokens.
    fn video_probed(&self, pixels: Tensor<4>) -> Visual {
        match self.frames_alone() {
            Some(f) => f.video_of(f.share(pixels)),
            None => self.video(pixels),
        }
    }

    /// How [`Architecture::video`]'s tokens for `frames` frames are laid out (what a
    /// visual-token budget works on).
    fn video_grid(&self, frames: usize) -> FrameGrid;

    /// Where the model encodes each frame alone (Video-LLaVA, LLaVA-NeXT-Video, PLLaVA
    /// before its pooling, SmolVLM2), how: a live window ([`crate::live_window`]) then
    /// encodes each frame once, as it arrives. `None` where a video's frames are encoded
    /// together (MERV: ViViT's tubelets span frames, LanguageBind attends across them); a
    /// window then holds such a model's prepared frames and encodes them at question time.
    fn frames_alone(&self) -> Option<&dyn FramesAlone> {
        None
    }

    /// Live video: one frame's own share of a video's encoding ([`FramesAlone::share`]),
    /// `None` where frames are encoded together.
    ///
    /// # Shapes
    /// - pixels: `[1, 3, s, s]` (one preprocessed frame) -> tokens `[n, d]`, salience `[n]`
    fn frame_share(&self, pixels: Tensor<4>) -> Option<FrameShare> {
        self.frames_alone().map(|f| f.share(pixels))
    }

    /// A video's visual tokens from its frames' shares ([`Architecture::frame_share`]), in
    /// order: what [`Architecture::video_probed`] gives for those frames.
    fn video_from_shares(&self, shares: Vec<FrameShare>) -> Result<Visual, GenerateError> {
        let f =
            self.frames_alone().ok_or_else(|| GenerateError::Unsupported("this architecture encodes a video's frames together".into()))?;
        Ok(f.video_of(joined_shares(shares)?))
    }

    /// Whether the model takes a video at all (Idefics3 takes only still images); front
    /// ends ask before decoding any frame.
    fn supports_video(&self) -> bool {
        true
    }

    fn supports_images(&self) -> bool {
        false
    }

    /// Still images' visual tokens, from their RGB planes (0..=255) and the model's
    /// preprocessing.
    ///
    /// # Shapes
    /// - each planes: `[1, 3, h, w]`
    fn images(&self, _planes: Vec<Tensor<4>>, _prep: &Preprocessing) -> Result<Visual, LoadError> {
        Err(LoadError::Unsupported("this architecture takes no still images".into()))
    }

    /// The first turn's text, with placeholders for the `images` (in order) and, when
    /// `video`, for the video (whose frames were taken at those times).
    fn first_turn(&self, tok: &Tokenizer, question: &str, images: &[Visual], video: Option<&FrameTimes>) -> Result<String, GenerateError>;

    /// A later turn, after the last answer (whose final token may not have run yet).
    fn follow_up(&self, tok: &Tokenizer, question: &str) -> String;

    /// Whether the visual tokens go right after BOS rather than where a placeholder in
    /// the prompt text says (MERV, whose prompts have no placeholder).
    fn visuals_after_bos(&self) -> bool {
        false
    }

    /// How much each vision encoder weighed in the last video's tokens, by name, where
    /// the model mixes several (MERV); read back from the device.
    fn encoder_weights(&self) -> Option<Vec<(String, f32)>> {
        None
    }

    /// The vision encoders, in fusion order, where there are several (MERV); `None` for
    /// one tower.
    fn encoder_names(&self) -> Option<Vec<String>> {
        None
    }
}

/// A model whose frames' encodings depend on each frame alone
/// ([`Architecture::frames_alone`]).
pub trait FramesAlone {
    /// Frames' share of the video's encoding, for any number of frames: their tokens (as
    /// far as they depend on each frame alone), and FastVID's salience of them, or the
    /// tower's probe where the tokens are pooled across frames later. The share holds
    /// that, so that FastVID, should a question ask for it, finds the tower's salience
    /// without encoding a frame again.
    ///
    /// # Shapes
    /// - pixels: `[t, 3, s, s]` -> tokens `[t * n, d]`, salience `[t * n]`
    fn share(&self, pixels: Tensor<4>) -> FrameShare;

    /// The video of frames' share (one share, or frames' shares joined).
    fn video_of(&self, share: FrameShare) -> Visual;
}

/// One frame's share of a video's encoding ([`Architecture::frame_share`]), or frames'
/// shares joined. FastVID's salience of a frame's tokens comes with it: as the salience
/// itself where it depends on the frame alone, or as the tower's probe where the tokens
/// are pooled across frames later (PLLaVA), so that the window holds no more than it
/// needs.
#[derive(Clone)]
pub struct FrameShare {
    /// `[t * n, d]`
    pub tokens: Tensor<2>,
    /// `[t * n]` ([`crate::fastvid::tower_salience`])
    pub salience: Option<Tensor<1>>,
    /// The frames' attention probe, `[t, m, d_vis]` each.
    pub probe: Option<AttentionProbe>,
}

impl FrameShare {
    /// Tokens with FastVID's salience of them.
    pub(crate) fn with_salience(tokens: Tensor<2>, salience: Option<Tensor<1>>) -> Self {
        Self { tokens, salience, probe: None }
    }

    /// Without what only FastVID reads.
    fn tokens_only(self) -> Self {
        Self { tokens: self.tokens, salience: None, probe: None }
    }
}

/// Frames' shares ([`Architecture::frame_share`]) one after another, as one share of them
/// all (the salience, or the probe, where every frame has one).
///
/// # Shapes
/// - shares: t x (`[n, d]`, `[n]`, `[1, m, d_vis]`) -> `[t * n, d]`, `[t * n]`, `[t, m, d_vis]`
fn joined_shares(shares: Vec<FrameShare>) -> Result<FrameShare, GenerateError> {
    if shares.is_empty() {
        return Err(GenerateError::Unsupported("a video of no frames".into()));
    }
    let mut tokens = Vec::with_capacity(shares.len());
    let (mut salience, mut probes) = (Some(Vec::new()), Some(Vec::new()));
    for s in shares {
        tokens.push(s.tokens);
        salience = salience.zip(s.salience).map(|(mut v, x)| {
            v.push(x);
            v
        });
        probes = probes.zip(s.probe).map(|(mut v, x)| {
            v.push(x);
            v
        });
    }
    Ok(FrameShare { tokens: Tensor::cat(tokens, 0), salience: salience.map(|v| Tensor::cat(v, 0)), probe: probes.map(AttentionProbe::cat) })
}

/// How a registry entry loads its architecture (see [`Architecture::load`]).
type LoadFn = fn(&str, &Checkpoint, &LoadOptions, &Placement) -> Result<Box<dyn Architecture>, LoadError>;

/// One architecture of the registry: its `model_type` and how to load it.
pub struct Registration {
    pub model_type: &'static str,
    load: LoadFn,
}

const fn register<A: Architecture + 'static>(model_type: &'static str) -> Registration {
    fn boxed<A: Architecture + 'static>(
        config_json: &str,
        ck: &Checkpoint,
        opts: &LoadOptions,
        at: &Placement,
    ) -> Result<Box<dyn Architecture>, LoadError> {
        Ok(Box::new(A::load(config_json, ck, opts, at)?))
    }
    Registration { model_type, load: boxed::<A> }
}

/// Every architecture vidllm runs, by `config.json`'s `model_type`.
pub static REGISTRY: [Registration; 6] = [
    register::<VideoLlava>("video_llava"),
    register::<Pllava>("pllava"),
    register::<LlavaNextVideo>("llava_next_video"),
    register::<SmolVlm>("smolvlm"),
    register::<Idefics3>("idefics3"),
    register::<Merv>("merv"),
];

/// The `model_type`s of [`REGISTRY`].
pub fn supported() -> Vec<&'static str> {
    REGISTRY.iter().map(|r| r.model_type).collect()
}

/// `config.json` parsed as an architecture's own config struct.
pub fn parse_config<T: DeserializeOwned>(config_json: &str) -> Result<T, LoadError> {
    serde_json::from_str(config_json).map_err(|e| LoadError::Unsupported(format!("config.json: {e}")))
}

/// A video's visual tokens, possibly under a budget.
pub struct EncodedVideo {
    pub visual: Visual,
    /// The frames still in the video (indices into the frames encoded), when a reduction
    /// dropped some.
    pub frames: Option<Vec<usize>>,
    pub reduction: Option<ReductionReport>,
}

impl EncodedVideo {
    /// The times of the frames still in the video, of the `times` of those encoded.
    pub fn times(&self, times: &FrameTimes) -> FrameTimes {
        match &self.frames {
            Some(kept) => FrameTimes { times: kept.iter().map(|&i| times.times[i]).collect(), duration: times.duration },
            None => times.clone(),
        }
    }
}

/// A loaded video-language model: an [`Architecture`], the `model_type` it was found by,
/// and how its processors prepare frames and images.
pub struct VideoModel {
    model_type: &'static str,
    arch: Box<dyn Architecture>,
    prep: Preprocessing,
}

impl Deref for VideoModel {
    type Target = dyn Architecture;

    fn deref(&self) -> &Self::Target {
        &*self.arch
    }
}

impl VideoModel {
    /// A loaded architecture under its registry name, with its processors' configs.
    pub(crate) fn new(
        model_type: &'static str,
        arch: Box<dyn Architecture>,
        video: &PreprocessorJson,
        image: &PreprocessorJson,
    ) -> Result<Self, LoadError> {
        let prep = arch.read_preprocessor(video, image)?;
        Ok(Self { model_type, arch, prep })
    }

    /// How frames are sampled and prepared, and images.
    pub fn preprocessing(&self) -> &Preprocessing {
        &self.prep
    }

    /// A video's visual tokens (preprocessed frames `[t, 3, s, s]`), reduced to `budget`
    /// when one is given ([`crate::token_budget`]).
    pub fn encode_video(&self, pixels: Tensor<4>, budget: Option<&Budget>) -> Result<EncodedVideo, GenerateError> {
        let t = pixels.dims()[0];
        self.budgeted(self.video_for(pixels, budget), t, budget)
    }

    /// The video's tokens, with the tower's salience where FastVID will read it.
    fn video_for(&self, pixels: Tensor<4>, budget: Option<&Budget>) -> Visual {
        match budget {
            Some(b) if b.reduce == Reduce::FastVid => self.arch.video_probed(pixels),
            _ => self.arch.video(pixels),
        }
    }

    /// A video's visual tokens from its `t` frames' shares ([`Architecture::frame_share`]:
    /// a live window's frames, each encoded as it arrived), reduced to `budget` as
    /// [`VideoModel::encode_video`] does.
    pub fn encode_shares(&self, mut shares: Vec<FrameShare>, budget: Option<&Budget>) -> Result<EncodedVideo, GenerateError> {
        let t = shares.len();
        if budget.is_none_or(|b| b.reduce != Reduce::FastVid) {
            shares = shares.into_iter().map(FrameShare::tokens_only).collect();
        }
        self.budgeted(self.arch.video_from_shares(shares)?, t, budget)
    }

    fn budgeted(&self, visual: Visual, t: usize, budget: Option<&Budget>) -> Result<EncodedVideo, GenerateError> {
        let Some(budget) = budget else { return Ok(EncodedVideo { visual, frames: None, reduction: None }) };
        let grid = self.arch.video_grid(t);
        Ok(Self::encoded(reduce(visual, grid, budget)?, grid, t))
    }

    /// [`VideoModel::encode_video`] without blocking on the device (the browser).
    pub async fn encode_video_async(&self, pixels: Tensor<4>, budget: Option<&Budget>) -> Result<EncodedVideo, GenerateError> {
        let t = pixels.dims()[0];
        let visual = self.video_for(pixels, budget);
        let Some(budget) = budget else { return Ok(EncodedVideo { visual, frames: None, reduction: None }) };
        let grid = self.arch.video_grid(t);
        Ok(Self::encoded(reduce_async(visual, grid, budget).await?, grid, t))
    }

    fn encoded(r: Reduced, grid: FrameGrid, t: usize) -> EncodedVideo {
        // Frames of the grid are the frames given, except where the model pools time
        // (PLLaVA): then the frames given all stay, as far as the prompt is concerned.
        let frames = (grid.frames == t).then_some(r.frames);
        EncodedVideo { visual: r.visual, frames, reduction: Some(r.report) }
    }

    /// Still images (RGB planes `[1, 3, h, w]`, 0..=255) as the model's processor prepares
    /// and its tower encodes them.
    pub fn encode_images(&self, planes: Vec<Tensor<4>>) -> Result<Visual, LoadError> {
        self.arch.images(planes, &self.prep)
    }

    /// The registry entry a `config.json` names; unsupported architectures are refused by
    /// name, before any weights are looked for.
    pub fn registration(config_json: &str) -> Result<&'static Registration, LoadError> {
        let v: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| LoadError::Unsupported(format!("config.json is not JSON: {e}")))?;
        let model_type = v["model_type"].as_str();
        REGISTRY.iter().find(|r| Some(r.model_type) == model_type).ok_or_else(|| {
            LoadError::Unsupported(format!(
                "config.json: unsupported architecture {:?} (supported: {})",
                model_type.unwrap_or("missing model_type"),
                supported().join(", ")
            ))
        })
    }

    /// A model from its `config.json` text, an open checkpoint (files or memory) and its
    /// video and image preprocessor configs.
    pub fn from_checkpoint(
        config_json: &str,
        ck: &Checkpoint,
        opts: LoadOptions,
        video: &PreprocessorJson,
        image: &PreprocessorJson,
        at: &Placement,
    ) -> Result<Self, LoadError> {
        let r = Self::registration(config_json)?;
        Self::new(r.model_type, (r.load)(config_json, ck, &opts, at)?, video, image)
    }

    /// The `config.json` `model_type` this model was loaded as.
    pub fn model_type(&self) -> &'static str {
        self.model_type
    }

    /// Token ids of a first-turn `text` from this model's [`Architecture::first_turn`],
    /// each visual run in place: at its placeholders, or right after BOS.
    pub fn first_turn_ids(&self, tok: &Tokenizer, text: &str, visuals: &[Visual]) -> Result<Vec<u32>, LoadError> {
        if !self.arch.visuals_after_bos() {
            return Self::prompt_ids(tok, text, visuals);
        }
        let mut ids = tok.encode(text, tok.add_bos)?;
        // Each run's placeholder once after BOS (where the tokenizer adds one), in order;
        // no text can hold them, so the text's own tokens are left as they were.
        let at = usize::from(tok.bos.is_some() && ids.first() == tok.bos.as_ref());
        ids.splice(at..at, visuals.iter().map(|v| v.token));
        Self::expand(ids, visuals)
    }

    /// Token ids of a first-turn `text`, each placeholder expanded to its visual tokens.
    pub fn prompt_ids(tok: &Tokenizer, text: &str, visuals: &[Visual]) -> Result<Vec<u32>, LoadError> {
        // A template that writes BOS itself (Idefics3's `<|begin_of_text|>...`) gets no second
        // one, as transformers' `apply_chat_template(tokenize=True)` and llama.cpp do.
        let bos_in_text = tok.bos.is_some() && text.starts_with(&tok.token_text(tok.bos));
        Self::expand(tok.encode(text, tok.add_bos && !bos_in_text)?, visuals)
    }

    fn expand(mut ids: Vec<u32>, visuals: &[Visual]) -> Result<Vec<u32>, LoadError> {
        for v in visuals {
            ids = match &v.counts {
                Some(counts) => expand_placeholders_counted(&ids, v.token, counts)?,
                None => expand_placeholders(&ids, v.token, v.per_placeholder),
            };
        }
        Ok(ids)
    }
}
