// The `openai` npm package against `vidllm-native serve` (run by openai_clients.py):
// one question whole and streamed, with a `video_url` part when the case names a video.
// The answer must equal the case's `want`. Prints the exchange; exits 1 on a mismatch.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";

const require = createRequire(path.join(process.env.OPENAI_NPM_DIR, "x.js"));
const { default: OpenAI } = await import(require.resolve("openai"));
const { version } = JSON.parse(readFileSync(path.join(process.env.OPENAI_NPM_DIR, "openai", "package.json"), "utf8"));

const c = JSON.parse(process.env.VIDLLM_CASE);
const client = new OpenAI({ baseURL: process.env.VIDLLM_BASE, apiKey: process.env.VIDLLM_KEY });
const content = c.video
  ? [
      { type: "video_url", video_url: { url: `data:video/mp4;base64,${readFileSync(c.video).toString("base64")}` } },
      { type: "text", text: c.prompt },
    ]
  : c.prompt;
const messages = [{ role: "user", content }];
const maxTokens = c.video ? 6 : 24;
let failed = false;
const check = (what, got) => {
  console.log(`  ${what}: ${JSON.stringify(got)}`);
  if (got !== c.want) {
    console.log(`FAIL ${what}: want ${JSON.stringify(c.want)}`);
    failed = true;
  }
};

console.log(`node openai ${version} -> ${process.env.VIDLLM_BASE}, model ${c.model}`);
console.log(`  user: ${c.video ? "[video] " : ""}${c.prompt}`);
const whole = await client.chat.completions.create({ model: c.model, messages, max_tokens: maxTokens, temperature: 0 });
check("assistant (whole)", whole.choices[0].message.content);
const stream = await client.chat.completions.create({ model: c.model, messages, max_tokens: maxTokens, temperature: 0, stream: true });
let text = "";
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
}
check(`assistant (streamed, ${chunks} chunks)`, text);
process.exit(failed ? 1 : 0);
