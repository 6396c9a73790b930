//! Calls between workers on behalf of connectors ([`medconnect_api::relay`]): a task calls a
//! handler another worker's task registered, through `POST /internal/relay/{channel}` on that
//! worker's REST API.
//!
//! The request is signed with the generation's session key like a forwarded request
//! ([`super::forward`]), as the worker itself: the receiver answers only a request whose
//! signature it verified and that a worker made for itself, so no REST caller, whatever its
//! role, can reach a handler (one hands commands to medical devices).

use std::time::Duration;

use async_trait::async_trait;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use medconnect_api::relay::{self, Peers, RelayError};
use tokio::sync::watch;

use super::ApiError;
use super::auth::{ForwardedBy, Principal};
use super::forward::signed_request;
use crate::worker::cluster::ClusterView;
use crate::worker::connector_name::path_segment;

/// The route's path, before the channel (one path segment: a channel may hold '/', as a
/// connector name may).
const PREFIX: &str = "/internal/relay/";

/// `POST /internal/relay/{channel}`: the channel's handler answers the calling worker.
pub async fn answer(
    Path(channel): Path<String>,
    forwarded_by: Option<Extension<ForwardedBy>>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> Response {
    let from_a_worker = forwarded_by.is_some()
        && principal.is_some_and(|Extension(principal)| principal.is_worker());
    if !from_a_worker {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "Only another worker of the cluster may call a relay channel",
        )
        .into_response();
    }
    let Some(handler) = relay::handler(&channel) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No handler for relay channel '{channel}' on this worker"),
        )
        .into_response();
    };
    match handler.handle(body).await {
        Ok(answer) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], answer).into_response()
        }
        Err(reason) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason).into_response(),
    }
}

/// The other workers as this worker's cluster membership sees them.
#[derive(Debug)]
pub struct ClusterPeers {
    me: String,
    cluster: watch::Receiver<ClusterView>,
    client: reqwest::Client,
}

impl ClusterPeers {
    pub fn new(me: String, cluster: watch::Receiver<ClusterView>, client: reqwest::Client) -> Self {
        Self {
            me,
            cluster,
            client,
        }
    }
}

#[async_trait]
impl Peers for ClusterPeers {
    fn others(&self) -> Vec<String> {
        let view = self.cluster.borrow();
        if view.generation.is_none() {
            return Vec::new();
        }
        view.members
            .iter()
            .filter(|(id, _)| *id != self.me)
            .map(|(id, _)| id.clone())
            .collect()
    }

    async fn call(
        &self,
        peer: &str,
        channel: &str,
        request: bytes::Bytes,
        timeout: Duration,
    ) -> Result<bytes::Bytes, RelayError> {
        let (url, key) = {
            let view = self.cluster.borrow();
            let url = view
                .members
                .iter()
                .find(|(id, _)| id == peer && *id != self.me)
                .map(|(_, url)| url.clone());
            match (url, view.generation) {
                (Some(url), Some(_)) => (url, view.session_key.clone()),
                _ => return Err(RelayError::NotAMember(peer.to_string())),
            }
        };
        let path = format!("{PREFIX}{}", path_segment(channel));
        let unreachable = |reason: String| RelayError::Unreachable {
            peer: peer.to_string(),
            reason,
        };
        let answer = signed_request(
            &self.client,
            &key,
            &self.me,
            reqwest::Method::POST,
            &url,
            &path,
            &Principal::worker(&self.me),
            request,
        )
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        let status = answer.status();
        let body = answer
            .bytes()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if status.is_success() {
            return Ok(body);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(RelayError::NoHandler {
                peer: peer.to_string(),
                channel: channel.to_string(),
            });
        }
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| status.to_string());
        Err(RelayError::Refused {
            peer: peer.to_string(),
            reason: message,
        })
    }
}
