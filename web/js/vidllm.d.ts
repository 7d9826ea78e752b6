// Types for the vidllm browser package (js/vidllm.js).

export interface Progress {
  file: string;
  loaded: number;
  total: number;
  cached?: boolean;
  /** Set when the file could not be cached (storage quota); the load still succeeds. */
  warning?: QuotaError;
}

export interface LoadOptions {
  /**
   * A Hugging Face-style folder URL (Video-LLaVA, PLLaVA, LLaVA-NeXT-Video, SmolVLM2), a
   * GGUF URL (text decoder), GGUF bytes or `File`, or the picked files of a folder.
   */
  model: string | Uint8Array | File | File[] | FileList;
  /** With a GGUF `model`: llama.cpp's vision file for it (`mmproj-*.gguf`; SmolVLM2). */
  mmproj?: string | Uint8Array | File;
  onProgress?: (p: Progress) => void;
  /** Default "webgpu". */
  device?: "webgpu" | "cpu";
  /** KV-cache length in tokens (default 4096, at most the model's positions). */
  context?: number;
  /** Keep every storage binding under this many bytes (default: the device's limit). */
  maxBindingBytes?: number;
  /** PLLaVA: LoRA alpha used when merging the adapters (default 4). */
  loraAlpha?: number;
  /**
   * A folder's vision towers: "f32" (default, transformers' arithmetic) or "q8_0" (their
   * attention and MLP matrices quantised on load to Q8_0 blocks, as `vidllm-native
   * --vision-quant q8_0`). A GGUF pair keeps its mmproj's types.
   */
  visionQuant?: "f32" | "q8_0";
  /**
   * Run the model in a Web Worker (default: true in a page), so the page's main thread
   * stays free; `VidLLM.load` then resolves to a `VidLLMWorker`, which has the same members.
   * `false` runs it on the calling thread, which it blocks for the load, each video's
   * encode, the prefill and each decode step.
   */
  worker?: boolean;
  /** What the KV cache keeps keys and values in (`vidllm-native --kv`): auto (default: f16 where the decoder's heads are whole 32-value blocks, else f32), f32, f16, q8_0 or q4_0. */
  kv?: "auto" | "f32" | "f16" | "q8_0" | "q4_0";
  /**
   * Threads of the CPU backend (`device: "cpu"`; default: the logical cores, at most 8).
   * More than one runs the threaded package (`pkg-threads/`: wasm threads on
   * `SharedArrayBuffer`), which needs a worker and a cross-origin isolated page; elsewhere
   * the model runs on one thread (`pkg-cpu/`), with a console note saying why. A CPU model
   * never downloads the WebGPU package (`pkg/`).
   */
  threads?: number;
}

export interface Piece {
  text: string;
  /** The token id, or null for trailing text flushed at the end. */
  id: number | null;
  /**
   * When the runtime produced it, in ms since the epoch (`performance.timeOrigin +
   * performance.now()` on the thread that runs the model): the same clock on every thread,
   * so the consumer's time minus this is how long the piece took to reach it.
   */
  producedAt: number;
}

export type FrameSource = ImageBitmap | VideoFrame;
export type ImageSource = HTMLImageElement | ImageBitmap | VideoFrame | HTMLCanvasElement | OffscreenCanvas | ImageData;
export type Sampling = "hf" | "linspace" | "pllava" | "fps" | "smolvlm";

export interface SampledFrames {
  sources: ImageBitmap[];
  /** When each frame starts, in seconds from the video's first frame. */
  times: number[];
  /** The video's length in seconds. */
  duration: number;
  width: number;
  height: number;
  /**
   * How the frames were taken: "webcodecs" (the file demuxed and its frames decoded by the
   * page, frame-exact as `vidllm-native`), or "video-element" (the element seeked: a live
   * source, a file the page cannot fetch, demux or decode, or `decoder: "video-element"`).
   */
  decoder?: Decoder;
  /** Why the element was seeked instead of the file being demuxed. */
  decoderNote?: string;
  /** With "webcodecs": each frame's index among the frames the file shows, and their count. */
  indices?: number[];
  frames?: number;
}

