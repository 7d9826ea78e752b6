// Types for js/worker.js: the same calls as VidLLM, with the model in a Web Worker.
import type { AskOptions, GenerateOptions, LoadOptions, Piece } from "./vidllm.js";

export class VidLLMWorker {
  /** `url`: this module's URL (default: import.meta.url of worker.js). */
  constructor(url?: string | URL);
  load(opts: LoadOptions): Promise<void>;
  readonly weightsDeviceBytes: number;
  readonly architecture: string;
  readonly defaultFrames: number;
  generate(opts: GenerateOptions): AsyncIterable<Piece>;
  /** A `<video>` is sampled in the page; its frames are transferred to the worker. */
  ask(opts: AskOptions): AsyncIterable<Piece>;
  dispose(): Promise<void>;
}
