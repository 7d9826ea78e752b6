//! Live video input through the ffmpeg libraries: a stream read as it arrives, with no
//! end known in advance. Any input libavformat opens: a file (with `follow`, one still
//! being written, read on at its end as `tail -f` does), a pipe (`-` is stdin), a network
//! stream, or a capture device (`/dev/video*` opens as v4l2 unless a format is named).
//!
//! Frames are numbered in the order the decoder presents them (frame k is the k-th
//! picture), and timed from the first picture's timestamp in the stream's time base. A
//! stream without timestamps is timed by its nominal rate, else by the wall clock since
//! its first picture. Only the frames the caller takes are converted to RGB.

use std::ffi::CString;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use ffmpeg::Dictionary;
use ffmpeg::media::Type;
use ffmpeg::util::frame::video::Video as AvFrame;
use ffmpeg_next as ffmpeg;

use crate::video::{Converter, Frame, MAX_PIXELS, fail, rotation_of, timestamp};

/// Where a live stream comes from.
#[derive(Debug, Clone)]
pub struct LiveInput {
    /// A path, a URL, `-` for stdin, or a device.
    pub source: String,
    /// The demuxer (`nut`, `mpegts`, `v4l2`, ...) when the input cannot be probed.
    pub format: Option<String>,
    /// Read a file on at its end as it grows; the stream then ends only when the reader stops.
    pub follow: bool,
}

impl LiveInput {
    /// The name libavformat opens: stdin is its `pipe:0`.
    fn url(&self) -> &str {
        if self.source == "-" { "pipe:0" } else { &self.source }
    }

    /// The demuxer named, or v4l2 for a Linux capture device.
    fn format(&self) -> Option<&str> {
        self.format.as_deref().or_else(|| self.source.starts_with("/dev/video").then_some("v4l2"))
    }

    fn open(&self) -> Result<ffmpeg::format::context::Input> {
        ffmpeg::init().map_err(|e| anyhow!("ffmpeg init: {e}"))?;
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
        let url = self.url();
        let mut opts = Dictionary::new();
        if self.follow {
            // The file protocol's own options: at the end of the file, wait and read again;
            // and say the file cannot seek, or demuxers that look for an index at its end
            // (NUT, MP4) would wait there for one a recording still being written lacks.
            opts.set("follow", "1");
            opts.set("seekable", "0");
        }
        let opened = match self.format() {
            Some(name) => {
                let cname = CString::new(name).map_err(|_| anyhow!("input format {name:?}"))?;
                // SAFETY: a NUL-terminated name; the result is a static table entry or null.
                let find = || unsafe { ffmpeg::ffi::av_find_input_format(cname.as_ptr()) };
                let mut f = find();
                if f.is_null() {
                    // Not a demuxer: a device's (v4l2, lavfi, x11grab...), once libavdevice
                    // has registered them.
                    register_devices().map_err(|e| anyhow!("{url}: input format {name:?}: {e}"))?;
                    f = find();
                }
                if f.is_null() {
                    bail!("{url}: unknown input format {name:?} (see `ffmpeg -demuxers` / `ffmpeg -devices`)");
                }
                // SAFETY: a valid input format from libavformat's table.
                let format = ffmpeg::Format::Input(unsafe { ffmpeg::format::Input::wrap(f as *mut _) });
                ffmpeg::format::open_with(&url, &format, opts).map(|c| c.input())
            }
            None => ffmpeg::format::input_with_dictionary(&url, opts),
        };
        opened.map_err(|e| fail(url, "cannot open the live stream", e))
    }
}

/// Register ffmpeg's capture devices (v4l2, lavfi, x11grab...) with the libavformat this
/// binary links, once. They are libavdevice's, which is opened when a source names one
/// rather than linked: linked, it and what it pulls in (libavfilter, SDL, OpenAL, GL,
/// speech synthesis: 214 shared libraries against 135) held 16 MiB of every run's memory,
/// video or not.
fn register_devices() -> Result<()> {
    static DEVICES: OnceLock<Result<libloading::Library, String>> = OnceLock::new();
    let loaded = DEVICES.get_or_init(|| {
        // The libavdevice of the linked libavformat: FFmpeg releases them with one major.
        // SAFETY: a version query without arguments.
        let major = unsafe { ffmpeg::ffi::avformat_version() } >> 16;
        let name = if cfg!(target_os = "macos") {
            format!("libavdevice.{major}.dylib")
        } else if cfg!(windows) {
            format!("avdevice-{major}.dll")
        } else {
            format!("libavdevice.so.{major}")
        };
        // SAFETY: FFmpeg's own library; its initialisers set up its static tables only.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: `avdevice_register_all(void)` registers libavdevice's formats with the
        // libavformat already loaded; the library stays loaded for the process's life.
        unsafe {
            let register = lib.get::<unsafe extern "C" fn()>(b"avdevice_register_all\0").map_err(|e| format!("{name}: {e}"))?;
            register();
        }
        Ok(lib)
    });
    match loaded {
        Ok(_) => Ok(()),
        Err(e) => bail!("capture devices need FFmpeg's libavdevice, which could not be loaded ({e})"),
    }
}

