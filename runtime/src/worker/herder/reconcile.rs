//! Reconciliation: the tasks running here are made to match the config topic (started,
//! paused, resumed, stopped), for the tasks the [`Assignment`](super::Assignment) gives this
//! worker.

use std::collections::{BTreeMap, BTreeSet};

use futures::FutureExt;
use medconnect_api::Placement;

use super::{Herder, settle};
use crate::store::{ConnectorEntry, ConnectorState, TargetState, TaskStatus};
use crate::task::{AfterStop, RunState, Stopping, TaskHandle};

impl Herder {
    /// Makes the tasks running here match the config topic. Does not wait for the runs it
    /// stopped: they stop in their own tokio tasks, and a task's next run waits for its last
    /// one, so the caller (the config-topic watcher) stays free to follow further changes.
    pub async fn reconcile(&self) {
        let _guard = self.operations.lock().await;
        let _stopping = self.reconcile_locked().await;
    }

    /// Starts, pauses, resumes and stops tasks to match the config topic. Returns the runs it
    /// stopped, for the caller to await once it released the operations lock.
    pub(super) async fn reconcile_locked(&self) -> Vec<Stopping> {
        let snapshot = self.configs.snapshot();
        let mut stops = Vec::new();
        let here: BTreeSet<(String, u32)> = snapshot
            .connectors
            .iter()
            .filter(|(_, e)| e.target_state != TargetState::Stopped)
            .flat_map(|(name, e)| {
                self.assignment
                    .tasks_here(name, self.placement_of(e), e.tasks.len())
                    .into_iter()
                    .map(move |id| (name.clone(), id))
            })
            .collect();
        // Tasks of deleted or stopped connectors, beyond the current task count, or no longer
        // assigned here stop first.
        let obsolete: Vec<(String, u32)> = {
            let tasks = self.tasks.lock().await;
            tasks
                .keys()
                .filter(|key| !here.contains(*key))
                .cloned()
                .collect()
        };
        for (name, id) in obsolete {
            match snapshot.connectors.get(&name) {
                None => stops.extend(self.stop_task(&name, id, AfterStop::Nothing).await),
                // Moved to another worker (or this one lost its membership): UNASSIGNED until
                // the new owner records it RUNNING.
                Some(e)
                    if e.target_state != TargetState::Stopped
                        && (self.placement_of(e) == Placement::EveryWorker
                            || (id as usize) < e.tasks.len()) =>
                {
                    stops.extend(self.stop_task(&name, id, AfterStop::Unassigned).await)
                }
                Some(_) => {
                    stops.extend(self.stop_task(&name, id, AfterStop::Nothing).await);
                    if let Err(error) = self.statuses.remove_task(&name, id).await {
                        tracing::warn!(connector = %name, task = id, %error, "cannot remove task status");
                    }
                }
            }
        }
        for (name, entry) in &snapshot.connectors {
            stops.extend(self.reconcile_connector(name, entry).await);
        }
        stops
    }

    async fn reconcile_connector(&self, name: &str, entry: &ConnectorEntry) -> Vec<Stopping> {
        let state = match entry.target_state {
            TargetState::Stopped => ConnectorState::Stopped,
            TargetState::Paused => ConnectorState::Paused,
            TargetState::Started => ConnectorState::Running,
        };
        let placement = self.placement_of(entry);
        let owned = self.assignment.owns_connector(name);
        let current = self.statuses.connector(name);
        let failed_generating = current
            .as_ref()
            .is_some_and(|s| s.state == ConnectorState::Failed)
            && entry.tasks.is_empty();
        // A new owner records the connector as its own, even in the same state.
        if owned
            && !failed_generating
            && current
                .as_ref()
                .is_none_or(|s| s.state != state || s.worker_id != self.worker_id)
        {
            self.put_connector_status(name, state, None).await;
        }
        let mut stops = Vec::new();
        if entry.target_state == TargetState::Stopped {
            return stops;
        }
        let run_state = if entry.target_state == TargetState::Paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        for id in self
            .assignment
            .tasks_here(name, placement, entry.tasks.len())
        {
            // Every worker runs an every-worker connector's one task config.
            let config = match placement {
                Placement::EveryWorker => entry.tasks.first(),
                Placement::Distributed => entry.tasks.get(id as usize),
            };
            let Some(config) = config else { continue };
            let tasks = self.tasks.lock().await;
            match tasks.get(&(name.to_string(), id)) {
                // Same config: keep it (a failed one stays failed until restarted). Only the
                // run's reporter writes its state, so a run that failed or ended stays so.
                Some(handle) if handle.config == *config => {
                    if handle.set_state(run_state) {
                        let status = handle.status.clone();
                        drop(tasks);
                        status.run_state_changed().await;
                    }
                }
                _ => {
                    drop(tasks);
                    stops.extend(self.stop_task(name, id, AfterStop::Restarting).await);
                    self.start_task(name, id, config, entry, run_state).await;
                }
            }
        }
        stops
    }

