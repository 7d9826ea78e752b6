//! The CPU's batched integer product (prefill): many rows of activations against a
//! quantised matrix, split into tasks over the thread pool; the register tiles are
//! `cpu_gemm_lanes.rs`'s.
//!
//! The arithmetic is the integer path's (`cpu_int.rs`): activations quantised to 16 bits
//! per 32, weights read as integer codes with an affine map per 16. What changes is the
//! order of the work, which is what a GEMM is about: a task owns a rectangle of `y`, a
//! block of activation rows and a band of weight rows. It widens the band's codes to i16
//! once (the band fits in L2), then sweeps it once per small tile of activation rows
//! (which stays in L1).
//!
//! Before the tiles, each weight row streamed every activation row through the caches
//! once (`pp512` was 0.45x llama.cpp). The first tiles held 32 elements of one weight row
//! per register (a `vpmaddwd`, a conversion and an FMA per 32 values and pair); with the
//! weight rows in the lanes (`cpu_gemm_lanes.rs`) a Zen 4 does twice the multiply-adds a
//! ns, on AVX-512 VNNI and on AVX2 alike.
//!
//! # Shapes
//! - weights: `n` rows of `k / B::ELEMS` blocks; activations: [`IntActs`], `m` rows of `k`
//! - `y`: `[m, n]`, row-major

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu_gemm_lanes::{self as lanes, Kernel, TILE_ROWS};
use crate::cpu_hot::SendPtr;
use crate::cpu_int::IntActs;
use vidllm_core::ggml::GgmlType;

/// The fewest activation rows worth a GEMM (fewer go row by row).
pub const MIN_ROWS: usize = 4;
/// Bytes of widened codes a band may take: it is swept once per tile of activation rows
/// and stays in L2 next to that tile.
const BAND_BYTES: usize = 192 << 10;

/// Whether this processor has a batched kernel (x86-64 with AVX2 and FMA); elsewhere
/// (WebAssembly, other architectures) products go row by row through `cpu_int::row_dot`.
pub fn available() -> bool {
    lanes::kernels().next().is_some()
}

/// How a matrix's blocks lie in its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As in the model file: row after row.
    File,
    /// Repacked for the decode kernel, sixteen rows side by side (`cpu_repack.rs`): each
    /// task unpacks its band into the file's layout first (a copy of the band, about a
    /// hundred KiB, against its sweep by every tile of activation rows).
    Repacked,
}

/// `y = x W^T` for `W` (`n` rows of type `ty`, packed, laid out as `layout` says) and the
/// quantised rows of `x`, split into tasks over the thread pool.
///
/// # Panics
/// If no batched kernel is [`available`], if `ty` is not a block type, or if the shapes do
/// not agree.
pub fn matmul(ty: GgmlType, w: &[u8], layout: Layout, n: usize, acts: &IntActs) -> Vec<f32> {
    matmul_on(lanes::kernels().next().expect("cpu_gemm::matmul: no batched kernel on this processor"), ty, w, layout, n, acts)
}

