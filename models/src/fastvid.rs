//! FastVID (Shen et al., NeurIPS 2025): dynamic density pruning of a video's tokens.
//!
//! As the authors' LLaVA-Video code computes it (`modeling_qwen2.py`, their "straightforward
//! implementation"), on the decoder's input embeddings of the video:
//! 1. Dynamic temporal segmentation (DySeg): the cosine similarity of adjacent frames'
//!    global features; the video is cut after the `c - 1` least similar pairs and after
//!    every pair below `tau`.
//! 2. Per segment of `L` frames, `r` tokens a frame are kept (`L * r` in all):
//!    `int(0.4 * L * r)` context tokens and the rest salient ones.
//!    - Salient: each frame's top tokens by the vision tower's attention, the salient
//!      count spread evenly over the segment's frames (the first frames take the remainder).
//!    - Context: the context count spread evenly over anchor frames, every `p`-th frame of
//!      the segment, the list then reversed. In an anchor frame, density peaks among the
//!      tokens not salient (DPC-kNN: `density = exp(-mean of the squared distances to the
//!      4 nearest)`, `delta` = distance to the nearest denser token, or the largest
//!      distance; score `delta * density`), `cdist / sqrt(d)` between raw tokens.
//!    - Density temporal merging (DTM): every segment token neither salient nor one of
//!      this anchor's peaks goes to its most cosine-similar peak; a peak becomes
//!      `w * peak + (1 - w) * mean(its members)`, `w = max(1 / (members + 1), beta)`.
//! 3. The kept tokens keep their RoPE positions: the survivors' indices in the prompt
//!    become their `position_ids`, and what follows the video continues after the
//!    unreduced video (the prompt's length). Here: [`crate::merge::KeptAt`].
//!
//! The authors' defaults for LLaVA-Video: `c = 8`, `tau = 0.9`, context share `d = 0.4`,
//! `p = 4`, `beta = 0.6`, retention 10%.
//!
//! Where this differs, and why:
//! - The retention ratio is the budget: `r = budget / frames` tokens a frame (the
//!   authors' `int(tokens_per_frame * ratio)` with `ratio = budget / tokens`).
//! - Salience comes from the vision tower, as the authors' Qwen2.5-VL code takes it: in
//!   the feature block (the last block whose output the features are), each frame's mean
//!   query attends to the block's keys, averaged over the tokens the connector merges into
//!   one, head by head, and the heads' weights are averaged ([`tower_salience`]). Their
//!   LLaVA-Video code uses SigLIP's attention-pooling head instead, which none of vidllm's
//!   towers has. Each architecture pools the block's queries and keys as it pools its
//!   features ([`crate::video_model::Architecture::video_probed`]): Video-LLaVA not at all
//!   (the class token is a video token), LLaVA-NeXT-Video 2-D and PLLaVA 3-D average
//!   pooling, SmolVLM2 the mean of each block its pixel shuffle folds.
//!   MERV mixes its four encoders' saliences by the fusion's weights, as it mixes their
//!   tokens. A live window's frames keep their salience (PLLaVA: their probe) from their
//!   arrival ([`crate::video_model::FrameShare`]), so a question asking for FastVID finds
//!   the same salience without encoding a frame again.
//! - Where no tower gives one (a feature layer that is the embeddings, before any block),
//!   the salience is that of the frame's mean projected token over its tokens,
//!   `softmax(mean . x_i / sqrt(d))`.
//! - A frame's global feature is the mean of its projected tokens (as their Qwen2.5-VL
//!   code does).
//! - Where the counts would ask for more tokens than an anchor frame has (budgets above
//!   about 45%), the context count is capped at half a frame and the salient count at
//!   what remains, as their Qwen2.5-VL code caps them: fewer tokens than the budget are
//!   kept. Fewer than `c` frames cut after every pair at most. Prefix tokens (CLIP's class
//!   token in Video-LLaVA) are tokens of their frame like any other.
//! - The density's `1e-6` random jitter (a tie-breaker) is left out: ties go to the lower
//!   index.
//!
//! On the device: the frames' global similarities, the salience and the distance
//! matrices, then the peaks' assignments and the merge as one product. On the host: the
//! selection, which is small (`frames x tokens_per_frame^2` values) and branchy.

