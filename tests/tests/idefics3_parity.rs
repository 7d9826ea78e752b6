//! Tiny random Idefics3 (transformers 4.57.1, `gen_idefics3_fixtures.py`) against
//! transformers on every device: a still image split into tiles plus the global view (the
//! processor's pixels and prompt ids, the connector, logits, greedy tokens), the same image
//! with splitting off, a follow-up turn, and a video refused by name.

use std::collections::BTreeMap;
use std::rc::Rc;

use burn::tensor::{Tensor, TensorData};
use vidllm_core::GenerateError;
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::sampling::FrameTimes;

use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::merge::Visual;
use vidllm_models::model_files::{Folder, ModelFiles};
use vidllm_models::video_model::{LoadOptions, VideoModel};
use vidllm_models::{Conversation, GenerateParams, Model, Prompt};
use vidllm_shaders::device::Placement;
use vidllm_shaders::preprocess::rgb_planes;
use vidllm_tests::{check_stage, check_tiles, fixture, greedy as greedy_tokens, prefill_with_visuals, test_devices};

fn refs() -> Checkpoint {
    Checkpoint::open_files(&[fixture("tiny_idefics3_ref.safetensors")]).unwrap()
}

fn ids(r: &Checkpoint, name: &str) -> Vec<u32> {
    r.i64(name).unwrap().0.into_iter().map(|v| v as u32).collect()
}

fn image(r: &Checkpoint) -> (Vec<u8>, usize, usize) {
    let (bytes, _, shape) = r.raw("image").unwrap();
    (bytes.to_vec(), shape[0], shape[1])
}

fn opts() -> LoadOptions {
    LoadOptions { quant: QuantChoice::F32, ..Default::default() }
}

/// The fixture folder, with its image processor's config replaced by `preprocessor` when given.
fn folder(at: &Placement, preprocessor: Option<&str>) -> Folder {
    let dir = fixture("tiny_idefics3");
    let Some(pre) = preprocessor else { return ModelFiles::Dir(dir).load(opts(), at).unwrap() };
    let mut files: BTreeMap<String, Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.insert("preprocessor_config.json".into(), std::fs::read(fixture(pre)).unwrap());
    ModelFiles::Memory(files).load(opts(), at).unwrap()
}

fn greedy_params(n: usize) -> GenerateParams {
    GenerateParams { max_tokens: n, sampler: SamplerConfig { temperature: 0.0, ..Default::default() }, stop: vec![] }
}

/// As a front end runs it: the picture's RGB planes to a conversation, asked `question`;
/// the prompt and greedy answer must be transformers'. Returns the conversation, for follow-ups.
fn ask_about_image(name: &str, f: Folder, planes: Tensor<4>, question: &str, input_ids: &[u32], greedy: &[u32]) -> Conversation {
    let mut conv = Conversation::new(Rc::new(Model::Video(f.model)), Rc::new(f.tok), 1024);
    conv.add_image(planes).unwrap();
    conv.ask(Prompt::Question(question), greedy_params(greedy.len())).unwrap();
    let answer = conv.answer(|_| true).unwrap();
    assert_eq!(&conv.history()[..input_ids.len()], input_ids, "{name}: the prompt");
    assert_eq!(answer.tokens, greedy, "{name}: the answer from vidllm's own tiles");
    conv
}

