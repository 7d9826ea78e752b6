// Where a WebGPU decode step's time goes in the browser (issue 18, item 4): the package in
// the page (worker: false) on a GGUF decoder in headless Chromium, every WebGPU call the
// runtime makes counted and timed per step, the page's long tasks per step, and Chromium's
// CPU profile (self time by function) over the decode steps. A diagnostic, not a test.
//
//   VIDLLM_WASM_NAMES=1 bash web/build.sh   # the profile names wasm functions only then
//   node tests/scripts/profile_webgpu_step.mjs MODEL.gguf [--tokens 4] [--top 25] [--kv f32|f16|q8_0|q4_0]
//
// Step 0 is the prefill (up to the first piece); steps 1.. are decode steps. "api ms" is
// the time spent inside the WebGPU calls themselves (validation, IPC to the GPU process);
// "long task ms" is how long the page's main thread was held without a break.
import { createServer } from "node:http";
import { createReadStream, statSync } from "node:fs";
import { extname, join, normalize } from "node:path";
import { createRequire } from "node:module";

const root = new URL("../..", import.meta.url).pathname;
const { chromium } = createRequire(join(root, "web/package.json"))("playwright-core");
const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(`--${name}`); return i >= 0 ? args[i + 1] : dflt; };
const model = args[0];
if (!model || model.startsWith("--")) { console.error("usage: profile_webgpu_step.mjs MODEL.gguf [--tokens N] [--top N] [--kv TYPE]"); process.exit(2); }
const tokens = Number(opt("tokens", 4));
const top = Number(opt("top", 25));
const kv = opt("kv", undefined);

const page = `<!doctype html><meta charset="utf-8"><title>profile</title><script type="module">
// Every call of these WebGPU methods is counted and timed (the time inside the call).
const stats = new Map();
const wrap = (proto, names, label) => {
  for (const n of names) {
    const f = proto[n];
    if (typeof f !== "function") continue;
    const key = label + "." + n;
    proto[n] = function (...a) {
      const t0 = performance.now();
      try { return f.apply(this, a); } finally {
        const s = stats.get(key) ?? { n: 0, ms: 0 };
        s.n++; s.ms += performance.now() - t0; stats.set(key, s);
      }
    };
  }
};
wrap(GPUDevice.prototype, ["createBuffer", "createBindGroup", "createBindGroupLayout", "createPipelineLayout", "createComputePipeline",
  "createComputePipelineAsync", "createShaderModule", "createCommandEncoder", "createQuerySet"], "device");
wrap(GPUQueue.prototype, ["submit", "writeBuffer", "onSubmittedWorkDone"], "queue");
wrap(GPUCommandEncoder.prototype, ["beginComputePass", "copyBufferToBuffer", "clearBuffer", "finish"], "encoder");
wrap(GPUComputePassEncoder.prototype, ["setPipeline", "setBindGroup", "dispatchWorkgroups", "dispatchWorkgroupsIndirect", "end"], "pass");
wrap(GPUBuffer.prototype, ["mapAsync", "getMappedRange", "unmap", "destroy"], "buffer");
wrap(GPUComputePipeline.prototype, ["getBindGroupLayout"], "pipeline");
const long = [];
new PerformanceObserver((l) => { for (const e of l.getEntries()) long.push({ start: e.startTime, ms: e.duration }); }).observe({ type: "longtask" });
const { VidLLM } = await import("/web/js/vidllm.js");
window.run = async ({ prompt, tokens, kv }) => {
  const rt = await VidLLM.load({ model: "/model.gguf", device: "webgpu", worker: false, kv });
  await new Promise((r) => setTimeout(r, 200));
  const steps = [];
  stats.clear();
  let t = performance.now();
  const cut = () => {
    const now = performance.now();
    steps.push({ ms: now - t, t0: t, t1: now, calls: Object.fromEntries([...stats].map(([k, v]) => [k, { ...v }])) });
    stats.clear();
    t = now;
  };
  window.profileFrom = null;
  for await (const p of rt.generate({ prompt, raw: true, maxTokens: tokens })) {
    cut();
    if (steps.length === 1) await window.startProfile?.();
  }
  await new Promise((r) => setTimeout(r, 200));
  rt.dispose();
  return steps.map((s) => ({ ...s, longTasks: long.filter((x) => x.start >= s.t0 - 1 && x.start < s.t1).map((x) => x.ms) }));
};
window.ready = true;
</script>`;

