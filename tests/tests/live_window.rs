//! A live window, fed one frame at a time, gives each architecture's video tokens as
//! transformers computes them for the whole clip (the tiny random models' references), on
//! every device: frames encoded alone as they arrive (Video-LLaVA, LLaVA-NeXT-Video,
//! PLLaVA's projected grids pooled when asked, SmolVLM2), and a full window that drops its
//! oldest frame.

use burn::tensor::{Tensor, TensorData};
use vidllm_core::safetensors::Checkpoint;
use vidllm_models::live_window::LiveWindow;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_models::model_files::ModelFiles;
use vidllm_models::video_model::LoadOptions;
use vidllm_tests::{check_stage, fixture, test_devices};

/// Each tiny model, its reference file, the preprocessed frames' key in it (the clip,
/// `[.., t, 3, s, s]`) and the reference tokens for that clip.
const CASES: [(&str, &str, &str); 4] = [
    ("tiny_video_llava", "pixel_values_videos", "projected"),
    ("tiny_llava_next_video", "pixel_values_videos", "features"),
    ("tiny_pllava", "pixel_values", "pooled"),
    ("tiny_smolvlm", "pixel_values", "connector"),
];

#[test]
fn a_window_fed_frame_by_frame_gives_the_clips_tokens_on_every_device() {
    for (name, at) in test_devices() {
        for (model, pixels_key, tokens_key) in CASES {
            let r = Checkpoint::open_files(&[fixture(&format!("{model}_ref.safetensors"))]).unwrap();
            let (pix, s) = r.f32(pixels_key).unwrap();
            let [t, c, h, w] = s[s.len() - 4..] else { unreachable!() };
            let opts = LoadOptions { quant: QuantChoice::F32, ..Default::default() };
            let folder = ModelFiles::Dir(fixture(model)).load(opts, &at).unwrap();
            let vm = folder.model;
            let frame = |i: usize| {
                let one = pix[i * c * h * w..(i + 1) * c * h * w].to_vec();
                Tensor::<4>::from_data(TensorData::new(one, [1, c, h, w]), &at.device)
            };
            // Two junk frames first: a window of t frames has dropped them by the end.
            let mut window = LiveWindow::new(t).unwrap();
            for (i, junk) in [0usize, t - 1].into_iter().enumerate() {
                window.push(&vm, frame(junk) * 0.5, i as u64, i as f64);
            }
            for i in 0..t {
                window.push(&vm, frame(i), (i + 2) as u64, (i + 2) as f64 / 2.0);
            }
            let v = window.video(&vm, None).unwrap();
            let label = format!("{name} {model}");
            assert_eq!(v.frames.iter().map(|f| f.0).collect::<Vec<_>>(), (2..t as u64 + 2).collect::<Vec<_>>(), "{label}");
            assert_eq!(v.times.times, (0..t).map(|i| i as f64 / 2.0).collect::<Vec<_>>(), "{label}");
            // Every frame was encoded once, on arrival; none at question time.
            assert_eq!((window.frame_encodes(), v.encoded_now), (t + 2, 0), "{label}");
            let got = v.encoded.visual.features.into_data().try_into_vec::<f32>().unwrap();
            check_stage(&format!("{model} live window tokens"), &name, &got, &r.f32(tokens_key).unwrap().0);
        }
    }
}

#[test]
fn an_empty_window_is_refused() {
    assert!(LiveWindow::new(0).is_err());
    let at = vidllm_tests::cpu();
    let opts = LoadOptions { quant: QuantChoice::F32, ..Default::default() };
    let vm = ModelFiles::Dir(fixture("tiny_llava_next_video")).load(opts, &at).unwrap().model;
    let err = LiveWindow::new(4).unwrap().video(&vm, None).err().expect("no frames yet");
    assert!(err.to_string().contains("no frame yet"), "{err}");
}