    pub(super) async fn put_connector_status(
        &self,
        name: &str,
        state: ConnectorState,
        trace: Option<String>,
    ) {
        let status = TaskStatus {
            state,
            trace,
            worker_id: self.worker_id.clone(),
            generation: self
                .configs
                .connector(name)
                .map_or(0, |e| e.task_generation),
            run: 0,
            assignment_generation: self.assignment.generation(),
        };
        if let Err(error) = self.statuses.put_connector(name, &status).await {
            tracing::warn!(connector = %name, %error, "cannot record connector status");
        }
    }

    /// Reconciles, then waits until the runs it stopped are over: the cluster hands a task to
    /// another worker only once it stopped here.
    pub async fn reconcile_and_wait(&self) {
        let stops = {
            let _guard = self.operations.lock().await;
            self.reconcile_locked().await
        };
        settle(stops).await;
    }

    /// Where the connector's tasks run (its plugin's declaration; a connector whose plugin is
    /// unknown here is distributed, and fails to start wherever it lands).
    pub(super) fn placement_of(&self, entry: &ConnectorEntry) -> Placement {
        self.plugin_for(&entry.config)
            .map(|plugin| plugin.connector().placement())
            .unwrap_or_default()
    }

    /// What the config topic asks the cluster to run, for the leader's assignment.
    pub fn demand(&self) -> crate::worker::cluster::assignor::Demand {
        let snapshot = self.configs.snapshot();
        crate::worker::cluster::demand_of(snapshot.connectors.iter().map(|(name, e)| {
            (
                name,
                e.tasks.len(),
                e.target_state == TargetState::Stopped,
                self.placement_of(e),
            )
        }))
    }

    /// Takes a task's run out of the running set, closes its status with `after` (so nothing
    /// the runner still does is recorded after it) and starts stopping it, without waiting.
    pub(super) async fn stop_task(
        &self,
        name: &str,
        id: u32,
        after: AfterStop,
    ) -> Option<Stopping> {
        let key = (name.to_string(), id);
        let handle = self.tasks.lock().await.remove(&key)?;
        handle.status.close(after).await;
        Some(self.begin_stop(key, handle, AfterStop::Nothing))
    }

    /// Stops a run in its own tokio task (so it goes on even if no caller waits) and records it
    /// as stopping until it is over, for the task's next run to wait on.
    pub(super) fn begin_stop(
        &self,
        key: (String, u32),
        handle: TaskHandle,
        after: AfterStop,
    ) -> Stopping {
        let stopping = handle
            .stop(self.runner.shutdown_timeout, after)
            .boxed()
            .shared();
        tokio::spawn(stopping.clone());
        self.stopping_runs().insert(key, stopping.clone());
        stopping
    }

    pub(super) fn stopping_runs(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), Stopping>> {
        self.stopping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops every task here at once, letting each deliver what it holds (each bounded by the
    /// shutdown timeout), and waits for runs stopped earlier that are still stopping.
    pub async fn shutdown(&self) {
        let stops = {
            let _guard = self.operations.lock().await;
            let handles = std::mem::take(&mut *self.tasks.lock().await);
            let mut stops: Vec<Stopping> = self.stopping_runs().values().cloned().collect();
            for (key, handle) in handles {
                // UNASSIGNED once stopped, unless the run failed (even while stopping).
                stops.push(self.begin_stop(key, handle, AfterStop::Unassigned));
            }
            stops
        };
        settle(stops).await;
    }
}
