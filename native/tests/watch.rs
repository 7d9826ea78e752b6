//! `vidllm-native watch` on a live stream the test feeds itself: a `testsrc` stream
//! (rawvideo in NUT, written by the ffmpeg CLI) pushed through a named pipe in two parts,
//! questions on stdin between them. Checked against independent references:
//! - each frame in a window is the ffmpeg CLI's own render of `testsrc` frame k (the
//!   digest of its RGB), at stream time k / rate;
//! - a window holds exactly the newest frames taken before the question;
//! - every frame is encoded once, on arrival; none at question time (MERV, which encodes
//!   a clip together, encodes the window when asked);
//! - the answer equals `ask --rgb-frames` on the ffmpeg CLI's frames;
//! - after the stream ends, questions are answered from the last window, which says so;
//!   a file followed as it grows is read on, and a pause longer than `--stall-after` is said.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use vidllm_tests::fixture;

const SIZE: (usize, usize) = (64, 48);
const RATE: usize = 10;
const FRAMES: usize = 48;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vidllm-native"))
}

fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).output().expect("the ffmpeg CLI");
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn testsrc() -> String {
    format!("testsrc=size={}x{}:rate={RATE}", SIZE.0, SIZE.1)
}

/// The stream as the test feeds it, and where each of its packets starts.
fn stream(dir: &Path) -> (Vec<u8>, Vec<usize>) {
    let nut = dir.join("live.nut");
    let n = FRAMES.to_string();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &testsrc(),
        "-frames:v",
        &n,
        "-c:v",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-f",
        "nut",
        nut.to_str().unwrap(),
    ]);
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v", "-show_entries", "packet=pos", "-of", "csv=p=0"])
        .arg(&nut)
        .output()
        .expect("ffprobe");
    let starts = String::from_utf8_lossy(&probe.stdout).lines().map(|l| l.trim().parse().unwrap()).collect::<Vec<usize>>();
    assert_eq!(starts.len(), FRAMES);
    (std::fs::read(&nut).unwrap(), starts)
}

