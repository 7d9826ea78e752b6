//! Tiny random Video-LLaVA (made and run by transformers 4.57.1,
//! `tests/fixtures/gen_video_fixtures.py`) against vidllm, stage by stage, on every device:
//! the selected CLIP hidden state, the projected features, the logits, and the greedy
//! continuation. f32 weights (`--quant f32`) so the comparison is exact to rounding; and
//! the towers stored as Q8_0 blocks (`--vision-quant q8_0`) against transformers run with
//! the same blocks (`gen_tower_q8_0_fixtures.py`).

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_core::tokenizer::Tokenizer;

use vidllm_models::layers::TowerWeights;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::llava::read_config;
use vidllm_models::merge::{Visual, expand_placeholders, merge_embeddings};
use vidllm_models::video_llava::VideoLlava;
use vidllm_models::video_model::LoadOptions;

use vidllm_tests::{check_stage, fixture, greedy as greedy_tokens, prefill_with_visuals, test_devices};

struct Reference {
    ck: Checkpoint,
}

impl Reference {
    fn load() -> Self {
        Self::open("tiny_video_llava_ref.safetensors")
    }

    fn open(file: &str) -> Self {
        Self { ck: Checkpoint::open_files(&[fixture(file)]).unwrap() }
    }

    fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        self.ck.f32(name).unwrap()
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.ck.i64(name).unwrap().0.into_iter().map(|v| v as u32).collect()
    }
}

#[test]
fn tokenizer_json_gives_the_fixture_ids() {
    let r = Reference::load();
    let dir = fixture("tiny_video_llava");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let prompt = r.ck.metadata["prompt"].clone();
    let ids = tok.encode(&prompt, true).unwrap();
    let model = VideoLlava::load(&dir, QuantChoice::F32, &vidllm_tests::cpu()).unwrap();
    let expanded = expand_placeholders(&ids, model.visual.video_token, model.video_tokens(8));
    assert_eq!(expanded, r.ids("input_ids"));
}

/// `model`'s stages on the fixture's frames and prompt (`inputs`) against `want`'s
/// `vision_hidden`, `projected`, `logits` and `greedy`, each within the f32 paths' 1e-4;
/// `what` prefixes the stages' names.
fn check_video_stages(what: &str, name: &str, model: &VideoLlava, device: &burn::tensor::Device, inputs: &Reference, want: &Reference) {
    let (pix, pshape) = inputs.f32("pixel_values_videos"); // [1, t, 3, s, s]
    let (t, s) = (pshape[1], pshape[3]);
    let (ids, greedy) = (inputs.ids("input_ids"), want.ids("greedy"));
    let pixels = Tensor::<4>::from_data(TensorData::new(pix, [t, 3, s, s]), device);
    let hidden = model.video_hidden(pixels.clone());
    check_stage(
        &format!("{what}vision hidden state"),
        name,
        &hidden.into_data().try_into_vec::<f32>().unwrap(),
        &want.f32("vision_hidden").0,
    );
    let features = model.video_features(pixels);
    check_stage(&format!("{what}projected features"), name, &features.to_data().try_into_vec::<f32>().unwrap(), &want.f32("projected").0);

    let visual = [Visual::new(model.visual.video_token, features, model.video_tokens(t))];
    let (logits, mut cache) = prefill_with_visuals(&model.decoder, &ids, &visual, greedy.len() + 1, device);
    check_stage(&format!("{what}logits"), name, &logits, &want.f32("logits").0);

    // Greedy continuation: the last prompt position, then one token at a time.
    let got = greedy_tokens(&model.decoder, &mut cache, &logits, greedy.len());
    assert_eq!(got, greedy, "{name}: {what}greedy tokens");
    println!("{name}: {what}greedy continuation {got:?} equals transformers'");
}

