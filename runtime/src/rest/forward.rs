//! Writes go through the cluster's leader, as in Connect: any worker takes a request, and one
//! that changes connectors (create, config, delete, pause/resume/stop, restart, offsets) is
//! sent on to the leader, whose herder serialises every change. Two workers creating the same
//! connector at once would otherwise both find the name free.
//!
//! No leader known (the worker has not joined, or a rebalance is under way): 409, as Connect
//! answers during a rebalance. A request already forwarded is never forwarded again: if its
//! receiver is no longer the leader, it answers 409 too.
//!
//! The forwarding worker authenticates and authorises the caller itself and sends the caller
//! (its [`Principal`]) in a header the signature covers, not the caller's credentials: the
//! receiver trusts a principal only from a request whose signature it verified, and ignores
//! the header on any other request.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{ForwardedBy, Principal};
use super::signature::{SIGNATURE, SessionKey};
use super::{ApiError, MAX_BODY_BYTES, RestState};

/// Marks a request one worker forwarded to another (its value: the forwarding worker's id).
pub const FORWARDED_BY: &str = "x-medconnect-forwarded-by";
/// The caller the forwarding worker authenticated, as JSON (signed with the request).
pub const PRINCIPAL: &str = "x-medconnect-principal";

const REBALANCING: &str = "Cannot complete request momentarily due to no known leader URL, likely because a rebalance is underway";

/// Whether the request changes connectors: what the leader must do.
fn is_serialised_write(method: &Method, path: &str) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && (path == "/connectors" || path.starts_with("/connectors/"))
}

/// The middleware before authentication: a request that says another worker forwarded it must
/// prove it with the session key, and then carries its caller; any other request's principal
/// header is dropped (a caller cannot name itself).
pub async fn verify(State(state): State<RestState>, mut request: Request, next: Next) -> Response {
    if !request.headers().contains_key(FORWARDED_BY) {
        request.headers_mut().remove(PRINCIPAL);
        return next.run(request).await;
    }
    match verified(&state, request).await {
        Ok(request) => next.run(request).await,
        Err(response) => response,
    }
}

pub async fn to_leader(State(state): State<RestState>, request: Request, next: Next) -> Response {
    if !is_serialised_write(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    // A task restarts where it runs.
    if let Some((name, task)) = task_restart(request.uri().path()) {
        return match owner_url(&state, &name, task).await {
            Some(url) if !request.headers().contains_key(FORWARDED_BY) => {
                forward(&state, &url, request)
                    .await
                    .unwrap_or_else(|message| unanswered(&url, &message))
            }
            _ => next.run(request).await,
        };
    }
    let view = state.cluster.borrow().clone();
    if view.is_leader && view.generation.is_some() {
        return next.run(request).await;
    }
    let leader = match (&view.leader_url, view.generation) {
        (Some(url), Some(_)) if !request.headers().contains_key(FORWARDED_BY) => url.clone(),
        _ => return ApiError::new(StatusCode::CONFLICT, REBALANCING).into_response(),
    };
    forward(&state, &leader, request)
        .await
        .unwrap_or_else(|message| unanswered(&leader, &message))
}

fn unanswered(url: &str, message: &str) -> Response {
    tracing::warn!(worker = %url, reason = %message, "cannot forward a request to another worker");
    ApiError::new(
        StatusCode::CONFLICT,
        format!("Cannot complete request: the worker at {url} did not answer ({message})"),
    )
    .into_response()
}

/// `/connectors/{name}/tasks/{task}/restart` -> (name, task).
fn task_restart(path: &str) -> Option<(String, u32)> {
    let rest = path
        .strip_prefix("/connectors/")?
        .strip_suffix("/restart")?;
    let (name, task) = rest.rsplit_once("/tasks/")?;
    Some((name.to_string(), task.parse().ok()?))
}

/// The REST URL of the other worker that runs the task, if another one does. Read from the
/// statuses as they are now: one written just before (the task started elsewhere a moment
/// ago) would otherwise make this worker restart a task it does not run, a silent no-op.
async fn owner_url(state: &RestState, connector: &str, task: u32) -> Option<String> {
    let owner = state.herder.task_owner(connector, task).await?;
    if owner == state.herder.worker_id() {
        return None;
    }
    let view = state.cluster.borrow();
    view.members
        .iter()
        .find(|(worker, _)| *worker == owner)
        .map(|(_, url)| url.clone())
}

/// Asks the worker running a task to restart it (a connector restart with its tasks, on the
/// leader, restarts the tasks that run elsewhere this way). `Ok(false)`: it runs here.
pub async fn restart_elsewhere(
    state: &RestState,
    connector: &str,
    task: u32,
) -> Result<bool, String> {
    let Some(url) = owner_url(state, connector, task).await else {
        return Ok(false);
    };
    let path = format!("/connectors/{connector}/tasks/{task}/restart");
    let me = Principal::worker(state.herder.worker_id());
    let answer = signed(
        state,
        reqwest::Method::POST,
        &url,
        &path,
        &me,
        Default::default(),
    )
    .send()
    .await
    .map_err(|e| e.to_string())?;
    if answer.status().is_success() {
        Ok(true)
    } else {
        Err(format!("{url} answered {}", answer.status()))
    }
}

/// Checks a forwarded request's signature; the request (its body read and put back, its
/// forwarding worker and caller in its extensions) or 403.
async fn verified(state: &RestState, request: Request) -> Result<Request, Response> {
    let refused = |why: &str| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("Request signature invalid: {why}"),
        )
        .into_response()
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| refused("unreadable body"))?;
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let key = state.cluster.borrow().session_key.clone();
    let forwarded_by = header(FORWARDED_BY);
    let principal_header = header(PRINCIPAL);
    if !key.verify(
        parts.method.as_str(),
        path,
        &forwarded_by,
        &principal_header,
        &body,
        &header(SIGNATURE),
    ) {
        tracing::warn!(path, forwarded_by = %forwarded_by, "refused a forwarded request without a valid signature");
        return Err(refused(
            "a request forwarded by another worker must be signed with the cluster's current session key",
        ));
    }
    let principal: Principal = serde_json::from_str(&principal_header)
        .map_err(|_| refused("a forwarded request must name its caller"))?;
    let mut request = Request::from_parts(parts, Body::from(body));
    request.extensions_mut().insert(principal);
    request.extensions_mut().insert(ForwardedBy(forwarded_by));
    Ok(request)
}

