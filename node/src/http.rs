//! The node's HTTP surface: `/metrics` (Prometheus text), `/healthz`
//! (liveness: the process answers) and `/readyz` (readiness: serving and not
//! draining; 503 otherwise, so load balancers stop sending work first), and
//! `/v1/models/blobs/<sha256>`: a deployed model's file, for peers that
//! lack it (only files this node has verified against a deployed digest;
//! HEAD and Range requests work, so a broken download resumes).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AppState {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    /// Set once a cluster member was first ready (registered, its stages
    /// loaded); later loads (a new deployment) leave it ready.
    pub settled: Arc<AtomicBool>,
    pub name: Arc<str>,
    /// The model store and the control plane, on cluster members.
    pub models: Option<(Arc<crate::model_store::Store>, trine_control::ControlPlane)>,
    /// Inference, on cluster members.
    pub serving: Option<crate::serve::Serving>,
    /// The operator console (`/ui`), on cluster members.
    pub console: Option<crate::console::Console>,
    /// The marker [`crate::auth::record_root`] clears once a new cluster's
    /// first admin token is on the chain; not ready while it exists.
    pub admin_pending: Option<std::path::PathBuf>,
    /// Largest request body (`max_body_bytes`).
    pub max_body: usize,
}

pub fn router(state: AppState) -> Router {
    let console = state.console.clone();
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models/blobs/{sha256}", get(blob))
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/chat/completions", post(crate::openai::chat))
        .layer(DefaultBodyLimit::max(state.max_body))
        .with_state(state);
    let router = match console {
        Some(c) => router.merge(c.router()),
        None => router,
    };
    router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
}

/// An unknown path: a JSON error (OpenAI's shape) listing what is served.
async fn no_route(uri: axum::http::Uri) -> impl IntoResponse {
    openai_error(
        StatusCode::NOT_FOUND,
        &format!(
            "no such path {}: this node serves POST /v1/completions, POST /v1/chat/completions, GET /v1/models, /metrics, /healthz, /readyz and /ui",
            uri.path()
        ),
    )
}

/// A known path with the wrong method.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> impl IntoResponse {
    let want = match uri.path() {
        "/v1/completions" | "/v1/chat/completions" => "POST with a JSON body",
        _ => "GET",
    };
    openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("{method} is not served on {}: use {want}", uri.path()),
    )
}

fn openai_error(status: StatusCode, message: &str) -> axum::response::Response {
    json(
        status,
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}),
    )
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    json(
        StatusCode::OK,
        serde_json::json!({
            "status": "ok",
            "name": &*s.name,
            "version": crate::build::VERSION,
            "git_sha": crate::build::GIT_SHA,
        }),
    )
}

/// Ready: serving and not draining; a cluster member also once it is
/// registered and the stages placed on it at start are loaded (or failed),
/// so a startup probe covers the model load. After that first time, a new
/// deployment loading here does not take the node out of its Service.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let unready = |reason: String| {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "ready": false, "reason": reason }),
        )
    };
    if !s.ready.load(Ordering::Acquire) {
        return unready("starting or draining".into());
    }
    if let Some((_, control)) = &s.models
        && !s.settled.load(Ordering::Acquire)
    {
        let me = control.id();
        let state = control.reader().state();
        if !state.nodes.contains_key(&me) {
            return unready("not registered in the cluster yet (joining)".into());
        }
        if s.admin_pending.as_ref().is_some_and(|p| p.exists()) {
            return unready("recording the new cluster's first admin token".into());
        }
        let loading: Vec<String> = state
            .placements
            .values()
            .filter(|p| {
                p.node == me
                    && matches!(
                        p.state,
                        trine_control::command::StageState::Assigned
                            | trine_control::command::StageState::Loading
                    )
            })
            .map(|p| format!("{} replica {} stage {}", p.model, p.replica, p.stage))
            .collect();
        if !loading.is_empty() {
            return unready(format!("loading {}", loading.join(", ")));
        }
        s.settled.store(true, Ordering::Release);
    }
    json(StatusCode::OK, serde_json::json!({ "ready": true }))
}

async fn blob(
    State(s): State<AppState>,
    Path(sha256): Path<String>,
    request: Request,
) -> axum::response::Response {
    use tower::ServiceExt as _;
    let Some((store, control)) = s.models else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "this node is not a cluster member" }),
        )
        .into_response();
    };
    let state = control.reader().state();
    let path =
        tokio::task::spawn_blocking(move || crate::model_store::servable(&store, &state, &sha256))
            .await
            .ok()
            .flatten();
    let Some(path) = path else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no verified copy of a deployed model with this sha256 here" }),
        )
        .into_response();
    };
    match tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => match e {},
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> impl IntoResponse {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
