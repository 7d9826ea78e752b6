//! Tiny random SmolVLM2 (transformers 4.57.1, `gen_smolvlm_fixtures.py`) against
//! transformers, stage by stage, on every device: the processor's frame choice, pixels and
//! prompt ids; the SigLIP tower's last hidden state; the connector (pixel shuffle and
//! projection); the merged embeddings; logits and greedy tokens; and a follow-up turn
//! through the conversation, reusing the KV cache.

use std::rc::Rc;

use burn::tensor::{Tensor, TensorData};
use vidllm_core::preprocess::reference;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::sampling::FrameTimes;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row;
use vidllm_models::layers::TowerWeights;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::Visual;
use vidllm_models::merge::merge_embeddings;
use vidllm_models::model_files::ModelFiles;
use vidllm_models::smolvlm::{SmolVlm, SmolVlmConfigJson};
use vidllm_models::video_model::{Architecture, LoadOptions, VideoModel};
use vidllm_models::{Conversation, GenerateParams, KvCache, Logits, Model, Prompt};
use vidllm_shaders::cpu_int::ActBits;
use vidllm_shaders::preprocess::{preprocess, rgb_planes};
use vidllm_tests::{check_stage, check_tiles, cpu, fixture, greedy as greedy_tokens, prefill_with_visuals, test_devices};

fn refs() -> Checkpoint {
    Checkpoint::open_files(&[fixture("tiny_smolvlm_ref.safetensors")]).unwrap()
}

fn ids(r: &Checkpoint, name: &str) -> Vec<u32> {
    r.i64(name).unwrap().0.into_iter().map(|v| v as u32).collect()
}

/// When the fixture's frames were taken: the clip's rate and length, as the processor saw them.
fn frame_times(r: &Checkpoint) -> FrameTimes {
    let fps: f64 = r.metadata["video_fps"].parse().unwrap();
    let total: usize = r.metadata["video_frames"].parse().unwrap();
    let indices: Vec<usize> = r.i64("frame_indices").unwrap().0.into_iter().map(|v| v as usize).collect();
    FrameTimes::of_indices(&indices, total, fps)
}

fn model(at: &vidllm_shaders::device::Placement) -> SmolVlm {
    let dir = fixture("tiny_smolvlm");
    let cfg: SmolVlmConfigJson = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    SmolVlm::from_checkpoint(&Checkpoint::open_dir(&dir).unwrap(), &cfg, &LoadOptions { quant: QuantChoice::F32, ..Default::default() }, at)
        .unwrap()
}

/// The video processor's choices: which frames, and their pixels (vidllm resamples in
/// floating point where torchvision's uint8 path uses fixed point: one 8-bit level).
#[test]
fn frames_and_pixels_match_the_video_processor() {
    let r = refs();
    let files = ModelFiles::Dir(fixture("tiny_smolvlm"));
    let cpu = vidllm_tests::cpu();
    let pre = model(&cpu).read_preprocessor(&files.preprocessor().unwrap(), &files.image_preprocessor().unwrap()).unwrap();
    let fps: f64 = r.metadata["video_fps"].parse().unwrap();
    let total: usize = r.metadata["video_frames"].parse().unwrap();
    let want_idx: Vec<usize> = r.i64("frame_indices").unwrap().0.into_iter().map(|v| v as usize).collect();
    assert_eq!(pre.sampling.indices(total, fps).unwrap(), want_idx);

    let (frames, shape) = r.raw("frames").map(|(b, _, s)| (b.to_vec(), s)).unwrap();
    let (h, w) = (shape[1], shape[2]);
    let per = h * w * 3;
    let (want, _) = r.f32("pixel_values").unwrap();
    let level = 1.0 / (255.0 * pre.pixels.std[0]);
    let cpu_ref: Vec<f32> = frames.chunks(per).flat_map(|f| reference(f, h, w, &pre.pixels)).collect();
    let off = |got: &[f32]| got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > level * 1.01).count();
    let flips = |got: &[f32]| got.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > 1e-3).count();
    println!("cpu reference vs transformers: {} of {} values one level off", flips(&cpu_ref), want.len());
    assert_eq!(off(&cpu_ref), 0);
    let slices: Vec<&[u8]> = frames.chunks(per).collect();
    for (name, at) in test_devices() {
        let got = preprocess(&slices, h, w, &pre.pixels, &at.device).into_data().try_into_vec::<f32>().unwrap();
        println!("{name} vs transformers: {} of {} values one level off", flips(&got), want.len());
        assert_eq!(off(&got), 0, "{name}");
        // Two resizes, each rounded: a value on .5 may round the other way, rarely.
        assert!(flips(&got) * 50 <= want.len(), "{name}: {} values differ", flips(&got));
    }
}