use burn::tensor::{Int, Tensor, TensorData};

use crate::clip::AttentionProbe;
use crate::token_budget::{FrameGrid, Kept, top_k};

/// DySeg: cut after at least this many segments' worth of least similar pairs (`c`).
pub const SEGMENTS: usize = 8;
/// DySeg: cut after every pair of frames less similar than this (`tau`).
pub const CUT_SIMILARITY: f32 = 0.9;
/// Share of a segment's kept tokens that are density-peak (context) tokens (`d`).
pub const CONTEXT_SHARE: f64 = 0.4;
/// Every this many frames of a segment is an anchor frame for context tokens (`p`).
pub const ANCHOR_EVERY: usize = 4;
/// DTM: a peak keeps at least this weight of itself (`beta`).
pub const MERGE_FLOOR: f32 = 0.6;
/// DPC-kNN: neighbours in the density.
pub const DENSITY_NEIGHBOURS: usize = 4;

/// What FastVID keeps of a video: video token indices, ascending, and for each context
/// token the tokens merged into it.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Salient tokens, kept as they are.
    pub salient: Vec<usize>,
    /// Anchors: each its density peaks and the tokens that may merge into them.
    pub anchors: Vec<Anchor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Anchor {
    /// The peaks (video token indices, ascending).
    pub peaks: Vec<usize>,
    /// Tokens of the segment that are neither salient nor these peaks, ascending.
    pub members: Vec<usize>,
}

/// Tokens kept a frame under `budget`.
pub fn per_frame(g: &FrameGrid, budget: usize) -> Result<usize, String> {
    let r = (budget / g.frames.max(1)).min(g.tokens_per_frame());
    if r == 0 {
        return Err(format!(
            "a budget of {budget} visual tokens is too small for fastvid on {} frames: it keeps at least one token a frame",
            g.frames
        ));
    }
    Ok(r)
}

/// FastVID's salience from the vision tower, as the authors' Qwen2.5-VL code takes it in
/// the last vision block: each frame's mean query attends to its keys, pooled as the
/// connector pools the tokens, head by head; the heads' weights are then averaged. A
/// frame's salience is a distribution over its tokens.
///
/// The probe's tokens are already pooled as the features are (a frame here is a frame of
/// the [`FrameGrid`]); the mean query is the mean of the pooled queries, which is the
/// mean of the frame's queries wherever the pooling windows tile the grid (every shipped
/// configuration).
///
/// # Shapes
/// - probe q, k: `[frames, n, d]` -> `[frames * n]`
pub fn tower_salience(probe: AttentionProbe) -> Tensor<1> {
    let AttentionProbe { q, k, heads } = probe;
    let [t, n, d] = k.dims();
    let dh = d / heads;
    let mean = q.mean_dim(1).reshape([t, heads, 1, dh]);
    let k = k.reshape([t, n, heads, dh]).swap_dims(1, 2); // [t, heads, n, dh]
    let weights = burn::tensor::activation::softmax(mean.matmul(k.swap_dims(2, 3)) / (dh as f32).sqrt(), 3); // [t, heads, 1, n]
    weights.mean_dim(1).reshape([t * n])
}

/// The device's part before the selection, as one vector to read back: the adjacent
/// frames' global cosine similarities `[frames - 1]`, the salience `[frames, n]` and each
/// frame's token distances `cdist / sqrt(d)` `[frames, n, n]`, `n = g.tokens_per_frame()`.
/// The salience is the tower's ([`tower_salience`]) where the architecture gave it, else
/// that of the frame's mean token over its tokens.
///
/// # Shapes
/// - features: `[g.tokens(), d]`, salience `[g.tokens()]` -> `[(frames - 1) + frames * n + frames * n * n]`
pub fn statistics(features: Tensor<2>, salience: Option<Tensor<1>>, g: FrameGrid) -> Tensor<1> {
    let [_, d] = features.dims();
    let (t, n) = (g.frames, g.tokens_per_frame());
    let x = features.reshape([t, n, d]);
    let mean = x.clone().mean_dim(1); // [t, 1, d]
    let scale = (d as f32).sqrt();
    let salience = match salience {
        Some(s) => s,
        None => burn::tensor::activation::softmax(mean.clone().matmul(x.clone().swap_dims(1, 2)) / scale, 2).reshape([t * n]), // [t, 1, n]
    };
    let sq = x.clone().powi_scalar(2).sum_dim(2); // [t, n, 1]
    let dist = (sq.clone() + sq.swap_dims(1, 2) - x.clone().matmul(x.swap_dims(1, 2)) * 2.0).clamp_min(0.0).sqrt() / scale;
    let mean = mean.reshape([t, d]);
    let unit = mean.clone() / mean.powi_scalar(2).sum_dim(1).sqrt();
    let mut parts = Vec::new();
    if t > 1 {
        parts.push((unit.clone().narrow(0, 0, t - 1) * unit.narrow(0, 1, t - 1)).sum_dim(1).reshape([t - 1]));
    }
    parts.push(salience);
    parts.push(dist.reshape([t * n * n]));
    Tensor::cat(parts, 0)
}

