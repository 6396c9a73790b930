//! What one MLLP listener does about senders that connect and say nothing: the byte budget,
//! per-peer connection caps and the topic cap it shares with other listeners live in
//! `medconnect_api::limits`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// A lock whose holder panicked still guards consistent data here (a map updated in one
/// step), so poisoning is ignored rather than taking the listener down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Connections waiting for their sender's next message, oldest first: when every connection
/// slot is taken, the one idle the longest is closed to admit a new sender, so senders that
/// connect and say nothing cannot lock out the ones that have messages (the idle one
/// reconnects when it has something to send, as MLLP senders do).
#[derive(Debug, Default)]
pub struct IdleConnections {
    next: AtomicU64,
    idle: Mutex<BTreeMap<(Instant, u64), CancellationToken>>,
}

impl IdleConnections {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Marks a connection idle until the guard is dropped; `close` ends it if it is evicted.
    pub fn enter(self: &Arc<Self>, close: &CancellationToken) -> IdleGuard {
        let key = (Instant::now(), self.next.fetch_add(1, Ordering::Relaxed));
        lock(&self.idle).insert(key, close.clone());
        IdleGuard {
            registry: self.clone(),
            key,
        }
    }

    /// Closes the connection idle the longest; `false` when none is idle.
    pub fn evict_oldest(&self) -> bool {
        match lock(&self.idle).pop_first() {
            Some((_, close)) => {
                close.cancel();
                true
            }
            None => false,
        }
    }

    /// Connections idle now.
    pub fn len(&self) -> usize {
        lock(&self.idle).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's mark in [`IdleConnections`], removed when dropped (its read ended).
#[derive(Debug)]
pub struct IdleGuard {
    registry: Arc<IdleConnections>,
    key: (Instant, u64),
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        lock(&self.registry.idle).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_idle_connection_is_the_one_evicted() {
        let idle = IdleConnections::new();
        let (first, second) = (CancellationToken::new(), CancellationToken::new());
        let a = idle.enter(&first);
        let b = idle.enter(&second);
        assert_eq!(idle.len(), 2);
        assert!(idle.evict_oldest());
        assert!(first.is_cancelled() && !second.is_cancelled());
        drop(a);
        drop(b);
        assert!(idle.is_empty());
        assert!(!idle.evict_oldest());
    }
}
