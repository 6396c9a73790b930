//! Errors a connector or transform reports to the engine.
//!
//! The variant decides what the engine does: `Retriable` is retried with backoff within
//! `errors.retry.timeout`; `Data` concerns one record and goes to the dead-letter topic when
//! `errors.tolerance=all`; `Config` and `Fatal` fail the task.

use thiserror::Error;

pub type ConnectResult<T> = Result<T, ConnectError>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// A transient failure (peer unreachable, timeout): the same call may succeed later.
    #[error("retriable: {0}")]
    Retriable(String),
    /// One record cannot be processed (malformed payload, rejected by the target).
    #[error("bad record: {0}")]
    Data(String),
    /// A setting is missing or invalid.
    #[error("invalid value for configuration {field}: {reason}")]
    Config { field: String, reason: String },
    /// The task cannot go on.
    #[error("{0}")]
    Fatal(String),
}

impl ConnectError {
    pub fn retriable(message: impl Into<String>) -> Self {
        Self::Retriable(message.into())
    }

    pub fn data(message: impl Into<String>) -> Self {
        Self::Data(message.into())
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::Fatal(message.into())
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
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
    fn from(error: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match error.kind() {
            Interrupted | WouldBlock | TimedOut | ConnectionRefused | ConnectionReset
            | ConnectionAborted | NotConnected | BrokenPipe => Self::Retriable(error.to_string()),
            _ => Self::Fatal(error.to_string()),
        }
    }
}
