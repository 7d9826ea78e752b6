//! The fuzz targets' bodies: what each parser does with untrusted bytes, run the way the
//! runtime runs it. `fuzz/` (cargo-fuzz, nightly) drives these with libFuzzer; the inputs
//! it found worth keeping (`tests/fixtures/fuzz/<target>/`) are replayed through the same
//! functions by `tests/tests/fuzz_replay.rs` on stable, so CI checks them without a fuzzer.
//!
//! Every function may return an error for a bad input; none may panic, abort, allocate
//! without bound or loop without bound. Each goes past parsing into what the parse feeds
//! (loading weights on the CPU, one decoder step, tokenising, rendering), since a parser
//! that accepts a lie is caught only where the lie is used.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use vidllm_core::chat::{Message, render};
use vidllm_core::gguf::Gguf;
use vidllm_core::preprocess::{crop_origin, resample_weights};
use vidllm_core::safetensors::{Checkpoint, shard_names};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::llama_hf::{QuantChoice, causal_lm_config, load_causal_lm};
use vidllm_models::mmproj::{Mmproj, load_pair};
use vidllm_models::model_files::ModelFiles;
use vidllm_models::video_model::LoadOptions;
use vidllm_models::{KvCache, LlamaConfig, Logits, config_from_gguf, load_llama};

use crate::{cpu, fixture};

/// A target's body: bytes in, nothing out but a panic or an abort when it finds a bug.
pub type Target = fn(&[u8]);

/// The targets, by the names of their `fuzz/fuzz_targets/*.rs` and corpus folders.
pub const TARGETS: [(&str, Target); 5] =
    [("gguf", gguf), ("safetensors", safetensors), ("config", config), ("tokenizer", tokenizer), ("chat_template", chat_template)];

/// Text prompts every loaded tokenizer and model is tried on: ASCII, multi-byte, a
/// special-looking token, and nothing.
const TEXTS: [&str; 4] = ["Hello, world!", "vidéo 视频 🎬", "<s>[INST]<|im_start|>", ""];

/// A GGUF file as `ask --model` / `serve --model` (or `--mmproj`) opens one: the header,
/// metadata and tensor table; then the decoder config, the tokenizer, the weights on the
/// CPU and one decoder step; or, for a `clip` file, the mmproj beside the tiny SmolVLM2
/// text GGUF.
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::from_bytes(data.to_vec()) else { return };
    for t in &g.tensors {
        let _ = (g.tensor_bytes(t).len(), t.shape(), t.n_elements());
    }
    let _ = Tokenizer::from_gguf(&g).map(|tok| try_tokenizer(&tok));
    if Mmproj::read(&g).is_ok() {
        let text = Gguf::open(fixture("tiny_smolvlm.Q8_0.gguf")).expect("fixture");
        let _ = load_pair(&text, &g, &cpu());
        return;
    }
    if config_from_gguf(&g).is_err() {
        return;
    }
    if let Ok(llama) = load_llama(&g, &cpu()) {
        one_step(&llama);
    }
}

/// A `model.safetensors` (its header, every tensor read as the loaders read them) and, the
/// same bytes as text, a `model.safetensors.index.json`; then the weights as a decoder's
/// checkpoint (the tiny Qwen2 config), loaded on the CPU and stepped once.
pub fn safetensors(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = shard_names(text, "model.safetensors.index.json");
    }
    let Ok(ck) = Checkpoint::from_buffers(vec![("model.safetensors".into(), data.to_vec())]) else { return };
    let names: Vec<String> = ck.names().map(str::to_string).collect();
    for name in &names {
        let _ = ck.raw(name);
        let _ = ck.f32(name);
        let _ = ck.i64(name);
    }
    // The checkpoint is the input; the config it is read against is fixed, read once.
    static CONFIG: OnceLock<LlamaConfig> = OnceLock::new();
    let cfg = CONFIG.get_or_init(|| {
        let config = std::fs::read_to_string(fixture("tiny_qwen2/config.json")).expect("fixture");
        causal_lm_config(&config).expect("fixture config")
    });
    if let Ok(llama) = load_causal_lm(&ck, cfg.clone(), QuantChoice::Q4_1, &cpu()) {
        one_step(&llama);
    }
}

/// The tiny folders a config is tried in: each registered architecture and a text-only
/// decoder, with their real weights, so a config is judged against a checkpoint it may
/// or may not describe.
const FOLDERS: [&str; 6] = ["tiny_video_llava", "tiny_pllava", "tiny_llava_next_video", "tiny_smolvlm", "tiny_idefics3", "tiny_qwen2"];