/**
 * How a `<video>`'s frames are taken: "auto" (the default) demuxes a file the page can
 * fetch and seeks the element otherwise; "webcodecs" demuxes or fails with a `VideoError`
 * saying why; "video-element" always seeks the element.
 */
export type Decoder = "auto" | "webcodecs" | "video-element";

export interface GenerateOptions {
  prompt: string;
  raw?: boolean;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
  signal?: AbortSignal;
  /** Forget the conversation before this prompt (else it continues, from the KV cache). */
  newConversation?: boolean;
  /** Hears each stage begin ("prefill"; the first piece then starts the answer). */
  onStage?: (stage: Stage) => void;
}

/** What the runtime is doing before the first piece of an answer. */
export type Stage = "sampling" | "encoding" | "prefill";

export interface AskOptions {
  /** The video to ask about; omit to continue the conversation about the last one. */
  video?: HTMLVideoElement;
  image?: ImageSource | ImageSource[];
  /** How many frames to sample (default: the model's), or frames already taken. */
  frames?: number | FrameSource[];
  /** With frames already taken: when each was taken (seconds), and the video's length. */
  frameTimes?: number[];
  duration?: number;
  sampling?: Sampling;
  fps?: number;
  maxFrames?: number;
  /** The frame grid the policy picks on when the element is seeked (it does not tell its rate); default 30. */
  frameRate?: number;
  /** "video-element" seeks the element even where the page could demux the file (see `SampledFrames.decoder`). */
  decoder?: Decoder;
  prompt: string;
  maxTokens?: number;
  temperature?: number;
  seed?: number;
  signal?: AbortSignal;
  /** Sees the sampled frames; they are closed once encoded, so draw them during the call. */
  onFrames?: (f: SampledFrames) => void;
  /** Start a new conversation about the same (already encoded) video. */
  newConversation?: boolean;
  /** Hears each stage begin: "sampling" the video, "encoding" the frames or images, "prefill". */
  onStage?: (stage: Stage) => void;
  /** A visual-token budget for the video (see `reduce`). */
  maxVisualTokens?: number;
  /** How a video over `maxVisualTokens` is reduced; "none" (the default) refuses it. */
  reduce?: Reduction;
  /** With frames already taken: how many were asked for (a "maxinfo" budget keeps at most these). */
  askedFrames?: number;
}

/** `framefusion` reduces inside the decoder, reading the device back between its layers (awaited on WebGPU). */
export type Reduction = "none" | "slowfast" | "maxinfo" | "fastvid" | "framefusion";

/** What a visual-token budget did to a video. */
export interface ReductionReport {
  method: Reduction;
  max_visual_tokens: number;
  tokens_before: number;
  tokens_after: number;
  frames_before: number;
  frames_after: number;
  reduce_ms: number;
  note: string | null;
}

export type ContentPart =
  | { type: "text"; text: string }
  | { type: "video"; video: HTMLVideoElement }
  | { type: "image"; image: ImageSource };

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string | ContentPart[];
}

export interface ChatRequest {
  messages: ChatMessage[];
  stream?: boolean;
  max_tokens?: number;
  temperature?: number;
  seed?: number;
  signal?: AbortSignal;
  /** Frames to sample from a video part. */
  frames?: number;
}

export interface ChatCompletion {
  id: string;
  object: "chat.completion";
  choices: { index: number; message: { role: "assistant"; content: string }; finish_reason: "stop" }[];
}

export interface ChatCompletionChunk {
  id: string;
  object: "chat.completion.chunk";
  choices: { index: number; delta: { content?: string }; finish_reason: "stop" | null }[];
}

