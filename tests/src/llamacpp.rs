//! llama.cpp's references for a GGUF decoder (`tests/fixtures/gen_llama_fixtures.py`,
//! `gen_quant_fixtures.py`) and the checks every decoder parity test makes against them.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::argmax;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row;
use vidllm_models::{Conversation, GenerateParams, KvCache, KvType, Llama, Logits, Model, Prompt};

use crate::every_case_on;

/// Positions where llama.cpp's top-1 leads top-2 by less are not compared (its CPU
/// kernels quantise activations to 8 bits; vidllm keeps them in f32).
pub const MARGIN: f32 = 0.5;

/// One prompt, as llama.cpp ran it.
#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    /// `raw` text or a `chat` turn rendered from the file's template by Jinja2.
    pub kind: String,
    pub text: String,
    pub user: Option<String>,
    pub tokens: Vec<u32>,
    /// llama.cpp's greedy continuation (ends at end of generation or the length cap).
    pub continuation: Vec<u32>,
    /// `tokens` + `continuation` minus its last token: the teacher-forced pass.
    pub sequence: Vec<u32>,
    /// Per position of `sequence`: llama.cpp's top-5 `[id, logit]`.
    pub top: Vec<Vec<(u32, f32)>>,
}

impl Case {
    pub fn margin(&self, pos: usize) -> f32 {
        self.top[pos][0].1 - self.top[pos][1].1
    }

    /// Run on `device`: every case on the CPU; on a software GPU the short raw prompt,
    /// the multi-byte one, one chat turn and the long chat turn (568 tokens: decode steps
    /// that attend to hundreds of keys) (see `every_case_on`).
    pub fn runs_on(&self, device: &str) -> bool {
        every_case_on(device) || ["plain", "unicode", "chat_question", "chat_timetable"].contains(&self.name.as_str())
    }
}

/// One file llama.cpp's quantizer wrote, as its fixture script recorded it
/// (`gen_quant_fixtures.py`, `gen_qwen_fixtures.py`).
#[derive(Deserialize)]
pub struct QuantFile {
    pub name: String,
    pub file: String,
    pub size: u64,
    /// gguf-py's type name -> number of tensors of that type.
    pub types: BTreeMap<String, usize>,
    pub cases: Vec<Case>,
}

impl QuantFile {
    /// The file at hand is the one recorded (size), and vidllm reads its tensors as the
    /// types gguf-py read. Returns the mix for printing (`Q4_K x16, ...`).
    pub fn check_file(&self, g: &Gguf) -> String {
        assert_eq!(g.file_len(), self.size, "{}: not the file llama.cpp wrote (its fixture script checks sha256)", self.file);
        let mut types = BTreeMap::new();
        for t in &g.tensors {
            *types.entry(t.ty.name().to_uppercase()).or_insert(0) += 1;
        }
        assert_eq!(types, self.types, "{}: tensor types as vidllm reads them", self.file);
        types.iter().map(|(t, n)| format!("{t} x{n}")).collect::<Vec<_>>().join(", ")
    }
}

/// What a teacher-forced comparison saw, for the test's printed table.
pub struct Agreement {
    pub positions: usize,
    pub compared: usize,
    /// Largest |vidllm logit - llama.cpp logit| on llama.cpp's top-1 token.
    pub worst: f32,
}

/// Teacher forcing over prompt + llama.cpp's continuation: argmax must agree wherever
/// llama.cpp's decision is clear. Returns per case what was compared, and the logits of
/// the first case for cross-device checks.
pub fn teacher_forcing<'a>(model: &Llama, cases: impl IntoIterator<Item = &'a Case>, device_name: &str) -> (Vec<Agreement>, Vec<f32>) {
    teacher_forcing_kv(model, cases, device_name, KvType::F32)
}

/// [`teacher_forcing`] with the KV cache kept in `kv`.
pub fn teacher_forcing_kv<'a>(
    model: &Llama,
    cases: impl IntoIterator<Item = &'a Case>,
    device_name: &str,
    kv: KvType,
) -> (Vec<Agreement>, Vec<f32>) {
    forced(model, cases.into_iter().filter(|c| c.runs_on(device_name)), device_name, kv)
}

