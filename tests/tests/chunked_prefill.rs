//! Long prompts are prefilled in chunks of `PREFILL_CHUNK`; the result must not depend on
//! the chunking (checked against prefills made of parts shorter than one chunk).

use vidllm_core::gguf::Gguf;
use vidllm_models::generate::read_row;
use vidllm_models::llama::PREFILL_CHUNK;
use vidllm_models::{KvCache, Logits, load_llama};
use vidllm_tests::{max_abs_diff, smollm2_path, test_devices};

#[test]
fn chunked_prefill_equals_piecewise_prefill() {
    let g = Gguf::open(smollm2_path()).unwrap();
    let n = 2 * PREFILL_CHUNK + 88;
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % 49152).collect();
    for (name, at) in test_devices().into_iter().take(1) {
        let device = at.device.clone();
        let model = load_llama(&g, &at).unwrap();
        let mut cache = KvCache::new(&model.cfg, n + 1, &device);
        let all = read_row(model.forward(&ids, &mut cache, Logits::All)).unwrap();
        let last_all = all[all.len() - model.cfg.vocab_size..].to_vec();
        let mut cache = KvCache::new(&model.cfg, n + 1, &device);
        let chunked = read_row(model.forward(&ids, &mut cache, Logits::Last)).unwrap();
        let mut cache = KvCache::new(&model.cfg, n + 1, &device);
        let mut piecewise = Vec::new();
        for part in ids.chunks(200) {
            piecewise = read_row(model.forward(part, &mut cache, Logits::Last)).unwrap();
        }
        let (d1, mag) = max_abs_diff(&chunked, &piecewise);
        let (d2, _) = max_abs_diff(&last_all, &piecewise);
        println!("{name}: {n} tokens, chunked vs piecewise max |diff| {d1:.2e}, all-logits path {d2:.2e} (max |logit| {mag:.1})");
        assert!(d1 < 1e-3 && d2 < 1e-3);
        assert_eq!(all.len(), n * model.cfg.vocab_size);
    }
}
