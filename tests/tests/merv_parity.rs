//! MERV against plain PyTorch written from its authors' code, LanguageBind's and timm's
//! (`tests/fixtures/gen_merv_fixtures.py`, tiny random encoders from transformers), on
//! every device. The folder is the one `tools/merv_convert.py` wrote from a tiny
//! checkpoint in MERV's own layout.
//!
//! - Preprocessing: LanguageBind's float path to 1e-4; the PIL paths (DINOv2, SigLIP,
//!   ViViT) within one 8-bit level of PIL's fixed-point resize on every value, the bound
//!   `preprocess_parity` holds every PIL resize to.
//! - From PIL's exact frames on: each encoder's features, pooled and projected tokens, the
//!   fusion's weights and tokens, the prompt's ids, logits and greedy tokens, to 1e-4.
//! - Through the registry from the decoded frames: the same prompt ids, and the
//!   reference's argmax wherever it leads by 0.5 (the one-level pixel differences move the
//!   logits a little).

use burn::tensor::{Int, Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::Visual;
use vidllm_models::merv::{Encoder, Merv};
use vidllm_models::model_files::ModelFiles;
use vidllm_models::pllava_pool::pool3d;
use vidllm_models::video_model::LoadOptions;
use vidllm_shaders::preprocess::rgb_planes;
use vidllm_tests::{check_stage, fixture, greedy as greedy_tokens, prefill_with_visuals, test_devices};

fn reference() -> Checkpoint {
    Checkpoint::open_files(&[fixture("tiny_merv_ref.safetensors")]).unwrap()
}

fn opts() -> LoadOptions {
    LoadOptions { quant: QuantChoice::F32, ..Default::default() }
}

fn vec_of<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

fn ids(r: &Checkpoint, key: &str) -> Vec<u32> {
    r.i64(key).unwrap().0.into_iter().map(|v| v as u32).collect()
}

fn merv(at: &vidllm_shaders::device::Placement) -> Merv {
    merv_with(at, &opts())
}

fn merv_with(at: &vidllm_shaders::device::Placement, opts: &LoadOptions) -> Merv {
    let config = ModelFiles::Dir(fixture("tiny_merv")).text("config.json").unwrap().unwrap();
    let ck = Checkpoint::open_dir(&fixture("tiny_merv")).unwrap();
    Merv::from_checkpoint(&ck, &serde_json::from_str(&config).unwrap(), opts, at).unwrap()
}

/// Frames (`key`, `[t, h, w, 3]` bytes) as RGB planes `[t, 3, h, w]`.
fn planes(r: &Checkpoint, key: &str, device: &burn::tensor::Device) -> Tensor<4> {
    let (raw, s) = r.raw(key).map(|(b, _, s)| (b.to_vec(), s)).unwrap();
    let (t, h, w) = (s[0], s[1], s[2]);
    let per = h * w * 3;
    let frames: Vec<&[u8]> = (0..t).map(|i| &raw[i * per..(i + 1) * per]).collect();
    rgb_planes(&frames, h, w, device)
}

/// Mean and std of a PIL-path encoder, as the fixture's config says.
fn norm(e: &str) -> ([f32; 3], [f32; 3]) {
    match e {
        "dinov2" => ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        _ => ([0.5; 3], [0.5; 3]),
    }
}

/// The encoder's input as the reference computed it, `[frames, 3, s, s]`: PIL's exact
/// 8-bit frames normalised (SigLIP's are DINOv2's frames; an image's one frame repeated),
/// or LanguageBind's float path, which the runtime computes to 1e-6.
fn exact_pixels(r: &Checkpoint, prefix: &str, enc: &Encoder, ours: &Tensor<4>) -> Tensor<4> {
    let e = enc.name.as_str();
    if e == "languagebind" {
        return ours.clone();
    }
    let device = ours.device();
    let src = if e == "siglip" { "dinov2" } else { e };
    let u8s = planes(r, &format!("{prefix}{src}_resized_u8"), &device);
    let t = u8s.dims()[0];
    let u8s = if t == enc.frames {
        u8s
    } else {
        u8s.select(0, Tensor::<1, Int>::from_data(TensorData::new(vec![0i64; enc.frames], [enc.frames]), &device))
    };
    let (mean, std) = norm(e);
    let mean = Tensor::<1>::from_floats(mean, &device).reshape([1, 3, 1, 1]);
    let std = Tensor::<1>::from_floats(std, &device).reshape([1, 3, 1, 1]);
    (u8s / 255.0 - mean) / std
}

/// The runtime's prepared frames against the reference's.
fn check_pixels(r: &Checkpoint, prefix: &str, enc: &Encoder, ours: &Tensor<4>, device: &str) {
    let e = enc.name.as_str();
    let [t, c, h, w] = ours.dims();
    let got = vec_of(ours.clone());
    if e == "languagebind" {
        check_stage(&format!("{prefix}{e} frame 0"), device, &got[..c * h * w], &r.f32(&format!("{prefix}{e}_pixels")).unwrap().0);
        let (sums, _, _) = r.raw(&format!("{prefix}{e}_pixels_sum")).unwrap();
        let want: Vec<f32> = sums.chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect();
        let got_sums: Vec<f32> =
            (0..t * c).map(|k| got[k * h * w..(k + 1) * h * w].iter().map(|&v| v as f64).sum::<f64>() as f32).collect();
        check_stage(&format!("{prefix}{e} per-frame sums"), device, &got_sums, &want);
        return;
    }
    let want = vec_of(exact_pixels(r, prefix, enc, ours));
    let level = 1.0 / (255.0 * norm(e).1.iter().copied().fold(f32::MAX, f32::min));
    let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let off = got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > level * 1.01).count();
    let ones = got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > 1e-4).count();
    println!("{device} {prefix}{e} pixels vs PIL: max {:.2} levels, {ones} of {} values one level off", max / level, got.len());
    assert_eq!(off, 0, "{device} {prefix}{e}: {off} values more than one 8-bit level from PIL's");
}

