//! Which frames of a video to look at. Each policy is the formula its reference uses, so
//! the same indices (and so the same pixels) reach the model.

/// A frame-sampling policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// transformers' docs: `np.arange(0, total, total / n).astype(int)`.
    Hf { n: usize },
    /// The original Video-LLaVA repo: `np.linspace(0, total - 1, n, dtype=int)`.
    Linspace { n: usize },
    /// PLLaVA: `seg = (total - 1) / n; index_i = int(seg / 2) + int(round(seg * i))`.
    Pllava { n: usize },
    /// One frame every `1 / fps` seconds from the start, at most `max_frames` (spread
    /// uniformly over the video when there would be more).
    Fps { fps: f64, max_frames: usize },
    /// SmolVLM2's video processor (`SmolVLMVideoProcessor.sample_frames`): `round(fps *
    /// duration)` frames, at most `max_frames`, spread with `np.linspace` from the first
    /// to the last frame, or from 1 s in to 1 s before the end when the video is longer
    /// than those frames need plus the 2 s.
    SmolVlm { fps: f64, max_frames: usize },
}

/// When the sampled frames were taken, as a model's prompt may state them (SmolVLM2's
/// "Frame from 00:03:" lines and the video's length): each frame's time, and the video's
/// duration, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameTimes {
    pub times: Vec<f64>,
    pub duration: f64,
}

impl FrameTimes {
    /// Frames `indices` of a video of `total` frames at `fps` (what transformers derives
    /// from a decoder's metadata: `index / fps`, `total / fps`).
    pub fn of_indices(indices: &[usize], total: usize, fps: f64) -> Self {
        Self { times: indices.iter().map(|&i| i as f64 / fps).collect(), duration: total as f64 / fps }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplingError(pub String);

impl std::fmt::Display for SamplingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SamplingError {}

impl Sampling {
    /// A policy by name (`hf`, `linspace`, `pllava`, `fps`, `smolvlm`), as the CLI and the
    /// browser package take it: `n` frames, or with `fps` and `smolvlm`, `fps` frames a
    /// second and at most `max_frames`.
    pub fn from_name(name: &str, n: usize, fps: f64, max_frames: usize) -> Result<Self, SamplingError> {
        Ok(match name {
            "hf" => Sampling::Hf { n },
            "linspace" => Sampling::Linspace { n },
            "pllava" => Sampling::Pllava { n },
            "fps" => Sampling::Fps { fps, max_frames },
            "smolvlm" => Sampling::SmolVlm { fps, max_frames },
            o => return Err(SamplingError(format!("unknown sampling {o:?} (hf, linspace, pllava, fps, smolvlm)"))),
        })
    }

    /// The policy's name, as [`Sampling::from_name`] takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Sampling::Hf { .. } => "hf",
            Sampling::Linspace { .. } => "linspace",
            Sampling::Pllava { .. } => "pllava",
            Sampling::Fps { .. } => "fps",
            Sampling::SmolVlm { .. } => "smolvlm",
        }
    }

    /// The same policy with `n` frames (a fixed count) or at most `n` (the rate-based ones).
    pub fn with_frames(self, n: usize) -> Self {
        match self {
            Sampling::Hf { .. } => Sampling::Hf { n },
            Sampling::Linspace { .. } => Sampling::Linspace { n },
            Sampling::Pllava { .. } => Sampling::Pllava { n },
            Sampling::Fps { fps, .. } => Sampling::Fps { fps, max_frames: n },
            Sampling::SmolVlm { fps, .. } => Sampling::SmolVlm { fps, max_frames: n },
        }
    }

    /// `k` times the frames: a fixed count times `k`, a rate and its cap times `k` (the
    /// candidates of a key-frame method).
    pub fn oversampled(self, k: usize) -> Self {
        match self {
            Sampling::Fps { fps, max_frames } => Sampling::Fps { fps: fps * k as f64, max_frames: max_frames * k },
            Sampling::SmolVlm { fps, max_frames } => Sampling::SmolVlm { fps: fps * k as f64, max_frames: max_frames * k },
            other => other.with_frames(other.frames() * k),
        }
    }