/// Read `input` from its start until it ends or `on_frame` returns false. Each decoded
/// picture's stream time is offered to `take`; those it takes are converted to upright
/// RGB and handed to `on_frame`. A stream that ends is `Ok`; one that breaks (corrupt
/// data, a read error) is an error naming the last frame read.
pub fn read_live(input: &LiveInput, mut take: impl FnMut(f64) -> bool, mut on_frame: impl FnMut(Frame) -> bool) -> Result<()> {
    let mut ictx = input.open()?;
    let url = input.url().to_string();
    let stream = ictx.streams().best(Type::Video).ok_or_else(|| anyhow!("{url}: no video stream"))?;
    let (idx, tb, rotation) = (stream.index(), stream.time_base(), rotation_of(&stream));
    let rate = stream.avg_frame_rate();
    let nominal = (rate.denominator() != 0 && rate.numerator() > 0).then(|| f64::from(rate));
    let dec = ffmpeg::codec::context::Context::from_parameters(stream.parameters()).map_err(|e| fail(&url, "codec", e))?;
    let mut dec = dec.decoder().video().map_err(|e| fail(&url, "no decoder for the video stream", e))?;
    let mut conv = Converter::new(rotation);
    let mut clock = StreamClock { first: None, started: None, nominal, tb: f64::from(tb) };
    let (mut count, mut f) = (0usize, AvFrame::empty());
    // Each picture the decoder presents: timed, offered, maybe converted. False: stop.
    let mut visit = |f: &AvFrame, count: &mut usize| -> Result<bool> {
        let (w, h) = (f.width() as u64, f.height() as u64);
        if w * h > MAX_PIXELS {
            bail!("{url}: {w}x{h} frames are larger than the {MAX_PIXELS}-pixel limit");
        }
        let index = *count;
        *count += 1;
        let time = clock.seconds(timestamp(f), index);
        if !take(time) {
            return Ok(true);
        }
        Ok(on_frame(conv.rgb(f, index, time)?))
    };
    for (s, packet) in ictx.packets() {
        if s.index() != idx {
            continue;
        }
        dec.send_packet(&packet).map_err(|e| anyhow!("{url}: corrupt video data after frame {count}: {e}"))?;
        while dec.receive_frame(&mut f).is_ok() {
            if !visit(&f, &mut count)? {
                return Ok(());
            }
        }
    }
    let _ = dec.send_eof();
    while dec.receive_frame(&mut f).is_ok() {
        if !visit(&f, &mut count)? {
            break;
        }
    }
    Ok(())
}

/// Stream time of the pictures of a live stream.
struct StreamClock {
    /// The first picture's timestamp.
    first: Option<i64>,
    /// When the first picture came (for streams without timestamps or a rate).
    started: Option<Instant>,
    nominal: Option<f64>,
    /// Seconds per timestamp unit.
    tb: f64,
}

impl StreamClock {
    /// Seconds from the first picture to the `index`-th, stamped `ts`.
    fn seconds(&mut self, ts: Option<i64>, index: usize) -> f64 {
        let started = *self.started.get_or_insert_with(Instant::now);
        match (ts, self.nominal) {
            (Some(ts), _) => (ts - *self.first.get_or_insert(ts)) as f64 * self.tb,
            (None, Some(fps)) => index as f64 / fps,
            (None, None) => started.elapsed().as_secs_f64(),
        }
    }
}

/// Which frames a live window takes: the first picture at or after each tick of `fps`
/// ticks a second of stream time; a stream that jumps ahead skips the ticks it passed.
#[derive(Debug, Clone, Copy)]
pub struct Ticks {
    fps: f64,
    next: f64,
}

impl Ticks {
    pub fn new(fps: f64) -> Result<Self> {
        if !(fps.is_finite() && fps > 0.0) {
            bail!("--fps must be a positive number of frames a second (got {fps})");
        }
        Ok(Self { fps, next: 0.0 })
    }

    /// Whether the picture at `time` is taken.
    pub fn take(&mut self, time: f64) -> bool {
        // Half a microsecond of slack: times are a timestamp times a float time base.
        if time + 5e-7 < self.next {
            return false;
        }
        self.next = ((time + 5e-7) * self.fps).floor() / self.fps + 1.0 / self.fps;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_take_the_first_picture_of_each_interval() {
        let mut t = Ticks::new(2.0).unwrap();
        // 10 fps pictures: one taken each half second.
        let taken: Vec<usize> = (0..25).filter(|&i| t.take(i as f64 / 10.0)).collect();
        assert_eq!(taken, vec![0, 5, 10, 15, 20]);
        // A jump past several ticks takes the picture after it, then the next tick.
        let mut t = Ticks::new(1.0).unwrap();
        assert!(t.take(0.0) && !t.take(0.5) && t.take(3.2) && !t.take(3.9) && t.take(4.0));
        assert!(Ticks::new(0.0).is_err() && Ticks::new(f64::NAN).is_err());
    }
}
