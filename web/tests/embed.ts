// Type-checked usage of the package's declarations (npm run typecheck): what an embedder
// writes, so a wrong or missing type shows up here.
import { VidLLM, QuotaError, ContextFullError, times, type Piece, type LiveVideo } from "vidllm";
import { VidLLMWorker } from "vidllm/worker.js";

export async function answer(video: HTMLVideoElement, out: HTMLElement, signal: AbortSignal): Promise<void> {
  const rt = await VidLLM.load({ model: "/models/Video-LLaVA-7B-hf/", onProgress: (p) => p.warning instanceof QuotaError && console.warn(p.warning.message) });
  for await (const piece of rt.ask({ video, frames: 8, sampling: "hf", prompt: "What happens?", signal })) out.textContent += piece.text;
  const follow: AsyncIterable<Piece> = rt.ask({ prompt: "And then?", maxTokens: 64 });
  try {
    for await (const p of follow) out.textContent += p.text;
  } catch (e) {
    if (e instanceof ContextFullError) out.textContent += "(the conversation is full: ask with newConversation)";
    else throw e;
  }
  const moments: number[] = await times(video, 0, { sampling: "fps", fps: 1, maxFrames: 32, frameRate: 25 });
  out.dataset.moments = moments.join(",");
  const stream = await rt.chat.completions.create({
    messages: [{ role: "user", content: [{ type: "video", video }, { type: "text", text: "Describe it." }] }],
    stream: true,
  });
  for await (const chunk of stream) out.textContent += chunk.choices[0].delta.content ?? "";
  rt.dispose();
  const w = new VidLLMWorker();
  await w.load({ model: "/models/SmolLM2.gguf", device: "cpu" });
  for await (const p of w.generate({ prompt: "Hi" })) out.textContent += p.text;
  await w.dispose();
  // On the calling thread instead of a worker; what a budget did, read the same way on both.
  const here = await VidLLM.load({ model: "/models/Video-LLaVA-7B-hf/", device: "cpu", worker: false });
  for await (const p of here.ask({ video, prompt: "Why?", maxVisualTokens: 512, reduce: "slowfast" })) out.textContent += p.text;
  out.dataset.kept = String(here.lastReduction?.tokens_after ?? "");
  await here.dispose();
  // A webcam, watched: answers from a window of its newest frames.
  const webcam = await VidLLM.load({ model: "/models/SmolVLM2-500M-Video-Instruct/" });
  const cam = document.createElement("video");
  cam.srcObject = await navigator.mediaDevices.getUserMedia({ video: true });
  await cam.play();
  const live: LiveVideo = await webcam.watch(cam, { fps: 1, window: 8 });
  for await (const p of live.ask({ prompt: "What am I holding?", maxTokens: 32 })) out.textContent += p.text;
  out.dataset.frames = String(live.lastWindow?.frames.length ?? 0) + (live.state === "ended" ? " (ended)" : "");
  live.stop();
  await webcam.dispose();
}
