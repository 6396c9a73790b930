//! An MLLP sender: one connection, one message at a time, each answered by one ACK frame.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Decoder;

use super::{BoxedStream, MllpCodec, MllpError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer did not take the message (it stopped reading: its receive buffer and ours are
    /// full). The connection is unusable: part of a frame may have been written.
    #[error("the peer did not take the message within {0:?}")]
    WriteTimeout(Duration),
    #[error("the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Frame(#[from] MllpError),
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        Self::Frame(MllpError::Io(error))
    }
}

pub struct MllpClient {
    stream: BoxedStream,
    codec: MllpCodec,
    buffer: BytesMut,
}

impl MllpClient {
    /// Connects (and completes the TLS handshake when `tls` is given) within `timeout`.
    pub async fn connect(
        host: &str,
        port: u16,
        timeout: Duration,
        tls: Option<(&TlsConnector, ServerName<'static>)>,
        max_frame: usize,
    ) -> Result<Self, ClientError> {
        let address = format!("{host}:{port}");
        let failed = |reason: String| ClientError::Connect {
            address: address.clone(),
            reason,
        };
        let connect = async {
            let tcp = TcpStream::connect((host, port))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let stream: BoxedStream = match tls {
                Some((connector, name)) => Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| failed(format!("TLS: {e}")))?,
                ),
                None => Box::new(tcp),
            };
            Ok::<_, ClientError>(stream)
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| failed(format!("timed out after {timeout:?}")))??;
        Ok(Self {
            stream,
            codec: MllpCodec::new(max_frame),
            buffer: BytesMut::new(),
        })
    }

    /// Sends one framed message within `timeout`: a peer that stops reading cannot hold the
    /// sender for ever once the socket buffers are full.
    pub async fn send(&mut self, payload: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let framed = MllpCodec::frame(payload);
        self.write_within(&framed, timeout).await
    }

    async fn write_within(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| ClientError::WriteTimeout(timeout))??;
        Ok(())
    }

    /// The next frame from the peer.
    pub async fn receive(&mut self, timeout: Duration) -> Result<Bytes, ClientError> {
        let read = async {
            loop {
                if let Some(frame) = self.codec.decode(&mut self.buffer)? {
                    return Ok(frame);
                }
                self.buffer.reserve(4096);
                if self.stream.read_buf(&mut self.buffer).await? == 0 {
                    return Err(ClientError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Sends a message and waits for its answer: `timeout` bounds the whole exchange, the
    /// write as much as the wait for the ACK.
    pub async fn request(
        &mut self,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        let started = tokio::time::Instant::now();
        self.send(payload, timeout).await?;
        let left = timeout.saturating_sub(started.elapsed());
        self.receive(left).await.map_err(|error| match error {
            // Reported against the whole exchange's budget.
            ClientError::Timeout(_) => ClientError::Timeout(timeout),
            other => other,
        })
    }

    /// Writes raw bytes, unframed, within `timeout` (for tests of framing errors).
    pub async fn send_raw(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        self.write_within(bytes, timeout).await
    }
}