thread_local! {
    /// A task's band unpacked into the file's layout ([`Layout::Repacked`]).
    static UNPACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn matmul_on(kernel: Kernel, ty: GgmlType, w: &[u8], layout: Layout, n: usize, acts: &IntActs) -> Vec<f32> {
    let (m, k) = (acts.rows(), acts.k);
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    // The words holding W may end in padding.
    assert!(k.is_multiple_of(ty.block_elems()) && w.len() >= n * row_bytes, "cpu_gemm::matmul: W is not n rows of k");
    // Bands of whole tiles, small enough to stay in L2, and enough tasks to keep every
    // thread busy (about four each: the last ones balance the load).
    let threads = rayon::current_num_threads();
    // A task sweeps its band once per tile of activation rows, whatever its rows, and
    // widens the band once: tasks are as tall as the product, unless there are too few
    // tiles of weight rows to give every thread about four tasks; then the rows are
    // split, down to 64 a task.
    let row_blocks = (4 * threads).div_ceil(n.div_ceil(TILE_ROWS)).min(m.div_ceil(64)).max(1);
    let task_rows = m.div_ceil(row_blocks);
    let band_cap = (BAND_BYTES / (2 * k)).max(TILE_ROWS) / TILE_ROWS * TILE_ROWS;
    let bands_wanted = (4 * threads).div_ceil(row_blocks).max(n.div_ceil(band_cap));
    let band = n.div_ceil(bands_wanted).div_ceil(TILE_ROWS) * TILE_ROWS;
    let tasks: Vec<(Range<usize>, Range<usize>)> = (0..m)
        .step_by(task_rows)
        .flat_map(|i0| (0..n).step_by(band).map(move |j0| (i0..(i0 + task_rows).min(m), j0..(j0 + band).min(n))))
        .collect();
    // Each task writes its rectangle of y in place: the rectangles are disjoint and cover
    // y, so every value is written once (a copy of each task's part into y, and the
    // zeroing of a fresh y, were a twentieth of a prefill).
    let mut y = Vec::<f32>::with_capacity(m * n);
    crate::cpu_pages::advise_huge(&mut y);
    let base = SendPtr(y.as_mut_ptr());
    tasks.par_iter().for_each(|(rows, cols)| {
        let wband = &w[cols.start * row_bytes..cols.end * row_bytes];
        // SAFETY: inside y's capacity; no other task writes this rectangle.
        let out = Out { at: unsafe { base.get().add(rows.start * n + cols.start) }, ld: n };
        let run = |wband: &[u8]| {
            // SAFETY: `kernel` runs here (`lanes::kernels`); `out` covers the rectangle.
            vidllm_core::with_block!(ty, B => unsafe { lanes::task::<B>(kernel, wband, cols.len(), acts, rows.clone(), out) },
                else unreachable!("float types take the f32 path"))
        };
        match layout {
            Layout::File => run(wband),
            // Bands start and end on whole tiles (or at `n`), so on whole groups.
            Layout::Repacked => UNPACKED.with_borrow_mut(|file| {
                file.resize(wband.len(), 0);
                crate::cpu_repack::unpack(ty, wband, k / ty.block_elems(), file);
                run(file)
            }),
        }
    });
    // SAFETY: the tasks wrote all m * n values.
    unsafe { y.set_len(m * n) };
    y
}

/// Where a task writes its rectangle of `y`: value `(i, j)` of the rectangle at
/// `at + i * ld + j`.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) at: *mut f32,
    pub(crate) ld: usize,
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// Lane `p` of the result is the sum of the 16 lanes of `v[p]`: a transposing tree of
    /// unpacks and 128-bit shuffles (45 instructions where 16 separate reductions take 128).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(crate) fn reduce16(v: [__m512; 16]) -> __m512 {
        // Pairs: within each 128-bit block, [a0+a2, b0+b2, a1+a3, b1+b3].
        let a: [__m512; 8] =
            std::array::from_fn(|p| _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1])));
        // Quads: within each 128-bit block, one partial sum of each of four vectors.
        let b: [__m512; 4] = std::array::from_fn(|q| {
            let (x, y) = (_mm512_castps_pd(a[2 * q]), _mm512_castps_pd(a[2 * q + 1]));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
        });
        // The four 128-bit blocks of each summed: blocks (0, 1) and (2, 3) first.
        let c01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(b[0], b[1]), _mm512_shuffle_f32x4::<0b11_01_11_01>(b[0], b[1]));
        let c23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(b[2], b[3]), _mm512_shuffle_f32x4::<0b11_01_11_01>(b[2], b[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(c01, c23), _mm512_shuffle_f32x4::<0b11_01_11_01>(c01, c23))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_int::{ActBits, takes_integer_path};

    /// Every kernel the processor runs, every block type, shapes with ragged tiles and
    /// panels and several tasks: each value equals the f64 product of the dequantised weights with
    /// the quantised activations, to f32 rounding.
    #[test]
    fn batched_product_matches_f64() {
        for (kernel, ty) in lanes::kernels().flat_map(|k| GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)).map(move |t| (k, t)))
        {
            let (m, n, k) = (133, 38, 2 * vidllm_core::ggml::QK_K);
            let w = crate::check::weight(ty, n, k, 3);
            let x = crate::check::values(m * k, 4);
            for bits in [ActBits::Int16, ActBits::Int8] {
                let acts = IntActs::quantize_to(&x, k, bits);
                let (xq, wf) = (acts.dequantize(), vidllm_core::ggml::dequantize(ty, &w, n * k));
                let y = matmul_on(kernel, ty, &w, Layout::File, n, &acts);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k).map(|t| xq[i * k + t] as f64 * wf[j * k + t] as f64).sum();
                        let got = y[i * n + j];
                        let mag = want.abs().max(1.0) as f32;
                        assert!(
                            crate::check::within_rounding((got - want as f32).abs(), mag, k),
                            "{kernel:?} {ty:?} {bits:?} y[{i}, {j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// At 8 bits the AVX-512 kernel multiplies bytes (`vpdpbusd`); its integer sums equal
    /// the i16 panels' on the same codes, so every value does to the bit, except where the
    /// byte kernel adds a 32's offsets once (the types whose halves share them): there to
    /// f32 rounding. Rows of 576 (18 blocks: a run of two blocks left half full) and of 1,536.
    #[test]
    fn byte_panels_equal_word_panels() {
        for kernel in lanes::kernels() {
            for ty in GgmlType::ALL.into_iter().filter(|t| takes_integer_path(*t)) {
                for k in [576usize, 1536] {
                    if !k.is_multiple_of(ty.block_elems()) {
                        continue;
                    }
                    let (m, n) = (37, 70);
                    let w = crate::check::weight(ty, n, k, 5);
                    let bytes = IntActs::quantize_to(&crate::check::values(m * k, 6), k, ActBits::Int8);
                    let words = IntActs { bytes: None, qs: bytes.qs.clone(), d: bytes.d.clone(), dsums: bytes.dsums.clone(), k };
                    let (got, want) =
                        (matmul_on(kernel, ty, &w, Layout::File, n, &bytes), matmul_on(kernel, ty, &w, Layout::File, n, &words));
                    let merged = vidllm_core::with_block!(ty, B => <B as crate::cpu_int::IntCodes>::OFFSET && <B as crate::cpu_int::IntCodes>::SHARED32, else false);
                    if !merged || !matches!(kernel, lanes::Kernel::Avx512Vnni) {
                        assert_eq!(got, want, "{kernel:?} {ty:?} k {k}");
                        continue;
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert!(crate::check::within_rounding((g - w).abs(), w.abs(), k), "{kernel:?} {ty:?} k {k}: {g} vs {w}");
                    }
                    assert_ne!(got, want, "{ty:?}: the offsets were to be added per 32");
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Integer multiply-adds per nanosecond of a prefill-sized product, per kernel; run by
    /// hand: `RAYON_NUM_THREADS=1 cargo test --release --workspace --lib cpu_gemm::speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn prefill_product_speed() {
        // `M=16` and the like time short prompts' products; `TYPE=q5_0` one type; `REPS=200`
        // for a profile; `BITS=8` 8-bit activations; `N=3072 K=768` other shapes.
        let m = std::env::var("M").ok().and_then(|m| m.parse().ok()).unwrap_or(512);
        let env = |name: &str, default: usize| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let (n, k) = (env("N", 1536), env("K", 576));
        let only = std::env::var("TYPE").ok();
        let reps = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
        for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
            if only.as_deref().is_some_and(|t| t != ty.name()) {
                continue;
            }
            let kk = if ty.block_elems() == 32 { k } else { env("K", 1536).next_multiple_of(256) };
            let w = crate::check::weight(ty, n, kk, 3);
            let bits = if std::env::var("BITS").as_deref() == Ok("8") { crate::cpu_int::ActBits::Int8 } else { Default::default() };
            let acts = IntActs::quantize_to(&crate::check::values(m * kk, 4), kk, bits);
            for kernel in lanes::kernels() {
                let best = (0..reps)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(matmul_on(kernel, ty, &w, Layout::File, n, &acts));
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                eprintln!("{:>5} {kernel:?}: {:.1} MAC/ns", ty.name(), (m * n * kk) as f64 / best / 1e9);
            }
        }
    }
}
