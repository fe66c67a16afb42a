//! The HTTP server: `POST /v1/generate`, `GET /health`, `GET /metrics` (axum on tokio, on the
//! address given), and the SIGTERM drain.
//!
//! Invariants enforced here:
//! - Every refusal is JSON `{"error": …, "field": …}` (`field` only for a bad field) with the
//!   status of its cause: 400 bad JSON or field, 406 `image/png` for several images, 429 queue
//!   full, 503 draining, 500 a generation that failed.
//! - A handler dropped before it answers (its client disconnected) sets its request's cancel
//!   flag, so the engine frees its queue entry and KV blocks at the next token boundary.
//! - On SIGTERM or SIGINT: new requests get 503, the listener stops accepting, requests in flight
//!   are answered, then the engine stops and `serve` returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use llamagen_encode::VqModel;
use llamagen_train::sample::{ImageCondition, ImageJob, per_image_seed};
use llamagen_train::{Gpt, ModelType};
use serde_json::json;

use crate::api::{GenerateRequest, Limits, RequestCondition};
use crate::engine::{Engine, EngineOptions, ImageOut, PromptEncoder, PromptThread, Submission};
use crate::error::{Result, ServeError};
use crate::metrics::Metrics;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub engine: EngineOptions,
    /// Most images one request may ask for.
    pub max_images_per_request: usize,
    /// Worker threads of the HTTP runtime.
    pub http_threads: usize,
}

struct App {
    engine: Engine,
    prompts: Option<PromptThread>,
    limits: Limits,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    model_type: ModelType,
}

fn error_response(e: &ServeError) -> Response {
    let status = match e {
        ServeError::InvalidField { .. } | ServeError::InvalidJson(_) => StatusCode::BAD_REQUEST,
        ServeError::Prompt(_) => StatusCode::BAD_REQUEST,
        ServeError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
        ServeError::ShuttingDown | ServeError::EngineFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = match e {
        ServeError::InvalidField { field, message } => {
            json!({"error": format!("{field}: {message}"), "field": field})
        }
        other => json!({"error": other.to_string()}),
    };
    let mut r = (status, axum::Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

/// Sets the cancel flag when dropped while armed (the handler's future dropped before it answered).
struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    armed: bool,
    app: Arc<App>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Relaxed);
            self.app.engine.poke();
        }
    }
}

