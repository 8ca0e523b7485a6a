//! The admin listener: `/healthz`, `/readyz` and `/metrics`. It serves no credential, so
//! it may bind where the kubelet and Prometheus can reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::credential::CredentialManager;
use crate::metrics::Metrics;
use crate::spread::Shares;

pub struct AdminState {
    pub manager: Arc<CredentialManager>,
    pub metrics: Arc<Metrics>,
    /// The workers' open connections.
    pub connections: Arc<Shares>,
    /// Set at shutdown, so load balancers stop sending before the listener closes.
    pub draining: AtomicBool,
    /// Shown on /readyz while TLS verification is off.
    pub insecure_skip_verify: bool,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let warning = state.insecure_skip_verify.then_some(
        "TLS verification is disabled for the IdP and the upstream (insecure_skip_verify)",
    );
    if state.draining.load(Ordering::SeqCst) {
        let body =
            serde_json::json!({ "ready": false, "reason": "shutting down", "warning": warning });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if state.manager.is_ready().await {
        let expires_in = state.manager.expires_in_seconds().await.map(|s| s.floor());
        let body = serde_json::json!({ "ready": true, "token_expires_in_seconds": expires_in, "warning": warning });
        return (StatusCode::OK, Json(body)).into_response();
    }
    let reason = state
        .manager
        .last_failure()
        .map(|e| e.message)
        .unwrap_or_else(|| "no credential obtained yet".into());
    let body = serde_json::json!({ "ready": false, "reason": reason, "warning": warning });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let expiry = state.manager.expires_in_seconds().await;
    let ready = state.manager.is_ready().await && !state.draining.load(Ordering::SeqCst);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state
            .metrics
            .render(expiry, ready, &state.connections.open_connections()),
    )
        .into_response()
}
