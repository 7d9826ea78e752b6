//! Recorded decode steps (`models/src/step_graph.rs`) on SmolLM2, on every device: each
//! replayed step's logits equal, bit for bit, those of the same step run without a
//! recording (`forward_embeds`, which never records), through a grow of the cache's
//! storage (the recording is dropped and made again), a prefill between steps (a turn's
//! follow-up), and a step from another thread. On wgpu the steps are replayed; the CPU
//! backend cannot record and says so. That replayed greedy decoding equals llama.cpp's
//! tokens is `kv_cache.rs`'s check (f16 and q8_0 caches, every device).

use burn::tensor::Tensor;
use vidllm_core::gguf::Gguf;
use vidllm_models::generate::read_row;
use vidllm_models::{KvCache, KvType, Logits, load_llama};
use vidllm_tests::{smollm2_path, test_devices};

/// Steps taken in each way; the prompt leaves the first grow (from `KvCache::FIRST_ROWS`)
/// a few steps in.
const STEPS: usize = 12;

#[test]
fn replayed_steps_equal_plain_steps_on_every_device() {
    let g = Gguf::open(smollm2_path()).unwrap();
    for (name, at) in test_devices() {
        let m = load_llama(&g, &at).unwrap();
        let vocab = m.cfg.vocab_size;
        // Token ids 1000.. as a prompt that ends 4 rows before the storage grows.
        let prompt: Vec<u32> = (0..KvCache::FIRST_ROWS as u32 - 4).map(|i| 1000 + i * 7 % 5000).collect();
        let capacity = 2 * KvCache::FIRST_ROWS;
        let mut recorded = KvCache::typed(KvType::F16, &m.cfg, capacity, &at.device);
        let mut plain = KvCache::typed(KvType::F16, &m.cfg, capacity, &at.device);
        let first = |cache: &mut KvCache| read_row(m.forward(&prompt, cache, Logits::Last)).unwrap();
        let mut next = argmax(&first(&mut recorded));
        assert_eq!(next, argmax(&first(&mut plain)));
        let gpu = name != "cpu";
        let mut replayed = 0;
        for i in 0..3 * STEPS {
            // A follow-up's prefill after the first third, and the middle third on another thread.
            if i == STEPS {
                let follow: Vec<u32> = vec![next, 2000, 2001, 2002];
                let a = read_row(m.forward(&follow, &mut recorded, Logits::Last)).unwrap();
                let b = read_row(m.forward(&follow, &mut plain, Logits::Last)).unwrap();
                assert_eq!(a, b, "{name}: the follow-up's prefill");
                assert!(!recorded.step_graph_ready(), "{name}: a prefill drops the recording");
                next = argmax(&a);
            }
            let step = |cache: &mut KvCache| read_row(m.forward(&[next], cache, Logits::Last)).unwrap();
            let a = if (STEPS..2 * STEPS).contains(&i) {
                std::thread::scope(|s| s.spawn(|| step(&mut recorded)).join().unwrap())
            } else {
                let before = recorded.step_graph_ready();
                let a = step(&mut recorded);
                replayed += usize::from(before && recorded.step_graph_ready());
                a
            };
            let b = read_row(m.forward_embeds(m.embed.lookup(&[next], &at.device), &mut plain, Logits::Last)).unwrap();
            assert_eq!(a.len(), vocab);
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(differ, 0, "{name}: step {i} (row {}): {differ} logits differ from the plain step's", recorded.len - 1);
            next = argmax(&a);
        }
        assert_eq!(recorded.len, plain.len);
        assert_eq!(recorded.rows(), 2 * KvCache::FIRST_ROWS, "{name}: the storage grew");
        println!(
            "{name}: {} steps equal the plain steps bit for bit, {replayed} of them replayed; refused: {:?}",
            3 * STEPS,
            recorded.step_graph_refused()
        );
        if gpu {
            assert!(replayed >= STEPS, "{name}: {replayed} steps replayed");
            assert_eq!(recorded.step_graph_refused(), None, "{name}");
        } else {
            assert_eq!(replayed, 0);
            assert!(recorded.step_graph_refused().is_some(), "cpu: the refusal is kept");
        }
        // The recording holds the buffers; dropping the cache with it is clean.
        drop(recorded);
        let _ = Tensor::<1>::zeros([1], &at.device).into_data();
    }
}

fn argmax(row: &[f32]) -> u32 {
    vidllm_core::sampler::argmax(row) as u32
}
