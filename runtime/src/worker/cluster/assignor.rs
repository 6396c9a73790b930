//! The leader's assignment: balanced, sticky and cooperative.
//!
//! - **Balanced**: connectors and distributed tasks are counted apart, and each is spread so
//!   that the most and the fewest a worker gets differ by at most one.
//! - **Sticky**: a worker keeps what it runs (it says so in its JoinGroup metadata) unless
//!   balance needs it elsewhere; adding a connector or a worker restarts nothing that stays.
//! - **Cooperative** (KIP-415's idea, in two generations): work that must leave a live worker
//!   is only *revoked* in this generation; that worker stops it and rejoins at once, and the
//!   next generation gives it to its new owner. So a task never runs on two workers at once.
//!   Work of a worker that left or died is free and is assigned at once.
//! - **Every-worker** connectors get one task per member, task ids `0..members`.

use std::collections::{BTreeMap, BTreeSet};

use super::protocol::{TaskId, Work};

/// What must run: from the leader's config snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Demand {
    /// Every connector (one owner each: it reports the connector's status).
    pub connectors: BTreeSet<String>,
    /// Tasks of distributed connectors.
    pub tasks: BTreeSet<TaskId>,
    /// Connectors whose tasks run on every worker.
    pub every_worker: BTreeSet<String>,
}

/// One member's share of a generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Share {
    pub work: Work,
    pub revoked: Work,
}

/// Assigns `demand` over `members` (member id -> what it runs now), in member id order.
pub fn assign(demand: &Demand, members: &BTreeMap<String, Work>) -> BTreeMap<String, Share> {
    let ids: Vec<&String> = members.keys().collect();
    let mut shares: BTreeMap<String, Share> = ids
        .iter()
        .map(|id| ((*id).clone(), Share::default()))
        .collect();
    if ids.is_empty() {
        return shares;
    }
    let connectors = balance(
        &demand.connectors,
        members.iter().map(|(id, w)| (id, &w.connectors)),
    );
    let distributed = balance(
        &demand.tasks,
        members.iter().map(|(id, w)| {
            let tasks: BTreeSet<TaskId> = w
                .tasks
                .iter()
                .filter(|t| !demand.every_worker.contains(&t.connector))
                .cloned()
                .collect();
            (id, tasks)
        }),
    );
    for (id, (work, revoked)) in connectors {
        if let Some(share) = shares.get_mut(&id) {
            share.work.connectors = work;
            share.revoked.connectors = revoked;
        }
    }
    for (id, (work, revoked)) in distributed {
        if let Some(share) = shares.get_mut(&id) {
            share.work.tasks = work;
            share.revoked.tasks = revoked;
        }
    }
    for connector in &demand.every_worker {
        spread_every_worker(connector, members, &mut shares);
    }
    shares
}

/// Balances one kind of unit; returns, per member, (what it runs, what it must stop).
fn balance<'a, T, S>(
    all: &BTreeSet<T>,
    running: impl Iterator<Item = (&'a String, S)>,
) -> BTreeMap<String, (BTreeSet<T>, BTreeSet<T>)>
where
    T: Ord + Clone,
    S: std::borrow::Borrow<BTreeSet<T>>,
{
    // What each member keeps: what it runs that still exists and no earlier member claimed.
    let mut claimed = BTreeSet::new();
    let mut kept: Vec<(String, BTreeSet<T>)> = Vec::new();
    let mut revoked: BTreeMap<String, BTreeSet<T>> = BTreeMap::new();
    for (id, runs) in running {
        let mut keeps = BTreeSet::new();
        for unit in runs.borrow() {
            if all.contains(unit) && claimed.insert(unit.clone()) {
                keeps.insert(unit.clone());
            } else if !all.contains(unit) {
                // Deleted: the worker stops it whatever the assignment says; nothing to hand over.
            } else {
                revoked.entry(id.clone()).or_default().insert(unit.clone());
            }
        }
        kept.push((id.clone(), keeps));
    }
    let count = kept.len();
    let (base, extra) = (all.len() / count, all.len() % count);
    // The members holding most get the larger quotas: fewest moves.
    let mut by_load: Vec<usize> = (0..count).collect();
    by_load.sort_by(|a, b| kept[*b].1.len().cmp(&kept[*a].1.len()).then(a.cmp(b)));
    let mut quota = vec![base; count];
    for index in by_load.iter().take(extra) {
        quota[*index] += 1;
    }
    // Over quota: the surplus is revoked now and assigned in the next generation.
    for (index, (id, keeps)) in kept.iter_mut().enumerate() {
        while keeps.len() > quota[index] {
            if let Some(unit) = keeps.pop_last() {
                revoked.entry(id.clone()).or_default().insert(unit);
            }
        }
    }
    // Free units (never assigned, or of members gone) go to members under quota, the least
    // loaded first. Revoked units are not among them: their owner still runs them.
    let mut free: Vec<T> = all
        .iter()
        .filter(|u| !claimed.contains(*u))
        .cloned()
        .collect();
    free.reverse();
    while let Some(index) = (0..count)
        .filter(|i| kept[*i].1.len() < quota[*i])
        .min_by_key(|i| (kept[*i].1.len(), *i))
    {
        let Some(unit) = free.pop() else { break };
        kept[index].1.insert(unit);
    }
    kept.into_iter()
        .map(|(id, keeps)| {
            let revoked = revoked.remove(&id).unwrap_or_default();
            (id, (keeps, revoked))
        })
        .collect()
}

