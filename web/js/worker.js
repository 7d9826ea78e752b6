// vidllm in a Web Worker: the page stays responsive while the model runs.
//
//   const w = new VidLLMWorker(new URL("vidllm/worker.js", import.meta.url));
//   await w.load({ model: url, onProgress });
//   for await (const piece of w.ask({ video, prompt })) out.textContent += piece.text;
//   w.dispose();
//
// The page seeks the <video> and takes each frame as an ImageBitmap, which it transfers
// (not copies) to the worker; there the frames go to the GPU as they do in a page.
//
// This file is both the worker's script (when loaded in a worker) and the page-side
// client (`VidLLMWorker`), so one URL serves both.

import { VidLLM, VideoError, candidateFactor, sampleFrames, samplingOf } from "./vidllm.js";
import { channel } from "./channel.js";

const inWorker = typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope;

if (inWorker) {
  let rt = null;
  const aborts = new Map();
  self.onmessage = async ({ data }) => {
    const { id, op } = data;
    try {
      if (op === "load") {
        rt = await VidLLM.load({ ...data.opts, onProgress: (p) => self.postMessage({ id, progress: p }) });
        self.postMessage({ id, done: true, weightsDeviceBytes: rt.weightsDeviceBytes, architecture: rt.architecture,
          defaultFrames: rt.architecture === "text" ? 0 : rt.defaultFrames,
          defaultSampling: rt.architecture === "text" ? null : rt.defaultSampling,
          supportsVideo: rt.supportsVideo, supportsImages: rt.supportsImages });
      } else if (op === "generate" || op === "ask") {
        const ctrl = new AbortController();
        aborts.set(id, ctrl);
        const onStage = (stage) => self.postMessage({ id, stage });
        const opts = { ...data.opts, signal: ctrl.signal, onStage };
        const pieces = op === "ask" ? rt.ask(opts) : rt.generate(opts);
        try {
          for await (const piece of pieces) self.postMessage({ id, piece });
        } finally {
          if (Array.isArray(data.opts.frames)) data.opts.frames.forEach((f) => f.close?.());
        }
        aborts.delete(id);
        self.postMessage({ id, done: true });
      } else if (op === "abort") {
        aborts.get(data.target)?.abort();
      } else if (op === "dispose") {
        rt?.dispose();
        rt = null;
        self.postMessage({ id, done: true });
      }
    } catch (e) {
      self.postMessage({ id, error: { name: e.name, message: e.message } });
    }
  };
}

/** Page-side handle on a model running in a worker; the same calls as `VidLLM`. */
export class VidLLMWorker {
  #worker;
  #next = 0;
  #handlers = new Map();

  constructor(url = import.meta.url) {
    this.#worker = new Worker(url, { type: "module" });
    this.#worker.onmessage = ({ data }) => this.#handlers.get(data.id)?.(data);
  }

  #call(op, opts, onMessage, transfer = []) {
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#handlers.set(id, (m) => {
        if (m.error) { this.#handlers.delete(id); const e = new Error(m.error.message); e.name = m.error.name; reject(e); }
        else if (m.done) { this.#handlers.delete(id); resolve(m); }
        else onMessage?.(m);
      });
      this.#worker.postMessage({ id, op, opts }, transfer);
    });
  }

  async load({ onProgress, ...opts }) {
    // URLs are the page's: resolved here, as the worker would resolve them against its script.
    const page = (u) => (typeof u === "string" ? new URL(u, globalThis.document?.baseURI ?? globalThis.location?.href).href : u);
    opts = { ...opts, model: page(opts.model), mmproj: page(opts.mmproj) };
    const m = await this.#call("load", opts, (x) => onProgress?.(x.progress));
    this.weightsDeviceBytes = m.weightsDeviceBytes;
    this.architecture = m.architecture;
    this.defaultFrames = m.defaultFrames;
    this.defaultSampling = m.defaultSampling;
    this.supportsVideo = m.supportsVideo;
    this.supportsImages = m.supportsImages;
  }

  generate(opts) { return this.#pieces("generate", opts); }

  /** As `VidLLM.ask`; a `<video>` is sampled here and its frames transferred to the worker. */
  async *ask({ video, frames, sampling, fps, maxFrames, frameRate = 30, onFrames, ...opts }) {
    let transfer = [];
    if (video && !this.supportsVideo) throw new VideoError(`${this.architecture} takes still images only, not a video (pass image)`);
    if (video) {
      const n = typeof frames === "number" ? frames : this.defaultFrames;
      const own = this.defaultSampling ?? {};
      const info = { defaultSampling: own.sampling, defaultFps: own.fps, defaultFrames: this.defaultFrames };
      ({ sampling, fps, maxFrames } = samplingOf(info, { frames, sampling, fps, maxFrames }));
      opts.onStage?.("sampling");
      const k = candidateFactor(opts.maxVisualTokens, opts.reduce);
      const f = await sampleFrames(video, { n: n * k, sampling, fps: fps * k, maxFrames: maxFrames * k, frameRate });
      onFrames?.(f);
      frames = f.sources;
      transfer = f.sources;
      // When they were taken travels with them (some models' prompts state it), and how
      // many frames were asked for (a key-frame budget keeps at most those).
      opts = { ...opts, frameTimes: f.times, duration: f.duration, askedFrames: n };
    }
    yield* this.#pieces("ask", { ...opts, frames }, transfer);
  }

  #pieces(op, { signal, onStage, ...opts }, transfer = []) {
    const ch = channel();
    const id = this.#next;
    signal?.addEventListener("abort", () => this.#worker.postMessage({ op: "abort", target: id }));
    this.#call(op, opts, (m) => (m.stage ? onStage?.(m.stage) : ch.push(m.piece)), transfer).then(() => ch.close(), (e) => ch.close(e));
    return ch;
  }

  async dispose() {
    await this.#call("dispose", {});
    this.#worker.terminate();
  }
}
