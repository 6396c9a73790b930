//! What remote senders may make a worker hold, for listener sources (MLLP, the MQTT
//! listener): bytes of messages received and not yet settled, connections per peer address,
//! and Kafka topics a sender-chosen topic template may create.
//!
//! Byte budgets nest: the worker has one ([`SourceTaskContext::listener_budget`]), and each
//! listener takes its own within it, so one listener's senders cannot take more than its
//! share and all listeners together cannot take more than the worker's.
//!
//! [`SourceTaskContext::listener_budget`]: crate::SourceTaskContext::listener_budget

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A lock whose holder panicked still guards consistent data here (counters and sets updated
/// in one step), so poisoning is ignored rather than taking a listener down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bytes of messages being received or waiting to be settled. Taking from a budget takes
/// from its parent too, so a listener's budget within the worker's is bounded by both.
#[derive(Debug)]
pub struct ByteBudget {
    capacity: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicU64,
    parent: Option<Arc<ByteBudget>>,
    /// Woken whenever bytes come back anywhere under this budget (used at the root only).
    freed: Notify,
}

impl ByteBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self::with_parent(capacity, None))
    }

    /// No bound (tests and tools that run a task outside a worker).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX)
    }

    /// A budget of `capacity` bytes whose takings also count against this one.
    pub fn within(self: &Arc<Self>, capacity: usize) -> Arc<Self> {
        Arc::new(Self::with_parent(capacity, Some(self.clone())))
    }

    fn with_parent(capacity: usize, parent: Option<Arc<ByteBudget>>) -> Self {
        Self {
            capacity,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            parent,
            freed: Notify::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The budget this one lies within (a listener's: the worker's).
    pub fn parent(&self) -> Option<&Arc<ByteBudget>> {
        self.parent.as_ref()
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The most ever held at once: never above the capacity.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Acquire)
    }

    /// Takings refused because this budget (not a parent) could not spare them.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }

    /// The outermost budget: every give-back below reaches it, so it is where senders wait
    /// for room.
    fn root(&self) -> &ByteBudget {
        match &self.parent {
            Some(parent) => parent.root(),
            None => self,
        }
    }

    /// Whether `bytes` more would fit in this budget and every one it lies within.
    fn has_room(&self, bytes: usize) -> bool {
        self.used()
            .checked_add(bytes)
            .is_some_and(|total| total <= self.capacity)
            && self
                .parent
                .as_ref()
                .is_none_or(|parent| parent.has_room(bytes))
    }

    /// Waits until `bytes` more would fit. Takes nothing: another sender may take the room
    /// first, so callers try again. Cancel-safe; callers bound the wait (a deadline,
    /// shutdown).
    pub async fn wait_for_room(&self, bytes: usize) {
        loop {
            // Registered before the check, so a give-back between the two is not missed.
            let freed = self.root().freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.has_room(bytes) {
                return;
            }
            freed.await;
        }
    }

    fn try_take(&self, bytes: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|total| *total <= self.capacity)
            });
        let Ok(before) = taken else {
            self.refused.fetch_add(1, Ordering::AcqRel);
            return false;
        };
        if let Some(parent) = &self.parent
            && !parent.try_take(bytes)
        {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        self.peak.fetch_max(before + bytes, Ordering::AcqRel);
        true
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        match &self.parent {
            Some(parent) => parent.give_back(bytes),
            None => self.freed.notify_waiters(),
        }
    }
}

/// One connection's share of a [`ByteBudget`], returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<ByteBudget>,
    held: usize,
}

impl Reservation {
    pub fn new(budget: Arc<ByteBudget>) -> Self {
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

    /// Holds exactly `bytes`: takes the difference or gives it back; `false` (nothing
    /// changed) when more is needed and the budget cannot spare it.
    pub fn resize_to(&mut self, bytes: usize) -> bool {
        if bytes > self.held {
            self.grow(bytes - self.held)
        } else {
            self.shrink_to(bytes);
            true
        }
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
        if self.held > 0 {
            self.budget.give_back(self.held);
        }
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

    pub fn max(&self) -> usize {
        self.max
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

/// The distinct topics a template filled from what senders send may yield: each new one is a
/// topic created in Kafka (an admin round trip, partitions on every broker), chosen by
/// whoever sends.
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
        let budget = ByteBudget::new(100);
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
        assert!(a.resize_to(20) && a.held() == 20);
        assert!(!a.resize_to(200) && a.held() == 20);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn listeners_within_a_worker_budget_together_stay_under_it() {
        let worker = ByteBudget::new(100);
        let mllp = worker.within(80);
        let mqtt = worker.within(80);
        let mut a = Reservation::new(mllp.clone());
        let mut b = Reservation::new(mqtt.clone());
        assert!(a.grow(70));
        assert!(!a.grow(20), "past the listener's own 80");
        assert!(!b.grow(40), "each listener has room, the worker does not");
        assert_eq!(
            (mllp.refused(), mqtt.refused(), worker.refused()),
            (1, 0, 1)
        );
        assert_eq!(
            mqtt.used(),
            0,
            "a refusal by the parent leaves the child as it was"
        );
        assert!(b.grow(30));
        assert_eq!((worker.used(), worker.peak()), (100, 100));
        drop(a);
        assert_eq!((worker.used(), mllp.used(), mqtt.used()), (30, 0, 30));
        drop(b);
        assert_eq!(worker.used(), 0);
    }

    #[tokio::test]
    async fn a_sender_waiting_for_room_wakes_when_another_listener_gives_back() {
        let worker = ByteBudget::new(10);
        let first = worker.within(10);
        let second = worker.within(10);
        let mut held = Reservation::new(first);
        assert!(held.grow(10));
        let waiting = tokio::spawn(async move {
            let mut mine = Reservation::new(second.clone());
            while !mine.grow(5) {
                second.wait_for_room(5).await;
            }
            mine.held()
        });
        tokio::task::yield_now().await;
        held.shrink_to(0);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the give-back")
            .expect("task");
        assert_eq!(got, 5);
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
    fn the_topic_cap_admits_known_topics_and_new_ones_within_it() {
        let cap = TopicCap::new(2);
        assert!(cap.admit("hl7.adt"));
        assert!(cap.admit("hl7.oru"));
        assert!(cap.admit("hl7.adt"));
        assert!(!cap.admit("hl7.zz1"));
        assert_eq!(cap.len(), 2);
    }
}