/// Every encoder from the reference's exact inputs: features, pooled, projected (each on
/// its own device, the tokens brought back to the clip's).
fn encoders_from_exact_pixels(r: &Checkpoint, prefix: &str, m: &Merv, clip: &Tensor<4>, device: &str) -> Vec<Tensor<2>> {
    let mut projected = Vec::new();
    for enc in &m.encoders {
        let e = &enc.name;
        let ours = enc.pixels(clip.clone().to_device(&enc.device));
        check_pixels(r, prefix, enc, &ours, device);
        let features = enc.features(exact_pixels(r, prefix, enc, &ours));
        if prefix.is_empty() {
            check_stage(&format!("{e} features"), device, &vec_of(features.clone()), &r.f32(&format!("{e}_features")).unwrap().0);
            let pooled = pool3d(features.clone(), [16, 8, 8], None, &features.device());
            check_stage(&format!("{e} pooled"), device, &vec_of(pooled), &r.f32(&format!("{e}_pooled")).unwrap().0);
        }
        let p = enc.projected(features);
        if prefix.is_empty() {
            check_stage(&format!("{e} projected"), device, &vec_of(p.clone()), &r.f32(&format!("{e}_projected")).unwrap().0);
        }
        projected.push(p.to_device(&clip.device()));
    }
    projected
}

#[test]
fn every_merv_stage_matches_the_pytorch_reference_on_every_device() {
    let r = reference();
    for (name, at) in test_devices() {
        let m = merv(&at);
        let weights = stages_from_exact_pixels(&r, &m, &name);
        println!("{name}: encoder weights {weights:?}, greedy {:?}", ids(&r, "greedy"));
    }
}

