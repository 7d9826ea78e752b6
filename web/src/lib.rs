//! vidllm in the browser: load a GGUF decoder onto WebGPU and stream its answer.
//!
//! Browsers forbid blocking on the GPU, so answers are driven by the shared
//! `Conversation`'s async driver (`into_data_async` read-back); the model graph and the
//! 4-bit kernels are the native ones, compiled to WGSL.

use std::rc::Rc;

use burn::tensor::Device;
use vidllm_core::GenerateError;
use vidllm_core::ggml::GgmlType;
use vidllm_core::gguf::Gguf;
use vidllm_core::sampler::SamplerConfig;
use vidllm_core::sampling::Sampling;
use vidllm_core::tokenizer::Tokenizer;
use vidllm_models::generate::read_row_async;
use vidllm_models::{Conversation, GenerateParams, Model, Prompt, config_from_gguf, load_llama};
use wasm_bindgen::prelude::*;

#[cfg(not(any(feature = "webgpu", feature = "cpu")))]
compile_error!("vidllm-web needs a backend: the `webgpu` or `cpu` feature (web/build.sh builds each package)");

#[cfg_attr(not(feature = "webgpu"), path = "cpu_only.rs")]
mod gpu;
mod video;

pub use video::VideoRuntime;
#[cfg(feature = "threads")]
mod threads;

thread_local! {
    /// Why the runtime last failed for good: a panic's message, or the GPU device's loss.
    static FAILURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

pub(crate) fn record_failure(why: String) {
    web_sys::console::error_1(&JsValue::from_str(&format!("vidllm: {why}")));
    FAILURE.with(|f| *f.borrow_mut() = Some(why));
}

#[cfg(target_family = "wasm")]
unsafe extern "C" {
    /// The static constructors (`inventory` registrations of CubeCL's IR dialects and
    /// others), synthesised by wasm-ld.
    fn __wasm_call_ctors();
}

/// Runs once, when the module is instantiated.
///
/// The explicit call of `__wasm_call_ctors` is what matters for speed. When no exported
/// function calls it, wasm-ld takes the module for a run-once "command" and puts a call
/// of every static constructor at the top of every export. Every entry from JS into wasm
/// (a call, a closure, a future's wake-up, an allocation for a string) then reran them
/// all. That was 77% of the page's CPU time in a WebGPU decode step of SmolLM2, about 8 s
/// a token on SwiftShader (`tests/scripts/profile_webgpu_step.mjs`). Calling it here,
/// once, turns the wrappers off.
///
/// Also keeps a panic's message (an allocation the GPU refused, a bug) so the page can show
/// it: in wasm a panic aborts with a bare "unreachable".
///
/// In the threaded package every helper worker instantiates the module on the same memory
/// and runs `start` again; the constructors write that shared memory, so only the first
/// instance runs them (an `inventory` registration run twice would link its node to itself).
#[wasm_bindgen(start)]
pub fn start() {
    #[cfg(target_family = "wasm")]
    {
        static CONSTRUCTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !CONSTRUCTED.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // SAFETY: wasm-bindgen calls `start` right after instantiation and before any
            // other export runs Rust code that reads a registry; the flag lets one instance in.
            unsafe { __wasm_call_ctors() };
        }
    }
    std::panic::set_hook(Box::new(|info| record_failure(info.to_string())));
}

