//! Errors a connector or transform reports to the engine.
//!
//! The variant decides what the engine does: `Retriable` is retried with backoff within
//! `errors.retry.timeout`; `Data` concerns one record and goes to the dead-letter topic when
//! `errors.tolerance=all`; `Config` and `Fatal` fail the task. Each keeps the error that caused
//! it (for logs and `source()` chains) and a retriable one may say when to try again (HTTP
//! `Retry-After`, an MQTT server's "busy").

use std::error::Error as StdError;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

pub type ConnectResult<T> = Result<T, ConnectError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// A transient failure (peer unreachable, timeout): the same call may succeed later.
    Retriable(Detail),
    /// One record cannot be processed (malformed payload, rejected by the target).
    Data(Detail),
    /// A setting is missing or invalid.
    Config { field: String, reason: String },
    /// The task cannot go on.
    Fatal(Detail),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retriable(detail) => write!(f, "retriable: {detail}"),
            Self::Data(detail) => write!(f, "bad record: {detail}"),
            Self::Config { field, reason } => {
                write!(f, "invalid value for configuration {field}: {reason}")
            }
            Self::Fatal(detail) => write!(f, "{detail}"),
        }
    }
}

/// `source()` is the error this one was made from (`caused_by`), if it kept one.
impl StdError for ConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Retriable(detail) | Self::Data(detail) | Self::Fatal(detail) => detail
                .cause
                .as_deref()
                .map(|cause| cause as &(dyn StdError + 'static)),
            Self::Config { .. } => None,
        }
    }
}

/// What an error says, and what caused it. Reads as its message (`Deref<Target = str>`).
#[derive(Clone)]
pub struct Detail {
    message: String,
    retry_after: Option<Duration>,
    /// Shared so that errors stay `Clone`; not part of equality.
    cause: Option<Arc<dyn StdError + Send + Sync>>,
    /// What the peer said, kept apart from the message: see [`PeerText`]. Boxed: rare, and
    /// errors travel in `Result`s on the hot path.
    peer_text: Option<Box<PeerText>>,
}

/// Free text a peer sent with a refusal (an HL7 ACK's MSA-3 / ERR, a FHIR OperationOutcome's
/// diagnostics). It may quote the record, so it may hold patient data: it is never part of an
/// error's `Display` or `Debug` (status traces, logs, REST answers). The engine adds it to the
/// dead-letter record as the header `header`, and to error logs, only when the connector's
/// config consents (`errors.log.include.messages=true`).
#[derive(Clone, PartialEq, Eq)]
pub struct PeerText {
    header: &'static str,
    text: String,
}

impl PeerText {
    /// The dead-letter header that carries the text (`hl7.ack.text`, `fhir.outcome.diagnostics`).
    pub fn header(&self) -> &'static str {
        self.header
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Says how long the text is, never what it says.
impl fmt::Debug for PeerText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerText({}: {} bytes)", self.header, self.text.len())
    }
}

impl Detail {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry_after: None,
            cause: None,
            peer_text: None,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl Deref for Detail {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Detail");
        debug.field("message", &self.message);
        if let Some(after) = self.retry_after {
            debug.field("retry_after", &after);
        }
        if let Some(cause) = &self.cause {
            debug.field("cause", cause);
        }
        if let Some(peer_text) = &self.peer_text {
            debug.field("peer_text", peer_text);
        }
        debug.finish()
    }
}

impl PartialEq for Detail {
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.retry_after == other.retry_after
    }
}

impl Eq for Detail {}

impl ConnectError {
    pub fn retriable(message: impl Into<String>) -> Self {
        Self::Retriable(Detail::new(message))
    }

