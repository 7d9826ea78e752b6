//! Image preprocessing as Hugging Face's image and video processors do it: resize (the
//! shortest edge, as CLIP's processors do; or SmolVLM2's longest edge and then a square),
//! centre crop, rescale, normalise.
//!
//! A PIL resize is separable: each output pixel is a normalised, filter-weighted sum of
//! input pixels along one axis, horizontal pass first, each pass rounded to 8 bits. So a
//! resize is two matrix products with weight matrices that depend only on the sizes; the
//! device path (`vidllm_shaders::preprocess`) runs them as matmuls on a GPU and walks the
//! nonzero taps ([`resample_taps`]) on the CPU, and `reference` here is the plain dense
//! arithmetic for tests.

use serde::Deserialize;

use crate::error::LoadError;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// The values as OpenAI publishes them (f32 rounds the last digit away).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
    /// PIL's LANCZOS: a 3-lobed windowed sinc (Idefics3 / SmolVLM images).
    Lanczos,
    /// torch's `interpolate(mode="bilinear", align_corners=False, antialias=False)`: two
    /// taps whatever the scale, so a large reduction skips pixels (torchvision's tensor
    /// `Resize` with `antialias=False`).
    BilinearNoAntialias,
}

/// How a frame is resized before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    None,
    /// The shorter side to this length, the aspect ratio kept (CLIP's processors).
    ShortestEdge(usize),
    /// SmolVLM2's video processor: the longer side to `longest` (the shorter one scaled,
    /// rounded down, then up to even), then that picture to a `square` x `square` one
    /// (two resampling passes, as transformers does them).
    LongestEdgeThenSquare {
        longest: usize,
        square: usize,
    },
    /// To exactly `(height, width)`, the aspect ratio not kept (a "squash", as
    /// torchvision's `Resize((h, w))` does).
    Exact(usize, usize),
}

/// Resolved preprocessing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    pub resize: Resize,
    /// `(height, width)` of the centre crop (`None`: no crop).
    pub crop: Option<(usize, usize)>,
    pub resample: Resample,
    pub rescale: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// CLIP's defaults at `size` pixels (Video-LLaVA: 224).
    pub fn clip(size: usize) -> Self {
        Self {
            resize: Resize::ShortestEdge(size),
            crop: Some((size, size)),
            resample: Resample::Bicubic,
            rescale: 1.0 / 255.0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// Output `(height, width)` for an input of `(h, w)`.
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (rh, rw) = self.resized(h, w);
        self.crop.unwrap_or((rh, rw))
    }

    /// Size after the resize.
    pub fn resized(&self, h: usize, w: usize) -> (usize, usize) {
        self.resize_steps(h, w).last().copied().unwrap_or((h, w))
    }

    /// The `(height, width)` of each resampling pass in turn (none: no resize).
    pub fn resize_steps(&self, h: usize, w: usize) -> Vec<(usize, usize)> {
        match self.resize {
            Resize::None => vec![],
            // transformers' `get_resize_output_image_size` (CLIP's processors).
            Resize::ShortestEdge(s) if h <= w => vec![(s, (s as f64 * w as f64 / h as f64) as usize)],
            Resize::ShortestEdge(s) => vec![((s as f64 * h as f64 / w as f64) as usize, s)],
            Resize::LongestEdgeThenSquare { longest, square } => vec![longest_edge_size(h, w, longest), (square, square)],
            Resize::Exact(rh, rw) => vec![(rh, rw)],
        }
    }
}

/// Where the Idefics3 / SmolVLM image processor takes a picture (`image_processing_smolvlm.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledSizes {
    /// After the longest-edge resize (`size.longest_edge`; made even; at most 4096).
    pub resized: (usize, usize),
    /// After `resize_for_vision_encoder` (each side a whole number of tiles) when split;
    /// the single tile's square otherwise.
    pub tiled: (usize, usize),
    /// The tile grid; `(0, 0)` when the picture is one tile.
    pub rows: usize,
    pub cols: usize,
}