/// The ffmpeg CLI's frames of the same source, straight to RGB (no container).
fn reference_frames() -> Vec<Vec<u8>> {
    let n = FRAMES.to_string();
    let raw = ffmpeg(&["-f", "lavfi", "-i", &testsrc(), "-frames:v", &n, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    raw.chunks(SIZE.0 * SIZE.1 * 3).map(<[u8]>::to_vec).collect()
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

struct Watch {
    child: Child,
    lines: BufReader<ChildStdout>,
    frames: Vec<Json>,
}

impl Watch {
    fn start(model: &str, video: &Path, window: usize, extra: &[&str]) -> Self {
        let mut child = bin()
            .args(["watch", "--model", &fixture(model).display().to_string(), "--video", video.to_str().unwrap()])
            .args(["--fps", "5", "--window", &window.to_string(), "--device", "cpu", "--max-tokens", "6", "--json"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("runs");
        let lines = BufReader::new(child.stdout.take().unwrap());
        Self { child, lines, frames: Vec::new() }
    }

    /// The next event; frames are kept.
    fn next(&mut self) -> Json {
        let mut line = String::new();
        assert!(self.lines.read_line(&mut line).unwrap() > 0, "watch ended early");
        let v: Json = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["event"] == "frame" {
            self.frames.push(v.clone());
        }
        v
    }

    fn until(&mut self, done: impl Fn(&Json) -> bool) -> Json {
        loop {
            let v = self.next();
            if done(&v) {
                return v;
            }
        }
    }

    fn ask(&mut self, q: &str) -> Json {
        writeln!(self.child.stdin.as_mut().unwrap(), "{q}").unwrap();
        self.until(|v| v["event"] == "answer")
    }
}

/// Checks an answer's window against the frames reported before it and the references.
fn check_window(answer: &Json, seen: &[Json], window: usize, refs: &[Vec<u8>], held_pixels: bool) -> Vec<usize> {
    let frames = answer["frames"].as_array().unwrap();
    let newest: Vec<&Json> = seen.iter().rev().take(window).rev().collect();
    assert_eq!(frames.len(), newest.len(), "{answer}");
    let mut indices = Vec::new();
    for (f, s) in frames.iter().zip(newest) {
        assert_eq!(f["index"], s["index"], "the window is the newest frames taken: {answer}");
        let k = f["index"].as_u64().unwrap() as usize;
        assert_eq!(f["rgb_sha256"].as_str().unwrap(), sha(&refs[k]), "frame {k} is testsrc's frame {k}");
        assert!((f["time"].as_f64().unwrap() - k as f64 / RATE as f64).abs() < 1e-6, "frame {k} time: {f}");
        indices.push(k);
    }
    // Every frame reported was encoded once, on arrival; a model that encodes clips
    // together encodes the window at question time instead.
    let encodes = answer["frame_encodes"].as_u64().unwrap() as usize;
    let now = answer["encoded_at_question"].as_u64().unwrap() as usize;
    if held_pixels {
        assert_eq!(now, frames.len(), "{answer}");
    } else {
        assert_eq!((encodes, now), (seen.len(), 0), "{answer}");
    }
    indices
}

/// The same question about the same frames, through `ask` with the ffmpeg CLI's frames.
fn offline_tokens(model: &str, dir: &Path, refs: &[Vec<u8>], indices: &[usize], question: &str) -> Json {
    let rgb = dir.join("window.rgb");
    std::fs::write(&rgb, indices.iter().flat_map(|&k| refs[k].clone()).collect::<Vec<u8>>()).unwrap();
    let size = format!("{},{}", SIZE.0, SIZE.1);
    let out = bin()
        .args(["ask", "--model", &fixture(model).display().to_string(), "--rgb-frames", rgb.to_str().unwrap(), "--frame-size", &size])
        .args(["--prompt", question, "--device", "cpu", "--max-tokens", "6", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Json>(&out.stdout).unwrap()["tokens"].clone()
}

fn fifo(dir: &Path) -> PathBuf {
    let p = dir.join("video.fifo");
    assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    p
}

/// How the test hands the stream over: a named pipe it closes at the end, or a file it
/// appends to, read with `--follow` (which never ends by itself).
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    Pipe,
    GrowingFile,
}

fn live_session(model: &str, held_pixels: bool, feed: Feed) {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, starts) = stream(dir.path());
    let refs = reference_frames();
    let window = 4;
    let (path, extra): (PathBuf, &[&str]) = match feed {
        Feed::Pipe => (fifo(dir.path()), &[]),
        Feed::GrowingFile => {
            let p = dir.path().join("growing.nut");
            std::fs::write(&p, &bytes[..starts[25]]).unwrap();
            (p, &["--follow", "--stall-after", "0.5"])
        }
    };
    let mut w = Watch::start(model, &path, window, extra);
    let mut video = match feed {
        Feed::Pipe => std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
        Feed::GrowingFile => std::fs::OpenOptions::new().append(true).open(&path).unwrap(),
    };
    if feed == Feed::Pipe {
        // A question before any frame: refused, and the session goes on.
        let early = w.ask("Anything yet?");
        assert!(early["error"].as_str().unwrap().contains("no frame yet"), "{early}");
        // Frames 0..=24 (one taken every 0.2 s: the even ones).
        video.write_all(&bytes[..starts[25]]).unwrap();
        video.flush().unwrap();
    }
    w.until(|v| v["event"] == "frame" && v["index"] == 24);
    let q = "What is in the video?";
    let first = w.ask(q);
    let seen = w.frames.clone();
    let indices = check_window(&first, &seen, window, &refs, held_pixels);
    assert_eq!(indices, vec![18, 20, 22, 24]);
    assert_eq!(first["stream"]["state"], "live", "{first}");
    assert_eq!(first["tokens"], offline_tokens(model, dir.path(), &refs, &indices, q), "live and offline answers differ");

    if feed == Feed::GrowingFile {
        // Nothing written for longer than --stall-after: the answer says the stream stalled.
        std::thread::sleep(std::time::Duration::from_millis(800));
        let stalled = w.ask(q);
        assert_eq!(stalled["stream"]["state"], "stalled", "{stalled}");
        assert_eq!(stalled["tokens"], first["tokens"], "the same window");
    }
    // The rest of the stream: a pipe then ends; a followed file waits for more.
    video.write_all(&bytes[starts[25]..]).unwrap();
    video.flush().unwrap();
    drop(video);
    match feed {
        Feed::Pipe => assert!(w.until(|v| v["event"] == "end")["error"].is_null()),
        Feed::GrowingFile => _ = w.until(|v| v["event"] == "frame" && v["index"] == 46),
    }
    let second = w.ask(q);
    let seen = w.frames.clone();
    assert_eq!(check_window(&second, &seen, window, &refs, held_pixels), vec![40, 42, 44, 46]);
    assert_eq!(second["stream"]["state"], if feed == Feed::Pipe { "ended" } else { "live" }, "{second}");
    assert_eq!(second["frames_taken"], 24, "{second}");

    drop(w.child.stdin.take());
    assert!(w.child.wait().unwrap().success());
}

#[test]
fn a_live_pipe_is_answered_from_its_newest_frames() {
    live_session("tiny_video_llava", false, Feed::Pipe);
}

#[test]
fn a_growing_file_is_followed_and_a_stall_is_said() {
    live_session("tiny_llava_next_video", false, Feed::GrowingFile);
}

#[test]
fn a_model_that_encodes_clips_together_encodes_the_window_when_asked() {
    live_session("tiny_merv", true, Feed::Pipe);
}

fn fails(args: &[&str], needle: &str) {
    let out = bin().args(args).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{args:?}: {err}");
    assert!(err.to_lowercase().contains(needle), "{args:?}: {err}");
}

#[test]
fn a_device_source_opens_through_libavdevice() {
    // lavfi is one of libavdevice's inputs, as v4l2 is: the binary does not link it, and
    // loads it when a source names a format libavformat alone does not have.
    let mut child = bin()
        .args(["watch", "--model", &fixture("tiny_video_llava").display().to_string(), "--format", "lavfi"])
        .args(["--video", "testsrc=size=64x48:rate=5:duration=1", "--device", "cpu", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: Json = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["event"], "frame", "{first}");
    drop(child.stdin.take());
    child.kill().ok();
    child.wait().unwrap();
}

#[test]
fn bad_streams_and_settings_are_named() {
    let model = fixture("tiny_video_llava").display().to_string();
    let m = model.as_str();
    fails(&["watch", "--model", m, "--video", "-"], "--questions");
    fails(&["watch", "--model", m, "--video", "x.nut", "--fps", "0"], "--fps");
    fails(&["watch", "--model", m, "--video", "x.nut", "--window", "0", "--device", "cpu"], "0 frames");

    // A stream that cannot be read ends with its reason; questions are still answered.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.nut");
    std::fs::write(&junk, [0x5au8; 4096]).unwrap();
    for (video, format, needle) in [(junk.to_str().unwrap(), None, "cannot open"), ("x", Some("no-such-format"), "unknown input format")] {
        let mut cmd = bin();
        cmd.args(["watch", "--model", m, "--video", video, "--device", "cpu", "--json"]);
        if let Some(f) = format {
            cmd.args(["--format", f]);
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let end: Json = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(end["event"], "end");
        assert!(end["error"].as_str().unwrap().to_lowercase().contains(needle), "{end}");
        writeln!(child.stdin.as_mut().unwrap(), "Still there?").unwrap();
        let answer: Json = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert!(answer["error"].as_str().unwrap().contains("no frame yet"), "{answer}");
        assert_eq!(answer["stream"]["state"], "ended");
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
    }
}
