//! Frame preprocessing on the device for a whole batch of frames: per resize, PIL's
//! separable antialiased filter (crop folded into the last resize), 8-bit rounding after
//! each pass as PIL does, then rescale and normalise. Math: `vidllm_core::preprocess`.
//!
//! On a GPU each pass is a matmul against a dense weight matrix, which keeps it to one
//! well-tuned kernel. On the CPU that matrix is mostly zeros (a 1280 -> 384 bicubic pass
//! has 14 taps per output, against 1280 columns), so the CPU backend walks the taps
//! instead, planes split over threads, with the same sums in the same order.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::ops::Range;

use vidllm_core::preprocess::{PreprocessConfig, Resample, Taps, crop_origin, resample_taps, resample_weights};

/// RGB u8 frames of one size, `[t, h, w, 3]` packed, -> pixel values `[t, 3, oh, ow]`.
pub fn preprocess(frames: &[&[u8]], h: usize, w: usize, cfg: &PreprocessConfig, device: &Device) -> Tensor<4> {
    // On the CPU, straight from the packed frames: no float copy of the decoded video.
    if let Some(x) = preprocess_on_cpu(Source::Rgb(frames), frames.len(), h, w, cfg, device) {
        return x;
    }
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
    let [t, _, h, w] = x.dims();
    let device = x.device();
    if on_cpu(&device) && !cfg.resize_steps(h, w).is_empty() {
        let host = x.into_data().try_into_vec::<f32>().expect("preprocess: f32 planes");
        return preprocess_on_cpu(Source::Planes(&host), t, h, w, cfg, &device).expect("a resize to run");
    }
    let steps = resize_steps(h, w, cfg);
    let mut x = x;
    for ((sh, sw), ys, xs) in steps.iter().cloned() {
        x = resample(x, sh, sw, ys, xs, cfg.resample);
    }
    if steps.is_empty() {
        let (rh, rw) = cfg.resized(h, w);
        let (oh, ow) = cfg.output_size(h, w);
        let (top, left) = crop_origin(cfg, rh, rw);
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

/// One PIL resize to `(sh, sw)`, output rows `ys` and columns `xs` kept, each pass rounded
/// to 8 bits: two matmuls on a GPU, the filter taps on the CPU.
///
/// # Shapes
/// - x: `[t, 3, h, w]` -> `[t, 3, ys.len(), xs.len()]`
fn resample(x: Tensor<4>, sh: usize, sw: usize, ys: Range<usize>, xs: Range<usize>, filter: Resample) -> Tensor<4> {
    let [t, _, h, w] = x.dims();
    let device = x.device();
    let (kh, kw) = (ys.len(), xs.len());
    if on_cpu(&device) {
        let host = x.into_data().try_into_vec::<f32>().expect("preprocess: f32 planes");
        let pass = Pass::new((h, w), (sh, sw), ys, xs, filter);
        let out = resize_on_cpu(Source::Planes(&host), h, w, std::slice::from_ref(&pass));
        return Tensor::<4>::from_data(TensorData::new(out, [t, 3, kh, kw]), &device);
    }
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

/// One resize: to `(h, w)`, keeping output rows and columns.
type ResizeStep = ((usize, usize), Range<usize>, Range<usize>);

/// The resizes of `cfg` for `(h, w)` frames: each one's size, and the output rows and
/// columns it keeps (the crop is folded into the last; the others keep everything).
fn resize_steps(h: usize, w: usize, cfg: &PreprocessConfig) -> Vec<ResizeStep> {
    let steps = cfg.resize_steps(h, w);
    let (rh, rw) = cfg.resized(h, w);
    let (oh, ow) = cfg.output_size(h, w);
    let (top, left) = crop_origin(cfg, rh, rw);
    let last = steps.len().saturating_sub(1);
    steps
        .iter()
        .enumerate()
        .map(|(k, &(sh, sw))| if k == last { ((sh, sw), top..top + oh, left..left + ow) } else { ((sh, sw), 0..sh, 0..sw) })
        .collect()
}

/// Whether `device` is the CPU backend (a build without it has none).
fn on_cpu(device: &Device) -> bool {
    #[cfg(feature = "cpu")]
    return *device == Device::flex();
    #[cfg(not(feature = "cpu"))]
    {
        let _ = device;
        false
    }
}

/// `t` frames of `(h, w)` preprocessed on the CPU, resized through the filter taps; `None`
/// off the CPU, or when `cfg` only crops.
fn preprocess_on_cpu(src: Source, t: usize, h: usize, w: usize, cfg: &PreprocessConfig, device: &Device) -> Option<Tensor<4>> {
    if !on_cpu(device) {
        return None;
    }
    let mut from = (h, w);
    let mut passes = Vec::new();
    for (to, ys, xs) in resize_steps(h, w, cfg) {
        let pass = Pass::new(from, to, ys, xs, cfg.resample);
        from = (pass.rows.len(), pass.cols.first.len());
        passes.push(pass);
    }
    if passes.is_empty() {
        return None;
    }
    let out = resize_on_cpu(src, h, w, &passes);
    Some(normalise_planes(Tensor::<4>::from_data(TensorData::new(out, [t, 3, from.0, from.1]), device), cfg))
}

/// Frames for the CPU resize.
enum Source<'a> {
    /// RGB u8 frames, each `[h, w, 3]` packed.
    Rgb(&'a [&'a [u8]]),
    /// Planes `[t * 3][h][w]` as floats 0..=255.
    Planes(&'a [f32]),
}

/// One PIL resize on the CPU: from `(h, w)` to the outputs of `rows` x `cols`.
struct Pass {
    w: usize,
    rows: Vec<Taps>,
    cols: PaddedTaps,
}

impl Pass {
    /// `from` resized to `to`, output rows `ys` and columns `xs` kept.
    fn new(from: (usize, usize), to: (usize, usize), ys: Range<usize>, xs: Range<usize>, filter: Resample) -> Self {
        let rows = resample_taps(from.0, to.0, ys, filter);
        Self { w: from.1, rows, cols: PaddedTaps::new(&resample_taps(from.1, to.1, xs, filter), from.1) }
    }

    fn out_len(&self) -> usize {
        self.rows.len() * self.cols.first.len()
    }

    /// One plane `[h][w]` -> `[rows][cols]`: horizontal pass into `tmp`, then vertical,
    /// each output a sum over its taps in input order from 0.0 (so equal, bit for bit, to
    /// the dense reference, whose other terms are exact zeros), rounded to 8 bits.
    fn apply(&self, src: &[f32], tmp: &mut Vec<f32>, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was just detected.
            return unsafe { self.apply_avx2(src, tmp, dst) };
        }
        self.apply_generic(src, tmp, dst)
    }

    /// The same loops with 8-lane vectors (still no fused multiply-add: the sums stay
    /// the reference's).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn apply_avx2(&self, src: &[f32], tmp: &mut Vec<f32>, dst: &mut [f32]) {
        self.apply_generic(src, tmp, dst)
    }

    #[inline(always)]
    fn apply_generic(&self, src: &[f32], tmp: &mut Vec<f32>, dst: &mut [f32]) {
        let kw = self.cols.first.len();
        tmp.resize(src.len() / self.w * kw, 0.0);
        self.cols.apply(src, self.w, tmp);
        for (line, t) in dst.chunks_mut(kw).zip(&self.rows) {
            // Written before it is read: a fresh zeroed allocation is the shared zero page
            // until written, and a first read then write costs a copy-on-write fault and a
            // TLB flush on every core, per page.
            line.fill(0.0);
            // Whole lines at a time: the sum for each output runs over the taps in order.
            for (j, k) in t.weights.iter().enumerate() {
                let src_line = &tmp[(t.first + j) * kw..][..kw];
                line.iter_mut().zip(src_line).for_each(|(o, p)| *o += k * p);
            }
            line.iter_mut().for_each(|o| *o = to_u8(*o));
        }
    }
}

