//! `ask`: questions about a video (and images) to a video-language model folder.
//! Stages, each timed: decode frames -> preprocess on the device -> encode (vision tower,
//! then the connector) -> prefill -> stream the answer. Without `--prompt`, follow-up
//! questions reuse the video already in the KV cache.

use std::io::{BufRead, Write};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value as Json, json};
use vidllm_core::preprocess::PreprocessConfig;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::sampling::{FrameTimes, Sampling};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::token_budget::{Budget, Reduce};
use vidllm_models::video_model::{LoadOptions, VideoModel};
use vidllm_models::{Conversation, GenerateParams, KvChoice, Model, Prompt};
use vidllm_shaders::device::{DeviceChoice, Picked, pick};
use vidllm_shaders::preprocess::{preprocess, rgb_planes};

use crate::chat::{drain, drain_with};
use crate::progress::Progress;
use crate::video::{Frame, VideoReader};
use crate::{StorageArgs, runtime};

#[derive(Args)]
pub struct AskArgs {
    /// Hugging Face-format model folder (`config.json` `model_type`: video_llava, pllava,
    /// llava_next_video, smolvlm, idefics3), or a text GGUF with `--mmproj`.
    #[arg(long)]
    pub model: String,
    /// The video (or `--rgb-frames`; with neither, the question is about the `--image`s).
    #[arg(long, required_unless_present_any = ["rgb_frames", "image"])]
    pub video: Option<String>,
    /// Frames given directly instead of a video: packed RGB bytes, frame after frame
    /// (what `frames --dump` writes), with `--frame-size W,H`.
    #[arg(long, requires = "frame_size")]
    pub rgb_frames: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub frame_size: Option<Vec<usize>>,
    /// With `--rgb-frames`: when each frame was taken, in seconds (models whose prompt
    /// states it: SmolVLM2). Default: 24 frames a second.
    #[arg(long, value_delimiter = ',', requires = "rgb_frames")]
    pub frame_times: Option<Vec<f64>>,
    /// With `--rgb-frames`: the video's length in seconds (default: frames / 24, or the
    /// last of `--frame-times`).
    #[arg(long, requires = "rgb_frames")]
    pub video_duration: Option<f64>,
    /// Image files to add (each becomes an `<image>` placeholder, before the video).
    #[arg(long)]
    pub image: Vec<String>,
    /// The question; without it, an interactive loop reads questions from stdin.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Use the prompt as given (placeholders included), without the conversation template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub budget: BudgetArgs,
    /// PLLaVA: pool frame tokens to T,H,W (default: the folder's pooling_shape).
    #[arg(long, value_delimiter = ',')]
    pub pool: Option<Vec<usize>>,
    /// PLLaVA: LoRA alpha used when merging the adapters (default 4, the paper's serving value).
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// llama.cpp's vision file for a text GGUF given as `--model` (`mmproj-*.gguf`, as
    /// `convert_hf_to_gguf.py --mmproj` writes it): the pair is one video-language model.
    #[arg(long)]
    pub mmproj: Option<String>,
    #[command(flatten)]
    pub answer: AnswerArgs,
    #[arg(long)]
    pub json: bool,
    /// Write the first answer token's logits to this file (f32 little-endian, one a
    /// vocabulary entry): runs under different budgets compared by their KL divergence
    /// (`tests/scripts/bench_budget.py`).
    #[arg(long)]
    pub first_logits: Option<std::path::PathBuf>,
}

/// How a video-language model answers (`ask`, `watch`): where it runs, its context and
/// KV cache, and the sampling.
#[derive(Args, Clone)]
pub struct AnswerArgs {
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// What the KV cache keeps keys and values in: auto | f32 | f16 | q8_0 | q4_0 (auto: f16
    /// where the decoder's heads are whole 32-value blocks, else f32).
    #[arg(long, default_value = "auto")]
    pub kv: KvChoice,
    /// MERV: a device for each encoder, in fusion order (LanguageBind, DINOv2, ViViT,
    /// SigLIP; the list repeats when shorter): `cpu`, `gpu`, `gpu:N` (the N-th adapter), or
    /// `auto` (the hardware GPUs in turn, where there are two or more). The fusion and the
    /// decoder stay on `--device`.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
}

