//! PLLaVA's connector against a plain PyTorch implementation
//! (`tests/fixtures/gen_pllava_fixtures.py`): `AdaptiveAvgPool3d` on non-divisible shapes,
//! projector-then-pool with a short clip repeated up to `num_frames`, the LoRA merge at
//! the serving alpha, logits and greedy tokens, on every device.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_models::generate::read_row;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::Visual;
use vidllm_models::pllava::Pllava;
use vidllm_models::pllava_pool::pool3d;
use vidllm_models::{KvCache, Logits};
use vidllm_tests::{check_stage, fixture, greedy as greedy_tokens, prefill_with_visuals, rel_err, test_devices};

fn reference() -> Checkpoint {
    Checkpoint::open_files(&[fixture("tiny_pllava_ref.safetensors")]).unwrap()
}

#[test]
fn adaptive_avg_pool3d_matches_torch_on_non_divisible_shapes() {
    let r = reference();
    let outs: Vec<[usize; 3]> = serde_json::from_str(&r.metadata["pool_cases"]).unwrap();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        for (i, out) in outs.iter().enumerate() {
            let (x, s) = r.f32(&format!("pool{i}_in")).unwrap(); // [1, c, t, h, w]
            let (c, t, h, w) = (s[1], s[2], s[3], s[4]);
            let x = Tensor::<4>::from_data(TensorData::new(x, [c, t, h, w]), &device).permute([1, 2, 3, 0]); // [t, h, w, c]
            let y = pool3d(x, *out, None, &device); // [t'*h'*w', c]
            let got = y.swap_dims(0, 1).into_data().try_into_vec::<f32>().unwrap(); // [c, t'*h'*w']
            check_stage(&format!("pool ({t},{h},{w}) -> {out:?}"), &name, &got, &r.f32(&format!("pool{i}_out")).unwrap().0);
        }
    }
}

#[test]
fn pllava_matches_the_pytorch_reference_on_every_device() {
    let r = reference();
    let alpha: f32 = r.metadata["lora_alpha"].parse().unwrap();
    let (pix, s) = r.f32("pixel_values").unwrap();
    let ids: Vec<u32> = r.i64("input_ids").unwrap().0.into_iter().map(|v| v as u32).collect();
    let greedy: Vec<u32> = r.i64("greedy").unwrap().0.into_iter().map(|v| v as u32).collect();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let model = Pllava::load(&fixture("tiny_pllava"), QuantChoice::F32, Some(alpha), None, &at).unwrap();
        let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [s[0], s[1], s[2], s[3]]), &device);
        let projected = model.projected(pixels.clone());
        check_stage(
            "projector (before pooling)",
            &name,
            &projected.into_data().try_into_vec::<f32>().unwrap(),
            &r.f32("projected").unwrap().0,
        );
        let features = model.video_features(pixels);
        check_stage("pooled tokens", &name, &features.to_data().try_into_vec::<f32>().unwrap(), &r.f32("pooled").unwrap().0);
        let visual = [Visual::new(model.image_token, features, model.video_tokens())];
        let (logits, mut cache) = prefill_with_visuals(&model.decoder, &ids, &visual, greedy.len() + 1, &device);
        check_stage("logits (LoRA merged)", &name, &logits, &r.f32("logits").unwrap().0);
        let got = greedy_tokens(&model.decoder, &mut cache, &logits, greedy.len());
        assert_eq!(got, greedy, "{name}: greedy tokens");
        println!("{name}: greedy {got:?} equals the reference");
    }
}

#[test]
fn lora_alpha_is_a_real_knob() {
    let at = vidllm_tests::cpu();
    let device = at.device.clone();
    let r = reference();
    let ids: Vec<u32> = vec![1, 40, 41, 42];
    let logits = |alpha: f32| {
        let m = Pllava::load(&fixture("tiny_pllava"), QuantChoice::F32, Some(alpha), None, &at).unwrap();
        let mut cache = KvCache::new(&m.decoder.cfg, 8, &device);
        read_row(m.decoder.forward(&ids, &mut cache, Logits::Last)).unwrap()
    };
    let (a4, a32) = (logits(4.0), logits(32.0));
    assert!(rel_err(&a4, &a32) > 1e-3, "alpha must change the merged weights");
    drop(r);
}
