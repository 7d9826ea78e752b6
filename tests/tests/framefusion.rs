//! FrameFusion inside the decoder against a PyTorch reference
//! (`tests/fixtures/gen_framefusion_fixtures.py`: the tiny Qwen2 folder through
//! transformers' modules in float64, FrameFusion's steps between them): the same merges,
//! the same pruning, the same tokens at each layer, then the prompt's last logits and
//! three greedy decode steps from caches whose layers hold different rows. On every
//! device, with an f32 cache and (argmax only) a q8_0 one.

use vidllm_core::safetensors::Checkpoint;
use vidllm_models::framefusion::{FrameFusion, Plan};
use vidllm_models::generate::read_row;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::model_files::ModelFiles;
use vidllm_models::{KvCache, KvType, Logits};
use vidllm_tests::{check_stage, fixture, test_devices};

struct Case {
    name: String,
    patch: Vec<Option<usize>>,
    plan: Plan,
    merged: Vec<f64>,
    layer_tokens: Vec<usize>,
    pruned_after_layer: Option<usize>,
    tokens_after: usize,
    greedy: Vec<u32>,
    /// The prompt rows each layer attended to.
    held: Vec<Vec<usize>>,
}

fn cases() -> (Vec<Case>, Checkpoint) {
    let path = fixture("framefusion_ref.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta: serde_json::Value = serde_json::from_str(header["__metadata__"]["cases"].as_str().unwrap()).unwrap();
    let usizes = |v: &serde_json::Value| -> Vec<usize> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };
    let cases = meta
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, c)| Case {
            name: name.clone(),
            patch: c["patch"].as_array().unwrap().iter().map(|p| p.as_u64().map(|p| p as usize)).collect(),
            plan: Plan {
                budget: c["budget"].as_u64().unwrap() as usize,
                tokens: c["tokens"].as_u64().unwrap() as usize,
                tokens_per_frame: c["tokens_per_frame"].as_u64().unwrap() as usize,
            },
            merged: c["merged"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect(),
            layer_tokens: usizes(&c["layer_tokens"]),
            pruned_after_layer: c["pruned_after_layer"].as_u64().map(|l| l as usize),
            tokens_after: c["tokens_after"].as_u64().unwrap() as usize,
            greedy: c["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
            held: c["held"].as_array().unwrap().iter().map(usizes).collect(),
        })
        .collect();
    (cases, Checkpoint::open_files(&[path]).unwrap())
}

#[test]
fn framefusion_matches_the_pytorch_reference() {
    let (cases, refs) = cases();
    assert_eq!(cases.len(), 3);
    for (device, at) in test_devices() {
        let (model, _) = ModelFiles::Dir(fixture("tiny_qwen2")).load_text(QuantChoice::F32, &at, None).unwrap();
        let vocab = model.cfg.vocab_size;
        for c in &cases {
            let (x, shape) = refs.f32(&format!("{}.x", c.name)).unwrap();
            let (want, _) = refs.f32(&format!("{}.logits", c.name)).unwrap();
            let t = shape[0];
            for kv in [KvType::F32, KvType::Q8_0] {
                let x = burn::tensor::Tensor::<2>::from_data(burn::tensor::TensorData::new(x.clone(), shape.clone()), &model.device);
                let mut cache = KvCache::typed(kv, &model.cfg, t + 8, &model.device);
                let mut ff = FrameFusion::new(c.plan, c.patch.clone(), model.blocks.len());
                let logits = read_row(model.forward_fused(x, &mut cache, &mut ff).unwrap()).unwrap();
                let r = ff.report();
                let what = format!("{device} {} ({kv} cache)", c.name);
                assert_eq!(r.layer_tokens, c.layer_tokens, "{what}: tokens by layer");
                // The same kept tokens: the rows each layer attended to and holds.
                assert_eq!(r.layer_rows, c.held, "{what}: rows by layer");
                assert_eq!(r.pruned_after_layer, c.pruned_after_layer, "{what}: pruning layer");
                assert_eq!(r.tokens_after(), c.tokens_after, "{what}: tokens after");
                assert_eq!(r.merged.len(), c.merged.len(), "{what}: merging steps {:?} vs {:?}", r.merged, c.merged);
                for (g, w) in r.merged.iter().zip(&c.merged) {
                    assert!((g - w).abs() < 1e-12, "{what}: sparsity {g} vs {w}");
                }
                // The rows each layer holds: layer 0 all the prompt but what merged before
                // it; the answer continues after the unreduced prompt.
                let merged_first = (c.merged[0] * c.plan.tokens as f64).round() as usize;
                assert_eq!(cache.len, t - merged_first, "{what}: layer 0 rows");
                assert_eq!(cache.next_position(), t, "{what}: next position");
                let last_layer = model.blocks.len() - 1;
                let text = t - c.plan.tokens;
                assert_eq!(cache.layer_len(last_layer), text + c.layer_tokens[last_layer], "{what}: last layer rows");
                let mut steps = vec![logits];
                for &tok in &c.greedy {
                    steps.push(read_row(model.forward(&[tok], &mut cache, Logits::Last)).unwrap());
                }
                for (i, got) in steps.iter().enumerate() {
                    let want = &want[i * vocab..(i + 1) * vocab];
                    if kv == KvType::F32 {
                        check_stage(&format!("{} logits, step {i}", c.name), &device, got, want);
                    } else {
                        // A quantised cache rounds keys and values: the same greedy token.
                        let argmax = |v: &[f32]| vidllm_core::sampler::argmax(v);
                        assert_eq!(argmax(got), argmax(want), "{what}: step {i} argmax");
                    }
                }
                // Forgetting rows forgets each layer's dropped ones too.
                cache.truncate(2);
                assert_eq!((cache.len, cache.layer_len(last_layer), cache.next_position()), (2, 2, 2), "{what}");
            }
        }
    }
}

/// Refusals: a prompt after cached rows, and one that ends in a visual token.
#[test]
fn framefusion_refuses_what_it_cannot_reduce() {
    let (model, _) = ModelFiles::Dir(fixture("tiny_qwen2")).load_text(QuantChoice::F32, &test_devices()[0].1, None).unwrap();
    let plan = Plan { budget: 2, tokens: 4, tokens_per_frame: 2 };
    let x = || model.embed.lookup(&[420, 5, 17, 33, 90], &model.device);
    let mut cache = KvCache::new(&model.cfg, 32, &model.device);
    model.forward(&[420], &mut cache, Logits::Last);
    let mut ff = FrameFusion::new(plan, vec![None, Some(0), Some(1), Some(0), Some(1)], model.blocks.len());
    let err = model.forward_fused(x(), &mut cache, &mut ff).unwrap_err();
    assert!(err.contains("starts a conversation"), "{err}");
    let mut cache = KvCache::new(&model.cfg, 32, &model.device);
    let mut ff = FrameFusion::new(plan, vec![None, Some(0), Some(1), Some(0), Some(1)], model.blocks.len());
    let err = model.forward_fused(x(), &mut cache, &mut ff).unwrap_err();
    assert!(err.contains("end in text"), "{err}");
    assert_eq!(cache.len, 0, "nothing written");
}