/// Every plane of `src` (`(h, w)` frames) through `passes`, one plane per task, its
/// intermediate pictures in the task's own scratch -> `[t * 3][oh][ow]`.
fn resize_on_cpu(src: Source, h: usize, w: usize, passes: &[Pass]) -> Vec<f32> {
    let planes = match &src {
        Source::Rgb(frames) => frames.len() * 3,
        Source::Planes(p) => p.len() / (h * w),
    };
    let out_len = passes.last().map_or(h * w, Pass::out_len);
    let mut out = vec![0f32; planes * out_len];
    // Scratch pictures per worker, reused from plane to plane: a fresh buffer this size
    // per plane costs more in page faults than the filtering.
    let scratch = || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new());
    out.par_chunks_mut(out_len).enumerate().for_each_init(scratch, |(picture, tmp, next), (p, dst)| {
        picture.clear();
        match &src {
            Source::Rgb(frames) => picture.extend(frames[p / 3].iter().skip(p % 3).step_by(3).map(|&b| b as f32)),
            Source::Planes(planes) => picture.extend_from_slice(&planes[p * h * w..(p + 1) * h * w]),
        }
        for (i, pass) in passes.iter().enumerate() {
            if i + 1 == passes.len() {
                pass.apply(picture, tmp, dst);
            } else {
                next.resize(pass.out_len(), 0.0);
                pass.apply(picture, tmp, next);
                std::mem::swap(picture, next);
            }
        }
    });
    out
}

