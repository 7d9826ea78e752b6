//! Placeholder expansion and merging: each `<video>` / `<image>` id stands for a run of
//! visual tokens; their features replace those positions, in order (images first, then
//! videos, as transformers fills them). The count must match exactly.

use burn::tensor::Tensor;
use vidllm_core::LoadError;

use crate::llama::Llama;

/// Visual features for one kind of placeholder.
#[derive(Clone)]
pub struct Visual {
    pub token: u32,
    /// `[n, d_text]`
    pub features: Tensor<2>,
    /// Tokens each placeholder stands for.
    pub per_placeholder: usize,
    /// Per-placeholder counts, where they differ (a reduced video with one placeholder a
    /// frame: each frame keeps its own number of tokens); overrides `per_placeholder`.
    pub counts: Option<Vec<usize>>,
    /// An image cut into `rows x cols` tiles plus a global view (one placeholder each),
    /// as Idefics3 / SmolVLM prompts lay them out; `None` for one placeholder.
    pub tiles: Option<(usize, usize)>,
    /// Where a reduced video's kept tokens sit in the unreduced one, for methods whose
    /// survivors keep their RoPE positions (FastVID); `None`: consecutive positions.
    pub kept_at: Option<KeptAt>,
    /// A video that FrameFusion reduces inside the decoder, during the prefill.
    pub fusion: Option<crate::framefusion::Plan>,
    /// FastVID's salience of each token, from the vision tower
    /// ([`crate::fastvid::tower_salience`]), where the architecture gave it. `[n]`
    pub salience: Option<Tensor<1>>,
}

impl Visual {
    /// `features` filling the `token` placeholders, `per_placeholder` rows each: one run,
    /// unreduced, not tiled.
    pub fn new(token: u32, features: Tensor<2>, per_placeholder: usize) -> Self {
        Self { token, features, per_placeholder, counts: None, tiles: None, kept_at: None, fusion: None, salience: None }
    }
}

/// A reduced video's kept tokens in the unreduced layout: each placeholder run still
/// spans the positions the unreduced run took, its tokens at their offsets in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptAt {
    /// Positions each placeholder run spans (the unreduced run's tokens), in order.
    pub spans: Vec<usize>,
    /// Each feature row's offset in its run, ascending within a run.
    pub offsets: Vec<usize>,
}

/// Replace every single placeholder id by `per_placeholder` copies.
pub fn expand_placeholders(ids: &[u32], token: u32, per_placeholder: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(ids.len() + per_placeholder);
    for &id in ids {
        if id == token {
            out.extend(std::iter::repeat_n(token, per_placeholder));
        } else {
            out.push(id);
        }
    }
    out
}

