//! Visual-token budgets: training-free reductions of a video's visual tokens, between the
//! encoder/projector and the merge, for every architecture.
//!
//! An architecture says how its video tokens are laid out ([`FrameGrid`]: frame-major,
//! each frame a few prefix tokens such as CLIP's class token, then a row-major grid). A
//! method, one file each and named after its paper, turns those tokens into fewer, on the
//! device, and says which frame each kept token belongs to; the frames a method drops
//! disappear from the prompt too (SmolVLM2 writes one timestamped placeholder per frame).
//!
//! - `slowfast` ([`crate::slowfast`]): SlowFast-LLaVA's two pathways, a few frames at
//!   half resolution and every frame pooled hard.
//! - `maxinfo` ([`crate::maxinfo`]): MaxInfo's maximum-volume key frames, chosen from
//!   over-sampled candidate frames by their encodings.
//! - `fastvid` ([`crate::fastvid`]): FastVID's density pruning within temporal segments.
//! - `framefusion` ([`crate::framefusion`]): FrameFusion's merging by similarity across
//!   frames, then pruning by attention, inside the decoder's layers during the prefill.
//!   Here it only marks the video ([`Visual::fusion`]); its budget is the visual tokens a
//!   decoder layer processes on average.
//!
//! Which RoPE positions the kept tokens take is the method's: SlowFast-LLaVA and MaxInfo
//! feed their tokens to the decoder as a new, shorter video (consecutive positions);
//! FastVID's ([`KeptAt`]) and FrameFusion's survivors keep their places in the unreduced video.

use burn::tensor::Tensor;
use vidllm_core::GenerateError;

use crate::merge::{KeptAt, Visual};

/// How a video's visual tokens are laid out, frame-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameGrid {
    /// Frames (for PLLaVA: the pooled time steps).
    pub frames: usize,
    /// Tokens before each frame's grid (CLIP's class token in Video-LLaVA's video tokens).
    pub prefix: usize,
    pub rows: usize,
    pub cols: usize,
    /// Each frame has its own placeholder in the prompt (SmolVLM2), rather than the whole
    /// video one.
    pub placeholder_per_frame: bool,
}

impl FrameGrid {
    pub fn tokens_per_frame(&self) -> usize {
        self.prefix + self.rows * self.cols
    }

    pub fn tokens(&self) -> usize {
        self.frames * self.tokens_per_frame()
    }
}

/// A reduction method (`--reduce`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// No reduction: a video over the budget is refused.
    None,
    SlowFast,
    MaxInfo,
    FastVid,
    FrameFusion,
}

impl Reduce {
    pub const NAMES: &'static str = "none, slowfast, maxinfo, fastvid, framefusion";

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::SlowFast => "slowfast",
            Self::MaxInfo => "maxinfo",
            Self::FastVid => "fastvid",
            Self::FrameFusion => "framefusion",
        }
    }

    /// Candidate frames to decode and encode per frame wanted: MaxInfo chooses among
    /// twice as many (its authors' LLaVA-Video setting: 128 candidates, at most 64 kept).
    pub fn candidates_per_frame(self) -> usize {
        match self {
            Self::MaxInfo => crate::maxinfo::OVERSAMPLE,
            _ => 1,
        }
    }
}

impl std::str::FromStr for Reduce {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "slowfast" => Ok(Self::SlowFast),
            "maxinfo" => Ok(Self::MaxInfo),
            "fastvid" => Ok(Self::FastVid),
            "framefusion" => Ok(Self::FrameFusion),
            other => Err(format!("unknown reduction {other:?} (methods: {})", Self::NAMES)),
        }
    }
}

/// A visual-token budget: at most `max_tokens` tokens for the video, by `reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_tokens: usize,
    pub reduce: Reduce,
    /// Frames the user asked for (MaxInfo keeps at most these of its candidates).
    pub frames: usize,
}

