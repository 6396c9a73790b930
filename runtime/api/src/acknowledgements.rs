//! For sinks that write asynchronously (`put` queues, a writer sends, the target acknowledges
//! later): which records the target has not acknowledged yet, per partition — what
//! `pre_commit` may commit, how full the pipeline is (backpressure), and a failure that ends
//! the task. Shared by the Elasticsearch and FHIR sinks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{ConnectError, SinkOffsets, TopicPartition};
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Progress {
    /// Offsets queued or in flight. Records of a partition are put in offset order, so the
    /// lowest one bounds what may be committed.
    outstanding: BTreeMap<TopicPartition, BTreeSet<i64>>,
    count: usize,
    failure: Option<ConnectError>,
    /// The task paused its partitions until the pipeline drains.
    pub paused: bool,
}

impl Progress {
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn failure(&self) -> Option<&ConnectError> {
        self.failure.as_ref()
    }

    fn settle(&mut self, partition: &TopicPartition, offset: i64) {
        if let Some(offsets) = self.outstanding.get_mut(partition)
            && offsets.remove(&offset)
        {
            self.count -= 1;
            if offsets.is_empty() {
                self.outstanding.remove(partition);
            }
        }
    }

    /// Per partition the engine asks about: up to the first record not yet acknowledged, or
    /// everything put when all of it is.
    pub fn committable(&self, offsets: &SinkOffsets) -> SinkOffsets {
        offsets
            .iter()
            .map(|(partition, next)| {
                let first_pending = self
                    .outstanding
                    .get(partition)
                    .and_then(|pending| pending.first().copied());
                (
                    partition.clone(),
                    first_pending.map_or(*next, |first| first.min(*next)),
                )
            })
            .collect()
    }
}

/// [`Progress`] shared by the task and its writer, with a wake-up for those waiting on it.
#[derive(Debug, Default)]
pub struct Tracker {
    state: Mutex<Progress>,
    changed: Notify,
}

impl Tracker {
    pub fn lock(&self) -> MutexGuard<'_, Progress> {
        // A panic elsewhere cannot leave these counters half-updated in a way that matters
        // more than stopping the task would.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn add(&self, partition: TopicPartition, offset: i64) {
        let mut state = self.lock();
        if state
            .outstanding
            .entry(partition)
            .or_default()
            .insert(offset)
        {
            state.count += 1;
        }
    }

    pub fn settle<'a>(&self, positions: impl IntoIterator<Item = (&'a TopicPartition, i64)>) {
        {
            let mut state = self.lock();
            for (partition, offset) in positions {
                state.settle(partition, offset);
            }
        }
        self.changed.notify_waiters();
    }

    /// The first failure wins: it is what the task reports.
    pub fn fail(&self, error: ConnectError) {
        self.lock().failure.get_or_insert(error);
        self.changed.notify_waiters();
    }

    /// Partitions taken from the task: their records are read again by their next owner.
    pub fn forget(&self, partitions: &[TopicPartition]) {
        let mut state = self.lock();
        for partition in partitions {
            if let Some(offsets) = state.outstanding.remove(partition) {
                state.count -= offsets.len();
            }
        }
    }

    pub fn check(&self) -> Result<(), ConnectError> {
        match self.lock().failure() {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Waits until `done` holds or the writer failed.
    pub async fn wait_until(&self, done: impl Fn(&Progress) -> bool) -> Result<(), ConnectError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.lock();
                if let Some(error) = state.failure() {
                    return Err(error.clone());
                }
                if done(&state) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_first_unacknowledged_record() {
        let tracker = Tracker::default();
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        for offset in 10..15 {
            tracker.add(a.clone(), offset);
        }
        tracker.add(b.clone(), 3);
        // Acknowledged out of order: 11 and 12 before 10.
        tracker.settle([(&a, 11), (&a, 12)]);
        let put: SinkOffsets = [(a.clone(), 15), (b.clone(), 4)].into_iter().collect();
        let committable = tracker.lock().committable(&put);
        assert_eq!(committable[&a], 10);
        assert_eq!(committable[&b], 3);
        tracker.settle([(&a, 10), (&a, 13), (&a, 14), (&b, 3)]);
        assert_eq!(tracker.lock().committable(&put), put);
        assert_eq!(tracker.lock().count(), 0);
        tracker.add(a.clone(), 20);
        tracker.forget(std::slice::from_ref(&a));
        assert_eq!(tracker.lock().count(), 0);
    }
}
