// Types for js/worker.js: the same members as VidLLM, with the model in a Web Worker.
import type { VidLLM, LoadOptions } from "./vidllm.js";

/** What `VidLLM.load` returns by default: the model in a worker, the same members as `VidLLM`. */
export class VidLLMWorker implements Omit<VidLLM, "dispose"> {
  /** `url`: this module's URL (default: import.meta.url of worker.js). */
  constructor(url?: string | URL);
  load(opts: LoadOptions): Promise<void>;
  readonly weightsDeviceBytes: VidLLM["weightsDeviceBytes"];
  readonly threads: number;
  readonly architecture: VidLLM["architecture"];
  readonly defaultFrames: number;
  readonly defaultSampling: VidLLM["defaultSampling"];
  readonly headBands: number;
  readonly supportsVideo: boolean;
  readonly supportsImages: boolean;
  readonly lastReduction: VidLLM["lastReduction"];
  generate: VidLLM["generate"];
  /** A `<video>` is sampled in the page; its frames are transferred to the worker. */
  ask: VidLLM["ask"];
  framesRGB: VidLLM["framesRGB"];
  /** The page follows the `<video>`; each frame taken is transferred to the worker and encoded there. */
  watch: VidLLM["watch"];
  chat: VidLLM["chat"];
  /** Frees the model and ends the worker. */
  dispose(): Promise<void>;
}
