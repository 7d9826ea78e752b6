// OpenAI-shaped chat completions over a model object (`VidLLM` in the page, or
// `VidLLMWorker`): one definition, whichever thread runs the model.

/**
 * A completion over the last user message, whose content may hold `{type: "text"}`,
 * `{type: "video", video}` and `{type: "image", image}` parts. Each call is a fresh
 * conversation; a video seen last time is not encoded again.
 */
export async function chatCompletion(model, { messages, stream = false, max_tokens = 256, temperature = 0, seed = 0, signal, frames }) {
  const user = [...messages].reverse().find((m) => m.role === "user");
  const parts = typeof user?.content === "string" ? [{ type: "text", text: user.content }] : (user?.content ?? []);
  const prompt = parts.filter((p) => p.type === "text").map((p) => p.text).join("\n");
  const video = parts.find((p) => p.type === "video")?.video;
  const images = parts.filter((p) => p.type === "image").map((p) => p.image);
  let pieces;
  if (model.architecture !== "text") {
    pieces = model.ask({ video, image: images.length ? images : undefined, frames, prompt, maxTokens: max_tokens, temperature, seed, signal, newConversation: true });
  } else {
    if (video || images.length) throw new Error("this is a text model (GGUF); video and image parts need a video-language folder");
    pieces = model.generate({ prompt, maxTokens: max_tokens, temperature, seed, signal, newConversation: true });
  }
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
