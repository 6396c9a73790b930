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

    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(&MllpCodec::frame(payload)).await?;
        self.stream.flush().await?;
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

    /// Sends a message and waits for its answer.
    pub async fn request(
        &mut self,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, ClientError> {
        self.send(payload).await?;
        self.receive(timeout).await
    }

    /// Writes raw bytes, unframed (for tests of framing errors).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}