    /// Frames a second a rate-based policy takes (`None` for a fixed count).
    pub fn fps(&self) -> Option<f64> {
        match *self {
            Sampling::Fps { fps, .. } | Sampling::SmolVlm { fps, .. } => Some(fps),
            _ => None,
        }
    }

    /// Frames asked for: the fixed count, or the most a rate-based policy takes.
    pub fn frames(&self) -> usize {
        match *self {
            Sampling::Hf { n } | Sampling::Linspace { n } | Sampling::Pllava { n } => n,
            Sampling::Fps { max_frames, .. } | Sampling::SmolVlm { max_frames, .. } => max_frames,
        }
    }

    /// Sampling times in seconds for a video of `duration` seconds whose frames come
    /// `frame_rate` a second: the policy's frame indices on that grid, as times. What a
    /// browser asks for, where a `<video>` tells its duration but gives no frame numbers.
    pub fn times(&self, duration: f64, frame_rate: f64) -> Result<Vec<f64>, SamplingError> {
        if !(duration.is_finite() && duration > 0.0) {
            return Err(SamplingError(format!("the video has no usable duration ({duration} s)")));
        }
        if !(frame_rate.is_finite() && frame_rate > 0.0) {
            return Err(SamplingError(format!("bad frame rate {frame_rate}")));
        }
        let total = ((duration * frame_rate).round() as usize).max(1);
        Ok(self.indices(total, frame_rate)?.into_iter().map(|i| i as f64 / frame_rate).collect())
    }

    /// Frame indices on a video's display timeline (`frame_times`, seconds from its first
    /// frame, ascending) whose average rate is `src_fps`: `fps` by time
    /// ([`Sampling::indices_by_time`], following a variable rate), the other policies by
    /// displayed-frame index on the frame count ([`Sampling::indices`]). What
    /// `vidllm-native` picks in a file it can number, and the page in a file it demuxes.
    pub fn indices_on_timeline(&self, frame_times: &[f64], src_fps: f64) -> Result<Vec<usize>, SamplingError> {
        match self {
            Sampling::Fps { .. } => self.indices_by_time(frame_times),
            _ => self.indices(frame_times.len(), src_fps),
        }
    }

    /// Frame indices by time, for a video whose displayed frames come at `frame_times`
    /// (seconds, ascending; the rate may vary). `fps` takes the frame shown nearest each
    /// `1 / fps` tick (on a constant rate, the same frames as [`Sampling::indices`]); the
    /// fixed-count policies number frames, so they take `indices` on the frame count.
    pub fn indices_by_time(&self, frame_times: &[f64]) -> Result<Vec<usize>, SamplingError> {
        let total = frame_times.len();
        let Sampling::Fps { fps, max_frames } = *self else {
            let span = frame_times.last().copied().unwrap_or(0.0);
            let rate = if total > 1 && span > 0.0 { (total - 1) as f64 / span } else { 1.0 };
            return self.indices(total, rate);
        };
        if max_frames == 0 {
            return Err(SamplingError("asked for 0 frames".into()));
        }
        if total == 0 {
            return Err(SamplingError("the video has no frames".into()));
        }
        if !(fps.is_finite() && fps > 0.0) {
            return Err(SamplingError(format!("bad frame rate (sampling {fps} fps)")));
        }
        // The last frame counts while a tick falls in the first half of its interval.
        let last = frame_times[total - 1];
        let tail = if total > 1 { (last - frame_times[total - 2]) / 2.0 } else { 0.5 / fps };
        let mut every = Vec::new();
        for k in 0.. {
            let t = k as f64 / fps;
            if t >= last + tail {
                break;
            }
            // Nearest frame time; a tie goes to the later frame, as `round` does.
            let after = frame_times.partition_point(|&x| x < t).min(total - 1);
            let i = if after > 0 && t - frame_times[after - 1] < frame_times[after] - t { after - 1 } else { after };
            if every.last() != Some(&i) {
                every.push(i);
            }
        }
        Ok(if every.len() <= max_frames { every } else { linspace(every.len(), max_frames).into_iter().map(|j| every[j]).collect() })
    }

