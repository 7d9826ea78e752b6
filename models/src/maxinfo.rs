//! MaxInfo (Li et al., 2025): key frames by maximum volume. The frames whose embeddings
//! span the most volume carry the most information; a rectangular maxvol over the top
//! singular vectors of the frame embeddings picks them, training-free.
//!
//! As the authors' code does it (their notebooks, and maxvolpy's `py_rect_maxvol`):
//! 1. One embedding per candidate frame, stacked in time order `E [n, d]`.
//! 2. `U[:, :r]` of `E = U S V^T`, r = 8 (not scaled by S).
//! 3. Square maxvol start: LU with partial pivoting picks r rows; then up to 10 swaps
//!    while some `|C_ij| > 1.05`, `C = A A[rows]^-1`.
//! 4. Rectangular growth: add the row with the largest `||C_i||^2` while it exceeds
//!    `tol^2` (tol 0.1, their LLaVA-Video setting), with the rank-1 update of C.
//! 5. The rows sorted back into time order; an odd count loses its last frame.
//! 6. Their "slow" variant's cap: more than `cap` frames are thinned uniformly,
//!    `torch.linspace(0, k - 1, cap).long()`.
//!
//! Where this differs, and why: the authors embed frames with a separate CLIP model; here a
//! frame's embedding is the mean of its own visual tokens after the projector, so no
//! second model is loaded. The cap is the frames the user asked for, and what the budget
//! holds (whole frames). Candidates: the front ends decode and encode [`OVERSAMPLE`] times
//! the frames asked for (their LLaVA-Video "slow" setting: 128 candidates, at most 64).
//! The linear algebra is small (`n x n`) and runs on the CPU in f64: the frame embeddings
//! are read back, the kept frames' tokens selected on the device.

use burn::tensor::{Int, Tensor, TensorData};

use crate::slowfast::linspace_f32;
use crate::token_budget::{FrameGrid, Kept};

/// Candidate frames per frame wanted.
pub const OVERSAMPLE: usize = 2;
/// Singular vectors kept (`r`).
pub const RANK: usize = 8;
/// Rectangular maxvol's tolerance on `||C_i||`.
pub const TOL: f64 = 0.1;
/// Square maxvol start: swap while some `|C_ij|` exceeds this, at most `START_ITERS` times.
pub const START_TOL: f64 = 1.05;
pub const START_ITERS: usize = 10;

/// One embedding per frame: the mean of its tokens.
///
/// # Shapes
/// - features: `[g.tokens(), d]` -> `[g.frames, d]`
pub fn frame_embeddings(features: Tensor<2>, g: FrameGrid) -> Tensor<2> {
    let [_, d] = features.dims();
    features.reshape([g.frames, g.tokens_per_frame(), d]).mean_dim(1).reshape([g.frames, d])
}

/// Key frames of a video's tokens under `budget` tokens and at most `frames` frames.
/// `embeddings`: [`frame_embeddings`] already read back (the browser reads it
/// asynchronously); `None` reads it here.
///
/// # Shapes
/// - features: `[g.tokens(), d]` -> kept `[frames kept * g.tokens_per_frame(), d]`
pub fn reduce(features: Tensor<2>, g: FrameGrid, budget: usize, frames: usize, embeddings: Option<Vec<f32>>) -> Result<Kept, String> {
    let per = g.tokens_per_frame();
    let cap = frames.min(budget / per);
    if cap == 0 {
        return Err(format!("a budget of {budget} visual tokens is too small for maxinfo: it keeps whole frames of {per} tokens"));
    }
    let device = features.device();
    let [_, d] = features.dims();
    let emb = match embeddings {
        Some(e) => e,
        None => frame_embeddings(features.clone(), g)
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| format!("frame embeddings: {e:?}"))?,
    };
    if emb.len() != g.frames * d {
        return Err(format!("{} frame embedding values for {} frames of {d}", emb.len(), g.frames));
    }
    let emb: Vec<f64> = emb.iter().map(|&v| v as f64).collect();
    let kept = key_frames(&emb, g.frames, d, cap);
    let idx = Tensor::<1, Int>::from_data(TensorData::new(kept.iter().map(|&i| i as i64).collect::<Vec<_>>(), [kept.len()]), &device);
    let features = features.reshape([g.frames, per, d]).select(0, idx).reshape([kept.len() * per, d]);
    Ok(Kept { features, frame_of: kept.iter().flat_map(|&f| std::iter::repeat_n(f, per)).collect(), position_in_video: None })
}

