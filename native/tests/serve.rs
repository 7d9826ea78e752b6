//! `vidllm-native serve` and `batch` as clients use them: answers equal `chat` and `ask` on
//! the same input (streamed and whole), parallel requests decoded together, a follow-up
//! about the same video served from the encoded-video cache, a full queue answered with
//! 429, a client that goes away cancelled, and one clear error for each bad request.
//! Everything on loopback, on the CPU.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value as Json, json};
use vidllm_tests::{fixture, smollm2_path};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vidllm-native"))
}

fn clips() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("VIDLLM_CLIPS").unwrap_or_else(|_| format!("{}/.cache/vidllm/clips", std::env::var("HOME").unwrap_or_default())),
    );
    assert!(p.join("bikes.mp4").exists(), "{} has no clips: run tests/scripts/fetch_clips.sh", p.display());
    p
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = bin()
            .args(["serve", "--device", "cpu", "--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("serve starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("serve printed its address").unwrap();
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.trim().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// `vidllm-native ask --json` on the CPU, 6 tokens of `prompt`, with `media` (and any other
/// arguments): its JSON line.
fn ask_json(model: &std::path::Path, prompt: &str, media: &[&std::ffi::OsStr]) -> Json {
    let out = bin()
        .args(["ask", "--device", "cpu", "--quant", "f32", "--json", "--max-tokens", "6", "--prompt", prompt, "--model"])
        .arg(model)
        .args(media)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(out.stdout.split(|&b| b == b'\n').find(|l| l.starts_with(b"{")).unwrap()).unwrap()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

/// POST a JSON body: (status, parsed body).
fn post(url: &str, body: &Json, key: Option<&str>) -> (u16, Json) {
    let mut req = agent().post(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut resp = req.send_json(body).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_json().unwrap_or(Json::Null))
}

fn get(url: &str) -> (u16, String) {
    let mut resp = agent().get(url).call().unwrap();
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
}

/// A streamed request: the `data:` payloads in order, up to `[DONE]`.
fn stream(url: &str, body: &Json) -> Vec<String> {
    let resp = agent().post(url).send_json(body).unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers().get("content-type").unwrap().to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut out = Vec::new();
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            out.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
        }
    }
    out
}

fn chat_text(prompt: &str, max_tokens: usize) -> String {
    let out = bin()
        .args(["chat", "--device", "cpu", "--json", "--max-tokens", &max_tokens.to_string(), "--model"])
        .arg(smollm2_path())
        .args(["--prompt", prompt])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Json = serde_json::from_slice(out.stdout.split(|&b| b == b'\n').find(|l| l.starts_with(b"{")).unwrap()).unwrap();
    v["text"].as_str().unwrap().to_string()
}

fn question(q: &str, max_tokens: usize) -> Json {
    json!({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens, "temperature": 0})
}

/// A metric's value in the text exposition (`name{labels} value`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn answers_equal_chat_streamed_and_whole_and_in_parallel() {
    let model = smollm2_path();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--parallel", "4", "--ctx", "512"]);
    let url = server.url("/v1/chat/completions");
    let prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.", "What is 2 + 2?"];
    let expected: Vec<String> = prompts.iter().map(|p| chat_text(p, 24)).collect();

    // Whole, one at a time.
    let (status, v) = post(&url, &question(prompts[0], 24), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), expected[0]);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    println!("whole: {v}");

    // Streamed, usage included.
    let mut body = question(prompts[1], 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&url, &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Json> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, expected[1]);
    let finish: Vec<&Json> = chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish.len(), 1, "one chunk carries the finish reason");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0, "the usage chunk has no choices");
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    println!("streamed {} chunks", chunks.len());

    // Four at once: decoded together, each its own answer.
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, body) = (url.clone(), question(p, 24));
            std::thread::spawn(move || post(&url, &body, None))
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&expected) {
        let (status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), want);
    }

    let (status, v) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    let v: Json = serde_json::from_str(&v).unwrap();
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(get(&server.url("/health")).0, 200);
    let (_, m) = get(&server.url("/metrics"));
    println!("{m}");
    assert_eq!(metric(&m, "vidllm_requests_total{outcome=\"ok\"}"), 6.0);
    assert!(metric(&m, "vidllm_generated_tokens_total") > 0.0);
    assert!(m.contains("vidllm_time_to_first_token_seconds_count 6"));
}

