//! FrameFusion (Fu et al., ICCV 2025, "Combining Similarity and Importance for Video
//! Token Reduction on Large Vision Language Models"): a video's tokens merged by their
//! similarity across frames, then pruned by their importance, inside the decoder.
//!
//! As the authors' code computes it (thu-nics/FrameFusion, `framefusion/main.py` and the
//! Qwen2 decoder-layer hooks), during the prefill only:
//! 1. **Merging.** Before layer 0's attention, then after each layer's attention (the
//!    residual added, before the MLP), each visual token is compared with the token at
//!    the same place in the previous frame that is still there (its "patch": the token's
//!    index within its frame). Where their cosine similarity is at least `S = 0.6`, the
//!    token merges into that previous one: a run of such tokens along a patch becomes the
//!    mean of the run and the token before it, filed at that earlier token's row.
//!    - The step's sparsity is the share of the visual tokens that merged. Below the
//!      cost model's bound (step 3) it is recorded; below `0.1` merging ends.
//!    - At or above the bound, only the bound's share of the most similar tokens merge,
//!      and the reduction ends: no pruning follows.
//! 2. **Pruning.** In the layer after merging ended, the attention of the prompt's last
//!    row, averaged over heads, ranks the visual tokens; the cost model's share of the
//!    least attended is dropped after that layer's attention.
//! 3. **Cost model.** The budget is the visual tokens a layer processes on average,
//!    `cost = budget / tokens`. After steps with sparsities `s_1..s_k`, the layers left
//!    (`L - k`) must keep `1 - (L cost - sum_i prod_{j<=i} (1 - s_j)) / ((L - k) prod (1 - s_j))`
//!    of their tokens (none dropped where that exceeds all of them).
//!
//! Tokens merged or pruned after layer `k`'s attention stay in the KV cache of layers
//! `..=k` ([`crate::kv_cache::KvCache::advance_dropping`]); every kept token keeps its
//! RoPE position, and the answer continues after the unreduced prompt.
//!
//! Where this differs, and why:
//! - The cost model's layer count is the decoder's (the authors' default, 28, is their
//!   7B models' depth). Past the last layer nothing is left to prune.
//! - The authors' visual tokens are one contiguous run; here a video may have one run a
//!   frame (SmolVLM2), with text between. Only visual tokens are merged or pruned, and a
//!   token's patch is its index within its frame's tokens, class tokens included.
//! - Everything runs in f32 (the authors' models run in bf16).
//!
//! On the device: the similarities, the merge (one scatter-add), the attention row. On
//! the host: which tokens merge and which survive (a read-back of one value a token,
//! between layers, so a WebGPU page, which cannot wait for the device, does not run it).

use burn::tensor::{IndexingUpdateOp, activation::softmax};
use burn::tensor::{Int, Tensor, TensorData};

use crate::token_budget::top_k;

/// Merge a token into the previous frame's at this cosine similarity or above (`S`,
/// `similarity_lower_bound`).
pub const SIMILARITY_LOWER_BOUND: f64 = 0.6;
/// Merging ends after a step that merged less than this share of the tokens
/// (`ratio_lower_bound`).
pub const RATIO_LOWER_BOUND: f64 = 0.1;

/// A video to be reduced inside the decoder, as its [`crate::merge::Visual`] carries it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// The visual tokens a decoder layer processes on average.
    pub budget: usize,
    /// The video's tokens, unreduced.
    pub tokens: usize,
    /// Tokens of one frame: a token's patch is its index among them.
    pub tokens_per_frame: usize,
}

impl Plan {
    /// The authors' `cost`: the share of the visual tokens a layer processes on average.
    pub fn cost(&self) -> f64 {
        self.budget as f64 / self.tokens as f64
    }
}

/// What FrameFusion did in one prefill.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FusionReport {
    /// Visual tokens each decoder layer attended to.
    pub layer_tokens: Vec<usize>,
    /// The sparsity of each merging step (the share of visual tokens merged).
    pub merged: Vec<f64>,
    /// The layer after whose attention the pruning ran, if it did.
    pub pruned_after_layer: Option<usize>,
    /// Time spent choosing and merging (the read-backs included), not in the layers.
    pub reduce_ms: f64,
    /// The prompt rows each layer attended to (and holds in its cache), ascending.
    #[serde(skip)]
    pub layer_rows: Vec<Vec<usize>>,
}

impl FusionReport {
    /// Visual tokens the last layer attended to (what its cache holds for the answer).
    pub fn tokens_after(&self) -> usize {
        self.layer_tokens.last().copied().unwrap_or(0)
    }
}

/// A step's rows: the new rows (merged values in place) and, where the step dropped any,
/// for each the row it was before the step (`None`: every row, unchanged).
pub type Kept = (Tensor<2>, Option<Vec<usize>>);