impl TiledSizes {
    /// The sizes for an `h x w` picture, `longest` the processor's `size`, `tile` its
    /// `max_image_size`, `split` its `do_image_splitting`.
    pub fn new(h: usize, w: usize, longest: usize, tile: usize, split: bool) -> Self {
        let (mut h1, mut w1) = longest_edge_size_uncapped(h, w, longest);
        // `_resize_output_size_scale_below_upper_bound(.., 4096)`: no rounding to even.
        const MAX: usize = 4096;
        let aspect = w1 as f64 / h1 as f64;
        if w1 >= h1 && w1 > MAX {
            (h1, w1) = (((MAX as f64 / aspect) as usize).max(1), MAX);
        } else if h1 > w1 && h1 > MAX {
            (h1, w1) = (MAX, ((MAX as f64 * aspect) as usize).max(1));
        }
        if !split {
            return Self { resized: (h1, w1), tiled: (tile, tile), rows: 0, cols: 0 };
        }
        let up = |v: usize| v.div_ceil(tile) * tile;
        let aspect = w1 as f64 / h1 as f64;
        let (h2, w2) = if w1 >= h1 {
            let w2 = up(w1);
            (up((w2 as f64 / aspect) as usize), w2)
        } else {
            let h2 = up(h1);
            (h2, up((h2 as f64 * aspect) as usize))
        };
        let (rows, cols) = if h2 > tile || w2 > tile { (h2.div_ceil(tile), w2.div_ceil(tile)) } else { (0, 0) };
        Self { resized: (h1, w1), tiled: (h2, w2), rows, cols }
    }
}

/// `_resize_output_size_rescale_to_max_len`: the longer side to `longest`, the other
/// scaled, truncated and made even.
fn longest_edge_size_uncapped(h: usize, w: usize, longest: usize) -> (usize, usize) {
    let aspect = w as f64 / h as f64;
    let even = |v: usize| if v.is_multiple_of(2) { v } else { v + 1 };
    let (oh, ow) =
        if w >= h { (even((longest as f64 / aspect) as usize), longest) } else { (longest, even((longest as f64 * aspect) as usize)) };
    (oh.max(1), ow.max(1))
}

/// SmolVLM2's video processor's first size (`get_resize_output_image_size` in
/// `video_processing_smolvlm.py`): the longer side to `longest`, the other scaled by the
/// aspect ratio, truncated, and made even by adding one.
pub fn longest_edge_size(h: usize, w: usize, longest: usize) -> (usize, usize) {
    longest_edge_size_uncapped(h, w, longest.min(4096))
}

/// `preprocessor_config.json` fields (all optional).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct PreprocessorJson {
    pub size: Option<serde_json::Value>,
    pub crop_size: Option<serde_json::Value>,
    pub resample: Option<u32>,
    pub rescale_factor: Option<f32>,
    pub image_mean: Option<[f32; 3]>,
    pub image_std: Option<[f32; 3]>,
    pub do_resize: Option<bool>,
    pub do_center_crop: Option<bool>,
    pub do_rescale: Option<bool>,
    pub do_normalize: Option<bool>,
    /// Idefics3 / SmolVLM: the tower's tile side, `{"longest_edge": n}`.
    pub max_image_size: Option<serde_json::Value>,
    /// Idefics3 / SmolVLM: cut images into tiles (default true).
    pub do_image_splitting: Option<bool>,
    /// SmolVLM2's video processor: `{"fps", "max_frames", "video_size"}` (older files).
    pub video_sampling: Option<serde_json::Value>,
    /// Video processors: frames a second and the most frames (newer files).
    pub fps: Option<f64>,
    pub num_frames: Option<usize>,
}

impl PreprocessorJson {
    /// Resolve against an architecture's defaults.
    pub fn resolve(&self, defaults: &PreprocessConfig) -> Result<PreprocessConfig, LoadError> {
        let mut c = defaults.clone();
        if let Some(s) = self.size.as_ref().and_then(|s| s["shortest_edge"].as_u64().or_else(|| s.as_u64())) {
            c.resize = Resize::ShortestEdge(s as usize);
        }
        if let Some(s) = &self.crop_size {
            let hw = (s["height"].as_u64(), s["width"].as_u64());
            c.crop = match (hw, s.as_u64()) {
                ((Some(h), Some(w)), _) => Some((h as usize, w as usize)),
                (_, Some(v)) => Some((v as usize, v as usize)),
                _ => c.crop,
            };
        }
        c.resample = match self.resample {
            None => c.resample,
            Some(r) => Resample::from_pil(r)?,
        };
        self.normalisation(&mut c);
        if self.do_resize == Some(false) {
            c.resize = Resize::None;
        }
        if self.do_center_crop == Some(false) {
            c.crop = None;
        }
        Ok(c)
    }

    /// Rescale factor, mean and std as the file sets them (the rest of `c` untouched).
    pub fn normalisation(&self, c: &mut PreprocessConfig) {
        if let Some(r) = self.rescale_factor {
            c.rescale = r;
        }
        if self.do_rescale == Some(false) {
            c.rescale = 1.0;
        }
        if let Some(m) = self.image_mean {
            c.mean = m;
        }
        if let Some(s) = self.image_std {
            c.std = s;
        }
        if self.do_normalize == Some(false) {
            c.mean = [0.0; 3];
            c.std = [1.0; 3];
        }
    }

