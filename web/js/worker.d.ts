// Types for js/worker.js: the same calls as VidLLM, with the model in a Web Worker.
import type { AskOptions, GenerateOptions, LoadOptions, Piece, Sampling } from "./vidllm.js";

export class VidLLMWorker {
  /** `url`: this module's URL (default: import.meta.url of worker.js). */
  constructor(url?: string | URL);
  load(opts: LoadOptions): Promise<void>;
  readonly weightsDeviceBytes: number;
  readonly architecture: string;
  readonly defaultFrames: number;
  /** The model's own frame sampling: "hf" for the LLaVA family, "smolvlm" (1 frame a second, at most `frames`) for SmolVLM2. */
  readonly defaultSampling: { sampling: Sampling | null; fps: number; frames: number };
  readonly supportsVideo: boolean;
  readonly supportsImages: boolean;
  generate(opts: GenerateOptions): AsyncIterable<Piece>;
  /** A `<video>` is sampled in the page; its frames are transferred to the worker. */
  ask(opts: AskOptions): AsyncIterable<Piece>;
  dispose(): Promise<void>;
}