#[test]
fn video_llava_stages_match_transformers_on_every_device() {
    let r = Reference::load();
    let dir = fixture("tiny_video_llava");
    for (name, at) in test_devices() {
        let model = VideoLlava::load(&dir, QuantChoice::F32, &at).unwrap();
        check_video_stages("", &name, &model, &at.device, &r, &r);
    }
}

/// The towers' attention and MLP matrices as Q8_0 blocks, multiplied by the block kernels
/// (on the CPU the integer path, its activations rounded to 16 bits a value), against
/// transformers running the same blocks dequantised (gguf-py's quantiser): each stage
/// within the f32 paths' 1e-4, and the same greedy tokens, on every device.
#[test]
fn q8_0_towers_match_transformers_on_the_same_blocks() {
    let r = Reference::load();
    let q = Reference::open("tiny_video_llava_q8_0_tower_ref.safetensors");
    let dir = fixture("tiny_video_llava");
    // The blocks change the tower's output by more than the tolerance, so passing is not
    // an accident of the f32 reference being close.
    assert!(vidllm_tests::rel_err(&q.f32("vision_hidden").0, &r.f32("vision_hidden").0) > 1e-3);
    let opts = LoadOptions { quant: QuantChoice::F32, tower: TowerWeights::Q8_0, ..Default::default() };
    for (name, at) in test_devices() {
        let model = VideoLlava::from_checkpoint(&Checkpoint::open_dir(&dir).unwrap(), &read_config(&dir).unwrap(), &opts, &at).unwrap();
        check_video_stages("q8_0 ", &name, &model, &at.device, &r, &q);
    }
}

#[test]
fn placeholder_count_mismatch_is_an_error_naming_both_counts() {
    let dir = fixture("tiny_video_llava");
    let at = vidllm_tests::cpu();
    let device = at.device.clone();
    let model = VideoLlava::load(&dir, QuantChoice::F32, &at).unwrap();
    let features = Tensor::<2>::zeros([10, model.decoder.cfg.d_model], &device);
    let ids = [1, 5, model.visual.video_token, model.visual.video_token, 7];
    let visual = [Visual::new(model.visual.video_token, features, 10)];
    let e = merge_embeddings(&model.decoder, &ids, &visual).err().unwrap().to_string();
    assert!(e.contains("2 placeholder") && e.contains("10 features"), "{e}");
}

#[test]
fn image_and_video_in_one_prompt_match_transformers() {
    let r = Reference::load();
    let dir = fixture("tiny_video_llava");
    let (vpix, vs) = r.f32("pixel_values_videos");
    let (ipix, is) = r.f32("pixel_values_images"); // [1, 3, s, s]
    let ids = r.ids("both_input_ids");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let model = VideoLlava::load(&dir, QuantChoice::F32, &at).unwrap();
        let image = Tensor::<4>::from_data(TensorData::new(ipix.clone(), [is[0], 3, is[2], is[3]]), &device);
        let image_features = model.image_features(image);
        check_stage(
            "image features (class token dropped)",
            &name,
            &image_features.to_data().try_into_vec::<f32>().unwrap(),
            &r.f32("image_features").0,
        );
        let video = Tensor::<4>::from_data(TensorData::new(vpix.clone(), [vs[1], 3, vs[3], vs[4]]), &device);
        let n_img = image_features.dims()[0];
        let visuals = [
            Visual::new(model.visual.image_token, image_features, n_img),
            Visual::new(model.visual.video_token, model.video_features(video), model.video_tokens(vs[1])),
        ];
        let mut prompt = tok.encode(&r.ck.metadata["image_prompt"], true).unwrap();
        for v in &visuals {
            prompt = expand_placeholders(&prompt, v.token, v.per_placeholder);
        }
        assert_eq!(prompt, ids, "placeholder expansion");
        let (logits, _) = prefill_with_visuals(&model.decoder, &ids, &visuals, 1, &device);
        check_stage("image + video logits", &name, &logits, &r.f32("both_logits").0);
    }
}
