//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenisation against llama.cpp, on a
//! vocab-only GGUF made by `tests/fixtures/gen_spm_fixtures.py` from a trained BPE model
//! with byte fallback.

use serde::Deserialize;
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::{Tokenizer, TokenizerKind};
use vidllm_tests::fixture;

#[derive(Deserialize)]
struct Case {
    text: String,
    tokens: Vec<u32>,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[test]
fn sentencepiece_tokenization_equals_llama_cpp() {
    let f: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture("spm_llamacpp.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_gguf(&Gguf::open(fixture("spm_vocab.gguf")).unwrap()).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::SentencePiece);
    assert!(tok.add_bos);
    for c in &f.cases {
        let ids = tok.encode(&c.text, tok.add_bos).unwrap();
        assert_eq!(ids, c.tokens, "{:?}", c.text);
        // Decoding drops only the space SentencePiece prepends.
        let text = tok.decode(&ids[1..]);
        assert_eq!(text.strip_prefix(' ').unwrap_or(&text), c.text, "round trip of {:?}", c.text);
    }
}
