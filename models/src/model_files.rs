//! A model folder, wherever its files are: a directory (native), or files already in
//! memory (fetched or picked in a browser). One loader for both, so the same files are
//! read with the same precedence and the same errors everywhere.
//!
//! Precedence where two files say the same thing: `video_preprocessor_config.json` over
//! `preprocessor_config.json` (the video processor is what runs on videos); the
//! tokenizer's own chat template over `chat_template.jinja` over `chat_template.json`;
//! `model.safetensors.index.json`'s shards over `model.safetensors`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vidllm_core::LoadError;
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson};
use vidllm_core::progress::OnRead;
use vidllm_core::safetensors::{Checkpoint, shard_names};
use vidllm_core::sampling::Sampling;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_shaders::device::Placement;

use crate::decoder_family::Family;
use crate::llama::Llama;
use crate::llama_hf::{QuantChoice, causal_lm_config, load_causal_lm};
use crate::video_model::{LoadOptions, Preprocessing, VideoModel};

/// Where a folder's files are.
pub enum ModelFiles {
    Dir(PathBuf),
    /// File name -> contents.
    Memory(BTreeMap<String, Vec<u8>>),
}

/// Everything a conversation about a video needs, from one folder.
pub struct Folder {
    pub model: VideoModel,
    pub tok: Tokenizer,
    pub pre: PreprocessConfig,
    /// The model's own frame sampling (its processor's), unless the user picks another.
    pub sampling: Sampling,
}

/// The files of a folder besides its weights, each optional except `config.json` and
/// `tokenizer.json`: what a browser fetches before the shards.
pub const CONFIG_FILES: [&str; 8] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];

const PICKLED: [&str; 3] = ["pytorch_model.bin", "model.pt", "pytorch_model.bin.index.json"];

impl ModelFiles {
    fn describe(&self, name: &str) -> String {
        match self {
            Self::Dir(d) => d.join(name).display().to_string(),
            Self::Memory(_) => name.to_string(),
        }
    }

    fn exists(&self, name: &str) -> bool {
        match self {
            Self::Dir(d) => d.join(name).is_file(),
            Self::Memory(m) => m.contains_key(name),
        }
    }

    /// A file's text, `None` when the folder has no such file.
    pub fn text(&self, name: &str) -> Result<Option<String>, LoadError> {
        let bytes = match self {
            Self::Dir(d) => match std::fs::read(d.join(name)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(LoadError::Open { path: self.describe(name), source }),
            },
            Self::Memory(m) => match m.get(name) {
                Some(b) => b.clone(),
                None => return Ok(None),
            },
        };
        String::from_utf8(bytes).map(Some).map_err(|_| LoadError::Unsupported(format!("{} is not UTF-8 text", self.describe(name))))
    }

    fn required(&self, name: &str) -> Result<String, LoadError> {
        self.text(name)?.ok_or_else(|| LoadError::Unsupported(format!("the model folder has no {}", self.describe(name))))
    }

    /// The safetensors files holding the weights, in load order.
    pub fn weight_files(&self) -> Result<Vec<String>, LoadError> {
        let index = "model.safetensors.index.json";
        if let Some(text) = self.text(index)? {
            return shard_names(&text, &self.describe(index));
        }
        if self.exists("model.safetensors") {
            return Ok(vec!["model.safetensors".into()]);
        }
        let pickled = PICKLED.iter().any(|f| self.exists(f));
        let why = if pickled { " (only pickled PyTorch weights, which vidllm never loads: convert them to safetensors)" } else { "" };
        Err(LoadError::Unsupported(format!("no model.safetensors in the model folder{why}")))
    }

    /// The tokenizer, with the folder's chat template.
    pub fn tokenizer(&self) -> Result<Tokenizer, LoadError> {
        let json = self.required("tokenizer.json")?;
        let mut tok = Tokenizer::from_hf_json(&json, self.text("tokenizer_config.json")?.as_deref())
            .map_err(|e| LoadError::Tokenizer(format!("{}: {e}", self.describe("tokenizer.json"))))?;
        if tok.chat_template.is_none() {
            tok.chat_template = match (self.text("chat_template.jinja")?, self.text("chat_template.json")?) {
                (Some(t), _) => Some(t),
                (None, Some(j)) => {
                    let v: serde_json::Value = serde_json::from_str(&j)
                        .map_err(|e| LoadError::Unsupported(format!("{}: {e}", self.describe("chat_template.json"))))?;
                    v["chat_template"].as_str().map(str::to_string)
                }
                (None, None) => None,
            };
        }
        Ok(tok)
    }

