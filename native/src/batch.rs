//! `batch`: one question per line of a JSONL file, answers appended to another, through
//! the same engine as `serve` (so `--parallel` sequences decode together, and a video
//! asked about several times is encoded once).
//!
//! A job line: `{"id": "a1", "video": "clips/a.mp4", "prompt": "What happens?"}`, with
//! optional `images`, `system`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`,
//! `frames`, `fps`, `max_frames`, `sampling`, `max_visual_tokens`, `reduce` (how a video
//! over `max_visual_tokens` is reduced: `none`, `slowfast`, `maxinfo`, `fastvid`, `framefusion`). Relative media paths
//! are read from the jobs file's folder.
//!
//! A result line: `{"id", "text", "finish_reason", "usage", "timings"}`, or `{"id",
//! "error"}` for a job that could not run (the run goes on). Each is appended and flushed
//! when its job ends, so a run killed midway keeps every finished answer; a rerun skips
//! the ids already in the output (a last line cut short by the kill is removed first).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use vidllm_core::sampler::SamplerConfig;
use vidllm_models::GenerateParams;

use crate::engine::{Engine, EngineArgs, Event, FrameOptions, Job, Media, Role, Sink, parse_reduce};
use crate::metrics::Metrics;
use crate::progress::Progress;

#[derive(Args)]
pub struct BatchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Jobs, one JSON object a line.
    #[arg(long)]
    pub input: PathBuf,
    /// Results, appended one JSON object a line (ids already there are skipped).
    #[arg(long)]
    pub output: PathBuf,
    /// Default `max_tokens` of a job that gives none.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    id: Json,
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    video: Option<String>,
    #[serde(default)]
    images: Vec<String>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    frames: Option<usize>,
    fps: Option<f64>,
    max_frames: Option<usize>,
    sampling: Option<String>,
    max_visual_tokens: Option<usize>,
    reduce: Option<String>,
}

/// A job's id as its result line writes it: a string, or a number as text.
fn id_text(id: &Json) -> Option<String> {
    match id {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Ids of the results already written; a last line cut short is removed.
fn done_ids(path: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let Ok(f) = File::open(path) else { return Ok(ids) };
    let mut reader = BufReader::new(f);
    let (mut good_end, mut pos) = (0u64, 0u64);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        let complete = line.ends_with('\n');
        match serde_json::from_str::<Json>(line.trim_end()) {
            Ok(v) if complete => {
                if let Some(id) = v.get("id").and_then(id_text) {
                    ids.insert(id);
                }
                good_end = pos;
            }
            _ if !complete => break,
            Err(e) => {
                bail!("{}: line {} is not JSON ({e}); not appending to a file that is not a results file", path.display(), ids.len() + 1)
            }
            Ok(_) => {}
        }
    }
    if good_end < pos {
        eprintln!("{}: removing a last line cut short ({} bytes)", path.display(), pos - good_end);
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good_end)?;
    }
    Ok(ids)
}

/// Where a batch job's events go: the writer, tagged with the job's id.
struct BatchSink {
    id: String,
    tx: Sender<(String, Event)>,
}

impl Sink for BatchSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send((self.id.clone(), event)).is_ok()
    }

    fn closed(&self) -> bool {
        false
    }
}

/// The engine's job for a line, media paths taken from `base`.
fn job(line: JobLine, base: &Path, default_max: usize, sink: Box<dyn Sink>) -> Result<Job, String> {
    let media = |p: &str| {
        let path = base.join(p);
        Media::from_file(path.clone()).map_err(|e| format!("{}: {e}", path.display()))
    };
    let video = line.video.as_deref().map(media).transpose()?;
    let images = line.images.iter().map(|p| media(p)).collect::<Result<Vec<_>, _>>()?;
    let mut sampler = SamplerConfig { seed: line.seed.unwrap_or(0), ..Default::default() };
    if let Some(t) = line.temperature {
        sampler.temperature = t;
    }
    if let Some(p) = line.top_p {
        sampler.top_p = p;
    }
    let mut turns = Vec::new();
    if let Some(s) = line.system {
        turns.push((Role::System, s));
    }
    turns.push((Role::User, line.prompt));
    Ok(Job {
        turns,
        images,
        video,
        frames: FrameOptions { sampling: line.sampling, frames: line.frames, fps: line.fps, max_frames: line.max_frames },
        max_visual_tokens: line.max_visual_tokens,
        reduce: parse_reduce(line.reduce.as_deref(), line.max_visual_tokens)?,
        params: GenerateParams { max_tokens: line.max_tokens.unwrap_or(default_max), sampler, stop: line.stop },
        sink,
        arrived: Instant::now(),
    })
}

