//! Native video frames through the ffmpeg libraries (libavformat / libavcodec / swscale).
//!
//! Only the sampled frames are produced: the reader seeks to the keyframe before each
//! target and decodes forward to it; nothing holds the whole video in memory. Streams
//! whose timestamps cannot name a frame (GIF and other variable-rate formats) are read
//! in decode order instead, keeping only the targets.

use anyhow::{Context, Result, anyhow, bail};
use ffmpeg::format::Pixel;
use ffmpeg::media::Type;
use ffmpeg::software::scaling::{context::Context as Scaler, flag::Flags};
use ffmpeg::util::frame::video::Video as AvFrame;
use ffmpeg_next as ffmpeg;
use vidllm_core::sampling::Sampling;

/// Largest frame accepted (8K UHD); larger ones are refused before decoding.
const MAX_PIXELS: u64 = 7680 * 4320;

/// One decoded RGB frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Index in decode order (0-based).
    pub index: usize,
    /// Presentation time in seconds from the start of the stream.
    pub pts: f64,
    pub width: usize,
    pub height: usize,
    /// `[height, width, 3]` RGB, row-major.
    pub rgb: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct VideoInfo {
    pub frames: usize,
    pub fps: f64,
    pub width: usize,
    pub height: usize,
    /// Timestamps map to frame indices (constant frame rate, seekable).
    pub seekable: bool,
}

pub struct VideoReader {
    path: String,
    pub info: VideoInfo,
}

fn fail(path: &str, what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{path}: {what}: {e}")
}

impl VideoReader {
    pub fn open(path: &str) -> Result<Self> {
        ffmpeg::init().map_err(|e| anyhow!("ffmpeg init: {e}"))?;
        // Problems come back as errors with context; the libraries' own log would add
        // unstructured lines to stderr.
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
        let meta = std::fs::metadata(path).with_context(|| format!("cannot open video {path}"))?;
        if meta.len() == 0 {
            bail!("{path}: the video file is empty");
        }
        let mut ictx = ffmpeg::format::input(&path).map_err(|e| fail(path, "not a readable video", e))?;
        let stream = ictx.streams().best(Type::Video).ok_or_else(|| anyhow!("{path}: no video stream"))?;
        let idx = stream.index();
        let params = stream.parameters();
        let rate = stream.avg_frame_rate();
        let fps = if rate.denominator() != 0 && rate.numerator() > 0 { f64::from(rate) } else { 0.0 };
        let dec = ffmpeg::codec::context::Context::from_parameters(params).map_err(|e| fail(path, "codec", e))?;
        let dec = dec.decoder().video().map_err(|e| fail(path, "no decoder for the video stream", e))?;
        let (width, height) = (dec.width() as usize, dec.height() as usize);
        if width == 0 || height == 0 {
            bail!("{path}: the video stream has no size");
        }
        if (width * height) as u64 > MAX_PIXELS {
            bail!("{path}: {width}x{height} frames are larger than the {MAX_PIXELS}-pixel limit");
        }
        let is_gif = ictx.format().name().contains("gif");
        let mut frames = stream.frames().max(0) as usize;
        if frames == 0 {
            // No count in the header: count the stream's packets (no decoding).
            frames = ictx.packets().filter(|(s, _)| s.index() == idx).count();
        }
        let seekable = !is_gif && fps > 0.0;
        Ok(Self { path: path.to_string(), info: VideoInfo { frames, fps, width, height, seekable } })
    }

    /// Decode the frames a sampling policy picks.
    pub fn sample(&self, policy: Sampling) -> Result<Vec<Frame>> {
        let fps = if self.info.fps > 0.0 { self.info.fps } else { 10.0 };
        let indices = policy.indices(self.info.frames, fps).map_err(|e| anyhow!("{}: {e}", self.path))?;
        self.frames_at(&indices)
    }

    /// Frames at the given indices (any order; returned in the order asked).
    pub fn frames_at(&self, indices: &[usize]) -> Result<Vec<Frame>> {
        let mut sorted: Vec<usize> = indices.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // (target, frame): a seek may land on the next frame when the target is missing.
        let decoded = if self.info.seekable { self.decode_seeking(&sorted)? } else { self.decode_in_order(&sorted)? };
        indices
            .iter()
            .map(|i| {
                decoded
                    .iter()
                    .find(|(t, _)| t == i)
                    .map(|(_, f)| f.clone())
                    .ok_or_else(|| anyhow!("{}: frame {i} could not be decoded (the stream ends early or is corrupt)", self.path))
            })
            .collect()
    }

    fn open_decoder(&self) -> Result<(ffmpeg::format::context::Input, usize, ffmpeg::decoder::Video, ffmpeg::Rational, i64)> {
        let ictx = ffmpeg::format::input(&self.path).map_err(|e| fail(&self.path, "open", e))?;
        let stream = ictx.streams().best(Type::Video).ok_or_else(|| anyhow!("{}: no video stream", self.path))?;
        let (idx, tb) = (stream.index(), stream.time_base());
        let start = if stream.start_time() == ffmpeg::ffi::AV_NOPTS_VALUE { 0 } else { stream.start_time() };
        let dec = ffmpeg::codec::context::Context::from_parameters(stream.parameters()).map_err(|e| fail(&self.path, "codec", e))?;
        let dec = dec.decoder().video().map_err(|e| fail(&self.path, "decoder", e))?;
        Ok((ictx, idx, dec, tb, start))
    }