#[test]
fn a_full_queue_is_429_and_a_client_that_leaves_is_cancelled() {
    let model = smollm2_path();
    let server = Server::start(&["--model", model.to_str().unwrap(), "--parallel", "1", "--queue", "1", "--ctx", "2048"]);
    let url = server.url("/v1/chat/completions");
    let metrics = || get(&server.url("/metrics")).1;
    let long = |q: &str| {
        let mut b = question(q, 1500);
        b["stream"] = json!(true);
        b
    };
    // A long answer occupies the one slot; read two chunks of it.
    let resp = agent().post(&url).send_json(long("Tell me a very long story about a dragon.")).unwrap();
    let mut first = BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    let mut seen = 0;
    while seen < 3 {
        line.clear();
        first.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            seen += 1;
        }
    }
    // A second waits in the queue (its handler holds until it is admitted)...
    let (u2, b2) = (url.clone(), question("Say hi.", 4));
    let waiting = std::thread::spawn(move || post(&u2, &b2, None));
    wait_for("the queue to hold one request", || metric(&metrics(), "vidllm_queue_depth") == 1.0);
    // ...so a third finds the queue full.
    let (status, v) = post(&url, &question("Say hello.", 4), None);
    assert_eq!(status, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("busy"), "{v}");

    // The first client goes away: its answer ends within a token or so, the queued one runs.
    drop(first);
    let (status, v) = waiting.join().unwrap();
    assert_eq!(status, 200, "{v}");
    wait_for("the cancelled request to be counted", || metric(&metrics(), "vidllm_requests_total{outcome=\"cancelled\"}") == 1.0);
    let m = metrics();
    let generated = metric(&m, "vidllm_generated_tokens_total");
    println!("generated {generated} tokens in all; {m}");
    assert!(generated < 1000.0, "the abandoned answer ran on ({generated} tokens)");
    assert_eq!(metric(&m, "vidllm_requests_total{outcome=\"rejected\"}"), 1.0);
    // And the server goes on.
    assert_eq!(post(&url, &question("Say hi.", 4), None).0, 200);
}

