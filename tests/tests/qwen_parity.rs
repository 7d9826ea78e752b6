//! The Qwen2 and Qwen3 decoder families (`tests/fixtures/gen_qwen_fixtures.py`): tiny
//! random `Qwen2ForCausalLM` / `Qwen3ForCausalLM` models made by `transformers`, converted
//! by llama.cpp's own `convert_hf_to_gguf.py` and quantised by its quantizer (Q8_0, Q4_K_M).
//!
//! - Each GGUF file against llama.cpp's run of it: the family and shapes read from the
//!   `qwen2.*` / `qwen3.*` keys, the tensor type mix, llama.cpp's tokens (the `qwen2`
//!   pre-tokenizer), teacher-forced argmax where its decision is clear, greedy continuation.
//! - The Hugging Face folder, loaded as f32, against transformers' logits (every recorded
//!   top-5 logit within 1e-4 relative) and greedy continuation; loaded as Q8_0 (quantised on
//!   load), against transformers' clear decisions.
//! - The chat templates (Qwen2.5's ChatML with its default system prompt, Qwen3's) render
//!   as transformers' `apply_chat_template` renders them, from the folder and from the GGUF.
//!
//! The models are tiny, so every case runs on every device.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde::Deserialize;
use vidllm_core::chat::Message;
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::argmax;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::model_files::ModelFiles;
use vidllm_models::{Conversation, Family, GenerateParams, KvCache, Llama, Logits, Model, Prompt, load_llama};
use vidllm_tests::llamacpp::{Case, MARGIN, QuantFile, greedy_matches_every_case, teacher_forcing_every_case};
use vidllm_tests::{fixture, test_devices};

#[derive(Deserialize)]
struct Refs {
    families: BTreeMap<String, FamilyRefs>,
}

#[derive(Deserialize)]
struct FamilyRefs {
    hf: HfRefs,
    templates: Vec<Render>,
    files: Vec<QuantFile>,
}

