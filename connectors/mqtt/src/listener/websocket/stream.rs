//! A WebSocket connection as the byte stream MQTT expects: binary frames' payloads in, in
//! order, as one stream (an MQTT packet may span frames and a frame may hold several
//! packets, as MQTT over WebSocket allows); each write out as one binary frame.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::CapacityError};

use super::metered::Metered;

/// Why the WebSocket layer ended a connection (inside an `io::Error`).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// A frame or message over the limit, refused from its header: the packet in it would be
    /// over `mqtt.max.packet.bytes`.
    #[error("a WebSocket frame of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("a text frame (MQTT over WebSocket is binary)")]
    Text,
    #[error("WebSocket: {0}")]
    Protocol(WsError),
}

/// The bytes of a masked client frame's header for a payload of `len` bytes (the frames of
/// a fragmented message have more: the rest stays counted until the connection closes, which
/// errs on the safe side).
fn header_len(len: usize) -> usize {
    let extended = match len {
        0..=125 => 0,
        126..=65_535 => 2,
        _ => 8,
    };
    2 + extended + 4
}

fn io_error(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => io::Error::new(
            io::ErrorKind::InvalidData,
            FrameError::TooLarge {
                size,
                max: max_size,
            },
        ),
        other => io::Error::new(io::ErrorKind::InvalidData, FrameError::Protocol(other)),
    }
}

/// Borrows the metered connection, so the upgrade can still answer on it when it fails.
pub struct WsStream<'a, S> {
    ws: WebSocketStream<&'a mut Metered<S>>,
    /// What is left of the last binary frame's payload.
    current: Bytes,
    /// The peer closed (a Close frame or the end of the connection).
    ended: bool,
}

impl<'a, S> WsStream<'a, S> {
    pub fn new(ws: WebSocketStream<&'a mut Metered<S>>) -> Self {
        Self {
            ws,
            current: Bytes::new(),
            ended: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.current.is_empty() {
                let count = this.current.len().min(buf.remaining());
                buf.put_slice(&this.current[..count]);
                this.current.advance(count);
                this.ws.get_mut().retire(count);
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            let message = match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(message)) => message,
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    this.ended = true;
                    continue;
                }
                Some(Err(error)) => return Poll::Ready(Err(io_error(error))),
            };
            match message {
                Message::Binary(payload) => {
                    this.ws.get_mut().retire(header_len(payload.len()));
                    this.current = payload;
                }
                // tungstenite answers pings itself.
                Message::Ping(payload) | Message::Pong(payload) => {
                    this.ws
                        .get_mut()
                        .retire(payload.len() + header_len(payload.len()));
                }
                Message::Close(_) => this.ended = true,
                Message::Text(_) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        FrameError::Text,
                    )));
                }
                // Never returned by a read.
                Message::Frame(_) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    /// A Close frame, then the connection's own shutdown (TLS close_notify, TCP FIN).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
            Err(error) => return Poll::Ready(Err(io_error(error))),
        }
        Pin::new(&mut **this.ws.get_mut()).poll_shutdown(cx)
    }
}