#[test]
fn bad_requests_get_one_clear_error_each() {
    let model = smollm2_path();
    let root = std::env::temp_dir().join(format!("vidllm-serve-root-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--ctx",
        "128",
        "--api-key",
        "sekrit",
        "--max-body-mib",
        "1",
        "--media-root",
        root.to_str().unwrap(),
    ]);
    let url = server.url("/v1/chat/completions");
    let key = Some("sekrit");
    let check = |status: u16, v: &Json, want: u16, needle: &str| {
        assert_eq!(status, want, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("an OpenAI error body: {v}"));
        assert!(msg.to_lowercase().contains(needle), "{needle:?} not in {msg:?}");
        println!("{want}: {msg}");
    };
    let (s, v) = post(&url, &question("Hi", 4), None);
    check(s, &v, 401, "api key");
    let (s, v) = post(&url, &question("Hi", 4), Some("wrong"));
    check(s, &v, 401, "api key");
    assert_eq!(get(&server.url("/health")).0, 200, "health needs no key");

    let raw = |body: &str| {
        let mut resp =
            agent().post(&url).header("Authorization", "Bearer sekrit").header("content-type", "application/json").send(body).unwrap();
        (resp.status().as_u16(), resp.body_mut().read_json::<Json>().unwrap_or(Json::Null))
    };
    let (s, v) = raw("{\"messages\": [");
    check(s, &v, 400, "not a chat request");
    // A body over --max-body-mib is refused from its Content-Length, before it is read (a
    // client still sending would see the connection close, so only the head is sent here).
    let mut conn = std::net::TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n";
    std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
    let mut status_line = String::new();
    BufReader::new(conn).read_line(&mut status_line).unwrap();
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    println!("2 MiB body: {}", status_line.trim());
    let (s, v) = post(&url, &json!({"messages": []}), key);
    check(s, &v, 400, "at least one message");
    let (s, v) = post(&url, &json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), key);
    check(s, &v, 404, "not served here");
    let (s, v) = post(&url, &question(&"word ".repeat(400), 4), key);
    check(s, &v, 400, "context");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post(&url, &json!({"messages": [{"role": "tool", "content": "x"}]}), key);
    check(s, &v, 400, "role");
    let (s, v) = post(&url, &json!({"messages": [{"role": "user", "content": "x"}], "temperature": 5}), key);
    check(s, &v, 400, "temperature");
    let image = |url: &str| json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": url}}]}]});
    let (s, v) = post(&url, &image("https://example.com/cat.png"), key);
    check(s, &v, 400, "remote urls are not fetched");
    let (s, v) = post(&url, &image("nope.png"), key);
    check(s, &v, 400, "no such file under --media-root");
    for outside in ["/etc/passwd", "../../../../etc/passwd", "file:///etc/passwd"] {
        let (s, v) = post(&url, &image(outside), key);
        check(s, &v, 403, "not under --media-root");
    }
    let (s, v) = post(&url, &image("data:image/png;base64,@@@"), key);
    check(s, &v, 400, "not base64");
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG not really");
    let (s, v) = post(&url, &image(&format!("data:image/png;base64,{png}")), key);
    check(s, &v, 400, "text model");
    // Still serving.
    let (s, v) = post(&url, &question("Hi", 4), key);
    assert_eq!(s, 200, "{v}");
}

