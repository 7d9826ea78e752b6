//! `vidllm` for Python: a thin driver over the serving engine (`vidllm_native::engine`),
//! the same one `vidllm-native serve` and `batch` run.
//!
//! ```python
//! import vidllm
//! model = vidllm.Model.load("models/SmolVLM2", device="cpu")
//! for piece in model.ask("clip.mp4", "What happens?", frames=8, max_tokens=64):
//!     print(piece, end="", flush=True)
//! ```
//!
//! A `Model` owns one engine thread, which owns the model (its tensors never cross
//! threads); `ask` and `chat` queue a request and return an [`Answer`], an iterator of the
//! answer's pieces. Python's GIL is released while the caller waits for the next piece,
//! so other Python threads run while the model does. Options are a job line's fields of
//! `vidllm-native batch`, read by the same code.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TrySendError, channel, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::{Value as Json, json};
use vidllm_models::layers::TowerWeights;
use vidllm_models::llama_hf::QuantChoice;
use vidllm_native::batch::job_with_options;
use vidllm_native::engine::{ApiError, Done, Engine, EngineArgs, Event, Job, ModelInfo, Role, Sink};
use vidllm_native::metrics::Metrics;
use vidllm_native::progress::Progress;
use vidllm_native::{ModelArgs, StorageArgs};
use vidllm_shaders::device::DeviceChoice;

/// `max_tokens` of a request that gives none (as `vidllm-native batch`'s default).
const DEFAULT_MAX_TOKENS: usize = 256;

/// A loaded model and the engine thread that runs it.
#[pyclass(frozen, module = "vidllm")]
struct Model {
    /// `None` once closed.
    jobs: Mutex<Option<SyncSender<Job>>>,
    engine: Mutex<Option<JoinHandle<()>>>,
    info: ModelInfo,
}