/// `s.round().clamp(0.0, 255.0)` without the library call `round` compiles to (rounding
/// half away from zero has no instruction before AVX-512): clamping first changes
/// nothing, and on 0..=255 a truncation and an exact remainder give the same result.
#[inline(always)]
fn to_u8(s: f32) -> f32 {
    let s = s.clamp(0.0, 255.0);
    let whole = s as u32 as f32;
    if s - whole >= 0.5 { whole + 1.0 } else { whole }
}

/// Horizontal taps at one width: every output's taps padded with zeros to the longest
/// count `k` (before its first tap near the right edge, after its last elsewhere), so
/// that a block of rows runs through the same loop. An added `0 * p` term leaves a sum of
/// finite values unchanged, so the results are those of the unpadded taps.
struct PaddedTaps {
    k: usize,
    first: Vec<usize>,
    /// `[outputs, k]`
    weights: Vec<f32>,
}

impl PaddedTaps {
    /// Rows filtered together, one SIMD lane each: the rows are transposed into a tile so
    /// that a tap reads `ROWS` adjacent values.
    const ROWS: usize = 16;

    fn new(taps: &[Taps], w: usize) -> Self {
        let k = taps.iter().map(|t| t.weights.len()).max().unwrap_or(0);
        let mut first = Vec::with_capacity(taps.len());
        let mut weights = vec![0f32; taps.len() * k];
        for (t, dst) in taps.iter().zip(weights.chunks_mut(k.max(1))) {
            // A window of k samples inside the row (k <= w: taps lie inside it).
            let start = t.first.min(w - k);
            let at = t.first - start;
            dst[at..at + t.weights.len()].copy_from_slice(&t.weights);
            first.push(start);
        }
        Self { k, first, weights }
    }

    /// A plane `[h][w]` -> its outputs `[h][outputs]`, rounded to 8 bits.
    #[inline(always)]
    fn apply(&self, plane: &[f32], w: usize, out: &mut [f32]) {
        const R: usize = PaddedTaps::ROWS;
        let (k, kw) = (self.k, self.first.len());
        let mut tile = vec![0f32; w * R];
        for (y0, rows) in plane.chunks(R * w).enumerate().map(|(i, c)| (i * R, c)) {
            let n = rows.len() / w;
            for (r, row) in rows.chunks(w).enumerate() {
                for (i, &p) in row.iter().enumerate() {
                    tile[i * R + r] = p;
                }
            }
            for x in 0..kw {
                let mut acc = [0f32; R];
                let weights = &self.weights[x * k..(x + 1) * k];
                let taken = &tile[self.first[x] * R..][..k * R];
                for (wj, px) in weights.iter().zip(taken.chunks_exact(R)) {
                    for r in 0..R {
                        acc[r] += wj * px[r];
                    }
                }
                let acc = acc.map(to_u8);
                for (r, a) in acc.iter().enumerate().take(n) {
                    out[(y0 + r) * kw + x] = *a;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidllm_core::preprocess::{Resize, reference};

    /// The CPU's tap walk gives the dense reference's values bit for bit, for each filter,
    /// down and up, one pass and two, with a crop.
    #[test]
    fn cpu_taps_equal_the_dense_reference() {
        let (h, w) = (90, 161);
        let frame: Vec<u8> = (0..h * w * 3).map(|i| ((i * 2_654_435_761usize) >> 7) as u8).collect();
        let device = Device::flex();
        for resample in [Resample::Bilinear, Resample::Bicubic, Resample::Lanczos] {
            for (resize, crop) in [
                (Resize::ShortestEdge(40), Some((40, 40))),
                (Resize::ShortestEdge(128), Some((120, 100))),
                (Resize::LongestEdgeThenSquare { longest: 96, square: 48 }, None),
            ] {
                let cfg = PreprocessConfig { resize, crop, resample, ..PreprocessConfig::clip(40) };
                let want = reference(&frame, h, w, &cfg);
                let got = preprocess(&[&frame, &frame], h, w, &cfg, &device).into_data().try_into_vec::<f32>().unwrap();
                assert_eq!(got.len(), 2 * want.len());
                for (i, (a, b)) in got.iter().zip(want.iter().cycle()).enumerate() {
                    assert!(a.to_bits() == b.to_bits() || a == b, "{resample:?} {resize:?}: value {i}: {a} vs {b}");
                }
            }
        }
    }
}
