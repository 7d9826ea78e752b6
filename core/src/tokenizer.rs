//! Tokenizer built from a GGUF file's own `tokenizer.ggml.*` metadata.
//!
//! Two models, as llama.cpp knows them:
//! - `gpt2`: byte-level BPE; the pre-tokeniser follows `tokenizer.ggml.pre` (llama.cpp's
//!   `llama-vocab.cpp` lists the regexes per type).
//! - `llama`: SentencePiece BPE with byte fallback; merges are rebuilt from the scores.
//!
//! Control and user-defined tokens are added as special tokens, so a rendered chat template
//! (`<|im_start|>`) maps to their ids.
//!
//! Decoding goes token -> raw bytes, so a stream can be cut only at UTF-8 boundaries
//! (see `stream.rs`).

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::LoadError;
use crate::gguf::Gguf;

/// GPT-2's regex, used by most byte-level BPE pre-tokenisers.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE (`gpt2`).
    ByteLevelBpe,
    /// SentencePiece BPE with byte fallback (`llama`).
    SentencePiece,
}

/// A tokenizer with the special ids the runtime needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    kind: TokenizerKind,
    /// Raw bytes of each token id, for streaming decode.
    pieces: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Extra end-of-generation ids (`<|im_end|>`, `<|eot_id|>`, ...).
    pub eog: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The tokenizer's own post-processor adds BOS (Hugging Face `tokenizer.json`).
    post_processor_bos: bool,
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self, LoadError> {
        let model = g.str("tokenizer.ggml.model")?;
        let tokens = g.str_array("tokenizer.ggml.tokens")?;
        let types = token_types(g, tokens.len())?;
        let (inner, kind) = match model {
            "gpt2" => (byte_level_bpe(g, &tokens)?, TokenizerKind::ByteLevelBpe),
            "llama" => (sentencepiece(g, &tokens)?, TokenizerKind::SentencePiece),
            other => return Err(LoadError::Unsupported(format!("tokenizer model {other:?} (supported: gpt2, llama)"))),
        };
        let mut inner = inner;
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let pieces = tokens.iter().zip(&types).map(|(t, &ty)| piece_bytes(kind, t, ty)).collect();
        let id = |key: &str| g.get(key).and_then(|v| v.as_u64()).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        // llama.cpp's defaults: SentencePiece adds BOS, byte-level BPE does unless told otherwise.
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(kind == TokenizerKind::SentencePiece);
        let eog = end_of_generation_ids(&tokens, eos, id("tokenizer.ggml.eot_token_id"));
        let chat_template = g.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
        Ok(Self { inner, kind, pieces, bos, eos, eog, add_bos, chat_template, post_processor_bos: false })
    }

    /// A Hugging Face folder's `tokenizer.json` and `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &std::path::Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read_to_string(&path).map_err(|source| LoadError::Open { path: path.display().to_string(), source })?;
        let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok();
        Self::from_hf_json(&json, config.as_deref()).map_err(|e| LoadError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The text of `tokenizer.json` and, if present, `tokenizer_config.json`.
    pub fn from_hf_json(tokenizer_json: &str, tokenizer_config: Option<&str>) -> Result<Self, LoadError> {
        let bad = |e: &dyn std::fmt::Display| LoadError::Tokenizer(format!("tokenizer.json: {e}"));
        let json: serde_json::Value = serde_json::from_str(tokenizer_json).map_err(|e| bad(&e))?;
        check_before_tokenizers(&json["normalizer"]).map_err(|e| bad(&e))?;
        let inner: tokenizers::Tokenizer = tokenizer_json.parse().map_err(|e| bad(&e))?;
        let cfg: serde_json::Value = tokenizer_config.and_then(|t| serde_json::from_str(t).ok()).unwrap_or(serde_json::Value::Null);
        // Byte-level decoders mark GPT-2 style vocabularies; the rest are SentencePiece-like.
        let byte_level = json["decoder"]["type"] == "ByteLevel" || json["pre_tokenizer"]["type"] == "ByteLevel";
        let kind = if byte_level { TokenizerKind::ByteLevelBpe } else { TokenizerKind::SentencePiece };
        let n = inner.get_vocab_size(true);
        let specials: std::collections::HashSet<u32> =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&i, _)| i).collect();
        let pieces = (0..n as u32)
            .map(|i| {
                let t = inner.id_to_token(i).unwrap_or_default();
                let ty = if specials.contains(&i) { TOKEN_TYPE_CONTROL } else { 1 };
                piece_bytes(kind, &t, ty)
            })
            .collect();
        let special = |key: &str| -> Option<u32> {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(s)
        };
        let (bos, eos) = (special("bos_token"), special("eos_token"));
        let post_processor_bos = !json["post_processor"].is_null();
        let add_bos = cfg["add_bos_token"].as_bool().unwrap_or(kind == TokenizerKind::SentencePiece) || post_processor_bos;
        let tokens: Vec<String> = (0..n as u32).map(|i| inner.id_to_token(i).unwrap_or_default()).collect();
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let eog = end_of_generation_ids(&token_refs, eos, None);
        let chat_template = cfg["chat_template"].as_str().map(str::to_string);
        Ok(Self { inner, kind, pieces, bos, eos, eog, add_bos, chat_template, post_processor_bos })
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids of `text`; special-token text (`<|im_start|>`) maps to its id.
    /// BOS is prepended when `add_bos` is set and the model has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, LoadError> {
        if self.post_processor_bos {
            // The tokenizer's own template decides what to add, as transformers does.
            let enc = self.inner.encode(text, add_bos).map_err(|e| LoadError::Tokenizer(e.to_string()))?;
            return Ok(enc.get_ids().to_vec());
        }
        let enc = self.inner.encode(text, false).map_err(|e| LoadError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The raw bytes a token stands for (not necessarily valid UTF-8 on its own).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A special token's text (`<s>`, `<|im_end|>`), empty when the model has none.
    pub fn token_text(&self, id: Option<u32>) -> String {
        id.map(|i| String::from_utf8_lossy(self.token_bytes(i)).into_owned()).unwrap_or_default()
    }

    /// `messages` through the model's own chat template, ending with the assistant's turn
    /// opened.
    pub fn render_chat<M: serde::Serialize + ?Sized>(&self, messages: &M) -> Result<String, crate::GenerateError> {
        let template =
            self.chat_template.as_deref().ok_or_else(|| crate::GenerateError::Template("the model has no chat template".into()))?;
        crate::chat::render(template, messages, &self.token_text(self.bos), &self.token_text(self.eos))
    }

    /// `messages` through the model's own chat template, tokenised. BOS is added as the
    /// model asks, unless the template already wrote its text.
    pub fn chat_tokens(&self, messages: &[crate::chat::Message]) -> Result<Vec<u32>, crate::GenerateError> {
        let text = self.render_chat(messages)?;
        let bos_in_text = self.bos.is_some() && text.starts_with(&self.token_text(self.bos));
        self.encode(&text, self.add_bos && !bos_in_text).map_err(|e| crate::GenerateError::Tokenizer(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        Some(id) == self.eos || self.eog.contains(&id)
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn token_types(g: &Gguf, n: usize) -> Result<Vec<i64>, LoadError> {
    match g.get("tokenizer.ggml.token_type").and_then(|v| v.as_array()) {
        None => Ok(vec![1; n]),
        Some(a) if a.len() == n => Ok(a.iter().map(|v| v.as_u64().map(|x| x as i64).unwrap_or(1)).collect()),
        Some(a) => Err(LoadError::Tokenizer(format!("{} token types for {n} tokens", a.len()))),
    }
}

fn end_of_generation_ids(tokens: &[&str], eos: Option<u32>, eot: Option<u32>) -> Vec<u32> {
    // llama.cpp also treats these well-known end-of-turn tokens as end of generation
    // (`llama_vocab::impl::load`; Idefics3 / SmolVLM end a turn with `<end_of_utterance>`).
    const EOG_TEXT: [&str; 9] = [
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<EOT>",
    ];
    let mut ids: Vec<u32> = tokens.iter().enumerate().filter(|(_, t)| EOG_TEXT.contains(t)).map(|(i, _)| i as u32).collect();
    ids.extend(eot);
    ids.extend(eos);
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn tok_err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Tokenizer(e.to_string())
}

fn byte_level_bpe(g: &Gguf, tokens: &[&str]) -> Result<tokenizers::Tokenizer, LoadError> {
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = g
        .str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| tok_err(format!("bad merge {m:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let bpe =
        BPE::builder().vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges).build().map_err(tok_err)?;
    let pre = g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tk)
}

/// The pre-tokeniser llama.cpp uses for each `tokenizer.ggml.pre` value.
fn byte_level_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, LoadError> {
    let split = |re: &str| -> Result<PreTokenizerWrapper, LoadError> {
        Ok(Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false).map_err(tok_err)?.into())
    };
    let bytes: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    let steps = match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => vec![split(GPT2_REGEX)?, bytes],
        // Digits one by one, then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![Digits::new(true).into(), split(GPT2_REGEX)?, bytes]
        }
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" => vec![split(LLAMA3_REGEX)?, bytes],
        "qwen2" | "deepseek-r1-qwen" => vec![split(QWEN2_REGEX)?, bytes],
        other => return Err(LoadError::Unsupported(format!("pre-tokenizer {other:?}"))),
    };
    Ok(Sequence::new(steps).into())
}

fn sentencepiece(g: &Gguf, tokens: &[&str]) -> Result<tokenizers::Tokenizer, LoadError> {
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        _ => return Err(LoadError::MissingKey("tokenizer.ggml.scores".into())),
    };
    let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = merges_from_scores(tokens, &scores, &vocab);
    let unk = g.get("tokenizer.ggml.unknown_token_id").and_then(|v| v.as_u64()).and_then(|i| tokens.get(i as usize));
    let mut b = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        b = b.unk_token(u.to_string());
    }
    let mut tk = tokenizers::Tokenizer::new(b.build().map_err(tok_err)?);
    let prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if prefix {
        norm.push(Prepend::new("▁".into()).into());
    }
    norm.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
    tk.with_normalizer(Some(NormSequence::new(norm)));
    Ok(tk)
}