/// The frames MaxInfo keeps of `n` embeddings `emb [n, d]` (row-major), at most `cap`, in
/// time order.
pub fn key_frames(emb: &[f64], n: usize, d: usize, cap: usize) -> Vec<usize> {
    let r = RANK.min(n).min(d);
    let u = left_singular_vectors(emb, n, d, r);
    let mut chosen = rect_maxvol(&u, n, r, TOL);
    chosen.sort_unstable();
    if chosen.len() > 1 && chosen.len() % 2 == 1 {
        chosen.pop();
    }
    if chosen.len() > cap {
        let k = chosen.len();
        chosen = linspace_f32(0.0, (k - 1) as f32, cap).iter().map(|&v| chosen[v as usize]).collect();
    }
    chosen
}

/// The first `r` left singular vectors of `a [n, d]` as `[n, r]` row-major: the leading
/// eigenvectors of `a a^T` (cyclic Jacobi), each column's sign free as in any SVD.
pub fn left_singular_vectors(a: &[f64], n: usize, d: usize, r: usize) -> Vec<f64> {
    let mut g = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum();
            g[i * n + j] = s;
            g[j * n + i] = s;
        }
    }
    let (values, vectors) = symmetric_eigen(g, n);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| values[y].total_cmp(&values[x]));
    let mut u = vec![0f64; n * r];
    for (c, &e) in order.iter().take(r).enumerate() {
        for i in 0..n {
            u[i * r + c] = vectors[i * n + e];
        }
    }
    u
}

/// Eigenvalues and eigenvectors (columns of `[n, n]`, row-major) of a symmetric matrix, by
/// cyclic Jacobi rotations until the off-diagonal part is negligible.
fn symmetric_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i * n + j].powi(2)).sum();
        if off.sqrt() <= 1e-15 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// maxvolpy's `py_rect_maxvol(A, tol)` with its defaults (`maxK = n`, `minK = r`, a square
/// maxvol start of 10 swaps at 1.05): the rows picked, start rows first.
///
/// # Shapes
/// - a: `[n, r]` row-major, `r <= n`
pub fn rect_maxvol(a: &[f64], n: usize, r: usize, tol: f64) -> Vec<usize> {
    if n <= r {
        return (0..n).collect();
    }
    let (start, mut c) = square_maxvol(a, n, r);
    // C [n, k] grows a column per added row.
    let mut k = r;
    let mut chosen = vec![true; n];
    let mut index = start.clone();
    for &i in &start {
        chosen[i] = false;
    }
    let mut norms: Vec<f64> = (0..n).map(|i| if chosen[i] { c[i].iter().map(|x| x * x).sum() } else { 0.0 }).collect();
    let argmax = |v: &[f64]| v.iter().enumerate().fold(0, |best, (i, x)| if *x > v[best] { i } else { best });
    let mut i = argmax(&norms);
    while (norms[i] > tol * tol && k < n) || k < r {
        index.push(i);
        chosen[i] = false;
        let ci = c[i].clone();
        let v: Vec<f64> = c.iter().map(|row| row.iter().zip(&ci).map(|(x, y)| x * y).sum()).collect();
        let l = 1.0 / (1.0 + v[i]);
        for (row, vj) in c.iter_mut().zip(&v) {
            for (x, cij) in row.iter_mut().zip(&ci) {
                *x -= l * vj * cij;
            }
            row.push(l * vj);
        }
        for j in 0..n {
            norms[j] = if chosen[j] { norms[j] - l * v[j] * v[j] } else { 0.0 };
        }
        i = argmax(&norms);
        k += 1;
    }
    index
}