/// The segments of [`statistics`]' similarities: their lengths in frames, in order.
pub fn segments(similarity: &[f32], frames: usize) -> Vec<usize> {
    if frames <= 1 {
        return vec![frames];
    }
    // torch.topk(similarity, c - 1, largest=False): the least similar pairs.
    let mut order: Vec<usize> = (0..similarity.len()).collect();
    order.sort_by(|&a, &b| similarity[a].total_cmp(&similarity[b]).then(a.cmp(&b)));
    let mut cuts: Vec<usize> = order.into_iter().take((SEGMENTS - 1).min(frames - 1)).collect();
    cuts.extend((0..similarity.len()).filter(|&i| similarity[i] < CUT_SIMILARITY));
    cuts.sort_unstable();
    cuts.dedup();
    let mut sizes = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for c in cuts {
        sizes.push(c + 1 - start);
        start = c + 1;
    }
    sizes.push(frames - start);
    sizes
}

/// `n` split over `parts`, the first ones taking the remainder.
fn spread(n: usize, parts: usize) -> Vec<usize> {
    (0..parts).map(|i| n / parts + usize::from(i < n % parts)).collect()
}

/// Density peaks among `remaining` tokens of one frame (`dist`: its `[n, n]` distances):
/// the `k` with the highest `delta * density`, ascending.
fn density_peaks(dist: &[f32], n: usize, remaining: &[usize], k: usize) -> Vec<usize> {
    let m = remaining.len();
    let at = |a: usize, b: usize| if a == b { 0.0 } else { dist[remaining[a] * n + remaining[b]] };
    let neighbours = DENSITY_NEIGHBOURS.min(m);
    let density: Vec<f32> = (0..m)
        .map(|a| {
            let mut row: Vec<f32> = (0..m).map(|b| at(a, b)).collect();
            row.sort_by(f32::total_cmp);
            (-(row[..neighbours].iter().map(|v| v * v).sum::<f32>() / neighbours as f32)).exp()
        })
        .collect();
    let most = (0..m).flat_map(|a| (0..m).map(move |b| (a, b))).map(|(a, b)| at(a, b)).fold(f32::MIN, f32::max);
    let score: Vec<f32> = (0..m)
        .map(|a| {
            let delta = (0..m).map(|b| if density[b] > density[a] { at(a, b) } else { most }).fold(f32::MAX, f32::min);
            delta * density[a]
        })
        .collect();
    let mut peaks: Vec<usize> = top_k(&score, k).into_iter().map(|i| remaining[i]).collect();
    peaks.sort_unstable();
    peaks
}