#[test]
fn prompt_ids_match_the_processor() {
    let r = refs();
    let dir = fixture("tiny_smolvlm");
    let tok = ModelFiles::Dir(dir.clone()).tokenizer().unwrap();
    let m = model(&vidllm_tests::cpu());
    let text = m.first_turn(&tok, &r.metadata["question"], &[], Some(&frame_times(&r))).unwrap();
    let t = frame_times(&r).times.len();
    let visual = m.video(Tensor::zeros([t, 3, 96, 96], &vidllm_tests::cpu().device));
    assert_eq!(VideoModel::prompt_ids(&tok, &text, &[visual]).unwrap(), ids(&r, "input_ids"), "{text}");
    assert_eq!(tok.decode(&ids(&r, "input_ids")), r.metadata["rendered"]);
}

#[test]
fn smolvlm_matches_transformers_on_every_device() {
    let r = refs();
    let (pix, s) = r.f32("pixel_values").unwrap();
    let input_ids = ids(&r, "input_ids");
    let greedy = ids(&r, "greedy");
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let m = model(&at);
        let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [s[0], s[1], s[2], s[3]]), &device);
        let hidden = m.vision.forward(pixels.clone());
        check_stage(
            "SigLIP last hidden state",
            &name,
            &hidden.to_data().try_into_vec::<f32>().unwrap(),
            &r.f32("vision_hidden").unwrap().0,
        );
        let features = m.image_features(pixels.clone());
        check_stage("connector", &name, &features.to_data().try_into_vec::<f32>().unwrap(), &r.f32("connector").unwrap().0);
        let visual = [m.video(pixels)];
        let embeds = merge_embeddings(&m.decoder, &input_ids, &visual).unwrap();
        check_stage("merged embeddings", &name, &embeds.to_data().try_into_vec::<f32>().unwrap(), &r.f32("inputs_embeds").unwrap().0);
        let mut cache = KvCache::new(&m.decoder.cfg, input_ids.len() + greedy.len() + 1, &device);
        let logits = read_row(m.decoder.forward_embeds(embeds, &mut cache, Logits::All)).unwrap();
        check_stage("logits", &name, &logits, &r.f32("logits").unwrap().0);
        assert_eq!(greedy_tokens(&m.decoder, &mut cache, &logits, greedy.len()), greedy, "{name}");
    }
}

/// The whole turn as the front ends run it: the folder through the registry, the video
/// set with its frame times, a question and a follow-up in one conversation (the follow-up
/// reuses the KV cache): the same ids and greedy tokens as transformers.
#[test]
fn conversation_with_follow_up_matches_transformers() {
    let r = refs();
    let (pix, s) = r.f32("pixel_values").unwrap();
    let (first, follow) = (ids(&r, "greedy"), ids(&r, "follow_greedy"));
    let follow_ids = ids(&r, "follow_input_ids");
    for (name, at) in test_devices() {
        let folder =
            ModelFiles::Dir(fixture("tiny_smolvlm")).load(LoadOptions { quant: QuantChoice::F32, ..Default::default() }, &at).unwrap();
        assert_eq!(folder.model.model_type(), "smolvlm");
        let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [s[0], s[1], s[2], s[3]]), &at.device);
        let visual = folder.model.video(pixels);
        let tok: Rc<Tokenizer> = Rc::new(folder.tok);
        let mut conv = Conversation::new(Rc::new(Model::Video(folder.model)), tok, 512);
        conv.set_video(visual, frame_times(&r));
        let params =
            GenerateParams { max_tokens: first.len(), sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, stop: vec![] };
        conv.ask(Prompt::Question(&r.metadata["question"]), params.clone()).unwrap();
        let f = conv.answer(|_| true).unwrap();
        assert_eq!(f.tokens, first, "{name}: first answer");
        conv.ask(Prompt::Question(&r.metadata["follow_up"]), params).unwrap();
        let f = conv.answer(|_| true).unwrap();
        assert_eq!(f.tokens, follow, "{name}: follow-up answer");
        let history = conv.history();
        assert_eq!(&history[..follow_ids.len()], &follow_ids[..], "{name}: the follow-up prompt");
    }
}