    /// Frame indices for a video of `total` frames at `src_fps`.
    pub fn indices(&self, total: usize, src_fps: f64) -> Result<Vec<usize>, SamplingError> {
        let asked = self.frames();
        if asked == 0 {
            return Err(SamplingError("asked for 0 frames".into()));
        }
        if total == 0 {
            return Err(SamplingError("the video has no frames".into()));
        }
        // Positive and finite (an infinite rate would never leave the first frame).
        let rate = |r: f64| r.is_finite() && r > 0.0;
        let rates = |fps: f64| -> Result<(), SamplingError> {
            if !(rate(fps) && rate(src_fps)) {
                return Err(SamplingError(format!("bad frame rate (sampling {fps} fps from a {src_fps} fps video)")));
            }
            Ok(())
        };
        let fixed = |n: usize| -> Result<(), SamplingError> {
            if total < n {
                return Err(SamplingError(format!("the video has {total} frames, fewer than the {n} asked")));
            }
            Ok(())
        };
        Ok(match *self {
            Sampling::Hf { n } => {
                fixed(n)?;
                let step = total as f64 / n as f64;
                (0..n).map(|i| (i as f64 * step) as usize).collect()
            }
            Sampling::Linspace { n } => {
                fixed(n)?;
                linspace(total, n)
            }
            Sampling::Pllava { n } => {
                fixed(n)?;
                let seg = (total - 1) as f64 / n as f64;
                (0..n).map(|i| (seg / 2.0) as usize + round_half_even(seg * i as f64) as usize).collect()
            }
            Sampling::Fps { fps, max_frames } => {
                rates(fps)?;
                let every: Vec<usize> = (0..).map(|k| (k as f64 * src_fps / fps).round() as usize).take_while(|&i| i < total).collect();
                if every.len() <= max_frames { every } else { linspace(every.len(), max_frames).into_iter().map(|j| every[j]).collect() }
            }
            Sampling::SmolVlm { fps, max_frames } => {
                rates(fps)?;
                let duration = total as f64 / src_fps;
                let desired = (round_half_even(fps * duration) as usize).min(max_frames).max(1);
                let (mut start, mut end) = (0, total - 1);
                const SKIP_SECS: f64 = 1.0;
                if duration - 2.0 * SKIP_SECS > max_frames as f64 * fps {
                    start = (SKIP_SECS * src_fps) as usize;
                    end = ((total as f64 - SKIP_SECS * src_fps) as usize).min(total - 1);
                }
                if start >= end {
                    (start, end) = (0, total - 1);
                }
                let mut picked = linspace_between(start, end, desired);
                picked.dedup();
                picked
            }
        })
    }
}

/// `np.linspace(0, total - 1, n, dtype=int)` (truncation toward zero, as numpy's cast).
fn linspace(total: usize, n: usize) -> Vec<usize> {
    linspace_between(0, total - 1, n)
}

/// `np.linspace(start, end, n, dtype=int)`: `start + i * step`, the last exactly `end`.
fn linspace_between(start: usize, end: usize, n: usize) -> Vec<usize> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) as f64 / (n - 1) as f64;
    (0..n).map(|i| if i == n - 1 { end } else { (start as f64 + i as f64 * step) as usize }).collect()
}