/// FastVID's selection from [`statistics`] read back.
pub fn select(stats: &[f32], g: FrameGrid, budget: usize) -> Result<Selection, String> {
    let (t, n) = (g.frames, g.tokens_per_frame());
    let r = per_frame(&g, budget)?;
    let pairs = t.saturating_sub(1);
    if stats.len() != pairs + t * n + t * n * n {
        return Err(format!("{} FastVID statistics for {t} frames of {n} tokens", stats.len()));
    }
    let (similarity, rest) = stats.split_at(pairs);
    let (salience, dist) = rest.split_at(t * n);
    let mut sel = Selection { salient: Vec::new(), anchors: Vec::new() };
    let mut f0 = 0;
    for len in segments(similarity, t) {
        let retain = r * len;
        let context = retain * 2 / 5; // int(retain * 0.4): 0.4 rounds up in binary, so no float below an integer
        let salient_total = retain - context;
        let (mut salient_n, mut context_n) = if len == 1 {
            (vec![salient_total], vec![context])
        } else {
            let anchors = len.div_ceil(ANCHOR_EVERY);
            let mut per_anchor = spread(context, anchors).into_iter();
            let mut ctx: Vec<usize> = (0..len).map(|i| if i % ANCHOR_EVERY == 0 { per_anchor.next().unwrap_or(0) } else { 0 }).collect();
            ctx.reverse();
            (spread(salient_total, len), ctx)
        };
        // Caps where a frame has too few tokens (as the authors' Qwen2.5-VL code).
        for i in 0..len {
            context_n[i] = context_n[i].min(n / 2);
            salient_n[i] = salient_n[i].min(n - context_n[i]);
        }
        let mut seg_salient = Vec::new();
        let mut seg_peaks = Vec::new();
        for i in 0..len {
            let f = f0 + i;
            let top_tokens = top_k(&salience[f * n..(f + 1) * n], salient_n[i]);
            if context_n[i] > 0 {
                let remaining: Vec<usize> = (0..n).filter(|j| !top_tokens.contains(j)).collect();
                let peaks = density_peaks(&dist[f * n * n..(f + 1) * n * n], n, &remaining, context_n[i]);
                seg_peaks.push(peaks.into_iter().map(|j| f * n + j).collect::<Vec<_>>());
            }
            seg_salient.extend(top_tokens.into_iter().map(|j| f * n + j));
        }
        for peaks in seg_peaks {
            let members = (f0 * n..(f0 + len) * n).filter(|j| !seg_salient.contains(j) && !peaks.contains(j)).collect();
            sel.anchors.push(Anchor { peaks, members });
        }
        sel.salient.extend(seg_salient);
        f0 += len;
    }
    sel.salient.sort_unstable();
    Ok(sel)
}

fn ids(v: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(v.iter().map(|&i| i as i64).collect::<Vec<_>>(), [v.len()]), device)
}

/// Each member's most cosine-similar peak (an index into its anchor's peaks), every
/// anchor's members in turn; `None` when no anchor has members.
///
/// # Shapes
/// - features: `[tokens, d]` -> `[sum of members]`
pub fn assignments(features: Tensor<2>, sel: &Selection) -> Option<Tensor<1, Int>> {
    let device = features.device();
    let unit = features.clone() / features.powi_scalar(2).sum_dim(1).sqrt();
    let parts: Vec<Tensor<1, Int>> = sel
        .anchors
        .iter()
        .filter(|a| !a.members.is_empty() && !a.peaks.is_empty())
        .map(|a| {
            let members = unit.clone().select(0, ids(&a.members, &device));
            let peaks = unit.clone().select(0, ids(&a.peaks, &device));
            let m = a.members.len();
            members.matmul(peaks.transpose()).argmax(1).reshape([m])
        })
        .collect();
    (!parts.is_empty()).then(|| Tensor::cat(parts, 0))
}