/// A follow-up's logits from the cached conversation equal transformers' over the whole
/// conversation run at once.
#[test]
fn follow_up_logits_match_transformers() {
    let r = refs();
    let (pix, s) = r.f32("pixel_values").unwrap();
    let (input_ids, follow_ids) = (ids(&r, "input_ids"), ids(&r, "follow_input_ids"));
    let at = vidllm_tests::cpu();
    let m = model(&at);
    let pixels = Tensor::<4>::from_data(TensorData::new(pix, [s[0], s[1], s[2], s[3]]), &at.device);
    let embeds = merge_embeddings(&m.decoder, &input_ids, &[m.video(pixels)]).unwrap();
    let mut cache = KvCache::new(&m.decoder.cfg, follow_ids.len() + 1, &at.device);
    m.decoder.forward_embeds(embeds, &mut cache, Logits::Last);
    let logits = read_row(m.decoder.forward(&follow_ids[input_ids.len()..], &mut cache, Logits::Last)).unwrap();
    check_stage("follow-up logits", "cpu", &logits, &r.f32("follow_logits").unwrap().0);
}

/// The same model as llama.cpp's converter writes it (a text GGUF and an mmproj, F16 and
/// Q8_0): the GGUF tokenizer's prompt ids, then the connector, logits and greedy tokens
/// against transformers, on every device. F16 rounds the checkpoint's bf16 weights
/// exactly, so its stages meet the folder's tolerance; Q8_0 is held to the greedy tokens
/// and to llama.cpp's teacher-forcing rule (argmax wherever transformers leads by 0.5),
/// also on the CPU with 8-bit activations (`--activations int8`, llama.cpp's arithmetic
/// for a Q8_0 tower and decoder).
#[test]
fn llama_cpp_gguf_pair_matches_transformers() {
    use vidllm_core::gguf::Gguf;
    use vidllm_models::mmproj::load_pair;
    let r = refs();
    let (pix, s) = r.f32("pixel_values").unwrap();
    let input_ids = ids(&r, "input_ids");
    let greedy = ids(&r, "greedy");
    let (want_logits, _) = r.f32("logits").unwrap();
    for ty in ["F16", "Q8_0"] {
        let text = Gguf::open(fixture(&format!("tiny_smolvlm.{ty}.gguf"))).unwrap();
        let mm = Gguf::open(fixture(&format!("mmproj-tiny_smolvlm-{ty}.gguf"))).unwrap();
        // A Q8_0 mmproj's tower runs its own blocks; an F16 one runs in f32.
        let tower = vidllm_models::mmproj::Mmproj::read(&mm).unwrap().tower;
        assert_eq!(tower, if ty == "Q8_0" { TowerWeights::Q8_0 } else { TowerWeights::F32 }, "{ty}");
        let mut devices = test_devices();
        if ty == "Q8_0" {
            devices.push(("cpu int8".into(), cpu().with_activations(ActBits::Int8)));
        }
        let mut cpu_logits = Vec::new();
        for (name, at) in devices {
            let name = format!("{name} {ty}");
            let folder = load_pair(&text, &mm, &at).unwrap();
            let m = &folder.model;
            assert_eq!(m.model_type(), "smolvlm");
            let turn = m.first_turn(&folder.tok, &r.metadata["question"], &[], Some(&frame_times(&r))).unwrap();
            let pixels = Tensor::<4>::from_data(TensorData::new(pix.clone(), [s[0], s[1], s[2], s[3]]), &at.device);
            let visual = m.video(pixels);
            assert_eq!(VideoModel::prompt_ids(&folder.tok, &turn, std::slice::from_ref(&visual)).unwrap(), input_ids, "{name}");
            let features = visual.features.to_data().try_into_vec::<f32>().unwrap();
            let (logits, mut cache) = prefill_with_visuals(m.decoder(), &input_ids, &[visual], greedy.len() + 1, &at.device);
            if ty == "F16" {
                check_stage("connector", &name, &features, &r.f32("connector").unwrap().0);
                check_stage("logits", &name, &logits, &want_logits);
            } else {
                // The 8-bit run took its own path: its logits are not the 16-bit CPU's.
                if name.starts_with("cpu ") && !name.contains("int8") {
                    cpu_logits = logits.clone();
                } else if name.contains("int8") {
                    let (diff, _) = vidllm_tests::max_abs_diff(&logits, &cpu_logits);
                    println!("{name}: max |logit - the 16-bit CPU's| {diff:.2e}");
                    assert!(diff > 0.0, "{name}: 8-bit activations changed nothing");
                }
                let vocab = m.decoder().cfg.vocab_size;
                for (pos, (got, want)) in logits.chunks(vocab).zip(want_logits.chunks(vocab)).enumerate() {
                    let mut order: Vec<usize> = (0..vocab).collect();
                    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
                    if want[order[0]] - want[order[1]] >= 0.5 {
                        assert_eq!(vidllm_core::sampler::argmax(got) as usize, order[0], "{name}: position {pos}");
                    }
                }
            }
            assert_eq!(greedy_tokens(m.decoder(), &mut cache, &logits, greedy.len()), greedy, "{name}");
        }
    }
}

