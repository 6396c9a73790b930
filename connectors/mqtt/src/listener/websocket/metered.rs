//! The raw connection under the WebSocket layer, metered against the listener's byte budget:
//! what tungstenite reads (the upgrade request, then frames) is taken from the budget before
//! it is read, as the MQTT connection does for its own reads, and given back as the frames'
//! payloads move on to the MQTT connection. So a WebSocket connection holds no unbudgeted
//! bytes beyond a plain one, however its frames are cut.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use medconnect_api::limits::{ByteBudget, Reservation};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::config::READ_CHUNK;

/// Why a read under the WebSocket layer was refused (carried inside an `io::Error`, so the
/// upgrade can answer with the right status).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the upgrade request is longer than {0} bytes")]
    RequestTooLarge(usize),
    #[error("no room in the listener's byte budget for the upgrade request")]
    NoRoom,
}

pub struct Metered<S> {
    inner: S,
    budget: Arc<ByteBudget>,
    reservation: Reservation,
    /// Bytes read and not yet passed on (in tungstenite's buffers, or a frame's payload the
    /// MQTT connection has not taken yet).
    held: usize,
    /// During the upgrade: how many more bytes the request may have. `None` once upgraded.
    request_left: Option<usize>,
    request_max: usize,
    /// Waiting for room in the budget (after the upgrade only; a new connection is turned
    /// away instead, as before its CONNECT).
    room: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S> Metered<S> {
    /// A connection about to be upgraded: its request may be `request_max` bytes at most.
    pub fn new(inner: S, budget: Arc<ByteBudget>, request_max: usize) -> Self {
        Self {
            inner,
            reservation: Reservation::new(budget.clone()),
            budget,
            held: 0,
            request_left: Some(request_max),
            request_max,
            room: None,
        }
    }

    /// The upgrade is done: its request (all that was read — tungstenite refuses bytes after
    /// it) is gone, and from now on reads wait for room instead of failing.
    pub fn upgraded(&mut self) {
        self.request_left = None;
        self.retire(self.held);
    }

    /// `bytes` read earlier have left the WebSocket layer (passed on, or frame headers).
    pub fn retire(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
        self.reservation.shrink_to(self.held);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut want = READ_CHUNK.min(buf.remaining());
        if let Some(left) = this.request_left {
            if left == 0 {
                let max = this.request_max;
                return Poll::Ready(Err(io::Error::other(Refused::RequestTooLarge(max))));
            }
            want = want.min(left);
        }
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        // Room first, as the MQTT connection takes it for its own reads.
        while !this.reservation.resize_to(this.held + want) {
            if this.request_left.is_some() {
                return Poll::Ready(Err(io::Error::other(Refused::NoRoom)));
            }
            let budget = this.budget.clone();
            let room = this
                .room
                .get_or_insert_with(|| Box::pin(async move { budget.wait_for_room(want).await }));
            ready!(room.as_mut().poll(cx));
            this.room = None;
        }
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
        let read = Pin::new(&mut this.inner).poll_read(cx, &mut part);
        let count = part.filled().len();
        buf.advance(count);
        this.held += count;
        this.reservation.shrink_to(this.held);
        if let Some(left) = &mut this.request_left {
            *left -= count;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_request_is_bounded_and_budgeted_and_given_back_once_upgraded() {
        let budget = ByteBudget::new(1 << 20);
        let (mut peer, near) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(near, budget.clone(), 100);
        peer.write_all(&[b'x'; 150]).await.unwrap();
        let mut read = vec![0u8; 1024];
        assert_eq!(metered.read(&mut read).await.unwrap(), 100);
        assert_eq!(budget.used(), 100);
        let refused = metered.read(&mut read).await.unwrap_err();
        assert!(matches!(
            refused.get_ref().and_then(|e| e.downcast_ref::<Refused>()),
            Some(Refused::RequestTooLarge(100))
        ));
        metered.upgraded();
        assert_eq!(budget.used(), 0);
        assert_eq!(metered.read(&mut read).await.unwrap(), 50);
        assert_eq!(budget.used(), 50);
        metered.retire(20);
        assert_eq!(budget.used(), 30);
        drop(metered);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn without_room_the_request_is_refused_and_frames_wait() {
        let budget = ByteBudget::new(65_536);
        let mut hog = Reservation::new(budget.clone());
        assert!(hog.grow(65_536));
        let (mut peer, near) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(near, budget.clone(), 8192);
        peer.write_all(b"GET").await.unwrap();
        let mut read = [0u8; 16];
        let refused = metered.read(&mut read).await.unwrap_err();
        assert!(matches!(
            refused.get_ref().and_then(|e| e.downcast_ref::<Refused>()),
            Some(Refused::NoRoom)
        ));
        metered.upgraded();
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            metered.read(&mut read),
        )
        .await;
        assert!(waiting.is_err(), "read without room");
        drop(hog);
        assert_eq!(metered.read(&mut read).await.unwrap(), 3);
    }
}
