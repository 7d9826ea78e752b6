//! Frame preprocessing on the device for a whole batch of frames: per resize, PIL's
//! separable antialiased filter (crop folded into the last resize), 8-bit rounding after
//! each pass as PIL does, then rescale and normalise. Math: `vidllm_core::preprocess`.
//!
//! On a GPU each pass is a matmul against a dense weight matrix, which keeps it to one
//! well-tuned kernel. On the CPU that matrix is mostly zeros (a 1280 -> 384 bicubic pass
//! has 14 taps per output, against 1280 columns), so the CPU backend walks the taps
//! instead, planes split over threads, with the same sums in the same order. Each pass
//! adds whole lines of the plane (the horizontal one on the plane turned, a block of lines
//! at a time), so every inner loop is a contiguous multiply-add.

use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::ops::Range;

use crate::cpu_attention::transpose_into;
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
        let out = resize_on_cpu(Source::Planes(&host), h, w, std::slice::from_ref(&pass), None);
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
        from = (pass.rows.len(), pass.cols.len());
        passes.push(pass);
    }
    if passes.is_empty() {
        return None;
    }
    let out = resize_on_cpu(src, h, w, &passes, Some(cfg));
    Some(Tensor::<4>::from_data(TensorData::new(out, [t, 3, from.0, from.1]), device))
}

/// Frames for the CPU resize.
enum Source<'a> {
    /// RGB u8 frames, each `[h, w, 3]` packed.
    Rgb(&'a [&'a [u8]]),
    /// Planes `[t * 3][h][w]` as floats 0..=255.
    Planes(&'a [f32]),
}

/// One PIL resize on the CPU: from `from` to the kept outputs of `cols` (the horizontal
/// pass) and `rows` (the vertical one).
struct Pass {
    from: (usize, usize),
    rows: Vec<Taps>,
    cols: Vec<Taps>,
}

impl Pass {
    /// `from` resized to `to`, output rows `ys` and columns `xs` kept.
    fn new(from: (usize, usize), to: (usize, usize), ys: Range<usize>, xs: Range<usize>, filter: Resample) -> Self {
        Self { from, rows: resample_taps(from.0, to.0, ys, filter), cols: resample_taps(from.1, to.1, xs, filter) }
    }

    fn out_len(&self) -> usize {
        self.rows.len() * self.cols.len()
    }

    /// One plane, given turned in `t` (`[w][h]`) -> the resized plane, rounded to 8 bits:
    /// as `[rows][cols]`, or turned (`[cols][rows]`) for a pass that follows.
    ///
    /// Both passes add whole lines: the horizontal one on the turned plane, where an output
    /// column is a sum of input columns; the vertical one on the plane turned back. So
    /// every output is its taps' sum in input order, from zero (equal, bit for bit, to the
    /// dense reference's, whose other terms are exact zeros), and every inner loop is a
    /// contiguous multiply-add over a line.
    fn apply(&self, t: &[f32], u: &mut Vec<f32>, block: &mut Vec<f32>, out: PassOut) {
        let (h, w, kw) = (self.from.0, self.from.1, self.cols.len());
        let u = room(u, h * kw);
        combine_turned(&self.cols, &t[..w * h], h, u, block);
        match out {
            PassOut::Rows(dst, finish) => combine_lines(&self.rows, u, kw, dst, finish),
            PassOut::Turned(next) => combine_turned(&self.rows, u, kw, next, block),
        }
    }
}

/// Where a pass puts its plane.
enum PassOut<'a> {
    /// As `[rows][cols]`, each value then `finish`ed.
    Rows(&'a mut [f32], Finish),
    /// Turned, `[cols][rows]`, rounded.
    Turned(&'a mut [f32]),
}

/// Lines summed, then turned, a block at a time: a block stays in the cache between its
/// sums and its transposition, where a whole picture (2048 x 1152 floats for SmolVLM2's
/// videos) would go out to memory and back.
const BLOCK: usize = 16;

/// [`combine_lines`] (rounded), turned: `dst` is `[len][taps.len()]`.
fn combine_turned(taps: &[Taps], src: &[f32], len: usize, dst: &mut [f32], block: &mut Vec<f32>) {
    for (b, chunk) in taps.chunks(BLOCK).enumerate() {
        let lines = room(block, chunk.len() * len);
        combine_lines(chunk, src, len, lines, Finish::Round);
        transpose_into(lines, chunk.len(), len, &mut dst[b * BLOCK..], taps.len());
    }
}

/// What becomes of a resized value.
#[derive(Clone, Copy)]
enum Finish {
    /// Rounded to 8 bits, as PIL stores each pass.
    Round,
    /// Rounded, then rescaled and normalised as [`normalise_planes`] does:
    /// `(v * rescale - mean) / std`, in that order, in f32.
    Normalise { rescale: f32, mean: f32, std: f32 },
}

/// Line `i` of `dst` = the sum over `taps[i]` of each weight times its line of `src`
/// (lines of `len` values), then `finish`ed.
fn combine_lines(taps: &[Taps], src: &[f32], len: usize, dst: &mut [f32], finish: Finish) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected.
        return unsafe { combine_lines_avx2(taps, src, len, dst, finish) };
    }
    combine_lines_generic(taps, src, len, dst, finish)
}

