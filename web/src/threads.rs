//! The CPU backend's rayon pool in the browser (the threaded CPU package, feature
//! `threads`): the model's worker is the pool's thread 0, and `n - 1` more Web Workers,
//! each running this module on the same shared memory, are its other threads.
//!
//! The order (js/pool.js drives it):
//! 1. the model's worker spawns the helpers; each instantiates the module on the shared
//!    memory, says it is ready, then calls [`pool_helper_run`], which blocks until
//!    the pool hands it its thread;
//! 2. the model's worker calls [`pool_build`]: rayon's pool, `use_current_thread` as
//!    `vidllm-native` builds it, whose spawn handler passes each other thread over a
//!    channel to a waiting helper.
//!
//! Blocking is allowed in a worker (`Atomics.wait`), not on a page's main thread, which is
//! why the threaded package only ever runs in a worker.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, OnceLock};

use rayon::ThreadBuilder;
use wasm_bindgen::prelude::*;

use crate::js_err;

/// The channel from the pool's spawn handler to the helpers waiting for a thread.
struct Handoff {
    send: Mutex<Sender<ThreadBuilder>>,
    take: Mutex<Receiver<ThreadBuilder>>,
}

fn handoff() -> &'static Handoff {
    static H: OnceLock<Handoff> = OnceLock::new();
    H.get_or_init(|| {
        let (send, take) = channel();
        Handoff { send: Mutex::new(send), take: Mutex::new(take) }
    })
}

/// This module, for the helpers to instantiate (`WebAssembly.Module`).
#[wasm_bindgen]
pub fn pool_module() -> JsValue {
    wasm_bindgen::module()
}

/// The shared memory the helpers instantiate the module on.
#[wasm_bindgen]
pub fn pool_memory() -> JsValue {
    wasm_bindgen::memory()
}

/// A helper worker: wait for a thread of the pool and run it (its work-stealing loop,
/// which returns only if the pool ends, and the global pool never does).
#[wasm_bindgen]
pub fn pool_helper_run() {
    let thread = handoff().take.lock().ok().and_then(|rx| rx.recv().ok());
    if let Some(thread) = thread {
        thread.run();
    }
}

/// Build the global pool of `threads` threads, this one the first: call it once the
/// `threads - 1` helpers wait in [`pool_helper_run`].
#[wasm_bindgen]
pub fn pool_build(threads: usize) -> Result<(), JsError> {
    if threads < 2 {
        return Err(js_err(format!("a pool of {threads} thread(s) is no pool: the single-thread package runs one")));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .use_current_thread()
        .spawn_handler(|thread| {
            let send = handoff().send.lock().map_err(|_| std::io::Error::other("the thread hand-off was poisoned"))?;
            send.send(thread).map_err(|_| std::io::Error::other("no helper takes the thread"))
        })
        .build_global()
        .map_err(|e| js_err(format!("the CPU thread pool: {e}")))
}
