//! SlowFast-LLaVA (Xu et al., 2024): a training-free two-pathway layout of a video's
//! tokens, after the projector.
//!
//! - Slow pathway: a few frames, `torch.linspace(0, T, slow + 1)` truncated, last dropped
//!   (frames 0, 5, ..., 45 of 50), each frame's grid max-pooled in pairs along its
//!   flattened, row-major order (`MaxPool1d(2, 2)`: the width halved).
//! - Fast pathway: every frame, its grid average-pooled hard (`AdaptiveAvgPool2d`; 24 x 24
//!   to 4 x 4 in the paper).
//! - Output: the slow tokens, then the fast ones.
//!
//! The paper's setting is 10 slow frames of 50 and a 4 x 4 fast grid from 24 x 24. Here,
//! for `T` frames of a `rows x cols` grid: at most `T / 5` slow frames (at least 1) and a
//! fast grid of `rows / 6 x cols / 6` (at least 1 x 1). Under a budget, the slow frames are
//! as many of those as fit beside the fast pathway; if not even one fits, the fast grid
//! shrinks to 1 x 1; below that the budget is refused with the smallest one that works.
//!
//! Prefix tokens (Video-LLaVA keeps CLIP's class token in its video tokens) stay with each
//! slow frame, unpooled, and are left out of the fast pathway. Where each frame has its
//! own placeholder (SmolVLM2), each frame gets its slow tokens (if any) then its fast ones.

use burn::tensor::{Int, Tensor, TensorData};

use crate::pllava_pool::adaptive_avg_matrix;
use crate::token_budget::{FrameGrid, Kept};

/// One slow frame in this many (the paper's 10 of 50).
pub const SLOW_EVERY: usize = 5;
/// The fast grid's side is the grid's divided by this (the paper's 24 -> 4).
pub const FAST_DIVISOR: usize = 6;

/// The pathways chosen for a grid under a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub slow_frames: usize,
    pub fast: (usize, usize),
}

impl Plan {
    /// Tokens of one slow frame: its prefix and half its grid.
    pub fn slow_tokens_per_frame(g: &FrameGrid) -> usize {
        g.prefix + g.rows * g.cols / 2
    }

    pub fn tokens(&self, g: &FrameGrid) -> usize {
        self.slow_frames * Self::slow_tokens_per_frame(g) + g.frames * self.fast.0 * self.fast.1
    }

    /// The paper's proportions, with as many slow frames as `budget` allows.
    pub fn for_budget(g: &FrameGrid, budget: usize) -> Result<Self, String> {
        let most_slow = (g.frames / SLOW_EVERY).max(1);
        let slow_each = Self::slow_tokens_per_frame(g);
        for fast in [((g.rows / FAST_DIVISOR).max(1), (g.cols / FAST_DIVISOR).max(1)), (1, 1)] {
            let fast_total = g.frames * fast.0 * fast.1;
            let slow_frames = budget.saturating_sub(fast_total) / slow_each.max(1);
            if fast_total < budget && slow_frames >= 1 {
                return Ok(Self { slow_frames: slow_frames.min(most_slow), fast });
            }
        }
        let least = Self { slow_frames: 1, fast: (1, 1) }.tokens(g);
        Err(format!(
            "a budget of {budget} visual tokens is too small for slowfast on {} frames (it needs at least {least}: one slow \
             frame of {slow_each} tokens and one token a frame)",
            g.frames
        ))
    }

    /// `torch.linspace(0, T, slow + 1).to(int32)[:-1]`, in f32 as torch computes it.
    pub fn slow_indices(&self, frames: usize) -> Vec<usize> {
        linspace_f32(0.0, frames as f32, self.slow_frames + 1).iter().take(self.slow_frames).map(|&v| v as usize).collect()
    }
}

