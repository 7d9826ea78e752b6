//! Loading a model, its tokenizer and a device, with load timing.

use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{Model, config_from_gguf, load_llama};

use crate::ModelArgs;
use crate::progress::Progress;
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
const DEFAULT_CTX: usize = 4096;

pub fn load(args: &ModelArgs, progress: Progress) -> Result<Loaded> {
    let t0 = Instant::now();
    let mut g = Gguf::open(&args.model).with_context(|| format!("loading {}", args.model))?;
    // The architecture and shapes are checked before anything touches a device.
    config_from_gguf(&g).with_context(|| format!("loading {}", args.model))?;
    let tok = Tokenizer::from_gguf(&g).context("building the tokenizer")?;
    let picked = device::pick(args.device)?;
    let model = progress.loading(&args.model, |on_read| {
        g.on_read(on_read);
        load_llama(&g, &picked.placement())
    });
    let model = model.with_context(|| format!("loading {}", args.model))?;
    let context = args.ctx.unwrap_or(DEFAULT_CTX).min(model.rope_positions()).max(2);
    Ok(Loaded {
        model: Rc::new(Model::Text(model)),
        tok: Rc::new(tok),
        device_name: picked.name,
        load_time: t0.elapsed(),
        context,
        file_bytes: g.file_len(),
    })
}

/// Tokenizer only (no device, no weights).
pub fn load_tokenizer(path: &str) -> Result<Tokenizer> {
    let g = Gguf::open(path).with_context(|| format!("loading {path}"))?;
    Ok(Tokenizer::from_gguf(&g)?)
}