impl AnswerArgs {
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig { temperature: self.temperature, seed: self.seed, ..Default::default() },
            stop: Vec::new(),
        }
    }

    /// Where MERV's encoders run (`--devices`), each device with its name.
    pub fn encoder_devices(&self) -> Result<Vec<Picked>> {
        let Some(names) = &self.devices else { return Ok(Vec::new()) };
        if names.iter().any(|n| n == "auto") {
            if names.len() > 1 {
                bail!("--devices auto stands alone (got {})", names.join(","));
            }
            let gpus = vidllm_shaders::device::hardware_gpus();
            return Ok(if gpus.len() >= 2 { gpus } else { Vec::new() });
        }
        names.iter().map(|n| vidllm_shaders::device::pick_named(n).map_err(|e| anyhow::anyhow!("--devices: {e}"))).collect()
    }

    /// A conversation with this context and KV cache (a type the heads cannot take is refused).
    pub fn conversation(&self, model: Rc<Model>, tok: Rc<Tokenizer>) -> Result<Conversation> {
        let mut conv = Conversation::new(model, tok, self.ctx);
        conv.set_kv(self.kv).map_err(|e| anyhow::anyhow!("--kv: {e}"))?;
        Ok(conv)
    }
}

/// A visual-token budget for the video.
#[derive(Args, Clone)]
pub struct BudgetArgs {
    /// At most this many visual tokens for the video (a larger video is reduced by
    /// `--reduce`, or refused with `none`).
    #[arg(long)]
    pub max_visual_tokens: Option<usize>,
    /// How a video over `--max-visual-tokens` is reduced: none (refused), slowfast
    /// (SlowFast-LLaVA's pathways), maxinfo (MaxInfo's key frames, chosen from twice the
    /// frames), fastvid (FastVID's density pruning within scenes; kept tokens keep their
    /// positions), framefusion (FrameFusion's merging across frames, then pruning by
    /// attention, inside the decoder; the budget is the tokens a layer processes on
    /// average). Default: none.
    #[arg(long, requires = "max_visual_tokens")]
    pub reduce: Option<Reduce>,
}

impl BudgetArgs {
    /// The budget asked for, for a video sampled to `frames` frames.
    pub fn budget(&self, frames: usize) -> Result<Option<Budget>> {
        let Some(max) = self.max_visual_tokens else { return Ok(None) };
        Ok(Some(Budget::new(max, self.reduce.unwrap_or(Reduce::None), frames).map_err(|e| anyhow::anyhow!("--max-visual-tokens: {e}"))?))
    }
}

/// Which frames to sample.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Frames to take (with a rate-based policy, the most). Default: the model's (8 for
    /// the LLaVA family, the folder's max_frames for SmolVLM2).
    #[arg(long)]
    pub frames: Option<usize>,
    /// hf (transformers' uniform) | linspace (original repo) | pllava | fps | smolvlm
    /// (SmolVLM2's processor). Default: the model's own (hf; smolvlm for SmolVLM2).
    #[arg(long)]
    pub sampling: Option<String>,
    /// With `--sampling fps` or `smolvlm`: frames per second to take...
    #[arg(long, default_value_t = 1.0)]
    pub fps: f64,
    /// ...and at most this many (default: --frames, else 32).
    #[arg(long)]
    pub max_frames: Option<usize>,
}

impl SamplingArgs {
    /// The policy named, else `default` (the model's own), with `--frames` applied.
    pub fn policy_or(&self, default: Sampling) -> Result<Sampling> {
        Ok(match &self.sampling {
            Some(name) => {
                let max_frames = self.max_frames.or(self.frames).unwrap_or(32);
                Sampling::from_name(name, self.frames.unwrap_or(default.frames()), self.fps, max_frames)?
            }
            None => self.frames.map_or(default, |n| default.with_frames(n)),
        })
    }
}

pub fn pixels(frames: &[Frame], cfg: &PreprocessConfig, device: &burn::tensor::Device) -> burn::tensor::Tensor<4> {
    let slices: Vec<&[u8]> = frames.iter().map(|f| f.rgb.as_slice()).collect();
    preprocess(&slices, frames[0].height, frames[0].width, cfg, device)
}

/// The rate raw frames (and a video without one) are taken to have, for prompts that state
/// frame times: transformers' fallback when a video's metadata has no rate.
const RAW_FPS: f64 = 24.0;

/// A still image file (any format the ffmpeg libraries read) as one RGB frame.
pub fn read_image(path: &str) -> Result<Frame> {
    Ok(VideoReader::open(path)?.frames_at(&[0])?.remove(0))
}