/// The clip's stages from PIL's exact pixels against the reference: each encoder, the
/// fusion's weights (returned) and tokens, the logits and the greedy tokens.
fn stages_from_exact_pixels(r: &Checkpoint, m: &Merv, name: &str) -> Vec<f32> {
    let (want_ids, greedy) = (ids(r, "input_ids"), ids(r, "greedy"));
    let device = merv_decoder(m).device.clone();
    let clip = m.clip(planes(r, "frames_u8", &device));
    let fused = m.fusion.forward(encoders_from_exact_pixels(r, "", m, &clip, name));
    let weights = vec_of(fused.weights);
    check_stage("fusion weights", name, &weights, &r.f32("fusion_weights").unwrap().0);
    check_stage("fused tokens", name, &vec_of(fused.tokens.clone()), &r.f32("fused").unwrap().0);
    // BOS, the fused tokens, the text: the reference's sequence.
    let placeholder = m.decoder_vocab() as u32 - 1;
    let seq: Vec<u32> =
        want_ids[..1].iter().copied().chain(std::iter::repeat_n(placeholder, 1024)).chain(want_ids[1..].iter().copied()).collect();
    let visual = Visual::new(placeholder, fused.tokens, 1024);
    let (logits, mut cache) = prefill_with_visuals(merv_decoder(m), &seq, &[visual], greedy.len() + 1, &device);
    let start: usize = r.metadata["logits_start"].parse().unwrap();
    check_stage("logits", name, &logits[start * m.decoder_vocab()..], &r.f32("logits").unwrap().0);
    assert_eq!(greedy_tokens(merv_decoder(m), &mut cache, &logits, greedy.len()), greedy, "{name}: greedy tokens");
    weights
}

/// One encoder a device (issue 12, item 5: the paper's scaling proposal): the encoders
/// alternate between the CPU and the GPU (lavapipe here), the fusion and the decoder on
/// either. Each encoder's projected tokens, the fusion and the logits match the reference
/// as on one device, and the registry's encode equals the one-device model's.
#[test]
fn merv_runs_its_encoders_on_devices_of_their_own() {
    let devices = test_devices();
    if devices.len() < 2 {
        println!("one device here: nothing to spread the encoders over");
        return;
    }
    let r = reference();
    let spread: Vec<_> = devices.iter().map(|(_, at)| at.clone()).collect();
    // Each encoder's tokens from the decoded frames on each device alone.
    let alone: Vec<Vec<Vec<f32>>> =
        spread.iter().map(|at| merv(at).projected(planes(&r, "frames_u8", &at.device)).into_iter().map(vec_of).collect()).collect();
    for (name, at) in &devices {
        let device = at.device.clone();
        let opts = LoadOptions { encoder_placements: spread.clone(), ..opts() };
        let m = merv_with(at, &opts);
        let on: Vec<bool> = m.encoders.iter().map(|e| e.device == device).collect();
        assert_eq!(on, [true, false, true, false].map(|home| home == (spread[0].device == device)), "{name}: alternating devices");
        let name = format!("{name}, encoders alternating");
        stages_from_exact_pixels(&r, &m, &name);
        // From the decoded frames, as `ask --devices` runs it (each encoder preparing its
        // frames on its own device): each encoder's tokens are those the one-device model
        // on that device makes.
        let split = m.projected(planes(&r, "frames_u8", &device));
        for (i, (e, tokens)) in m.encoders.iter().zip(split).enumerate() {
            let there = devices.iter().position(|(_, p)| p.device == e.device).unwrap();
            check_stage(&format!("{} from decoded frames, split against one device", e.name), &name, &vec_of(tokens), &alone[there][i]);
        }
    }
}

fn merv_decoder(m: &Merv) -> &vidllm_models::Llama {
    use vidllm_models::video_model::Architecture;
    m.decoder()
}

