//! `ask`: questions about a video (and images) to a Video-LLaVA-format checkpoint.
//! Stages, each timed: decode frames -> preprocess on the device -> encode (vision tower
//! + projector) -> prefill -> stream the answer. Without `--prompt`, follow-up questions
//! reuse the video already in the KV cache.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson};
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::sampling::Sampling;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::{Visual, merge_embeddings};
use vidllm_models::video_model::{LoadOptions, VideoModel};
use vidllm_models::{GenerateParams, Session};
use vidllm_shaders::device::{DeviceChoice, pick};
use vidllm_shaders::preprocess::preprocess;

use crate::chat::drain;
use crate::video::{Frame, VideoReader};

#[derive(Args)]
pub struct AskArgs {
    /// Hugging Face-format model folder (Video-LLaVA).
    #[arg(long)]
    pub model: String,
    #[arg(long, required_unless_present = "rgb_frames")]
    pub video: Option<String>,
    /// Frames given directly instead of a video: packed RGB bytes, frame after frame
    /// (what `frames --dump` writes), with `--frame-size W,H`.
    #[arg(long, requires = "frame_size")]
    pub rgb_frames: Option<String>,
    #[arg(long, value_delimiter = ',')]
    pub frame_size: Option<Vec<usize>>,
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
    /// PLLaVA: pool frame tokens to T,H,W (default: the folder's pooling_shape).
    #[arg(long, value_delimiter = ',')]
    pub pool: Option<Vec<usize>>,
    /// PLLaVA: LoRA alpha used when merging the adapters (default 4, the paper's serving value).
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// q4_0 | q4_1 | q8_0 | f16 | f32: how the decoder is stored on the device.
    #[arg(long, default_value = "q4_1")]
    pub quant: QuantChoice,
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
    #[arg(long)]
    pub json: bool,
}

/// Which frames to sample.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// hf (transformers' uniform) | linspace (original repo) | pllava | fps
    #[arg(long, default_value = "hf")]
    pub sampling: String,
    /// With `--sampling fps`: frames per second to take...
    #[arg(long, default_value_t = 1.0)]
    pub fps: f64,
    /// ...and at most this many.
    #[arg(long, default_value_t = 32)]
    pub max_frames: usize,
}

impl SamplingArgs {
    pub fn policy(&self) -> Result<Sampling> {
        Ok(match self.sampling.as_str() {
            "hf" => Sampling::Hf { n: self.frames },
            "linspace" => Sampling::Linspace { n: self.frames },
            "pllava" => Sampling::Pllava { n: self.frames },
            "fps" => Sampling::Fps { fps: self.fps, max_frames: self.max_frames },
            o => bail!("unknown sampling {o:?} (hf, linspace, pllava, fps)"),
        })
    }
}

/// Preprocessing parameters from the folder, else CLIP defaults at the tower's size.
fn preprocess_config(dir: &Path, image_size: usize) -> Result<PreprocessConfig> {
    let defaults = PreprocessConfig::clip(image_size);
    for name in ["video_preprocessor_config.json", "preprocessor_config.json"] {
        let p = dir.join(name);
        if let Ok(text) = std::fs::read_to_string(&p) {
            let j: PreprocessorJson = serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?;
            return Ok(j.resolve(&defaults)?);
        }
    }
    Ok(defaults)
}

fn pixels(frames: &[Frame], cfg: &PreprocessConfig, device: &burn::tensor::Device) -> burn::tensor::Tensor<4> {
    let slices: Vec<&[u8]> = frames.iter().map(|f| f.rgb.as_slice()).collect();
    preprocess(&slices, frames[0].height, frames[0].width, cfg, device)
}

/// Where the frames come from: a video file, or raw RGB frames.
enum FrameSource {
    Video(VideoReader),
    Raw { path: String, width: usize, height: usize },
}

impl FrameSource {
    fn open(a: &AskArgs) -> Result<Self> {
        match (&a.video, &a.rgb_frames, &a.frame_size) {
            (_, Some(path), Some(size)) if size.len() == 2 => Ok(Self::Raw { path: path.clone(), width: size[0], height: size[1] }),
            (_, Some(_), _) => bail!("--frame-size takes W,H"),
            (Some(v), None, _) => Ok(Self::Video(VideoReader::open(v)?)),
            (None, None, _) => bail!("give --video or --rgb-frames"),
        }
    }

    fn frames(&self, policy: Sampling) -> Result<Vec<Frame>> {
        match self {
            Self::Video(r) => r.sample(policy),
            Self::Raw { path, width, height } => {
                let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
                let per = width * height * 3;
                if per == 0 || bytes.is_empty() || bytes.len() % per != 0 {
                    bail!("{path}: {} bytes is not a whole number of {width}x{height} RGB frames", bytes.len());
                }
                Ok(bytes
                    .chunks(per)
                    .enumerate()
                    .map(|(i, c)| Frame { index: i, pts: 0.0, width: *width, height: *height, rgb: c.to_vec() })
                    .collect())
            }
        }
    }
}

fn load_options(a: &AskArgs) -> Result<LoadOptions> {
    let pool = match &a.pool {
        None => None,
        Some(p) if p.len() == 3 => Some([p[0], p[1], p[2]]),
        Some(p) => bail!("--pool takes T,H,W (got {p:?})"),
    };
    Ok(LoadOptions { quant: a.quant, lora_alpha: a.lora_alpha, pool })
}

