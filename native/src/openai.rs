//! OpenAI's chat-completions API as vidllm reads and writes it: the request body (with
//! vLLM's and llama.cpp's `video_url` part, and frame controls as extra fields), its
//! translation into an engine [`Job`], and the response and stream-chunk bodies.
//!
//! Media come as `data:` URLs (base64), or as file paths (`file://` or plain) only under
//! the server's `--media-root`; remote URLs are refused (the server fetches nothing).

use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use vidllm_core::sampler::SamplerConfig;
use vidllm_models::GenerateParams;

use crate::engine::{ApiError, Done, FrameOptions, Job, Media, ModelInfo, Role, Sink, parse_reduce};

#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<InMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    // Frame controls (vLLM and llama.cpp take extra fields the same way).
    pub frames: Option<usize>,
    pub fps: Option<f64>,
    pub max_frames: Option<usize>,
    pub sampling: Option<String>,
    pub max_visual_tokens: Option<usize>,
    /// How a video over `max_visual_tokens` is reduced (none, slowfast, maxinfo, fastvid, framefusion).
    pub reduce: Option<String>,
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct InMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: UrlRef },
    VideoUrl { video_url: UrlRef },
}

/// `{"url": ...}` as OpenAI writes it, or the bare string some clients send.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum UrlRef {
    Object { url: String },
    Bare(String),
}

impl UrlRef {
    fn url(&self) -> &str {
        match self {
            UrlRef::Object { url } | UrlRef::Bare(url) => url,
        }
    }
}

/// Stop strings a request may give (OpenAI allows 4).
const MAX_STOPS: usize = 8;

impl ChatRequest {
    /// The engine's job for this request (without its sink). Media are resolved here:
    /// data URLs decoded to temporary files, paths checked against `media_root`, each
    /// hashed. Blocking work: run it off the async threads.
    pub fn into_job(self, info: &ModelInfo, media_root: Option<&Path>, sink: Box<dyn Sink>, arrived: Instant) -> Result<Job, ApiError> {
        if let Some(m) = &self.model
            && !m.is_empty()
            && m != &info.id
        {
            return Err(ApiError {
                status: 404,
                kind: "invalid_request_error",
                code: Some("model_not_found"),
                message: format!("model {m:?} is not served here (this server serves {:?})", info.id),
            });
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("n: one choice a request"));
        }
        if self.messages.is_empty() {
            return Err(bad("messages: at least one message"));
        }
        let (mut turns, mut images, mut video) = (Vec::new(), Vec::new(), None);
        let mut users = 0;
        for (n, m) in self.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                r => return Err(bad(format!("messages[{n}]: role {r:?} is not supported (system, user, assistant)"))),
            };
            if role == Role::User {
                users += 1;
            }
            let mut text = Vec::new();
            match &m.content {
                None => {}
                Some(Content::Text(t)) => text.push(t.clone()),
                Some(Content::Parts(parts)) => {
                    for part in parts {
                        let (url, is_video) = match part {
                            Part::Text { text: t } => {
                                text.push(t.clone());
                                continue;
                            }
                            Part::ImageUrl { image_url } => (image_url.url(), false),
                            Part::VideoUrl { video_url } => (video_url.url(), true),
                        };
                        if role != Role::User || users > 1 {
                            return Err(bad(format!(
                                "messages[{n}]: images and videos go in the first user message (the model sees them in its first turn)"
                            )));
                        }
                        let media =
                            resolve(url, media_root).map_err(|e| ApiError { message: format!("messages[{n}]: {}", e.message), ..e })?;
                        match (is_video, &video) {
                            (true, None) => video = Some(media),
                            (true, Some(_)) => return Err(bad(format!("messages[{n}]: one video a request"))),
                            (false, _) => images.push(media),
                        }
                    }
                }
            }
            turns.push((role, text.join("\n")));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(bad("max_tokens: at least 1"));
        }
        let mut sampler = SamplerConfig::default();
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(bad(format!("temperature: 0 to 2 (got {t})")));
            }
            sampler.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad(format!("top_p: above 0, at most 1 (got {p})")));
            }
            sampler.top_p = p;
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(format!("min_p: 0 to 1 (got {p})")));
            }
            sampler.min_p = p;
        }
        if let Some(k) = self.top_k {
            sampler.top_k = k;
        }
        // Sampling without a seed draws one, as OpenAI does; greedy needs none.
        sampler.seed = self
            .seed
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty()) {
            return Err(bad(format!("stop: at most {MAX_STOPS} strings, none empty")));
        }
        let frames = FrameOptions { sampling: self.sampling, frames: self.frames, fps: self.fps, max_frames: self.max_frames };
        // Without max_tokens the answer may fill the context, as OpenAI's API allows.
        let params = GenerateParams { max_tokens: max_tokens.unwrap_or(info.context), sampler, stop };
        let reduce = parse_reduce(self.reduce.as_deref(), self.max_visual_tokens).map_err(bad)?;
        Ok(Job { turns, images, video, frames, max_visual_tokens: self.max_visual_tokens, reduce, params, sink, arrived })
    }
}