/// The image processor's tiles (4 x 4 of 64 px for the 176x144 frame at 256 px, then the
/// global view; PIL's LANCZOS in fixed point there, floating point here: one 8-bit level),
/// then the model's stages on transformers' own pixels: connector, prompt ids, logits,
/// greedy tokens; then the image through the conversation, and a follow-up turn.
#[test]
fn split_image_and_follow_up_match_transformers() {
    let r = refs();
    let (rgb, h, w) = image(&r);
    let (want_px, ps) = r.f32("pixel_values").unwrap();
    let input_ids = ids(&r, "input_ids");
    let greedy = ids(&r, "greedy");
    let question = &r.metadata["question"];
    for (name, at) in test_devices() {
        let f = folder(&at, None);
        assert_eq!(f.model.model_type(), "idefics3");
        assert!(!f.model.supports_video() && f.model.supports_images());
        let prep = f.model.preprocessing().clone();
        let planes = rgb_planes(&[&rgb], h, w, &at.device);
        assert_eq!(check_tiles(&name, &prep, planes.clone(), &want_px), Some((4, 4)), "{name}");

        let m = &f.model;
        let pixels = Tensor::<4>::from_data(TensorData::new(want_px.clone(), [ps[0], ps[1], ps[2], ps[3]]), &at.device);
        let mut visual = m.encode_images(vec![planes.clone()]).unwrap();
        assert_eq!((visual.tiles, visual.per_placeholder), (Some((4, 4)), 16), "{name}");
        visual.features = m.video(pixels).features;
        check_stage("connector", &name, &visual.features.to_data().try_into_vec::<f32>().unwrap(), &r.f32("connector").unwrap().0);
        let text = m.first_turn(&f.tok, question, std::slice::from_ref(&visual), None).unwrap();
        assert_eq!(VideoModel::prompt_ids(&f.tok, &text, std::slice::from_ref(&visual)).unwrap(), input_ids, "{name}: {text}");
        let (logits, mut cache) = prefill_with_visuals(m.decoder(), &input_ids, &[visual], greedy.len() + 1, &at.device);
        check_stage("logits", &name, &logits, &r.f32("logits").unwrap().0);
        assert_eq!(greedy_tokens(m.decoder(), &mut cache, &logits, greedy.len()), greedy, "{name}");

        // As a front end runs it, then a follow-up.
        let mut conv = ask_about_image(&name, f, planes, question, &input_ids, &greedy);
        let follow_ids = ids(&r, "follow_input_ids");
        let follow_greedy = ids(&r, "follow_greedy");
        conv.ask(Prompt::Question(&r.metadata["follow_up"]), greedy_params(follow_greedy.len())).unwrap();
        let second = conv.answer(|_| true).unwrap();
        assert_eq!(&conv.history()[..follow_ids.len()], &follow_ids[..], "{name}: the follow-up prompt");
        assert_eq!(second.tokens, follow_greedy, "{name}: the follow-up answer");
    }
}

/// `do_image_splitting: false`: the picture becomes one global tile (36 prompt tokens).
#[test]
fn unsplit_image_matches_transformers() {
    let r = refs();
    let (rgb, h, w) = image(&r);
    let input_ids = ids(&r, "single_input_ids");
    let greedy = ids(&r, "single_greedy");
    let (want_px, _) = r.f32("single_pixel_values").unwrap();
    for (name, at) in test_devices() {
        let f = folder(&at, Some("tiny_idefics3_nosplit_preprocessor_config.json"));
        let prep = f.model.preprocessing().clone();
        assert!(!prep.tiles.unwrap().split);
        let planes = rgb_planes(&[&rgb], h, w, &at.device);
        assert_eq!(check_tiles(&name, &prep, planes.clone(), &want_px), None, "{name}");

        ask_about_image(&name, f, planes, &r.metadata["question"], &input_ids, &greedy);
    }
}

/// Idefics3 has no video prompt: a video given anyway is refused by name, not run
/// through SmolVLM2's prompt.
#[test]
fn video_is_refused() {
    let at = vidllm_tests::cpu();
    let f = folder(&at, None);
    let m = &f.model;
    let visual: Visual = m.video(Tensor::zeros([2, 3, 64, 64], &at.device));
    let times = FrameTimes { times: vec![0.0, 1.0], duration: 2.0 };
    let err = m.first_turn(&f.tok, "What happens?", &[], Some(&times)).unwrap_err();
    assert!(matches!(err, GenerateError::Unsupported(ref s) if s.contains("still images")), "{err}");
    let mut conv = Conversation::new(Rc::new(Model::Video(f.model)), Rc::new(f.tok), 256);
    conv.set_video(visual, times);
    let err = conv.ask(Prompt::Question("What happens?"), greedy_params(4)).unwrap_err();
    assert!(err.to_string().contains("idefics3 takes still images"), "{err}");
}