/// The frames `policy` picks from a video, and when they were taken.
pub fn sample_video(r: &VideoReader, policy: Sampling) -> Result<(Vec<Frame>, FrameTimes)> {
    let frames = r.sample(policy)?;
    let indices: Vec<usize> = frames.iter().map(|f| f.index).collect();
    let fps = if r.info.fps > 0.0 { r.info.fps } else { RAW_FPS };
    Ok((frames, FrameTimes::of_indices(&indices, r.info.frames, fps)))
}

/// Where the frames come from: a video file, or raw RGB frames.
enum FrameSource {
    Video(VideoReader),
    Raw { path: String, width: usize, height: usize, times: Option<Vec<f64>>, duration: Option<f64> },
}

impl FrameSource {
    fn open(a: &AskArgs) -> Result<Self> {
        match (&a.video, &a.rgb_frames, &a.frame_size) {
            (_, Some(path), Some(size)) if size.len() == 2 => Ok(Self::Raw {
                path: path.clone(),
                width: size[0],
                height: size[1],
                times: a.frame_times.clone(),
                duration: a.video_duration,
            }),
            (_, Some(_), _) => bail!("--frame-size takes W,H"),
            (Some(v), None, _) => Ok(Self::Video(VideoReader::open(v)?)),
            (None, None, _) => bail!("give --video or --rgb-frames"),
        }
    }

    /// The frames `policy` picks, and when they were taken.
    fn frames(&self, policy: Sampling) -> Result<(Vec<Frame>, FrameTimes)> {
        match self {
            Self::Video(r) => sample_video(r, policy),
            Self::Raw { path, width, height, times, duration } => {
                let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
                let per = width * height * 3;
                if per == 0 || bytes.is_empty() || bytes.len() % per != 0 {
                    bail!("{path}: {} bytes is not a whole number of {width}x{height} RGB frames", bytes.len());
                }
                let frames: Vec<Frame> = bytes
                    .chunks(per)
                    .enumerate()
                    .map(|(i, c)| Frame { index: i, pts: i as f64 / RAW_FPS, width: *width, height: *height, rgb: c.to_vec() })
                    .collect();
                let indices: Vec<usize> = (0..frames.len()).collect();
                let mut at = FrameTimes::of_indices(&indices, frames.len(), RAW_FPS);
                if let Some(t) = times {
                    if t.len() != frames.len() || t.iter().any(|x| !x.is_finite() || *x < 0.0) {
                        bail!("--frame-times: {} times for {} frames (each a finite number of seconds)", t.len(), frames.len());
                    }
                    at = FrameTimes { times: t.clone(), duration: t.iter().copied().fold(0.0, f64::max) };
                }
                if let Some(d) = duration {
                    if !d.is_finite() || *d < 0.0 {
                        bail!("--video-duration {d}: a finite number of seconds");
                    }
                    at.duration = *d;
                }
                Ok((frames, at))
            }
        }
    }
}

fn load_options(a: &AskArgs, encoders: &[Picked]) -> Result<LoadOptions> {
    let pool = match &a.pool {
        None => None,
        Some(p) if p.len() == 3 => Some([p[0], p[1], p[2]]),
        Some(p) => bail!("--pool takes T,H,W (got {p:?})"),
    };
    Ok(LoadOptions {
        lora_alpha: a.lora_alpha,
        pool,
        encoder_placements: encoders.iter().map(|p| a.storage.placement(p)).collect::<Result<_>>()?,
        ..Default::default()
    })
}

