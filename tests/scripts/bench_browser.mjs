// vidllm's npm package next to wllama (llama.cpp compiled to WebAssembly) in one headless
// Chromium, on the same GGUF file and raw prompt, greedy: prompt tok/s, decode tok/s, the
// main thread's long tasks (> 50 ms) while generating, and vidllm's streaming delay (the
// median, over a run's pieces, of the time from the runtime producing a piece to the
// page's loop receiving it). A benchmark, not a test.
//
//   node tests/scripts/bench_browser.mjs MODEL.gguf WLLAMA_PACKAGE_DIR [--tokens 64] [--reps 3] [--configs a,b]
//
// Configurations: vidllm-cpu-page, vidllm-cpu-worker-1t, vidllm-cpu-worker-2t, vidllm-webgpu-page, vidllm-webgpu-worker,
// wllama-1t, wllama-2t. Every page is served cross-origin isolated (COOP / COEP), which
// wllama's threads and vidllm's (the threaded CPU package, in a worker) need.
// vidllm's rates come from the stream: prompt = tokens / time to the first piece, decode =
// pieces after the first / the time they took. wllama's are llama.cpp's own timings.
import { createServer } from "node:http";
import { createReadStream, statSync } from "node:fs";
import { extname, join, normalize } from "node:path";
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";

const root = new URL("../..", import.meta.url).pathname;
const { chromium } = createRequire(join(root, "web/package.json"))("playwright-core");

const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : dflt; };
const [model, wllamaDir] = args;
if (!model || !wllamaDir) { console.error("usage: bench_browser.mjs MODEL.gguf WLLAMA_PACKAGE_DIR [--tokens N] [--reps R] [--configs ...]"); process.exit(2); }
const tokens = Number(opt("tokens", 64));
const reps = Number(opt("reps", 3));
const configs = opt("configs", "vidllm-cpu-page,vidllm-cpu-worker-1t,vidllm-cpu-worker-2t,wllama-1t,wllama-2t").split(",");
const known = ["vidllm-cpu-page", "vidllm-cpu-worker-1t", "vidllm-cpu-worker-2t", "vidllm-webgpu-page", "vidllm-webgpu-worker", "wllama-1t", "wllama-2t"];
const unknown = configs.filter((c) => !known.includes(c));
if (unknown.length) { console.error(`unknown configuration ${unknown.join(", ")}: pick from ${known.join(", ")}`); process.exit(2); }

// About 128 tokens of plain English; generation goes on from it without an end-of-text.
const prompt = ("The river runs from the mountains to the sea, past farms, towns and old stone bridges. "
  + "In spring the water rises with melted snow, and in autumn the leaves drift down with the current. ").repeat(4)
  + "A traveller who follows the river on foot will see";

const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm" };
const page = `<!doctype html><meta charset="utf-8"><title>bench</title><script type="module">
import { VidLLM } from "/web/js/vidllm.js";
import { VidLLMWorker } from "/web/js/worker.js";
import { Wllama } from "/wllama/esm/index.js";
let longTasks = [];
new PerformanceObserver((l) => { for (const e of l.getEntries()) longTasks.push(e.duration); }).observe({ type: "longtask", buffered: false });
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.floor(s.length / 2)] : undefined; };
// Each piece's delay: from the runtime producing it (its producedAt, on the model's
// thread) to this loop receiving it.
async function timed(pieces) {
  const t0 = performance.now(); const at = []; const delays = []; let text = "";
  for await (const p of pieces) {
    const now = performance.now();
    at.push(now - t0); text += p.text;
    if (p.producedAt !== undefined) delays.push(performance.timeOrigin + now - p.producedAt);
  }
  return { at, delays, text };
}
window.bench = async ({ config, prompt, tokens, reps }) => {
  const runs = [];
  if (config.startsWith("vidllm")) {
    const device = config.includes("webgpu") ? "webgpu" : "cpu";
    const threads = Number(config.match(/-(\\d+)t$/)?.[1] ?? 1);
    const rt = config.includes("worker") ? new VidLLMWorker(new URL("/web/js/worker.js", location.href)) : null;
    const m = rt ? (await rt.load({ model: "/model.gguf", device, threads }), rt) : await VidLLM.load({ model: "/model.gguf", device, worker: false, threads });
    for (let r = 0; r <= reps; r++) {
      longTasks = [];
      const { at, delays, text } = await timed(m.generate({ prompt, raw: true, maxTokens: tokens, newConversation: true }));
      await new Promise((ok) => setTimeout(ok, 100));
      if (r > 0) runs.push({ ttft: at[0], decode: (at.length - 1) / ((at.at(-1) - at[0]) / 1000), n: at.length, longTasks: longTasks.length, longestTask: Math.max(0, ...longTasks), threads: device === "cpu" ? m.threads : undefined, delay: median(delays), text });
    }
    rt ? await rt.dispose() : m.dispose();
  } else {
    const threads = Number(config.match(/(\\d+)t$/)[1]);
    const w = new Wllama({ default: "/wllama/esm/wasm/wllama.wasm" });
    await w.loadModelFromUrl(new URL("/model.gguf", location.href).href, { n_threads: threads, n_ctx: 1024, n_batch: 512, useCache: false });
    for (let r = 0; r <= reps; r++) {
      longTasks = [];
      const res = await w.createCompletion({ prompt, max_tokens: tokens, temperature: 0, ignore_eos: true, cache_prompt: false });
      await new Promise((ok) => setTimeout(ok, 100));
      const t = res.timings;
      if (r > 0) runs.push({ pp: t.prompt_per_second, promptN: t.prompt_n, decode: t.predicted_per_second, n: t.predicted_n, longTasks: longTasks.length, longestTask: Math.max(0, ...longTasks), threads: w.getNumThreads(), text: res.choices[0].text });
    }
    await w.exit();
  }
  return runs;
};
window.ready = true;
</script>`;

