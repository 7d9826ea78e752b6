//! Frame preprocessing on the device for a whole batch of frames: per resize, two
//! resampling matmuls (PIL's separable antialiased filter, crop folded into the last
//! resize's weights), 8-bit rounding after each pass as PIL does, then rescale and
//! normalise. Math: `vidllm_core::preprocess`.

use burn::tensor::{Device, Int, Tensor, TensorData};
use std::ops::Range;

use vidllm_core::preprocess::{PreprocessConfig, Resample, crop_origin, resample_weights};

/// RGB u8 frames of one size, `[t, h, w, 3]` packed, -> pixel values `[t, 3, oh, ow]`.
pub fn preprocess(frames: &[&[u8]], h: usize, w: usize, cfg: &PreprocessConfig, device: &Device) -> Tensor<4> {
    preprocess_planes(rgb_planes(frames, h, w, device), cfg)
}

/// RGB u8 frames of one size, each `[h, w, 3]` packed, uploaded as the RGB planes
/// `[t, 3, h, w]` as floats 0..=255.
pub fn rgb_planes(frames: &[&[u8]], h: usize, w: usize, device: &Device) -> Tensor<4> {
    let t = frames.len();
    let mut host = Vec::with_capacity(t * h * w * 3);
    for f in frames {
        host.extend(f.iter().map(|&b| b as f32));
    }
    Tensor::<4>::from_data(TensorData::new(host, [t, h, w, 3]), device).permute([0, 3, 1, 2])
}

/// Frames already on the device as RGBA8 texels, one u32 word per pixel (R in the low
/// byte, as a texture-to-buffer copy lays them out), rows padded to `row_words` words
/// -> the RGB planes `[t, 3, h, w]` as floats 0..=255.
///
/// # Shapes
/// - words: `[t, h, row_words]` (u32), `w <= row_words`
pub fn unpack_rgba_words(words: Tensor<3, Int>, w: usize) -> Tensor<4> {
    let [t, h, _] = words.dims();
    let px = words.narrow(2, 0, w);
    let channel = |shift: u32| px.clone().bitwise_right_shift_scalar(shift).bitwise_and_scalar(0xff).float();
    Tensor::stack::<4>(vec![channel(0), channel(8), channel(16)], 1).reshape([t, 3, h, w])
}

/// RGB planes as floats 0..=255 -> pixel values: resize (PIL-exact, one or two passes),
/// crop, normalise.
///
/// # Shapes
/// - x: `[t, 3, h, w]` -> `[t, 3, oh, ow]`
pub fn preprocess_planes(x: Tensor<4>, cfg: &PreprocessConfig) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let steps = cfg.resize_steps(h, w);
    let (rh, rw) = cfg.resized(h, w);
    let (oh, ow) = cfg.output_size(h, w);
    let (top, left) = crop_origin(cfg, rh, rw);
    let mut x = x;
    for (k, &(sh, sw)) in steps.iter().enumerate() {
        // The crop is folded into the last pass's weights.
        let (ys, xs) = if k + 1 == steps.len() { (top..top + oh, left..left + ow) } else { (0..sh, 0..sw) };
        x = resample(x, sh, sw, ys, xs, cfg.resample);
    }
    if steps.is_empty() {
        x = x.narrow(2, top, oh).narrow(3, left, ow);
    }
    normalise_planes(x, cfg)
}

/// Rescale and normalise 8-bit planes as `cfg` says (its resize and crop are not applied).
///
/// # Shapes
/// - x: `[t, 3, h, w]` -> same
pub fn normalise_planes(x: Tensor<4>, cfg: &PreprocessConfig) -> Tensor<4> {
    let device = x.device();
    let mean = Tensor::<1>::from_floats(cfg.mean, &device).reshape([1, 3, 1, 1]);
    let std = Tensor::<1>::from_floats(cfg.std, &device).reshape([1, 3, 1, 1]);
    (x * cfg.rescale - mean) / std
}

/// One PIL resize of 8-bit planes to `(h, w)` (each pass rounded to 8 bits).
///
/// # Shapes
/// - x: `[t, 3, h0, w0]` -> `[t, 3, h, w]`
pub fn resize_planes(x: Tensor<4>, (h, w): (usize, usize), filter: Resample) -> Tensor<4> {
    resample(x, h, w, 0..h, 0..w, filter)
}

/// One PIL resize to `(sh, sw)`, output rows `ys` and columns `xs` kept: two matmuls,
/// each pass rounded to 8 bits.
///
/// # Shapes
/// - x: `[t, 3, h, w]` -> `[t, 3, ys.len(), xs.len()]`
fn resample(x: Tensor<4>, sh: usize, sw: usize, ys: Range<usize>, xs: Range<usize>, filter: Resample) -> Tensor<4> {
    let [t, _, h, w] = x.dims();
    let device = x.device();
    let (kh, kw) = (ys.len(), xs.len());
    let wx = resample_weights(w, sw, xs, filter);
    let wy = resample_weights(h, sh, ys, filter);
    let wx = Tensor::<2>::from_data(TensorData::new(wx, [kw, w]), &device).transpose(); // [w, kw]
    let wy = Tensor::<2>::from_data(TensorData::new(wy, [kh, h]), &device); // [kh, h]
    // Horizontal pass: [t*3*h, w] @ [w, kw].
    let x = x.reshape([t * 3 * h, w]).matmul(wx).round().clamp(0.0, 255.0);
    // Vertical pass: [kh, h] @ [h, kw] for each of the t*3 planes.
    let x = wy.unsqueeze::<3>().matmul(x.reshape([t * 3, h, kw])).round().clamp(0.0, 255.0);
    x.reshape([t, 3, kh, kw])
}