/// SentencePiece BPE merges: every split of a vocab piece into two vocab pieces, the merge
/// ranked by the merged piece's score (higher first), as Hugging Face's converter does.
fn merges_from_scores(tokens: &[&str], scores: &[f64], vocab: &HashMap<String, u32>) -> Vec<(String, String)> {
    let mut ranked: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        for (cut, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(cut);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((scores[i], ia, ib, a.to_string(), b.to_string()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    ranked.into_iter().map(|r| (r.3, r.4)).collect()
}

/// The bytes a token stands for.
fn piece_bytes(kind: TokenizerKind, token: &str, ty: i64) -> Vec<u8> {
    if matches!(ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED) {
        return token.as_bytes().to_vec();
    }
    match kind {
        TokenizerKind::ByteLevelBpe => token.chars().map(|c| unicode_to_byte(c).unwrap_or(b'?')).collect(),
        TokenizerKind::SentencePiece => {
            if let Some(hex) = token.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
                && let Ok(b) = u8::from_str_radix(hex, 16)
            {
                return vec![b];
            }
            token.replace('▁', " ").into_bytes()
        }
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the rest to
/// U+0100 and up in byte order.
fn unicode_to_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp) {
        return Some(cp as u8);
    }
    let k = cp.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(k as usize).map(|b| b as u8)
}

/// What the `tokenizers` crate would panic on instead of failing (0.21 and 0.22 `expect`
/// inside their deserialisers), checked first so that a hostile `tokenizer.json` is an
/// error: JSON that does not parse (their decoder reader panics on it; the caller parses
/// the text first), and a `Precompiled` normalizer, anywhere in the normalizer tree,
/// whose fields are not a valid character map (found by the `tokenizer` fuzz target).
fn check_before_tokenizers(normalizer: &serde_json::Value) -> Result<(), serde_json::Error> {
    match normalizer {
        serde_json::Value::Object(fields) => {
            if fields.get("type").and_then(|t| t.as_str()) == Some("Precompiled") {
                serde_json::from_value::<tokenizers::normalizers::precompiled::Precompiled>(normalizer.clone())?;
            }
            fields.values().try_for_each(check_before_tokenizers)
        }
        serde_json::Value::Array(items) => items.iter().try_for_each(check_before_tokenizers),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_inverse_map() {
        assert_eq!(unicode_to_byte('a'), Some(b'a'));
        assert_eq!(unicode_to_byte('Ġ'), Some(b' '));
        assert_eq!(unicode_to_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn sentencepiece_pieces() {
        assert_eq!(piece_bytes(TokenizerKind::SentencePiece, "▁the", 1), b" the");
        assert_eq!(piece_bytes(TokenizerKind::SentencePiece, "<0x0A>", 6), b"\n");
    }
}
