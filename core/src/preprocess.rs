//! Image preprocessing as Hugging Face's CLIP-style image processors do it: resize the
//! shortest edge (PIL bicubic, antialiased), centre crop, rescale, normalise.
//!
//! A PIL resize is separable: each output pixel is a normalised, filter-weighted sum of
//! input pixels along one axis, horizontal pass first, each pass rounded to 8 bits. So a
//! resize is two matrix products with weight matrices that depend only on the sizes; the
//! device path (`vidllm_shaders::preprocess`) runs them on the GPU, and `reference` here
//! runs the same arithmetic on the CPU for tests.

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
}

/// Resolved preprocessing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Resize so the shorter side has this length (`None`: no resize).
    pub shortest_edge: Option<usize>,
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
            shortest_edge: Some(size),
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

    /// Size after the shortest-edge resize (transformers' `get_resize_output_image_size`).
    pub fn resized(&self, h: usize, w: usize) -> (usize, usize) {
        match self.shortest_edge {
            None => (h, w),
            Some(s) if h <= w => (s, (s as f64 * w as f64 / h as f64) as usize),
            Some(s) => ((s as f64 * h as f64 / w as f64) as usize, s),
        }
    }
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
}

impl PreprocessorJson {
    /// Resolve against an architecture's defaults.
    pub fn resolve(&self, defaults: &PreprocessConfig) -> Result<PreprocessConfig, LoadError> {
        let mut c = defaults.clone();
        if let Some(s) = &self.size {
            c.shortest_edge = s["shortest_edge"].as_u64().or_else(|| s.as_u64()).map(|v| v as usize).or(c.shortest_edge);
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
            None | Some(3) => Resample::Bicubic,
            Some(2) => Resample::Bilinear,
            Some(r) => return Err(LoadError::Unsupported(format!("resample {r} (supported: 2 bilinear, 3 bicubic)"))),
        };
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
        if self.do_resize == Some(false) {
            c.shortest_edge = None;
        }
        if self.do_center_crop == Some(false) {
            c.crop = None;
        }
        Ok(c)
    }
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

/// PIL's resampling weights from `n_in` to `n_out` samples, rows `keep` of the output only
/// (the crop): a dense `[keep.len(), n_in]` matrix, row-major.
pub fn resample_weights(n_in: usize, n_out: usize, keep: std::ops::Range<usize>, resample: Resample) -> Vec<f32> {
    let (filter, support): (fn(f64) -> f64, f64) = match resample {
        Resample::Bicubic => (bicubic, 2.0),
        Resample::Bilinear => (bilinear, 1.0),
    };
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = support * fscale;
    let mut w = vec![0f32; keep.len() * n_in];
    for (row, o) in keep.enumerate() {
        let center = (o as f64 + 0.5) * scale;
        let lo = ((center - support + 0.5) as isize).max(0) as usize;
        let hi = ((center + support + 0.5) as usize).min(n_in);
        let ks: Vec<f64> = (lo..hi).map(|x| filter((x as f64 - center + 0.5) / fscale)).collect();
        let total: f64 = ks.iter().sum();
        for (x, k) in (lo..hi).zip(ks) {
            w[row * n_in + x] = if total != 0.0 { (k / total) as f32 } else { 0.0 };
        }
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
    let (rh, rw) = cfg.resized(h, w);
    let (oh, ow) = cfg.output_size(h, w);
    let (top, left) = crop_origin(cfg, rh, rw);
    let resize = cfg.shortest_edge.is_some();
    let wx = resample_weights(w, rw, left..left + ow, cfg.resample);
    let wy = resample_weights(h, rh, top..top + oh, cfg.resample);
    let mut out = vec![0f32; 3 * oh * ow];
    for c in 0..3 {
        // Horizontal pass, rounded to 8 bits as PIL stores it.
        let mut tmp = vec![0f32; h * ow];
        for y in 0..h {
            for x in 0..ow {
                tmp[y * ow + x] = if resize {
                    let s: f32 = (0..w).map(|i| wx[x * w + i] * rgb[(y * w + i) * 3 + c] as f32).sum();
                    s.round().clamp(0.0, 255.0)
                } else {
                    rgb[(y * w + x + left) * 3 + c] as f32
                };
            }
        }
        for y in 0..oh {
            for x in 0..ow {
                let v = if resize {
                    let s: f32 = (0..h).map(|j| wy[y * h + j] * tmp[j * ow + x]).sum();
                    s.round().clamp(0.0, 255.0)
                } else {
                    tmp[(y + top) * ow + x]
                };
                out[(c * oh + y) * ow + x] = (v * cfg.rescale - cfg.mean[c]) / cfg.std[c];
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
}