    /// A `{"longest_edge": n}` size field's `n`.
    pub fn longest_edge(v: &Option<serde_json::Value>) -> Option<usize> {
        v.as_ref().and_then(|s| s["longest_edge"].as_u64()).map(|n| n as usize)
    }
}

impl Resample {
    /// PIL's filter numbers, as preprocessor configs write them.
    pub fn from_pil(r: u32) -> Result<Self, LoadError> {
        match r {
            1 => Ok(Resample::Lanczos),
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            r => Err(LoadError::Unsupported(format!("resample {r} (supported: 1 lanczos, 2 bilinear, 3 bicubic)"))),
        }
    }
}

/// PIL's `lanczos_filter`: `sinc(x) sinc(x / 3)` on `[-3, 3)`.
fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    if (-3.0..3.0).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

fn bicubic(x: f64) -> f64 {
    // Keys' cubic with a = -0.5, PIL's choice.
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

fn bilinear(x: f64) -> f64 {
    (1.0 - x.abs()).max(0.0)
}

/// One output sample's filter taps: the input samples `first..first + weights.len()` and
/// their normalised weights (PIL's `precompute_coeffs`, in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    pub first: usize,
    pub weights: Vec<f32>,
}

/// PIL's resampling taps from `n_in` to `n_out` samples, for output samples `keep` only
/// (the crop).
pub fn resample_taps(n_in: usize, n_out: usize, keep: std::ops::Range<usize>, resample: Resample) -> Vec<Taps> {
    let (filter, support): (fn(f64) -> f64, f64) = match resample {
        Resample::Bicubic => (bicubic, 2.0),
        Resample::Bilinear | Resample::BilinearNoAntialias => (bilinear, 1.0),
        Resample::Lanczos => (lanczos, 3.0),
    };
    let scale = n_in as f64 / n_out as f64;
    // Antialiasing widens the filter by the reduction; without it the filter keeps its
    // width, and the taps are torch's: source `(o + 0.5) * scale - 0.5`, clamped to the
    // edges (a tap off the picture drops out and the other takes its weight).
    let fscale = if resample == Resample::BilinearNoAntialias { 1.0 } else { scale.max(1.0) };
    let support = support * fscale;
    keep.map(|o| {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5) as isize).max(0) as usize;
        let hi = ((center + support + 0.5) as usize).min(n_in).max(lo);
        let ks: Vec<f64> = (lo..hi).map(|x| filter((x as f64 - center + 0.5) / fscale)).collect();
        let total: f64 = ks.iter().sum();
        let weights = ks.iter().map(|k| if total != 0.0 { (k / total) as f32 } else { 0.0 }).collect();
        Taps { first: lo, weights }
    })
    .collect()
}

/// [`resample_taps`] as a dense `[keep.len(), n_in]` matrix, row-major (the device path's
/// resampling matmul).
pub fn resample_weights(n_in: usize, n_out: usize, keep: std::ops::Range<usize>, resample: Resample) -> Vec<f32> {
    let taps = resample_taps(n_in, n_out, keep, resample);
    let mut w = vec![0f32; taps.len() * n_in];
    for (row, t) in taps.iter().enumerate() {
        w[row * n_in + t.first..][..t.weights.len()].copy_from_slice(&t.weights);
    }
    w
}

/// The crop window `(top, left)` inside a resized `(h, w)` image.
pub fn crop_origin(cfg: &PreprocessConfig, h: usize, w: usize) -> (usize, usize) {
    match cfg.crop {
        Some((ch, cw)) => (h.saturating_sub(ch) / 2, w.saturating_sub(cw) / 2),
        None => (0, 0),
    }
}