#[pymethods]
impl Model {
    /// Load a model: a GGUF file (with `mmproj=` for llama.cpp's vision file), or a
    /// Hugging Face folder (text or video-language). `device` is "auto", "gpu" or "cpu";
    /// `quant` a folder's decoder storage (q4_0, q4_1, q8_0, f16, f32); `vision_quant` its
    /// vision towers' (f32, q8_0; default f32); `activations` how the CPU's quantised
    /// products quantise activations (int16, the default; int8, llama.cpp's arithmetic,
    /// faster prefill and towers); `ctx` the tokens of
    /// context per sequence; `kv` what the KV cache keeps keys and values in (auto, f32,
    /// f16, q8_0, q4_0; auto: f16 where the decoder's heads are whole 32-value blocks, else
    /// f32); `parallel` the requests decoded together; `queue` the
    /// requests that may wait beyond those (a full queue raises at once).
    #[staticmethod]
    #[pyo3(signature = (path, *, device = "auto", mmproj = None, quant = None, vision_quant = None, activations = "int16", ctx = None, kv = "auto", parallel = 1, queue = 64, media_cache = 8))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        py: Python<'_>,
        path: std::path::PathBuf,
        device: &str,
        mmproj: Option<std::path::PathBuf>,
        quant: Option<&str>,
        vision_quant: Option<&str>,
        activations: &str,
        ctx: Option<usize>,
        kv: &str,
        parallel: usize,
        queue: usize,
        media_cache: usize,
    ) -> PyResult<Self> {
        let device: DeviceChoice = device.parse().map_err(|e| PyValueError::new_err(format!("device: {e}")))?;
        let quant = quant.map(|q| q.parse::<QuantChoice>()).transpose().map_err(|e| PyValueError::new_err(format!("quant: {e}")))?;
        let vision_quant =
            vision_quant.map(|q| q.parse::<TowerWeights>()).transpose().map_err(|e| PyValueError::new_err(format!("vision_quant: {e}")))?;
        let activations = activations.parse().map_err(|e| PyValueError::new_err(format!("activations: {e}")))?;
        let kv = kv.parse().map_err(|e| PyValueError::new_err(format!("kv: {e}")))?;
        let args = EngineArgs {
            model: ModelArgs {
                model: path.to_string_lossy().into_owned(),
                storage: StorageArgs { quant, vision_quant, activations },
                device,
                ctx,
                kv,
            },
            mmproj: mmproj.map(|p| p.to_string_lossy().into_owned()),
            parallel,
            media_cache,
        };
        let (jobs, queued) = sync_channel::<Job>(queue);
        let (ready, loaded) = channel::<Result<ModelInfo, String>>();
        // The model is created, used and dropped on this thread: its tensors and the
        // conversations' caches are not shared across threads.
        let engine = std::thread::Builder::new()
            .name("vidllm-engine".into())
            .spawn(move || {
                // This thread is one of a thread pool's own, as vidllm-native's main thread
                // is: the decode step's products then keep the pool's workers hot between
                // them (`shaders/src/cpu_hot.rs`), which only a pool thread can ask of them.
                // Without it (an error building the pool) the products take rayon's plain path.
                let _pool = rayon::ThreadPoolBuilder::new().use_current_thread().build();
                match Engine::load(&args, Arc::new(Metrics::new()), Progress::new(true)) {
                    Ok(mut engine) => {
                        let _ = ready.send(Ok(engine.info.clone()));
                        engine.run(queued);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("{e:#}")));
                    }
                }
            })
            .map_err(|e| PyRuntimeError::new_err(format!("starting the engine thread: {e}")))?;
        let info = py
            .detach(move || loaded.recv())
            .map_err(|_| PyRuntimeError::new_err("the engine thread ended while loading"))?
            .map_err(PyValueError::new_err)?;
        Ok(Self { jobs: Mutex::new(Some(jobs)), engine: Mutex::new(Some(engine)), info })
    }

    /// Ask `prompt` about `video` (a path, or None for text or images only); the pieces
    /// of the answer as they come. Options: `system`, `images` (paths), `max_tokens`,
    /// `temperature`, `top_p`, `seed`, `stop`, `frames`, `fps`, `max_frames`, `sampling`,
    /// `max_visual_tokens`, `reduce` (`none`, `slowfast`, `maxinfo`, `fastvid`, `framefusion`: how a video over
    /// `max_visual_tokens` is reduced; `timings["reduction"]` says what it did).
    #[pyo3(signature = (video, prompt, **options))]
    fn ask(&self, video: Option<std::path::PathBuf>, prompt: String, options: Option<&Bound<'_, PyDict>>) -> PyResult<Answer> {
        let mut options = options_json(options)?;
        let mut turns = Vec::new();
        if let Some(system) = options.as_object_mut().and_then(|o| o.remove("system")) {
            let Json::String(system) = system else { return Err(PyValueError::new_err("system must be a string")) };
            turns.push((Role::System, system));
        }
        turns.push((Role::User, prompt));
        if let Some(v) = video {
            options["video"] = json!(v.to_string_lossy());
        }
        self.submit(turns, options)
    }

    /// Answer a conversation: `messages` as OpenAI's, `[{"role": "user", "content":
    /// "..."}, ...]`, the last the user's; the same options as `ask`, `video` among them.
    #[pyo3(signature = (messages, **options))]
    fn chat(&self, messages: &Bound<'_, PyList>, options: Option<&Bound<'_, PyDict>>) -> PyResult<Answer> {
        let mut turns = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let bad = || PyValueError::new_err(format!("messages[{i}] must be a dict with string \"role\" and \"content\""));
            let m = m.cast::<PyDict>().map_err(|_| bad())?;
            let field = |k: &str| -> PyResult<String> { m.get_item(k)?.ok_or_else(bad)?.extract::<String>().map_err(|_| bad()) };
            let role = match field("role")?.as_str() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => return Err(PyValueError::new_err(format!("messages[{i}]: unknown role {other:?}"))),
            };
            turns.push((role, field("content")?));
        }
        self.submit(turns, options_json(options)?)
    }

    /// What was loaded: `id`, `video` (a video-language model?), `device`, `context`,
    /// `parallel`.
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("id", &self.info.id)?;
        d.set_item("video", self.info.video)?;
        d.set_item("device", &self.info.device)?;
        d.set_item("context", self.info.context)?;
        d.set_item("parallel", self.info.parallel)?;
        Ok(d)
    }

    /// Finish the requests under way, then free the model. Later requests raise.
    fn close(&self, py: Python<'_>) {
        self.jobs.lock().expect("jobs lock").take();
        if let Some(engine) = self.engine.lock().expect("engine lock").take() {
            let _ = py.detach(|| engine.join());
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(&self, py: Python<'_>, _ty: Py<PyAny>, _value: Py<PyAny>, _tb: Py<PyAny>) {
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!("vidllm.Model({:?} on {}, {} token context)", self.info.id, self.info.device, self.info.context)
    }
}

impl Model {
    fn submit(&self, turns: Vec<(Role, String)>, options: Json) -> PyResult<Answer> {
        let (tx, rx) = channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let sink = Box::new(AnswerSink { tx, cancelled: cancelled.clone() });
        let job = job_with_options(turns, options, Path::new(""), DEFAULT_MAX_TOKENS, sink).map_err(PyValueError::new_err)?;
        let jobs = self.jobs.lock().expect("jobs lock");
        let jobs = jobs.as_ref().ok_or_else(|| PyRuntimeError::new_err("the model is closed"))?;
        jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => PyRuntimeError::new_err("the request queue is full"),
            TrySendError::Disconnected(_) => PyRuntimeError::new_err("the engine thread has ended"),
        })?;
        Ok(Answer { events: Mutex::new(rx), cancelled, done: None, finished: false })
    }
}

