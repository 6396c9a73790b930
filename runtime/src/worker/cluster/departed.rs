//! Connect's `scheduled.rebalance.max.delay.ms`: the work of a worker that left is held back
//! for a while instead of moving at once, so a worker that restarts (a rolling upgrade, a pod
//! rescheduled) gets its own work back and nothing else moves. 0 (the default) moves it at once.
//!
//! Only the leader holds it; a new leader has no memory of who left, and assigns at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::protocol::Work;

#[derive(Debug, Default)]
pub struct Departed {
    /// What each worker was given in the last generation this leader assigned.
    last: BTreeMap<String, Work>,
    /// Work of workers that left, by worker id, held until the instant.
    held: BTreeMap<String, (Work, Instant)>,
}

/// What the leader does with departed workers' work in one assignment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Given to no one in this generation.
    pub work: Work,
    /// Given back to workers that came back, by worker id.
    pub returning: BTreeMap<String, Work>,
}

impl Departed {
    /// Before an assignment of the workers `present`: starts holding the work of those that
    /// left, gives held work back to those that came back, and lets go of what was held long
    /// enough.
    pub fn before_assign(
        &mut self,
        present: &BTreeSet<String>,
        now: Instant,
        delay: Duration,
    ) -> Held {
        if !delay.is_zero() {
            for (worker, work) in &self.last {
                if !present.contains(worker) && !self.held.contains_key(worker) && !work.is_empty()
                {
                    self.held
                        .insert(worker.clone(), (work.clone(), now + delay));
                }
            }
        }
        let mut held = Held::default();
        self.held.retain(|worker, (work, until)| {
            if present.contains(worker) {
                held.returning.insert(worker.clone(), std::mem::take(work));
                false
            } else {
                *until > now
            }
        });
        for (work, _) in self.held.values() {
            held.work.connectors.extend(work.connectors.iter().cloned());
            held.work.tasks.extend(work.tasks.iter().cloned());
        }
        held
    }

    /// Remembers what each worker was given.
    pub fn after_assign(&mut self, given: BTreeMap<String, Work>) {
        self.last = given;
    }

    /// When the earliest held work is to be let go: the leader rebalances then.
    pub fn next_release(&self) -> Option<Instant> {
        self.held.values().map(|(_, until)| *until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::cluster::protocol::TaskId;

    fn work(tasks: &[(&str, u32)]) -> Work {
        Work {
            connectors: BTreeSet::new(),
            tasks: tasks.iter().map(|(c, t)| TaskId::new(c, *t)).collect(),
        }
    }

    fn present(workers: &[&str]) -> BTreeSet<String> {
        workers.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn a_departed_workers_work_is_held_then_let_go() {
        let delay = Duration::from_secs(10);
        let start = Instant::now();
        let mut departed = Departed::default();
        departed.after_assign(BTreeMap::from([
            ("w1".to_string(), work(&[("a", 0)])),
            ("w2".to_string(), work(&[("a", 1)])),
        ]));
        let held = departed.before_assign(&present(&["w1"]), start, delay);
        assert_eq!(held.work, work(&[("a", 1)]));
        assert_eq!(departed.next_release(), Some(start + delay));
        departed.after_assign(BTreeMap::from([("w1".to_string(), work(&[("a", 0)]))]));
        let later =
            departed.before_assign(&present(&["w1"]), start + Duration::from_secs(5), delay);
        assert_eq!(
            later.work,
            work(&[("a", 1)]),
            "still held before the delay is over"
        );
        let released = departed.before_assign(&present(&["w1"]), start + delay, delay);
        assert!(released.work.is_empty(), "let go once the delay is over");
        assert_eq!(departed.next_release(), None);
    }

    #[test]
    fn a_worker_that_comes_back_gets_its_work_back() {
        let delay = Duration::from_secs(10);
        let start = Instant::now();
        let mut departed = Departed::default();
        departed.after_assign(BTreeMap::from([
            ("w1".to_string(), work(&[("a", 0)])),
            ("w2".to_string(), work(&[("a", 1)])),
        ]));
        departed.before_assign(&present(&["w1"]), start, delay);
        departed.after_assign(BTreeMap::from([("w1".to_string(), work(&[("a", 0)]))]));
        let back = departed.before_assign(
            &present(&["w1", "w2"]),
            start + Duration::from_secs(3),
            delay,
        );
        assert!(back.work.is_empty());
        assert_eq!(
            back.returning,
            BTreeMap::from([("w2".to_string(), work(&[("a", 1)]))])
        );
    }

    #[test]
    fn without_a_delay_nothing_is_held() {
        let mut departed = Departed::default();
        departed.after_assign(BTreeMap::from([("w2".to_string(), work(&[("a", 1)]))]));
        let held = departed.before_assign(&present(&["w1"]), Instant::now(), Duration::ZERO);
        assert_eq!(held, Held::default());
    }
}
