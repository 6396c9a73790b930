//! Calls between the workers of a cluster on behalf of a connector: a task on one worker asks
//! a handler another task registered on another worker (the MQTT sink asks each worker's
//! listener to hand a command to the devices connected there).
//!
//! A handler registers under a channel name in this process ([`serve`]); the engine answers
//! other workers' calls to that channel with it, and a task calls out through the [`Peers`]
//! in its context. The engine carries the bytes between workers over its REST API, signed
//! with the cluster's session key, so only a member of the current generation can call a
//! handler; what the bytes mean is the connector's business.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// Answers calls from other workers on one channel.
#[async_trait]
pub trait RelayHandler: Send + Sync + 'static {
    /// The answer to `request`, or why there is none (sent back as the call's error).
    async fn handle(&self, request: Bytes) -> Result<Bytes, String>;
}

/// Why a call to another worker got no answer from its handler.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RelayError {
    /// This worker is not in a cluster generation, or `peer` is not a member of it.
    #[error("worker '{0}' is not a member of this worker's cluster generation")]
    NotAMember(String),
    /// The call did not reach the worker or its answer did not come back in time.
    #[error("worker '{peer}' did not answer: {reason}")]
    Unreachable { peer: String, reason: String },
    /// Nothing serves the channel on that worker (the task there has not started yet).
    #[error("no handler for '{channel}' on worker '{peer}'")]
    NoHandler { peer: String, channel: String },
    /// The handler (or the worker) refused the call.
    #[error("worker '{peer}' refused the call: {reason}")]
    Refused { peer: String, reason: String },
}

/// The other workers of this worker's cluster, as the engine sees them.
#[async_trait]
pub trait Peers: Send + Sync + std::fmt::Debug {
    /// The ids of the other members of the current generation (empty when alone).
    fn others(&self) -> Vec<String>;

    /// Calls `channel`'s handler on worker `peer` with `request`; waits up to `timeout`.
    async fn call(
        &self,
        peer: &str,
        channel: &str,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RelayError>;
}

/// A worker alone (standalone and dev mode, tests): no one to call.
#[derive(Debug, Default)]
pub struct Alone;

#[async_trait]
impl Peers for Alone {
    fn others(&self) -> Vec<String> {
        Vec::new()
    }

    async fn call(&self, peer: &str, _: &str, _: Bytes, _: Duration) -> Result<Bytes, RelayError> {
        Err(RelayError::NotAMember(peer.to_string()))
    }
}

/// [`Alone`], shared.
pub fn alone() -> Arc<dyn Peers> {
    Arc::new(Alone)
}

/// Handlers by channel, in this process.
static HANDLERS: LazyLock<Mutex<HashMap<String, Weak<dyn RelayHandler>>>> =
    LazyLock::new(Default::default);

fn handlers() -> MutexGuard<'static, HashMap<String, Weak<dyn RelayHandler>>> {
    // Single inserts and removes: the map is consistent whatever panicked holding it.
    HANDLERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes `handler` answer `channel` until the returned guard is dropped (a restarted task's
/// handler replaces its predecessor's).
#[must_use = "the handler is withdrawn when the guard is dropped"]
pub fn serve(channel: &str, handler: Arc<dyn RelayHandler>) -> Serving {
    handlers().insert(channel.to_string(), Arc::downgrade(&handler));
    Serving {
        channel: channel.to_string(),
        handler,
    }
}

/// The handler serving `channel` in this process.
pub fn handler(channel: &str) -> Option<Arc<dyn RelayHandler>> {
    handlers().get(channel).and_then(Weak::upgrade)
}

/// A registered handler; dropping it withdraws the handler if it still serves its channel.
pub struct Serving {
    channel: String,
    handler: Arc<dyn RelayHandler>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving")
            .field("channel", &self.channel)
            .finish()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut handlers = handlers();
        let ours = handlers
            .get(&self.channel)
            .is_some_and(|h| std::ptr::addr_eq(h.as_ptr(), Arc::as_ptr(&self.handler)));
        if ours {
            handlers.remove(&self.channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(&'static str);

    #[async_trait]
    impl RelayHandler for Echo {
        async fn handle(&self, request: Bytes) -> Result<Bytes, String> {
            Ok(Bytes::from([self.0.as_bytes(), &request].concat()))
        }
    }

    #[tokio::test]
    async fn a_handler_serves_its_channel_until_its_guard_goes_and_a_successor_stays() {
        let first = serve("relay-test", Arc::new(Echo("first:")));
        let answer = handler("relay-test")
            .expect("served")
            .handle(Bytes::from_static(b"x"))
            .await;
        assert_eq!(answer, Ok(Bytes::from_static(b"first:x")));
        // A restarted task registers before its predecessor's guard is dropped.
        let second = serve("relay-test", Arc::new(Echo("second:")));
        drop(first);
        let answer = handler("relay-test")
            .expect("the successor still serves")
            .handle(Bytes::from_static(b"y"))
            .await;
        assert_eq!(answer, Ok(Bytes::from_static(b"second:y")));
        drop(second);
        assert!(handler("relay-test").is_none());
    }

    #[tokio::test]
    async fn a_worker_alone_has_no_one_to_call() {
        let peers = alone();
        assert!(peers.others().is_empty());
        let answer = peers
            .call("w2", "c", Bytes::new(), Duration::from_secs(1))
            .await;
        assert_eq!(answer, Err(RelayError::NotAMember("w2".into())));
    }
}
