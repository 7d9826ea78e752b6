// vidllm in the browser: the JS surface over the wasm runtime.
//
//   const rt = await VidLLM.load({ model: "https://host/Video-LLaVA-7B-hf/", onProgress });
//   for await (const piece of rt.ask({ video: videoElement, prompt: "What happens?" })) out.textContent += piece.text;
//   for await (const piece of rt.ask({ prompt: "And then?" })) ...   // same video, same KV cache
//   const stream = await rt.chat.completions.create({ messages, stream: true });
//   rt.dispose();
//
// `model` is a Hugging Face-style folder URL (Video-LLaVA, PLLaVA, LLaVA-NeXT-Video), a
// GGUF URL (a text decoder), a GGUF `File`/bytes, or the files of a folder (`File[]`).

import { startPool } from "./pool.js";
import { demuxedFrames } from "./demux.js";
import { queued } from "./channel.js";
import { chatCompletion } from "./completion.js";

/** WebGPU is missing (no navigator.gpu or no adapter). */
export class WebGPUNotAvailableError extends Error {
  constructor(message) { super(message); this.name = "WebGPUNotAvailableError"; }
}
/** The model could not be fetched (HTTP status, network). */
export class ModelFetchError extends Error {
  constructor(message) { super(message); this.name = "ModelFetchError"; }
}
/** The browser refused to store the model (storage quota). */
export class QuotaError extends Error {
  constructor(message) { super(message); this.name = "QuotaError"; }
}
/** The video cannot be decoded, or its pixels may not be read (cross-origin without CORS). */
export class VideoError extends Error {
  constructor(message) { super(message); this.name = "VideoError"; }
}
/** A downloaded file does not match the SHA-256 its folder lists. */
export class IntegrityError extends Error {
  constructor(message) { super(message); this.name = "IntegrityError"; }
}
/**
 * The runtime stopped for good: the GPU refused an allocation, the device was lost, or a
 * bug. The message says which; reload the page to start again.
 */
export class RuntimeFailedError extends Error {
  constructor(message) { super(message); this.name = "RuntimeFailedError"; }
}

/** The prompt does not fit the context (with room for one answer token); nothing changed, ask again. */
export class ContextFullError extends Error {
  constructor(message) { super(message); this.name = "ContextFullError"; }
}
/** A request the runtime cannot serve as asked (no video yet, images on a model without them, an answer still streaming). */
export class InvalidRequestError extends Error {
  constructor(message) { super(message); this.name = "InvalidRequestError"; }
}
/** The model's files were fetched but are not a model this runtime runs (an unsupported
 * architecture or weight type, an mmproj given as the model, a truncated or corrupt file). */
export class ModelLoadError extends Error {
  constructor(message) { super(message); this.name = "ModelLoadError"; }
}
/** The model's chat template failed to render. */
export class TemplateError extends Error {
  constructor(message) { super(message); this.name = "TemplateError"; }
}
/** The prompt could not be tokenised. */
export class TokenizerError extends Error {
  constructor(message) { super(message); this.name = "TokenizerError"; }
}
/** Visual tokens and placeholders do not match. */
export class VisualTokensError extends Error {
  constructor(message) { super(message); this.name = "VisualTokensError"; }
}

/**
 * The wasm packages this thread runs, each instantiated once, on first use:
 * - `pkg/`: WebGPU alone (WebGPU models, and the kernel checks);
 * - `pkg-cpu/`: the CPU backend alone, on one thread;
 * - `pkg-threads/`: the CPU backend alone, on `threads` threads (the model's worker and
 *   `threads - 1` helper workers sharing its memory). Only a worker loading a model with
 *   `device: "cpu"` asks for it (`cpuThreads`); if it cannot start (no package, a helper
 *   that fails), the console says why and `pkg-cpu/` runs on one thread.
 * CPU models use one package per thread, chosen by the first of them (a pool cannot be
 * started twice); WebGPU models use `pkg/` beside it.
 */
const packages = new Map();
/** The package CPU models use on this thread, once one has been chosen. */
let cpuPackage = null;
/** Threads of the CPU backend on this thread's CPU package (1: the single-thread path). */
let poolThreads = 1;

/** The one-thread packages by name: their folder, what the errors call them, their glue. */
const ONE_THREAD = {
  webgpu: { dir: "pkg", title: "WebGPU", glue: () => import("../pkg/vidllm_web.js") },
  cpu: { dir: "pkg-cpu", title: "CPU", glue: () => import("../pkg-cpu/vidllm_web.js") },
};

/**
 * The package named `name` ("webgpu" or "cpu"), instantiated once on this thread. One that
 * cannot be fetched or instantiated rejects with the folder's name, and is tried again on
 * the next call (a network error may pass).
 */
function wasm(name) {
  if (!packages.has(name)) {
    const { dir, title, glue } = ONE_THREAD[name];
    const started = glue().then(async (pkg) => {
      await pkg.default();
      return pkg;
    }).catch((e) => {
      packages.delete(name);
      throw new Error(`vidllm: the ${title} package (${dir}/, web/build.sh) could not be loaded: ${e?.message ?? e}`);
    });
    packages.set(name, started);
  }
  return packages.get(name);
}

/** A package already started here, else the small CPU one: any serves the helpers below. */
function anyPackage() {
  return cpuPackage ?? packages.values().next().value ?? wasm("cpu");
}

/** The CPU models' package: on `threads` threads where that many can run, else one. */
function cpuWasm(threads) {
  cpuPackage ??= (threads > 1 ? threadedPackage(threads) : wasm("cpu")).catch((e) => {
    cpuPackage = null;
    throw e;
  });
  return cpuPackage;
}

async function threadedPackage(threads) {
  const glue = new URL("../pkg-threads/vidllm_web.js", import.meta.url).href;
  let pkg;
  try {
    pkg = await import(glue);
    await pkg.default();
    await startPool(pkg, glue, threads);
    poolThreads = threads;
    return pkg;
  } catch (e) {
    console.warn(`vidllm: the threaded CPU package did not start (${e?.message ?? e}); the CPU backend runs on one thread`);
    return wasm("cpu");
  }
}

/**
 * How many threads a CPU model gets: `threads` (default: the browser's logical cores, at
 * most 8) where threads can run, else 1, with a console note saying why (when that
 * default, or `threads`, was more than 1).
 * Threads need `SharedArrayBuffer`, which a browser gives only to a cross-origin isolated
 * page (COOP `same-origin` and COEP `require-corp` or `credentialless`: web/README.md),
 * and a worker, since the pool's threads block, which a page's main thread may not.
 */