/// Python's `round`: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 { r - x.signum() } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_match_numpy() {
        // np.arange(0, 132, 132 / 8).astype(int)
        assert_eq!(Sampling::Hf { n: 8 }.indices(132, 25.0).unwrap(), vec![0, 16, 33, 49, 66, 82, 99, 115]);
        // np.linspace(0, 131, 8, dtype=int)
        assert_eq!(Sampling::Linspace { n: 8 }.indices(132, 25.0).unwrap(), vec![0, 18, 37, 56, 74, 93, 112, 131]);
        // PLLaVA: seg = 131 / 8 = 16.375 -> 8 + round(16.375 i)
        assert_eq!(Sampling::Pllava { n: 8 }.indices(132, 25.0).unwrap(), vec![8, 24, 41, 57, 74, 90, 106, 123]);
    }

    #[test]
    fn smolvlm_policy_matches_transformers() {
        // SmolVLMVideoProcessor.sample_frames (transformers 4.57.1) on the same metadata.
        let p = |fps, max_frames| Sampling::SmolVlm { fps, max_frames };
        assert_eq!(p(1.0, 64).indices(120, 30000.0 / 1001.0).unwrap(), vec![0, 39, 79, 119]);
        assert_eq!(p(1.0, 64).indices(250, 25.0).unwrap(), vec![0, 27, 55, 83, 110, 138, 166, 193, 221, 249]);
        assert_eq!(p(2.0, 8).indices(9000, 30.0).unwrap(), vec![30, 1307, 2584, 3861, 5138, 6415, 7692, 8970]);
        let long = p(1.0, 64).indices(9000, 30.0).unwrap();
        assert_eq!((long.len(), long[0], long[1], long[31], long[63]), (64, 30, 171, 4429, 8970));
        assert_eq!(p(1.0, 64).indices(30, 30.0).unwrap(), vec![0]);
        assert_eq!(p(1.0, 64).indices(1, 25.0).unwrap(), vec![0]);
        assert_eq!(Sampling::from_name("smolvlm", 8, 1.0, 64).unwrap(), p(1.0, 64));
        assert_eq!(p(1.0, 64).with_frames(16), p(1.0, 16));
    }

    #[test]
    fn fps_policy_caps_the_count() {
        assert_eq!(Sampling::Fps { fps: 1.0, max_frames: 10 }.indices(132, 25.0).unwrap(), vec![0, 25, 50, 75, 100, 125]);
        assert_eq!(Sampling::Fps { fps: 5.0, max_frames: 3 }.indices(132, 25.0).unwrap().len(), 3);
    }

    #[test]
    fn fps_by_time_follows_a_variable_rate() {
        // On a constant rate, the same frames as by index.
        let cfr: Vec<f64> = (0..132).map(|i| i as f64 / 25.0).collect();
        let p = Sampling::Fps { fps: 1.0, max_frames: 10 };
        assert_eq!(p.indices_by_time(&cfr).unwrap(), p.indices(132, 25.0).unwrap());
        let ntsc: Vec<f64> = (0..300).map(|i| i as f64 * 1001.0 / 30000.0).collect();
        let p = Sampling::Fps { fps: 3.0, max_frames: 100 };
        assert_eq!(p.indices_by_time(&ntsc).unwrap(), p.indices(300, 30000.0 / 1001.0).unwrap());
        // 1 s at 10 fps, then 1 s at 30 fps: 2 frames a second are 0.5 s apart in time,
        // 5 frames apart in the first second and 15 in the second.
        let vfr: Vec<f64> = (0..10).map(|i| i as f64 / 10.0).chain((0..30).map(|i| 1.0 + i as f64 / 30.0)).collect();
        assert_eq!(Sampling::Fps { fps: 2.0, max_frames: 8 }.indices_by_time(&vfr).unwrap(), vec![0, 5, 10, 25]);
        // Fixed counts number the displayed frames.
        assert_eq!(Sampling::Hf { n: 4 }.indices_by_time(&vfr).unwrap(), vec![0, 10, 20, 30]);
        assert!(Sampling::Fps { fps: 0.0, max_frames: 8 }.indices_by_time(&vfr).is_err());
    }

    #[test]
    fn times_are_the_indices_on_the_frame_grid() {
        // A 5-minute clip at 30 fps, 1 frame a second, at most 32: spread over the whole clip.
        let t = Sampling::Fps { fps: 1.0, max_frames: 32 }.times(300.0, 30.0).unwrap();
        assert_eq!(t.len(), 32);
        assert_eq!(t[0], 0.0);
        assert!(t[31] > 290.0, "{t:?}");
        let i = Sampling::Hf { n: 8 }.indices(132, 25.0).unwrap();
        let t = Sampling::Hf { n: 8 }.times(132.0 / 25.0, 25.0).unwrap();
        assert_eq!(t, i.iter().map(|&i| i as f64 / 25.0).collect::<Vec<_>>());
        assert!(Sampling::Hf { n: 8 }.times(f64::NAN, 25.0).is_err());
        assert!(Sampling::from_name("nope", 8, 1.0, 8).is_err());
    }

    #[test]
    fn too_few_frames_is_an_error() {
        let e = Sampling::Hf { n: 8 }.indices(5, 25.0).unwrap_err();
        assert!(e.0.contains("5 frames") && e.0.contains("8 asked"), "{e}");
    }
}
