//! The serving engine behind `serve` and `batch`: one thread that owns the model and
//! answers up to `parallel` requests at once with continuous batching.
//!
//! Each of the `parallel` slots is a [`Conversation`] with its own KV cache, allocated
//! once and reused. Every step, the single-token decodes of all running requests run as
//! one batched forward pass ([`Conversation::step_many`]); a new request joins between
//! steps (its media decoded and encoded, its prompt prefilled on its own), a finished or
//! abandoned one leaves. Requests wait in a bounded queue; a full queue is refused at once
//! (HTTP 429), never held.
//!
//! Encoded videos and images are kept by the SHA-256 of their bytes (and the frame
//! policy), so a follow-up about the same video skips decoding and the vision tower.

use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvError, TryRecvError};
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use sha2::{Digest, Sha256};
use vidllm_core::GenerateError;
use vidllm_core::chat::Message;
use vidllm_core::preprocess::PreprocessConfig;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row;
use vidllm_models::merge::Visual;
use vidllm_models::token_budget::{Budget, Reduce, ReductionReport};
use vidllm_models::video_model::LoadOptions;
use vidllm_models::{Conversation, GenerateParams, Model, Prompt, Step};
use vidllm_shaders::device::pick;
use vidllm_shaders::preprocess::rgb_planes;

use crate::ModelArgs;
use crate::ask::{SamplingArgs, pixels, read_image, sample_video};
use crate::metrics::Metrics;
use crate::progress::Progress;
use crate::runtime;
use crate::video::VideoReader;

/// What to load and how many requests to run at once (`serve` and `batch` take these).
#[derive(Args, Clone)]
pub struct EngineArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// llama.cpp's vision file for a text GGUF given as `--model` (`mmproj-*.gguf`).
    #[arg(long)]
    pub mmproj: Option<String>,
    /// Sequences decoded together, each with its own KV cache of `--ctx` tokens.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Encoded videos and images kept for later questions about the same file.
    #[arg(long, default_value_t = 8)]
    pub media_cache: usize,
}

/// The loaded model as the front ends describe it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name clients use (`model` in requests and `/v1/models`): the file or folder name.
    pub id: String,
    pub video: bool,
    pub device: String,
    /// Tokens of context each slot holds.
    pub context: usize,
    pub parallel: usize,
    /// Unix seconds when the model was loaded.
    pub created: u64,
}

/// A media file a request refers to: a path the engine decodes, named by its content.
pub struct Media {
    pub path: PathBuf,
    /// SHA-256 of the bytes, hex.
    pub hash: String,
    /// A data: URL's bytes written out: removed when the request is done with it.
    pub _temp: Option<tempfile::TempPath>,
}

impl Media {
    /// A file named by the SHA-256 of its bytes.
    pub fn from_file(path: PathBuf) -> std::io::Result<Self> {
        if !path.is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file"));
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
        Ok(Self { path, hash: hex(&hasher.finalize()), _temp: None })
    }