const types = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm" };
const server = createServer((req, res) => {
  const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
  if (path === "/profile.html") { res.writeHead(200, { "content-type": "text/html" }).end(page); return; }
  if (path === "/favicon.ico") { res.writeHead(204).end(); return; }
  const file = path === "/model.gguf" ? model : normalize(join(root, path));
  let size;
  try { size = statSync(file).size; } catch { res.writeHead(404).end(); return; }
  res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream", "content-length": size });
  createReadStream(file).pipe(res);
}).listen(0, "127.0.0.1");
await new Promise((ok) => server.on("listening", ok));

const b = await chromium.launch({
  executablePath: "/usr/bin/chromium", headless: true,
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
});
let steps, profile;
try {
  const p = await b.newPage();
  p.on("pageerror", (e) => console.error(String(e)));
  p.on("console", (m) => { if (m.type() === "error") console.error(m.text()); });
  await p.goto(`http://127.0.0.1:${server.address().port}/profile.html`);
  await p.waitForFunction(() => window.ready === true);
  // The CPU profile covers the decode steps: it starts when the first piece arrives.
  const cdp = await p.context().newCDPSession(p);
  await cdp.send("Profiler.enable");
  await cdp.send("Profiler.setSamplingInterval", { interval: 1000 });
  await p.exposeFunction("startProfile", () => cdp.send("Profiler.start"));
  steps = await p.evaluate((a) => window.run(a), { prompt: "The river runs from the mountains to the sea, past farms and towns.", tokens, kv });
  ({ profile } = await cdp.send("Profiler.stop"));
} finally {
  await b.close();
  server.close();
}

console.log(`Chromium ${b.version()}, WebGPU on SwiftShader, ${model.split("/").at(-1)}, KV cache ${kv ?? "default"}, in the page (worker: false)`);
console.log("");
const keys = [...new Set(steps.flatMap((s) => Object.keys(s.calls)))].sort();
console.log(`| step | wall ms | long tasks ms | api ms | ${keys.join(" | ")} |`);
console.log(`|---|---|---|---|${keys.map(() => "---").join("|")}|`);
steps.forEach((s, i) => {
  const api = Object.values(s.calls).reduce((a, c) => a + c.ms, 0);
  console.log(`| ${i === 0 ? "prefill" : `decode ${i}`} | ${s.ms.toFixed(0)} | ${s.longTasks.map((x) => x.toFixed(0)).join(" + ") || "-"} | ${api.toFixed(0)} | ${keys.map((k) => s.calls[k] ? `${s.calls[k].n} (${s.calls[k].ms.toFixed(0)} ms)` : "-").join(" | ")} |`);
});

// Self time by function over the decode steps.
const self = new Map();
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const dt = profile.timeDeltas;
profile.samples.forEach((id, i) => {
  const n = byId.get(id);
  const f = n.callFrame;
  const name = `${f.functionName || "(anonymous)"} ${f.url ? f.url.split("/").at(-1) : ""}`.trim();
  self.set(name, (self.get(name) ?? 0) + (dt[i] ?? 0) / 1000);
});
const total = [...self.values()].reduce((a, b) => a + b, 0);
console.log("");
console.log(`CPU profile of the decode steps: ${total.toFixed(0)} ms sampled; self time by function (top ${top}):`);
console.log("");
console.log("| ms | share | function |");
console.log("|---|---|---|");
for (const [name, ms] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) {
  console.log(`| ${ms.toFixed(0)} | ${((100 * ms) / total).toFixed(1)}% | ${name.replaceAll("|", "\\|")} |`);
}

// The same, grouped: static constructors (`__ctor`, `__wasm_call_ctors`, `inventory`) apart,
// else by crate (the path's first segment).
const groups = new Map();
for (const [name, ms] of self) {
  const g = /__ctor|__wasm_call_ctors|inventory::/.test(name) ? "static constructors (__wasm_call_ctors, __ctor, inventory)"
    : name.includes(".wasm") ? `wasm: ${name.replace(/^<+/, "").split("::")[0]}` : name.startsWith("(") ? name : "JS / browser";
  groups.set(g, (groups.get(g) ?? 0) + ms);
}
console.log("");
console.log("| ms | share | group |");
console.log("|---|---|---|");
for (const [g, ms] of [...groups].sort((a, b) => b[1] - a[1]).slice(0, 15)) console.log(`| ${ms.toFixed(0)} | ${((100 * ms) / total).toFixed(1)}% | ${g} |`);