/// CPU reference: RGB frames `[h, w, 3]` u8 -> `[3, oh, ow]` f32, the device path's math.
pub fn reference(rgb: &[u8], h: usize, w: usize, cfg: &PreprocessConfig) -> Vec<f32> {
    let steps = cfg.resize_steps(h, w);
    let (rh, rw) = cfg.resized(h, w);
    let (oh, ow) = cfg.output_size(h, w);
    let (top, left) = crop_origin(cfg, rh, rw);
    // Planes `[3][h][w]` as floats 0..=255.
    let mut planes: Vec<f32> = (0..3).flat_map(|c| (0..h * w).map(move |i| rgb[i * 3 + c] as f32)).collect();
    let (mut ph, mut pw) = (h, w);
    for (k, &(sh, sw)) in steps.iter().enumerate() {
        // The crop is folded into the last pass's weights, as on the device.
        let last = k + 1 == steps.len();
        let (ys, xs) = if last { (top..top + oh, left..left + ow) } else { (0..sh, 0..sw) };
        planes = resample_reference(&planes, ph, pw, sh, sw, ys.clone(), xs.clone(), cfg.resample);
        (ph, pw) = (ys.len(), xs.len());
    }
    if steps.is_empty() {
        planes = (0..3)
            .flat_map(|c| {
                let p = &planes;
                (0..oh).flat_map(move |y| (0..ow).map(move |x| p[(c * h + y + top) * w + x + left]))
            })
            .collect();
    }
    planes.iter().enumerate().map(|(i, v)| (v * cfg.rescale - cfg.mean[i / (oh * ow)]) / cfg.std[i / (oh * ow)]).collect()
}

/// One PIL resize of 3 planes `[3][h][w]` to `(oh, ow)`, keeping output rows `ys` and
/// columns `xs`: horizontal pass, then vertical, each rounded to 8 bits.
#[allow(clippy::too_many_arguments)]
fn resample_reference(
    planes: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    ys: std::ops::Range<usize>,
    xs: std::ops::Range<usize>,
    resample: Resample,
) -> Vec<f32> {
    let (kh, kw) = (ys.len(), xs.len());
    let wx = resample_weights(w, ow, xs, resample);
    let wy = resample_weights(h, oh, ys, resample);
    let mut out = vec![0f32; 3 * kh * kw];
    for c in 0..3 {
        let plane = &planes[c * h * w..(c + 1) * h * w];
        let mut tmp = vec![0f32; h * kw];
        for y in 0..h {
            for x in 0..kw {
                let s: f32 = (0..w).map(|i| wx[x * w + i] * plane[y * w + i]).sum();
                tmp[y * kw + x] = s.round().clamp(0.0, 255.0);
            }
        }
        for y in 0..kh {
            for x in 0..kw {
                let s: f32 = (0..h).map(|j| wy[y * h + j] * tmp[j * kw + x]).sum();
                out[(c * kh + y) * kw + x] = s.round().clamp(0.0, 255.0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalised_rows() {
        let w = resample_weights(1280, 398, 0..398, Resample::Bicubic);
        for row in w.chunks(1280) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn clip_sizes() {
        let c = PreprocessConfig::clip(224);
        assert_eq!(c.resized(720, 1280), (224, 398));
        assert_eq!(c.output_size(720, 1280), (224, 224));
        assert_eq!(crop_origin(&c, 224, 398), (0, 87));
    }

    #[test]
    fn idefics3_tile_sizes() {
        // SmolVLMImageProcessor (transformers 4.57.1) on a 176x144 picture, size 384, tiles of 96.
        let t = TiledSizes::new(144, 176, 384, 96, true);
        assert_eq!((t.resized, t.tiled, t.rows, t.cols), ((314, 384), (384, 384), 4, 4));
        // 1280x720 at SmolVLM2's 2048 / 512: 2048 x 1152 -> 2048 x 1536, 3 x 4 tiles.
        let t = TiledSizes::new(720, 1280, 2048, 512, true);
        assert_eq!((t.resized, t.tiled, t.rows, t.cols), ((1152, 2048), (1536, 2048), 3, 4));
        let t = TiledSizes::new(100, 80, 96, 96, true);
        assert_eq!((t.resized, t.tiled, t.rows, t.cols), ((96, 76), (96, 96), 0, 0));
        assert_eq!(TiledSizes::new(144, 176, 384, 96, false).tiled, (96, 96));
    }

    #[test]
    fn smolvlm_video_sizes() {
        // video_processing_smolvlm.get_resize_output_image_size: 176x144 -> 384 x 314.2 -> 314.
        assert_eq!(longest_edge_size(144, 176, 384), (314, 384));
        assert_eq!(longest_edge_size(272, 640, 2048), (870, 2048));
        assert_eq!(longest_edge_size(640, 272, 2048), (2048, 870));
        assert_eq!(longest_edge_size(720, 1280, 512), (288, 512));
        let c = PreprocessConfig {
            resize: Resize::LongestEdgeThenSquare { longest: 384, square: 96 },
            crop: None,
            ..PreprocessConfig::clip(96)
        };
        assert_eq!(c.resize_steps(144, 176), vec![(314, 384), (96, 96)]);
        assert_eq!(c.output_size(144, 176), (96, 96));
    }
}