/// A still image, split as the image processor splits it: 4 x 4 tiles of the 176x144
/// frame at 384 px, plus the global view; pixels (PIL's LANCZOS in fixed point there,
/// floating point here: one 8-bit level), the prompt's tile rows, the connector's tokens,
/// logits and greedy tokens, on every device; and the image through the conversation.
#[test]
fn split_image_matches_transformers() {
    let r = refs();
    let (image, shape) = r.raw("image").map(|(b, _, s)| (b.to_vec(), s)).unwrap();
    let (h, w) = (shape[0], shape[1]);
    let (want_px, ps) = r.f32("image_pixel_values").unwrap();
    let image_ids = ids(&r, "image_input_ids");
    let greedy = ids(&r, "image_greedy");
    for (name, at) in test_devices() {
        let folder =
            ModelFiles::Dir(fixture("tiny_smolvlm")).load(LoadOptions { quant: QuantChoice::F32, ..Default::default() }, &at).unwrap();
        let prep = folder.model.preprocessing().clone();
        let planes = rgb_planes(&[&image], h, w, &at.device);
        let tiles = check_tiles(&name, &prep, planes.clone(), &want_px);
        assert_eq!(tiles, Some((4, 4)), "{name}");

        // The model's stages on transformers' own pixels.
        let m = &folder.model;
        let pixels = Tensor::<4>::from_data(TensorData::new(want_px.clone(), [ps[0], ps[1], ps[2], ps[3]]), &at.device);
        let features = m.video(pixels).features;
        check_stage("image connector", &name, &features.to_data().try_into_vec::<f32>().unwrap(), &r.f32("image_connector").unwrap().0);
        let visual = Visual { tiles, ..Visual::new(m.video(Tensor::zeros([1, 3, 96, 96], &at.device)).token, features, 9) };
        let text = m.first_turn(&folder.tok, &r.metadata["image_question"], std::slice::from_ref(&visual), None).unwrap();
        assert_eq!(VideoModel::prompt_ids(&folder.tok, &text, std::slice::from_ref(&visual)).unwrap(), image_ids, "{name}: {text}");
        let (logits, mut cache) = prefill_with_visuals(m.decoder(), &image_ids, &[visual], greedy.len() + 1, &at.device);
        check_stage("image logits", &name, &logits, &r.f32("image_logits").unwrap().0);
        assert_eq!(greedy_tokens(m.decoder(), &mut cache, &logits, greedy.len()), greedy, "{name}");

        // As a front end runs it: the image's RGB planes to the conversation.
        let mut conv = Conversation::new(Rc::new(Model::Video(folder.model)), Rc::new(folder.tok), 512);
        conv.add_image(planes).unwrap();
        let params =
            GenerateParams { max_tokens: greedy.len(), sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, stop: vec![] };
        conv.ask(Prompt::Question(&r.metadata["image_question"]), params).unwrap();
        let f = conv.answer(|_| true).unwrap();
        assert_eq!(&conv.history()[..image_ids.len()], &image_ids[..], "{name}: the prompt");
        assert_eq!(f.tokens, greedy, "{name}: the answer from vidllm's own tiles");
    }
}