/// A media reference as a file the engine can decode, named by the SHA-256 of its bytes.
fn resolve(url: &str, media_root: Option<&Path>) -> Result<Media, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, payload)) = rest.split_once(',') else {
            return Err(bad("a data: URL without a comma"));
        };
        if !meta.ends_with(";base64") {
            return Err(bad("data: URLs must be base64 (data:<type>;base64,...)"));
        }
        let bytes = BASE64.decode(payload.trim()).map_err(|e| bad(format!("data: URL: not base64 ({e})")))?;
        if bytes.is_empty() {
            return Err(bad("data: URL: no bytes"));
        }
        return Media::from_bytes(&bytes).map_err(|e| ApiError::server(format!("writing the media to a temporary file: {e}")));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad("remote URLs are not fetched: send a data: URL, or a path under the server's --media-root"));
    }
    let Some(root) = media_root else {
        return Err(bad("file paths are read only when the server runs with --media-root: send a data: URL"));
    };
    let given = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    // Both sides canonical, so `..` and links cannot leave the root.
    let path = root.join(&given).canonicalize().map_err(|_| bad(format!("{url}: no such file under --media-root")))?;
    if !path.starts_with(root) {
        return Err(ApiError { status: 403, kind: "invalid_request_error", code: None, message: format!("{url}: not under --media-root") });
    }
    Media::from_file(path).map_err(|e| bad(format!("{url}: {e}")))
}

/// OpenAI's error body.
pub fn error_body(e: &ApiError) -> Json {
    json!({"error": {"message": e.message, "type": e.kind, "param": Json::Null, "code": e.code}})
}

fn usage(d: &Done) -> Json {
    let u = &d.usage;
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.prompt_tokens + u.completion_tokens,
           "visual_tokens": u.visual_tokens})
}

/// vidllm's own account of a request (beside OpenAI's fields, as llama.cpp's server adds
/// `timings`): stage times, and what the media became.
fn timings(d: &Done) -> Json {
    let t = &d.times;
    json!({"queued_ms": t.queued_ms, "media_ms": t.media_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
           "time_to_first_token_ms": t.time_to_first_token_ms, "video_cached": d.video_cached, "frames": d.frames,
           "reduction": d.reduction})
}

/// The non-streaming response.
pub fn completion(id: &str, created: u64, model: &str, d: &Done) -> Json {
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": d.text}, "finish_reason": d.finish_reason, "logprobs": Json::Null}],
        "usage": usage(d), "timings": timings(d),
    })
}

/// A streamed chunk: a `delta`, and the finish reason on the last one.
pub fn chunk(id: &str, created: u64, model: &str, delta: Json, finish_reason: Option<&str>) -> Json {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": Json::Null}]})
}

/// The usage chunk after the last (`stream_options.include_usage`): no choices.
pub fn usage_chunk(id: &str, created: u64, model: &str, d: &Done) -> Json {
    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage(d), "timings": timings(d)})
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}
