//! Several sequences decoded together (what `vidllm-native serve --parallel N` does): one
//! batched forward pass per step over every sequence that needs a token, each sequence at
//! its own position in its own KV cache, sequences joining and leaving between steps.
//!
//! The reference is llama.cpp: every prompt of its SmolLM2 fixture runs in one batch, and
//! each sequence's greedy tokens must equal llama.cpp's continuation up to its first
//! unclear step, as `greedy_matches` checks one sequence at a time. On every device.

use std::rc::Rc;

use serde::Deserialize;
use vidllm_core::gguf::Gguf;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row;
use vidllm_models::{Conversation, GenerateParams, KvCache, Logits, Model, Prompt, Step, load_llama};
use vidllm_tests::llamacpp::{Case, MARGIN};
use vidllm_tests::{fixture, max_abs_diff, smollm2_path, test_devices};

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

/// Tokens of `c`'s continuation llama.cpp decided clearly (top-1 ahead by [`MARGIN`]).
fn clear_prefix(c: &Case, tok: &Tokenizer) -> Vec<u32> {
    let clear = (0..c.continuation.len()).take_while(|&i| c.margin(c.tokens.len() - 1 + i) >= MARGIN).count();
    c.continuation[..clear].iter().copied().filter(|&t| !tok.is_eog(t)).collect()
}

#[test]
fn batched_greedy_decoding_equals_llama_cpp_on_every_device() {
    let f: Fixture = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_llamacpp.json")).unwrap()).unwrap();
    let g = Gguf::open(smollm2_path()).unwrap();
    let tok = Rc::new(Tokenizer::from_gguf(&g).unwrap());
    for (name, at) in test_devices() {
        let model = Rc::new(Model::Text(load_llama(&g, &at).unwrap()));
        let cases: Vec<&Case> = f.cases.iter().filter(|c| c.runs_on(&name)).collect();
        // Sequence i joins at step i, so sequences join while others decode, and each
        // generates llama.cpp's whole continuation length, so they leave at different steps.
        let mut convs: Vec<Option<Conversation>> = Vec::new();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
        let (mut step, mut widest) = (0, 0);
        loop {
            if let Some(c) = cases.get(convs.len()) {
                let mut conv = Conversation::new(model.clone(), tok.clone(), (c.tokens.len() + c.continuation.len()).max(128));
                conv.ask(Prompt::Tokens(&c.tokens), GenerateParams { max_tokens: c.continuation.len(), ..Default::default() }).unwrap();
                convs.push(Some(conv));
            }
            let mut live: Vec<(usize, &mut Conversation)> =
                convs.iter_mut().enumerate().filter_map(|(i, c)| Some((i, c.as_mut()?))).collect();
            if live.is_empty() {
                break;
            }
            widest = widest.max(live.len());
            let mut refs: Vec<&mut Conversation> = live.iter_mut().map(|(_, c)| &mut **c).collect();
            let steps = Conversation::step_many(&mut refs);
            let mut ended = Vec::new();
            for ((i, conv), s) in live.into_iter().zip(steps) {
                match s.unwrap() {
                    Step::Read(logits) => {
                        if let Some(p) = conv.accept(&read_row(logits).unwrap()).unwrap() {
                            got[i].push(p.id);
                        }
                    }
                    Step::Finished(done) => {
                        assert_eq!(done.tokens, got[i], "{name}: {} finished with the tokens it streamed", cases[i].name);
                        ended.push(i);
                    }
                }
            }
            for i in ended {
                convs[i] = None;
            }
            step += 1;
        }
        assert!(widest >= cases.len().min(3), "{name}: at most {widest} sequences ran together");
        let mut compared = 0;
        for (c, got) in cases.iter().zip(&got) {
            let want = clear_prefix(c, &tok);
            assert_eq!(&got[..want.len().min(got.len())], &want[..], "{name}: {} in a batch against llama.cpp", c.name);
            assert!(got.len() >= want.len(), "{name}: {} ended before llama.cpp's clear tokens", c.name);
            compared += want.len();
        }
        println!("{name}: {} sequences over {step} steps, up to {widest} at once; {compared} clear tokens equal llama.cpp's", cases.len());
        assert!(compared >= 10, "{name}: too few clear tokens compared ({compared})");
    }
}

/// A batched step's row for each sequence against that sequence's own single-token pass:
/// the batch must not change a sequence's logits at all (the products keep each row's
/// arithmetic its own), so an answer does not depend on what it was served with.
#[test]
fn a_batched_step_gives_each_sequence_its_own_logits() {
    let g = Gguf::open(smollm2_path()).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a land far away, there lived a"];
    for (name, at) in test_devices() {
        let model = load_llama(&g, &at).unwrap();
        let prefill = |p: &str| {
            let ids = tok.encode(p, tok.add_bos).unwrap();
            let mut cache = KvCache::new(&model.cfg, 64, &model.device);
            let _ = read_row(model.forward(&ids, &mut cache, Logits::Last)).unwrap();
            cache
        };
        let next = [tok.encode(" Paris", false).unwrap()[0], tok.encode(" 5", false).unwrap()[0], tok.encode(" king", false).unwrap()[0]];
        let mut alone: Vec<KvCache> = prompts.iter().map(|p| prefill(p)).collect();
        let mut together: Vec<KvCache> = prompts.iter().map(|p| prefill(p)).collect();
        let vocab = model.cfg.vocab_size;
        for round in 0..2 {
            let mut caches: Vec<&mut KvCache> = together.iter_mut().collect();
            let batched = read_row(model.forward_batch(&next, &mut caches)).unwrap();
            for (i, cache) in alone.iter_mut().enumerate() {
                let own = read_row(model.forward(&next[i..i + 1], cache, Logits::Last)).unwrap();
                let (diff, mag) = max_abs_diff(&batched[i * vocab..(i + 1) * vocab], &own);
                println!("{name} round {round} sequence {i}: max |batched - alone| {diff:.2e} (max |logit| {mag:.1})");
                assert_eq!(diff, 0.0, "{name}: sequence {i} round {round}");
                assert_eq!(together[i].len, cache.len, "{name}: positions advance alike");
            }
        }
    }
}
