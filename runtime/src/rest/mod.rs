//! Kafka Connect's REST API, path for path and JSON shape for JSON shape, plus `/health` and
//! `/metrics`; over TLS ([`tls`]), with authentication and roles ([`auth`]) and an audit trail
//! of every change ([`audit`]).

pub mod audit;
pub mod auth;
mod body;
mod connectors;
mod error;
pub mod forward;
mod loggers;
mod plugins;
pub mod relay;
pub mod signature;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use body::MAX_BODY_BYTES;
pub use error::{ApiError, ApiResult};
pub use loggers::{LogLevelError, LogLevels};

use crate::worker::Herder;
use crate::worker::cluster::ClusterView;

#[derive(Clone)]
pub struct RestState {
    pub herder: Arc<Herder>,
    pub kafka_cluster_id: Option<String>,
    /// Read and changed by `/admin/loggers`.
    pub log_levels: LogLevels,
    /// The largest connector config (as JSON) accepted: one record of the config topic must
    /// hold it, and a larger one would fail there only after validation.
    pub max_config_bytes: usize,
    /// Why the worker cannot go on, once it cannot: `/health` then answers 500.
    pub failure: watch::Receiver<Option<String>>,
    /// The cluster as this worker sees it: `/health/ready` answers 200 once it has work to do;
    /// writes go to its leader ([`forward`]).
    pub cluster: watch::Receiver<ClusterView>,
    /// Sends forwarded requests to other workers.
    pub forwarder: reqwest::Client,
    /// Who may call what.
    pub auth: Arc<auth::Authenticator>,
    /// Where changes are recorded.
    pub audit: Arc<audit::AuditLog>,
}

/// The API, answering a path with trailing slashes (`/connectors/`) as the path without them,
/// as Connect (Jersey) does.
pub fn router(state: RestState) -> Router {
    // Routing happens before a router's own middleware runs, so the rewrite sits in an outer
    // router whose only route is the API as its fallback.
    //
    // Outermost first: paths trimmed, errors in JSON, a forwarded request's signature checked
    // (and its caller taken from it), the caller authenticated and its role checked, writes
    // sent to the leader, and, only where the change is executed, the change audited.
    Router::new()
        .fallback_service(routes(state.clone()))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            audit::record_changes,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::to_leader,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), auth::check))
        .layer(middleware::from_fn_with_state(state, forward::verify))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(trim_trailing_slashes))
}

/// Every error answer in Connect's JSON shape, including the plain-text rejections of axum's
/// extractors (a malformed path segment or query, `?includeTasks=maybe`).
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // Rejection texts are short; a larger body is cut rather than buffered.
    let text = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        text => text.to_string(),
    };
    ApiError::new(status, message).into_response()
}

async fn trim_trailing_slashes(mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = match path.trim_end_matches('/') {
            "" => "/",
            trimmed => trimmed,
        };
        let rewritten = match request.uri().query() {
            Some(query) => format!("{trimmed}?{query}"),
            None => trimmed.to_string(),
        };
        if let Ok(path_and_query) = rewritten.parse() {
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(path_and_query);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    next.run(request).await
}

fn routes(state: RestState) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/internal/relay/{channel}", post(relay::answer))
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
        .route("/admin/loggers", get(loggers::list))
        .route(
            "/admin/loggers/{logger}",
            get(loggers::get).put(loggers::put),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
pub async fn serve(listener: tls::RestListener, state: RestState, shutdown: CancellationToken) {
    let app = router(state).into_make_service_with_connect_info::<tls::Peer>();
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

/// Connect's (KIP-1017) shape: 200 `healthy`, or 500 `unhealthy` with the reason.
async fn health(State(state): State<RestState>) -> Response {
    let failure = state.failure.borrow().clone();
    match failure {
        None => axum::Json(json!({
            "status": "healthy",
            "message": "Worker has completed startup and is ready to handle requests.",
            "worker_id": state.herder.worker_id(),
        }))
        .into_response(),
        Some(reason) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({
                "status": "unhealthy",
                "message": reason,
                "worker_id": state.herder.worker_id(),
            })),
        )
            .into_response(),
    }
}

/// Readiness (for a load balancer or Kubernetes): 200 once the worker joined its cluster and
/// applied its assignment (read the config topic as far as the leader), 503 before and while
/// it has lost its membership; 500 once it cannot go on.
async fn ready(State(state): State<RestState>) -> Response {
    if state.failure.borrow().is_some() {
        return health(State(state)).await;
    }
    let view = state.cluster.borrow().clone();
    match view.generation {
        Some(generation) => axum::Json(json!({
            "status": "ready",
            "worker_id": state.herder.worker_id(),
            "generation": generation,
            "leader": view.is_leader,
            "members": view.members.len(),
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "status": "not ready",
                "message": "the worker has not joined its cluster yet",
                "worker_id": state.herder.worker_id(),
            })),
        )
            .into_response(),
    }
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

/// Room left in a config-topic record for its key, Connect's `{"properties": ...}` wrapper,
/// record framing and the few settings a task config adds to its connector's.
const CONFIG_RECORD_HEADROOM: usize = 64 * 1024;

/// The largest connector config to accept when the producer takes records of up to
/// `message_max_bytes` (librdkafka's `message.max.bytes`, 1,000,000 unless configured).
pub fn max_config_bytes(message_max_bytes: usize) -> usize {
    message_max_bytes.saturating_sub(CONFIG_RECORD_HEADROOM)
}

/// Refuses a config the config topic could not store, before anything is written: the
/// producer would fail with `MessageSizeTooLarge` only after validation.
pub(crate) fn check_config_size(
    state: &RestState,
    config: &medconnect_api::Props,
) -> ApiResult<()> {
    let size = serde_json::to_vec(config).map_or(usize::MAX, |json| json.len());
    if size > state.max_config_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Connector configuration is {size} bytes as JSON; the limit is {} bytes (one record of the config topic must hold it)",
                state.max_config_bytes
            ),
        ));
    }
    Ok(())
}
