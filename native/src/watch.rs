//! `watch`: questions about a live video, answered from a rolling window of its newest
//! frames ([`vidllm_models::live_window`]).
//!
//! Three threads: one reads the stream ([`crate::live`]) and sends the frames the window
//! takes (`--fps` of stream time); one reads questions, a line each; the model's thread
//! takes both in the order they came. A frame is preprocessed and, where the model encodes
//! frames alone, encoded as soon as it is taken, so a question's time to first token is
//! the window's assembly and the prefill, not the encoding of the frames seen earlier.
//! Frames that queue up while an answer runs are encoded afterwards, except those that
//! would leave the window before any question could see them.
//!
//! A stream that ends or stalls leaves its last window: questions are still answered from
//! it, and each answer says so. Output: the answers on stdout (or, with `--json`, one JSON
//! line per event: `frame`, `answer`, `end`), progress and notes on stderr.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use sha2::{Digest, Sha256};
use vidllm_models::live_window::LiveWindow;
use vidllm_models::video_model::LoadOptions;
use vidllm_models::{Model, Prompt};
use vidllm_shaders::device::pick;

use crate::ask::{AnswerArgs, BudgetArgs, pixels};
use crate::live::{LiveInput, Ticks, read_live};
use crate::progress::Progress;
use crate::video::Frame;
use crate::{StorageArgs, runtime};

#[derive(Args)]
pub struct WatchArgs {
    /// A video-language model folder (as `ask` takes), or a text GGUF with `--mmproj`.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub mmproj: Option<String>,
    /// The live stream: a file (`--follow` for one still being written), `-` for stdin, a
    /// named pipe, a URL, or a capture device such as `/dev/video0`.
    #[arg(long)]
    pub video: String,
    /// The stream's format when it cannot be probed (`nut`, `mpegts`, `v4l2`, ...).
    #[arg(long)]
    pub format: Option<String>,
    /// Read a file on at its end, as it grows (the stream then never ends by itself).
    #[arg(long)]
    pub follow: bool,
    /// Frames a second of stream time taken into the window.
    #[arg(long, default_value_t = 1.0)]
    pub fps: f64,
    /// Frames the window holds: the newest ones (default: the model's frames).
    #[arg(long)]
    pub window: Option<usize>,
    /// Where questions come from, one a line (default: stdin; needed with `--video -`).
    #[arg(long)]
    pub questions: Option<String>,
    /// Seconds without a new frame after which an answer says the stream has stalled.
    #[arg(long, default_value_t = 5.0)]
    pub stall_after: f64,
    #[command(flatten)]
    pub budget: BudgetArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub answer: AnswerArgs,
    /// One JSON line per event on stdout (each frame taken, each answer, the stream's end).
    #[arg(long)]
    pub json: bool,
}

/// What reaches the model's thread, in the order it happened.
enum Event {
    Frame(Frame, Instant),
    /// The stream ended: cleanly, or with the error that broke it.
    StreamEnd(Option<String>),
    Question(String),
    QuestionsEnd,
}

/// How the stream stands when a question is answered.
fn stream_state(ended: &Option<Option<String>>, last_frame: Option<Instant>, stall_after: f64) -> (&'static str, Option<f64>) {
    let age = last_frame.map(|t| t.elapsed().as_secs_f64());
    let state = match (ended, age) {
        (Some(_), _) => "ended",
        (None, Some(a)) if a > stall_after => "stalled",
        (None, None) => "waiting",
        (None, Some(_)) => "live",
    };
    (state, age)
}

