//! Long prompts are prefilled in chunks of `PREFILL_CHUNK`; the result must not depend on
//! the chunking (checked against prefills made of parts shorter than one chunk).

use vidllm_core::gguf::Gguf;
use vidllm_models::generate::read_row;
use vidllm_models::llama::PREFILL_CHUNK;
use vidllm_models::{KvCache, KvType, Logits, load_llama};
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

/// A cache that grows as positions are written gives exactly the logits of one allocated
/// whole up front (`KvCache::full`), through grows in a prefill and in the decode, on every
/// device and for every cache type (`--kv`). (It starts small here so that a short run grows it several times; `KvCache::new`
/// starts at `FIRST_ROWS`.)
#[test]
fn growing_cache_equals_full_cache() {
    let g = Gguf::open(smollm2_path()).unwrap();
    let prompt: Vec<u32> = (0..10u32).map(|i| (i * 7919 + 13) % 49152).collect();
    let capacity = 40;
    for ((name, at), kv) in test_devices().into_iter().flat_map(|d| KvType::ALL.map(|kv| (d.clone(), kv))) {
        let model = load_llama(&g, &at).unwrap();
        let name = format!("{name} (kv {kv})");
        let mut growing = KvCache::with_rows_typed(kv, &model.cfg, capacity, 4, &at.device);
        let mut full = KvCache::with_rows_typed(kv, &model.cfg, capacity, capacity, &at.device);
        let mut a = read_row(model.forward(&prompt, &mut growing, Logits::Last)).unwrap();
        let mut b = read_row(model.forward(&prompt, &mut full, Logits::Last)).unwrap();
        let mut rows = vec![growing.rows()];
        let mut worst = max_abs_diff(&a, &b).0;
        for step in 0..capacity - prompt.len() {
            let next = vidllm_core::sampler::argmax(&b);
            assert_eq!(vidllm_core::sampler::argmax(&a), next, "{name}: step {step}");
            a = read_row(model.forward(&[next], &mut growing, Logits::Last)).unwrap();
            b = read_row(model.forward(&[next], &mut full, Logits::Last)).unwrap();
            worst = worst.max(max_abs_diff(&a, &b).0);
            rows.push(growing.rows());
        }
        rows.dedup();
        println!("{name}: storage grew through {rows:?} rows; max |diff| against the full cache {worst:.2e}");
        assert_eq!(rows, [10, 20, 40]);
        assert_eq!(growing.device_bytes(), full.device_bytes());
        assert_eq!(worst, 0.0, "{name}: a grown cache changed the logits");
    }
    let cfg = load_llama(&g, &vidllm_tests::cpu()).unwrap().cfg;
    assert_eq!(KvCache::new(&cfg, 4096, &vidllm_tests::cpu().device).rows(), KvCache::FIRST_ROWS);
}
