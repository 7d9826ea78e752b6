//! Devices cap what one kernel may bind (WebGPU's `maxStorageBufferBindingSize`, 128 MiB
//! by default). Under a small artificial cap, weights are stored as row bands, prefill
//! runs in shorter chunks and frames are encoded in batches, and the answers still equal
//! the independent references: llama.cpp for SmolLM2, transformers for Video-LLaVA.
//! The cap is a value of the placement a model is loaded at, so a capped and an uncapped
//! model run side by side in one process (and these tests in parallel).

use burn::tensor::{Tensor, TensorData};
use vidllm_core::gguf::Gguf;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampler::argmax;
use vidllm_models::generate::read_row;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::Visual;
use vidllm_models::quant_linear::QuantLinear;
use vidllm_models::video_llava::VideoLlava;
use vidllm_models::{KvCache, Logits, load_llama};
use vidllm_tests::llamacpp::{Case, MARGIN};
use vidllm_tests::{check_stage, every_case_on, fixture, max_abs_diff, prefill_with_visuals, smollm2_path, test_devices};

fn bands(l: &QuantLinear) -> usize {
    match l {
        QuantLinear::Blocks(m) => m.bands(),
        QuantLinear::Dense(b) => b.len(),
    }
}

#[derive(serde::Deserialize)]
struct LlamaFixture {
    cases: Vec<Case>,
}

#[test]
fn smollm2_under_a_4_mib_cap() {
    let g = Gguf::open(smollm2_path()).unwrap();
    let f: LlamaFixture = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2_llamacpp.json")).unwrap()).unwrap();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let whole = load_llama(&g, &at).unwrap();
        let split = load_llama(&g, &at.capped(4 << 20)).unwrap();
        assert_eq!(bands(&whole.lm_head), 1, "{name}: the device's own cap holds the head whole");
        // The tied 49152 x 576 Q8_0 head is 30 MB: eight bands under 4 MiB.
        assert!(bands(&split.lm_head) >= 8, "{name}: head in {} bands", bands(&split.lm_head));
        // Bands cost one spare word each, nothing more: the weights stay 4-bit.
        assert!(split.weights_device_bytes().abs_diff(whole.weights_device_bytes()) < 4096, "{name}: resident bytes changed");
        for c in f.cases.iter().take(if every_case_on(&name) { 3 } else { 1 }) {
            let ctx = c.sequence.len();
            println!("{name} {}: {} tokens prefilled in chunks of {}", c.name, ctx, split.prefill_chunk(ctx));
            let mut cache = KvCache::new(&split.cfg, ctx, &device);
            let got = read_row(split.forward(&c.sequence, &mut cache, Logits::All)).unwrap();
            let mut cache = KvCache::new(&whole.cfg, ctx, &device);
            let want = read_row(whole.forward(&c.sequence, &mut cache, Logits::All)).unwrap();
            let (diff, _) = max_abs_diff(&got, &want);
            let mut compared = 0;
            for (pos, row) in got.chunks(split.cfg.vocab_size).enumerate() {
                if c.margin(pos) >= MARGIN {
                    assert_eq!(argmax(row), c.top[pos][0].0, "{name} {} position {pos}", c.name);
                    compared += 1;
                }
            }
            println!("{name} {}: split vs whole max |logit diff| {diff:.2e}; argmax = llama.cpp at {compared} clear positions", c.name);
            assert!(diff < 1e-3, "{name}: {diff}");
        }
    }
}

#[test]
fn video_llava_under_a_4_kib_cap() {
    let r = Checkpoint::open_files(&[fixture("tiny_video_llava_ref.safetensors")]).unwrap();
    let (pix, pshape) = r.f32("pixel_values_videos").unwrap();
    let (t, s) = (pshape[1], pshape[3]);
    let ids: Vec<u32> = r.i64("input_ids").unwrap().0.into_iter().map(|v| v as u32).collect();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let model = VideoLlava::load(&fixture("tiny_video_llava"), QuantChoice::F32, &at.capped(4096)).unwrap();
        assert!(bands(&model.decoder.lm_head) > 1, "{name}: the head is split");
        println!("{name}: head in {} bands, prefill chunk {}", bands(&model.decoder.lm_head), model.decoder.prefill_chunk(ids.len() + 1));
        let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [t, 3, s, s]), &device);
        let features = model.video_features(pixels);
        check_stage(
            "projected features (frames in batches)",
            &name,
            &features.to_data().try_into_vec::<f32>().unwrap(),
            &r.f32("projected").unwrap().0,
        );
        let visual = [Visual::new(model.visual.video_token, features, model.video_tokens(t))];
        let (logits, _) = prefill_with_visuals(&model.decoder, &ids, &visual, 1, &device);
        check_stage("logits (banded head, chunked prefill)", &name, &logits, &r.f32("logits").unwrap().0);
    }
}