function cpuThreads(threads) {
  if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1)) {
    throw new RangeError(`threads must be a whole number of at least 1, not ${threads}`);
  }
  const want = threads ?? Math.min(8, Math.max(1, globalThis.navigator?.hardwareConcurrency ?? 1));
  if (want === 1) return 1;
  const why = typeof WorkerGlobalScope === "undefined" ? "the model runs on the page's main thread (worker: false), where threads cannot block"
    : globalThis.crossOriginIsolated !== true || typeof SharedArrayBuffer === "undefined"
      ? "the page is not cross-origin isolated (COOP / COEP headers), so there is no SharedArrayBuffer"
      : null;
  if (why) {
    console.info(`vidllm: the CPU backend runs on one thread: ${why}`);
    return 1;
  }
  return want;
}

// Errors the wasm runtime raises by name (`GenerateError::kind` in Rust), as classes.
const NAMED = { ContextFullError, InvalidRequestError, TemplateError, TokenizerError, VisualTokensError, RuntimeFailedError };

/**
 * A wasm trap (panic) becomes a RuntimeFailedError carrying the panic's message (kept by
 * `pkg`, the package that trapped); a named runtime error, its class.
 */
function failure(e, pkg) {
  if (e instanceof WebAssembly.RuntimeError || /unreachable/.test(String(e?.message))) {
    return new RuntimeFailedError(`the runtime stopped: ${pkg?.last_failure() ?? e.message}; reload the page to start again`);
  }
  const Named = NAMED[e?.name];
  if (Named && !(e instanceof Named)) return new Named(e.message);
  return e instanceof Error ? e : new Error(String(e));
}

/** The runtime was used after dispose(). */
export class DisposedError extends Error {
  constructor() { super("this VidLLM runtime was disposed"); this.name = "DisposedError"; }
}

const CACHE = "vidllm-models-v1";

async function cached(url) {
  if (typeof caches === "undefined") return null;
  try { return await (await caches.open(CACHE)).match(url); } catch { return null; }
}

/** Cache `bytes`; a full storage quota is reported (the model still runs, uncached). */
async function store(url, bytes, onProgress) {
  if (typeof caches === "undefined") return;
  try {
    await (await caches.open(CACHE)).put(url, new Response(bytes));
  } catch (e) {
    if (e && e.name === "QuotaExceededError") {
      const warning = new QuotaError(`${url} was not cached: the browser's storage quota has no room for ${(bytes.byteLength / 1048576).toFixed(1)} MiB, so the next load downloads it again (free space, or allow persistent storage)`);
      console.warn(warning.message);
      onProgress?.({ file: url, loaded: bytes.byteLength, total: bytes.byteLength, warning });
    }
  }
}

/** Fetch `url` as bytes, reporting {loaded, total, file} as it streams; cached after. */
async function fetchBytes(url, onProgress) {
  const hit = await cached(url);
  if (hit) {
    const bytes = new Uint8Array(await hit.arrayBuffer());
    onProgress?.({ file: url, loaded: bytes.byteLength, total: bytes.byteLength, cached: true });
    return bytes;
  }
  let res;
  try { res = await fetch(url); } catch (e) { throw new ModelFetchError(`cannot fetch ${url}: ${e.message}`); }
  if (res.status === 404) throw new ModelFetchError(`model file not found: ${url} (HTTP 404)`);
  if (!res.ok) throw new ModelFetchError(`cannot fetch ${url}: HTTP ${res.status}`);
  const total = Number(res.headers.get("content-length")) || 0;
  const reader = res.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.byteLength;
    onProgress?.({ file: url, loaded, total });
  }
  const bytes = new Uint8Array(loaded);
  let at = 0;
  for (const c of chunks) { bytes.set(c, at); at += c.byteLength; }
  await store(url, bytes, onProgress);
  return bytes;
}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** `SHA256SUMS` (`<hex>  <file>` lines, as sha256sum writes) -> Map(file -> hex). */
function parseSums(text) {
  const sums = new Map();
  for (const line of (text ?? "").split("\n")) {
    const m = line.trim().match(/^([0-9a-fA-F]{64})\s+\*?(.+)$/);
    if (m) sums.set(m[2], m[1].toLowerCase());
  }
  return sums;
}

async function verify(name, bytes, sums) {
  const want = sums.get(name);
  if (!want) return;
  const got = await sha256Hex(bytes);
  if (got !== want) throw new IntegrityError(`${name}: SHA-256 ${got}, but SHA256SUMS lists ${want}`);
}

/** The files of a model folder, from a base URL or from user-picked `File`s. */
function folderSource(model, onProgress) {
  if (Array.isArray(model) || (typeof FileList !== "undefined" && model instanceof FileList)) {
    const files = new Map(Array.from(model, (f) => [f.name, f]));
    const get = (name) => files.get(name);
    return {
      text: async (name, optional) => {
        const f = get(name);
        if (!f) { if (optional) return undefined; throw new ModelFetchError(`${name} is not among the picked files`); }
        return f.text();
      },
      bytes: async (name) => {
        const f = get(name);
        if (!f) throw new ModelFetchError(`${name} is not among the picked files`);
        const b = new Uint8Array(await f.arrayBuffer());
        onProgress?.({ file: name, loaded: b.byteLength, total: b.byteLength });
        return b;
      },
    };
  }
  const base = String(model);
  const folder = new URL(base.endsWith("/") ? base : base + "/", globalThis.location?.href);
  const u = (f) => new URL(f, folder).href;
  // Which files the folder has, when its server says (see `listing`): optional files it
  // lacks are then not requested, so no 404 shows in the console.
  const names = listing(folder);
  return {
    text: async (name, optional) => {
      const have = await names;
      if (have && !have.has(name)) {
        if (optional) return undefined;
        throw new ModelFetchError(name === "config.json" ? `model folder not found: ${folder.href} has no config.json`
          : `${name} is missing from the model folder ${folder.href}`);
      }
      return fetchText(u(name), optional, name === "config.json" ? folder.href : null);
    },
    bytes: (name) => fetchBytes(u(name), onProgress),
  };
}

/**
 * The names of the files in a folder, or null when its server does not list them: the
 * Hugging Face hub's tree API for `.../resolve/<revision>/` URLs, else the folder URL's
 * own index page as static servers write it (`python3 -m http.server`, nginx
 * `autoindex`, `tests/scripts/serve_demo.sh`): the links of an HTML page that links to
 * no other folder's files.
 */