/// A request to another worker at `base` (its REST URL), marked as forwarded by this worker
/// for `principal` and signed with the generation's session key.
fn signed(
    state: &RestState,
    method: reqwest::Method,
    base: &str,
    path: &str,
    principal: &Principal,
    body: bytes::Bytes,
) -> reqwest::RequestBuilder {
    let key = state.cluster.borrow().session_key.clone();
    signed_request(
        &state.forwarder,
        &key,
        state.herder.worker_id(),
        method,
        base,
        path,
        principal,
        body,
    )
}

/// A request from worker `me` to the worker at `base`, for `principal`, signed with `key`.
#[allow(clippy::too_many_arguments)] // the parts of one signed request, all needed
pub fn signed_request(
    client: &reqwest::Client,
    key: &SessionKey,
    me: &str,
    method: reqwest::Method,
    base: &str,
    path: &str,
    principal: &Principal,
    body: bytes::Bytes,
) -> reqwest::RequestBuilder {
    let principal = serde_json::to_string(principal).unwrap_or_default();
    let signature = key.sign(method.as_str(), path, me, &principal, &body);
    client
        .request(method, format!("{}{path}", base.trim_end_matches('/')))
        .header(FORWARDED_BY, me)
        .header(PRINCIPAL, principal)
        .header(SIGNATURE, signature)
        .body(body)
}

async fn forward(state: &RestState, leader: &str, request: Request) -> Result<Response, String> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| format!("cannot read the request body: {e}"))?;
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let method =
        reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    // Authenticated here (the auth middleware runs before forwarding); the credentials stay
    // here, the principal goes, signed.
    let principal = parts
        .extensions
        .get::<Principal>()
        .cloned()
        .ok_or("the request has no authenticated caller")?;
    let mut outgoing = signed(state, method, leader, path, &principal, body);
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name)
            && let Ok(value) = value.to_str()
        {
            outgoing = outgoing.header(name.as_str(), value);
        }
    }
    let answer = outgoing.send().await.map_err(|e| e.to_string())?;
    let status = StatusCode::from_u16(answer.status().as_u16()).map_err(|e| e.to_string())?;
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let body = answer.bytes().await.map_err(|e| e.to_string())?;
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_restart_names_its_task() {
        assert_eq!(
            task_restart("/connectors/a/b/tasks/3/restart"),
            Some(("a/b".to_string(), 3))
        );
        assert_eq!(task_restart("/connectors/a/restart"), None);
        assert_eq!(task_restart("/connectors/a/tasks/x/restart"), None);
    }

    #[test]
    fn only_changes_to_connectors_are_forwarded() {
        assert!(is_serialised_write(&Method::POST, "/connectors"));
        assert!(is_serialised_write(&Method::PUT, "/connectors/a/config"));
        assert!(is_serialised_write(&Method::DELETE, "/connectors/a"));
        assert!(is_serialised_write(
            &Method::POST,
            "/connectors/a/tasks/0/restart"
        ));
        assert!(!is_serialised_write(&Method::GET, "/connectors/a/status"));
        assert!(!is_serialised_write(&Method::PUT, "/admin/loggers/root"));
        assert!(!is_serialised_write(
            &Method::PUT,
            "/connector-plugins/x/config/validate"
        ));
    }
}
