//! `serve`: an OpenAI-compatible HTTP server (axum on tokio) over the engine.
//!
//! Routes: `POST /v1/chat/completions` (streamed as server-sent events or whole),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). The engine runs on the
//! main thread (a worker of the CPU backend's thread pool, as in every other command); the
//! HTTP side runs on its own tokio runtime and hands requests over a bounded queue. A
//! request whose client disconnects is ended at the next token; one that arrives to a full
//! queue gets HTTP 429 at once.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use futures_util::stream::{self, Stream};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::engine::{ApiError, Done, Engine, EngineArgs, Event, Job, ModelInfo, Sink};
use crate::metrics::Metrics;
use crate::openai::{self, ChatRequest};
use crate::progress::Progress;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ routes (default: $VIDLLM_API_KEY if set).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait for a sequence; beyond it, HTTP 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Media given as file paths are read only under this folder (default: none are).
    #[arg(long)]
    pub media_root: Option<PathBuf>,
    /// Largest request body, in MiB (a video sent as a data: URL counts whole).
    #[arg(long, default_value_t = 64)]
    pub max_body_mib: usize,
}

struct AppState {
    jobs: SyncSender<Job>,
    info: ModelInfo,
    metrics: Arc<Metrics>,
    api_key: Option<String>,
    media_root: Option<PathBuf>,
    queue: usize,
    /// Largest request body, bytes.
    max_body: usize,
    next_id: AtomicU64,
}

/// A request's events, over a tokio channel.
struct ChannelSink(UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }

    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let media_root = match &a.media_root {
        Some(r) => Some(r.canonicalize().with_context(|| format!("--media-root {}", r.display()))?),
        None => None,
    };
    let api_key = a.api_key.clone().or_else(|| std::env::var("VIDLLM_API_KEY").ok()).filter(|k| !k.is_empty());
    let metrics = Arc::new(Metrics::new());
    // The address first, so that a port in use fails before a long load; connections
    // wait in the backlog until the model is loaded.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("starting the HTTP runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((a.host.as_str(), a.port)))
        .with_context(|| format!("listening on {}:{}", a.host, a.port))?;
    let bound = listener.local_addr()?;
    let mut engine = Engine::load(&a.engine, metrics.clone(), Progress::new(false))?;
    let (jobs, queue) = sync_channel(a.queue);
    let state = Arc::new(AppState {
        jobs,
        info: engine.info.clone(),
        metrics,
        api_key,
        media_root,
        queue: a.queue,
        max_body: a.max_body_mib << 20,
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .with_state(state);
    // The HTTP side on its own thread; the engine stays on this one (a pool worker). When
    // the server stops (Ctrl-C, SIGTERM), its queue sender goes and the engine returns.
    let http = std::thread::Builder::new().name("vidllm-http".into()).spawn(move || {
        runtime.block_on(async move {
            eprintln!("listening on http://{bound}");
            axum::serve(listener, app).with_graceful_shutdown(shutdown()).await
        })
    })?;
    engine.run(queue);
    http.join().map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?.context("serving HTTP")?;
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down");
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(openai::error_body(e))).into_response()
}