async function listing(folder) {
  const hub = folder.href.match(/^(https:\/\/huggingface\.co)\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.*)$/);
  try {
    if (hub) {
      const [, host, repo, rev, sub] = hub;
      const res = await fetch(`${host}/api/models/${repo}/tree/${rev}/${sub}`);
      if (!res.ok) return null;
      return new Set((await res.json()).filter((e) => e.type === "file").map((e) => e.path.slice(sub.length)));
    }
    // Only same-origin index pages: another origin's HTML proves nothing about its files.
    if (folder.origin !== globalThis.location?.origin) return null;
    const res = await fetch(folder.href);
    if (!res.ok || !(res.headers.get("content-type") ?? "").startsWith("text/html")) return null;
    const page = await res.text();
    const names = new Set();
    for (const [, href] of page.matchAll(/href="([^"?#]+)"/g)) {
      const url = new URL(href, folder);
      if (url.origin !== folder.origin || !url.pathname.startsWith(folder.pathname)) continue;
      const rest = decodeURIComponent(url.pathname.slice(folder.pathname.length));
      if (rest && !rest.includes("/")) names.add(rest);
    }
    return names.size ? names : null;
  } catch {
    return null;
  }
}

const isGgufName = (s) => /\.gguf(\?|#|$)/i.test(s);

/** In a window (not already in a worker) where Web Workers exist: load's default. */
const onPageThread = () => typeof Worker !== "undefined" && typeof WorkerGlobalScope === "undefined";

/** A runtime: a text decoder from a GGUF, or a video-language model from a folder. */
export class VidLLM {
  #rt;
  #video;
  #busy = Promise.resolve();
  #seen = null;
  #info;
  #pkg;

  /** `rt` from `pkg`, which runs the CPU backend on `threads` threads (1 on WebGPU). */
  constructor(rt, video, pkg, threads) {
    this.#rt = rt;
    this.#video = video;
    this.#pkg = pkg;
    // Read once: the wasm object is borrowed while an answer streams, so getters used
    // during a stream must not call into it.
    this.#info = {
      architecture: video ? rt.architecture() : "text",
      weightsDeviceBytes: rt.weights_device_bytes(),
      threads,
      defaultFrames: video ? rt.default_frames() : 0,
      defaultSampling: video ? rt.default_sampling() : null,
      defaultFps: video ? rt.default_fps() : 1,
      headBands: video ? 1 : rt.head_bands(),
      supportsVideo: video ? rt.supports_video() : false,
      supportsImages: video ? rt.supports_images() : false,
    };
    this.chat = { completions: { create: (req) => chatCompletion(this, req) } };
  }

  /**
   * `model`: a GGUF (a text decoder), a model folder (URL ending in "/", or picked files),
   * or, with `mmproj`, llama.cpp's pair: the text GGUF and its vision GGUF (SmolVLM2).
   *
   * `worker` (default: true in a page): the model runs in a Web Worker, as wllama and
   * WebLLM run theirs, and the object returned is a `VidLLMWorker` with the same members.
   * The page only samples a `<video>` (seeks and `ImageBitmap`s) and hands the frames over.
   * `worker: false` runs the model on the calling thread. That blocks it: the weights'
   * upload, each video's encode, the prefill and each decode step (on the CPU backend, or
   * WebGPU's command encoding) are tasks of their own, seconds long for a prefill on a
   * small machine, with no input, scrolling or repaint meanwhile.
   * `kv`: what the KV cache keeps keys and values in, as `vidllm-native --kv`: "auto" (default:
   * "f16" where the decoder's heads are whole 32-value blocks, else "f32"), "f32", "f16" (half
   * of f32's memory), "q8_0" (a quarter) or "q4_0" (an eighth).
   * `threads` (`device: "cpu"`): see `cpuThreads`; `threads` of the result says how many run.
   * @param {{model: string|Uint8Array|File|File[]|FileList, mmproj?: string|Uint8Array|File, onProgress?: Function,
   *   device?: "webgpu"|"cpu", context?: number, maxBindingBytes?: number, loraAlpha?: number, visionQuant?: "f32"|"q8_0", worker?: boolean,
   *   kv?: "auto"|"f32"|"f16"|"q8_0"|"q4_0", threads?: number}} opts
   */
  static async load({ worker = onPageThread(), ...opts }) {
    if (worker) {
      // Imported here: worker.js imports this module (it runs `VidLLM` in the worker).
      const { VidLLMWorker } = await import("./worker.js");
      const w = new VidLLMWorker();
      try {
        await w.load(opts);
      } catch (e) {
        w.dispose();  // never rejects: it ends the worker whatever the worker answers
        throw e;
      }
      return w;
    }
    return VidLLM.#loadHere(opts);
  }

  static async #loadHere({ model, mmproj, onProgress, device = "webgpu", context = 4096, maxBindingBytes, loraAlpha, visionQuant, kv, threads }) {
    if (device !== "webgpu" && device !== "cpu") throw new RangeError(`device must be "webgpu" or "cpu", not ${JSON.stringify(device)}`);
    let pkg;
    if (device === "webgpu") pkg = await wasm("webgpu");
    else {
      const threadsWanted = cpuThreads(threads);
      // This thread's CPU package is chosen once: by an earlier call, it may be the
      // one-thread one (a failed start of the threaded package says so itself).
      const started = cpuPackage !== null;
      pkg = await cpuWasm(threadsWanted);
      if (started && threadsWanted > poolThreads) {
        console.info(`vidllm: the CPU backend runs on ${poolThreads} thread(s): this thread's CPU package was already started`);
      }
    }
    if (device === "webgpu") {
      if (!globalThis.navigator?.gpu) throw new WebGPUNotAvailableError("this browser has no WebGPU (navigator.gpu is missing); use device: \"cpu\"");
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) throw new WebGPUNotAvailableError("WebGPU found no adapter; use device: \"cpu\"");
    }
    const gpu = device === "webgpu";
    if (maxBindingBytes !== undefined && !(Number.isFinite(maxBindingBytes) && maxBindingBytes > 0)) {
      throw new RangeError(`maxBindingBytes must be a positive number of bytes, not ${maxBindingBytes}`);
    }
    const cap = maxBindingBytes;
    let bytes = null;
    if (model instanceof Uint8Array) bytes = model;
    else if (typeof File !== "undefined" && model instanceof File) bytes = new Uint8Array(await model.arrayBuffer());
    else if (typeof model === "string" && isGgufName(model)) bytes = await fetchBytes(model, onProgress);
    if (mmproj !== undefined && !bytes) throw new TypeError("mmproj goes with a GGUF model (a .gguf URL, File or bytes), not a folder");
    const vision = mmproj === undefined ? null : await ggufBytes(mmproj, onProgress);
    try {
      const threadsRun = gpu ? 1 : poolThreads;
      if (vision) return new VidLLM(await pkg.VideoRuntime.load_gguf_pair(bytes, vision, gpu, context, cap, kv), true, pkg, threadsRun);
      if (bytes) return new VidLLM(await pkg.Runtime.load_gguf(bytes, gpu, context, cap, kv), false, pkg, threadsRun);
      return new VidLLM(await loadFolder(pkg, folderSource(model, onProgress), gpu, context, cap, loraAlpha, visionQuant, kv), true, pkg, threadsRun);
    } catch (e) {
      const f = failure(e, pkg);
      // The runtime's own refusals of the files arrive unnamed.
      throw f.constructor === Error ? new ModelLoadError(f.message) : f;
    }
  }

  /** "text" for a GGUF decoder, else the folder's architecture (e.g. "video_llava"). */
  get architecture() { return this.#info.architecture; }
  get weightsDeviceBytes() { return this.#info.weightsDeviceBytes; }
  /** Threads the CPU backend computes on (1 on WebGPU, or where threads cannot run). */
  get threads() { return this.#info.threads; }
  /** Frames a video is sampled to unless `ask` says otherwise. */
  get defaultFrames() { return this.#info.defaultFrames; }
  /** The model's own sampling policy ("hf"; "smolvlm" for SmolVLM2) and its rate. */
  get defaultSampling() { return { sampling: this.#info.defaultSampling, fps: this.#info.defaultFps, frames: this.#info.defaultFrames }; }
  /** Whether the model takes a video (Idefics3 takes still images only). */
  get supportsVideo() { return this.#info.supportsVideo; }
  /** Whether the model takes still images. */
  get supportsImages() { return this.#info.supportsImages; }
  /** Row bands of the output head (1 unless it exceeds the storage-binding cap). */
  get headBands() { return this.#info.headBands; }

  #live() {
    if (!this.#rt) throw new DisposedError();
    return this.#rt;
  }

  /** Run `work` after whatever the runtime is doing; its pieces stream through a channel. */
  #stream(work) {
    const [ch, next] = queued(this.#busy, (push) => work((text, id) => push({ text, id: id ?? null, producedAt: performance.timeOrigin + performance.now() })), (e) => {
      const err = failure(e, this.#pkg);
      if (err instanceof RuntimeFailedError) this.#rt = null;
      return err;
    });
    this.#busy = next;
    return ch;
  }

  /**
   * Stream an answer to a text prompt: yields {text, id}. `raw` skips the chat template;
   * `signal` aborts. Follow-up calls continue the same conversation (its KV cache).
   */
  generate({ prompt, raw = false, maxTokens = 256, temperature = 0, seed = 0, signal, newConversation = false, onStage } = {}) {
    if (this.#video) return this.ask({ prompt, maxTokens, temperature, seed, signal, newConversation, onStage });
    const rt = this.#live();
    return this.#stream((push) => {
      if (newConversation) rt.reset();
      onStage?.("prefill");
      return rt.generate(String(prompt ?? ""), raw, maxTokens, temperature, BigInt(seed), push, () => Boolean(signal?.aborted));
    });
  }

  /**
   * Ask about a video (an `HTMLVideoElement`, or frames already taken: `ImageBitmap`s /
   * `VideoFrame`s) and/or images. `frames`: how many to sample (default: the model's);
   * `sampling`: "hf" | "linspace" | "pllava" | "fps" | "smolvlm" (with `fps`, `maxFrames`;
   * default: the model's own, see `defaultSampling`), on a grid of `frameRate` frames a
   * second (see `times`). Frames already taken may say when
   * (`frameTimes`, seconds, and the video's `duration`).
   * Asking again without a new video continues the conversation about the same one;
   * `newConversation` starts over, still without encoding the video again.
   * `onFrames({sources, times, width, height})` sees the sampled frames (`ImageBitmap`s,
   * closed once encoded: draw them during the call). `onStage(stage)` hears each stage
   * begin: "sampling", "encoding", "prefill" (the first piece then starts the answer).
   * `maxVisualTokens` with `reduce` ("none" | "slowfast" | "maxinfo" | "fastvid" | "framefusion"): a visual-token
   * budget for the video, as `vidllm-native ask --max-visual-tokens --reduce` (maxinfo
   * samples twice the frames and keeps key frames); `lastReduction` then says what it did.
   */
  ask({ video, image, frames, frameTimes, duration, sampling, fps, maxFrames, frameRate = 30, decoder, prompt, maxTokens = 256,
        temperature = 0, seed = 0, signal, onFrames, onStage, newConversation = false, maxVisualTokens, reduce,
        askedFrames } = {}) {
    const rt = this.#live();
    if (!this.#video) throw new Error("this is a text model (GGUF); load a video-language folder to ask about videos");
    if ((video || Array.isArray(frames)) && !this.#info.supportsVideo) {
      throw new VideoError(`${this.#info.architecture} takes still images only, not a video (pass image)`);
    }
    ({ sampling, fps, maxFrames } = samplingOf(this.#info, { frames, sampling, fps, maxFrames }));
    return this.#stream(async (push) => {
      const given = Array.isArray(frames) ? frames : null;
      const n = typeof frames === "number" ? frames : this.#info.defaultFrames;
      const k = candidateFactor(maxVisualTokens, reduce);
      const key = given ? null : videoKey(video, { n, sampling, fps, maxFrames, frameRate, decoder, maxVisualTokens, reduce });
      const same = sameVideo(key, this.#seen);
      if ((video || given) && !same) {
        rt.clear_visuals();
        this.#seen = null;
        if (!given) onStage?.("sampling");
        const f = given ? { sources: given, times: frameTimes ?? given.map((x) => (x.timestamp ?? 0) / 1e6), duration }
          : await sampleFrames(video, { n: n * k, sampling, fps: fps * k, maxFrames: maxFrames * k, frameRate, decoder });
        rt.set_budget(maxVisualTokens ?? undefined, reduce ?? undefined, askedFrames ?? (given ? Math.ceil(given.length / k) : n));
        try {
          onFrames?.(f);
          onStage?.("encoding");
          await encodeVideo(rt, f);
        } finally {
          if (!given) f.sources.forEach((b) => b.close());
        }
        this.#seen = key;
      } else if (newConversation) rt.reset_conversation();
      if (image) {
        if (!video && !given) { rt.clear_visuals(); this.#seen = null; }
        onStage?.("encoding");
        for (const im of Array.isArray(image) ? image : [image]) await encodeImage(rt, im);
      }
      onStage?.("prefill");
      await rt.ask(String(prompt ?? ""), maxTokens, temperature, BigInt(seed), push, () => Boolean(signal?.aborted));
    });
  }

  /** What the visual-token budget did to the last video (`{method, tokens_before, tokens_after,
   * frames_before, frames_after, reduce_ms, note}`), or null. */
  get lastReduction() {
    const r = this.#live().last_reduction();
    return r ? JSON.parse(r) : null;
  }

  /** The last video's frames as the device received them: {rgb, ...} (tests, debugging). */
  async framesRGB() { return this.#live().frames_rgb(); }

  /**
   * Watch a live `<video>` (a webcam or screen `MediaStream`, `canvas.captureStream()`, or a
   * file as it plays): frames are taken as they are shown, `fps` a second of media time,
   * into a rolling window of the newest `window` (default: the model's frames). Each frame
   * is encoded once, when it arrives, where the model encodes frames alone (Video-LLaVA,
   * LLaVA-NeXT-Video, SmolVLM2, PLLaVA before its pooling; MERV encodes the window when
   * asked). Resolves to a `LiveVideo`: `ask({prompt, ...})` answers from the window as it
   * stands when asked, `lastWindow` says which frames that was, `stop()` ends the watch.
   * `maxVisualTokens` / `reduce`: a budget for each window, as in `ask`.
   * @param {HTMLVideoElement} video
   * @param {{fps?: number, window?: number, maxVisualTokens?: number, reduce?: string, stallAfter?: number}} [opts]
   */
  async watch(video, { fps = 1, window, maxVisualTokens, reduce, stallAfter = 5 } = {}) {
    if (!this.#video || !this.#info.supportsVideo) throw new VideoError(`${this.#info.architecture} does not take a video`);
    const size = window ?? this.#info.defaultFrames;
    await this.liveStart({ window: size, maxVisualTokens, reduce });
    return new LiveVideo(video, { fps, stallAfter }, {
      frame: (f) => this.liveFrame(f),
      ask: (opts) => this.liveAsk(opts),
      report: () => this.liveReport,
      framesRGB: () => this.liveFramesRGB(),
      end: () => this.liveEnd(),
    });
  }

  #liveQueue = null;

  /** A live window of `window` frames (what `watch` and a worker's watch run on). */
  async liveStart({ window, maxVisualTokens, reduce }) {
    const rt = this.#live();
    if (!Number.isInteger(window) || window < 1) throw new RangeError(`a live window holds at least one frame, not ${window}`);
    const started = this.#busy.then(() => {
      this.#liveQueue?.pending.forEach((f) => f.bitmap.close());
      rt.set_budget(maxVisualTokens ?? undefined, reduce ?? undefined, window);
      rt.live_begin(window);
      this.#liveQueue = { window, pending: [], scheduled: false, taken: 0, skipped: 0, error: null, barriers: [] };
    });
    this.#busy = started.catch(() => {});
    try { await started; } catch (e) { throw failure(e, this.#pkg); }
  }

  /** A live frame `{bitmap, index, time}` (the bitmap is closed once encoded): queued behind
   * what the runtime is doing, then encoded with the others that came meanwhile, except
   * those that would leave the window unseen. */
  liveFrame(frame) {
    const q = this.#liveQueue;
    if (!q || !this.#rt) { frame.bitmap.close(); return; }
    q.taken += 1;
    q.pending.push({ ...frame, seq: q.taken });
    this.#liveSchedule(q);
  }

  /** Encode the queued frames after what the runtime is doing; frames handed over after a
   * question that waits are left for after it (its window is the one it was asked about). */
  #liveSchedule(q) {
    if (q.scheduled || !q.pending.length) return;
    q.scheduled = true;
    this.#busy = this.#busy.then(() => this.#liveDrain(q, q.barriers[0] ?? Infinity)).catch((e) => { q.error = failure(e, this.#pkg); });
  }

  /** Encode the frames queued (those handed over up to the `upTo`-th), the newest `window`. */
  async #liveDrain(q, upTo = Infinity) {
    q.scheduled = false;
    const n = q.pending.findIndex((f) => f.seq > upTo);
    const frames = q.pending.splice(0, n < 0 ? q.pending.length : n);
    const skip = Math.max(0, frames.length - q.window);
    q.skipped += skip;
    frames.slice(0, skip).forEach((f) => f.bitmap.close());
    for (const f of frames.slice(skip)) {
      try {
        if (q !== this.#liveQueue || !this.#rt) continue;
        const rt = this.#rt;
        if (rt.gpu_frames()) rt.live_add_frame(f.bitmap, f.index, f.time);
        else {
          const [w, h] = sizeOf(f.bitmap);
          rt.live_add_frame_rgba(rgbaOf([f.bitmap], w, h), h, w, f.index, f.time);
        }
      } finally {
        f.bitmap.close();
      }
    }
  }

  /** Answer from the live window as it stands (frames taken before the question included). */
  liveAsk({ prompt, maxTokens = 256, temperature = 0, seed = 0, signal, onStage } = {}) {
    const rt = this.#live();
    const q = this.#liveQueue;
    if (!q) throw new InvalidRequestError("no live video: call watch first");
    // The window as it stands now: frames handed over later wait for the next question.
    const upTo = q.taken;
    q.barriers.push(upTo);
    return this.#stream(async (push) => {
      try {
        if (q.error) { const e = q.error; q.error = null; throw e; }
        await this.#liveDrain(q, upTo);
      } finally {
        q.barriers.shift();
      }
      onStage?.("prefill");
      try {
        await rt.live_ask(String(prompt ?? ""), maxTokens, temperature, BigInt(seed), push, () => Boolean(signal?.aborted));
      } finally {
        const r = rt.live_report();
        this.#liveReport = r ? { ...JSON.parse(r), frames_taken: upTo, frames_skipped: q.skipped } : null;
        this.#liveSchedule(q);
      }
    });
  }

  #liveReport = null;

  /** What the last live question's window was: `{frames: [{index, time}], frame_encodes,
   * encoded_at_question, frames_taken, frames_skipped, visual_tokens, reduction}`. */
  get liveReport() { return this.#liveReport; }

  /** The last live question's frames as the device received them (RGB, frame after frame). */
  liveFramesRGB() {
    const rt = this.#live();
    // On the runtime's queue: a frame encoded during the read-back would borrow the runtime twice.
    const read = this.#busy.then(() => rt.live_frames_rgb());
    this.#busy = read.catch(() => {});
    return read;
  }

  /** End the live video: frames still queued are dropped, the window freed. */
  liveEnd() {
    const q = this.#liveQueue;
    this.#liveQueue = null;
    q?.pending.splice(0).forEach((f) => f.bitmap.close());
    const rt = this.#rt;
    // Not once the runtime is disposed: its wasm object is freed then.
    this.#busy = this.#busy.then(() => { if (rt && this.#rt === rt) rt.live_end(); }).catch(() => {});
  }

  dispose() {
    this.#rt?.free();
    this.#rt = null;
  }
}

/** A GGUF given as bytes, a File, or a URL. */
async function ggufBytes(src, onProgress) {
  if (src instanceof Uint8Array) return src;
  if (typeof File !== "undefined" && src instanceof File) return new Uint8Array(await src.arrayBuffer());
  if (typeof src === "string") return fetchBytes(src, onProgress);
  throw new TypeError("a GGUF is a URL, a File or a Uint8Array");
}

/** A file's text; `undefined` for an `optional` one that is absent. `folder`: the file
 * says whether this folder exists (its 404 reads "model folder not found"). */
async function fetchText(url, optional = false, folder = null) {
  let res;
  try { res = await fetch(url); } catch (e) { throw new ModelFetchError(`cannot fetch ${url}: ${e.message}`); }
  if (!res.ok) {
    if (optional) return undefined;
    if (folder && res.status === 404) throw new ModelFetchError(`model folder not found: ${folder} (its config.json: HTTP 404)`);
    throw new ModelFetchError(`cannot fetch ${url}: HTTP ${res.status}`);
  }
  return res.text();
}

/**
 * A Hugging Face-style folder: the config files the runtime reads (`folder_files()`, the
 * same list and precedence as native folders), then the safetensors shards. The
 * architecture is checked before any weights are fetched.
 */
async function loadFolder(pkg, src, gpu, context, cap, loraAlpha, visionQuant, kv) {
  const wanted = pkg.folder_files();
  const required = new Set(["config.json", "tokenizer.json"]);
  // Fetched together; a failure is reported in the list's order, so a missing folder is
  // named by its config.json, whichever answer arrives first.
  const settled = await Promise.allSettled([...wanted.map((n) => src.text(n, !required.has(n))), src.text("SHA256SUMS", true)]);
  const failed = settled.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
  const texts = settled.map((r) => r.value);
  const sums = texts.pop();
  const text = (n) => texts[wanted.indexOf(n)];
  pkg.folder_architecture(text("config.json"));
  const index = text("model.safetensors.index.json");
  const shards = index ? [...new Set(Object.values(JSON.parse(index).weight_map))].sort() : ["model.safetensors"];
  const checks = parseSums(sums);
  const enc = new TextEncoder();
  const names = [], files = [];
  wanted.forEach((n, i) => { if (texts[i] !== undefined) { names.push(n); files.push(enc.encode(texts[i])); } });
  for (const name of shards) {
    const bytes = await src.bytes(name);
    await verify(name, bytes, checks);
    names.push(name);
    files.push(bytes);
  }
  return pkg.VideoRuntime.load(names, files, gpu, context, cap, loraAlpha, visionQuant, kv);
}

/** The weight types the WebGPU kernels read in place (llama.cpp's names). */
export async function kernelTypes() {
  return (await wasm("webgpu")).kernel_types();
}

/**
 * Check this browser's WebGPU kernels against an f64 product on the same random weights:
 * for each type (default: all of `kernelTypes()`), a single-row product (decode) and a
 * 37-row one (prefill). GPU drivers differ; a page can run this once before trusting a
 * device. Resolves to one row per check: `{ type, m, n, k, maxDiff, maxAbs, ok }`, `ok`
 * when the difference is within f32 rounding of a k-long sum (the native tests' bound).
 */
export async function checkKernels({ types } = {}) {
  const pkg = await wasm("webgpu");
  if (!navigator.gpu) throw new WebGPUNotAvailableError("this browser has no WebGPU (navigator.gpu is missing)");
  const rows = [];
  for (const type of types ?? pkg.kernel_types()) {
    for (const [m, n] of [[1, 67], [37, 70]]) {
      const c = await pkg.check_kernel(type, m, n).catch((e) => { throw failure(e, pkg); });
      rows.push({ type, m, n, k: c.k, maxDiff: c.maxDiff, maxAbs: c.maxAbs, ok: c.ok });
      c.free();
    }
  }
  return rows;
}

/**
 * Sampling times in seconds: the native policies ("hf" transformers' uniform, "linspace"
 * the original Video-LLaVA repo, "pllava" segment middles, "fps" with at most `maxFrames`
 * spread over the whole video), computed by the same Rust code as `vidllm-native`, on a
 * grid of `frameRate` frames a second (a <video> does not tell its own; default 30).
 */
export async function times(video, n, policy) {
  return samplingTimes(video.duration, n, policy);
}

/** `times` for a video of `d` seconds (what a worker computes for the page). */
export async function samplingTimes(d, n, { sampling = "hf", fps = 1, maxFrames = 32, frameRate = 30 } = {}) {
  const pkg = await anyPackage();
  if (!Number.isFinite(d) || d <= 0) throw new VideoError("the video has no known duration (still loading, or a live stream)");
  try {
    return Array.from(pkg.sampling_times(String(sampling), n, fps, maxFrames, d, frameRate));
  } catch (e) {
    throw new RangeError(e.message);
  }
}

/**
 * The frame indices a policy picks on a video's display timeline (`frameTimes`, seconds from
 * the first frame; `rate` their average frame rate), by the same Rust code as
 * `vidllm-native` on a file it numbers.
 */
export async function samplingIndices(frameTimes, rate, { sampling = "hf", n = 8, fps = 1, maxFrames = 32 } = {}) {
  const pkg = await anyPackage();
  try {
    return Array.from(pkg.sampling_indices(String(sampling), n, fps, maxFrames, Float64Array.from(frameTimes), rate));
  } catch (e) {
    throw new RangeError(e.message);
  }
}

/** Wait for `video` to know its size and duration, or fail if the browser cannot decode it. */
async function metadata(video) {
  if (video.error) throw new VideoError(`the browser cannot decode this video (${video.error.message || `code ${video.error.code}`})`);
  if (video.readyState >= 1) return;
  await new Promise((resolve, reject) => {
    const ok = () => { video.removeEventListener("error", fail); resolve(); };
    const fail = () => { video.removeEventListener("loadedmetadata", ok); reject(new VideoError(`the browser cannot decode this video (${video.error?.message || "unsupported or corrupt"})`)); };
    video.addEventListener("loadedmetadata", ok, { once: true });
    video.addEventListener("error", fail, { once: true });
  });
}

/** Seek a <video> to `t` seconds and resolve once the frame is there. */
function seek(video, t) {
  return new Promise((resolve, reject) => {
    const done = () => { video.removeEventListener("error", fail); resolve(); };
    const fail = () => { video.removeEventListener("seeked", done); reject(new VideoError(`the browser cannot decode this video (${video.error?.message ?? "error"})`)); };
    video.addEventListener("seeked", done, { once: true });
    video.addEventListener("error", fail, { once: true });
    video.currentTime = t;
  });
}

/**
 * The media time of a <video>'s first frame: 0 for most files, later when the stream's
 * first timestamp is (the browser keeps it). Read from `requestVideoFrameCallback` after
 * a seek to 0; 0 where the browser lacks it or presents no frame within half a second.
 */
const firstFrameTimes = new WeakMap();
async function firstFrameTime(video) {
  // Once per source: a frame already on screen would not be presented again.
  const known = firstFrameTimes.get(video);
  if (known && known.src === video.currentSrc) return known.t;
  const shownAt = await seekShown(video, 0, 500);
  const t = Number.isFinite(shownAt) && shownAt > 0 && shownAt < video.duration ? shownAt : 0;
  firstFrameTimes.set(video, { src: video.currentSrc, t });
  return t;
}

/**
 * Seek a <video> to `t` seconds; resolves with the media time of the frame then presented,
 * or null where the browser lacks `requestVideoFrameCallback` or presents no new frame
 * within `wait` ms of the seek (the frame on screen did not change).
 */
async function seekShown(video, t, wait) {
  if (typeof video.requestVideoFrameCallback !== "function") {
    await seek(video, t);
    return null;
  }
  let done;
  const shown = new Promise((ok) => { done = ok; });
  const id = video.requestVideoFrameCallback((_, meta) => done(meta.mediaTime));
  await seek(video, t);
  const timer = setTimeout(() => { video.cancelVideoFrameCallback(id); done(null); }, wait);
  const at = await shown;
  clearTimeout(timer);
  return at;
}

/** Refuse pixels the page may not read: a GPU copy of them would fail outright. */
function assertReadable(source) {
  const c = new OffscreenCanvas(1, 1).getContext("2d");
  c.drawImage(source, 0, 0, 1, 1);
  try { c.getImageData(0, 0, 1, 1); } catch (e) {
    throw new VideoError(`cannot read this video's pixels: it is cross-origin without CORS (serve it with Access-Control-Allow-Origin and set crossorigin="anonymous") (${e.name})`);
  }
}

/**
 * Candidate frames per frame asked for: MaxInfo chooses key frames among twice as many
 * (as `vidllm-native` does); other budgets sample what is asked.
 */
export function candidateFactor(maxVisualTokens, reduce) {
  return maxVisualTokens != null && reduce === "maxinfo" ? 2 : 1;
}

/**
 * What makes a question's frames the last question's: the same `<video>` at the same
 * source, sampled the same way under the same budget. `null` for frames already taken.
 */
export function videoKey(video, { n, sampling, fps, maxFrames, frameRate, decoder, maxVisualTokens, reduce }) {
  return video ? { video, src: video.currentSrc ?? null, n, sampling, fps, maxFrames, frameRate, decoder, maxVisualTokens, reduce } : null;
}

/** Whether two `videoKey`s name the same frames (a null key never does). */
export function sameVideo(key, seen) {
  return Boolean(key && seen && Object.keys(key).every((k) => key[k] === seen[k]));
}

/**
 * The sampling a question uses: what it names, else the model's own (`info`:
 * `defaultSampling`, `defaultFps`, `defaultFrames`); a number of `frames` caps a
 * rate-based policy unless `maxFrames` is given.
 */
export function samplingOf(info, { frames, sampling, fps, maxFrames }) {
  const own = sampling === undefined || sampling === info.defaultSampling;
  const n = typeof frames === "number" ? frames : undefined;
  return {
    sampling: sampling ?? info.defaultSampling ?? "hf",
    fps: fps ?? (own ? info.defaultFps : 1),
    maxFrames: maxFrames ?? n ?? (own ? info.defaultFrames : 32),
  };
}

/**
 * Frames of a <video> as `ImageBitmap`s (transferable to a worker), at `at` seconds or
 * by a policy `{n, sampling, fps, maxFrames, frameRate}`.
 *
 * A policy on a video that plays a file the page may fetch is frame-exact (`demux.js`): the
 * page demuxes the file, numbers the frames it shows, picks the policy's indices on that
 * timeline as `vidllm-native` does, and decodes those frames with WebCodecs. Then `decoder`
 * is "webcodecs", and `indices` and `frames` (the count) are the file's.
 *
 * Otherwise (a live source, a file the page cannot demux or WebCodecs cannot decode:
 * `decoderNote` says why; `decoder` "video-element") the element is seeked, as it is when
 * the policy says `decoder: "video-element"`; `decoder: "webcodecs"` fails instead.
 * A policy then picks frame k of a grid of `frameRate` frames a second, as `vidllm-native`
 * numbers frames; its time `k / frameRate` is where the frame starts. The page seeks to
 * the middle of the frame's interval, where the browser shows frame k whatever its
 * rounding (at the very start it may still show frame k - 1). The times returned (and
 * stated in prompts) are the frames' starts, as natively; where the browser says (with
 * `requestVideoFrameCallback`) that it shows another frame than the one asked, as
 * Chromium can on an MP4 whose decode timestamps trail its presentation timestamps (it
 * lands on the next keyframe), the time returned is that of the frame shown, never the
 * one asked. Times given in seconds are seeked as given. A policy's `schedule(duration,
 * n, policy)` and `pick(frameTimes, rate, policy)` may say where its times and indices
 * come from (`VidLLMWorker` asks its worker, so the page never instantiates the wasm); by
 * default the page's own wasm computes them.
 */
export async function sampleFrames(video, at) {
  let decoderNote;
  if (!Array.isArray(at) && at.decoder !== "video-element") {
    const exact = await demuxedFrames(video, (frameTimes, rate) => (at.pick ?? samplingIndices)(frameTimes, rate, at));
    // Drawn in the worker from a file it could fetch: its pixels are the page's to read.
    if (!exact.skipped) return exact;
    decoderNote = exact.skipped;
    if (at.decoder === "webcodecs") throw new VideoError(`cannot take this video's frames with WebCodecs: ${decoderNote}`);
  }
  await metadata(video);
  const ts = Array.isArray(at) ? at : await (at.schedule ?? samplingTimes)(video.duration, at.n, at);
  const half = Array.isArray(at) ? 0 : 0.5 / (at.frameRate ?? 30);
  // A stream whose first frame is not at 0 (an MP4 without an edit list, B-frame delay):
  // the grid starts at the first frame, as natively.
  const first = Array.isArray(at) ? 0 : await firstFrameTime(video);
  const sources = [];
  const taken = [];
  for (const t of ts) {
    // The last frame's middle may lie past the end the browser reports: halfway there.
    const mid = first + t + half;
    const shownAt = await seekShown(video, mid < video.duration ? mid : (first + t + video.duration) / 2, 300);
    taken.push(half && shownAt !== null && Math.abs(shownAt - first - t) >= half ? shownAt - first : t);
    const bitmap = await createImageBitmap(video);
    if (!sources.length) assertReadable(bitmap);
    sources.push(bitmap);
  }
  return { sources, times: taken, duration: video.duration, width: video.videoWidth, height: video.videoHeight,
    decoder: "video-element", decoderNote };
}

const sizeOf = (s) => [s.displayWidth ?? s.videoWidth ?? s.naturalWidth ?? s.width, s.displayHeight ?? s.videoHeight ?? s.naturalHeight ?? s.height];

/** RGBA bytes of frame sources through a canvas: the CPU backend's path. */
function rgbaOf(sources, w, h) {
  const ctx = new OffscreenCanvas(w, h).getContext("2d", { willReadFrequently: true });
  const out = new Uint8Array(sources.length * w * h * 4);
  sources.forEach((s, i) => {
    ctx.clearRect(0, 0, w, h);
    ctx.drawImage(s, 0, 0);
    out.set(ctx.getImageData(0, 0, w, h).data, i * w * h * 4);
  });
  return out;
}

/** Frames to the device: straight into a GPU texture on WebGPU, through a canvas on the CPU. */
async function encodeVideo(rt, { sources, times, duration }) {
  if (!sources.length) throw new VideoError("no frames to encode");
  // When the frames were taken: some models' prompts state it (SmolVLM2).
  const at = Float64Array.from(times ?? sources.map(() => 0));
  const length = Number.isFinite(duration) ? duration : Math.max(0, ...at);
  const [w, h] = sizeOf(sources[0]);
  sources.forEach(assertSameSize(w, h));
  assertReadable(sources[0]);
  if (rt.gpu_frames()) {
    rt.begin_frames(sources.length, w, h);
    for (const s of sources) rt.add_frame(s);
    return rt.encode_video(at, length);
  }
  return rt.encode_video_rgba(rgbaOf(sources, w, h), sources.length, h, w, at, length);
}

const assertSameSize = (w, h) => (s, i) => {
  const [sw, sh] = sizeOf(s);
  if (sw !== w || sh !== h) throw new VideoError(`frame ${i} is ${sw}x${sh}, the first ${w}x${h}`);
};

async function encodeImage(rt, image) {
  if (typeof HTMLImageElement !== "undefined" && image instanceof HTMLImageElement && !image.complete) await image.decode();
  const [w, h] = sizeOf(image);
  assertReadable(image);
  if (rt.gpu_frames()) {
    rt.begin_frames(1, w, h);
    rt.add_frame(image);
    return rt.encode_image();
  }
  return rt.encode_image_rgba(rgbaOf([image], w, h), h, w);
}

/**
 * Take frames of a playing `<video>` (any source: a file, a `MediaStream`) as the browser
 * shows them, `fps` a second of media time (the first shown at or after each tick), with
 * `requestVideoFrameCallback`. Each is an `ImageBitmap` handed to `onFrame({bitmap, index,
 * time})`: `index` counts the frames the browser presented, `time` is seconds from the
 * first one taken. Returns a function that stops.
 */
export function sampleLive(video, { fps, onFrame, onError }) {
  if (typeof video?.requestVideoFrameCallback !== "function") {
    throw new VideoError("this browser cannot follow a playing <video> (no requestVideoFrameCallback)");
  }
  if (!(Number.isFinite(fps) && fps > 0)) throw new RangeError(`fps must be a positive number of frames a second, not ${fps}`);
  let stopped = false, next = 0, start = null, checked = false, id;
  const shown = async (now, meta) => {
    if (stopped) return;
    id = video.requestVideoFrameCallback(shown);
    const media = Number.isFinite(meta.mediaTime) ? meta.mediaTime : now / 1000;
    start ??= media;
    const time = media - start;
    // Half a microsecond of slack, as natively: media times are rounded.
    if (time + 5e-7 < next) return;
    next = Math.floor((time + 5e-7) * fps) / fps + 1 / fps;
    try {
      const bitmap = await createImageBitmap(video);
      if (!checked) { assertReadable(bitmap); checked = true; }
      if (stopped) bitmap.close();
      else onFrame({ bitmap, index: meta.presentedFrames ?? 0, time });
    } catch (e) {
      onError?.(e instanceof VideoError ? e : new VideoError(`cannot take a frame of the live video: ${e.message}`));
    }
  };
  id = video.requestVideoFrameCallback(shown);
  return () => { stopped = true; video.cancelVideoFrameCallback(id); };
}

/**
 * A live video being watched (`VidLLM.watch`, `VidLLMWorker.watch`): its frames flow into
 * the runtime's rolling window until `stop()`.
 */
export class LiveVideo {
  #ops;
  #stop;
  #stallAfter;
  #lastFrame = null;
  #newest = null;
  #ended = false;
  #tracks;
  #error = null;
  #lastWindow = null;

  constructor(video, { fps, stallAfter }, ops) {
    this.#ops = ops;
    this.#stallAfter = stallAfter;
    // A stream ends when its video tracks do (a webcam unplugged, a capture revoked, a
    // track stopped) or a file does.
    this.#tracks = video.srcObject?.getVideoTracks?.() ?? [];
    video.addEventListener("ended", () => { this.#ended = true; }, { once: true });
    try {
      this.#stop = sampleLive(video, { fps, onFrame: (f) => { this.#lastFrame = performance.now(); this.#newest = f.index; ops.frame(f); },
        onError: (e) => { this.#error = e; } });
    } catch (e) {
      ops.end();
      throw e;
    }
  }

  /** How the stream stands: "waiting" (no frame yet), "live", "stalled" (no frame for
   * `stallAfter` seconds), "ended" (its tracks ended, or `stop()`). */
  get state() {
    if (this.#ended || (this.#tracks.length && this.#tracks.every((t) => t.readyState === "ended"))) return "ended";
    if (this.#lastFrame === null) return "waiting";
    return (performance.now() - this.#lastFrame) / 1000 > this.#stallAfter ? "stalled" : "live";
  }

  /**
   * Answer from the window as it stands (the frames taken before the question): yields
   * `{text, id}` as `VidLLM.ask` does. `lastWindow` then says which frames it was.
   */
  ask({ prompt, maxTokens, temperature, seed, signal, onStage } = {}) {
    if (this.#error) { const e = this.#error; this.#error = null; throw e; }
    const state = this.state;
    const newest = this.#newest;
    const pieces = this.#ops.ask({ prompt, maxTokens, temperature, seed, signal, onStage });
    const self = this;
    return (async function* () {
      try {
        yield* pieces;
      } finally {
        const r = await self.#ops.report();
        self.#lastWindow = r && { ...r, stream: state, newest_taken: newest };
      }
    })();
  }

  /** The last answer's window: `{frames: [{index, time}], frame_encodes, encoded_at_question,
   * frames_taken, frames_skipped, visual_tokens, reduction, stream}`. */
  get lastWindow() { return this.#lastWindow; }

  /** The last answer's frames as the device received them: RGB bytes, frame after frame. */
  framesRGB() { return this.#ops.framesRGB(); }

  /** Stop taking frames; the window is freed. */
  stop() {
    if (!this.#stop) return;
    this.#stop();
    this.#stop = null;
    this.#ended = true;
    this.#ops.end();
  }
}