/// One task of `connector` per member: a member keeps its task id if it is still in range and
/// unique; the others get the lowest free ids.
fn spread_every_worker(
    connector: &str,
    members: &BTreeMap<String, Work>,
    shares: &mut BTreeMap<String, Share>,
) {
    let count = members.len() as u32;
    let mut taken = BTreeSet::new();
    let mut without = Vec::new();
    for (id, work) in members {
        let mine: Vec<u32> = work
            .tasks
            .iter()
            .filter(|t| t.connector == connector)
            .map(|t| t.task)
            .collect();
        let mut kept = None;
        for task in mine {
            let share = shares.entry(id.clone()).or_default();
            if kept.is_none() && task < count && taken.insert(task) {
                kept = Some(task);
                share.work.tasks.insert(TaskId::new(connector, task));
            } else {
                share.revoked.tasks.insert(TaskId::new(connector, task));
            }
        }
        if kept.is_none() {
            without.push(id.clone());
        }
    }
    let mut free = (0..count).filter(|t| !taken.contains(t));
    for id in without {
        // A member that must first stop a duplicate gets its task in the next generation.
        let share = shares.entry(id).or_default();
        if share.revoked.tasks.iter().any(|t| t.connector == connector) {
            continue;
        }
        if let Some(task) = free.next() {
            share.work.tasks.insert(TaskId::new(connector, task));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(connectors: &[(&str, u32)], every_worker: &[&str]) -> Demand {
        let mut demand = Demand::default();
        for (name, tasks) in connectors {
            demand.connectors.insert(name.to_string());
            for task in 0..*tasks {
                demand.tasks.insert(TaskId::new(name, task));
            }
        }
        for name in every_worker {
            demand.connectors.insert(name.to_string());
            demand.every_worker.insert(name.to_string());
        }
        demand
    }

    fn members(ids: &[&str]) -> BTreeMap<String, Work> {
        ids.iter()
            .map(|id| (id.to_string(), Work::default()))
            .collect()
    }

    /// Runs generations until no member has anything revoked, as the workers would: each
    /// member then runs its share.
    fn settle(
        demand: &Demand,
        mut running: BTreeMap<String, Work>,
    ) -> (BTreeMap<String, Work>, usize) {
        for generation in 1..10 {
            let shares = assign(demand, &running);
            running = shares
                .iter()
                .map(|(id, s)| (id.clone(), s.work.clone()))
                .collect();
            if shares.values().all(|s| s.revoked.is_empty()) {
                return (running, generation);
            }
        }
        panic!("no stable assignment after 10 generations");
    }

    fn counts(running: &BTreeMap<String, Work>) -> Vec<(usize, usize)> {
        running
            .values()
            .map(|w| (w.connectors.len(), w.tasks.len()))
            .collect()
    }

    #[test]
    fn six_connectors_of_two_tasks_spread_four_four_four() {
        let demand = demand(
            &[("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 2), ("f", 2)],
            &[],
        );
        let (running, generations) = settle(&demand, members(&["w1", "w2", "w3"]));
        assert_eq!(counts(&running), vec![(2, 4), (2, 4), (2, 4)]);
        assert_eq!(generations, 1, "nothing to revoke from empty workers");
    }

    #[test]
    fn a_new_worker_takes_work_only_after_it_was_revoked_and_nothing_else_moves() {
        let demand = demand(
            &[("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 2), ("f", 2)],
            &[],
        );
        let (before, _) = settle(&demand, members(&["w1", "w2", "w3"]));
        let mut joined = before.clone();
        joined.insert("w4".into(), Work::default());
        let first = assign(&demand, &joined);
        // The newcomer gets nothing that someone else still runs.
        assert!(first["w4"].work.tasks.is_empty());
        let revoked: usize = first.values().map(|s| s.revoked.tasks.len()).sum();
        assert_eq!(revoked, 3, "12 tasks over 4 workers: 3 move");
        let (after, _) = settle(&demand, joined);
        assert_eq!(after["w4"].tasks.len(), 3);
        for id in ["w1", "w2", "w3"] {
            assert_eq!(after[id].tasks.len(), 3);
            assert!(
                after[id].tasks.is_subset(&before[id].tasks),
                "{id} kept only what it ran"
            );
        }
    }

    #[test]
    fn a_dead_workers_tasks_move_at_once() {
        let demand = demand(
            &[("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 2), ("f", 2)],
            &[],
        );
        let (before, _) = settle(&demand, members(&["w1", "w2", "w3"]));
        let mut survivors = before.clone();
        survivors.remove("w2");
        let shares = assign(&demand, &survivors);
        assert!(shares.values().all(|s| s.revoked.is_empty()));
        assert_eq!(shares["w1"].work.tasks.len(), 6);
        assert_eq!(shares["w3"].work.tasks.len(), 6);
        assert!(before["w1"].tasks.is_subset(&shares["w1"].work.tasks));
        assert!(before["w3"].tasks.is_subset(&shares["w3"].work.tasks));
    }

    #[test]
    fn a_new_connector_restarts_nothing() {
        let small = demand(&[("a", 2), ("b", 2)], &[]);
        let (before, _) = settle(&small, members(&["w1", "w2", "w3"]));
        let larger = demand(&[("a", 2), ("b", 2), ("c", 3)], &[]);
        let shares = assign(&larger, &before);
        for (id, share) in &shares {
            assert!(share.revoked.is_empty(), "{id} lost work");
            assert!(before[id].tasks.is_subset(&share.work.tasks));
        }
        let tasks: Vec<usize> = shares.values().map(|s| s.work.tasks.len()).collect();
        assert!(
            tasks.iter().max().unwrap() - tasks.iter().min().unwrap() <= 1,
            "{tasks:?}"
        );
    }

    #[test]
    fn every_worker_connectors_run_one_task_per_member() {
        let demand = demand(&[("a", 1)], &["mllp"]);
        let (running, _) = settle(&demand, members(&["w1", "w2", "w3"]));
        let mllp: BTreeSet<u32> = running
            .values()
            .flat_map(|w| {
                w.tasks
                    .iter()
                    .filter(|t| t.connector == "mllp")
                    .map(|t| t.task)
            })
            .collect();
        assert_eq!(mllp, BTreeSet::from([0, 1, 2]));
        for work in running.values() {
            assert_eq!(
                work.tasks.iter().filter(|t| t.connector == "mllp").count(),
                1
            );
        }
        // One member gone: the others keep their ids, nothing is revoked.
        let mut two = running.clone();
        let gone = two.keys().next().cloned().unwrap();
        two.remove(&gone);
        let (after, _) = settle(&demand, two.clone());
        for (id, work) in &after {
            let mine: Vec<_> = work
                .tasks
                .iter()
                .filter(|t| t.connector == "mllp")
                .collect();
            assert_eq!(mine.len(), 1, "{id}");
        }
    }

    #[test]
    fn deleted_work_is_neither_kept_nor_revoked() {
        let demand = demand(&[("a", 1)], &[]);
        let mut running = members(&["w1"]);
        running
            .get_mut("w1")
            .unwrap()
            .tasks
            .insert(TaskId::new("gone", 0));
        let shares = assign(&demand, &running);
        assert!(shares["w1"].revoked.is_empty());
        assert_eq!(
            shares["w1"].work.tasks,
            BTreeSet::from([TaskId::new("a", 0)])
        );
    }
}