impl Budget {
    pub fn new(max_tokens: usize, reduce: Reduce, frames: usize) -> Result<Self, String> {
        if max_tokens == 0 {
            return Err("a visual-token budget of 0 leaves nothing to look at (give at least 1)".into());
        }
        Ok(Self { max_tokens, reduce, frames })
    }
}

/// What a method kept: the tokens, and the frame each belongs to.
pub struct Kept {
    /// `[m, d]`
    pub features: Tensor<2>,
    /// Frame of each row of `features` (for a merged or pooled token: the frame it is
    /// filed under).
    pub frame_of: Vec<usize>,
    /// Each row's index among the unreduced video's tokens, ascending, where the method
    /// keeps the survivors' RoPE positions; `None`: the rows take consecutive ones.
    pub position_in_video: Option<Vec<usize>>,
}

/// What a reduction did, for `--json` and the server's timings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReductionReport {
    pub method: &'static str,
    pub max_visual_tokens: usize,
    pub tokens_before: usize,
    pub tokens_after: usize,
    pub frames_before: usize,
    pub frames_after: usize,
    pub reduce_ms: f64,
    /// Set when nothing needed doing (the video already fits).
    pub note: Option<String>,
    /// FrameFusion: the visual tokens each decoder layer attended to (set after the prefill).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_tokens: Option<Vec<usize>>,
}

impl ReductionReport {
    /// What `budget` did to a video laid out as `grid`, from `t0` until now.
    fn of(budget: &Budget, grid: FrameGrid, after: usize, frames_after: usize, note: Option<String>, t0: web_time::Instant) -> Self {
        Self {
            method: budget.reduce.name(),
            max_visual_tokens: budget.max_tokens,
            tokens_before: grid.tokens(),
            tokens_after: after,
            frames_before: grid.frames,
            frames_after,
            reduce_ms: t0.elapsed().as_secs_f64() * 1e3,
            note,
            layer_tokens: None,
        }
    }

    /// What FrameFusion did in the decoder, once the prefill ran: the tokens left for the
    /// last layers, and each layer's.
    pub fn after_prefill(&mut self, fusion: &crate::framefusion::FusionReport) {
        self.tokens_after = fusion.tokens_after();
        self.layer_tokens = Some(fusion.layer_tokens.clone());
        self.reduce_ms += fusion.reduce_ms;
        self.note = None;
    }
}

/// A video's visual tokens after a budget, and which of its frames are still in it.
pub struct Reduced {
    pub visual: Visual,
    /// Indices into the frames given, in order.
    pub frames: Vec<usize>,
    pub report: ReductionReport,
}

/// Apply `budget` to a video's tokens laid out as `grid`.
pub fn reduce(visual: Visual, grid: FrameGrid, budget: &Budget) -> Result<Reduced, GenerateError> {
    reduce_with(visual, grid, budget, None)
}

/// [`reduce`], reading back what a method needs on the host without blocking (WebGPU in
/// a browser cannot wait for the device).
pub async fn reduce_async(visual: Visual, grid: FrameGrid, budget: &Budget) -> Result<Reduced, GenerateError> {
    if budget.reduce == Reduce::FastVid && visual.features.dims()[0] == grid.tokens() && visual.features.dims()[0] > budget.max_tokens {
        let t0 = web_time::Instant::now();
        let kept = crate::fastvid::reduce_async(visual.features.clone(), visual.salience.clone(), grid, budget.max_tokens)
            .await
            .map_err(GenerateError::Visual)?;
        return Ok(finish(visual, grid, budget, kept, t0));
    }
    let read = match budget.reduce {
        Reduce::MaxInfo if visual.features.dims()[0] == grid.tokens() => {
            let data = crate::maxinfo::frame_embeddings(visual.features.clone(), grid)
                .into_data_async()
                .await
                .map_err(|e| GenerateError::Device(format!("{e:?}")))?;
            Some(data.convert::<f32>().try_into_vec::<f32>().map_err(|e| GenerateError::Device(format!("{e:?}")))?)
        }
        _ => None,
    };
    reduce_with(visual, grid, budget, read)
}

