//! `frames`: the frames a sampling policy picks (or `--at` names), as the decoder returns
//! them (JSON with indices and timestamps; `--dump` writes the RGB bytes, frame after
//! frame). Frame k is the k-th picture displayed, as PyAV numbers them; see `video.rs`.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use vidllm_core::sampling::Sampling;

use crate::ask::SamplingArgs;
use crate::video::VideoReader;

#[derive(Args)]
pub struct FramesArgs {
    #[arg(long)]
    pub video: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Frames by index (display order, from 0), instead of a sampling policy.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["frames", "sampling"])]
    pub at: Option<Vec<usize>>,
    /// Write the frames' packed RGB bytes here.
    #[arg(long)]
    pub dump: Option<String>,
}

pub fn run(a: FramesArgs) -> Result<()> {
    let reader = VideoReader::open(&a.video)?;
    let frames = match &a.at {
        Some(at) => reader.frames_at(at)?,
        None => reader.sample(a.sampling.policy_or(Sampling::Hf { n: 8 })?)?,
    };
    if let Some(path) = &a.dump {
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.rgb.iter().copied()).collect();
        std::fs::write(path, bytes)?;
    }
    let list: Vec<_> = frames.iter().map(|f| json!({"index": f.index, "pts": f.pts})).collect();
    let i = &reader.info;
    println!(
        "{}",
        json!({"width": i.width, "height": i.height, "total_frames": i.frames, "fps": i.fps, "rotation": i.rotation,
                          "variable_rate": i.variable_rate, "seekable": reader.seekable(), "frames": list})
    );
    Ok(())
}