pub fn run(a: AskArgs) -> Result<()> {
    let dir = Path::new(&a.model);
    let opts = load_options(&a)?;
    let policy = a.sampling.policy()?;
    let source = FrameSource::open(&a)?;
    let picked = pick(a.device)?;
    let device = picked.device.clone();
    let t_load = Instant::now();
    let model = VideoModel::load(dir, opts, &device).with_context(|| format!("loading {}", a.model))?;
    let tok = Tokenizer::from_hf_dir(dir)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let pcfg = preprocess_config(dir, model.image_size())?;

    let t0 = Instant::now();
    let frames = source.frames(policy)?;
    let images: Vec<Frame> =
        a.image.iter().map(|p| VideoReader::open(p)?.frames_at(&[0]).map(|mut v| v.remove(0))).collect::<Result<_>>()?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let video_px = pixels(&frames, &pcfg, &device);
    let image_px: Vec<_> = images.iter().map(|f| pixels(std::slice::from_ref(f), &pcfg, &device)).collect();
    let preprocess_ms = t1.elapsed().as_secs_f64() * 1e3;
    let t2 = Instant::now();
    let mut visuals: Vec<Visual> = model.images(image_px).context("--image")?.into_iter().collect();
    visuals.push(model.video(video_px));
    let encode_sync = device.sync();
    encode_sync.map_err(|e| anyhow::anyhow!("device: {e:?}"))?;
    let encode_ms = t2.elapsed().as_secs_f64() * 1e3;
    let visual_tokens: usize = visuals.iter().map(|v| v.features.dims()[0]).sum();
    if !a.json {
        let stamps: Vec<String> = frames.iter().map(|f| format!("#{}@{:.2}s", f.index, f.pts)).collect();
        eprintln!("device: {}  load: {load_s:.2}s", picked.name);
        eprintln!("frames: {} [{}]  visual tokens: {visual_tokens}", frames.len(), stamps.join(" "));
        eprintln!("decode {decode_ms:.1} ms | preprocess {preprocess_ms:.1} ms | encode {encode_ms:.1} ms");
    }

    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig { temperature: a.temperature, seed: a.seed, ..Default::default() },
        stop: Vec::new(),
    };
    let mut session = Session::new(model.decoder(), a.ctx);
    let question = |q: &str| if a.raw { q.to_string() } else { model.first_turn(q, images.len()) };
    let Some(prompt) = a.prompt.clone() else {
        return interactive(&mut session, &tok, &model, visuals, params, &question);
    };
    let ids = VideoModel::prompt_ids(&tok, &question(&prompt), &visuals)?;
    let embeds = merge_embeddings(model.decoder(), &ids, &visuals)?;
    let mut stream = session.generate_embeds(&ids, embeds, &tok, params)?;
    let mut out = std::io::stdout().lock();
    let tokens = drain(&mut stream, &mut out, !a.json)?;
    let tail = stream.finish();
    let t = stream.timings.clone();
    if a.json {
        let frames_json: Vec<_> = frames.iter().map(|f| json!({"index": f.index, "pts": f.pts})).collect();
        writeln!(
            out,
            "{}",
            json!({
                "frames": frames_json, "visual_tokens": visual_tokens, "prompt_tokens": ids, "tokens": tokens,
                "text": stream.text(),
                "timings": {"load_s": load_s, "decode_ms": decode_ms, "preprocess_ms": preprocess_ms, "encode_ms": encode_ms,
                            "prefill_ms": t.prefill.as_secs_f64() * 1e3, "decode_tok_s": t.decode_tok_s(), "generated": t.generated},
                "device": picked.name,
            })
        )?;
    } else {
        writeln!(out, "{tail}")?;
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

/// Questions from stdin; the video is encoded once and stays in the KV cache.
fn interactive(
    session: &mut Session,
    tok: &Tokenizer,
    model: &VideoModel,
    visuals: Vec<Visual>,
    params: GenerateParams,
    question: &dyn Fn(&str) -> String,
) -> Result<()> {
    let stdin = std::io::stdin();
    let mut visuals = Some(visuals);
    eprint!("> ");
    for line in stdin.lock().lines() {
        let q = line?;
        if q.trim().is_empty() {
            eprint!("> ");
            continue;
        }
        let mut stream = match visuals.take() {
            Some(v) => {
                let ids = VideoModel::prompt_ids(tok, &question(&q), &v)?;
                let embeds = merge_embeddings(model.decoder(), &ids, &v)?;
                session.generate_embeds(&ids, embeds, tok, params.clone())?
            }
            None => {
                let ids = tok.encode(&VideoModel::follow_up(tok, &q), false)?;
                session.generate(&ids, tok, params.clone())?
            }
        };
        let mut out = std::io::stdout().lock();
        drain(&mut stream, &mut out, true)?;
        writeln!(out, "{}", stream.finish())?;
        eprintln!(
            "[prefill {} tokens in {:.1} ms | {:.1} tok/s]",
            stream.timings.prompt_tokens,
            stream.timings.prefill.as_secs_f64() * 1e3,
            stream.timings.decode_tok_s()
        );
        eprint!("> ");
    }
    Ok(())
}