    /// The preprocessing config the folder gives for videos (none: every field from the
    /// defaults): `video_preprocessor_config.json`, else `preprocessor_config.json`.
    pub fn preprocessor(&self) -> Result<PreprocessorJson, LoadError> {
        self.first_config(&["video_preprocessor_config.json", "preprocessor_config.json"])
    }

    /// The image processor's config: `preprocessor_config.json`, else the video one.
    pub fn image_preprocessor(&self) -> Result<PreprocessorJson, LoadError> {
        self.first_config(&["preprocessor_config.json", "video_preprocessor_config.json"])
    }

    fn first_config(&self, names: &[&str]) -> Result<PreprocessorJson, LoadError> {
        for &name in names {
            if let Some(text) = self.text(name)? {
                return serde_json::from_str(&text).map_err(|e| LoadError::Unsupported(format!("{}: {e}", self.describe(name))));
            }
        }
        Ok(PreprocessorJson::default())
    }

    /// Open the weights (mapped from disk, or taken from memory).
    fn checkpoint(self) -> Result<Checkpoint, LoadError> {
        let names = self.weight_files()?;
        match self {
            Self::Dir(d) => Checkpoint::open_files(&names.iter().map(|n| d.join(n)).collect::<Vec<_>>()),
            Self::Memory(mut m) => {
                let mut buffers = Vec::new();
                for n in names {
                    let b = m.remove(&n).ok_or_else(|| LoadError::Unsupported(format!("the model folder has no {n}")))?;
                    buffers.push((n, b));
                }
                Checkpoint::from_buffers(buffers)
            }
        }
    }

    /// The decoder family when `config.json` names a text model (`llama`, `qwen2`,
    /// `qwen3`); `None` for anything else (a video model, or an unknown type).
    pub fn text_family(&self) -> Result<Option<Family>, LoadError> {
        let config = self.required("config.json")?;
        let v: serde_json::Value =
            serde_json::from_str(&config).map_err(|e| LoadError::Unsupported(format!("config.json is not JSON: {e}")))?;
        Ok(v["model_type"].as_str().and_then(|t| Family::from_name(t).ok()))
    }

    /// A text decoder folder (`*ForCausalLM`): the decoder, quantised on load to `quant`,
    /// and the tokenizer with the folder's chat template.
    pub fn load_text(self, quant: QuantChoice, at: &Placement, on_read: Option<OnRead>) -> Result<(Llama, Tokenizer), LoadError> {
        let config = self.required("config.json")?;
        let cfg = causal_lm_config(&config)?;
        let tok = self.tokenizer()?;
        let mut ck = self.checkpoint()?;
        if let Some(f) = on_read {
            ck.on_read(f);
        }
        Ok((load_causal_lm(&ck, cfg, quant, at)?, tok))
    }

    /// Model, tokenizer and preprocessing. An unsupported architecture is named before any
    /// weights are looked for.
    pub fn load(self, opts: LoadOptions, at: &Placement) -> Result<Folder, LoadError> {
        self.load_reporting(opts, at, None)
    }

    /// [`ModelFiles::load`], reporting the weights read (bytes so far, bytes in all) to
    /// `on_read` as the architecture's loader reads them.
    pub fn load_reporting(self, opts: LoadOptions, at: &Placement, on_read: Option<OnRead>) -> Result<Folder, LoadError> {
        let config = self.required("config.json")?;
        VideoModel::registration(&config)?;
        let tok = self.tokenizer()?;
        let (pre, image_pre) = (self.preprocessor()?, self.image_preprocessor()?);
        let mut ck = self.checkpoint()?;
        if let Some(f) = on_read {
            ck.on_read(f);
        }
        // The folder's preprocessor configs as the architecture's processors read them.
        let model = VideoModel::from_checkpoint(&config, &ck, opts, &pre, &image_pre, at)?;
        // The towers' block matrices too (the decoder's were settled as it loaded).
        vidllm_shaders::settle_weights();
        let Preprocessing { pixels: pre, sampling, .. } = model.preprocessing().clone();
        Ok(Folder { model, tok, pre, sampling })
    }
}