fn reduce_with(visual: Visual, grid: FrameGrid, budget: &Budget, read: Option<Vec<f32>>) -> Result<Reduced, GenerateError> {
    let t0 = web_time::Instant::now();
    let before = visual.features.dims()[0];
    if before != grid.tokens() {
        return Err(GenerateError::Visual(format!("video tokens {before} do not match their layout {grid:?}")));
    }
    let all_frames: Vec<usize> = (0..grid.frames).collect();
    let fits = before <= budget.max_tokens && budget.reduce != Reduce::MaxInfo;
    if fits || budget.reduce == Reduce::None {
        if before > budget.max_tokens {
            return Err(GenerateError::Visual(format!(
                "the video makes {before} visual tokens, over max_visual_tokens {} (reduce them with slowfast, maxinfo, fastvid or framefusion, \
                 or ask for fewer frames)",
                budget.max_tokens
            )));
        }
        let note = Some(format!("{before} visual tokens already fit the budget of {}: nothing reduced", budget.max_tokens));
        return Ok(Reduced { visual, frames: all_frames, report: ReductionReport::of(budget, grid, before, grid.frames, note, t0) });
    }
    let kept = match budget.reduce {
        Reduce::None => unreachable!("handled above"),
        Reduce::SlowFast => crate::slowfast::reduce(visual.features.clone(), grid, budget.max_tokens),
        Reduce::MaxInfo => crate::maxinfo::reduce(visual.features.clone(), grid, budget.max_tokens, budget.frames, read),
        Reduce::FastVid => crate::fastvid::reduce(visual.features.clone(), visual.salience.clone(), grid, budget.max_tokens),
        Reduce::FrameFusion => {
            // The decoder reduces it during the prefill: mark the video, keep its tokens.
            let plan = crate::framefusion::Plan { budget: budget.max_tokens, tokens: before, tokens_per_frame: grid.tokens_per_frame() };
            let note = Some(format!("{before} visual tokens go to the decoder, which merges and prunes them in its layers"));
            let report = ReductionReport::of(budget, grid, before, grid.frames, note, t0);
            return Ok(Reduced { visual: Visual { fusion: Some(plan), ..visual }, frames: all_frames, report });
        }
    }
    .map_err(GenerateError::Visual)?;
    Ok(finish(visual, grid, budget, kept, t0))
}

/// What a method kept, as the video's visual tokens and report.
fn finish(visual: Visual, grid: FrameGrid, budget: &Budget, kept: Kept, t0: web_time::Instant) -> Reduced {
    let before = grid.tokens();
    let mut frames: Vec<usize> = kept.frame_of.clone();
    frames.sort_unstable();
    frames.dedup();
    let after = kept.features.dims()[0];
    // Per-frame placeholders: one count per frame that kept anything, in frame order
    // (every method returns its tokens grouped by frame for such layouts).
    let counts = grid.placeholder_per_frame.then(|| frames.iter().map(|f| kept.frame_of.iter().filter(|g| *g == f).count()).collect());
    let per_placeholder = if grid.placeholder_per_frame { visual.per_placeholder } else { after };
    // Kept positions: one run a kept frame spanning its unreduced tokens, or one run the
    // whole unreduced video.
    let per = grid.tokens_per_frame();
    let kept_at = kept.position_in_video.map(|at| match grid.placeholder_per_frame {
        true => KeptAt { spans: vec![per; frames.len()], offsets: at.iter().map(|i| i % per).collect() },
        false => KeptAt { spans: vec![before], offsets: at },
    });
    let visual = Visual { features: kept.features, per_placeholder, counts, kept_at, salience: None, ..visual };
    let report = ReductionReport::of(budget, grid, after, frames.len(), None, t0);
    Reduced { visual, frames, report }
}

/// Indices of the `k` largest values, largest first, ties to the lower index (FastVID's
/// salient tokens and peaks, FrameFusion's merges and survivors).
pub(crate) fn top_k<T: Copy + Into<f64>>(values: &[T], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].into().total_cmp(&values[a].into()).then(a.cmp(&b)));
    order.truncate(k);
    order
}
