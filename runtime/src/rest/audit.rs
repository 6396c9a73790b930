//! The audit trail: every change made through the REST API (create, config change, delete,
//! pause / resume / stop / restart, offsets and topics reset, logger levels), and every change
//! refused for its role, recorded with who (principal and role), when, from where (peer, and the
//! worker that forwarded it), what (method, path, connector, the config with secrets hidden) and
//! the answer's status: to the log (tracing, target `medconnect_runtime::audit`) and to an
//! append-only Kafka topic (`[internal_topics] audit`, cleanup.policy=delete with a long
//! retention).
//!
//! The worker that executes a change records it (the leader for forwarded writes, the worker
//! running a task for a task restart), so each change is recorded once; the forwarding worker
//! records nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use medconnect_api::time::rfc3339_millis;
use medconnect_api::{ConfigDef, Props};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde_json::{Map, Value};

use super::auth::{ForwardedBy, Principal, roles};
use super::{ApiError, MAX_BODY_BYTES, RestState};
use crate::kafka::Producer;
use crate::worker::Herder;
use crate::worker::connector_config::{self as cc, HIDDEN};

/// How long a change's answer waits for its audit record to be in Kafka.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// One record of the trail (the audit topic's value, as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub timestamp_ms: i64,
    /// The worker that recorded (executed) the change.
    pub worker: String,
    pub principal: String,
    pub role: &'static str,
    /// How the principal authenticated (`token`, `basic`, `jwt`, `none`).
    pub auth: String,
    /// The caller's address, as the worker that took the call saw it.
    pub peer: Option<String>,
    /// The worker that took the call and forwarded it here, if one did.
    pub forwarded_by: Option<String>,
    pub method: String,
    /// Path and query.
    pub path: String,
    pub connector: Option<String>,
    pub action: &'static str,
    pub status: u16,
    /// `success` (2xx), `denied` (401/403), or `failure`.
    pub outcome: &'static str,
    /// The config or level sent, secrets hidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
}

impl Entry {
    pub fn new(
        principal: &Principal,
        forwarded_by: Option<String>,
        method: &Method,
        path: &str,
        query: Option<&str>,
        status: StatusCode,
        request: Option<Value>,
    ) -> Self {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let outcome = if status.is_success() {
            "success"
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            "denied"
        } else {
            "failure"
        };
        Self {
            time: rfc3339_millis(timestamp_ms),
            timestamp_ms,
            worker: String::new(),
            principal: principal.name.clone(),
            role: principal.role.as_str(),
            auth: principal.via.clone(),
            peer: principal.peer.clone(),
            forwarded_by,
            method: method.to_string(),
            path: match query {
                Some(query) => format!("{path}?{query}"),
                None => path.to_string(),
            },
            connector: roles::connector_of(path),
            action: roles::change(method, path).unwrap_or("change"),
            status: status.as_u16(),
            outcome,
            request,
        }
    }
}

/// Where the trail goes: the log always, the audit topic when the worker has one.
pub struct AuditLog {
    worker_id: String,
    topic: Option<(Producer, String)>,
}

impl AuditLog {
    pub fn new(worker_id: &str, topic: Option<(Producer, String)>) -> Self {
        Self {
            worker_id: worker_id.to_string(),
            topic,
        }
    }

    /// Records one entry; a record Kafka does not take is logged as an error (the change
    /// itself is made: the trail must not undo it), and the log line stays.
    pub async fn record(&self, mut entry: Entry) {
        entry.worker.clone_from(&self.worker_id);
        tracing::info!(
            target: "medconnect_runtime::audit",
            principal = %entry.principal,
            role = entry.role,
            auth = %entry.auth,
            peer = entry.peer.as_deref().unwrap_or("unknown"),
            forwarded_by = entry.forwarded_by.as_deref().unwrap_or(""),
            method = %entry.method,
            path = %entry.path,
            connector = entry.connector.as_deref().unwrap_or(""),
            action = entry.action,
            status = entry.status,
            outcome = entry.outcome,
            "audit"
        );
        let Some((producer, topic)) = &self.topic else {
            return;
        };
        let value = match serde_json::to_vec(&entry) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%error, "cannot encode an audit record");
                return;
            }
        };
        let key = entry
            .connector
            .clone()
            .unwrap_or_else(|| entry.path.clone());
        let record = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .timestamp(entry.timestamp_ms);
        if let Err(error) = producer.send(record, DELIVERY_TIMEOUT).await {
            tracing::error!(%error, topic, action = entry.action, path = %entry.path, "the audit record of a change was not written to the audit topic");
        }
    }
}