/// The method's state through one prefill.
pub struct FrameFusion {
    plan: Plan,
    layers: usize,
    /// Each current row's patch (`None`: text).
    patch: Vec<Option<usize>>,
    sparsity: Vec<f64>,
    finish_merging: bool,
    finish_pruning: bool,
    report: FusionReport,
}

impl FrameFusion {
    /// FrameFusion for a prompt whose rows are `patch` (a visual row's index within its
    /// frame, `None` for text), in a decoder of `layers` layers.
    pub fn new(plan: Plan, patch: Vec<Option<usize>>, layers: usize) -> Self {
        Self { plan, layers, patch, sparsity: Vec::new(), finish_merging: false, finish_pruning: false, report: FusionReport::default() }
    }

    /// Whether the prompt's last row is text (the row whose logits are wanted is never dropped).
    pub fn ends_in_text(&self) -> bool {
        self.patch.last().is_some_and(|p| p.is_none())
    }

    /// Record the prompt rows each layer attended to, once the pass is over.
    pub fn set_layer_rows(&mut self, rows: Vec<Vec<usize>>) {
        self.report.layer_rows = rows;
    }

    pub fn report(&self) -> &FusionReport {
        &self.report
    }

    /// The current rows that are visual tokens, ascending.
    fn visual(&self) -> Vec<usize> {
        (0..self.patch.len()).filter(|&r| self.patch[r].is_some()).collect()
    }

    /// What a step needs read back from the device before it can choose, given the rows
    /// `x` it is to reduce (and, on the pruning layer, the last row's `attention`): the
    /// values of this tensor, or nothing. The choice is then [`FrameFusion::apply`]'s, with
    /// those values: read with `into_data` natively, awaited on WebGPU in a browser.
    ///
    /// `layer` is `None` before layer 0 (a merging step on the input embeddings), else the
    /// layer whose attention just ran.
    ///
    /// # Shapes
    /// - x: `[rows, d]`, attention: `[rows]` -> `[values]`
    pub fn query(&mut self, layer: Option<usize>, x: &Tensor<2>, attention: Option<Tensor<1>>) -> Option<Tensor<1>> {
        let t0 = web_time::Instant::now();
        let need = match layer {
            Some(_) if self.wants_attention() => attention,
            Some(_) if self.finish_merging => None,
            _ => self.similarities(x),
        };
        self.report.reduce_ms += t0.elapsed().as_secs_f64() * 1e3;
        need
    }

    /// The step [`FrameFusion::query`] prepared, with the values it asked for: prune where
    /// merging ended before this layer (the values: the last row's attention over the rows,
    /// averaged over heads), else merge while merging goes on (the values: each visual
    /// token's cosine similarity to the previous one of its patch).
    ///
    /// # Shapes
    /// - x: `[rows, d]`
    pub fn apply(&mut self, layer: Option<usize>, x: Tensor<2>, values: Option<Vec<f32>>) -> Result<Kept, String> {
        let t0 = web_time::Instant::now();
        let kept = match layer {
            None => self.merge(x, values),
            Some(layer) => self.step(layer, x, values),
        };
        self.report.reduce_ms += t0.elapsed().as_secs_f64() * 1e3;
        kept
    }

    /// Whether the next layer's attention is to report its last row's attention: the
    /// layer after merging ended.
    pub fn wants_attention(&self) -> bool {
        self.finish_merging && !self.finish_pruning
    }

    fn step(&mut self, layer: usize, x: Tensor<2>, values: Option<Vec<f32>>) -> Result<Kept, String> {
        self.report.layer_tokens.push(self.visual().len());
        if self.wants_attention() {
            let scores = values.ok_or("FrameFusion: the pruning layer's attention is missing")?;
            self.finish_pruning = true;
            self.report.pruned_after_layer = Some(layer);
            return self.prune(x, &scores);
        }
        if self.finish_merging { Ok((x, None)) } else { self.merge(x, values) }
    }

    /// The visual rows patch by patch, each patch in frame order, and the places in that
    /// order of the tokens that have a previous one in their patch.
    fn merge_order(&self) -> (Vec<usize>, Vec<usize>) {
        let mut order = self.visual();
        order.sort_by_key(|&r| (self.patch[r], r));
        let pairs: Vec<usize> = (1..order.len()).filter(|&j| self.patch[order[j]] == self.patch[order[j - 1]]).collect();
        (order, pairs)
    }

    /// A merging step's similarities: each visual token against the previous one of its
    /// patch, or nothing to read where no token has one.
    fn similarities(&self, x: &Tensor<2>) -> Option<Tensor<1>> {
        let (order, pairs) = self.merge_order();
        if pairs.is_empty() {
            return None;
        }
        let device = x.device();
        let earlier = x.clone().select(0, ids(&pairs.iter().map(|&j| order[j - 1]).collect::<Vec<_>>(), &device));
        let later = x.clone().select(0, ids(&pairs.iter().map(|&j| order[j]).collect::<Vec<_>>(), &device));
        Some(cosine(earlier, later))
    }