    fn decode_in_order(&self, targets: &[usize]) -> Result<Vec<(usize, Frame)>> {
        let (mut ictx, idx, mut dec, tb, start) = self.open_decoder()?;
        let mut conv = Converter::default();
        let mut out = Vec::new();
        let mut next = 0usize;
        let last = *targets.last().unwrap_or(&0);
        let mut keep = |f: &AvFrame, conv: &mut Converter, out: &mut Vec<(usize, Frame)>| -> Result<bool> {
            let i = next;
            next += 1;
            if targets.binary_search(&i).is_ok() {
                out.push((i, conv.rgb(f, i, seconds(f, tb, start))?));
            }
            Ok(i >= last)
        };
        let mut f = AvFrame::empty();
        for (s, packet) in ictx.packets() {
            if s.index() != idx {
                continue;
            }
            dec.send_packet(&packet).map_err(|e| fail(&self.path, "corrupt video data", e))?;
            while dec.receive_frame(&mut f).is_ok() {
                if keep(&f, &mut conv, &mut out)? {
                    return Ok(out);
                }
            }
        }
        let _ = dec.send_eof();
        while dec.receive_frame(&mut f).is_ok() {
            if keep(&f, &mut conv, &mut out)? {
                break;
            }
        }
        Ok(out)
    }

    fn decode_seeking(&self, targets: &[usize]) -> Result<Vec<(usize, Frame)>> {
        let (mut ictx, idx, mut dec, tb, start) = self.open_decoder()?;
        let fps = self.info.fps;
        let mut conv = Converter::default();
        let mut out = Vec::new();
        // Index of the last frame decoded, if the decoder is positioned in the stream.
        let mut at: Option<usize> = None;
        for &target in targets {
            // Decode forward when the target is close ahead; otherwise seek.
            let close = at.is_some_and(|a| a < target && ((target - a) as f64) < 2.0 * fps);
            if !close {
                let ts = (target as f64 / fps * 1e6) as i64 + start_us(start, tb);
                ictx.seek(ts, ..ts + 1).map_err(|e| fail(&self.path, "seek", e))?;
                dec.flush();
            }
            let mut f = AvFrame::empty();
            let mut found = None;
            'packets: for (s, packet) in ictx.packets() {
                if s.index() != idx {
                    continue;
                }
                dec.send_packet(&packet).map_err(|e| fail(&self.path, "corrupt video data", e))?;
                while dec.receive_frame(&mut f).is_ok() {
                    let t = seconds(&f, tb, start);
                    let i = (t * fps).round().max(0.0) as usize;
                    at = Some(i);
                    if i >= target {
                        found = Some(conv.rgb(&f, i, t)?);
                        break 'packets;
                    }
                }
            }
            if found.is_none() {
                // End of stream: drain the decoder's delayed frames.
                let _ = dec.send_eof();
                while dec.receive_frame(&mut f).is_ok() {
                    let t = seconds(&f, tb, start);
                    let i = (t * fps).round().max(0.0) as usize;
                    if i >= target {
                        found = Some(conv.rgb(&f, i, t)?);
                        break;
                    }
                }
                at = None;
            }
            out.extend(found.map(|f| (target, f)));
        }
        Ok(out)
    }
}

fn start_us(start: i64, tb: ffmpeg::Rational) -> i64 {
    (start as f64 * f64::from(tb) * 1e6) as i64
}

fn seconds(f: &AvFrame, tb: ffmpeg::Rational, start: i64) -> f64 {
    let pts = f.timestamp().or(f.pts()).unwrap_or(0);
    (pts - start) as f64 * f64::from(tb)
}

/// YUV (or palette) to packed RGB24, as the ffmpeg CLI's default (bicubic) swscale does.
#[derive(Default)]
struct Converter {
    ctx: Option<(Scaler, Pixel, u32, u32)>,
}

impl Converter {
    fn rgb(&mut self, f: &AvFrame, index: usize, pts: f64) -> Result<Frame> {
        let (w, h, fmt) = (f.width(), f.height(), f.format());
        if !matches!(&self.ctx, Some((_, pf, pw, ph)) if *pf == fmt && *pw == w && *ph == h) {
            let s = Scaler::get(fmt, w, h, Pixel::RGB24, w, h, Flags::BICUBIC).map_err(|e| anyhow!("pixel conversion: {e}"))?;
            self.ctx = Some((s, fmt, w, h));
        }
        let (scaler, ..) = self.ctx.as_mut().expect("set above");
        let mut rgb = AvFrame::empty();
        scaler.run(f, &mut rgb).map_err(|e| anyhow!("pixel conversion: {e}"))?;
        let (w, h) = (w as usize, h as usize);
        let stride = rgb.stride(0);
        let data = rgb.data(0);
        let mut packed = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            packed.extend_from_slice(&data[y * stride..y * stride + w * 3]);
        }
        Ok(Frame { index, pts, width: w, height: h, rgb: packed })
    }
}