/// The middleware, innermost (after forwarding): records each change this worker executes.
pub async fn record_changes(
    State(state): State<RestState>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let Some(action) = roles::change(&method, &path) else {
        return next.run(request).await;
    };
    let principal = request.extensions().get::<Principal>().cloned();
    // The leader restarting a task on the worker that runs it: part of a connector restart
    // the leader recorded.
    if principal.as_ref().is_some_and(Principal::is_worker) {
        return next.run(request).await;
    }
    let principal = principal.unwrap_or_else(|| Principal {
        name: "anonymous".into(),
        role: roles::Role::Admin,
        via: "none".into(),
        peer: super::auth::peer_of(&request),
    });
    let forwarded_by = request
        .extensions()
        .get::<ForwardedBy>()
        .map(|f| f.0.clone());
    let query = request.uri().query().map(str::to_string);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body larger than {MAX_BODY_BYTES} bytes"),
            )
            .into_response();
        }
    };
    let shown = shown_request(&state.herder, action, &body);
    // A create names its connector in the body, not the path.
    let created = shown
        .as_ref()
        .and_then(|shown| shown.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    let mut entry = Entry::new(
        &principal,
        forwarded_by,
        &method,
        &path,
        query.as_deref(),
        response.status(),
        shown,
    );
    if entry.connector.is_none() {
        entry.connector = created;
    }
    state.audit.record(entry).await;
    response
}

/// What of a request body the trail keeps: a connector config with its secrets hidden, or a
/// logger level; nothing else (offsets are positions, not worth a copy).
fn shown_request(herder: &Herder, action: &str, body: &[u8]) -> Option<Value> {
    let value: Value = serde_json::from_slice(body).ok()?;
    match action {
        "create" => {
            let mut shown = Map::new();
            if let Some(name) = value.get("name") {
                shown.insert("name".into(), name.clone());
            }
            shown.insert(
                "config".into(),
                hidden_secrets(herder, value.get("config")?),
            );
            Some(Value::Object(shown))
        }
        "put-config" | "patch-config" => Some(hidden_secrets(herder, &value)),
        "set-logger-level" => value
            .get("level")
            .map(|level| serde_json::json!({"level": level})),
        _ => None,
    }
}

/// A config object with every secret hidden: what the connector declares as a password, what
/// `connector_config::redact` hides by name, and anything named like a key. A value that is
/// not a string is hidden when its name says secret too.
pub fn hidden_secrets(herder: &Herder, config: &Value) -> Value {
    let Some(object) = config.as_object() else {
        return Value::String(HIDDEN.into());
    };
    let def = object
        .get(cc::CLASS)
        .and_then(Value::as_str)
        .and_then(|class| herder.plugins().find(class))
        .map_or_else(ConfigDef::new, |plugin| cc::full_def(&plugin));
    let props: Props = object
        .iter()
        .map(|(k, v)| {
            let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            (k.clone(), text)
        })
        .collect();
    let redacted = cc::redact(&def, &props);
    Value::Object(
        object
            .iter()
            .map(|(k, v)| {
                let hidden = redacted
                    .get(k)
                    .is_some_and(|r| r == HIDDEN && props.get(k) != Some(r))
                    || looks_like_key(k);
                let shown = if hidden {
                    Value::String(HIDDEN.into())
                } else {
                    v.clone()
                };
                (k.clone(), shown)
            })
            .collect(),
    )
}

/// `ssl.key`, `api_key`, `private.key`, `tls.key.password`: named like key material. Not
/// `key.converter` or `key.ignore` (settings about a record's key).
fn looks_like_key(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with("key") && lower != "key"
        || lower.contains("private")
        || lower.contains("passphrase")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_is_named_like_it() {
        assert!(looks_like_key("ssl.key"));
        assert!(looks_like_key("api_key"));
        assert!(looks_like_key("mllp.tls.private.key.file"));
        assert!(!looks_like_key("key.converter"));
        assert!(!looks_like_key("key"));
        assert!(!looks_like_key("topic"));
    }
}
