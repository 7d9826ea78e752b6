//! Live video: a rolling window over the newest frames of a stream that has no end (a
//! webcam, a pipe, a file still being written), answered from at any moment.
//!
//! A front end samples the stream as it plays and pushes each sampled frame, preprocessed
//! on the device, into a [`LiveWindow`]. Where the model encodes each frame on its own
//! ([`frame_share`](crate::video_model::Architecture::frame_share): Video-LLaVA, LLaVA-NeXT-Video, PLLaVA before its pooling,
//! SmolVLM2), the frame is encoded once, as it arrives, and the window keeps its share; a
//! question then only joins the shares (and, for PLLaVA, pools them), so the time to the
//! first token does not include the encoding of the frames seen earlier. A share keeps
//! FastVID's salience of the frame's tokens too, from its tower's feature block (PLLaVA:
//! that block's probe, pooled across frames when asked), should a question ask for it. A model that
//! encodes frames together (MERV) keeps the prepared frames instead, and encodes the
//! window when asked.
//!
//! Frames leave the window oldest first. The frame times a question's prompt states are
//! relative to the window's first frame; the stream's own times stay with each
//! [`WindowFrame`] for the answer's metadata.

use std::collections::VecDeque;

use burn::tensor::Tensor;
use vidllm_core::GenerateError;
use vidllm_core::sampling::FrameTimes;

use crate::token_budget::Budget;
use crate::video_model::{EncodedVideo, FrameShare, VideoModel};

/// One frame in the window.
pub struct WindowFrame {
    /// The frame's number in the stream (as the front end counts them).
    pub index: u64,
    /// Its time in the stream, in seconds.
    pub time: f64,
    held: Held,
}

/// What the window keeps of a frame.
enum Held {
    /// Its share of the video's encoding: the model encodes frames alone.
    Share(Box<FrameShare>),
    /// Its prepared pixels (`[1, 3, s, s]`), encoded with the others when asked.
    Pixels(Box<Tensor<4>>),
}

/// A question's video, from the window as it was when asked.
pub struct WindowVideo {
    pub encoded: EncodedVideo,
    /// The prompt's frame times: from the window's first frame.
    pub times: FrameTimes,
    /// The frames in it: stream number and stream time.
    pub frames: Vec<(u64, f64)>,
    /// Frames encoded for this question (0 where every frame was encoded on arrival).
    pub encoded_now: usize,
}

impl WindowVideo {
    /// The frames the answer sees: all of the window's, or those a budget kept.
    pub fn seen(&self) -> impl Iterator<Item = &(u64, f64)> {
        let kept = self.encoded.frames.as_ref();
        self.frames.iter().enumerate().filter(move |(i, _)| kept.is_none_or(|k| k.contains(i))).map(|(_, f)| f)
    }
}

/// The newest `capacity` frames of a stream, encoded as they arrive where the model allows.
pub struct LiveWindow {
    capacity: usize,
    frames: VecDeque<WindowFrame>,
    frame_encodes: usize,
}

impl LiveWindow {
    /// A window of at most `capacity` frames (at least one).
    pub fn new(capacity: usize) -> Result<Self, GenerateError> {
        if capacity == 0 {
            return Err(GenerateError::Unsupported("a live window of 0 frames".into()));
        }
        Ok(Self { capacity, frames: VecDeque::with_capacity(capacity + 1), frame_encodes: 0 })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames held, oldest first.
    pub fn frames(&self) -> impl Iterator<Item = &WindowFrame> {
        self.frames.iter()
    }

    /// Frames run through the vision encoder so far, on arrival and at question time.
    pub fn frame_encodes(&self) -> usize {
        self.frame_encodes
    }

    /// Add the stream's newest frame, encoding it now where the model encodes frames
    /// alone; the oldest frame leaves a full window.
    ///
    /// # Shapes
    /// - pixels: `[1, 3, s, s]`, preprocessed as the model's video frames are
    pub fn push(&mut self, model: &VideoModel, pixels: Tensor<4>, index: u64, time: f64) {
        let held = match model.frame_share(pixels.clone()) {
            Some(share) => {
                self.frame_encodes += 1;
                Held::Share(Box::new(share))
            }
            None => Held::Pixels(Box::new(pixels)),
        };
        if self.frames.len() == self.capacity {
            self.frames.pop_front();
        }
        self.frames.push_back(WindowFrame { index, time, held });
    }

    /// The window's video, as the model would encode these frames as one clip, reduced
    /// to `budget` when one is given.
    pub fn video(&mut self, model: &VideoModel, budget: Option<&Budget>) -> Result<WindowVideo, GenerateError> {
        let first = self.frames.front().ok_or_else(|| GenerateError::Unsupported("the live window holds no frame yet".into()))?;
        let start = first.time;
        let frames: Vec<(u64, f64)> = self.frames.iter().map(|f| (f.index, f.time)).collect();
        let (mut shares, mut pixels) = (Vec::new(), Vec::new());
        for f in &self.frames {
            match &f.held {
                Held::Share(s) => shares.push(FrameShare::clone(s)),
                Held::Pixels(p) => pixels.push(Tensor::clone(p)),
            }
        }
        let (encoded, encoded_now) = match (shares.is_empty(), pixels.is_empty()) {
            (false, true) => (model.encode_shares(shares, budget)?, 0),
            (true, false) => {
                let n = pixels.len();
                (model.encode_video(Tensor::cat(pixels, 0), budget)?, n)
            }
            // A window is filled by one model, which holds every frame the same way.
            _ => return Err(GenerateError::Unsupported("a live window holds frames of two models".into())),
        };
        self.frame_encodes += encoded_now;
        let times: Vec<f64> = frames.iter().map(|&(_, t)| t - start).collect();
        // The clip lasts until the frame after its last: one mean frame interval on.
        let span = times.last().copied().unwrap_or(0.0);
        let duration = if times.len() > 1 { span * times.len() as f64 / (times.len() - 1) as f64 } else { 0.0 };
        let times = FrameTimes { times, duration };
        Ok(WindowVideo { times: encoded.times(&times), encoded, frames, encoded_now })
    }
}