    /// Bytes sent with a request (a data: URL's), written to a temporary file that goes
    /// when the request is done with it.
    pub fn from_bytes(bytes: &[u8]) -> std::io::Result<Self> {
        let mut f = tempfile::Builder::new().prefix("vidllm-media-").tempfile()?;
        f.write_all(bytes)?;
        f.flush()?;
        let temp = f.into_temp_path();
        Ok(Self { path: temp.to_path_buf(), hash: hex(&Sha256::digest(bytes)), _temp: Some(temp) })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Frame controls of a request (each optional; the model's own policy otherwise).
#[derive(Debug, Clone, Default)]
pub struct FrameOptions {
    /// A policy by name: hf, linspace, pllava, fps, smolvlm.
    pub sampling: Option<String>,
    pub frames: Option<usize>,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
}

/// Most frames one request may ask for.
pub const MAX_FRAMES: usize = 256;

impl FrameOptions {
    /// The policy these options pick, starting from the model's `default`.
    pub fn policy(&self, default: Sampling) -> Result<Sampling, String> {
        for (what, n) in [("frames", self.frames), ("max_frames", self.max_frames)] {
            if let Some(n) = n
                && !(1..=MAX_FRAMES).contains(&n)
            {
                return Err(format!("{what} must be 1 to {MAX_FRAMES} (got {n})"));
            }
        }
        if let Some(fps) = self.fps
            && !(fps.is_finite() && fps > 0.0 && fps <= 120.0)
        {
            return Err(format!("fps must be above 0 and at most 120 (got {fps})"));
        }
        // A rate given without a policy: the model's own rate-based policy, else `fps`.
        let name = match (&self.sampling, self.fps, default.fps()) {
            (Some(n), _, _) => Some(n.clone()),
            (None, Some(_), Some(_)) => Some(default.name().to_string()),
            (None, Some(_), None) => Some("fps".to_string()),
            (None, None, _) => None,
        };
        let args = SamplingArgs {
            frames: self.frames,
            sampling: name,
            fps: self.fps.or(default.fps()).unwrap_or(1.0),
            max_frames: self.max_frames,
        };
        let policy = args.policy_or(default).map_err(|e| e.to_string())?;
        if policy.frames() > MAX_FRAMES {
            return Err(format!("at most {MAX_FRAMES} frames a request (the policy asks for {})", policy.frames()));
        }
        Ok(policy)
    }
}

/// One request: a conversation to answer.
pub struct Job {
    /// The turns, media parts taken out: the last is the user's question.
    pub turns: Vec<(Role, String)>,
    /// Images, in order; a video-language model sees them in the first user turn.
    pub images: Vec<Media>,
    pub video: Option<Media>,
    pub frames: FrameOptions,
    /// Refuse the request when its visual tokens exceed this, or reduce its video to it
    /// by `reduce`.
    pub max_visual_tokens: Option<usize>,
    pub reduce: Option<Reduce>,
    pub params: GenerateParams,
    pub sink: Box<dyn Sink>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// A request's `reduce` field, read beside its `max_visual_tokens` (a method without a
/// budget to reduce to is refused, as `ask --reduce` without `--max-visual-tokens` is).
pub fn parse_reduce(reduce: Option<&str>, max_visual_tokens: Option<usize>) -> Result<Option<Reduce>, String> {
    let reduce = reduce.map(str::parse::<Reduce>).transpose().map_err(|e| format!("reduce: {e}"))?;
    if reduce.is_some() && max_visual_tokens.is_none() {
        return Err("reduce needs max_visual_tokens (the budget to reduce to)".into());
    }
    Ok(reduce)
}

/// Where a request's events go. `send` returns `false` once nobody listens (the client
/// went away): the engine then ends the answer after the token at hand.
pub trait Sink: Send {
    fn send(&mut self, event: Event) -> bool;
    fn closed(&self) -> bool;
}

/// Tokens a request used.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Every prompt token, visual tokens included.
    pub prompt_tokens: usize,
    pub visual_tokens: usize,
    pub completion_tokens: usize,
}

/// How long a request's stages took, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub queued_ms: f64,
    /// Setting the request up: decoding, preprocessing and encoding its media (unless
    /// cached), rendering and tokenising its prompt.
    pub media_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub time_to_first_token_ms: f64,
}

/// The end of an answer.
#[derive(Debug, Clone)]
pub struct Done {
    pub finish_reason: &'static str,
    /// The whole answer (cut before a stop string).
    pub text: String,
    /// Text not yet sent as a piece (held back for a possible stop string, or a final
    /// unfinished character).
    pub tail: String,
    pub usage: Usage,
    pub times: StageTimes,
    /// Whether the video's encoding came from the cache.
    pub video_cached: bool,
    pub frames: usize,
    /// What a visual-token budget did to the video.
    pub reduction: Option<ReductionReport>,
}

/// A request that could not be answered: an HTTP status and a message for the user.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// OpenAI's error `code`, where one applies.
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: 400, kind: "invalid_request_error", code: None, message: message.into() }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self { status: 500, kind: "server_error", code: None, message: message.into() }
    }

    fn from_generate(e: GenerateError) -> Self {
        match e {
            GenerateError::PromptTooLong { .. } => {
                Self { status: 400, kind: "invalid_request_error", code: Some("context_length_exceeded"), message: e.to_string() }
            }
            GenerateError::Device(_) => Self::server(e.to_string()),
            _ => Self::bad_request(e.to_string()),
        }
    }
}