    pub fn data(message: impl Into<String>) -> Self {
        Self::Data(Detail::new(message))
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal(Detail::new(message))
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Keeps the error this one was made from, for logs and `source()` chains.
    pub fn caused_by(mut self, cause: impl StdError + Send + Sync + 'static) -> Self {
        if let Some(detail) = self.detail_mut() {
            detail.cause = Some(Arc::new(cause));
        }
        self
    }

    /// The peer asked to be left alone this long (HTTP 429/503 `Retry-After`, MQTT "server
    /// busy"); the engine waits at least this long before the next attempt. Meaningful on a
    /// retriable error only.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        if let Self::Retriable(detail) = &mut self {
            detail.retry_after = Some(after);
        }
        self
    }

    /// Keeps what the peer said apart from the message (see [`PeerText`]); an empty text is
    /// not kept. Meaningless on a config error, which has no peer.
    pub fn with_peer_text(mut self, header: &'static str, text: impl Into<String>) -> Self {
        let text = text.into();
        if let Some(detail) = self.detail_mut().filter(|_| !text.is_empty()) {
            detail.peer_text = Some(Box::new(PeerText { header, text }));
        }
        self
    }

    /// The same error with its message (a config error's reason) rewritten, everything else
    /// kept: how the engine takes values it must not show out of a connector's error.
    pub fn map_message(mut self, rewrite: impl FnOnce(&str) -> String) -> Self {
        match &mut self {
            Self::Config { reason, .. } => *reason = rewrite(reason),
            Self::Retriable(detail) | Self::Data(detail) | Self::Fatal(detail) => {
                detail.message = rewrite(&detail.message);
            }
        }
        self
    }

    /// What the peer said, if the error kept it: only for a dead-letter header or a log line
    /// the connector's config consents to.
    pub fn peer_text(&self) -> Option<&PeerText> {
        match self {
            Self::Retriable(detail) | Self::Data(detail) | Self::Fatal(detail) => {
                detail.peer_text.as_deref()
            }
            Self::Config { .. } => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Retriable(detail) => detail.retry_after,
            _ => None,
        }
    }

    fn detail_mut(&mut self) -> Option<&mut Detail> {
        match self {
            Self::Retriable(detail) | Self::Data(detail) | Self::Fatal(detail) => Some(detail),
            Self::Config { .. } => None,
        }
    }

    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Retriable(_))
    }

    /// Whether this error concerns a single record, so tolerating it skips only that record.
    pub fn is_record_error(&self) -> bool {
        matches!(self, Self::Data(_))
    }

    /// A short class name used in the `__connect.errors.exception.class.name` header.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Retriable(_) => "RetriableException",
            Self::Data(_) => "DataException",
            Self::Config { .. } => "ConfigException",
            Self::Fatal(_) => "ConnectException",
        }
    }
}

impl From<std::io::Error> for ConnectError {
    /// I/O failures that a later attempt may not meet are retriable: the peer unreachable,
    /// reset or gone mid-message (EOF), a port still held by a previous run.
    fn from(error: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let message = error.to_string();
        let kind = match error.kind() {
            Interrupted | WouldBlock | TimedOut | ConnectionRefused | ConnectionReset
            | ConnectionAborted | NotConnected | BrokenPipe | UnexpectedEof | HostUnreachable
            | NetworkUnreachable | NetworkDown | AddrInUse | AddrNotAvailable | ResourceBusy => {
                Self::retriable(message)
            }
            _ => Self::fatal(message),
        };
        kind.caused_by(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_io_errors_are_retriable_and_keep_their_cause() {
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::HostUnreachable,
            std::io::ErrorKind::NetworkUnreachable,
            std::io::ErrorKind::AddrInUse,
            std::io::ErrorKind::ConnectionReset,
        ] {
            let error = ConnectError::from(std::io::Error::new(kind, "peer went away"));
            assert!(error.is_retriable(), "{kind:?} is retriable");
            let source = StdError::source(&error).map(ToString::to_string);
            assert_eq!(source.as_deref(), Some("peer went away"), "{kind:?}");
        }
        let denied = ConnectError::from(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(!denied.is_retriable());
    }

    #[test]
    fn peer_text_stays_out_of_display_and_debug() {
        let error = ConnectError::data("the receiver answered AE")
            .with_peer_text("hl7.ack.text", "Patient John Doe DOB 19700101 unknown");
        for shown in [
            error.to_string(),
            format!("{error:?}"),
            format!("{error:#?}"),
        ] {
            assert!(!shown.contains("John Doe"), "{shown}");
        }
        let peer = error.peer_text().expect("kept");
        assert_eq!(
            (peer.header(), peer.text()),
            ("hl7.ack.text", "Patient John Doe DOB 19700101 unknown")
        );
        assert!(
            ConnectError::data("x")
                .with_peer_text("h", "")
                .peer_text()
                .is_none()
        );
    }

    #[test]
    fn a_retry_after_hint_belongs_to_retriable_errors() {
        let busy = ConnectError::retriable("429 Too Many Requests")
            .with_retry_after(Duration::from_secs(3));
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(busy.to_string(), "retriable: 429 Too Many Requests");
        let bad = ConnectError::data("400").with_retry_after(Duration::from_secs(3));
        assert_eq!(bad.retry_after(), None);
    }
}
