// The helper threads of the threaded CPU package (web/pkg-threads): each a Web Worker that
// instantiates the same wasm module on the same shared memory, then becomes one thread of
// the CPU backend's rayon pool (web/src/threads.rs), the model's worker being thread 0.
//
// This file is both the helpers' script and the model worker's side (`startPool`).

const HELPER = "vidllm-cpu-thread";

if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope && self.name === HELPER) {
  self.addEventListener("message", async ({ data }) => {
    if (data?.type !== "vidllm-pool-helper") return;
    let pkg;
    try {
      pkg = await import(data.glue);
      await pkg.default({ module_or_path: data.module, memory: data.memory });
    } catch (e) {
      self.postMessage({ type: "vidllm-pool-helper", error: String(e?.message ?? e) });
      return;
    }
    self.postMessage({ type: "vidllm-pool-helper", ready: true });
    // Blocks for good: this worker is now a thread of the pool.
    pkg.pool_helper_run();
  });
}

/**
 * Start `threads - 1` helpers for the threaded package `pkg` (its glue at `glue`, already
 * instantiated on this thread), then build the pool with this thread as its first.
 * Rejects, with no pool built, if a helper cannot start.
 */
export async function startPool(pkg, glue, threads) {
  const module = pkg.pool_module();
  const memory = pkg.pool_memory();
  const helpers = [];
  try {
    await Promise.all(Array.from({ length: threads - 1 }, () => new Promise((resolve, reject) => {
      const w = new Worker(new URL(import.meta.url), { type: "module", name: HELPER });
      helpers.push(w);
      w.onmessage = ({ data }) => {
        if (data?.type !== "vidllm-pool-helper") return;
        if (data.ready) resolve();
        else reject(new Error(`a CPU thread could not start: ${data.error}`));
      };
      w.onerror = (e) => {
        e.preventDefault?.();
        reject(new Error(`a CPU thread could not start: ${e.message || "its script failed to load"}`));
      };
      w.postMessage({ type: "vidllm-pool-helper", glue, module, memory });
    })));
  } catch (e) {
    for (const w of helpers) w.terminate();
    throw e;
  }
  pkg.pool_build(threads);
  return helpers;
}
