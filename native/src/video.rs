//! Native video frames through the ffmpeg libraries (libavformat / libavcodec / swscale).
//!
//! # Which picture is frame k
//!
//! Frame k is the k-th picture the decoder presents, in display order, as PyAV and
//! `ffmpeg -fps_mode passthrough` number them. It is never derived from
//! `(pts - stream start) x nominal fps`, which is wrong whenever a container's timestamps
//! do not start at the first displayed picture (AVI stores decode-order timestamps, so
//! its decoder presents frame 0 at timestamp 1; MP4 edit lists; B-frame delays) or the
//! rate is not constant (phone video).
//!
//! At open the reader demuxes the video stream's packets once (no decoding) and sorts
//! their timestamps: that list is the display timeline, one entry per displayed frame.
//! It then decodes the first picture: the distance between its timestamp and the
//! timeline's first entry is the container's offset (1 for an AVI with B-frames, 0 for
//! most files). A decoded picture's number is the place of its timestamp, less the
//! offset, in the timeline.
//!
//! Seeking stays cheap and exact: seek to the last keyframe at or before the target,
//! decode forward, and take the picture whose number is the target. Pictures presented
//! before the first keyframe after a seek (an open GOP's leading pictures, whose
//! references lie before the seek point) are never taken; if the target is among them,
//! the reader seeks one keyframe earlier, and in the end decodes from the start.
//!
//! Rules for streams that cannot name their frames this way (documented in `--help` of
//! `frames`): a stream with packets that carry no timestamp, with repeated timestamps, a
//! GIF, or one whose decoded timestamps are not on its own timeline, is read in decode
//! order from the start, counting the pictures the decoder presents. A packet cut short
//! by the end of a truncated file (flagged corrupt by the demuxer) is not a frame, and
//! packets an edit list discards are not frames.
//!
//! # Rotation
//!
//! A display matrix (the `rotate` tag phones write) is applied to the RGB frames, by
//! multiples of 90 degrees, so frames come out upright as players show them;
//! [`VideoInfo::rotation`] says by how much.

use std::cell::Cell;

use anyhow::{Context, Result, anyhow, bail};
use ffmpeg::codec::packet::Ref as _;
use ffmpeg::codec::packet::side_data::Type as SideDataType;
use ffmpeg::format::Pixel;
use ffmpeg::media::Type;
use ffmpeg::software::scaling::{context::Context as Scaler, flag::Flags};
use ffmpeg::util::frame::video::Video as AvFrame;
use ffmpeg_next as ffmpeg;
use vidllm_core::sampling::Sampling;

/// Largest frame accepted (8K UHD); larger ones are refused before decoding.
pub(crate) const MAX_PIXELS: u64 = 7680 * 4320;

/// One decoded RGB frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Index in display order (0-based): the k-th picture the decoder presents.
    pub index: usize,
    /// Presentation time in seconds from the first displayed frame.
    pub pts: f64,
    /// Size after rotation.
    pub width: usize,
    pub height: usize,
    /// `[height, width, 3]` RGB, row-major, upright.
    pub rgb: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct VideoInfo {
    /// Displayed frames.
    pub frames: usize,
    /// The stream's average frame rate (0 when it has none): what transformers' video
    /// processors read from a decoder's metadata.
    pub fps: f64,
    /// Frame size as displayed (after rotation).
    pub width: usize,
    pub height: usize,
    /// Clockwise rotation applied to the decoded pictures (0, 90, 180 or 270 degrees).
    pub rotation: u32,
    /// The frame rate varies (frame intervals differ by more than 1%).
    pub variable_rate: bool,
}

/// The display timeline: each displayed frame's timestamp (stream time base), ascending.
#[derive(Debug, Clone)]
struct Timeline {
    pts: Vec<i64>,
    /// Keyframe packets, ascending.
    keys: Vec<Key>,
    /// Decoded timestamp minus timeline timestamp.
    offset: i64,
}