    /// One merging step, given [`FrameFusion::similarities`]' values.
    fn merge(&mut self, x: Tensor<2>, sims: Option<Vec<f32>>) -> Result<Kept, String> {
        let (order, pairs) = self.merge_order();
        let n = order.len();
        if n == 0 {
            self.finish_merging = true;
            self.finish_pruning = true;
            return Ok((x, None));
        }
        // -2 where a token has no previous one in its patch (the authors' marker).
        let mut similarity = vec![-2.0f64; n];
        if !pairs.is_empty() {
            let sims = sims.ok_or("FrameFusion: a merging step's similarities are missing")?;
            if sims.len() != pairs.len() {
                return Err(format!("FrameFusion: {} similarities for {} pairs", sims.len(), pairs.len()));
            }
            for (&j, s) in pairs.iter().zip(sims) {
                similarity[j] = s as f64;
            }
        }
        let bound = pruning_ratio(&self.sparsity, self.plan.cost(), self.layers);
        let above: Vec<usize> = (0..n).filter(|&j| similarity[j] >= SIMILARITY_LOWER_BOUND).collect();
        let ratio = above.len() as f64 / n as f64;
        let merging = if ratio < bound {
            self.sparsity.push(ratio);
            self.report.merged.push(ratio);
            if ratio < RATIO_LOWER_BOUND {
                self.finish_merging = true;
            }
            above
        } else {
            // Only the bound's share of the most similar, and the reduction ends here.
            let k = (bound * n as f64) as usize;
            let mut top = top_k(&similarity, k);
            top.sort_unstable();
            self.report.merged.push(k as f64 / n as f64);
            self.finish_merging = true;
            self.finish_pruning = true;
            top
        };
        if merging.is_empty() {
            return Ok((x, None));
        }
        // A run of merging tokens along a patch joins the token before the run.
        let rows = x.dims()[0];
        let mut into: Vec<usize> = (0..rows).collect();
        let mut is_merged = vec![false; n];
        for &j in &merging {
            is_merged[j] = true;
        }
        for j in 0..n {
            if is_merged[j] {
                // j >= 1 and in the same patch as j - 1: a token with no predecessor has
                // similarity -2, under any bound.
                into[order[j]] = into[order[j - 1]];
            }
        }
        Ok(self.keep_merged(x, &into))
    }

    /// The rows that merged into no other, each the mean of itself and those merged into
    /// it (`into[r]`: the row that row `r` ends in).
    fn keep_merged(&mut self, x: Tensor<2>, into: &[usize]) -> (Tensor<2>, Option<Vec<usize>>) {
        let kept: Vec<usize> = (0..into.len()).filter(|&r| into[r] == r).collect();
        let mut slot = vec![usize::MAX; into.len()];
        for (i, &r) in kept.iter().enumerate() {
            slot[r] = i;
        }
        let dest: Vec<usize> = into.iter().map(|&r| slot[r]).collect();
        let mut count = vec![0f32; kept.len()];
        for &d in &dest {
            count[d] += 1.0;
        }
        let [_, d] = x.dims();
        let device = x.device();
        let sums = Tensor::<2>::zeros([kept.len(), d], &device).select_assign(0, ids(&dest, &device), x, IndexingUpdateOp::Add);
        let inverse: Vec<f32> = count.iter().map(|c| 1.0 / c).collect();
        let merged = sums * Tensor::<1>::from_data(TensorData::new(inverse, [kept.len()]), &device).unsqueeze_dim::<2>(1);
        self.patch = kept.iter().map(|&r| self.patch[r]).collect();
        (merged, Some(kept))
    }

    /// Drop the least attended visual tokens: the cost model's share of them.
    fn prune(&mut self, x: Tensor<2>, attention: &[f32]) -> Result<Kept, String> {
        let visual = self.visual();
        if attention.len() != self.patch.len() {
            return Err(format!("FrameFusion: {} attention values for {} rows", attention.len(), self.patch.len()));
        }
        let ratio = pruning_ratio(&self.sparsity, self.plan.cost(), self.layers);
        // Python's round: halves to even.
        let keep = (visual.len() as f64 * (1.0 - ratio)).round_ties_even() as usize;
        if keep >= visual.len() {
            return Ok((x, None));
        }
        let scores: Vec<f64> = visual.iter().map(|&r| attention[r] as f64).collect();
        let mut kept: Vec<usize> = top_k(&scores, keep).into_iter().map(|i| visual[i]).collect();
        kept.extend((0..self.patch.len()).filter(|&r| self.patch[r].is_none()));
        kept.sort_unstable();
        let device = x.device();
        let x = x.select(0, ids(&kept, &device));
        self.patch = kept.iter().map(|&r| self.patch[r]).collect();
        Ok((x, Some(kept)))
    }
}