/// maxvolpy's `py_maxvol(A, tol=1.05, max_iters=10)`: rows from LU with partial pivoting,
/// then swaps of the largest `|C_ij|`. Returns the rows and `C = A A[rows]^-1` as rows.
fn square_maxvol(a: &[f64], n: usize, r: usize) -> (Vec<usize>, Vec<Vec<f64>>) {
    // getrf: partial pivoting on a copy, the swaps applied to the row numbers.
    let mut lu = a.to_vec();
    let mut index: Vec<usize> = (0..n).collect();
    for col in 0..r {
        let p = (col..n).fold(col, |best, i| if lu[i * r + col].abs() > lu[best * r + col].abs() { i } else { best });
        if p != col {
            for j in 0..r {
                lu.swap(col * r + j, p * r + j);
            }
            index.swap(col, p);
        }
        let pivot = lu[col * r + col];
        if pivot == 0.0 {
            continue;
        }
        for i in col + 1..n {
            let f = lu[i * r + col] / pivot;
            lu[i * r + col] = f;
            for j in col + 1..r {
                lu[i * r + j] -= f * lu[col * r + j];
            }
        }
    }
    let mut rows: Vec<usize> = index[..r].to_vec();
    // C = A B^-1, B = A[rows]: solve B^T X = A^T, so C's rows are A's rows times B^-1.
    let c_of = |rows: &[usize]| -> Vec<Vec<f64>> {
        let b: Vec<f64> = rows.iter().flat_map(|&i| a[i * r..(i + 1) * r].to_vec()).collect();
        let inv = invert(&b, r);
        (0..n).map(|i| (0..r).map(|j| (0..r).map(|k| a[i * r + k] * inv[k * r + j]).sum()).collect()).collect()
    };
    let mut c = c_of(&rows);
    // Ct [r, n]: argmax over |Ct| in row-major order, i.e. slot first, then row.
    for _ in 0..START_ITERS {
        let (mut bi, mut bj, mut best) = (0, 0, -1.0);
        for slot in 0..r {
            for (j, row) in c.iter().enumerate() {
                if row[slot].abs() > best {
                    (bi, bj, best) = (slot, j, row[slot].abs());
                }
            }
        }
        if best <= START_TOL {
            break;
        }
        // Ct -= (1 / Ct[i, j]) outer(Ct[:, j] - e_i, Ct[i, :]).
        rows[bi] = bj;
        let pivot = c[bj][bi];
        let row_i: Vec<f64> = c.iter().map(|row| row[bi]).collect(); // Ct[i, :]
        let mut col_j = c[bj].clone(); // Ct[:, j]
        col_j[bi] -= 1.0;
        for (m, row) in c.iter_mut().enumerate() {
            for (slot, x) in row.iter_mut().enumerate() {
                *x -= col_j[slot] * row_i[m] / pivot;
            }
        }
    }
    (rows, c)
}

/// The inverse of an `r x r` matrix (Gauss-Jordan with partial pivoting).
fn invert(b: &[f64], r: usize) -> Vec<f64> {
    let mut m = b.to_vec();
    let mut inv = vec![0f64; r * r];
    for i in 0..r {
        inv[i * r + i] = 1.0;
    }
    for col in 0..r {
        let p = (col..r).fold(col, |best, i| if m[i * r + col].abs() > m[best * r + col].abs() { i } else { best });
        for j in 0..r {
            m.swap(col * r + j, p * r + j);
            inv.swap(col * r + j, p * r + j);
        }
        let d = m[col * r + col];
        if d == 0.0 {
            continue;
        }
        for j in 0..r {
            m[col * r + j] /= d;
            inv[col * r + j] /= d;
        }
        for i in 0..r {
            if i != col {
                let f = m[i * r + col];
                for j in 0..r {
                    m[i * r + j] -= f * m[col * r + j];
                    inv[i * r + j] -= f * inv[col * r + j];
                }
            }
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singular_vectors_span_the_rows() {
        // Rank-2 rows: the two leading left singular vectors reconstruct them.
        let (n, d) = (5, 3);
        let a: Vec<f64> = (0..n).flat_map(|i| [1.0 + i as f64, 2.0 * i as f64, -(i as f64)]).collect();
        let u = left_singular_vectors(&a, n, d, 2);
        for c in 0..2 {
            let norm: f64 = (0..n).map(|i| u[i * 2 + c].powi(2)).sum();
            assert!((norm - 1.0).abs() < 1e-12);
        }
        // Project a's columns on span(u): nothing is left.
        for k in 0..d {
            let col: Vec<f64> = (0..n).map(|i| a[i * d + k]).collect();
            let mut rest = col.clone();
            for c in 0..2 {
                let dot: f64 = (0..n).map(|i| u[i * 2 + c] * col[i]).sum();
                (0..n).for_each(|i| rest[i] -= dot * u[i * 2 + c]);
            }
            assert!(rest.iter().all(|x| x.abs() < 1e-9), "{rest:?}");
        }
    }

    #[test]
    fn maxvol_leaves_out_frames_that_add_no_volume() {
        // Eight independent frames and four faint ones (coefficients of 0.01 < tol on the
        // others' basis): the faint ones add no volume worth a frame.
        let (n, d) = (12, 8);
        let emb: Vec<f64> = (0..n)
            .flat_map(|i| {
                (0..d).map(
                    move |k| if i < 8 { if k == i { 1.0 } else { 0.05 * ((i + k) % 3) as f64 } } else { 0.01 * (k == i - 8) as u8 as f64 },
                )
            })
            .collect();
        assert_eq!(key_frames(&emb, n, d, n), (0..8).collect::<Vec<_>>());
        // Capped at 3: 0, 3 and 7 of the 8, spread as torch.linspace(0, 7, 3).long() does.
        assert_eq!(key_frames(&emb, n, d, 3), vec![0, 3, 7]);
    }
}