/// A place to seek to.
#[derive(Debug, Clone, Copy)]
struct Key {
    /// Display index of the keyframe (of the first frame shown after it, if it is not shown).
    index: usize,
    seek_ts: i64,
    shown: bool,
}

impl Timeline {
    /// The number of the decoded picture with timestamp `ts`, if the timeline lists it.
    fn index_of(&self, ts: i64) -> Option<usize> {
        self.pts.binary_search(&(ts - self.offset)).ok()
    }

    /// Frame `i`'s time in seconds from the first frame.
    fn seconds(&self, i: usize, tb: ffmpeg::Rational) -> f64 {
        (self.pts[i] - self.pts[0]) as f64 * f64::from(tb)
    }

    /// Position in `keys` of the last keyframe at or before display index `target`.
    fn key_before(&self, target: usize) -> Option<usize> {
        self.keys.partition_point(|k| k.index <= target).checked_sub(1)
    }
}

pub struct VideoReader {
    path: String,
    pub info: VideoInfo,
    /// `None`: frames are counted in decode order.
    timeline: Option<Timeline>,
    /// Set when a decode found the timeline wrong; later reads count in decode order.
    distrust: Cell<bool>,
    /// The video stream's time base (seconds per timestamp unit).
    time_base: ffmpeg::Rational,
}

pub(crate) fn fail(path: &str, what: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{path}: {what}: {e}")
}

/// A picture's timestamp: the decoder's best effort (the packet's pts, or a guess from
/// its dts when the container stores no pts, as AVI does).
pub(crate) fn timestamp(f: &AvFrame) -> Option<i64> {
    f.timestamp().or(f.pts())
}

