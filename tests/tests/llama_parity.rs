//! SmolLM2-135M-Instruct Q4_1 against llama.cpp (fixtures from
//! `tests/fixtures/gen_llama_fixtures.py`): tokenisation, chat template, teacher-forced
//! argmax on every device, greedy generation, CPU-vs-GPU logits, and 4-bit residency.

use std::rc::Rc;

use serde::Deserialize;
use vidllm_core::chat::{Message, render};
use vidllm_core::gguf::{FileBytes, Gguf};
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::{Model, load_llama};
use vidllm_shaders::cpu_int::ActBits;
use vidllm_tests::llamacpp::{Case, greedy_matches, teacher_forcing};
use vidllm_tests::{cpu, fixture, max_abs_diff, smollm2_path, test_devices};

#[derive(Deserialize)]
struct Fixture {
    model_sha256: String,
    bos: String,
    eos: String,
    cases: Vec<Case>,
}

fn load_fixture() -> Fixture {
    let f: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_llamacpp.json")).unwrap()).unwrap();
    assert!(f.cases.len() >= 8, "at least 8 prompts");
    f
}

fn gguf() -> Gguf {
    Gguf::open(smollm2_path()).expect("SmolLM2 GGUF opens")
}

#[test]
fn fixture_is_for_this_file() {
    let f = load_fixture();
    assert_eq!(f.model_sha256, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
}

#[test]
fn tokenization_equals_llama_cpp() {
    let f = load_fixture();
    let tok = Tokenizer::from_gguf(&gguf()).unwrap();
    for c in &f.cases {
        assert_eq!(tok.encode(&c.text, tok.add_bos).unwrap(), c.tokens, "case {}", c.name);
        assert_eq!(tok.decode(&c.tokens), c.text, "round trip of {}", c.name);
    }
}

#[test]
fn chat_template_equals_jinja2() {
    let f = load_fixture();
    let tok = Tokenizer::from_gguf(&gguf()).unwrap();
    let template = tok.chat_template.as_deref().unwrap();
    for c in f.cases.iter().filter(|c| c.kind == "chat") {
        let user = c.user.as_deref().unwrap();
        let text = render(template, &[Message::new("user", user)], &f.bos, &f.eos).unwrap();
        assert_eq!(text, c.text, "case {}", c.name);
    }
}

#[test]
fn parity_with_llama_cpp_on_every_device() {
    let f = load_fixture();
    let g = gguf();
    let tok = Rc::new(Tokenizer::from_gguf(&g).unwrap());
    let mut logits = Vec::new();
    for (name, at) in test_devices() {
        let model = Rc::new(Model::Text(load_llama(&g, &at).unwrap()));
        let resident = model.decoder().weights_device_bytes();
        println!("{name}: weights on device {resident} B, file {} B ({:.3}x)", g.file_len(), resident as f64 / g.file_len() as f64);
        assert!(resident as f64 <= 1.1 * g.file_len() as f64, "{name}: 4-bit weights not resident");
        // The token embeddings are read where the file's mapping has them, not copied.
        assert!(matches!(model.decoder().embed.bytes, FileBytes::Mapped(_)), "{name}: embedding table copied");
        logits.push((name.clone(), teacher_forcing(model.decoder(), &f.cases, &name).1));
        greedy_matches(&model, &tok, &f.cases, &name);
    }
    // Whole-model logits, CPU against each GPU device.
    let (cpu_name, cpu) = &logits[0];
    for (name, l) in &logits[1..] {
        let (diff, mag) = max_abs_diff(l, cpu);
        println!("{name} vs {cpu_name}: max |logit diff| {diff:.2e} (max |logit| {mag:.1})");
        assert!(diff < 1e-2, "{name} vs {cpu_name}: {diff}");
    }
}

/// `--activations int8`: the CPU's products take 8-bit activations as llama.cpp's do, and
/// still meet llama.cpp where its top-1 lead is clear, teacher-forced and greedy. The
/// prefill products then multiply bytes (`vpdpbusd`), decode the same codes as words.
#[test]
fn parity_with_llama_cpp_at_8_bit_activations() {
    let f = load_fixture();
    let g = gguf();
    let tok = Rc::new(Tokenizer::from_gguf(&g).unwrap());
    let at = cpu().with_activations(ActBits::Int8);
    let model = Rc::new(Model::Text(load_llama(&g, &at).unwrap()));
    teacher_forcing(model.decoder(), &f.cases, "cpu int8");
    greedy_matches(&model, &tok, &f.cases, "cpu int8");
}
