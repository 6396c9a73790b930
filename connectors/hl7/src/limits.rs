//! What one MLLP listener lets remote senders consume, beyond the connection count: bytes of
//! messages held for them (shared by every connection), connections per peer address, and
//! topics a topic template may yield.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// A lock whose holder panicked still guards consistent data here (counters and sets updated
/// in one step), so poisoning is ignored rather than taking the listener down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes of messages being received or waiting for their ACK, shared by all connections of a
/// listener: without it each of `mllp.max.connections` connections could hold a frame of
/// `mllp.max.message.bytes`.
#[derive(Debug)]
pub struct FrameBudget {
    capacity: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicU64,
}

impl FrameBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most ever held at once: never above the capacity.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Connections refused because the budget was exhausted.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    fn try_take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= self.capacity)
            });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, Ordering::AcqRel);
                true
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::AcqRel);
                false
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One connection's share of the [`FrameBudget`], returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<FrameBudget>,
    held: usize,
}

impl Reservation {
    pub fn new(budget: Arc<FrameBudget>) -> Self {
        Self { budget, held: 0 }
    }

    /// Takes `bytes` more; `false` (nothing taken) when the budget cannot spare them.
    pub fn grow(&mut self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        let taken = self.budget.try_take(bytes);
        if taken {
            self.held += bytes;
        }
        taken
    }

    /// Gives back what is held beyond `bytes` (what the connection still buffers).
    pub fn shrink_to(&mut self, bytes: usize) {
        if self.held > bytes {
            self.budget.give_back(self.held - bytes);
            self.held = bytes;
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

/// Connections per peer IP address, so one host cannot take every connection slot.
#[derive(Debug)]
pub struct PeerLimits {
    /// 0: no limit.
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PeerLimits {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `peer`, or `None` when it has `max` already.
    pub fn enter(self: &Arc<Self>, peer: IpAddr) -> Option<PeerSlot> {
        if self.max == 0 {
            return Some(PeerSlot { limits: None, peer });
        }
        let mut open = lock(&self.open);
        let count = open.entry(peer).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            limits: Some(self.clone()),
            peer,
        })
    }

    /// Connections open from `peer` (counted only with a limit).
    pub fn open(&self, peer: IpAddr) -> usize {
        lock(&self.open).get(&peer).copied().unwrap_or(0)
    }
}

/// A connection's place in [`PeerLimits`], freed when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    limits: Option<Arc<PeerLimits>>,
    peer: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some(limits) = &self.limits {
            let mut open = lock(&limits.open);
            if let Some(count) = open.get_mut(&self.peer) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.peer);
                }
            }
        }
    }
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

/// The distinct topics a template that names MSH-9 may yield: each new one is a topic created
/// in Kafka (an admin round trip, partitions on every broker), chosen by whoever sends.
#[derive(Debug)]
pub struct TopicCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl TopicCap {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Whether a record may go to `topic`: one already used, or a new one within the cap.
    pub fn admit(&self, topic: &str) -> bool {
        let mut seen = lock(&self.seen);
        if seen.contains(topic) {
            return true;
        }
        if seen.len() >= self.max {
            return false;
        }
        seen.insert(topic.to_string());
        true
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Distinct topics admitted so far.
    pub fn len(&self) -> usize {
        lock(&self.seen).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_never_goes_past_its_capacity_and_comes_back_on_drop() {
        let budget = FrameBudget::new(100);
        let mut a = Reservation::new(budget.clone());
        let mut b = Reservation::new(budget.clone());
        assert!(a.grow(60));
        assert!(!b.grow(41), "would pass the capacity");
        assert!(b.grow(40));
        assert_eq!(
            (budget.used(), budget.peak(), budget.refused()),
            (100, 100, 1)
        );
        a.shrink_to(10);
        assert_eq!(budget.used(), 50);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn peers_are_limited_separately_and_slots_come_back() {
        let limits = PeerLimits::new(2);
        let one: IpAddr = [10, 0, 0, 1].into();
        let two: IpAddr = [10, 0, 0, 2].into();
        let a = limits.enter(one);
        let b = limits.enter(one);
        assert!(a.is_some() && b.is_some());
        assert!(limits.enter(one).is_none());
        assert!(limits.enter(two).is_some());
        drop(a);
        assert_eq!(limits.open(one), 1);
        assert!(limits.enter(one).is_some());
        let unlimited = PeerLimits::new(0);
        let slots: Vec<_> = (0..10).filter_map(|_| unlimited.enter(one)).collect();
        assert_eq!(slots.len(), 10);
    }

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

    #[test]
    fn the_topic_cap_admits_known_topics_and_new_ones_within_it() {
        let cap = TopicCap::new(2);
        assert!(cap.admit("hl7.adt"));
        assert!(cap.admit("hl7.oru"));
        assert!(cap.admit("hl7.adt"));
        assert!(!cap.admit("hl7.zz1"));
        assert_eq!(cap.len(), 2);
    }
}