/// What the engine sends a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt was accepted: its prefill starts.
    Started,
    /// A piece of the answer.
    Piece(String),
    Done(Done),
    Error(ApiError),
}

/// An encoded video or image, kept by content.
struct Encoded {
    key: String,
    visual: Visual,
    times: Option<FrameTimes>,
    frames: usize,
    reduction: Option<ReductionReport>,
}

/// A request being answered in a slot.
struct Running {
    sink: Box<dyn Sink>,
    arrived: Instant,
    started: Instant,
    media_ms: f64,
    first_token: Option<Instant>,
    visual_tokens: usize,
    video_cached: bool,
    frames: usize,
    reduction: Option<ReductionReport>,
}

/// How a video model's frames are prepared: its preprocessing, its own frame policy, and
/// the device the pixels go to.
#[derive(Clone)]
struct FramePrep {
    pre: PreprocessConfig,
    default: Sampling,
    device: burn::tensor::Device,
}

pub struct Engine {
    model: Rc<Model>,
    tok: Rc<Tokenizer>,
    /// A video model's frame preparation (`None` for a text model).
    frames: Option<FramePrep>,
    slots: Vec<(Conversation, Option<Running>)>,
    cache: Vec<Encoded>,
    cache_size: usize,
    pub info: ModelInfo,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Load the model and allocate `parallel` slots (each a KV cache of the context).
    pub fn load(cfg: &EngineArgs, metrics: Arc<Metrics>, progress: Progress) -> Result<Self> {
        if cfg.parallel == 0 || cfg.parallel > 64 {
            bail!("--parallel must be 1 to 64 (got {})", cfg.parallel);
        }
        let parallel = cfg.parallel;
        let m = &cfg.model;
        let t0 = Instant::now();
        let (model, tok, frames, device_name) = if runtime::is_video_model(&m.model, cfg.mmproj.as_deref())? {
            let picked = pick(m.device)?;
            let at = m.storage.placement(&picked)?;
            let folder = runtime::load_video(&m.model, cfg.mmproj.as_deref(), &m.storage, LoadOptions::default(), &at, progress)?;
            let prep = FramePrep { pre: folder.pre, default: folder.sampling, device: picked.device };
            (Rc::new(Model::Video(folder.model)), Rc::new(folder.tok), Some(prep), picked.name)
        } else {
            let rt = runtime::load(m, progress)?;
            (rt.model, rt.tok, None, rt.device_name)
        };
        let context = runtime::context(m.ctx, model.decoder());
        let mut slots = Vec::with_capacity(parallel);
        for _ in 0..parallel {
            let mut conv = Conversation::new(model.clone(), tok.clone(), context);
            conv.set_kv(m.kv).map_err(|e| anyhow::anyhow!("--kv: {e}"))?;
            slots.push((conv, None));
        }
        let id = std::path::Path::new(&m.model).file_name().map_or(m.model.clone(), |n| n.to_string_lossy().into_owned());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let info = ModelInfo { id, video: frames.is_some(), device: device_name, context, parallel, created };
        eprintln!("loaded {} on {} in {:.1}s: {parallel} slot(s) of {context} tokens", info.id, info.device, t0.elapsed().as_secs_f64());
        Ok(Self { model, tok, frames, slots, cache: Vec::new(), cache_size: cfg.media_cache, info, metrics })
    }