export interface WatchOptions {
  /** Frames taken a second of media time (default 1). */
  fps?: number;
  /** Frames the window holds, the newest (default: the model's frames). */
  window?: number;
  maxVisualTokens?: number;
  reduce?: Reduction;
  /** Seconds without a frame after which the stream counts as stalled (default 5). */
  stallAfter?: number;
}

/** Which frames a live answer saw. */
export interface LiveWindowReport {
  frames: { index: number; time: number }[];
  /** Frames run through the vision encoder so far (on arrival, and at question time for MERV). */
  frame_encodes: number;
  /** Frames encoded for this question (0 where each frame was encoded on arrival). */
  encoded_at_question: number;
  frames_taken: number;
  /** Frames that left the window before they were encoded (queued behind an answer). */
  frames_skipped: number;
  visual_tokens: number;
  reduction: ReductionReport | null;
  /** How the stream stood when the question was asked. */
  stream: "waiting" | "live" | "stalled" | "ended";
  /** The index of the newest frame taken before the question (the window's last). */
  newest_taken: number | null;
}

/** Take frames of a playing `<video>` as the browser shows them, `fps` a second of media time; returns a function that stops. */
export function sampleLive(video: HTMLVideoElement, opts: {
  fps: number;
  onFrame(frame: { bitmap: ImageBitmap; index: number; time: number }): void;
  onError?(e: Error): void;
}): () => void;

/** A live video being watched (`VidLLM.watch`). */
export class LiveVideo {
  /** How the stream stands now. */
  readonly state: "waiting" | "live" | "stalled" | "ended";
  /** Answer from the window as it stands. */
  ask(opts: { prompt: string; maxTokens?: number; temperature?: number; seed?: number; signal?: AbortSignal; onStage?: (stage: string) => void }): AsyncIterable<Piece>;
  /** The last answer's window, or null. */
  readonly lastWindow: LiveWindowReport | null;
  /** RGB bytes of the last answer's frames as the device received them. */
  framesRGB(): Promise<Uint8Array>;
  /** Stop taking frames; the window is freed. */
  stop(): void;
}

export class VidLLM {
  /** By default the model runs in a Web Worker and the object is a `VidLLMWorker` (see `LoadOptions.worker`). */
  static load(opts: LoadOptions): Promise<VidLLM>;
  /** "text" for a GGUF decoder, else the folder's model_type. */
  readonly architecture: "text" | "video_llava" | "pllava" | "llava_next_video" | "smolvlm" | "idefics3" | "merv";
  readonly weightsDeviceBytes: number;
  /** Threads the CPU backend computes on (1 on WebGPU, or where threads cannot run). */
  readonly threads: number;
  readonly defaultFrames: number;
  /** The model's own frame sampling: "hf" for the LLaVA family, "smolvlm" (1 frame a second, at most `frames`) for SmolVLM2. */
  readonly defaultSampling: { sampling: Sampling | null; fps: number; frames: number };
  readonly headBands: number;
  /** Whether the model takes a video (Idefics3 takes still images only). */
  readonly supportsVideo: boolean;
  /** Whether the model takes still images (Video-LLaVA, SmolVLM2, Idefics3). */
  readonly supportsImages: boolean;
  generate(opts: GenerateOptions): AsyncIterable<Piece>;
  ask(opts: AskOptions): AsyncIterable<Piece>;
  /** What the visual-token budget did to the last video, or null. */
  readonly lastReduction: ReductionReport | null;
  /** RGB bytes of the frames the device received for the last video. */
  framesRGB(): Promise<Uint8Array>;
  /** Watch a playing `<video>` (a `MediaStream` such as a webcam, or a file): a rolling window of its newest frames. */
  watch(video: HTMLVideoElement, opts?: WatchOptions): Promise<LiveVideo>;
  chat: {
    completions: {
      create(req: ChatRequest & { stream: true }): Promise<AsyncIterable<ChatCompletionChunk>>;
      create(req: ChatRequest & { stream?: false }): Promise<ChatCompletion>;
    };
  };
  /** Frees the model (and, for a `VidLLMWorker`, ends its worker). */
  dispose(): void | Promise<void>;
}

