//! MQTT over WebSocket: the HTTP upgrade (bounded in size and time, answered 4xx when it is
//! not one this listener serves), then the connection as every other, on the frames' byte
//! stream. TLS (wss) is the listener's, done before the upgrade, so a device certificate
//! identifies the device here too.

mod metered;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, error::ProtocolError};

pub use stream::FrameError;

use super::Shared;
use super::config::READ_CHUNK;
use super::connection;
use metered::{Metered, Refused};
use stream::WsStream;

/// The longest upgrade request read: browsers and MQTT clients send well under 1 KiB; 8 KiB
/// leaves room for cookies and proxies' headers.
const REQUEST_MAX: usize = 8 * 1024;
/// How long writing a refusal may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The subprotocol MQTT over WebSocket names.
const SUBPROTOCOL: &str = "mqtt";

/// Why an upgrade was refused (logged; the device gets the status).
#[derive(Debug, thiserror::Error)]
enum UpgradeError {
    #[error("no upgrade request within the CONNECT timeout")]
    TimedOut,
    #[error("{0}")]
    Refused(Refused),
    #[error("answered {0}")]
    Answered(StatusCode),
    #[error("not a WebSocket upgrade: {0}")]
    NotUpgrade(WsError),
    #[error("I/O: {0}")]
    Io(std::io::Error),
}

impl UpgradeError {
    /// What to answer, unless tungstenite answered already or the connection is gone.
    fn status(&self) -> Option<StatusCode> {
        match self {
            Self::TimedOut => Some(StatusCode::REQUEST_TIMEOUT),
            Self::Refused(Refused::RequestTooLarge(_)) => {
                Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Self::Refused(Refused::NoRoom) => Some(StatusCode::SERVICE_UNAVAILABLE),
            Self::NotUpgrade(WsError::Protocol(
                ProtocolError::MissingSecWebSocketVersionHeader,
            )) => Some(StatusCode::UPGRADE_REQUIRED),
            Self::NotUpgrade(WsError::Protocol(ProtocolError::WrongHttpMethod)) => {
                Some(StatusCode::METHOD_NOT_ALLOWED)
            }
            Self::NotUpgrade(WsError::AttackAttempt) => {
                Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Self::NotUpgrade(_) => Some(StatusCode::BAD_REQUEST),
            Self::Answered(_) | Self::Io(_) => None,
        }
    }
}

impl From<WsError> for UpgradeError {
    fn from(error: WsError) -> Self {
        match error {
            WsError::Http(response) => Self::Answered(response.status()),
            WsError::Io(io) => match io.get_ref().and_then(|e| e.downcast_ref::<Refused>()) {
                Some(Refused::RequestTooLarge(max)) => {
                    Self::Refused(Refused::RequestTooLarge(*max))
                }
                Some(Refused::NoRoom) => Self::Refused(Refused::NoRoom),
                None => Self::Io(io),
            },
            other => Self::NotUpgrade(other),
        }
    }
}

/// A refusal from the upgrade's callback, sent by tungstenite.
fn refusal(status: StatusCode, reason: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(format!("{reason}\n")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(reason.len() + 1));
    response
}

/// The upgrade this listener accepts: at its path, with the `mqtt` subprotocol; anything
/// else is refused.
struct Endpoint<'a> {
    path: &'a str,
}

impl Callback for Endpoint<'_> {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        check_request(self.path, request, response)
    }
}

// The error type is tungstenite's (its callback's): a response to send.
#[allow(clippy::result_large_err)]
fn check_request(
    path: &str,
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            "no MQTT WebSocket endpoint at this path",
        ));
    }
    // MQTT over WebSocket: the client offers `mqtt`, the server selects it.
    let offers_mqtt = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == SUBPROTOCOL);
    if !offers_mqtt {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol mqtt is required",
        ));
    }
    response.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(response)
}

/// Frames hold MQTT packets, so none need be larger than the largest packet; tungstenite
/// refuses a larger one from its header. Buffers stay small: one read at a time, writes
/// sent at once (the connection writes all answers of a wake in one go).
fn websocket_config(max_packet_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_CHUNK)
        .write_buffer_size(0)
        .max_frame_size(Some(max_packet_bytes))
        .max_message_size(Some(max_packet_bytes))
}

/// Writes a refusal the upgrade's callback did not (a request that is no upgrade at all).
async fn answer<S: AsyncWrite + Unpin>(stream: &mut S, status: StatusCode, reason: &str) {
    let text = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{}\r\n{reason}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        reason.len() + 1,
        if status == StatusCode::UPGRADE_REQUIRED {
            "Sec-WebSocket-Version: 13\r\n"
        } else {
            ""
        },
    );
    let write = async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, write).await;
}

/// One connection on a WebSocket listener, after TLS if any: the upgrade, then MQTT.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    certificate_cn: Option<String>,
    shared: Arc<Shared>,
    path: &str,
) {
    let mut raw = Metered::new(stream, shared.budget.clone(), REQUEST_MAX);
    let config = websocket_config(shared.config.max_packet_bytes);
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(&mut raw, Endpoint { path }, Some(config));
    let upgraded = match tokio::time::timeout(shared.config.connect_timeout, upgrade).await {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(error)) => Err(UpgradeError::from(error)),
        Err(_) => Err(UpgradeError::TimedOut),
    };
    let mut ws = match upgraded {
        Ok(ws) => ws,
        Err(error) => {
            match &error {
                UpgradeError::Refused(Refused::NoRoom) => {
                    tracing::warn!(connector = %shared.connector, %peer, budget = shared.budget.capacity(), held = shared.budget.used(), "MQTT byte budget exhausted; refusing a WebSocket upgrade");
                }
                UpgradeError::Io(_) => {
                    tracing::debug!(connector = %shared.connector, %peer, reason = %error, "MQTT WebSocket connection closed before its upgrade");
                }
                _ => {
                    tracing::warn!(connector = %shared.connector, %peer, reason = %error, "MQTT WebSocket upgrade refused");
                }
            }
            if let Some(status) = error.status() {
                answer(&mut raw, status, &error.to_string()).await;
            }
            return;
        }
    };
    ws.get_mut().upgraded();
    tracing::debug!(connector = %shared.connector, %peer, "MQTT WebSocket upgraded");
    connection::serve(WsStream::new(ws), peer, certificate_cn, shared).await;
}