pub fn run(a: AskArgs) -> Result<()> {
    let encoders = a.answer.encoder_devices()?;
    let opts = load_options(&a, &encoders)?;
    // No video: a question about the images alone.
    let source = if a.video.is_none() && a.rgb_frames.is_none() { None } else { Some(FrameSource::open(&a)?) };
    let picked = pick(a.answer.device)?;
    let device = picked.device.clone();
    let progress = Progress::new(a.json);
    let t_load = Instant::now();
    let folder = runtime::load_video(&a.model, a.mmproj.as_deref(), &a.storage, opts, &a.storage.placement(&picked)?, progress)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let pcfg = folder.pre;
    let policy = a.sampling.policy_or(folder.sampling)?;
    let budget = a.budget.budget(policy.frames())?;
    // A key-frame method chooses among more candidates than the frames it keeps.
    let policy = budget.map_or(policy, |b| policy.oversampled(b.reduce.candidates_per_frame()));
    let model = Rc::new(Model::Video(folder.model));
    let vm = model.video().expect("a video-language model was loaded");
    let encoder_devices = placed_encoders(vm, &a.answer, &encoders)?;
    if source.is_some() && !vm.supports_video() {
        bail!("{}: {} takes still images only, not a video (ask with --image)", a.model, vm.model_type());
    }

    let t0 = Instant::now();
    let (frames, times) = match &source {
        Some(s) => {
            let (f, t) = progress.during("decoding frames".into(), || s.frames(policy))?;
            (f, Some(t))
        }
        None => (Vec::new(), None),
    };
    let images: Vec<Frame> = a.image.iter().map(|p| read_image(p)).collect::<Result<_>>()?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let video_px = (!frames.is_empty()).then(|| pixels(&frames, &pcfg, &device));
    // Images go to the model as RGB planes: its processor prepares them (resize and crop, or tiles).
    let image_px: Vec<_> = images.iter().map(|f| rgb_planes(&[&f.rgb], f.height, f.width, &device)).collect();
    let preprocess_ms = t1.elapsed().as_secs_f64() * 1e3;
    let t2 = Instant::now();
    let (mut reduction, mut kept_frames) = (None, None::<Vec<usize>>);
    let mut conv = a.answer.conversation(model.clone(), Rc::new(folder.tok))?;
    progress.during(format!("encoding {} frames", frames.len()), || -> Result<()> {
        if let (Some(px), Some(times)) = (video_px, times) {
            let encoded = vm.encode_video(px, budget.as_ref())?;
            if let Some(r) = &encoded.reduction
                && let Some(note) = &r.note
                && !a.json
            {
                eprintln!("note: {note}");
            }
            conv.set_video(encoded.visual.clone(), encoded.times(&times));
            kept_frames = encoded.frames.clone();
            reduction = encoded.reduction;
        }
        for px in image_px {
            conv.add_image(px).context("--image")?;
        }
        device.sync().map_err(|e| anyhow::anyhow!("device: {e:?}"))
    })?;
    let encode_ms = t2.elapsed().as_secs_f64() * 1e3;
    let visual_tokens = conv.visual_tokens();
    if !a.json {
        let stamps: Vec<String> = frames.iter().map(|f| format!("#{}@{:.2}s", f.index, f.pts)).collect();
        eprintln!("device: {}  load: {load_s:.2}s", picked.name);
        eprintln!("frames: {} [{}]  visual tokens: {visual_tokens}", frames.len(), stamps.join(" "));
        eprintln!("decode {decode_ms:.1} ms | preprocess {preprocess_ms:.1} ms | encode {encode_ms:.1} ms");
        if let Some(r) = &reduction {
            eprintln!(
                "{}: {} -> {} visual tokens, {} -> {} frames ({:.1} ms)",
                r.method, r.tokens_before, r.tokens_after, r.frames_before, r.frames_after, r.reduce_ms
            );
        }
        if let Some(w) = vm.encoder_weights() {
            let w: Vec<String> = w.iter().map(|(name, v)| format!("{name} {v:.3}")).collect();
            eprintln!("encoder weights: {}", w.join(", "));
        }
    }

    let params = a.answer.params();
    let Some(question) = a.prompt.clone() else {
        return interactive(&mut conv, params, a.raw);
    };
    conv.ask(if a.raw { Prompt::Raw(&question) } else { Prompt::Question(&question) }, params)?;
    let mut out = std::io::stdout().lock();
    let mut first: Option<Vec<f32>> = None;
    let f = drain_with(&mut conv, &mut out, !a.json, |t| {
        let row = vidllm_models::generate::read_row(t)?;
        if a.first_logits.is_some() && first.is_none() {
            first = Some(row.clone());
        }
        Ok(row)
    })?;
    if let (Some(path), Some(row)) = (&a.first_logits, &first) {
        let bytes: Vec<u8> = row.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("--first-logits {}", path.display()))?;
    }
    let t = &f.timings;
    // FrameFusion reduced the video in the decoder: what it kept is known now.
    if let (Some(r), Some(fusion)) = (reduction.as_mut(), &f.fusion) {
        r.after_prefill(fusion);
        if !a.json {
            eprintln!(
                "framefusion in the decoder: {} -> {} visual tokens, by layer {:?} ({:.1} ms)",
                r.tokens_before, r.tokens_after, fusion.layer_tokens, fusion.reduce_ms
            );
        }
    }
    if a.json {
        // The frames the answer saw (a key-frame method keeps some of those decoded).
        let seen = |i: &usize| kept_frames.as_ref().is_none_or(|k| k.contains(i));
        let frames_json: Vec<_> =
            frames.iter().enumerate().filter(|(i, _)| seen(i)).map(|(_, f)| json!({"index": f.index, "pts": f.pts})).collect();
        // What the decoder found: the frame count and rate the policy sampled on, and a
        // rotation applied to make the frames upright.
        let video = match &source {
            Some(FrameSource::Video(r)) => json!({"total_frames": r.info.frames, "fps": r.info.fps, "rotation": r.info.rotation,
                                                  "variable_rate": r.info.variable_rate, "width": r.info.width, "height": r.info.height}),
            _ => Json::Null,
        };
        // The prompt as run: the conversation's tokens before the answer.
        let prompt_ids = &conv.history()[..conv.history().len() - f.tokens.len()];
        // MERV: how much each encoder weighed in the visual tokens.
        let encoder_weights: Option<serde_json::Map<String, Json>> =
            vm.encoder_weights().map(|w| w.into_iter().map(|(name, v)| (name, json!(v))).collect());
        writeln!(
            out,
            "{}",
            json!({
                "video": video, "frames": frames_json, "visual_tokens": visual_tokens, "prompt_tokens": prompt_ids, "tokens": f.tokens,
                "text": f.text, "finish_reason": f.reason.openai(),
                "timings": {"load_s": load_s, "decode_ms": decode_ms, "preprocess_ms": preprocess_ms, "encode_ms": encode_ms,
                            "prefill_ms": t.prefill.as_secs_f64() * 1e3, "decode_tok_s": t.decode_tok_s(), "generated": t.generated},
                "device": picked.name, "reduction": reduction, "encoder_weights": encoder_weights, "encoder_devices": encoder_devices,
            })
        )?;
    } else {
        eprintln!(
            "prefill {:.1} ms ({} tokens) | generated {} tokens, {:.1} tok/s",
            t.prefill.as_secs_f64() * 1e3,
            t.prompt_tokens,
            t.generated,
            t.decode_tok_s()
        );
    }
    Ok(())
}