#[test]
fn merv_takes_an_image_as_a_clip_of_copies() {
    let r = reference();
    let greedy = ids(&r, "image_greedy");
    let question = r.metadata["question"].clone();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let m = merv(&at);
        let image = planes(&r, "image_u8", &device);
        let clip = m.clip(image.clone());
        assert_eq!(clip.dims()[0], 32);
        let fused = m.fusion.forward(encoders_from_exact_pixels(&r, "image_", &m, &clip, &name));
        let weights = vec_of(fused.weights);
        check_stage("image fusion weights", &name, &weights, &r.f32("image_fusion_weights").unwrap().0);
        check_stage("image fused tokens", &name, &vec_of(fused.tokens.clone()), &r.f32("image_fused").unwrap().0);
        let folder = ModelFiles::Dir(fixture("tiny_merv")).load(opts(), &at).unwrap();
        let model = &folder.model;
        let visual = Visual::new(model.encode_images(vec![image]).unwrap().token, fused.tokens, 1024);
        let text = model.first_turn(&folder.tok, &question, std::slice::from_ref(&visual), None).unwrap();
        let ids = model.first_turn_ids(&folder.tok, &text, std::slice::from_ref(&visual)).unwrap();
        let (logits, mut cache) = prefill_with_visuals(model.decoder(), &ids, &[visual], greedy.len() + 1, &device);
        let vocab = model.decoder().cfg.vocab_size;
        check_stage("image logits (last)", &name, &logits[logits.len() - vocab..], &r.f32("image_logits_last").unwrap().0);
        assert_eq!(greedy_tokens(model.decoder(), &mut cache, &logits, greedy.len()), greedy, "{name}: image greedy tokens");
        println!("{name}: image weights {weights:?}, greedy {greedy:?}");
    }
}

#[test]
fn merv_answers_as_the_reference_through_the_registry() {
    let r = reference();
    let (want_ids, greedy) = (ids(&r, "input_ids"), ids(&r, "greedy"));
    let (want_logits, _) = r.f32("logits").unwrap();
    let question = r.metadata["question"].clone();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let folder = ModelFiles::Dir(fixture("tiny_merv")).load(opts(), &at).unwrap();
        let model = &folder.model;
        assert_eq!(model.model_type(), "merv");
        // As the front ends hand frames over: the folder's preprocessing (none: each
        // encoder prepares its own) on the decoded frames.
        let px = vidllm_shaders::preprocess::preprocess_planes(planes(&r, "frames_u8", &device), &folder.pre);
        let encoded = model.encode_video(px, None).unwrap();
        let weights = model.encoder_weights().expect("MERV reports its encoder weights");
        let names: Vec<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["languagebind", "dinov2", "vivit", "siglip"]);
        let got: Vec<f32> = weights.iter().map(|(_, w)| *w).collect();
        let want_w = r.f32("fusion_weights").unwrap().0;
        let times = vidllm_core::sampling::FrameTimes { times: (0..32).map(|i| i as f64).collect(), duration: 32.0 };
        let text = model.first_turn(&folder.tok, &question, &[], Some(&times)).unwrap();
        let ids = model.first_turn_ids(&folder.tok, &text, std::slice::from_ref(&encoded.visual)).unwrap();
        let placeholder = encoded.visual.token;
        let want: Vec<u32> =
            want_ids[..1].iter().copied().chain(std::iter::repeat_n(placeholder, 1024)).chain(want_ids[1..].iter().copied()).collect();
        assert_eq!(ids, want, "{name}: prompt ids (visual tokens right after BOS, then {text:?})");
        let (logits, mut cache) = prefill_with_visuals(model.decoder(), &ids, &[encoded.visual], greedy.len() + 1, &device);
        let vocab = model.decoder().cfg.vocab_size;
        let start: usize = r.metadata["logits_start"].parse().unwrap();
        for (pos, (g, w)) in logits[start * vocab..].chunks(vocab).zip(want_logits.chunks(vocab)).enumerate() {
            let mut order: Vec<usize> = (0..vocab).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
            if w[order[0]] - w[order[1]] >= 0.5 {
                assert_eq!(vidllm_core::sampler::argmax(g) as usize, order[0], "{name}: position {}", start + pos);
            }
        }
        // The answer's later tokens follow the tiny random model's near-ties, which pixels
        // a level apart can tip: they are printed, and held to the rule above only.
        let tokens = greedy_tokens(model.decoder(), &mut cache, &logits, greedy.len());
        println!("{name}: weights {got:?} (reference {want_w:?}), greedy {tokens:?} (reference {greedy:?})");
    }
}
