//! A decode step recorded once and replayed (CubeCL's graphs on wgpu, as CUDA graphs
//! are to llama.cpp's CUDA backend).
//!
//! A decode step on wgpu is a few hundred small dispatches (SmolLM2: 11 per
//! layer), and for each one the host resolves the kernel, allocates its outputs, uploads
//! its scalars and builds a bind group. On a real GPU that host work is the step: an
//! H200 spent 12.9 ms of CPU per 11.2 ms token. Recorded once, the step replays as its
//! prebuilt dispatches: pipeline, bind group, dispatch.
//!
//! What a replay cannot change is what the launches were given: buffers, grid sizes and
//! scalars. So the step reads what varies from buffers, refreshed in place before each
//! replay: the token's embedding row, and a step tensor ([`vidllm_shaders::STEP_WORDS`])
//! with the position, the cache row and the keys, which the `*_step` kernels read when
//! they run. Grids are sized by the cache's storage rows, not by the keys, and the keys
//! past the step's are skipped. The recording is kept with the cache
//! ([`KvCache::attend_step`]) and dropped whenever the cache's buffers change (a grow, a
//! prefill), then recorded again at the next step.
//!
//! Recording costs two steps' device work (the step itself, then a second run so that
//! the recording finds every buffer it needs in the pools; CubeCL allocates nothing while
//! recording) and one step's host work. Packed caches only (`--kv f16|q8_0|q4_0`, and
//! `auto` for real models); an f32 cache, a cache whose layers hold different rows
//! (FrameFusion), the CPU backend, and `VIDLLM_STEP_GRAPH=0` take the plain step.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::ThreadId;

use burn::backend::{Backend, BackendGraph, Dispatch, DispatchDevice};
use burn::tensor::{Int, Tensor, TensorData};
use vidllm_shaders::{STEP_WORDS, overwrite_f32, overwrite_u32, step_tensor};

use crate::kv_cache::KvCache;
use crate::llama::Llama;

/// A recorded decode step of one decoder over one cache's buffers.
pub struct StepGraph {
    graph: BackendGraph<Dispatch>,
    /// The token's embedding row `[1, d_model]`, refreshed before each replay.
    input: Tensor<2>,
    /// Position, cache row and keys (`[STEP_WORDS]` u32), refreshed before each replay.
    step: Tensor<1, Int>,
    /// The logits row `[1, vocab]` each replay writes.
    logits: Tensor<2>,
    /// The decoder that recorded it ([`Llama::id`]).
    model: u64,
    /// The thread that recorded it: CubeCL orders a replay only against work on the
    /// recording thread's stream, so writes and reads from another thread could race it.
    thread: ThreadId,
}

/// What a cache knows of recording its decode step.
#[derive(Default)]
pub(crate) enum StepGraphState {
    /// Nothing recorded (or what was recorded no longer fits the cache's buffers).
    #[default]
    None,
    Ready(Box<StepGraph>),
    /// The device cannot record (the CPU backend), or recording or replaying failed here
    /// (why): plain steps.
    Unsupported(String),
}

/// A new decoder's [`Llama::id`].
pub(crate) fn next_model_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Whether decode steps are recorded (`VIDLLM_STEP_GRAPH=0` turns it off, as llama.cpp's
/// `GGML_CUDA_DISABLE_GRAPHS` does its CUDA graphs).
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VIDLLM_STEP_GRAPH").map_or(true, |v| v != "0"))
}