#[derive(Deserialize)]
struct HfRefs {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Render {
    messages: Vec<MessageJson>,
    /// transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.
    text: String,
}

#[derive(Deserialize)]
struct MessageJson {
    role: String,
    content: String,
}

fn refs(family: &str) -> FamilyRefs {
    let text = std::fs::read_to_string(fixture("tiny_qwen_refs.json")).unwrap();
    let mut r: Refs = serde_json::from_str(&text).unwrap();
    r.families.remove(family).expect("family in the fixture")
}

/// What the fixture script asked transformers for, per family: (heads, kv heads, head size).
fn expected_shape(family: Family) -> (usize, usize, usize) {
    match family {
        Family::Qwen2 => (4, 2, 64),
        // Qwen3's head size is stated, not hidden / heads (256 / 6 is not even whole).
        Family::Qwen3 => (6, 2, 64),
        Family::Llama => unreachable!(),
    }
}

fn check_shape(m: &Llama, family: Family) {
    let c = &m.cfg;
    assert_eq!(c.family, family);
    assert_eq!((c.n_heads, c.n_kv_heads, c.d_head), expected_shape(family));
    let b = &m.blocks[0].attn;
    assert_eq!(b.q_bias.is_some(), family == Family::Qwen2, "q/k/v biases");
    assert_eq!(b.q_norm.is_some(), family == Family::Qwen3, "QK-norm");
}

fn gguf_parity(family: Family, name: &str) {
    let f = refs(family.name()).files.into_iter().find(|f| f.name == name).expect("file in the fixture");
    let g = Gguf::open(fixture(&f.file)).unwrap();
    f.check_file(&g);

    let tok = Rc::new(Tokenizer::from_gguf(&g).unwrap());
    assert!(!tok.add_bos, "Qwen files add no BOS");
    for c in &f.cases {
        assert_eq!(tok.encode(&c.text, tok.add_bos).unwrap(), c.tokens, "{}: llama.cpp's tokens for {}", f.file, c.name);
    }
    for (device, at) in test_devices() {
        let model = Rc::new(Model::Text(load_llama(&g, &at).unwrap()));
        check_shape(model.decoder(), family);
        // The RoPE tables (derived, 1 MB for 4096 positions) are as large as these tiny
        // files: the residency check is on what the file holds.
        let m = model.decoder();
        let resident = (m.weights_device_bytes() - m.rope_table_bytes()) as f64 / g.file_len() as f64;
        assert!(resident <= 1.05, "{device} {}: weights on device {resident:.3}x the file", f.file);
        let (seen, _) = teacher_forcing_every_case(model.decoder(), &f.cases, &device);
        let greedy = greedy_matches_every_case(&model, &tok, &f.cases, &device);
        let compared: usize = seen.iter().map(|a| a.compared).sum();
        let positions: usize = seen.iter().map(|a| a.positions).sum();
        println!("| {} | {device} | {positions} | {compared}/{compared} | {greedy} | {resident:.3} |", f.file);
    }
}

/// The folder as f32: transformers' logits at every position (its top-5 ids), argmax and
/// greedy continuation. As Q8_0: transformers' clear decisions.
fn hf_parity(family: Family) {
    let r = refs(family.name());
    let dir = fixture(&format!("tiny_{}", family.name()));
    for (device, at) in test_devices() {
        let (model, tok) = ModelFiles::Dir(dir.clone()).load_text(QuantChoice::F32, &at, None).unwrap();
        check_shape(&model, family);
        let vocab = model.cfg.vocab_size;
        for c in &r.hf.cases {
            assert_eq!(tok.encode(&c.text, tok.add_bos).unwrap(), c.tokens, "transformers' tokens for {}", c.name);
            let mut cache = KvCache::new(&model.cfg, c.sequence.len() + 1, &model.device);
            let all = read_row(model.forward(&c.sequence, &mut cache, Logits::All)).unwrap();
            let (got, want): (Vec<f32>, Vec<f32>) =
                all.chunks(vocab).zip(&c.top).flat_map(|(row, top)| top.iter().map(|&(id, logit)| (row[id as usize], logit))).unzip();
            vidllm_tests::check_stage(&format!("{} f32 logits, {}", family.name(), c.name), &device, &got, &want);
            for (pos, row) in all.chunks(vocab).enumerate() {
                if c.margin(pos) > 1e-3 {
                    assert_eq!(argmax(row), c.top[pos][0].0, "{device}: {} position {pos}", c.name);
                }
            }
        }
        let (model, tok) = (Rc::new(Model::Text(model)), Rc::new(tok));
        for c in &r.hf.cases {
            let mut conv = Conversation::new(model.clone(), tok.clone(), 256);
            let n = c.continuation.len();
            conv.ask(Prompt::Tokens(&c.tokens), GenerateParams { max_tokens: n, ..Default::default() }).unwrap();
            let got = conv.answer(|_| true).unwrap().tokens;
            // transformers stops only at `eos_token_id`; vidllm also at the other
            // end-of-generation tokens (`<|endoftext|>`), as llama.cpp does.
            let want: Vec<u32> = c.continuation.iter().copied().take_while(|&t| !tok.is_eog(t)).collect();
            assert_eq!(got, want, "{device}: transformers' greedy continuation of {}", c.name);
        }
        println!("{device} {}: f32 folder matches transformers on {} cases", family.name(), r.hf.cases.len());

        let (q8, _) = ModelFiles::Dir(dir.clone()).load_text(QuantChoice::Q8_0, &at, None).unwrap();
        let (seen, _) = teacher_forcing_every_case(&q8, &r.hf.cases, &device);
        let compared: usize = seen.iter().map(|a| a.compared).sum();
        println!("{device} {}: Q8_0 on load agrees with transformers at {compared} clear positions (margin {MARGIN})", family.name());
    }
}

/// Every recorded conversation renders as transformers renders it, through the folder's
/// template and through the one llama.cpp's converter wrote into each GGUF file.
fn templates(family: Family) {
    let r = refs(family.name());
    let folder = ModelFiles::Dir(fixture(&format!("tiny_{}", family.name()))).tokenizer().unwrap();
    let mut toks = vec![("folder".to_string(), folder)];
    for f in &r.files {
        toks.push((f.file.clone(), Tokenizer::from_gguf(&Gguf::open(fixture(&f.file)).unwrap()).unwrap()));
    }
    for (from, tok) in &toks {
        for t in &r.templates {
            let messages: Vec<Message> = t.messages.iter().map(|m| Message::new(&m.role, &m.content)).collect();
            assert_eq!(tok.render_chat(&messages).unwrap(), t.text, "{from}: {} messages", messages.len());
        }
    }
    println!("{}: {} conversations render as transformers renders them, from {} templates", family.name(), r.templates.len(), toks.len());
}

#[test]
fn qwen2_q8_0_gguf() {
    gguf_parity(Family::Qwen2, "Q8_0");
}

#[test]
fn qwen2_q4_k_m_gguf() {
    gguf_parity(Family::Qwen2, "Q4_K_M");
}

#[test]
fn qwen3_q8_0_gguf() {
    gguf_parity(Family::Qwen3, "Q8_0");
}

#[test]
fn qwen3_q4_k_m_gguf() {
    gguf_parity(Family::Qwen3, "Q4_K_M");
}

#[test]
fn qwen2_folder_matches_transformers() {
    hf_parity(Family::Qwen2);
}

#[test]
fn qwen3_folder_matches_transformers() {
    hf_parity(Family::Qwen3);
}

#[test]
fn qwen2_chat_template() {
    templates(Family::Qwen2);
}

#[test]
fn qwen3_chat_template() {
    templates(Family::Qwen3);
}