impl AppState {
    /// The API key check of the /v1/ routes.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else { return Ok(()) };
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            return Ok(());
        }
        self.metrics.request("unauthorized");
        Err(ApiError {
            status: 401,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            message: "a missing or wrong API key (Authorization: Bearer ...)".into(),
        })
    }
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    let mut r = st.metrics.render().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    r
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = st.authorize(&headers) {
        return error_response(&e);
    }
    let i = &st.info;
    axum::Json(json!({"object": "list", "data": [{
        "id": i.id, "object": "model", "created": i.created, "owned_by": "vidllm",
        "meta": {"video": i.video, "device": i.device, "context": i.context, "parallel": i.parallel},
    }]}))
    .into_response()
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let arrived = Instant::now();
    if let Err(e) = st.authorize(&headers) {
        return error_response(&e);
    }
    let invalid = |e: ApiError| {
        st.metrics.request("invalid");
        error_response(&e)
    };
    // An oversized body is refused from its Content-Length before any of it is read, and
    // otherwise as soon as it passes the limit.
    let too_large = || {
        invalid(ApiError {
            status: 413,
            kind: "invalid_request_error",
            code: None,
            message: format!("the body is over {} MiB (--max-body-mib)", st.max_body >> 20),
        })
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > st.max_body) {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(ApiError::bad_request(format!("the body is not a chat request: {e}"))),
    };
    let stream = req.stream;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (tx, mut rx) = unbounded_channel();
    // Media are decoded from base64, written out and hashed off the async threads.
    let st2 = st.clone();
    let job =
        tokio::task::spawn_blocking(move || req.into_job(&st2.info, st2.media_root.as_deref(), Box::new(ChannelSink(tx)), arrived)).await;
    let job = match job {
        Ok(Ok(j)) => j,
        Ok(Err(e)) => return invalid(e),
        Err(e) => {
            return error_response(&ApiError::server(format!("reading the request: {e}")));
        }
    };
    st.metrics.queue_depth.inc();
    if let Err(e) = st.jobs.try_send(job) {
        st.metrics.queue_depth.dec();
        let (status, message) = match e {
            TrySendError::Full(_) => (429, format!("the server is busy: {} requests are waiting; retry later", st.queue)),
            TrySendError::Disconnected(_) => (503, "the server is shutting down".to_string()),
        };
        st.metrics.request("rejected");
        let mut r = error_response(&ApiError { status, kind: "rate_limit_error", code: None, message });
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    // The first event says whether the request was accepted: an error before any token
    // is an HTTP error, not a broken stream.
    let first = match rx.recv().await {
        Some(Event::Error(e)) => return error_response(&e),
        Some(ev) => ev,
        None => return error_response(&ApiError::server("the engine stopped")),
    };
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = st.info.id.clone();
    if stream {
        let chunks = sse_chunks(rx, first, Chunking { id, created, model, include_usage });
        return Sse::new(chunks).keep_alive(KeepAlive::default()).into_response();
    }
    let mut pending = Some(first);
    loop {
        let ev = match pending.take() {
            Some(ev) => Some(ev),
            None => rx.recv().await,
        };
        match ev {
            Some(Event::Done(d)) => return axum::Json(openai::completion(&id, created, &model, &d)).into_response(),
            Some(Event::Error(e)) => return error_response(&e),
            Some(Event::Started | Event::Piece(_)) => {}
            None => {
                return error_response(&ApiError::server("the engine stopped"));
            }
        }
    }
}

/// What every chunk of one streamed answer carries.
struct Chunking {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunking {
    fn event(&self, delta: Json, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(openai::chunk(&self.id, self.created, &self.model, delta, finish).to_string())
    }

    /// The SSE events one engine event becomes.
    fn events(&self, ev: Event) -> (Vec<SseEvent>, bool) {
        match ev {
            Event::Started => (vec![self.event(json!({"role": "assistant", "content": ""}), None)], false),
            Event::Piece(text) => (vec![self.event(json!({"content": text}), None)], false),
            Event::Done(d) => (self.finish(&d), true),
            Event::Error(e) => {
                (vec![SseEvent::default().data(openai::error_body(&e).to_string()), SseEvent::default().data("[DONE]")], true)
            }
        }
    }

    fn finish(&self, d: &Done) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if !d.tail.is_empty() {
            out.push(self.event(json!({"content": d.tail}), None));
        }
        out.push(self.event(json!({}), Some(d.finish_reason)));
        if self.include_usage {
            out.push(SseEvent::default().data(openai::usage_chunk(&self.id, self.created, &self.model, d).to_string()));
        }
        out.push(SseEvent::default().data("[DONE]"));
        out
    }
}

/// The answer as server-sent events, each engine event as it comes. Dropping the stream
/// (the client went away) drops the receiver, and the engine ends the answer.
fn sse_chunks(rx: UnboundedReceiver<Event>, first: Event, c: Chunking) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (ready, ended) = c.events(first);
    stream::unfold(
        (rx, ready.into_iter().collect::<std::collections::VecDeque<_>>(), ended, c),
        |(mut rx, mut ready, mut ended, c)| async move {
            loop {
                if let Some(ev) = ready.pop_front() {
                    return Some((Ok(ev), (rx, ready, ended, c)));
                }
                if ended {
                    return None;
                }
                match rx.recv().await {
                    Some(ev) => {
                        let (more, end) = c.events(ev);
                        ready.extend(more);
                        ended = end;
                    }
                    None => {
                        let e = ApiError::server("the engine stopped");
                        ready.push_back(SseEvent::default().data(openai::error_body(&e).to_string()));
                        ended = true;
                    }
                }
            }
        },
    )
}