/// The message of the failure that stopped the runtime, if any.
#[wasm_bindgen]
pub fn last_failure() -> Option<String> {
    FAILURE.with(|f| f.borrow().clone())
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// A generation error as a JS `Error` named by its kind (`ContextFullError`, ...), which
/// vidllm.js turns into an instance of its class of that name.
pub(crate) fn gen_err(e: GenerateError) -> JsValue {
    let err = js_sys::Error::new(&e.to_string());
    err.set_name(e.kind());
    err.into()
}

/// Stream the conversation's answer to JS: `on_piece(text, id)` for each piece (`id` null
/// for the text held back to the end); `should_stop()` is polled after each piece (an
/// `AbortSignal`'s `aborted`). Returns the answer's token ids, and what FrameFusion did in
/// its prefill where it ran. All generation logic is the shared `Conversation`'s; this
/// only moves pieces across.
pub(crate) async fn stream_to_js(
    conv: &mut Conversation,
    on_piece: &js_sys::Function,
    should_stop: &js_sys::Function,
) -> Result<(Vec<u32>, Option<vidllm_models::framefusion::FusionReport>), JsValue> {
    let mut failed = None;
    // After each piece, a yield to the event loop, so that on every backend (the CPU one
    // never waits on its own) the piece just pushed reaches its reader before the next
    // forward pass, input and a Stop are handled, and the page repaints, between tokens.
    let finished = conv
        .answer_async_with(read_row_async, next_task, |p| {
            let stop = on_piece
                .call2(&JsValue::NULL, &JsValue::from_str(&p.text), &JsValue::from(p.id))
                .and_then(|_| should_stop.call0(&JsValue::NULL));
            match stop {
                Ok(stop) => !stop.as_bool().unwrap_or(false),
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })
        .await
        .map_err(gen_err)?;
    if let Some(e) = failed {
        return Err(e);
    }
    if !finished.tail.is_empty() {
        on_piece.call2(&JsValue::NULL, &JsValue::from_str(&finished.tail), &JsValue::NULL)?;
    }
    Ok((finished.tokens, finished.fusion))
}

/// Resolves in a new task of the event loop (a `MessageChannel` message: not clamped to
/// 4 ms as nested `setTimeout`s are), in a page and in a worker.
async fn next_task() {
    let promise = js_sys::Promise::new(&mut |resolve, _| match web_sys::MessageChannel::new() {
        Ok(ch) => {
            ch.port1().set_onmessage(Some(&resolve));
            if ch.port2().post_message(&JsValue::NULL).is_err() {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
        Err(_) => {
            let _ = resolve.call0(&JsValue::NULL);
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// The KV cache type the page names (`kv` of `VidLLM.load`), auto when it names none.
pub(crate) fn kv_type(kv: Option<String>) -> Result<vidllm_models::KvChoice, JsError> {
    kv.map_or(Ok(vidllm_models::KvChoice::Auto), |s| s.parse().map_err(|e: String| js_err(e)))
}

/// Sampling parameters from the page.
pub(crate) fn params(max_tokens: usize, temperature: f32, seed: u64) -> GenerateParams {
    GenerateParams { max_tokens, sampler: SamplerConfig { temperature, seed, ..Default::default() }, stop: Vec::new() }
}

/// The times (seconds) a sampling policy picks in a video of `duration` seconds at
/// `frame_rate` frames a second: the native policies, so the page and `vidllm-native`
/// look at the same moments.
#[wasm_bindgen]
pub fn sampling_times(sampling: &str, n: usize, fps: f64, max_frames: usize, duration: f64, frame_rate: f64) -> Result<Vec<f64>, JsError> {
    Sampling::from_name(sampling, n, fps, max_frames).and_then(|p| p.times(duration, frame_rate)).map_err(js_err)
}

/// The frame indices a sampling policy picks on a video's display timeline (`frame_times`:
/// each displayed frame's time from the first, as the page demuxes them; `src_fps` their
/// average rate): the rule `vidllm-native` applies to a file it can number.
#[wasm_bindgen]
pub fn sampling_indices(
    sampling: &str,
    n: usize,
    fps: f64,
    max_frames: usize,
    frame_times: Vec<f64>,
    src_fps: f64,
) -> Result<Vec<u32>, JsError> {
    let picked =
        Sampling::from_name(sampling, n, fps, max_frames).and_then(|p| p.indices_on_timeline(&frame_times, src_fps)).map_err(js_err)?;
    Ok(picked.into_iter().map(|i| i as u32).collect())
}

/// The files of a model folder besides its weights (each optional but `config.json` and
/// `tokenizer.json`): what the page fetches before the shards.
#[wasm_bindgen]
pub fn folder_files() -> Vec<String> {
    vidllm_models::model_files::CONFIG_FILES.iter().map(|s| s.to_string()).collect()
}

/// The `model_type` of a folder's `config.json`, or an error naming the supported ones:
/// checked before any weights are fetched.
#[wasm_bindgen]
pub fn folder_architecture(config_json: &str) -> Result<String, JsError> {
    Ok(vidllm_models::video_model::VideoModel::registration(config_json).map_err(js_err)?.model_type.to_string())
}

/// The weight types the matmul kernels read in place, by llama.cpp's names.
#[wasm_bindgen]
pub fn kernel_types() -> Vec<String> {
    GgmlType::ALL.into_iter().filter(|t| t.stays_packed()).map(|t| t.name().to_string()).collect()
}

/// The outcome of one kernel check (see [`check_kernel`]).
#[wasm_bindgen]
pub struct KernelCheck {
    pub k: usize,
    #[wasm_bindgen(js_name = maxDiff)]
    pub max_diff: f32,
    #[wasm_bindgen(js_name = maxAbs)]
    pub max_abs: f32,
    /// Within f32 rounding of a k-long sum (`vidllm_shaders::check::within_rounding`).
    pub ok: bool,
}

/// One kernel check: a `[n, k]` weight of GGML type `ty` (llama.cpp's name; `k` as the
/// native kernel tests pick it) against `[m, k]` activations (`vidllm_shaders::check`),
/// multiplied on WebGPU and compared with the f64 product of the dequantised weights.
#[wasm_bindgen]
pub async fn check_kernel(ty: String, m: usize, n: usize) -> Result<KernelCheck, JsError> {
    use burn::tensor::{Tensor, TensorData};
    use vidllm_shaders::{QuantMatrix, check};
    let Some(ty) = GgmlType::ALL.into_iter().find(|t| t.stays_packed() && t.name().eq_ignore_ascii_case(&ty)) else {
        return Err(js_err(format!("no kernel reads type {ty:?} (they read {})", kernel_types().join(", "))));
    };
    let k = check::check_k(ty);
    if m == 0 || n == 0 || m * k > 1 << 24 || n * k > 1 << 24 {
        return Err(js_err(format!("a check of {m}x{k} by {n}x{k} is not a size worth checking")));
    }
    let blocks = check::weight(ty, n, k, 7 + n as u64);
    let x = check::values(m * k, 3 + m as u64);
    let at = gpu::open_device(true, None).await?.placement();
    let w = QuantMatrix::upload(ty, &blocks, n, k, &at).map_err(js_err)?;
    let y = w.forward(Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), &at.device));
    let got = vidllm_models::generate::read_row_async(y).await.map_err(js_err)?;
    let expected = check::reference(&x, &vidllm_core::ggml::dequantize(ty, &blocks, n * k), m, n, k);
    let max_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let max_abs = expected.iter().map(|v| v.abs()).fold(0f32, f32::max);
    Ok(KernelCheck { k, max_diff, max_abs, ok: check::within_rounding(max_diff, max_abs, k) })
}

/// A decoder on a WebGPU (or CPU) device, with its conversation.
#[wasm_bindgen]
pub struct Runtime {
    conv: Conversation,
    device: Device,
    file_bytes: usize,
}

#[wasm_bindgen]
impl Runtime {
    /// Load GGUF bytes. `gpu`: WebGPU (initialised asynchronously), else the CPU backend;
    /// `binding_cap`: bytes one storage binding may hold, below the device's own limit;
    /// `kv`: the KV cache's type (`auto`, `f32`, `f16`, `q8_0`, `q4_0`; default auto: f16
    /// where the decoder's heads are whole 32-value blocks, else f32).
    pub async fn load_gguf(
        bytes: Vec<u8>,
        gpu: bool,
        context: usize,
        binding_cap: Option<f64>,
        kv: Option<String>,
    ) -> Result<Runtime, JsError> {
        let kv = kv_type(kv)?;
        let file_bytes = bytes.len();
        let at = gpu::open_device(gpu, binding_cap.map(|c| c as u64)).await?.placement();
        let device = at.device.clone();
        let g = Gguf::from_bytes(bytes).map_err(js_err)?;
        // The architecture first: a file that is no decoder (an mmproj) is named as such.
        config_from_gguf(&g).map_err(js_err)?;
        let tok = Tokenizer::from_gguf(&g).map_err(js_err)?;
        let model = load_llama(&g, &at).map_err(js_err)?;
        let mut conv = Conversation::new(Rc::new(Model::Text(model)), Rc::new(tok), context);
        conv.set_kv(kv).map_err(js_err)?;
        Ok(Runtime { conv, device, file_bytes })
    }

    /// Forget the conversation.
    pub fn reset(&mut self) {
        self.conv.reset();
    }

    /// Answer `prompt` (through the model's chat template, or as written with `raw`),
    /// continuing the conversation; `on_piece(text, id)` per piece, `should_stop()` polled
    /// between tokens. Returns the answer's token ids.
    #[allow(clippy::too_many_arguments)]
    pub async fn generate(
        &mut self,
        prompt: String,
        raw: bool,
        max_tokens: usize,
        temperature: f32,
        seed: u64,
        on_piece: &js_sys::Function,
        should_stop: &js_sys::Function,
    ) -> Result<Vec<u32>, JsValue> {
        let p = if raw { Prompt::Raw(&prompt) } else { Prompt::Question(&prompt) };
        self.conv.ask(p, params(max_tokens, temperature, seed)).map_err(gen_err)?;
        Ok(stream_to_js(&mut self.conv, on_piece, should_stop).await?.0)
    }

    /// Device memory held by the weights, from the runtime's own allocations.
    pub fn weights_device_bytes(&self) -> usize {
        self.conv.model().decoder().weights_device_bytes()
    }

    pub fn file_bytes(&self) -> usize {
        self.file_bytes
    }

    pub fn device_name(&self) -> String {
        format!("{:?}", self.device)
    }

    /// Row bands of the output head (more than one when it exceeds the binding cap).
    pub fn head_bands(&self) -> usize {
        match &self.conv.model().decoder().lm_head {
            vidllm_models::quant_linear::QuantLinear::Blocks(m) => m.bands(),
            vidllm_models::quant_linear::QuantLinear::Dense(b) => b.len(),
        }
    }
}