/// [`teacher_forcing`] on every case given, whatever the device (tiny models).
pub fn teacher_forcing_every_case<'a>(
    model: &Llama,
    cases: impl IntoIterator<Item = &'a Case>,
    device_name: &str,
) -> (Vec<Agreement>, Vec<f32>) {
    forced(model, cases, device_name, KvType::F32)
}

fn forced<'a>(model: &Llama, cases: impl IntoIterator<Item = &'a Case>, device_name: &str, kv: KvType) -> (Vec<Agreement>, Vec<f32>) {
    let vocab = model.cfg.vocab_size;
    let (mut seen, mut first) = (Vec::new(), Vec::new());
    for c in cases {
        let mut cache = KvCache::typed(kv, &model.cfg, c.sequence.len(), &model.device);
        let all = read_row(model.forward(&c.sequence, &mut cache, Logits::All)).unwrap();
        let (mut compared, mut worst) = (0, 0f32);
        for (pos, row) in all.chunks(vocab).enumerate() {
            let (ref_id, ref_logit) = c.top[pos][0];
            worst = worst.max((row[ref_id as usize] - ref_logit).abs());
            if c.margin(pos) < MARGIN {
                continue;
            }
            compared += 1;
            assert_eq!(argmax(row), ref_id, "{device_name} (kv {kv}): case {} position {pos} (margin {:.2})", c.name, c.margin(pos));
        }
        println!(
            "{device_name} (kv {kv}) {}: {compared}/{} positions compared, max |logit - llama.cpp| on its top-1: {worst:.3}",
            c.name,
            c.sequence.len()
        );
        assert!(compared * 2 >= c.sequence.len(), "too few clear positions in {}", c.name);
        seen.push(Agreement { positions: c.sequence.len(), compared, worst });
        if first.is_empty() {
            first = all;
        }
    }
    (seen, first)
}

/// Greedy generation follows llama.cpp's continuation up to its first unclear step.
/// Returns the number of tokens compared.
pub fn greedy_matches<'a>(model: &Rc<Model>, tok: &Rc<Tokenizer>, cases: impl IntoIterator<Item = &'a Case>, device_name: &str) -> usize {
    greedy_matches_kv(model, tok, cases, device_name, KvType::F32)
}

/// [`greedy_matches`] with the conversation's KV cache kept in `kv`.
pub fn greedy_matches_kv<'a>(
    model: &Rc<Model>,
    tok: &Rc<Tokenizer>,
    cases: impl IntoIterator<Item = &'a Case>,
    device_name: &str,
    kv: KvType,
) -> usize {
    greedy(model, tok, cases.into_iter().filter(|c| c.runs_on(device_name)), device_name, kv)
}

/// [`greedy_matches`] on every chat case given, whatever the device (tiny models).
pub fn greedy_matches_every_case<'a>(
    model: &Rc<Model>,
    tok: &Rc<Tokenizer>,
    cases: impl IntoIterator<Item = &'a Case>,
    device_name: &str,
) -> usize {
    greedy(model, tok, cases, device_name, KvType::F32)
}

fn greedy<'a>(model: &Rc<Model>, tok: &Rc<Tokenizer>, cases: impl IntoIterator<Item = &'a Case>, device_name: &str, kv: KvType) -> usize {
    let mut total = 0;
    for c in cases.into_iter().filter(|c| c.kind == "chat") {
        let clear = (0..c.continuation.len()).take_while(|&i| c.margin(c.tokens.len() - 1 + i) >= MARGIN).count();
        let mut conv = Conversation::new(model.clone(), tok.clone(), (c.tokens.len() + c.continuation.len()).max(256));
        conv.set_kv(kv).unwrap();
        conv.ask(Prompt::Tokens(&c.tokens), GenerateParams { max_tokens: clear, ..Default::default() }).unwrap();
        let got = conv.answer(|_| true).unwrap().tokens;
        let expected: Vec<u32> = c.continuation[..clear].iter().copied().filter(|&t| !tok.is_eog(t)).collect();
        assert_eq!(got, expected, "{device_name} (kv {kv}): greedy continuation of {}", c.name);
        println!("{device_name} (kv {kv}) {}: {} greedy tokens equal llama.cpp's", c.name, got.len());
        total += got.len();
    }
    total
}
