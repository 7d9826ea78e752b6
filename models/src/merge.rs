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

fn mismatch(token: u32, ids: &[u32], features: usize) -> LoadError {
    let placeholders = ids.iter().filter(|&&i| i == token).count();
    LoadError::Unsupported(format!(
        "visual tokens and features do not match: {placeholders} placeholder tokens (id {token}), {features} features"
    ))
}