async fn generate(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let start = Instant::now();
    let r = generate_inner(&app, &headers, &body, start).await;
    let resp = match r {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    app.metrics.response(resp.status().as_u16());
    if resp.status() == StatusCode::OK {
        app.metrics.latency(start.elapsed().as_secs_f64());
    }
    resp
}

async fn generate_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: &[u8],
    start: Instant,
) -> Result<Response> {
    if app.draining.load(Ordering::Relaxed) {
        return Err(ServeError::ShuttingDown);
    }
    let req = GenerateRequest::parse(body, &app.limits)?;
    let png = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("image/png"));
    if png && req.n > 1 {
        return Ok((
            StatusCode::NOT_ACCEPTABLE,
            axum::Json(json!({
                "error": "n: an image/png answer holds one image; ask for application/json for several",
                "field": "n",
            })),
        )
            .into_response());
    }
    let condition = match &req.condition {
        RequestCondition::Class(l) => ImageCondition::Class(*l),
        RequestCondition::Prompt(p) => {
            let t5 = app.prompts.as_ref().ok_or_else(|| {
                ServeError::field("prompt", "the server was started without --t5")
            })?;
            let (features, mask) = t5
                .encode(p.clone())
                .await
                .map_err(|e| ServeError::field("prompt", e.to_string()))?;
            ImageCondition::Caption { features, mask }
        }
    };
    let jobs: Vec<ImageJob> = (0..req.n)
        .map(|i| ImageJob {
            condition: condition.clone(),
            sampling: req.sampling.clone(),
            seed: per_image_seed(req.seed, i as u64),
        })
        .collect();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut guard = CancelOnDrop {
        flag: cancel.clone(),
        armed: true,
        app: app.clone(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    app.engine.submit(Submission {
        jobs,
        results: tx,
        cancel,
    })?;
    let mut images: Vec<Option<ImageOut>> = vec![None; req.n];
    for _ in 0..req.n {
        match rx.recv().await {
            Some(Ok(img)) => {
                let i = img.index;
                images[i] = Some(img);
            }
            Some(Err(e)) => {
                guard.armed = true;
                return Err(ServeError::External(e));
            }
            None => return Err(ServeError::External("the engine stopped".into())),
        }
    }
    guard.armed = false;
    let images: Vec<ImageOut> = images
        .into_iter()
        .map(|i| i.expect("all received"))
        .collect();
    let latency = start.elapsed().as_secs_f64();
    if png {
        let img = &images[0];
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "image/png")
            .header("x-llamagen-seed", img.seed.to_string())
            .header(
                "x-llamagen-tokens",
                img.tokens
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .body(Body::from(img.png.clone()))
            .map_err(|e| ServeError::External(e.to_string()));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(axum::Json(json!({
        "model_type": match app.model_type { ModelType::C2i => "c2i", ModelType::T2i => "t2i" },
        "latency_seconds": latency,
        "images": images.iter().map(|i| json!({
            "index": i.index,
            "seed": i.seed,
            "tokens": i.tokens,
            "png_base64": b64.encode(&i.png),
        })).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if let Some(why) = app.engine.failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "failed", "error": why})),
        )
            .into_response();
    }
    if app.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    axum::Json(json!({
        "status": "ok",
        "model_type": match app.model_type { ModelType::C2i => "c2i", ModelType::T2i => "t2i" },
        "num_classes": app.limits.num_classes,
        "prompts": app.limits.prompts,
        "max_images_per_request": app.limits.max_images,
    }))
    .into_response()
}

async fn metrics_route(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn shutdown_signal(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen for SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    app.draining.store(true, Ordering::Relaxed);
    eprintln!("draining: answering the requests in flight, then exiting");
}

/// Runs the server until SIGTERM/SIGINT, then drains. `model` and `vq` (latent channels
/// `vq_embed_dim`) must be on the CPU in float32; `prompts` encodes t2i prompts.
pub fn serve(
    model: Gpt,
    vq: VqModel,
    vq_embed_dim: usize,
    prompts: Option<Box<dyn PromptEncoder>>,
    opts: ServeOptions,
) -> Result<()> {
    let cfg = model.config().clone();
    if opts.max_images_per_request == 0 {
        return Err(ServeError::InvalidSetting(
            "--max-images must be >= 1".into(),
        ));
    }
    let metrics = Arc::new(Metrics::new(opts.engine.max_sequences));
    let engine = Engine::start(
        &model,
        vq,
        vq_embed_dim,
        opts.engine.clone(),
        metrics.clone(),
    )?;
    let has_null = {
        let d = model.paged_decoder()?;
        d.has_class(cfg.num_classes as u32)
    };
    drop(model);
    let prompts = match (prompts, cfg.model_type) {
        (Some(p), ModelType::T2i) => {
            Some(PromptThread::start(p, cfg.cls_token_num, cfg.caption_dim)?)
        }
        _ => None,
    };
    let limits = Limits {
        model_type: cfg.model_type,
        num_classes: cfg.num_classes,
        vocab_size: cfg.vocab_size,
        max_images: opts.max_images_per_request,
        prompts: prompts.is_some(),
        cfg: cfg.model_type == ModelType::T2i || has_null,
        max_prompt_chars: 20_000,
    };
    let app = Arc::new(App {
        engine,
        prompts,
        limits,
        metrics,
        draining: AtomicBool::new(false),
        model_type: cfg.model_type,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.http_threads.max(1))
        .enable_all()
        .build()?;
    let router = Router::new()
        .route("/v1/generate", post(generate))
        .route("/health", get(health))
        .route("/metrics", get(metrics_route))
        .with_state(app.clone());
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(opts.addr).await?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal(app.clone()))
            .await
    })?;
    drop(rt);
    let app = Arc::try_unwrap(app)
        .map_err(|_| ServeError::External("handlers still hold the server state".into()))?;
    app.engine.shutdown();
    drop(app.prompts);
    eprintln!("drained; exiting");
    Ok(())
}