/// The clockwise rotation a display matrix asks for, to the nearest multiple of 90
/// degrees (as the ffmpeg CLI's autorotation rounds it).
pub(crate) fn rotation_of(stream: &ffmpeg::format::stream::Stream) -> u32 {
    for sd in stream.side_data() {
        if sd.kind() == SideDataType::DisplayMatrix && sd.data().len() >= 36 {
            // av_display_rotation_get reads nine native-endian i32s; copy them aligned.
            let m: Vec<i32> = sd.data()[..36].chunks(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
            let ccw = unsafe { ffmpeg::ffi::av_display_rotation_get(m.as_ptr()) };
            if !ccw.is_finite() {
                return 0;
            }
            let cw = (-ccw / 90.0).round() as i64 * 90;
            return cw.rem_euclid(360) as u32;
        }
    }
    0
}

/// One demuxed packet of the video stream, as the timeline needs it.
struct Packet {
    /// Presentation timestamp (its dts when the container stores no pts, as AVI). A seek
    /// to a keyframe aims here, as the ffmpeg CLI's `-ss` does: demuxers whose index holds
    /// decode timestamps shifted by an edit list (MP4 with B-frames) would land a whole
    /// GOP early from the keyframe's dts.
    ts: i64,
    key: bool,
    /// False for packets an edit list discards: decoded, never shown.
    shown: bool,
}

/// The video stream's packets, without decoding: the number of frames they hold, and
/// the packets themselves when every one has a timestamp and decode timestamps never go
/// backwards (a packet is never shown before it is decoded).
fn scan_packets(ictx: &mut ffmpeg::format::context::Input, idx: usize) -> (usize, Option<Vec<Packet>>) {
    let (mut count, mut out, mut last_dts) = (0, Some(Vec::new()), i64::MIN);
    for (s, p) in ictx.packets() {
        if s.index() != idx {
            continue;
        }
        // The raw flags: the bindings' `Flags` type drops AV_PKT_FLAG_DISCARD.
        let flags = unsafe { (*p.as_ptr()).flags };
        // Cut short by the end of the file: not a frame.
        if flags & ffmpeg::ffi::AV_PKT_FLAG_CORRUPT != 0 {
            continue;
        }
        let shown = flags & ffmpeg::ffi::AV_PKT_FLAG_DISCARD == 0;
        count += usize::from(shown);
        let ordered = p.dts().is_none_or(|d| d >= last_dts && p.pts().is_none_or(|t| t >= d));
        last_dts = p.dts().unwrap_or(last_dts);
        match (p.pts().or(p.dts()), out.as_mut()) {
            (Some(ts), Some(v)) if ordered => v.push(Packet { ts, key: flags & ffmpeg::ffi::AV_PKT_FLAG_KEY != 0, shown }),
            _ => out = None,
        }
    }
    (count, out)
}

/// The file opened, its best video stream's index, and a decoder for that stream.
fn open_decoder(path: &str) -> Result<(ffmpeg::format::context::Input, usize, ffmpeg::decoder::Video)> {
    let ictx = ffmpeg::format::input(&path).map_err(|e| fail(path, "not a readable video", e))?;
    let stream = ictx.streams().best(Type::Video).ok_or_else(|| anyhow!("{path}: no video stream"))?;
    let idx = stream.index();
    let mut dec = ffmpeg::codec::context::Context::from_parameters(stream.parameters()).map_err(|e| fail(path, "codec", e))?;
    // libavcodec decodes on one thread unless told otherwise. Frame threads (one per
    // core of the pool) decode the runs of pictures between a seek and a sampled frame
    // side by side; the pictures, and their order, are the same.
    let threads = rayon::current_num_threads().clamp(1, 16);
    dec.set_threading(ffmpeg::codec::threading::Config {
        kind: ffmpeg::codec::threading::Type::Frame,
        count: threads,
        ..Default::default()
    });
    let dec = dec.decoder().video().map_err(|e| fail(path, "no decoder for the video stream", e))?;
    Ok((ictx, idx, dec))
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
        let (mut ictx, idx, dec) = open_decoder(path)?;
        let stream = ictx.stream(idx).expect("open_decoder found it");
        let tb = stream.time_base();
        let rate = stream.avg_frame_rate();
        let fps = if rate.denominator() != 0 && rate.numerator() > 0 { f64::from(rate) } else { 0.0 };
        let rotation = rotation_of(&stream);
        let (width, height) = (dec.width() as usize, dec.height() as usize);
        if width == 0 || height == 0 {
            bail!("{path}: the video stream has no size");
        }
        if (width * height) as u64 > MAX_PIXELS {
            bail!("{path}: {width}x{height} frames are larger than the {MAX_PIXELS}-pixel limit");
        }
        let is_gif = ictx.format().name().contains("gif");
        let (count, packets) = scan_packets(&mut ictx, idx);
        let mut reader = Self {
            path: path.to_string(),
            info: VideoInfo {
                frames: count,
                fps,
                width: if rotation % 180 == 90 { height } else { width },
                height: if rotation % 180 == 90 { width } else { height },
                rotation,
                variable_rate: false,
            },
            timeline: None,
            distrust: Cell::new(false),
            time_base: tb,
        };
        if let (Some(mut packets), false) = (packets, is_gif) {
            packets.sort_unstable_by_key(|p| p.ts);
            let pts: Vec<i64> = packets.iter().filter(|p| p.shown).map(|p| p.ts).collect();
            let repeats = pts.windows(2).any(|w| w[0] == w[1]);
            if !pts.is_empty() && !repeats {
                // A keyframe's display index: its place on the timeline (a discarded one
                // leads to the first frame shown after it).
                let keys = packets
                    .iter()
                    .filter(|p| p.key)
                    .map(|p| Key { index: pts.partition_point(|&t| t < p.ts), seek_ts: p.ts, shown: p.shown })
                    .collect();
                // The first picture's timestamp anchors the timeline.
                if let Some(first) = reader.first_timestamp()? {
                    let gaps: Vec<i64> = pts.windows(2).map(|w| w[1] - w[0]).collect();
                    let (lo, hi) = (gaps.iter().min().copied().unwrap_or(1), gaps.iter().max().copied().unwrap_or(1));
                    reader.info.variable_rate = hi as f64 > lo as f64 * 1.01;
                    let tl = Timeline { offset: first - pts[0], pts, keys };
                    let span = tl.seconds(tl.pts.len() - 1, tb);
                    if reader.info.fps == 0.0 && span > 0.0 {
                        reader.info.fps = (tl.pts.len() - 1) as f64 / span;
                    }
                    reader.timeline = Some(tl);
                }
            }
        }
        Ok(reader)
    }

    /// The timestamp of the first picture the decoder presents.
    fn first_timestamp(&self) -> Result<Option<i64>> {
        let mut first = None;
        self.each_picture(|f| {
            first = timestamp(f);
            Ok(true)
        })?;
        Ok(first)
    }

    /// Frames are numbered from the timeline and reached by seeking; otherwise (no usable
    /// timeline, or a decode found it disagreeing with the decoder) they are counted in
    /// decode order from the start, and their times are the decoder's best-effort
    /// timestamps.
    pub fn seekable(&self) -> bool {
        self.timeline.is_some() && !self.distrust.get()
    }

    /// Decode the frames a sampling policy picks. Fixed-count policies pick by displayed
    /// frame index; `fps` picks by time, the frame shown nearest each tick (so it follows
    /// a variable frame rate).
    pub fn sample(&self, policy: Sampling) -> Result<Vec<Frame>> {
        let fps = if self.info.fps > 0.0 { self.info.fps } else { 10.0 };
        let indices = match &self.timeline {
            Some(tl) => {
                let times: Vec<f64> = (0..tl.pts.len()).map(|i| tl.seconds(i, self.time_base)).collect();
                policy.indices_on_timeline(&times, fps)
            }
            None => policy.indices(self.info.frames, fps),
        }
        .map_err(|e| anyhow!("{}: {e}", self.path))?;
        self.frames_at(&indices)
    }

    /// Frames at the given indices (any order; returned in the order asked).
    pub fn frames_at(&self, indices: &[usize]) -> Result<Vec<Frame>> {
        let mut sorted: Vec<usize> = indices.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let decoded = match (&self.timeline, self.distrust.get()) {
            (Some(t), false) => match self.decode_seeking(t, &sorted)? {
                Some(d) => d,
                None => {
                    // A picture off the timeline: count in decode order from now on.
                    self.distrust.set(true);
                    self.decode_in_order(&sorted)?
                }
            },
            _ => self.decode_in_order(&sorted)?,
        };
        indices
            .iter()
            .map(|i| {
                decoded
                    .iter()
                    .find(|f| f.index == *i)
                    .cloned()
                    .ok_or_else(|| anyhow!("{}: frame {i} could not be decoded (the stream ends early or is corrupt)", self.path))
            })
            .collect()
    }

    /// Decode from the start, handing `visit` each picture as the decoder presents it,
    /// until `visit` says it is done or the stream ends.
    fn each_picture(&self, mut visit: impl FnMut(&AvFrame) -> Result<bool>) -> Result<()> {
        let (mut ictx, idx, mut dec) = open_decoder(&self.path)?;
        let mut f = AvFrame::empty();
        for (s, packet) in ictx.packets() {
            if s.index() != idx {
                continue;
            }
            dec.send_packet(&packet).map_err(|e| fail(&self.path, "corrupt video data", e))?;
            while dec.receive_frame(&mut f).is_ok() {
                if visit(&f)? {
                    return Ok(());
                }
            }
        }
        let _ = dec.send_eof();
        while dec.receive_frame(&mut f).is_ok() {
            if visit(&f)? {
                break;
            }
        }
        Ok(())
    }

    /// Every picture from the start, counted as the decoder presents them; keeps the targets.
    fn decode_in_order(&self, targets: &[usize]) -> Result<Vec<Frame>> {
        let tb = self.time_base;
        let mut conv = Converter::new(self.info.rotation);
        let mut out = Vec::new();
        let (mut next, mut first) = (0usize, None);
        let last = *targets.last().unwrap_or(&0);
        self.each_picture(|f| {
            let i = next;
            next += 1;
            let ts = timestamp(f);
            let first = *first.get_or_insert(ts);
            if targets.binary_search(&i).is_ok() {
                let t = match (ts, first, self.info.fps) {
                    (Some(t), Some(f0), _) => (t - f0) as f64 * f64::from(tb),
                    (_, _, fps) if fps > 0.0 => i as f64 / fps,
                    _ => 0.0,
                };
                out.push(conv.rgb(f, i, t)?);
            }
            Ok(i >= last)
        })?;
        Ok(out)
    }

    /// The targets (ascending) by seeking on the timeline. `None` when the decoder's
    /// pictures disagree with the timeline (a timestamp not on it, or pictures that do not
    /// follow one another on it), so the timeline cannot number this stream.
    fn decode_seeking(&self, tl: &Timeline, targets: &[usize]) -> Result<Option<Vec<Frame>>> {
        let (mut ictx, idx, mut dec) = open_decoder(&self.path)?;
        let fps = if self.info.fps > 0.0 { self.info.fps } else { 10.0 };
        let mut conv = Converter::new(self.info.rotation);
        let mut out = Vec::new();
        // Where the decoder is: the first picture trusted since the last seek (None until
        // a keyframe is presented), and the last trusted picture presented.
        let mut from: Option<usize> = None;
        let mut last: Option<usize> = None;
        let mut positioned = false;
        let mut f = AvFrame::empty();
        for &target in targets {
            // Carry on decoding when the target is close ahead, or no keyframe lies between;
            // otherwise seek to the last keyframe at or before it.
            let close = positioned
                && last.is_some_and(|l| {
                    l < target && (((target - l) as f64) < 2.0 * fps || !tl.keys.iter().any(|k| k.index > l && k.index <= target))
                });
            // None: decode on; Some(Some(k)): seek to keys[k]; Some(None): from the start.
            let mut start = if close { None } else { Some(tl.key_before(target)) };
            let mut retried = false;
            let found = loop {
                match start {
                    None => {}
                    Some(Some(k)) => {
                        let key = tl.keys[k];
                        let r = unsafe {
                            ffmpeg::ffi::avformat_seek_file(ictx.as_mut_ptr(), idx as i32, i64::MIN, key.seek_ts, key.seek_ts, 0)
                        };
                        if r < 0 {
                            return Err(fail(&self.path, "seek", ffmpeg::Error::from(r)));
                        }
                        dec.flush();
                        // A keyframe an edit list hides is never presented: trust from the
                        // first picture shown after it.
                        (from, last) = (if key.shown { None } else { Some(key.index) }, None);
                    }
                    Some(None) => {
                        (ictx, _, dec) = open_decoder(&self.path)?;
                        (from, last) = (Some(0), None);
                    }
                }
                positioned = true;
                let (mut picture, mut eof) = (None, false);
                'read: loop {
                    while dec.receive_frame(&mut f).is_ok() {
                        let Some(i) = timestamp(&f).and_then(|ts| tl.index_of(ts)) else { return Ok(None) };
                        if from.is_none() && f.is_key() {
                            from = Some(i);
                        }
                        // Pictures before the first trusted one may refer to pictures before
                        // the seek point (an open GOP's leading pictures).
                        let Some(t) = from.filter(|&t| i >= t) else { continue };
                        if last.is_some_and(|l| i != l + 1) {
                            return Ok(None);
                        }
                        last = Some(i);
                        // Past it (it came before the trusted start, or was never presented).
                        if t > target || i > target {
                            break 'read;
                        }
                        if i == target {
                            picture = Some(conv.rgb(&f, i, tl.seconds(i, self.time_base))?);
                            break 'read;
                        }
                    }
                    if eof {
                        break;
                    }
                    match ictx.packets().find(|(s, _)| s.index() == idx) {
                        Some((_, packet)) => dec.send_packet(&packet).map_err(|e| fail(&self.path, "corrupt video data", e))?,
                        None => {
                            let _ = dec.send_eof();
                            eof = true;
                        }
                    }
                }
                // A drained decoder takes no more packets: the next target seeks.
                positioned &= !eof;
                if picture.is_some() {
                    break picture;
                }
                // Missed it. Decoding on from an earlier picture: seek. After a seek: one
                // keyframe earlier (it overshot, no keyframe came, or the decoder held the
                // pictures after an open GOP's keyframe back at the end of the stream, as
                // H.264's does), then from the start. From the start: it is not presented.
                start = match start {
                    None => Some(tl.key_before(target)),
                    Some(Some(_)) if retried => Some(None),
                    Some(Some(k)) => {
                        retried = true;
                        Some(k.checked_sub(1))
                    }
                    Some(None) => break None,
                };
            };
            out.extend(found);
        }
        Ok(Some(out))
    }
}

