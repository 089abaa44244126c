//! The node's HTTP surface: `/metrics` (Prometheus text), `/healthz`
//! (liveness: the process answers) and `/readyz` (readiness: serving and not
//! draining; 503 otherwise, so load balancers stop sending work first).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct AppState {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    pub name: Arc<str>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

fn json(status: StatusCode, body: serde_json::Value) -> impl IntoResponse {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
