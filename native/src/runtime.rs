//! Loading a model, its tokenizer and a device, with load timing.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::mmproj::load_pair;
use vidllm_models::model_files::{Folder, ModelFiles};
use vidllm_models::video_model::LoadOptions;
use vidllm_models::{Llama, Model, config_from_gguf, load_llama};
use vidllm_shaders::device::Placement;

use crate::progress::Progress;
use crate::{ModelArgs, StorageArgs};
use vidllm_shaders::device;

pub struct Loaded {
    pub model: Rc<Model>,
    pub tok: Rc<Tokenizer>,
    pub device_name: String,
    pub load_time: Duration,
    pub context: usize,
    pub file_bytes: u64,
}

/// Default context when the user gives none: the model's, capped to bound KV memory.
pub const DEFAULT_CTX: usize = 4096;

pub fn load(args: &ModelArgs, progress: Progress) -> Result<Loaded> {
    if args.storage.vision_quant.is_some() {
        bail!("--vision-quant applies to video-language models (their vision towers): {} is a text model", args.model);
    }
    if Path::new(&args.model).is_dir() {
        return load_folder(args, progress);
    }
    if args.storage.quant.is_some() {
        bail!("--quant applies to Hugging Face folders: {} is a GGUF file, which keeps its own types", args.model);
    }
    let t0 = Instant::now();
    let mut g = Gguf::open(&args.model).with_context(|| format!("loading {}", args.model))?;
    // The architecture and shapes are checked before anything touches a device.
    config_from_gguf(&g).with_context(|| format!("loading {}", args.model))?;
    let tok = Tokenizer::from_gguf(&g).context("building the tokenizer")?;
    let picked = device::pick(args.device)?;
    let placement = args.storage.placement(&picked)?;
    let model = progress.loading(&args.model, |on_read| {
        g.on_read(on_read);
        load_llama(&g, &placement)
    });
    let model = model.with_context(|| format!("loading {}", args.model))?;
    Ok(Loaded::text(model, tok, picked.name, args, t0, g.file_len()))
}

impl Loaded {
    /// A loaded text decoder, its context the user's (or [`DEFAULT_CTX`]) within its RoPE table.
    fn text(model: Llama, tok: Tokenizer, device_name: String, args: &ModelArgs, t0: Instant, file_bytes: u64) -> Self {
        let context = context(args.ctx, &model);
        Self { model: Rc::new(Model::Text(model)), tok: Rc::new(tok), device_name, load_time: t0.elapsed(), context, file_bytes }
    }
}

/// The context to allocate: the user's (or [`DEFAULT_CTX`]) within the decoder's RoPE table.
pub fn context(ctx: Option<usize>, decoder: &Llama) -> usize {
    ctx.unwrap_or(DEFAULT_CTX).min(decoder.rope_positions()).max(2)
}

/// A Hugging Face `*ForCausalLM` folder, quantised on load.
fn load_folder(args: &ModelArgs, progress: Progress) -> Result<Loaded> {
    let t0 = Instant::now();
    let dir = Path::new(&args.model);
    let files = ModelFiles::Dir(dir.to_path_buf());
    let loading = || format!("loading {}", args.model);
    if files.text_family().with_context(loading)?.is_none() {
        bail!("{}: config.json does not name a text model (llama, qwen2, qwen3); video model folders are for `ask`", args.model);
    }
    let file_bytes = files.weight_files().with_context(loading)?.iter().filter_map(|f| dir.join(f).metadata().ok()).map(|m| m.len()).sum();
    let picked = device::pick(args.device)?;
    let quant = args.storage.quant.unwrap_or(QuantChoice::Q4_1);
    let placement = args.storage.placement(&picked)?;
    let (model, tok) = progress.loading(&args.model, |on_read| files.load_text(quant, &placement, Some(on_read))).with_context(loading)?;
    Ok(Loaded::text(model, tok, picked.name, args, t0, file_bytes))
}

/// Tokenizer only (no device, no weights): a GGUF file's, or a folder's `tokenizer.json`.
pub fn load_tokenizer(path: &str) -> Result<Tokenizer> {
    if Path::new(path).is_dir() {
        return ModelFiles::Dir(path.into()).tokenizer().with_context(|| format!("loading {path}"));
    }
    let g = Gguf::open(path).with_context(|| format!("loading {path}"))?;
    Ok(Tokenizer::from_gguf(&g)?)
}

/// A video-language model: a folder (`config.json` naming a registered architecture), or a
/// text GGUF with llama.cpp's `--mmproj` vision file.
pub fn load_video(
    model: &str,
    mmproj: Option<&str>,
    storage: &StorageArgs,
    opts: LoadOptions,
    at: &Placement,
    progress: Progress,
) -> Result<Folder> {
    progress
        .loading(model, |on_read| -> Result<Folder> {
            let Some(mmproj) = mmproj else {
                return Ok(ModelFiles::Dir(Path::new(model).to_path_buf()).load_reporting(storage.apply(opts), at, Some(on_read))?);
            };
            if storage.given() {
                bail!("--quant and --vision-quant apply to a model folder; a GGUF pair keeps the types it was written with");
            }
            let mut text = Gguf::open(model)?;
            text.on_read(on_read);
            let mm = Gguf::open(mmproj).with_context(|| format!("--mmproj {mmproj}"))?;
            Ok(load_pair(&text, &mm, at)?)
        })
        .with_context(|| format!("loading {model}"))
}

/// Whether `model` (with `mmproj`) is a video-language model rather than a text decoder:
/// a GGUF with an `--mmproj`, or a folder whose `config.json` names no text family.
pub fn is_video_model(model: &str, mmproj: Option<&str>) -> Result<bool> {
    if mmproj.is_some() {
        return Ok(true);
    }
    if !Path::new(model).is_dir() {
        return Ok(false);
    }
    let family = ModelFiles::Dir(model.into()).text_family().with_context(|| format!("loading {model}"))?;
    Ok(family.is_none())
}
