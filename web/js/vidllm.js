// vidllm in the browser: the JS surface over the wasm runtime.
//
//   const rt = await VidLLM.load({ model: "https://host/model.gguf", onProgress });
//   for await (const piece of rt.generate({ prompt: "Hi!" })) out.textContent += piece.text;
//   const stream = await rt.chat.completions.create({ messages, stream: true });
//   rt.dispose();

import init, { Runtime, VideoRuntime } from "../pkg/vidllm_web.js";

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
/** The runtime was used after dispose(). */
export class DisposedError extends Error {
  constructor() { super("this VidLLM runtime was disposed"); this.name = "DisposedError"; }
}

const CACHE = "vidllm-models-v1";

async function cached(url) {
  if (typeof caches === "undefined") return null;
  try { return await (await caches.open(CACHE)).match(url); } catch { return null; }
}

async function store(url, bytes) {
  if (typeof caches === "undefined") return;
  try {
    await (await caches.open(CACHE)).put(url, new Response(bytes));
  } catch (e) {
    if (e && e.name === "QuotaExceededError") {
      console.warn(new QuotaError(`not cached: the browser's storage quota is too small for ${bytes.byteLength} bytes`));
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
  await store(url, bytes);
  return bytes;
}

/** Callback pushes -> async iterator pulls. */
function channel() {
  const items = [];
  let wake = null;
  let closed = false;
  let failure = null;
  return {
    push(v) { items.push(v); wake?.(); },
    close(err) { closed = true; failure = err ?? null; wake?.(); },
    async *[Symbol.asyncIterator]() {
      for (;;) {
        if (items.length) { yield items.shift(); continue; }
        if (closed) { if (failure) throw failure; return; }
        await new Promise((r) => (wake = r));
        wake = null;
      }
    },
  };
}

export class VidLLM {
  #rt;
  #busy = Promise.resolve();

  constructor(rt) {
    this.#rt = rt;
    this.chat = { completions: { create: (req) => this.#completion(req) } };
  }

  /**
   * @param {{model: string|Uint8Array|File, onProgress?: Function, device?: "webgpu"|"cpu", context?: number}} opts
   */
  static async load({ model, onProgress, device = "webgpu", context = 2048 }) {
    await init();
    if (device === "webgpu") {
      if (!globalThis.navigator?.gpu) throw new WebGPUNotAvailableError("this browser has no WebGPU (navigator.gpu is missing); use device: \"cpu\"");
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) throw new WebGPUNotAvailableError("WebGPU found no adapter; use device: \"cpu\"");
    }
    let bytes;
    if (model instanceof Uint8Array) bytes = model;
    else if (typeof File !== "undefined" && model instanceof File) bytes = new Uint8Array(await model.arrayBuffer());
    else bytes = await fetchBytes(String(model), onProgress);
    return new VidLLM(await Runtime.load_gguf(bytes, device === "webgpu", context));
  }

  get weightsDeviceBytes() { return this.#live().weights_device_bytes(); }

  #live() {
    if (!this.#rt) throw new DisposedError();
    return this.#rt;
  }

  /**
   * Stream an answer: yields {text, id}. `raw` skips the chat template; `signal` aborts.
   * Follow-up calls continue the same conversation (its KV cache).
   */
  generate({ prompt, raw = false, maxTokens = 256, temperature = 0, seed = 0, signal } = {}) {
    const rt = this.#live();
    const ch = channel();
    const tokens = raw ? rt.tokenize(prompt) : rt.chat_tokens(prompt);
    const run = this.#busy.then(() =>
      rt.generate(Uint32Array.from(tokens), maxTokens, temperature, BigInt(seed),
        (text, id) => ch.push({ text, id: id ?? null }),
        () => Boolean(signal?.aborted)));
    this.#busy = run.then(() => {}, () => {});
    run.then(() => ch.close(), (e) => ch.close(e instanceof Error ? e : new Error(String(e))));
    return ch;
  }

  /** OpenAI-shaped chat completion (the last user message; streamed chunks). */
  async #completion({ messages, stream = false, max_tokens = 256, temperature = 0, seed = 0, signal }) {
    const user = [...messages].reverse().find((m) => m.role === "user");
    const content = typeof user?.content === "string" ? user.content
      : (user?.content ?? []).filter((p) => p.type === "text").map((p) => p.text).join("\n");
    this.#live().reset();
    const pieces = this.generate({ prompt: content, maxTokens: max_tokens, temperature, seed, signal });
    const id = `chatcmpl-${Date.now()}`;
    if (!stream) {
      let text = "";
      for await (const p of pieces) text += p.text;
      return { id, object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: text }, finish_reason: "stop" }] };
    }
    return (async function* () {
      for await (const p of pieces) {
        yield { id, object: "chat.completion.chunk", choices: [{ index: 0, delta: { content: p.text }, finish_reason: null }] };
      }
      yield { id, object: "chat.completion.chunk", choices: [{ index: 0, delta: {}, finish_reason: "stop" }] };
    })();
  }

  dispose() {
    this.#rt?.free();
    this.#rt = null;
  }
}