impl Llama {
    /// One decode step (`token` at the cache's next position) replayed from a recording,
    /// or run and recorded, where the device and cache allow ([`crate::step_graph`]):
    /// the logits `[1, vocab_size]`, and the cache advanced. `None` where they do not
    /// (nothing done: the caller runs the plain step).
    pub fn decode_step(&self, token: u32, cache: &mut KvCache) -> Option<Tensor<2>> {
        if !enabled() || !cache.steps_recordable() {
            return None;
        }
        if !records(self.device.as_dispatch()) {
            cache.set_graph_state(StepGraphState::Unsupported("only wgpu records (the CPU backend launches nothing)".into()));
            return None;
        }
        let position = cache.next_position();
        let row = cache.next_row(0);
        let values = [position as u32, row as u32, row as u32 + 1];
        // A grow drops the recording: its grids and buffers were the old storage's.
        cache.reserve_step(row + 1);
        let embedding = self.embed.row(token);
        let device = self.device.as_dispatch();
        let here = std::thread::current().id();
        if let StepGraphState::Ready(g) = cache.graph_state_mut()
            && g.model == self.id
            && g.thread == here
        {
            overwrite_f32(&mut g.input, embedding);
            overwrite_u32(&mut g.step, values.to_vec());
            // SAFETY: every buffer the recording touched is alive: the weights are this
            // decoder's (checked by id), the cache's buffers are the ones it was
            // recorded over (a grow or a plain pass drops it first), and the inputs and
            // output are held here. It replays on the thread (the stream) that recorded
            // it, after the writes above, and the logits are copied out before another
            // replay can write them.
            let replayed = unsafe { Dispatch::graph_replay(device, &g.graph) };
            if replayed.is_ok() {
                let logits = g.logits.clone().add_scalar(0.0);
                cache.advance(&[position]);
                return Some(logits);
            }
            cache.set_graph_state(StepGraphState::Unsupported(format!("a replay failed: {replayed:?}")));
            return None;
        }
        // Record: the step itself (its logits are this step's answer), the same step
        // again so that every buffer it takes is back in the pools once it is dropped,
        // then the recording, which allocates nothing. Writing the same row twice
        // writes the same values.
        let input = Tensor::<2>::from_data(TensorData::new(embedding, [1, self.cfg.d_model]), &self.device);
        let step = step_tensor(values, &self.device);
        if let Err(e) = Dispatch::graph_prepare(device) {
            cache.set_graph_state(StepGraphState::Unsupported(format!("{e}")));
            return None;
        }
        let logits = self.step_logits(input.clone(), &step, cache);
        // Launches are eager (no fusion), so the second run's buffers are taken now and
        // back in the pools when it is dropped; no sync (which a page cannot block on).
        drop(self.step_logits(input.clone(), &step, cache));
        let recorded = match Dispatch::graph_start_capture(device) {
            Ok(()) => {
                let out = self.step_logits(input.clone(), &step, cache);
                Dispatch::graph_stop_capture(device).map(|graph| (graph, out)).map_err(|e| e.to_string())
            }
            Err(e) => {
                // A prepared capture that never opened is closed by a stop.
                let _ = Dispatch::graph_stop_capture(device);
                Err(e.to_string())
            }
        };
        match recorded {
            Ok((graph, logits)) => {
                let g = StepGraph { graph, input, step, logits, model: self.id, thread: here };
                cache.set_graph_state(StepGraphState::Ready(Box::new(g)));
            }
            Err(e) => cache.set_graph_state(StepGraphState::Unsupported(format!("recording failed: {e}"))),
        }
        cache.advance(&[position]);
        Some(logits)
    }

    /// A decode step's logits from its embedding row and step tensor: the pass a
    /// recording holds.
    ///
    /// # Shapes
    /// - x: `[1, d_model]` -> `[1, vocab_size]`
    fn step_logits(&self, x: Tensor<2>, step: &Tensor<1, Int>, cache: &mut KvCache) -> Tensor<2> {
        debug_assert_eq!(step.dims(), [STEP_WORDS]);
        let mut x = x;
        for (layer, block) in self.blocks.iter().enumerate() {
            x = block.forward_step(x, &self.cfg, &self.rope, step, cache, layer);
        }
        self.lm_head.forward(self.norm.forward(x))
    }
}

/// Whether steps on `device` are recorded: wgpu's (CubeCL) are; the CPU backend launches
/// nothing to record.
#[cfg(feature = "gpu")]
fn records(device: &DispatchDevice) -> bool {
    matches!(device, DispatchDevice::Cube(_))
}

/// Without wgpu, only the CPU backend exists, and it records nothing.
#[cfg(not(feature = "gpu"))]
fn records(_: &DispatchDevice) -> bool {
    false
}