/// Keyword options as JSON (Python's own `json` module, so a value JSON cannot hold is
/// refused with Python's message).
fn options_json(options: Option<&Bound<'_, PyDict>>) -> PyResult<Json> {
    let Some(options) = options else { return Ok(json!({})) };
    let text: String = options.py().import("json")?.call_method1("dumps", (options,))?.extract()?;
    serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Where the engine sends a request's events: the [`Answer`]'s channel.
struct AnswerSink {
    tx: Sender<Event>,
    cancelled: Arc<AtomicBool>,
}

impl Sink for AnswerSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send(event).is_ok() && !self.closed()
    }

    fn closed(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// An answer as it is generated: iterate for its pieces (text), then read `text`,
/// `finish_reason`, `usage` and `timings`, or call `result()` for all of them at once.
/// Dropping it, or `cancel()`, ends the request within a token.
#[pyclass(module = "vidllm")]
struct Answer {
    /// A mutex only so that the GIL can be released while waiting on it.
    events: Mutex<Receiver<Event>>,
    cancelled: Arc<AtomicBool>,
    done: Option<Done>,
    finished: bool,
}

#[pymethods]
impl Answer {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<String> {
        if self.finished {
            return Err(PyStopIteration::new_err(()));
        }
        loop {
            let events = &self.events;
            let event = py.detach(|| events.lock().expect("events lock").recv());
            match event {
                Ok(Event::Started) => continue,
                Ok(Event::Piece(p)) => return Ok(p),
                Ok(Event::Done(d)) => {
                    self.finished = true;
                    let tail = d.tail.clone();
                    self.done = Some(d);
                    return if tail.is_empty() { Err(PyStopIteration::new_err(())) } else { Ok(tail) };
                }
                Ok(Event::Error(e)) => {
                    self.finished = true;
                    return Err(api_error(e));
                }
                Err(_) => {
                    self.finished = true;
                    return Err(PyRuntimeError::new_err("the engine ended the request without an answer"));
                }
            }
        }
    }

    /// Wait for the whole answer; a dict of `text`, `finish_reason`, `usage`
    /// (`prompt_tokens`, `visual_tokens`, `completion_tokens`) and `timings`, as a result
    /// line of `vidllm-native batch` has them.
    fn result<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = self.wait(py)?;
        let out = PyDict::new(py);
        out.set_item("text", &d.text)?;
        out.set_item("finish_reason", d.finish_reason)?;
        out.set_item("usage", usage(py, d)?)?;
        out.set_item("timings", timings(py, d)?)?;
        Ok(out)
    }

    /// The whole answer's text (waits for it).
    #[getter]
    fn text(&mut self, py: Python<'_>) -> PyResult<String> {
        Ok(self.wait(py)?.text.clone())
    }

    /// "stop" (an end token or a stop string), "length" (max_tokens) or "cancelled".
    #[getter]
    fn finish_reason(&mut self, py: Python<'_>) -> PyResult<&'static str> {
        Ok(self.wait(py)?.finish_reason)
    }

    #[getter]
    fn usage<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = self.wait(py)?;
        usage(py, d)
    }

    #[getter]
    fn timings<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = self.wait(py)?;
        timings(py, d)
    }

    /// End the request after the token at hand.
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Answer {
    /// Read the answer to its end.
    fn wait(&mut self, py: Python<'_>) -> PyResult<&Done> {
        while !self.finished {
            match self.__next__(py) {
                Ok(_) => {}
                Err(e) if e.is_instance_of::<PyStopIteration>(py) => {}
                Err(e) => return Err(e),
            }
        }
        self.done.as_ref().ok_or_else(|| PyRuntimeError::new_err("the request failed"))
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

fn usage<'py>(py: Python<'py>, d: &Done) -> PyResult<Bound<'py, PyDict>> {
    let u = PyDict::new(py);
    u.set_item("prompt_tokens", d.usage.prompt_tokens)?;
    u.set_item("visual_tokens", d.usage.visual_tokens)?;
    u.set_item("completion_tokens", d.usage.completion_tokens)?;
    Ok(u)
}

fn timings<'py>(py: Python<'py>, d: &Done) -> PyResult<Bound<'py, PyDict>> {
    let t = PyDict::new(py);
    t.set_item("media_ms", d.times.media_ms)?;
    t.set_item("prefill_ms", d.times.prefill_ms)?;
    t.set_item("decode_ms", d.times.decode_ms)?;
    t.set_item("video_cached", d.video_cached)?;
    t.set_item("frames", d.frames)?;
    if let Some(r) = &d.reduction {
        let red = PyDict::new(py);
        red.set_item("method", r.method)?;
        red.set_item("tokens_before", r.tokens_before)?;
        red.set_item("tokens_after", r.tokens_after)?;
        red.set_item("frames_before", r.frames_before)?;
        red.set_item("frames_after", r.frames_after)?;
        red.set_item("reduce_ms", r.reduce_ms)?;
        t.set_item("reduction", red)?;
    }
    Ok(t)
}

/// A request the engine refused: a bad request (the prompt, its media or options) is a
/// `ValueError`, anything else a `RuntimeError`.
fn api_error(e: ApiError) -> PyErr {
    if e.status < 500 { PyValueError::new_err(e.message) } else { PyRuntimeError::new_err(e.message) }
}

/// The `vidllm` module.
#[pymodule]
fn vidllm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<Answer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
