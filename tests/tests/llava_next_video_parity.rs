//! Tiny random LLaVA-NeXT-Video (transformers 4.57.1, `gen_next_video_fixtures.py`):
//! pooled-then-projected frame features, logits and greedy tokens, on every device.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::tokenizer::Tokenizer;

use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::llava_next_video::LlavaNextVideo;
use vidllm_models::merge::{Visual, expand_placeholders};

use vidllm_tests::{check_stage, fixture, greedy as greedy_tokens, prefill_with_visuals, test_devices};

#[test]
fn llava_next_video_matches_transformers_on_every_device() {
    let r = Checkpoint::open_files(&[fixture("tiny_llava_next_video_ref.safetensors")]).unwrap();
    let dir = fixture("tiny_llava_next_video");
    let (pix, s) = r.f32("pixel_values_videos").unwrap();
    let ids: Vec<u32> = r.i64("input_ids").unwrap().0.into_iter().map(|v| v as u32).collect();
    let greedy: Vec<u32> = r.i64("greedy").unwrap().0.into_iter().map(|v| v as u32).collect();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let model = LlavaNextVideo::load(&dir, QuantChoice::F32, &at).unwrap();
        let t = s[1];
        let prompt_ids = tok.encode(&r.metadata["prompt"], true).unwrap();
        assert_eq!(expand_placeholders(&prompt_ids, model.video_token, t * model.tokens_per_frame()), ids);
        let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [t, s[2], s[3], s[4]]), &device);
        let features = model.video_features(pixels);
        check_stage("pooled+projected features", &name, &features.to_data().try_into_vec::<f32>().unwrap(), &r.f32("features").unwrap().0);
        let visual = [Visual::new(model.video_token, features, t * model.tokens_per_frame())];
        let (logits, mut cache) = prefill_with_visuals(&model.decoder, &ids, &visual, greedy.len() + 1, &device);
        check_stage("logits", &name, &logits, &r.f32("logits").unwrap().0);
        let got = greedy_tokens(&model.decoder, &mut cache, &logits, greedy.len());
        assert_eq!(got, greedy, "{name}");
    }
}