/// The kept tokens, in video order: salient ones as they are, peaks merged with their
/// members (`assigned`: [`assignments`] read back).
///
/// # Shapes
/// - features: `[g.tokens(), d]` -> kept `[salient + peaks, d]`
pub fn merge(features: Tensor<2>, g: FrameGrid, sel: &Selection, assigned: &[i64]) -> Result<Kept, String> {
    let device = features.device();
    let tokens = g.tokens();
    let peaks: usize = sel.anchors.iter().map(|a| a.peaks.len()).sum();
    // One row per peak over every token: `w` at the peak, `(1 - w) / members` at each member.
    let mut weights = vec![0f32; peaks * tokens];
    let mut peak_rows = Vec::with_capacity(peaks);
    let mut next = assigned.iter();
    for a in &sel.anchors {
        let mut of = vec![Vec::new(); a.peaks.len()];
        if !a.peaks.is_empty() {
            for &member in &a.members {
                let j = *next.next().ok_or("fewer assignments than members")? as usize;
                of.get_mut(j).ok_or("an assignment past the peaks")?.push(member);
            }
        }
        for (p, members) in a.peaks.iter().zip(of) {
            let row = peak_rows.len();
            let w = (1.0 / (members.len() as f32 + 1.0)).max(MERGE_FLOOR);
            weights[row * tokens + p] = w;
            if !members.is_empty() {
                let share = (1.0 - w) / members.len() as f32;
                for m in members {
                    weights[row * tokens + m] += share;
                }
            }
            peak_rows.push(*p);
        }
    }
    if next.next().is_some() {
        return Err("more assignments than members".into());
    }
    let salient = features.clone().select(0, ids(&sel.salient, &device));
    let merged = Tensor::<2>::from_data(TensorData::new(weights, [peaks, tokens]), &device).matmul(features);
    // Video order: rows of salient ++ peaks, sorted by token index.
    let mut rows: Vec<(usize, usize)> = sel.salient.iter().chain(&peak_rows).copied().enumerate().map(|(r, i)| (i, r)).collect();
    rows.sort_unstable();
    let order: Vec<usize> = rows.iter().map(|&(_, r)| r).collect();
    let features = Tensor::cat(vec![salient, merged], 0).select(0, ids(&order, &device));
    let per = g.tokens_per_frame();
    Ok(Kept {
        features,
        frame_of: rows.iter().map(|&(i, _)| i / per).collect(),
        position_in_video: Some(rows.iter().map(|&(i, _)| i).collect()),
    })
}

fn floats(data: TensorData) -> Result<Vec<f32>, String> {
    data.convert::<f32>().try_into_vec::<f32>().map_err(|e| format!("FastVID statistics: {e:?}"))
}

fn ints(data: TensorData) -> Result<Vec<i64>, String> {
    data.convert::<i64>().try_into_vec::<i64>().map_err(|e| format!("FastVID assignments: {e:?}"))
}

/// FastVID under `budget` tokens.
///
/// # Shapes
/// - features: `[g.tokens(), d]`, salience `[g.tokens()]` -> kept `[at most budget, d]`
pub fn reduce(features: Tensor<2>, salience: Option<Tensor<1>>, g: FrameGrid, budget: usize) -> Result<Kept, String> {
    per_frame(&g, budget)?;
    let stats = floats(statistics(features.clone(), salience, g).into_data())?;
    let sel = select(&stats, g, budget)?;
    let assigned = match assignments(features.clone(), &sel) {
        Some(a) => ints(a.into_data())?,
        None => Vec::new(),
    };
    merge(features, g, &sel, &assigned)
}

/// [`reduce`], reading back without blocking (WebGPU in a browser).
pub async fn reduce_async(features: Tensor<2>, salience: Option<Tensor<1>>, g: FrameGrid, budget: usize) -> Result<Kept, String> {
    per_frame(&g, budget)?;
    let stats = floats(statistics(features.clone(), salience, g).into_data_async().await.map_err(|e| format!("{e:?}"))?)?;
    let sel = select(&stats, g, budget)?;
    let assigned = match assignments(features.clone(), &sel) {
        Some(a) => ints(a.into_data_async().await.map_err(|e| format!("{e:?}"))?)?,
        None => Vec::new(),
    };
    merge(features, g, &sel, &assigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cut_after_the_least_similar_pairs() {
        // 10 frames, every pair above tau: with c = 8, the 7 least similar pairs are cut
        // (all but pairs 4 and 7).
        let sim = [0.99, 0.98, 0.91, 0.97, 0.995, 0.96, 0.92, 0.999, 0.993];
        assert_eq!(segments(&sim, 10), vec![1, 1, 1, 1, 2, 1, 2, 1]);
        // Three frames: at most two cuts; a pair under tau is always cut.
        assert_eq!(segments(&[0.95, 0.5], 3), vec![1, 1, 1]);
        assert_eq!(segments(&[], 1), vec![1]);
    }

    #[test]
    fn counts_spread_as_the_authors_do() {
        assert_eq!(spread(7, 3), vec![3, 2, 2]);
        assert_eq!(top_k(&[0.1f32, 0.5, 0.5, 0.2], 2), vec![1, 2]);
    }
}
