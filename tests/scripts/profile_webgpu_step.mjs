// Where a WebGPU decode step's time goes in the browser (issue 18, item 4): the package in
// the page (worker: false) on a GGUF decoder in headless Chromium, every WebGPU call the
// runtime makes counted and timed per step, the page's long tasks per step, and Chromium's
// CPU profile (self time by function) over the decode steps. A diagnostic, not a test.
//
//   VIDLLM_WASM_NAMES=1 bash web/build.sh   # the profile names wasm functions only then
//   node tests/scripts/profile_webgpu_step.mjs MODEL.gguf [--tokens 4] [--top 25] [--kv f32|f16|q8_0|q4_0]
//       [--repeat N (the prompt sentence N times)] [--gpu-times]
//
// With --gpu-times, each dispatch runs in a compute pass of its own with timestamps at its
// start and end (WebGPU's timestamp-query, which SwiftShader has), and the GPU's time is
// summed by kernel; the call counts and the CPU profile are then not the runtime's own.
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
const gpuTimes = args.includes("--gpu-times");
// The prompt: one sentence, or that many copies of it (a longer prefill).
const repeat = Number(opt("repeat", 1));

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
// Each pipeline's kernel, from its entry point (CubeCL names it after the kernel, with a hash).
const kernelOf = new WeakMap();
const kernels = new Map();
const makePipeline = GPUDevice.prototype.createComputePipeline;
GPUDevice.prototype.createComputePipeline = function (desc) {
  const p = makePipeline.call(this, desc);
  kernelOf.set(p, (desc.compute?.entryPoint ?? "main").replace(/_[0-9a-f]{8}$/, ""));
  return p;
};
const setPipeline = GPUComputePassEncoder.prototype.setPipeline;
GPUComputePassEncoder.prototype.setPipeline = function (p) {
  const k = kernelOf.get(p) ?? "?";
  kernels.set(k, (kernels.get(k) ?? 0) + 1);
  return setPipeline.call(this, p);
};
// --gpu-times: the runtime's passes are stand-ins that record state; each dispatch is
// replayed in a real pass of its own whose timestamps are resolved when the encoder finishes
// and read back after its submit, then added to the kernel's time in the current step.
const gpuMs = new Map();
let stepNow = 0;
if (${gpuTimes}) {
  const deviceOf = new WeakMap();
  const makeEncoder = GPUDevice.prototype.createCommandEncoder;
  GPUDevice.prototype.createCommandEncoder = function (d) {
    const e = makeEncoder.call(this, d);
    deviceOf.set(e, this);
    return e;
  };
  const timedOf = new WeakMap();
  const realBegin = GPUCommandEncoder.prototype.beginComputePass;
  const QUERIES = 4096;
  const timed = (enc, pipeline, groups, run, grid) => {
    let t = timedOf.get(enc);
    if (!t) {
      const device = deviceOf.get(enc);
      t = { device, names: [], qs: device.createQuerySet({ type: "timestamp", count: QUERIES }) };
      timedOf.set(enc, t);
    }
    const i = t.names.length;
    if (2 * i + 2 > QUERIES) throw new Error("--gpu-times: more dispatches in one encoder than a query set holds");
    const pass = realBegin.call(enc, { timestampWrites: { querySet: t.qs, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 } });
    pass.setPipeline(pipeline);
    groups.forEach((g, j) => g && pass.setBindGroup(j, ...g));
    run(pass);
    pass.end();
    t.names.push((kernelOf.get(pipeline) ?? "?") + " " + grid);
  };
  GPUCommandEncoder.prototype.beginComputePass = function () {
    const enc = this;
    let pipeline = null;
    const groups = [];
    return {
      label: "",
      setPipeline(p) { pipeline = p; },
      setBindGroup(i, ...g) { groups[i] = g; },
      dispatchWorkgroups(x, y = 1, z = 1) { timed(enc, pipeline, groups, (p) => p.dispatchWorkgroups(x, y, z), x + "x" + y + "x" + z); },
      dispatchWorkgroupsIndirect(b, o) { timed(enc, pipeline, groups, (p) => p.dispatchWorkgroupsIndirect(b, o), "indirect"); },
      end() {}, pushDebugGroup() {}, popDebugGroup() {}, insertDebugMarker() {},
    };
  };
  const cbOf = new WeakMap();
  const realFinish = GPUCommandEncoder.prototype.finish;
  GPUCommandEncoder.prototype.finish = function (d) {
    const t = timedOf.get(this);
    if (t && t.names.length) {
      const bytes = 16 * t.names.length;
      t.resolve = t.device.createBuffer({ size: bytes, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
      t.read = t.device.createBuffer({ size: bytes, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      this.resolveQuerySet(t.qs, 0, 2 * t.names.length, t.resolve, 0);
      this.copyBufferToBuffer(t.resolve, 0, t.read, 0, bytes);
    }
    const cb = realFinish.call(this, d);
    if (t && t.names.length) cbOf.set(cb, t);
    return cb;
  };
  const realSubmit = GPUQueue.prototype.submit;
  GPUQueue.prototype.submit = function (cbs) {
    realSubmit.call(this, cbs);
    const step = stepNow;
    for (const cb of cbs) {
      const t = cbOf.get(cb);
      if (!t) continue;
      t.read.mapAsync(GPUMapMode.READ).then(() => {
        const ts = new BigInt64Array(t.read.getMappedRange());
        const m = gpuMs.get(step) ?? new Map();
        t.names.forEach((name, i) => {
          const s = m.get(name) ?? { n: 0, ms: 0 };
          s.n++; s.ms += Number(ts[2 * i + 1] - ts[2 * i]) / 1e6;
          m.set(name, s);
        });
        gpuMs.set(step, m);
        t.read.unmap(); t.read.destroy(); t.resolve.destroy(); t.qs.destroy();
      });
    }
  };
}
const long = [];
new PerformanceObserver((l) => { for (const e of l.getEntries()) long.push({ start: e.startTime, ms: e.duration }); }).observe({ type: "longtask" });
const { VidLLM } = await import("/web/js/vidllm.js");
window.run = async ({ prompt, tokens, kv }) => {
  const rt = await VidLLM.load({ model: "/model.gguf", device: "webgpu", worker: false, kv });
  await new Promise((r) => setTimeout(r, 200));
  const steps = [];
  stats.clear();
  kernels.clear();
  let t = performance.now();
  const cut = () => {
    const now = performance.now();
    steps.push({ ms: now - t, t0: t, t1: now, calls: Object.fromEntries([...stats].map(([k, v]) => [k, { ...v }])), kernels: Object.fromEntries(kernels) });
    stats.clear();
    kernels.clear();
    stepNow = steps.length;
    t = now;
  };
  window.profileFrom = null;
  for await (const p of rt.generate({ prompt, raw: true, maxTokens: tokens })) {
    cut();
    if (steps.length === 1) await window.startProfile?.();
  }
  await new Promise((r) => setTimeout(r, ${gpuTimes} ? 3000 : 200));
  rt.dispose();
  return steps.map((s, i) => ({ ...s, gpu: Object.fromEntries(gpuMs.get(i) ?? []), longTasks: long.filter((x) => x.start >= s.t0 - 1 && x.start < s.t1).map((x) => x.ms) }));
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
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--enable-webgpu-developer-features", "--disable-dawn-features=timestamp_quantization", "--use-webgpu-adapter=swiftshader", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
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
  steps = await p.evaluate((a) => window.run(a), { prompt: Array(repeat).fill("The river runs from the mountains to the sea, past farms and towns.").join(" "), tokens, kv });
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

// A whole decode step's dispatches (pipelines set), by kernel: the last step with the most
// (the step after the last piece's runs while that piece is delivered, so the final row holds
// only what was left).
const count = (s) => Object.values(s.kernels).reduce((a, b) => a + b, 0);
const full = steps.slice(1).reduce((best, s) => (count(s) >= count(best) ? s : best), steps.at(-1));
const last = full.kernels;
console.log("");
console.log(`Pipelines set in decode step ${steps.indexOf(full)} by kernel (${count(full)} in all):`);
console.log("");
console.log("| kernel | dispatches |");
console.log("|---|---|");
for (const [k, n] of Object.entries(last).sort((a, b) => b[1] - a[1])) console.log(`| ${k} | ${n} |`);
console.log("(a dispatch whose pipeline is the one before it sets none: compare with pass.dispatchWorkgroups)");

if (gpuTimes) {
  // The GPU's time by kernel, over the decode steps whose dispatches were all submitted in
  // their own interval (the recording step and the last one excluded).
  const decode = steps.slice(2, -1);
  const sum = new Map();
  for (const s of decode) for (const [k, v] of Object.entries(s.gpu)) {
    const a = sum.get(k) ?? { n: 0, ms: 0 };
    a.n += v.n; a.ms += v.ms; sum.set(k, a);
  }
  const total = [...sum.values()].reduce((a, v) => a + v.ms, 0);
  console.log("");
  console.log(`GPU time by kernel and grid (workgroups), per decode step (mean of ${decode.length} steps; ${(total / Math.max(decode.length, 1)).toFixed(0)} ms a step in all):`);
  console.log("");
  console.log("| kernel, grid | dispatches | GPU ms | share | ms per dispatch |");
  console.log("|---|---|---|---|---|");
  for (const [k, v] of [...sum].sort((a, b) => b[1].ms - a[1].ms)) {
    const per = decode.length || 1;
    console.log(`| ${k} | ${(v.n / per).toFixed(0)} | ${(v.ms / per).toFixed(1)} | ${((100 * v.ms) / total).toFixed(1)}% | ${(v.ms / v.n).toFixed(3)} |`);
  }
  const pre = Object.entries(steps[0].gpu);
  const preTotal = pre.reduce((a, [, v]) => a + v.ms, 0);
  console.log("");
  console.log(`GPU time by kernel and grid in the prefill (${preTotal.toFixed(0)} ms in all; the largest 12):`);
  console.log("");
  console.log("| kernel, grid | dispatches | GPU ms | share |");
  console.log("|---|---|---|---|");
  for (const [k, v] of pre.sort((a, b) => b[1].ms - a[1].ms).slice(0, 12)) {
    console.log(`| ${k} | ${v.n} | ${v.ms.toFixed(1)} | ${((100 * v.ms) / preTotal).toFixed(1)}% |`);
  }
}

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
const busy = total - (self.get("(idle)") ?? 0);
console.log("");
console.log(`CPU profile of the decode steps: ${total.toFixed(0)} ms sampled, ${busy.toFixed(0)} ms of it busy: ${(busy / (steps.length - 1)).toFixed(1)} ms a decode step (the recording step included); self time by function (top ${top}):`);
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