const server = createServer((req, res) => {
  const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
  const headers = { "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp", "cross-origin-resource-policy": "same-origin" };
  if (path === "/bench.html") { res.writeHead(200, { ...headers, "content-type": "text/html" }).end(page); return; }
  if (path === "/favicon.ico") { res.writeHead(204).end(); return; }
  const file = path === "/model.gguf" ? model
    : path.startsWith("/wllama/") ? normalize(join(wllamaDir, path.slice(8)))
    : normalize(join(root, path));
  let size;
  try { size = statSync(file).size; } catch { res.writeHead(404).end(); return; }
  res.writeHead(200, { ...headers, "content-type": types[extname(file)] ?? "application/octet-stream", "content-length": size });
  createReadStream(file).pipe(res);
}).listen(0, "127.0.0.1");
await new Promise((ok) => server.on("listening", ok));

// Rates below 1 tok/s (WebGPU on SwiftShader) keep three decimals.
const rate = (x) => x.toFixed(x < 1 ? 3 : 1);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };
const b = await chromium.launch({
  executablePath: "/usr/bin/chromium", headless: true,
  // VIDLLM_CHROMIUM_FLAGS: more switches, for a diagnosis (e.g.
  // --enable-dawn-features=disable_robustness, which a page cannot set).
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--disable-background-networking", "--disable-component-update", "--no-first-run",
    ...(process.env.VIDLLM_CHROMIUM_FLAGS ?? "").split(" ").filter(Boolean)],
});
const version = b.version();
const rows = {};
let promptTokens = null;
try {
  for (const config of configs) {
    const p = await b.newPage();
    p.on("pageerror", (e) => console.error(`${config}: ${e}`));
    p.on("console", (m) => { if (m.type() === "error") console.error(`${config}: ${m.text()}`); });
    await p.goto(`http://127.0.0.1:${server.address().port}/bench.html`);
    await p.waitForFunction(() => window.ready === true);
    const runs = await p.evaluate((a) => window.bench(a), { config, prompt, tokens, reps });
    await p.close();
    if (runs[0].promptN) promptTokens = runs[0].promptN;
    rows[config] = runs;
    console.error(`${config}: ${JSON.stringify(runs.map(({ text, ...r }) => r))}`);
  }
} finally {
  await b.close();
  server.close();
}

// vidllm's prompt rate needs the prompt's token count: llama.cpp's, from wllama's timings,
// on the same file and text (vidllm adds the same BOS); without a wllama run, vidllm-native's
// `tokenize` ($VIDLLM_NATIVE_BIN) on the same file and text, which tokenizes as the page does.
if (promptTokens === null && process.env.VIDLLM_NATIVE_BIN) {
  try {
    const out = execFileSync(process.env.VIDLLM_NATIVE_BIN, ["tokenize", "--model", model, "--text", prompt, "--json"], { encoding: "utf8" });
    promptTokens = JSON.parse(out).tokens.length;
  } catch (e) {
    console.error(`counting the prompt's tokens with vidllm-native failed: ${e.message}`);
  }
}
console.log(`Chromium ${version} (headless), ${model.split("/").at(-1)}, raw prompt of ${promptTokens ?? "?"} tokens, ${tokens} greedy tokens, median of ${reps} after a warm-up`);
console.log("");
console.log("| configuration | prompt tok/s | decode tok/s | long tasks while generating (longest ms) | stream delay, median ms |");
console.log("|---|---|---|---|---|");
const rates = {};
for (const [config, runs] of Object.entries(rows)) {
  const pp = runs[0].pp !== undefined ? median(runs.map((r) => r.pp)) : promptTokens ? median(runs.map((r) => promptTokens / (r.ttft / 1000))) : NaN;
  const tg = median(runs.map((r) => r.decode));
  rates[config] = { pp, tg };
  console.log(`| ${config}${runs[0].threads ? ` (${runs[0].threads} thread${runs[0].threads > 1 ? "s" : ""})` : ""} | ${rate(pp)} | ${rate(tg)} | ${median(runs.map((r) => r.longTasks))} (${median(runs.map((r) => r.longestTask)).toFixed(0)}) | ${runs[0].delay !== undefined ? median(runs.map((r) => r.delay)).toFixed(1) : "-"} |`);
}
console.log("");
for (const [v, w] of [["vidllm-cpu-page", "wllama-1t"], ["vidllm-cpu-worker-1t", "wllama-1t"], ["vidllm-cpu-worker-2t", "wllama-2t"], ["vidllm-cpu-worker-1t", "wllama-2t"]]) {
  if (rates[v] && rates[w]) console.log(`${v} / ${w}: prompt ${(rates[v].pp / rates[w].pp).toFixed(2)}x, decode ${(rates[v].tg / rates[w].tg).toFixed(2)}x`);
}