/// `torch.linspace(start, end, steps)` in f32: `start + i * step` for the first half and
/// `end - (steps - 1 - i) * step` for the second, as ATen's kernel computes it.
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// SlowFast pathways of a video's tokens under `budget`.
///
/// # Shapes
/// - features: `[g.tokens(), d]` -> kept `[plan.tokens(g), d]`
pub fn reduce(features: Tensor<2>, g: FrameGrid, budget: usize) -> Result<Kept, String> {
    let plan = Plan::for_budget(&g, budget)?;
    let device = features.device();
    let [_, d] = features.dims();
    let (t, per, n) = (g.frames, g.tokens_per_frame(), g.rows * g.cols);
    let x = features.reshape([t, per, d]);
    let slow_idx = plan.slow_indices(t);

    // Slow: the chosen frames, each grid max-pooled in flattened pairs.
    let idx =
        Tensor::<1, Int>::from_data(TensorData::new(slow_idx.iter().map(|&i| i as i64).collect::<Vec<_>>(), [slow_idx.len()]), &device);
    let slow = x.clone().select(0, idx);
    let s = slow_idx.len();
    let pairs = n / 2;
    let pooled = slow.clone().narrow(1, g.prefix, 2 * pairs).reshape([s, pairs, 2, d]).max_dim(2).reshape([s, pairs, d]);
    let slow = if g.prefix > 0 { Tensor::cat(vec![slow.narrow(1, 0, g.prefix), pooled], 1) } else { pooled };
    let slow_each = g.prefix + pairs;
    let slow = slow.reshape([s * slow_each, d]);

    // Fast: every frame's grid, adaptive average pooling (separable: columns, then rows).
    let (fh, fw) = plan.fast;
    let mat = |v: Vec<f32>, r: usize, c: usize| Tensor::<2>::from_data(TensorData::new(v, [r, c]), &device).unsqueeze::<3>();
    let grid = x.narrow(1, g.prefix, n).reshape([t * g.rows, g.cols, d]);
    let cols = mat(adaptive_avg_matrix(g.cols, fw), fw, g.cols).matmul(grid); // [t*rows, fw, d]
    let fast = mat(adaptive_avg_matrix(g.rows, fh), fh, g.rows).matmul(cols.reshape([t, g.rows, fw * d])); // [t, fh, fw*d]
    let fast_each = fh * fw;
    let fast = fast.reshape([t * fast_each, d]);

    // Slow block then fast block, or per frame for per-frame placeholders.
    let mut order: Vec<(usize, usize)> = (0..s * slow_each).map(|r| (slow_idx[r / slow_each], r)).collect();
    order.extend((0..t * fast_each).map(|r| (r / fast_each, s * slow_each + r)));
    if g.placeholder_per_frame {
        order.sort_by_key(|&(frame, _)| frame); // stable: slow before fast within a frame
    }
    let all = Tensor::cat(vec![slow, fast], 0);
    let features = if g.placeholder_per_frame {
        let rows: Vec<i64> = order.iter().map(|&(_, r)| r as i64).collect();
        all.select(0, Tensor::<1, Int>::from_data(TensorData::new(rows, [order.len()]), &device))
    } else {
        all
    };
    Ok(Kept { features, frame_of: order.iter().map(|&(f, _)| f).collect(), position_in_video: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(frames: usize, prefix: usize, side: usize) -> FrameGrid {
        FrameGrid { frames, prefix, rows: side, cols: side, placeholder_per_frame: false }
    }

    #[test]
    fn the_papers_setting() {
        let g = grid(50, 0, 24);
        let plan = Plan::for_budget(&g, 3680).unwrap();
        assert_eq!(plan, Plan { slow_frames: 10, fast: (4, 4) });
        assert_eq!(plan.tokens(&g), 3680);
        assert_eq!(plan.slow_indices(50), vec![0, 5, 10, 15, 20, 25, 30, 35, 40, 45]);
        // A larger budget keeps the paper's proportions.
        assert_eq!(Plan::for_budget(&g, 100_000).unwrap().tokens(&g), 3680);
        // A smaller one takes fewer slow frames.
        assert_eq!(Plan::for_budget(&g, 2000).unwrap(), Plan { slow_frames: 4, fast: (4, 4) });
    }

    #[test]
    fn small_budgets() {
        let g = grid(8, 1, 16);
        // 8 frames x 2 x 2 = 32 fast tokens, one slow frame of 1 + 128.
        assert_eq!(Plan::for_budget(&g, 161).unwrap(), Plan { slow_frames: 1, fast: (2, 2) });
        assert_eq!(Plan::for_budget(&g, 140).unwrap(), Plan { slow_frames: 1, fast: (1, 1) });
        assert!(Plan::for_budget(&g, 136).is_err());
        assert_eq!(Plan { slow_frames: 3, fast: (1, 1) }.slow_indices(16), vec![0, 5, 10]);
    }
}