/// YUV (or palette) to packed RGB24, as the ffmpeg CLI's default (bicubic) swscale does,
/// then turned upright.
pub(crate) struct Converter {
    ctx: Option<(Scaler, Pixel, u32, u32)>,
    rotation: u32,
}

impl Converter {
    pub(crate) fn new(rotation: u32) -> Self {
        Self { ctx: None, rotation }
    }

    pub(crate) fn rgb(&mut self, f: &AvFrame, index: usize, pts: f64) -> Result<Frame> {
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
        let (width, height, rgb) = rotate(packed, w, h, self.rotation);
        Ok(Frame { index, pts, width, height, rgb })
    }
}

/// Rotate packed RGB `[h, w, 3]` clockwise by `degrees` (a multiple of 90); returns the
/// new width, height and pixels.
fn rotate(rgb: Vec<u8>, w: usize, h: usize, degrees: u32) -> (usize, usize, Vec<u8>) {
    let (ow, oh) = match degrees {
        90 | 270 => (h, w),
        180 => (w, h),
        _ => return (w, h, rgb),
    };
    let mut out = vec![0u8; rgb.len()];
    for r in 0..oh {
        for c in 0..ow {
            // Output pixel (r, c) comes from input pixel (sr, sc).
            let (sr, sc) = match degrees {
                90 => (h - 1 - c, r),
                180 => (h - 1 - r, w - 1 - c),
                _ => (c, w - 1 - r),
            };
            let (o, s) = ((r * ow + c) * 3, (sr * w + sc) * 3);
            out[o..o + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    (ow, oh, out)
}

#[cfg(test)]
mod tests {
    use super::rotate;

    #[test]
    fn rotations_turn_a_picture_clockwise() {
        // 2 wide, 3 high; pixel value = row * 2 + column.
        let px: Vec<u8> = (0..6).flat_map(|v| [v, v, v]).collect();
        let grey = |v: &[u8]| v.chunks(3).map(|p| p[0]).collect::<Vec<_>>();
        let (w, h, r) = rotate(px.clone(), 2, 3, 90);
        assert_eq!((w, h, grey(&r)), (3, 2, vec![4, 2, 0, 5, 3, 1]));
        let (w, h, r) = rotate(px.clone(), 2, 3, 180);
        assert_eq!((w, h, grey(&r)), (2, 3, vec![5, 4, 3, 2, 1, 0]));
        let (w, h, r) = rotate(px.clone(), 2, 3, 270);
        assert_eq!((w, h, grey(&r)), (3, 2, vec![1, 3, 5, 0, 2, 4]));
        assert_eq!(rotate(px.clone(), 2, 3, 0).2, px);
    }
}