/// The share of its visual tokens the next layer must drop for the layers to process
/// `cost` of them on average, after merging steps of these sparsities (the authors'
/// `_compute_pruning_ratio`, over the decoder's `layers`).
pub fn pruning_ratio(sparsity: &[f64], cost: f64, layers: usize) -> f64 {
    let (mut kept, mut spent) = (1.0f64, 0.0f64);
    for s in sparsity {
        kept *= 1.0 - s;
        spent += kept;
    }
    let left = layers.saturating_sub(sparsity.len());
    let remaining = layers as f64 * cost - spent;
    if left == 0 || kept <= 0.0 {
        // No layer left to spend on: nothing more to drop.
        return 0.0;
    }
    if remaining < 0.0 {
        // Spent already (merging is bounded so that this does not happen): drop all.
        return 1.0;
    }
    let share = remaining / (left as f64 * kept);
    if share > 1.0 { 0.0 } else { 1.0 - share }
}

/// Cosine similarity of matching rows, `dot / (|a| |b|)` as the authors compute it.
///
/// # Shapes
/// - a, b: `[n, d]` -> `[n]`
fn cosine(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let n = a.dims()[0];
    let dot = (a.clone() * b.clone()).sum_dim(1);
    let norms = (a.clone() * a).sum_dim(1).sqrt() * (b.clone() * b).sum_dim(1).sqrt();
    (dot / norms).reshape([n])
}

/// The last query row's attention over `keys`, averaged over heads: what ranks the
/// tokens for pruning.
///
/// # Shapes
/// - q: `[1, n_heads, 1, d_head]` (rotated), keys: `[1, n_kv_heads, rows, d_head]`
///   (rotated; query heads `j r..(j + 1) r` share key head `j`) -> `[rows]`
pub fn last_row_attention(q: Tensor<4>, keys: Tensor<4>, scale: f64) -> Tensor<1> {
    let [_, h, _, dh] = q.dims();
    let [_, kvh, rows, _] = keys.dims();
    let q = q.reshape([1, kvh, h / kvh, dh]);
    let p = softmax(q.matmul(keys.swap_dims(2, 3)) * scale, 3); // [1, kvh, r, rows]
    p.reshape([h, rows]).mean_dim(0).reshape([rows])
}

fn ids(v: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(v.iter().map(|&i| i as i64).collect::<Vec<_>>(), [v.len()]), device)
}

pub(crate) fn floats(data: TensorData) -> Result<Vec<f32>, String> {
    data.convert::<f32>().try_into_vec::<f32>().map_err(|e| format!("FrameFusion read-back: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authors' cost model, worked by hand: 28 layers at cost 0.3 ask the first
    /// layer to drop 70%; after a step that merged 20%, the 27 layers left must drop
    /// `1 - (8.4 - 0.8) / (27 x 0.8)`.
    #[test]
    fn cost_model_as_the_authors_compute_it() {
        assert!((pruning_ratio(&[], 0.3, 28) - 0.7).abs() < 1e-12);
        let want = 1.0 - (28.0 * 0.3 - 0.8) / (27.0 * 0.8);
        assert!((pruning_ratio(&[0.2], 0.3, 28) - want).abs() < 1e-12);
        // A generous budget drops nothing; no layer left, nothing either.
        assert_eq!(pruning_ratio(&[0.5], 0.9, 2), 0.0);
        assert_eq!(pruning_ratio(&[0.1, 0.1], 0.3, 2), 0.0);
    }

    /// Runs of merging tokens along a patch join the token before the run, as a mean.
    #[test]
    fn runs_merge_into_the_token_before_them() {
        let device = burn::tensor::Device::flex();
        // Two frames of two patches, then text: frame 1's patch 0 is frame 0's, patch 1 is not.
        let rows = [[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, -1.0], [5.0, 5.0]];
        let x = Tensor::<2>::from_data(TensorData::new(rows.concat(), [5, 2]), &device);
        let plan = Plan { budget: 2, tokens: 4, tokens_per_frame: 2 };
        let mut ff = FrameFusion::new(plan, vec![Some(0), Some(1), Some(0), Some(1), None], 2);
        // What the device is asked, then the step with the values read back.
        let sims = ff.query(None, &x, None).map(|t| floats(t.into_data()).unwrap());
        let (merged, kept) = ff.apply(None, x, sims).unwrap();
        assert_eq!(kept, Some(vec![0, 1, 3, 4]));
        let got: Vec<f32> = merged.into_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(got, vec![2.0, 0.0, 0.0, 1.0, 1.0, -1.0, 5.0, 5.0]);
        assert_eq!(ff.report.merged, vec![0.25]);
    }
}
