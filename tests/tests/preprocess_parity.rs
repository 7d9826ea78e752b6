//! Frame preprocessing: the device path against the CPU reference (1e-3) and against the
//! transformers image processor's `pixel_values_videos` (PIL resampling; vidllm works in
//! floating point where PIL uses fixed point, so one 8-bit level of difference is allowed).

use burn::tensor::{DType, Int, Tensor, TensorCreationOptions, TensorData};
use vidllm_core::preprocess::{PreprocessConfig, PreprocessorJson, reference};
use vidllm_core::safetensors::Checkpoint;
use vidllm_shaders::preprocess::{preprocess, preprocess_planes, unpack_rgba_words};
use vidllm_tests::{fixture, test_devices};

#[test]
fn device_preprocessing_matches_cpu_reference_and_transformers() {
    let ck = Checkpoint::open_files(&[fixture("tiny_video_llava_ref.safetensors")]).unwrap();
    let (frames, shape) = ck.raw("frames").map(|(b, _, s)| (b.to_vec(), s)).unwrap(); // [t, h, w, 3] u8
    let (t, h, w) = (shape[0], shape[1], shape[2]);
    let json: PreprocessorJson =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_video_llava/preprocessor_config.json")).unwrap()).unwrap();
    let cfg = json.resolve(&PreprocessConfig::clip(224)).unwrap();
    let (want, _) = ck.f32("pixel_values_videos").unwrap();
    let per = h * w * 3;
    let cpu: Vec<f32> = (0..t).flat_map(|i| reference(&frames[i * per..(i + 1) * per], h, w, &cfg)).collect();
    // One 8-bit level after normalisation: 1 / (255 * std).
    let level = 1.0 / (255.0 * cfg.std.iter().copied().fold(f32::MAX, f32::min));
    let off_by_more = cpu.iter().zip(&want).filter(|(a, b)| (*a - *b).abs() > level * 1.01).count();
    let max_diff = cpu.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!(
        "cpu reference vs transformers: max |diff| {max_diff:.4} ({:.2} levels), {off_by_more} values off by more than one level",
        max_diff / level
    );
    assert_eq!(off_by_more, 0);
    let slices: Vec<&[u8]> = frames.chunks(per).collect();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let got = preprocess(&slices, h, w, &cfg, &device).into_data().try_into_vec::<f32>().unwrap();
        let d = got.iter().zip(&cpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let flips = got.iter().zip(&cpu).filter(|(a, b)| (*a - *b).abs() > 1e-3).count();
        println!("{name} vs cpu reference: max |diff| {d:.2e}, {flips} of {} values beyond 1e-3", got.len());
        // Float sums can round a value sitting exactly on .5 the other way: at most a few.
        assert!(flips * 1000 <= got.len(), "{name}: {flips} values differ");
        assert!(d <= level * 1.01, "{name}: {d}");
    }
}

/// The browser uploads frames as RGBA texels (one u32 per pixel, rows padded to 256
/// bytes); unpacked on the device they must give exactly the pixels of the RGB path.
#[test]
fn packed_rgba_frames_preprocess_like_rgb_frames() {
    let ck = Checkpoint::open_files(&[fixture("tiny_video_llava_ref.safetensors")]).unwrap();
    let (frames, shape) = ck.raw("frames").map(|(b, _, s)| (b.to_vec(), s)).unwrap();
    let (t, h, w) = (shape[0], shape[1], shape[2]);
    let json: PreprocessorJson =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_video_llava/preprocessor_config.json")).unwrap()).unwrap();
    let cfg = json.resolve(&PreprocessConfig::clip(224)).unwrap();
    let row_words = (w * 4).next_multiple_of(256) / 4;
    let mut words = vec![0xdead_beefu32; t * h * row_words];
    for (i, px) in frames.chunks(3).enumerate() {
        let (f, y, x) = (i / (h * w), i / w % h, i % w);
        words[(f * h + y) * row_words + x] = u32::from_le_bytes([px[0], px[1], px[2], 255]);
    }
    let slices: Vec<&[u8]> = frames.chunks(h * w * 3).collect();
    for (name, at) in test_devices() {
        let device = at.device.clone();
        let opts = TensorCreationOptions::new(device.clone()).with_dtype(DType::U32);
        let packed = Tensor::<3, Int>::from_data(TensorData::new(words.clone(), [t, h, row_words]), opts);
        let got = preprocess_planes(unpack_rgba_words(packed, w), &cfg).into_data().try_into_vec::<f32>().unwrap();
        let want = preprocess(&slices, h, w, &cfg, &device).into_data().try_into_vec::<f32>().unwrap();
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{name}: packed RGBA vs RGB path max |diff| {d:.1e} over {} values", got.len());
        assert_eq!(d, 0.0, "{name}");
    }
}