/** The weight types the WebGPU kernels read in place (llama.cpp's names). */
export function kernelTypes(): Promise<string[]>;
/** One kernel check: WebGPU against an f64 product on the same random weights. */
export interface KernelCheck { type: string; m: number; n: number; k: number; maxDiff: number; maxAbs: number; ok: boolean }
/** Check this browser's WebGPU kernels against an f64 product, a decode-sized and a prefill-sized product per type. */
export function checkKernels(opts?: { types?: string[] }): Promise<KernelCheck[]>;
/** Sampling times in seconds for a video of known duration (the native policies, on a `frameRate` grid, default 30). */
export function times(video: HTMLVideoElement, n: number, opts?: { sampling?: Sampling; fps?: number; maxFrames?: number; frameRate?: number }): Promise<number[]>;
/** Take frames as ImageBitmaps, at given times (seeking) or by a policy (frame-exact from the file where the page can demux it). */
export function sampleFrames(video: HTMLVideoElement, at: number[] | { n: number; sampling?: Sampling; fps?: number; maxFrames?: number; frameRate?: number;
  decoder?: Decoder;
  /** Where the policy's times come from when seeking (default: the page's wasm, as `times`). */
  schedule?: (duration: number, n: number, policy: { sampling?: Sampling; fps?: number; maxFrames?: number; frameRate?: number }) => Promise<number[]>;
  /** Where the policy's indices on a demuxed file's timeline come from (default: the page's wasm, as `samplingIndices`). */
  pick?: (frameTimes: number[], rate: number, policy: { sampling?: Sampling; n: number; fps?: number; maxFrames?: number }) => Promise<number[]> }): Promise<SampledFrames>;
/** The frame indices a policy picks on a video's display timeline (seconds from the first frame; `rate` the average frame rate): `vidllm-native`'s rule. */
export function samplingIndices(frameTimes: number[], rate: number, opts?: { sampling?: Sampling; n?: number; fps?: number; maxFrames?: number }): Promise<number[]>;
/** Candidate frames per frame asked for: 2 for a MaxInfo budget, else 1. */
export function candidateFactor(maxVisualTokens: number | undefined, reduce: Reduction | undefined): number;
/** What makes a question's frames the last question's (null for frames already taken). */
export interface VideoKey { video: HTMLVideoElement; src: string | null; n: number; sampling: Sampling; fps: number; maxFrames: number; frameRate: number; decoder?: Decoder;
  maxVisualTokens?: number; reduce?: Reduction }
export function videoKey(video: HTMLVideoElement | null | undefined, opts: Omit<VideoKey, "video" | "src">): VideoKey | null;
/** Whether two video keys name the same frames (a null key never does). */
export function sameVideo(key: VideoKey | null, seen: VideoKey | null): boolean;
/** The sampling a question uses: what it names, else the model's own (`frames` caps a rate-based policy). */
export function samplingOf(
  info: { defaultSampling: Sampling | null; defaultFps: number; defaultFrames: number },
  opts: { frames?: number | unknown[]; sampling?: Sampling; fps?: number; maxFrames?: number },
): { sampling: Sampling; fps: number; maxFrames: number };

export class WebGPUNotAvailableError extends Error {}
export class ModelFetchError extends Error {}
/** The files are not a model this runtime runs (unsupported architecture or type, an mmproj as the model, truncated). */
export class ModelLoadError extends Error {}
export class QuotaError extends Error {}
export class VideoError extends Error {}
export class IntegrityError extends Error {}
export class DisposedError extends Error {}
export class RuntimeFailedError extends Error {}
/** The prompt does not fit the context; nothing changed. */
export class ContextFullError extends Error {}
/** No video yet, images on a model without them, an answer still streaming. */
export class InvalidRequestError extends Error {}
export class TemplateError extends Error {}
export class TokenizerError extends Error {}
export class VisualTokensError extends Error {}
