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
    pub name: Arc<str>,
    /// The model store and the control plane, on cluster members.
    pub models: Option<(Arc<crate::model_store::Store>, trine_control::ControlPlane)>,
    /// Inference, on cluster members.
    pub serving: Option<crate::serve::Serving>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models/blobs/{sha256}", get(blob))
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/chat/completions", post(crate::openai::chat))
        .layer(DefaultBodyLimit::max(crate::openai::MAX_BODY))
        .with_state(state)
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

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Acquire) {
        json(StatusCode::OK, serde_json::json!({ "ready": true }))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "ready": false, "reason": "starting or draining" }),
        )
    }
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