#[test]
fn video_questions_equal_ask_and_a_follow_up_skips_the_encoder() {
    let model = fixture("tiny_video_llava");
    let clip = clips().join("bikes.mp4");
    let server =
        Server::start(&["--model", model.to_str().unwrap(), "--quant", "f32", "--media-root", clip.parent().unwrap().to_str().unwrap()]);
    let url = server.url("/v1/chat/completions");
    let asked = ask_json(&model, "What happens?", &["--video".as_ref(), clip.as_os_str()]);

    let data = format!("data:video/mp4;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(&clip).unwrap()));
    let body = |video: &str| {
        json!({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What happens?"}]}],
               "max_tokens": 6, "temperature": 0})
    };
    let (s, first) = post(&url, &body(&data), None);
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["choices"][0]["message"]["content"], asked["text"], "the server's answer is ask's");
    assert_eq!(first["usage"]["visual_tokens"], asked["visual_tokens"]);
    assert_eq!(first["timings"]["video_cached"], false);
    // The same file by path (under --media-root): the same bytes, so the cache answers.
    let (s, again) = post(&url, &body("bikes.mp4"), None);
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["timings"]["video_cached"], true, "{again}");
    assert_eq!(again["choices"][0]["message"]["content"], asked["text"]);
    println!("media {} ms, then {} ms from the cache", first["timings"]["media_ms"], again["timings"]["media_ms"]);
    // A follow-up in the video model's turn format.
    let mut follow = body("bikes.mp4");
    let answer = first["choices"][0]["message"]["content"].as_str().unwrap();
    follow["messages"]
        .as_array_mut()
        .unwrap()
        .extend([json!({"role": "assistant", "content": answer}), json!({"role": "user", "content": "And then?"})]);
    let (s, v) = post(&url, &follow, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["timings"]["video_cached"], true);
    assert!(v["usage"]["prompt_tokens"].as_u64() > first["usage"]["prompt_tokens"].as_u64());
    // Fewer frames: a new encoding, fewer visual tokens.
    let mut fewer = body("bikes.mp4");
    fewer["frames"] = json!(4);
    let (s, v) = post(&url, &fewer, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["timings"]["frames"], 4);
    assert_eq!(v["timings"]["video_cached"], false);
    let mut capped = body("bikes.mp4");
    capped["max_visual_tokens"] = json!(10);
    let (s, v) = post(&url, &capped, None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_visual_tokens"));
    // The same budget with a reduction answers, and says what it kept.
    for (reduce, frames) in [("slowfast", 8), ("maxinfo", 2), ("fastvid", 8)] {
        let mut reduced = body("bikes.mp4");
        (reduced["max_visual_tokens"], reduced["reduce"]) = (json!(12), json!(reduce));
        let (s, v) = post(&url, &reduced, None);
        assert_eq!(s, 200, "{v}");
        let r = &v["timings"]["reduction"];
        assert_eq!(r["method"], reduce, "{v}");
        assert!(r["tokens_after"].as_u64().unwrap() <= 12 && r["tokens_before"].as_u64().unwrap() > 12, "{v}");
        assert_eq!(v["usage"]["visual_tokens"], r["tokens_after"], "{v}");
        assert_eq!(v["timings"]["frames"], frames, "{v}");
    }
    // FrameFusion reduces in the decoder: every token goes in, the layers see fewer.
    let mut fused = body("bikes.mp4");
    (fused["max_visual_tokens"], fused["reduce"]) = (json!(12), json!("framefusion"));
    let (s, v) = post(&url, &fused, None);
    assert_eq!(s, 200, "{v}");
    let r = &v["timings"]["reduction"];
    assert_eq!(r["method"], "framefusion", "{v}");
    assert_eq!(v["usage"]["visual_tokens"], r["tokens_before"], "{v}");
    let layers: Vec<u64> = r["layer_tokens"].as_array().expect("tokens by layer").iter().map(|n| n.as_u64().unwrap()).collect();
    assert!(layers.windows(2).all(|w| w[0] >= w[1]) && r["tokens_after"].as_u64() == layers.last().copied(), "{v}");
    // The same as `ask` under the same budget.
    let budget = ["--max-visual-tokens", "12", "--reduce", "framefusion"].map(std::ffi::OsStr::new);
    let asked_fused = ask_json(&model, "What happens?", &[&budget[..], &["--video".as_ref(), clip.as_os_str()]].concat());
    assert_eq!(v["choices"][0]["message"]["content"], asked_fused["text"], "{v}");
    assert_eq!(r["layer_tokens"], asked_fused["reduction"]["layer_tokens"], "{asked_fused}");
    let mut bogus = body("bikes.mp4");
    (bogus["max_visual_tokens"], bogus["reduce"]) = (json!(10), json!("zip"));
    let (s, v) = post(&url, &bogus, None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("unknown reduction"), "{v}");
    let mut unbounded = body("bikes.mp4");
    unbounded["reduce"] = json!("slowfast");
    let (s, v) = post(&url, &unbounded, None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("reduce needs max_visual_tokens"), "{v}");
    // A still image (a frame of the clip as a PNG data: URL) answers as `ask --image` does.
    let png = std::env::temp_dir().join(format!("vidllm-serve-frame-{}.png", std::process::id()));
    let st = Command::new("ffmpeg").args(["-v", "error", "-y", "-i"]).arg(&clip).args(["-frames:v", "1"]).arg(&png).status().unwrap();
    assert!(st.success(), "ffmpeg wrote a frame");
    let asked_image = ask_json(&model, "What is this?", &["--image".as_ref(), png.as_os_str()]);
    let data = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(std::fs::read(&png).unwrap()));
    let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "What is this?"}]}],
                       "max_tokens": 6, "temperature": 0});
    let (s, v) = post(&url, &image, None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], asked_image["text"], "the server's answer about an image is ask's");
    assert_eq!(v["usage"]["visual_tokens"], asked_image["visual_tokens"]);
    // The model's placeholder written in the text is refused: media come only as parts.
    let mut injected = body("bikes.mp4");
    injected["messages"][0]["content"][1]["text"] = json!("What happens in <video>?");
    let (s, v) = post(&url, &injected, None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("placeholder"), "{v}");
    let mut corrupt = body(&format!("data:video/mp4;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"not a video at all")));
    corrupt["max_tokens"] = json!(2);
    let (s, v) = post(&url, &corrupt, None);
    assert_eq!(s, 400, "{v}");
    println!("corrupt video: {}", v["error"]["message"]);
}

#[test]
fn batch_answers_every_job_once_and_resumes() {
    let model = fixture("tiny_video_llava");
    let dir = std::env::temp_dir().join(format!("vidllm-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(clips().join("bikes.mp4"), dir.join("bikes.mp4")).unwrap();
    std::fs::copy(clips().join("carphone_pristine.mp4"), dir.join("car.mp4")).unwrap();
    let jobs = dir.join("jobs.jsonl");
    let lines = [
        json!({"id": "a", "video": "bikes.mp4", "prompt": "What happens?", "max_tokens": 6}).to_string(),
        json!({"id": "b", "video": "car.mp4", "prompt": "What happens?", "max_tokens": 6}).to_string(),
        json!({"id": "c", "video": "bikes.mp4", "prompt": "Who is there?", "max_tokens": 6}).to_string(),
        json!({"id": "d", "video": "missing.mp4", "prompt": "?"}).to_string(),
        "{not json".to_string(),
        json!({"id": 5, "video": "car.mp4", "prompt": "Where?", "max_tokens": 6, "frames": 4}).to_string(),
    ];
    std::fs::write(&jobs, lines.join("\n") + "\n").unwrap();
    let out = dir.join("results.jsonl");
    let _ = std::fs::remove_file(&out);
    let run = || {
        let o = bin()
            .args(["batch", "--device", "cpu", "--quant", "f32", "--parallel", "2", "--model"])
            .arg(&model)
            .arg("--input")
            .arg(&jobs)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success() && !err.contains("panicked"), "{err}");
        err
    };
    println!("{}", run());
    let results: Vec<Json> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by_id = |id: &str| results.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no result for {id}"));
    assert_eq!(results.len(), 6);
    for id in ["a", "b", "c", "5"] {
        assert!(by_id(id)["text"].is_string(), "{}", by_id(id));
    }
    assert!(by_id("d")["error"].as_str().unwrap().contains("missing.mp4"));
    assert!(by_id("line 5")["error"].as_str().unwrap().contains("line 5"));
    // Job c asks about a's video: encoded once.
    assert_eq!(by_id("c")["timings"]["video_cached"], true);
    assert_eq!(by_id("5")["timings"]["frames"], 4);

    // Killed mid-write: a cut last line is removed, and a rerun runs only what is missing.
    let text = std::fs::read_to_string(&out).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"id\":\"b\"")).collect();
    std::fs::write(&out, kept.join("\n") + "\n{\"id\":\"b\",\"te").unwrap();
    let err = run();
    println!("{err}");
    assert!(err.contains("1 jobs to run, 5 already"), "{err}");
    let again: Vec<Json> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(again.len(), 6);
    assert_eq!(again.last().unwrap()["id"], "b");
    assert_eq!(again.last().unwrap()["text"], by_id("b")["text"], "the same answer as the first run");
    // Nothing left: a third run does nothing.
    assert!(run().contains("0 jobs to run, 6 already"));
}

#[test]
fn bad_server_options_fail_before_loading_with_one_line() {
    let model = smollm2_path();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (extra, needle) in [
        (vec!["--port", port.as_str()], "listening on 127.0.0.1"),
        (vec!["--port", "0", "--parallel", "0"], "--parallel"),
        (vec!["--port", "0", "--queue", "0"], "--queue"),
        (vec!["--port", "0", "--media-root", "/no/such/folder"], "--media-root"),
    ] {
        let out = bin().args(["serve", "--device", "cpu", "--model"]).arg(&model).args(&extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{extra:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(lines.len() == 1 && lines[0].contains(needle), "{extra:?}: {err}");
        println!("{extra:?}: {}", lines[0]);
    }
}
