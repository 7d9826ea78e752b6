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

import {
  VidLLM, ContextFullError, DisposedError, IntegrityError, InvalidRequestError, ModelFetchError, ModelLoadError, QuotaError,
  RuntimeFailedError, TemplateError, TokenizerError, VideoError, VisualTokensError, WebGPUNotAvailableError,
  LiveVideo, candidateFactor, sameVideo, sampleFrames, samplingIndices, samplingOf, samplingTimes, videoKey,
} from "./vidllm.js";
import { queued } from "./channel.js";
import { chatCompletion } from "./completion.js";

const inWorker = typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope;

if (inWorker) {
  let rt = null;
  const aborts = new Map();
  self.onmessage = async ({ data }) => {
    const { id, op } = data;
    try {
      if (op === "load") {
        rt = await VidLLM.load({ ...data.opts, worker: false, onProgress: (p) => self.postMessage({ id, progress: p }) });
        self.postMessage({ id, done: true, weightsDeviceBytes: rt.weightsDeviceBytes, threads: rt.threads, architecture: rt.architecture,
          defaultFrames: rt.architecture === "text" ? 0 : rt.defaultFrames,
          defaultSampling: rt.architecture === "text" ? null : rt.defaultSampling,
          supportsVideo: rt.supportsVideo, supportsImages: rt.supportsImages, headBands: rt.headBands });
      } else if (op === "generate" || op === "ask" || op === "liveAsk") {
        const ctrl = new AbortController();
        aborts.set(id, ctrl);
        const onStage = (stage) => self.postMessage({ id, stage });
        const opts = { ...data.opts, signal: ctrl.signal, onStage };
        if (!rt) throw new DisposedError();
        const pieces = op === "ask" ? rt.ask(opts) : op === "liveAsk" ? rt.liveAsk(opts) : rt.generate(opts);
        try {
          for await (const piece of pieces) self.postMessage({ id, piece });
        } finally {
          aborts.delete(id);
          // The page's frames and images came over as copies or transfers: this side frees them.
          for (const f of [data.opts.frames, data.opts.image].flat()) f?.close?.();
        }
        // What the answer saw: a budget's reduction, or a live question's window.
        const extra = op === "ask" ? { reduction: rt.lastReduction } : op === "liveAsk" ? { report: rt.liveReport } : {};
        self.postMessage({ id, done: true, ...extra });
      } else if (op === "times") {
        const { duration, n, policy } = data.opts;
        self.postMessage({ id, done: true, times: await samplingTimes(duration, n, policy) });
      } else if (op === "indices") {
        const { frameTimes, rate, policy } = data.opts;
        self.postMessage({ id, done: true, indices: await samplingIndices(frameTimes, rate, policy) });
      } else if (op === "framesRGB" || op === "liveFramesRGB") {
        if (!rt) throw new DisposedError();
        const rgb = await (op === "framesRGB" ? rt.framesRGB() : rt.liveFramesRGB());
        self.postMessage({ id, done: true, rgb }, [rgb.buffer]);
      } else if (op === "liveStart") {
        if (!rt) throw new DisposedError();
        await rt.liveStart(data.opts);
        self.postMessage({ id, done: true });
      } else if (op === "liveFrame") {
        // No answer: frames flow one way; a failure to encode one reaches the next question.
        if (rt) rt.liveFrame(data.opts);
        else data.opts.bitmap.close();
      } else if (op === "liveEnd") {
        rt?.liveEnd();
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

/** Errors by name, so a worker's error reaches the page as its class (`instanceof` works). */
const CLASSES = { ContextFullError, DisposedError, IntegrityError, InvalidRequestError, ModelFetchError, ModelLoadError, QuotaError,
  RuntimeFailedError, TemplateError, TokenizerError, VideoError, VisualTokensError, WebGPUNotAvailableError, RangeError, TypeError };

function named({ name, message }) {
  const Class = CLASSES[name] ?? Error;
  const e = Class === DisposedError ? new DisposedError() : new Class(message);
  e.message = message;
  if (Class === Error) e.name = name;
  return e;
}

/**
 * Page-side handle on a model running in a worker; the same members as `VidLLM`, which
 * `VidLLM.load` returns by default.
 */
export class VidLLMWorker {
  #worker;
  #next = 0;
  #handlers = new Map();
  #busy = Promise.resolve();
  #seen = null;
  #reduction = null;
  #disposed = false;

  constructor(url = import.meta.url) {
    this.#worker = new Worker(url, { type: "module" });
    this.#worker.onmessage = ({ data }) => this.#handlers.get(data.id)?.(data);
    // The script failed to load or threw outside a request: every pending call fails.
    this.#worker.onerror = (e) => {
      e.preventDefault?.();
      this.#failAll(new RuntimeFailedError(`the worker stopped: ${e.message || "its script failed to load"}; reload the page to start again`));
    };
    this.#worker.onmessageerror = () => this.#failAll(new RuntimeFailedError("a message from the worker could not be read"));
    this.chat = { completions: { create: (req) => chatCompletion(this, req) } };
  }

  #failAll(err) {
    for (const h of this.#handlers.values()) h({ error: { name: err.name, message: err.message } });
    this.#handlers.clear();
  }

  #call(op, opts, onMessage, transfer = []) {
    if (this.#disposed) return Promise.reject(new DisposedError());
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      this.#handlers.set(id, (m) => {
        if (m.error) { this.#handlers.delete(id); reject(named(m.error)); }
        else if (m.done) { this.#handlers.delete(id); resolve(m); }
        else onMessage?.(m);
      });
      this.#worker.postMessage({ id, op, opts }, transfer);
    });
  }

  async load({ onProgress, worker, ...opts }) {
    // URLs are the page's: resolved here, as the worker would resolve them against its script.
    const page = (u) => (typeof u === "string" ? new URL(u, globalThis.document?.baseURI ?? globalThis.location?.href).href : u);
    opts = { ...opts, model: page(opts.model), mmproj: page(opts.mmproj) };
    const m = await this.#call("load", opts, (x) => onProgress?.(x.progress));
    this.weightsDeviceBytes = m.weightsDeviceBytes;
    this.threads = m.threads;
    this.architecture = m.architecture;
    this.defaultFrames = m.defaultFrames;
    this.defaultSampling = m.defaultSampling;
    this.supportsVideo = m.supportsVideo;
    this.supportsImages = m.supportsImages;
    this.headBands = m.headBands;
  }

  /** What the visual-token budget did to the last video, or null (see `VidLLM`). */
  get lastReduction() { return this.#reduction; }

  generate(opts = {}) {
    const { signal, onStage, ...rest } = opts;
    return this.#stream(signal, onStage, (run) => run("generate", rest));
  }

  /**
   * As `VidLLM.ask`. A `<video>` is sampled here and its frames transferred to the worker;
   * images become `ImageBitmap`s here (an `<img>` cannot leave the page). Asking again
   * about the video of the last question does not sample or encode it again.
   */
  ask(opts = {}) {
    let { video, image, frames, sampling, fps, maxFrames, frameRate = 30, decoder, onFrames, signal, onStage, ...rest } = opts;
    if ((video || Array.isArray(frames)) && this.supportsVideo === false) {
      throw new VideoError(`${this.architecture} takes still images only, not a video (pass image)`);
    }
    if (this.architecture === "text") throw new Error("this is a text model (GGUF); load a video-language folder to ask about videos");
    return this.#stream(signal, onStage, async (run) => {
      const transfer = [];
      const n = typeof frames === "number" ? frames : this.defaultFrames;
      const own = this.defaultSampling ?? {};
      const info = { defaultSampling: own.sampling, defaultFps: own.fps, defaultFrames: this.defaultFrames };
      ({ sampling, fps, maxFrames } = samplingOf(info, { frames, sampling, fps, maxFrames }));
      const k = candidateFactor(rest.maxVisualTokens, rest.reduce);
      const key = videoKey(video, { n, sampling, fps, maxFrames, frameRate, decoder, maxVisualTokens: rest.maxVisualTokens, reduce: rest.reduce });
      const same = sameVideo(key, this.#seen);
      let sent = Array.isArray(frames) ? frames : undefined;
      if (video && !same) {
        this.#seen = null;
        onStage?.("sampling");
        // The sampling times come from the worker's wasm: the page never instantiates it.
        const schedule = (duration, count, p) => this.#call("times", { duration, n: count,
          policy: { sampling: p.sampling, fps: p.fps, maxFrames: p.maxFrames, frameRate: p.frameRate } }).then((m) => m.times);
        const pick = (frameTimes, rate, p) => this.#call("indices", { frameTimes, rate,
          policy: { sampling: p.sampling, n: p.n, fps: p.fps, maxFrames: p.maxFrames } }).then((m) => m.indices);
        const f = await sampleFrames(video, { n: n * k, sampling, fps: fps * k, maxFrames: maxFrames * k, frameRate, decoder, schedule, pick });
        onFrames?.(f);
        sent = f.sources;
        transfer.push(...f.sources);
        // When they were taken travels with them (some models' prompts state it), and how
        // many frames were asked for (a key-frame budget keeps at most those).
        rest = { ...rest, frameTimes: f.times, duration: f.duration, askedFrames: n };
      } else if (Array.isArray(frames)) this.#seen = null;
      let images;
      if (image) {
        images = [];
        for (const im of Array.isArray(image) ? image : [image]) {
          if (typeof HTMLImageElement !== "undefined" && im instanceof HTMLImageElement && !im.complete) await im.decode();
          images.push(await createImageBitmap(im));
        }
        transfer.push(...images);
        if (!video && !sent) this.#seen = null;
      }
      const done = await run("ask", { ...rest, frames: sent, image: images }, transfer);
      if (video && !same) this.#seen = key;
      if ("reduction" in done) this.#reduction = done.reduction;
    });
  }

  /** The last video's frames as the device received them: {rgb, ...} (tests, debugging). */
  async framesRGB() { return (await this.#call("framesRGB", {})).rgb; }

  /**
   * As `VidLLM.watch`: the page follows the `<video>` and transfers each frame taken to
   * the worker, which encodes it into the window in the background.
   */
  async watch(video, { fps = 1, window, maxVisualTokens, reduce, stallAfter = 5 } = {}) {
    if (this.supportsVideo === false || this.architecture === "text") throw new VideoError(`${this.architecture} does not take a video`);
    await this.#call("liveStart", { window: window ?? this.defaultFrames, maxVisualTokens, reduce });
    let report = null;
    return new LiveVideo(video, { fps, stallAfter }, {
      frame: (f) => {
        if (this.#disposed) { f.bitmap.close(); return; }
        this.#worker.postMessage({ op: "liveFrame", opts: f }, [f.bitmap]);
      },
      ask: ({ signal, onStage, ...opts }) => this.#stream(signal, onStage, async (run) => { report = (await run("liveAsk", opts)).report; }),
      report: () => report,
      framesRGB: async () => (await this.#call("liveFramesRGB", {})).rgb,
      end: () => { if (!this.#disposed) this.#worker.postMessage({ op: "liveEnd" }); },
    });
  }

  /**
   * Requests run one after another, as in `VidLLM`; each one's pieces stream through a
   * channel, whether or not the caller reads them yet.
   */
  #stream(signal, onStage, work) {
    const [ch, next] = queued(this.#busy, (push) => work((op, opts, transfer = []) => {
      const id = this.#next;
      const stop = () => this.#worker.postMessage({ op: "abort", target: id });
      // Pieces the worker made before it heard of an abort are not delivered: the answer
      // ends where the caller stopped it, as in the page.
      const call = this.#call(op, opts, (m) => (m.stage ? onStage?.(m.stage) : signal?.aborted ? null : push(m.piece)), transfer);
      signal?.addEventListener("abort", stop, { once: true });
      if (signal?.aborted) stop();
      return call.finally(() => signal?.removeEventListener("abort", stop));
    }));
    this.#busy = next;
    return ch;
  }

  /** Frees the model and ends the worker. */
  async dispose() {
    if (this.#disposed) return;
    try { await this.#call("dispose", {}); } catch { /* the worker is ended below either way */ }
    this.#disposed = true;
    this.#worker.terminate();
    this.#failAll(new DisposedError());
  }
}