pub fn run(a: WatchArgs) -> Result<()> {
    if a.video == "-" && a.questions.is_none() {
        bail!("--video - reads the stream from stdin: give the questions with --questions FILE (a file or a named pipe)");
    }
    let mut ticks = Ticks::new(a.fps)?;
    let picked = pick(a.answer.device)?;
    let device = picked.device.clone();
    let progress = Progress::new(a.json);
    let encoders = a.answer.encoder_devices()?;
    let encoder_placements = encoders.iter().map(|p| a.storage.placement(p)).collect::<Result<_>>()?;
    let opts = LoadOptions { encoder_placements, ..Default::default() };
    let folder = runtime::load_video(&a.model, a.mmproj.as_deref(), &a.storage, opts, &a.storage.placement(&picked)?, progress)?;
    let (pcfg, tok) = (folder.pre, Rc::new(folder.tok));
    let model = Rc::new(Model::Video(folder.model));
    let vm = model.video().expect("a video-language model was loaded");
    crate::ask::placed_encoders(vm, &a.answer, &encoders)?;
    if !vm.supports_video() {
        bail!("{}: {} takes still images only, not a video", a.model, vm.model_type());
    }
    let capacity = a.window.unwrap_or_else(|| vm.default_frames());
    let mut window = LiveWindow::new(capacity).map_err(|e| anyhow::anyhow!("--window: {e}"))?;
    let budget = a.budget.budget(capacity)?;
    let params = a.answer.params();
    // A conversation per question (the video changes between them); refused settings are
    // refused before the stream is opened.
    a.answer.conversation(model.clone(), tok.clone())?;

    let (tx, rx) = mpsc::channel::<Event>();
    let input = LiveInput { source: a.video.clone(), format: a.format.clone(), follow: a.follow };
    let frames_tx = tx.clone();
    std::thread::spawn(move || {
        let ended = read_live(&input, |t| ticks.take(t), |f| frames_tx.send(Event::Frame(f, Instant::now())).is_ok());
        let _ = frames_tx.send(Event::StreamEnd(ended.err().map(|e| format!("{e:#}"))));
    });
    let questions: Box<dyn BufRead + Send> = match &a.questions {
        Some(path) => Box::new(BufReader::new(std::fs::File::open(path).with_context(|| format!("--questions {path}"))?)),
        None => Box::new(BufReader::new(std::io::stdin())),
    };
    std::thread::spawn(move || {
        for line in questions.lines() {
            let Ok(q) = line else { break };
            if !q.trim().is_empty() && tx.send(Event::Question(q)).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::QuestionsEnd);
    });
    if !a.json {
        eprintln!("device: {}  window: {capacity} frames at {} a second of stream; questions, one a line:", picked.name, a.fps);
    }

    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    // Frames the ticks took, and of those, frames that left the window before they were
    // encoded (queued behind an answer or a slow start).
    let (mut ended, mut last_frame, mut taken, mut skipped) = (None::<Option<String>>, None::<Instant>, 0usize, 0usize);
    // What the answers report of each frame in the window: when it came, and a digest of
    // the pixels the device was given.
    let mut received: HashMap<u64, (f64, String)> = HashMap::new();
    let mut pending = None;
    while let Some(event) = pending.take().or_else(|| rx.recv().ok()) {
        match event {
            Event::Frame(f, at) => {
                // Frames queued behind this one: only the newest `capacity` can reach a question.
                let mut batch = vec![(f, at)];
                loop {
                    match rx.try_recv() {
                        Ok(Event::Frame(f, at)) => batch.push((f, at)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let skip = batch.len().saturating_sub(capacity);
                (taken, skipped) = (taken + batch.len(), skipped + skip);
                for (f, at) in batch.into_iter().skip(skip) {
                    let digest = if a.json { format!("{:x}", Sha256::digest(&f.rgb)) } else { String::new() };
                    window.push(vm, pixels(std::slice::from_ref(&f), &pcfg, &device), f.index as u64, f.pts);
                    last_frame = Some(at);
                    let received_s = at.duration_since(started).as_secs_f64();
                    if a.json {
                        writeln!(
                            out,
                            "{}",
                            json!({"event": "frame", "index": f.index, "time": micros(f.pts), "received_s": micros(received_s), "rgb_sha256": digest})
                        )?;
                        out.flush()?;
                    }
                    received.insert(f.index as u64, (micros(received_s), digest));
                }
                let oldest = window.frames().next().map_or(0, |f| f.index);
                received.retain(|&i, _| i >= oldest);
            }
            Event::StreamEnd(error) => {
                if a.json {
                    writeln!(out, "{}", json!({"event": "end", "error": error, "frames_taken": taken}))?;
                    out.flush()?;
                } else {
                    match &error {
                        Some(e) => eprintln!("note: the stream broke after {taken} frames taken: {e}; answering from the last window"),
                        None => eprintln!("note: the stream ended after {taken} frames taken; answering from the last window"),
                    }
                }
                ended = Some(error);
            }
            Event::QuestionsEnd => break,
            Event::Question(q) => {
                let asked = Instant::now();
                let (state, age) = stream_state(&ended, last_frame, a.stall_after);
                let video = match window.video(vm, budget.as_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        report_refusal(&mut out, a.json, &q, &format!("{e}"), state)?;
                        continue;
                    }
                };
                let mut conv = a.answer.conversation(model.clone(), tok.clone())?;
                conv.set_video(video.encoded.visual.clone(), video.times.clone());
                if let Err(e) = conv.ask(Prompt::Question(&q), params.clone()) {
                    report_refusal(&mut out, a.json, &q, &format!("{e}"), state)?;
                    continue;
                }
                let window_ms = asked.elapsed().as_secs_f64() * 1e3;
                let mut first = None;
                let mut failed = None;
                let echo = !a.json;
                let finished = conv.answer(|piece| {
                    first.get_or_insert_with(Instant::now);
                    if echo && let Err(e) = out.write_all(piece.text.as_bytes()).and_then(|()| out.flush()) {
                        failed = Some(e);
                        return false;
                    }
                    true
                })?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                let ttft_ms = first.map(|t| t.duration_since(asked).as_secs_f64() * 1e3);
                let t = &finished.timings;
                // FrameFusion's count is known once the prefill ran.
                let mut reduction = video.encoded.reduction.clone();
                if let (Some(r), Some(fusion)) = (reduction.as_mut(), &finished.fusion) {
                    r.after_prefill(fusion);
                }
                let frames: Vec<_> = video
                    .seen()
                    .map(|&(index, time)| {
                        let (received_s, digest) = received.get(&index).cloned().unwrap_or_default();
                        json!({"index": index, "time": micros(time), "received_s": received_s, "rgb_sha256": digest})
                    })
                    .collect();
                if a.json {
                    writeln!(
                        out,
                        "{}",
                        json!({
                            "event": "answer", "question": q, "text": finished.text, "tokens": finished.tokens,
                            "finish_reason": finished.reason.openai(), "frames": frames, "visual_tokens": conv.visual_tokens(),
                            "stream": {"state": state, "last_frame_age_s": age, "error": ended.clone().flatten()},
                            "frames_taken": taken, "frames_skipped": skipped, "frame_encodes": window.frame_encodes(),
                            "encoded_at_question": video.encoded_now, "reduction": reduction,
                            "timings": {"window_ms": window_ms, "ttft_ms": ttft_ms, "prefill_ms": t.prefill.as_secs_f64() * 1e3,
                                        "decode_tok_s": t.decode_tok_s(), "generated": t.generated},
                        })
                    )?;
                } else {
                    writeln!(out, "{}", finished.tail)?;
                    let span = match (video.frames.first(), video.frames.last()) {
                        (Some(f), Some(l)) => format!("#{}@{:.2}s..#{}@{:.2}s", f.0, f.1, l.0, l.1),
                        _ => String::new(),
                    };
                    eprintln!(
                        "[{} frames {span} | encoded at question {} | window {window_ms:.1} ms | first token {:.1} ms | {:.1} tok/s | stream {state}]",
                        video.frames.len(),
                        video.encoded_now,
                        ttft_ms.unwrap_or(0.0),
                        t.decode_tok_s()
                    );
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Seconds to the microsecond, for the JSON.
fn micros(s: f64) -> f64 {
    (s * 1e6).round() / 1e6
}

/// A question that could not be answered (no frame yet, a prompt over the context): said,
/// and the session goes on.
fn report_refusal(out: &mut impl Write, json: bool, question: &str, why: &str, state: &str) -> Result<()> {
    if json {
        writeln!(out, "{}", json!({"event": "answer", "question": question, "error": why, "stream": {"state": state}}))?;
        out.flush()?;
    } else {
        eprintln!("error: {why}");
    }
    Ok(())
}