/// Which device each of MERV's encoders runs on (`--devices`), by encoder name, said on
/// stderr; `--devices` for a model with one vision tower is refused.
pub fn placed_encoders(vm: &VideoModel, answer: &AnswerArgs, encoders: &[Picked]) -> Result<Option<serde_json::Map<String, Json>>> {
    if answer.devices.is_none() {
        return Ok(None);
    }
    let Some(names) = vm.encoder_names() else {
        bail!("--devices places MERV's encoders; {} has one vision tower (use --device)", vm.model_type());
    };
    if encoders.is_empty() {
        eprintln!("--devices auto: fewer than two hardware GPUs, every encoder on the model's device");
        return Ok(None);
    }
    let placed: serde_json::Map<String, Json> =
        names.iter().enumerate().map(|(i, n)| (n.clone(), json!(encoders[i % encoders.len()].name))).collect();
    let said: Vec<String> = names.iter().enumerate().map(|(i, n)| format!("{n} on {}", encoders[i % encoders.len()].name)).collect();
    eprintln!("encoders: {}", said.join(", "));
    Ok(Some(placed))
}

/// Questions from stdin; the video is encoded once and stays in the KV cache. A refused
/// question (too long for the context) is reported and the conversation goes on.
fn interactive(conv: &mut Conversation, params: GenerateParams, raw_first: bool) -> Result<()> {
    let stdin = std::io::stdin();
    eprint!("> ");
    for line in stdin.lock().lines() {
        let q = line?;
        if q.trim().is_empty() {
            eprint!("> ");
            continue;
        }
        let prompt = if raw_first && conv.history().is_empty() { Prompt::Raw(&q) } else { Prompt::Question(&q) };
        if let Err(e) = conv.ask(prompt, params.clone()) {
            eprintln!("error: {e}");
            eprint!("> ");
            continue;
        }
        let f = drain(conv, &mut std::io::stdout().lock(), true)?;
        let t = &f.timings;
        eprintln!("[prefill {} tokens in {:.1} ms | {:.1} tok/s]", t.prompt_tokens, t.prefill.as_secs_f64() * 1e3, t.decode_tok_s());
        eprint!("> ");
    }
    Ok(())
}