/// The JSON files of a folder a user (or a hostile upload) controls.
const CONFIG_FILES: [&str; 4] = ["config.json", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer_config.json"];

/// A model folder's JSON configs: the first byte picks a tiny folder and which of its
/// configs the rest replaces; the folder then loads as `ask --model DIR` loads it (the
/// architecture, tokenizer, preprocessing and weights on the CPU), and a frame of an odd
/// size is planned through the preprocessing it read.
pub fn config(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let folder = FOLDERS[usize::from(pick) % FOLDERS.len()];
    let file = CONFIG_FILES[usize::from(pick) / FOLDERS.len() % CONFIG_FILES.len()];
    let mut files = folder_files(folder).clone();
    files.insert(file.to_string(), rest.to_vec());
    let files = ModelFiles::Memory(files);
    if folder == "tiny_qwen2" {
        if let Ok((llama, tok)) = files.load_text(QuantChoice::Q4_1, &cpu(), None) {
            try_tokenizer(&tok);
            one_step(&llama);
        }
        return;
    }
    let Ok(f) = files.load(LoadOptions::default(), &cpu()) else { return };
    try_tokenizer(&f.tok);
    for (h, w) in [(1, 1), (37, 64), (480, 640)] {
        let _ = f.pre.resize_steps(h, w);
        let _ = crop_origin(&f.pre, h, w);
    }
    let (h, w) = f.pre.output_size(37, 64);
    let _ = resample_weights(37, h, 0..h.min(37), f.pre.resample);
    let _ = resample_weights(64, w, 0..w.min(64), f.pre.resample);
}

/// A `tokenizer.json` (up to a 0xFF byte, never in UTF-8) and its `tokenizer_config.json`
/// (after it), loaded and used: encode, decode, the chat template if it has one.
pub fn tokenizer(data: &[u8]) {
    let (json, cfg) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Ok(json) = std::str::from_utf8(json) else { return };
    let cfg = cfg.and_then(|c| std::str::from_utf8(c).ok());
    if let Ok(tok) = Tokenizer::from_hf_json(json, cfg) {
        try_tokenizer(&tok);
    }
}

/// A chat template (a model file's, run in the sandbox) rendered over a conversation, the
/// plain form and the multimodal parts form.
pub fn chat_template(data: &[u8]) {
    let Ok(template) = std::str::from_utf8(data) else { return };
    let plain = [Message::new("system", "Be brief."), Message::new("user", "What happens?"), Message::new("assistant", "A cat.")];
    let _ = render(template, &plain[..], "<s>", "</s>");
    let parts = serde_json::json!([{ "role": "user", "content": [{ "type": "video" }, { "type": "text", "text": "Why?" }] }]);
    let _ = render(template, &parts, "<s>", "</s>");
}

/// Encode and decode each of [`TEXTS`], decode every id once, and render the chat
/// template if the tokenizer carries one.
fn try_tokenizer(tok: &Tokenizer) {
    for text in TEXTS {
        if let Ok(ids) = tok.encode(text, tok.add_bos) {
            let _ = tok.decode(&ids);
        }
    }
    let every: Vec<u32> = (0..tok.vocab_size().min(4096) as u32).collect();
    let _ = tok.decode(&every);
    let _ = tok.render_chat(&[Message::new("user", "Hi")][..]);
}

/// One token through a loaded decoder, as the first step of any prompt.
fn one_step(llama: &vidllm_models::Llama) {
    let mut cache = KvCache::new(&llama.cfg, 4, &cpu().device);
    let _ = llama.forward(&[0], &mut cache, Logits::Last);
}

/// A tiny folder's files, read once per process.
fn folder_files(folder: &str) -> &'static BTreeMap<String, Vec<u8>> {
    static FOLDERS_READ: OnceLock<BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>> = OnceLock::new();
    let all = FOLDERS_READ.get_or_init(|| {
        FOLDERS
            .iter()
            .map(|&name| {
                let dir = fixture(name);
                let files = std::fs::read_dir(&dir)
                    .expect("fixture folder")
                    .map(|e| {
                        let path = e.expect("fixture entry").path();
                        (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).expect("fixture file"))
                    })
                    .collect();
                (name, files)
            })
            .collect()
    });
    &all[folder]
}