    /// Answer requests from `jobs` until every sender is gone and nothing is running.
    pub fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            // Admit requests into free slots: wait for one when nothing runs.
            while let Some(free) = self.slots.iter().position(|(_, r)| r.is_none()) {
                let job = if self.running() == 0 {
                    match jobs.recv() {
                        Ok(j) => j,
                        Err(RecvError) => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                };
                self.metrics.queue_depth.dec();
                self.admit(free, job);
                self.metrics.running.set(self.running() as i64);
            }
            if self.running() > 0 {
                self.step();
                self.metrics.running.set(self.running() as i64);
            }
        }
    }

    fn running(&self) -> usize {
        self.slots.iter().filter(|(_, r)| r.is_some()).count()
    }

    /// Start a request in slot `i`: its media encoded (or found), its prompt accepted.
    fn admit(&mut self, i: usize, mut job: Job) {
        if job.sink.closed() {
            self.metrics.request("cancelled");
            return;
        }
        let started = Instant::now();
        match self.start(i, &job) {
            Ok((visual_tokens, video_cached, frames, reduction)) => {
                job.sink.send(Event::Started);
                let media_ms = started.elapsed().as_secs_f64() * 1e3;
                self.slots[i].1 = Some(Running {
                    sink: job.sink,
                    arrived: job.arrived,
                    started,
                    media_ms,
                    first_token: None,
                    visual_tokens,
                    video_cached,
                    frames,
                    reduction,
                });
            }
            Err(e) => {
                self.metrics.request(if e.status >= 500 { "error" } else { "invalid" });
                job.sink.send(Event::Error(e));
                self.slots[i].0.clear_visuals();
            }
        }
    }

    /// Set up slot `i`'s conversation for `job`. Returns its visual tokens, whether the
    /// video came from the cache, and the frames it was sampled to.
    fn start(&mut self, i: usize, job: &Job) -> Result<(usize, bool, usize, Option<ReductionReport>), ApiError> {
        let turns = &job.turns;
        if !matches!(turns.last(), Some((Role::User, _))) {
            return Err(ApiError::bad_request("the last message must be the user's"));
        }
        let has_media = !job.images.is_empty() || job.video.is_some();
        let (mut video_cached, mut frames, mut reduction) = (false, 0, None);
        let mut images = Vec::new();
        let mut video = None;
        if let Some(prep) = self.frames.clone() {
            let vm = self.model.video().expect("a video model");
            if job.video.is_some() && !vm.supports_video() {
                return Err(ApiError::bad_request(format!("{} takes still images only, not a video", vm.model_type())));
            }
            if !job.images.is_empty() && !vm.supports_images() {
                return Err(ApiError::bad_request(format!("{} takes no still images (send a video_url)", vm.model_type())));
            }
            for m in &job.images {
                images.push(self.encoded(&format!("image:{}", m.hash), |me| me.encode_image(&m.path, &prep))?.0.visual.clone());
            }
            if let Some(m) = &job.video {
                let policy = job.frames.policy(prep.default).map_err(ApiError::bad_request)?;
                let budget = match job.max_visual_tokens {
                    Some(max) => {
                        Some(Budget::new(max, job.reduce.unwrap_or(Reduce::None), policy.frames()).map_err(ApiError::bad_request)?)
                    }
                    None => None,
                };
                let key = format!("video:{}:{policy:?}:{budget:?}", m.hash);
                let (e, cached) = self.encoded(&key, |me| me.encode_video(&m.path, policy, budget.as_ref(), &prep))?;
                (video_cached, frames, reduction) = (cached, e.frames, e.reduction.clone());
                video = Some((e.visual.clone(), e.times.clone().expect("a video has frame times")));
            }
        } else if has_media {
            return Err(ApiError::bad_request(format!("{} is a text model: images and videos need a video-language model", self.info.id)));
        }
        let prompt = self.prompt(turns, &images, video.as_ref())?;
        let conv = &mut self.slots[i].0;
        conv.clear_visuals();
        for image in images {
            conv.add_encoded_image(image);
        }
        // A video FrameFusion reduces in the decoder counts at its budget.
        let fused_excess = video.as_ref().and_then(|(v, _)| v.fusion).map_or(0, |p| p.tokens.saturating_sub(p.budget));
        if let Some((v, times)) = video {
            conv.set_video(v, times);
        }
        let visual_tokens = conv.visual_tokens();
        if let Some(max) = job.max_visual_tokens
            && visual_tokens - fused_excess > max
        {
            return Err(ApiError::bad_request(format!(
                "the media make {visual_tokens} visual tokens, over max_visual_tokens {max} (ask for fewer frames)"
            )));
        }
        let result = match &prompt {
            PromptText::Tokens(ids) => conv.ask(Prompt::Tokens(ids), job.params.clone()),
            PromptText::Raw(text) => conv.ask(Prompt::Raw(text), job.params.clone()),
        };
        result.map_err(ApiError::from_generate)?;
        Ok((visual_tokens, video_cached, frames, reduction))
    }

    /// The request's turns as the model's prompt: a text model's chat template over all of
    /// them; a video model's own turn format (first turn with the media, then follow-ups).
    fn prompt(&self, turns: &[(Role, String)], images: &[Visual], video: Option<&(Visual, FrameTimes)>) -> Result<PromptText, ApiError> {
        let Some(vm) = self.model.video() else {
            let messages: Vec<Message> = turns.iter().map(|(r, t)| Message::new(r.name(), t)).collect();
            return Ok(PromptText::Tokens(self.tok.chat_tokens(&messages).map_err(ApiError::from_generate)?));
        };
        if images.is_empty() && video.is_none() {
            return Err(ApiError::from_generate(GenerateError::NoVisual));
        }
        // A placeholder written in a message would take the media's place (or add one
        // with no features): media come only as parts.
        let placeholders: Vec<String> = images.iter().chain(video.map(|(v, _)| v)).map(|v| self.tok.token_text(Some(v.token))).collect();
        for (n, (_, t)) in turns.iter().enumerate() {
            if let Some(p) = placeholders.iter().find(|p| !p.is_empty() && t.contains(p.as_str())) {
                return Err(ApiError::bad_request(format!(
                    "messages[{n}]: the text contains {p:?}, the model's media placeholder: send media as image_url / video_url parts"
                )));
            }
        }
        if turns.iter().any(|(r, _)| *r == Role::System) {
            return Err(ApiError::bad_request(format!(
                "{}'s turn format has no system message: put the instruction in the question",
                vm.model_type()
            )));
        }
        // user, (assistant, user)*: the format every follow-up of the conversation took.
        let mut text = String::new();
        for (n, (role, t)) in turns.iter().enumerate() {
            let expected = if n % 2 == 0 { Role::User } else { Role::Assistant };
            if *role != expected {
                return Err(ApiError::bad_request(format!(
                    "message {n}: expected a {} message (turns alternate, user first)",
                    expected.name()
                )));
            }
            match (n, role) {
                (0, _) => text = vm.first_turn(&self.tok, t, images, video.map(|(_, times)| times)).map_err(ApiError::from_generate)?,
                (_, Role::User) => text.push_str(&vm.follow_up(&self.tok, t)),
                _ => text.push_str(t),
            }
        }
        Ok(PromptText::Raw(text))
    }

    /// The cache entry `key`, made by `make` when missing (the oldest entry evicted), and
    /// whether it was found.
    fn encoded(&mut self, key: &str, make: impl FnOnce(&Self) -> Result<Encoded, ApiError>) -> Result<(&Encoded, bool), ApiError> {
        let found = self.cache.iter().position(|e| e.key == key);
        match found {
            Some(at) => {
                self.metrics.media_cache("hit");
                let e = self.cache.remove(at);
                self.cache.push(e);
            }
            None => {
                self.metrics.media_cache("miss");
                let mut e = make(self)?;
                e.key = key.to_string();
                if self.cache.len() >= self.cache_size.max(1) {
                    self.cache.remove(0);
                }
                self.cache.push(e);
            }
        }
        Ok((self.cache.last().expect("just pushed"), found.is_some()))
    }

    fn encode_video(
        &self,
        path: &std::path::Path,
        policy: Sampling,
        budget: Option<&Budget>,
        prep: &FramePrep,
    ) -> Result<Encoded, ApiError> {
        let media = |e: anyhow::Error| ApiError::bad_request(format!("video: {e:#}"));
        let reader = VideoReader::open(&path.to_string_lossy()).map_err(media)?;
        // A key-frame method chooses among more candidates than the frames it keeps.
        let policy = budget.map_or(policy, |b| policy.oversampled(b.reduce.candidates_per_frame()));
        let (frames, times) = sample_video(&reader, policy).map_err(media)?;
        let vm = self.model.video().expect("a video model");
        let e = vm.encode_video(pixels(&frames, &prep.pre, &prep.device), budget).map_err(ApiError::from_generate)?;
        let times = e.times(&times);
        let frames = times.times.len();
        Ok(Encoded { key: String::new(), visual: e.visual, times: Some(times), frames, reduction: e.reduction })
    }

    fn encode_image(&self, path: &std::path::Path, prep: &FramePrep) -> Result<Encoded, ApiError> {
        let media = |e: anyhow::Error| ApiError::bad_request(format!("image: {e:#}"));
        let frame = read_image(&path.to_string_lossy()).map_err(media)?;
        let planes = rgb_planes(&[&frame.rgb], frame.height, frame.width, &prep.device);
        let vm = self.model.video().expect("a video model");
        let visual = vm.encode_images(vec![planes]).map_err(|e| ApiError::bad_request(format!("image: {e}")))?;
        Ok(Encoded { key: String::new(), visual, times: None, frames: 1, reduction: None })
    }

    /// One step of every running request: the decodes batched, a new prompt prefilled.
    fn step(&mut self) {
        let t0 = Instant::now();
        let live: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].1.is_some()).collect();
        let mut convs: Vec<&mut Conversation> = self.slots.iter_mut().filter(|(_, r)| r.is_some()).map(|(c, _)| c).collect();
        let steps = Conversation::step_many(&mut convs);
        let mut generated = 0;
        for (i, step) in live.into_iter().zip(steps) {
            let (conv, running) = &mut self.slots[i];
            let run = running.as_mut().expect("live");
            let outcome = step.and_then(|s| match s {
                Step::Read(logits) => {
                    let row = read_row(logits)?;
                    if let Some(p) = conv.accept(&row)? {
                        generated += 1;
                        if run.first_token.is_none() {
                            run.first_token = Some(Instant::now());
                            self.metrics.ttft.observe(run.arrived.elapsed().as_secs_f64());
                        }
                        if !p.text.is_empty() && !run.sink.send(Event::Piece(p.text)) {
                            conv.abort();
                        }
                    }
                    Ok(None)
                }
                Step::Finished(f) => Ok(Some(f)),
            });
            match outcome {
                Ok(None) => {}
                Ok(Some(f)) => {
                    let mut run = running.take().expect("live");
                    let t = &f.timings;
                    let usage = Usage { prompt_tokens: t.prompt_tokens, visual_tokens: run.visual_tokens, completion_tokens: t.generated };
                    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                    let times = StageTimes {
                        queued_ms: ms(run.started - run.arrived),
                        media_ms: run.media_ms,
                        prefill_ms: ms(t.prefill),
                        decode_ms: ms(t.decode),
                        time_to_first_token_ms: run.first_token.map_or(0.0, |at| ms(at - run.arrived)),
                    };
                    self.metrics.prompt_tokens.inc_by(t.prompt_tokens as u64);
                    self.metrics.generated_tokens.inc_by(t.generated as u64);
                    let cancelled = f.reason == vidllm_models::FinishReason::Aborted;
                    self.metrics.request(if cancelled { "cancelled" } else { "ok" });
                    run.sink.send(Event::Done(Done {
                        finish_reason: f.reason.openai(),
                        text: f.text,
                        tail: f.tail,
                        usage,
                        times,
                        video_cached: run.video_cached,
                        frames: run.frames,
                        // FrameFusion's count is known once the prefill ran.
                        reduction: run.reduction.clone().map(|mut r| {
                            if let Some(fusion) = &f.fusion {
                                r.after_prefill(fusion);
                            }
                            r
                        }),
                    }));
                }
                Err(e) => {
                    let mut run = running.take().expect("live");
                    self.metrics.request("error");
                    run.sink.send(Event::Error(ApiError::from_generate(e)));
                    conv.reset();
                }
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        if generated > 0 && dt > 0.0 {
            self.metrics.decode_tok_s.set(generated as f64 / dt);
        }
    }
}

/// A prompt as the conversation takes it.
enum PromptText {
    Tokens(Vec<u32>),
    Raw(String),
}
