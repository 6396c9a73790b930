//! Kafka Connect's REST API, path for path and JSON shape for JSON shape, plus `/health` and
//! `/metrics`.

mod connectors;
mod error;
mod plugins;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ApiResult};

use crate::worker::Herder;

#[derive(Clone)]
pub struct RestState {
    pub herder: Arc<Herder>,
    pub kafka_cluster_id: Option<String>,
}

pub fn router(state: RestState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(
            "/connectors",
            get(connectors::list).post(connectors::create),
        )
        .route(
            "/connectors/{name}",
            get(connectors::info).delete(connectors::delete),
        )
        .route(
            "/connectors/{name}/config",
            get(connectors::config)
                .put(connectors::put_config)
                .patch(connectors::patch_config),
        )
        .route("/connectors/{name}/status", get(connectors::status))
        .route("/connectors/{name}/tasks", get(connectors::tasks))
        .route(
            "/connectors/{name}/tasks/{task}/status",
            get(connectors::task_status),
        )
        .route(
            "/connectors/{name}/tasks/{task}/restart",
            post(connectors::restart_task),
        )
        .route("/connectors/{name}/restart", post(connectors::restart))
        .route("/connectors/{name}/pause", put(connectors::pause))
        .route("/connectors/{name}/resume", put(connectors::resume))
        .route("/connectors/{name}/stop", put(connectors::stop))
        .route(
            "/connectors/{name}/offsets",
            get(connectors::offsets)
                .patch(connectors::alter_offsets)
                .delete(connectors::reset_offsets),
        )
        .route("/connectors/{name}/topics", get(connectors::topics))
        .route(
            "/connectors/{name}/topics/reset",
            put(connectors::reset_topics),
        )
        .route("/connector-plugins", get(plugins::list))
        .route("/connector-plugins/{plugin}/config", get(plugins::config))
        .route(
            "/connector-plugins/{plugin}/config/validate",
            put(plugins::validate),
        )
        .fallback(|| async { ApiError::not_found("HTTP 404 Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "HTTP 405 Method Not Allowed",
            )
        })
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: RestState, shutdown: CancellationToken) {
    let app = router(state);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        tracing::error!(%error, "REST server stopped");
    }
}

async fn root(State(state): State<RestState>) -> impl IntoResponse {
    axum::Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": option_env!("MEDCONNECT_COMMIT").unwrap_or("unknown"),
        "kafka_cluster_id": state.kafka_cluster_id,
    }))
}

async fn health(State(state): State<RestState>) -> impl IntoResponse {
    axum::Json(
        json!({ "status": "healthy", "message": "Worker has completed startup and is ready to handle requests.", "worker_id": state.herder.worker_id() }),
    )
}

async fn metrics(State(state): State<RestState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.herder.metrics().render(),
    )
}

/// Parses a JSON body with Connect's error shape on failure (axum's own rejection is plain text).
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "Request body is empty; a JSON document is required",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Cannot parse the request body as JSON: {e}")))
}

/// A JSON object of strings (a connector config), with the offending key named on failure.
pub(crate) fn string_map(value: &Value, what: &str) -> ApiResult<medconnect_api::Props> {
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request(format!("{what} must be a JSON object")))?;
    object
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            Value::Number(n) => Ok((k.clone(), n.to_string())),
            Value::Bool(b) => Ok((k.clone(), b.to_string())),
            _ => Err(ApiError::bad_request(format!(
                "{what}: value of '{k}' must be a string"
            ))),
        })
        .collect()
}
