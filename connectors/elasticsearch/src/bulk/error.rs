//! Why a request to the cluster failed as a whole.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The CA file of `connection.tls.ca.file` cannot be read or holds no certificate.
    #[error("{0}")]
    CaFile(String),
    /// Connection refused or reset, timeout, a certificate not trusted: the request may
    /// succeed later or on another node.
    #[error("{url} unreachable: {}", causes(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// 429, 502, 503, 504 or another 5xx: the cluster is busy or recovering.
    #[error("{url} answered {status}")]
    Busy {
        url: String,
        status: u16,
        retry_after: Option<Duration>,
    },
    /// A 4xx for the whole request (bad credentials, missing privileges, a body too large):
    /// sending it again will not help.
    #[error("{url} refused the request with {status}: {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    /// An answer that is not what the API promises (not JSON, items missing).
    #[error("{url} answered something unreadable: {reason}")]
    Unreadable { url: String, reason: String },
}

/// An error with its causes (`error sending request: ...: invalid peer certificate:
/// UnknownIssuer`), which reqwest's own message leaves out; with a hint when a certificate was
/// not trusted.
fn causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if text.contains("certificate") {
        text.push_str(" (is connection.tls.ca.file the CA that signed the cluster's certificate?)");
    }
    text
}

impl BulkError {
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::Busy { .. } | Self::Unreadable { .. }
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Busy { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