/// The same loops with 8-lane vectors (still no fused multiply-add: the sums stay the
/// reference's).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn combine_lines_avx2(taps: &[Taps], src: &[f32], len: usize, dst: &mut [f32], finish: Finish) {
    combine_lines_generic(taps, src, len, dst, finish)
}

#[inline(always)]
fn combine_lines_generic(taps: &[Taps], src: &[f32], len: usize, dst: &mut [f32], finish: Finish) {
    for (line, t) in dst.chunks_exact_mut(len).zip(taps) {
        let mut weights = t.weights.iter().enumerate();
        let src_line = |j: usize| &src[(t.first + j) * len..][..len];
        // The first term written, not added to zero: `0 + x` is `x` but for the sign of a
        // zero, which the rounding below makes +0 either way.
        match weights.next() {
            Some((j, &k)) => line.iter_mut().zip(src_line(j)).for_each(|(o, p)| *o = k * p),
            None => line.fill(0.0),
        }
        for (j, &k) in weights {
            line.iter_mut().zip(src_line(j)).for_each(|(o, p)| *o += k * p);
        }
        match finish {
            Finish::Round => line.iter_mut().for_each(|o| *o = to_u8(*o)),
            Finish::Normalise { rescale, mean, std } => {
                line.iter_mut().for_each(|o| *o = (to_u8(*o) * rescale - mean) / std);
            }
        }
    }
}

/// Every plane of `src` (`(h, w)` frames) through `passes`, a run of planes per thread, its
/// intermediate pictures in the thread's own scratch -> `[t * 3][oh][ow]`, normalised per
/// channel when `cfg` is given.
fn resize_on_cpu(src: Source, h: usize, w: usize, passes: &[Pass], cfg: Option<&PreprocessConfig>) -> Vec<f32> {
    let planes = match &src {
        Source::Rgb(frames) => frames.len() * 3,
        Source::Planes(p) => p.len() / (h * w),
    };
    let out_len = passes.last().map_or(h * w, Pass::out_len);
    let mut out = vec![0f32; planes * out_len];
    if out.is_empty() {
        return out;
    }
    // One run of planes per thread, each with its own scratch pictures, reused from plane
    // to plane: fresh buffers per plane (or per rayon split) cost more in page faults and
    // zeroing than the filtering, most of all on the first video, whose memory is all new.
    let per_task = planes.div_ceil(rayon::current_num_threads().clamp(1, planes.max(1)));
    out.par_chunks_mut(out_len * per_task).enumerate().for_each(|(g, run)| {
        let mut scratch = Default::default();
        for (i, dst) in run.chunks_mut(out_len).enumerate() {
            resize_plane(&src, g * per_task + i, (h, w), passes, cfg, &mut scratch, dst);
        }
    });
    out
}