/// Replace the i-th placeholder id by `counts[i]` copies; the number of placeholders must
/// be `counts.len()`.
pub fn expand_placeholders_counted(ids: &[u32], token: u32, counts: &[usize]) -> Result<Vec<u32>, LoadError> {
    let found = ids.iter().filter(|&&id| id == token).count();
    if found != counts.len() {
        return Err(LoadError::Unsupported(format!(
            "{found} placeholders (id {token}) in the prompt for {} runs of visual tokens",
            counts.len()
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut next = counts.iter();
    for &id in ids {
        if id == token {
            out.extend(std::iter::repeat_n(token, *next.next().expect("counted")));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// Input embeddings for an expanded prompt: text rows from the embedding table, visual
/// rows from the features. Errors when the counts differ, naming both.
///
/// # Shapes
/// - returns `[ids.len(), d_text]`
pub fn merge_embeddings(decoder: &Llama, ids: &[u32], visuals: &[Visual]) -> Result<Tensor<2>, LoadError> {
    let mut cursor = vec![0usize; visuals.len()];
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < ids.len() {
        let kind = visuals.iter().position(|v| v.token == ids[start]);
        let end = (start..ids.len()).find(|&i| visuals.iter().position(|v| v.token == ids[i]) != kind).unwrap_or(ids.len());
        match kind {
            None => pieces.push(decoder.embed.lookup(&ids[start..end], &decoder.device)),
            Some(k) => {
                let avail = visuals[k].features.dims()[0];
                if cursor[k] + (end - start) > avail {
                    return Err(mismatch(visuals[k].token, ids, avail));
                }
                pieces.push(visuals[k].features.clone().narrow(0, cursor[k], end - start));
                cursor[k] += end - start;
            }
        }
        start = end;
    }
    for (k, v) in visuals.iter().enumerate() {
        if cursor[k] != v.features.dims()[0] {
            return Err(mismatch(v.token, ids, v.features.dims()[0]));
        }
    }
    Ok(Tensor::cat(pieces, 0))
}

/// Each row's RoPE position in an expanded prompt when a visual's kept tokens keep their
/// unreduced positions (text after a run continues after the unreduced run); `None` when
/// every row takes the next position. Counts are as [`merge_embeddings`] checked them.
pub fn merge_positions(ids: &[u32], visuals: &[Visual]) -> Option<Vec<usize>> {
    visuals.iter().any(|v| v.kept_at.is_some()).then(|| {
        let mut cursor = vec![0usize; visuals.len()];
        let mut run = vec![0usize; visuals.len()];
        let mut out = Vec::with_capacity(ids.len());
        let (mut start, mut next) = (0, 0);
        while start < ids.len() {
            let kind = visuals.iter().position(|v| v.token == ids[start]);
            let end = (start..ids.len()).find(|&i| visuals.iter().position(|v| v.token == ids[i]) != kind).unwrap_or(ids.len());
            match kind.and_then(|k| visuals[k].kept_at.as_ref().map(|at| (k, at))) {
                Some((k, at)) => {
                    // One contiguous run of placeholder ids may hold several placeholder
                    // runs (rare: adjacent frames without text between): split by counts.
                    let mut row = cursor[k];
                    while row < cursor[k] + (end - start) && run[k] < at.spans.len() {
                        let len = visuals[k].counts.as_ref().map_or(end - start, |c| c[run[k]]);
                        out.extend(at.offsets[row..row + len].iter().map(|&o| next + o));
                        next += at.spans[run[k]];
                        row += len;
                        run[k] += 1;
                    }
                    cursor[k] = row;
                }
                None => {
                    out.extend(next..next + (end - start));
                    next += end - start;
                    if let Some(k) = kind {
                        cursor[k] += end - start;
                    }
                }
            }
            start = end;
        }
        out
    })
}

/// The plan of the visual that FrameFusion reduces, and each row's patch in an expanded
/// prompt: a row of that visual's tokens gets its index within its frame (its `i`-th
/// token overall, modulo the tokens a frame), any other row `None`. `None` when no
/// visual asks for it.
pub fn merge_patches(ids: &[u32], visuals: &[Visual]) -> Option<(crate::framefusion::Plan, Vec<Option<usize>>)> {
    let v = visuals.iter().find(|v| v.fusion.is_some())?;
    let plan = v.fusion?;
    let mut seen = 0;
    let patches = ids
        .iter()
        .map(|&id| {
            (id == v.token).then(|| {
                seen += 1;
                (seen - 1) % plan.tokens_per_frame
            })
        })
        .collect();
    Some((plan, patches))
}

fn mismatch(token: u32, ids: &[u32], features: usize) -> LoadError {
    let placeholders = ids.iter().filter(|&&i| i == token).count();
    LoadError::Unsupported(format!(
        "visual tokens and features do not match: {placeholders} placeholder tokens (id {token}), {features} features"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visual(token: u32, rows: usize, counts: Option<Vec<usize>>, kept_at: Option<KeptAt>) -> Visual {
        let features = Tensor::<2>::zeros([rows, 2], &burn::tensor::Device::flex());
        Visual { counts, kept_at, ..Visual::new(token, features, rows) }
    }

    #[test]
    fn kept_tokens_sit_where_the_unreduced_video_put_them() {
        // 2 text, a video of 10 tokens reduced to 3 (offsets 1, 4, 9), 2 text.
        let v = visual(9, 3, None, Some(KeptAt { spans: vec![10], offsets: vec![1, 4, 9] }));
        assert_eq!(merge_positions(&[1, 2, 9, 9, 9, 3, 4], &[v]), Some(vec![0, 1, 3, 6, 11, 12, 13]));
        // One placeholder a frame, text between: frames of 4 tokens keeping 2 and 1.
        let at = KeptAt { spans: vec![4, 4], offsets: vec![0, 3, 2] };
        let v = visual(9, 3, Some(vec![2, 1]), Some(at));
        assert_eq!(merge_positions(&[1, 9, 9, 5, 9, 3], &[v]), Some(vec![0, 1, 4, 5, 8, 10]));
        // Adjacent frames without text between.
        let at = KeptAt { spans: vec![4, 4], offsets: vec![0, 3, 2] };
        let v = visual(9, 3, Some(vec![2, 1]), Some(at));
        assert_eq!(merge_positions(&[9, 9, 9, 3], &[v]), Some(vec![0, 3, 6, 8]));
        // Nothing kept at positions: consecutive.
        assert_eq!(merge_positions(&[1, 9, 9], &[visual(9, 2, None, None)]), None);
    }
}
