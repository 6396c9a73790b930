//! The Minimal Lower Layer Protocol: framing and transport (plain TCP or TLS).

pub mod client;
pub mod codec;

use tokio::io::{AsyncRead, AsyncWrite};

pub use client::{ClientError, MllpClient};
pub use codec::{MllpCodec, MllpError};

/// A byte stream MLLP runs over: a TCP stream, or TLS over one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

pub type BoxedStream = Box<dyn Stream>;