/// A thread's scratch: the turned plane a pass reads, the one it writes for the next, its
/// horizontal pass's output, and a block of lines.
type Scratch = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Plane `p` of `src` (`(h, w)` frames) through `passes` into `dst`.
fn resize_plane(
    src: &Source,
    p: usize,
    (h, w): (usize, usize),
    passes: &[Pass],
    cfg: Option<&PreprocessConfig>,
    (t, next, u, block): &mut Scratch,
    dst: &mut [f32],
) {
    let Some((last, earlier)) = passes.split_last() else { return };
    // The plane, turned (`[w][h]`), into `t`, a block of rows at a time.
    let turned = room(t, h * w);
    match src {
        Source::Rgb(frames) => {
            let c = p % 3;
            for (y0, rgb) in frames[p / 3].chunks(BLOCK * w * 3).enumerate().map(|(i, rows)| (i * BLOCK, rows)) {
                let rows = room(block, rgb.len() / 3);
                rows.iter_mut().zip(rgb.chunks_exact(3)).for_each(|(v, px)| *v = px[c] as f32);
                transpose_into(rows, rows.len() / w, w, &mut turned[y0..], h);
            }
        }
        Source::Planes(planes) => transpose_into(&planes[p * h * w..(p + 1) * h * w], h, w, turned, h),
    }
    let finish = cfg.map_or(Finish::Round, |c| {
        let ch = p % 3;
        Finish::Normalise { rescale: c.rescale, mean: c.mean[ch], std: c.std[ch] }
    });
    for pass in earlier {
        pass.apply(t, u, block, PassOut::Turned(room(next, pass.out_len())));
        std::mem::swap(t, next);
    }
    last.apply(t, u, block, PassOut::Rows(dst, finish));
}

/// The first `n` values of a scratch buffer, which only ever grows: shrinking and growing
/// it again from plane to plane would zero the new part each time.
fn room(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// `s.round().clamp(0.0, 255.0)` without the library call `round` compiles to (rounding
/// half away from zero has no instruction before AVX-512): clamping first changes
/// nothing, and on 0..=255 the floor and an exact remainder give the same result.
#[inline(always)]
fn to_u8(s: f32) -> f32 {
    let s = s.clamp(0.0, 255.0);
    // `floor`, not a cast to an integer: one instruction on 8 lanes (`vroundps`, wasm's
    // `f32x4.floor`), where Rust's saturating casts go one lane at a time.
    let whole = s.floor();
    if s - whole >= 0.5 { whole + 1.0 } else { whole }
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

    /// The same at the edges of the tiling: pictures of one row or column, and sizes that
    /// are not multiples of the 16 x 16 transposition tiles or of the 16-line blocks.
    #[test]
    fn cpu_taps_equal_the_dense_reference_at_odd_sizes() {
        let device = Device::flex();
        for (h, w) in [(1, 1), (1, 37), (37, 1), (17, 3), (33, 47), (16, 16)] {
            let frame: Vec<u8> = (0..h * w * 3).map(|i| ((i * 2_654_435_761usize) >> 9) as u8).collect();
            for (resize, crop) in
                [(Resize::ShortestEdge(20), Some((20, 18))), (Resize::LongestEdgeThenSquare { longest: 50, square: 19 }, None)]
            {
                let cfg = PreprocessConfig { resize, crop, resample: Resample::Bicubic, ..PreprocessConfig::clip(20) };
                let want = reference(&frame, h, w, &cfg);
                let got = preprocess(&[&frame], h, w, &cfg, &device).into_data().try_into_vec::<f32>().unwrap();
                assert_eq!(got.len(), want.len(), "{h}x{w} {resize:?}");
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(a == b, "{h}x{w} {resize:?}: value {i}: {a} vs {b}");
                }
            }
        }
    }

    /// Milliseconds to preprocess eight 1280x720 frames, per processor shape; run by hand:
    /// `cargo test --release -p vidllm-shaders --lib preprocess::tests::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed() {
        let (h, w, t) = (720, 1280, 8);
        let frames: Vec<Vec<u8>> = (0..t).map(|f| (0..h * w * 3).map(|i| ((i * 2_654_435_761usize + f) >> 7) as u8).collect()).collect();
        let frames: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        let device = Device::flex();
        for (name, resize, crop) in [
            ("CLIP 224", Resize::ShortestEdge(224), Some((224, 224))),
            ("SmolVLM2 2048 -> 512", Resize::LongestEdgeThenSquare { longest: 2048, square: 512 }, None),
        ] {
            let cfg = PreprocessConfig { resize, crop, resample: Resample::Bicubic, ..PreprocessConfig::clip(224) };
            // The first run is what a one-shot question pays: all its memory is new.
            let times: Vec<f64> = (0..5)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    let x = preprocess(&frames, h, w, &cfg, &device);
                    std::hint::black_box(x.into_data());
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            let best = times.iter().copied().fold(f64::INFINITY, f64::min);
            eprintln!("{name}: {best:.1} ms for {t} frames (first run {:.1} ms)", times[0]);
        }
    }
}