/// A job for `turns` (the last the user's question) with a job line's other fields as
/// options (`video`, `images`, `max_tokens`, `frames`, ...), media paths taken from
/// `base`: how the Python bindings' `ask` and `chat` build theirs, so that they read
/// options exactly as `batch` reads a line.
pub fn job_with_options(
    turns: Vec<(Role, String)>,
    options: Json,
    base: &Path,
    default_max: usize,
    sink: Box<dyn Sink>,
) -> Result<Job, String> {
    let Json::Object(mut fields) = options else { return Err("options must be a JSON object".into()) };
    for taken in ["id", "prompt", "system"] {
        if fields.contains_key(taken) {
            return Err(format!("unknown option {taken:?}"));
        }
    }
    fields.insert("id".into(), json!(0));
    fields.insert("prompt".into(), json!(""));
    let line: JobLine = serde_json::from_value(Json::Object(fields)).map_err(|e| e.to_string())?;
    let mut j = job(line, base, default_max, sink)?;
    j.turns = turns;
    Ok(j)
}

pub fn run(a: BatchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let base = a.input.parent().map(Path::to_path_buf).unwrap_or_default();
    let done = done_ids(&a.output)?;
    // Every line's id first: duplicates and skips are known before anything runs.
    let mut seen = HashSet::new();
    let mut todo: Vec<(String, Result<JobLine, String>)> = Vec::new();
    let mut skipped = 0;
    for (n, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let parsed: Result<JobLine, String> = serde_json::from_str(l).map_err(|e| format!("line {}: {e}", n + 1));
        let id = match &parsed {
            Ok(j) => match id_text(&j.id) {
                Some(id) => id,
                None => format!("line {}", n + 1),
            },
            Err(_) => format!("line {}", n + 1),
        };
        if done.contains(&id) {
            skipped += 1;
            continue;
        }
        let parsed = match parsed {
            Ok(j) if id_text(&j.id).is_none() => Err(format!("line {}: \"id\" must be a non-empty string or a number", n + 1)),
            Ok(_) if !seen.insert(id.clone()) => Err(format!("line {}: id {id:?} is used twice", n + 1)),
            other => other,
        };
        todo.push((id, parsed));
    }
    eprintln!("{} jobs to run, {skipped} already in {}", todo.len(), a.output.display());
    if todo.is_empty() {
        return Ok(());
    }
    let mut engine = Engine::load(&a.engine, Arc::new(Metrics::new()), Progress::new(false))?;
    let mut out =
        OpenOptions::new().create(true).append(true).open(&a.output).with_context(|| format!("opening {}", a.output.display()))?;
    out.seek(SeekFrom::End(0))?;

    let (events, results) = channel::<(String, Event)>();
    let (jobs, queue) = sync_channel(a.engine.parallel);
    let total = todo.len() as u64;
    let default_max = a.max_tokens;
    // The feeder turns lines into jobs as the engine takes them; bad lines go straight to
    // the writer as errors.
    let feeder = std::thread::spawn(move || {
        for (id, parsed) in todo {
            let sink = Box::new(BatchSink { id: id.clone(), tx: events.clone() });
            match parsed.and_then(|l| job(l, &base, default_max, sink)) {
                Ok(j) => {
                    if jobs.send(j).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = events.send((id, Event::Error(crate::engine::ApiError::bad_request(e))));
                }
            }
        }
    });
    let writer = std::thread::spawn(move || -> Result<(usize, usize)> {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} jobs, {elapsed} elapsed, {eta} left").expect("a valid template"),
        );
        let (mut ok, mut failed) = (0, 0);
        for (id, ev) in results {
            let line = match ev {
                Event::Done(d) => {
                    ok += 1;
                    json!({"id": id, "text": d.text, "finish_reason": d.finish_reason,
                           "usage": {"prompt_tokens": d.usage.prompt_tokens, "visual_tokens": d.usage.visual_tokens, "completion_tokens": d.usage.completion_tokens},
                           "timings": {"media_ms": d.times.media_ms, "prefill_ms": d.times.prefill_ms, "decode_ms": d.times.decode_ms, "video_cached": d.video_cached, "frames": d.frames,
                           "reduction": d.reduction}})
                }
                Event::Error(e) => {
                    failed += 1;
                    json!({"id": id, "error": e.message})
                }
                Event::Started | Event::Piece(_) => continue,
            };
            writeln!(out, "{line}").and_then(|()| out.flush()).context("writing a result")?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok((ok, failed))
    });
    engine.run(queue);
    feeder.join().map_err(|_| anyhow::anyhow!("the job reader panicked"))?;
    drop(engine);
    let (ok, failed) = writer.join().map_err(|_| anyhow::anyhow!("the result writer panicked"))??;
    eprintln!("{ok} answered, {failed} failed, {skipped} skipped; results in {}", a.output.display());
    Ok(())
}