/** Seek a <video> to `t` seconds and resolve once the frame is there. */
function seek(video, t) {
  return new Promise((resolve, reject) => {
    const done = () => { video.removeEventListener("error", fail); resolve(); };
    const fail = () => reject(new Error(`the browser cannot decode this video (${video.error?.message ?? "error"})`));
    video.addEventListener("seeked", done, { once: true });
    video.addEventListener("error", fail, { once: true });
    video.currentTime = t;
  });
}

/**
 * Sample `n` frames of a <video> at transformers' times (i * duration / n) as RGBA.
 * Canvas read-back path: a cross-origin video without CORS taints it and is refused.
 */
export async function sampleFrames(video, n) {
  if (video.readyState < 1) await new Promise((r) => video.addEventListener("loadedmetadata", r, { once: true }));
  const w = video.videoWidth, h = video.videoHeight;
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const rgba = new Uint8Array(n * w * h * 4);
  const times = [];
  for (let i = 0; i < n; i++) {
    const t = (i * video.duration) / n;
    await seek(video, t);
    const bitmap = await createImageBitmap(video);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    let data;
    try { data = ctx.getImageData(0, 0, w, h).data; } catch (e) {
      throw new Error(`cannot read the video's pixels (a cross-origin video needs CORS): ${e.message}`);
    }
    rgba.set(data, i * w * h * 4);
    times.push(t);
  }
  return { rgba, width: w, height: h, times };
}

async function fetchText(url, optional = false) {
  const res = await fetch(url);
  if (!res.ok) {
    if (optional) return undefined;
    throw new ModelFetchError(`cannot fetch ${url}: HTTP ${res.status}`);
  }
  return res.text();
}

/** A Video-LLaVA folder (Hugging Face format) running in the page. */
export class VidLLMVideo {
  #rt;
  constructor(rt) { this.#rt = rt; }

  /** `base`: URL of the folder (config.json, tokenizer.json, model.safetensors, ...). */
  static async load({ base, device = "webgpu", onProgress }) {
    await init();
    if (device === "webgpu" && !globalThis.navigator?.gpu) throw new WebGPUNotAvailableError("this browser has no WebGPU");
    const folder = new URL(base.endsWith("/") ? base : base + "/", globalThis.location?.href);
    const u = (f) => new URL(f, folder).href;
    const [config, tokenizer, tokenizerConfig, preprocessor] = await Promise.all([
      fetchText(u("config.json")), fetchText(u("tokenizer.json")),
      fetchText(u("tokenizer_config.json"), true), fetchText(u("preprocessor_config.json"), true)]);
    const weights = await fetchBytes(u("model.safetensors"), onProgress);
    return new VidLLMVideo(await VideoRuntime.load(config, tokenizer, tokenizerConfig, preprocessor, weights, device === "webgpu"));
  }

  /** Frames from `video`, then a streamed answer; `frames` also gets {times, rgba, width, height}. */
  ask({ video, frames = 8, prompt, maxTokens = 256, signal, onFrames }) {
    const ch = channel();
    (async () => {
      const f = await sampleFrames(video, frames);
      onFrames?.(f);
      await this.#rt.ask(f.rgba, frames, f.height, f.width, prompt, maxTokens,
        (text, id) => ch.push({ text, id: id ?? null }), () => Boolean(signal?.aborted));
    })().then(() => ch.close(), (e) => ch.close(e instanceof Error ? e : new Error(String(e))));
    return ch;
  }

  dispose() { this.#rt?.free(); this.#rt = null; }
}
