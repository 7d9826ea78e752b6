//! `frames`: the frames a sampling policy picks, as the decoder returns them (JSON with
//! indices and timestamps; `--dump` writes the RGB bytes, frame after frame).

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
    /// Write the frames' packed RGB bytes here.
    #[arg(long)]
    pub dump: Option<String>,
}

pub fn run(a: FramesArgs) -> Result<()> {
    let reader = VideoReader::open(&a.video)?;
    let frames = reader.sample(a.sampling.policy_or(Sampling::Hf { n: 8 })?)?;
    if let Some(path) = &a.dump {
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.rgb.iter().copied()).collect();
        std::fs::write(path, bytes)?;
    }
    let list: Vec<_> = frames.iter().map(|f| json!({"index": f.index, "pts": f.pts})).collect();
    let i = &reader.info;
    println!("{}", json!({"width": i.width, "height": i.height, "total_frames": i.frames, "fps": i.fps, "frames": list}));
    Ok(())
}
