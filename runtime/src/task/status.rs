//! Writes the state of one run of a task to the status topic.
//!
//! Every start of a task is a *run* with its own reporter, shared by the runner (RUNNING,
//! FAILED, active topics) and the herder (PAUSED/RUNNING on pause and resume, RESTARTING or
//! UNASSIGNED once the run is over). The reporter is the single gate for the run's status:
//! its writes are serialised, FAILED is final for the run, nothing but the herder's closing
//! write follows a closed run, and the store refuses statuses of runs older than its own.

use std::sync::Arc;

use tokio::sync::{Mutex, watch};

use super::RunState;
use crate::store::{ConnectorState, StatusStore, TaskStatus};
use crate::worker::secrets::Scrubber;

/// Where a run is in its life, as far as its status goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The runner has not reported the task started yet.
    Starting,
    /// The task started; pause and resume show.
    Started,
    /// The run failed: its status stays FAILED.
    Failed,
    /// The runner returned without failing: it writes nothing more, and nor does the herder
    /// but for its closing write.
    Finished,
    /// The herder is done with the run: nothing is written for it any more.
    Closed,
}

/// What the herder writes when it closes a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// Nothing: the status is removed (connector deleted or stopped, task no longer needed).
    Nothing,
    /// RESTARTING, even over FAILED: a new run follows.
    Restarting,
    /// UNASSIGNED, unless the run failed (the worker shuts down; FAILED stays visible).
    Unassigned,
}

struct Gate {
    phase: Phase,
    /// The state last written, so repeated reconciles write nothing new.
    written: Option<ConnectorState>,
}

struct Run {
    store: Arc<StatusStore>,
    connector: String,
    task_id: u32,
    worker_id: String,
    generation: u64,
    run: u64,
    assignment_generation: Option<i32>,
    run_state: watch::Receiver<RunState>,
    gate: Mutex<Gate>,
    /// Takes the values of the task's secret settings out of its traces and logged errors.
    scrubber: Scrubber,
}

#[derive(Clone)]
pub struct StatusReporter {
    run: Arc<Run>,
}

/// Who the reporter belongs to.
pub struct RunId<'a> {
    pub connector: &'a str,
    pub task_id: u32,
    pub worker_id: &'a str,
    /// The task-config generation the run was started with.
    pub generation: u64,
    /// The run's sequence number: larger than any earlier run of the task.
    pub run: u64,
    /// The cluster generation whose assignment started the run (none for a worker alone).
    pub assignment_generation: Option<i32>,
}

impl StatusReporter {
    /// A reporter for one run; `run_state` is what the herder wants (running or paused).
    pub fn new(
        store: Arc<StatusStore>,
        id: RunId<'_>,
        run_state: watch::Receiver<RunState>,
        scrubber: Scrubber,
    ) -> Self {
        Self {
            run: Arc::new(Run {
                scrubber,
                store,
                connector: id.connector.to_string(),
                task_id: id.task_id,
                worker_id: id.worker_id.to_string(),
                generation: id.generation,
                run: id.run,
                assignment_generation: id.assignment_generation,
                run_state,
                gate: Mutex::new(Gate {
                    phase: Phase::Starting,
                    written: None,
                }),
            }),
        }
    }

    pub fn connector(&self) -> &str {
        &self.run.connector
    }

    pub fn task_id(&self) -> u32 {
        self.run.task_id
    }

    /// The runner reports a state: RUNNING once started (shown as PAUSED while the herder
    /// wants the task paused), FAILED when it fails. Ignored once the run failed or finished.
    pub async fn report(&self, state: ConnectorState, trace: Option<String>) {
        let mut gate = self.run.gate.lock().await;
        if gate.phase != Phase::Starting && gate.phase != Phase::Started {
            tracing::debug!(connector = %self.run.connector, task = self.run.task_id, run = self.run.run, ?state, "run is over; status not written");
            return;
        }
        let state = match state {
            ConnectorState::Running => {
                gate.phase = Phase::Started;
                self.wanted()
            }
            ConnectorState::Failed => {
                gate.phase = Phase::Failed;
                state
            }
            other => other,
        };
        let trace = trace.map(|t| self.run.scrubber.text(&t));
        self.write(&mut gate, state, trace).await;
    }

    pub async fn failed(&self, error: &impl std::fmt::Display) {
        let error = self.run.scrubber.text(&error.to_string());
        tracing::error!(connector = %self.run.connector, task = self.run.task_id, run = self.run.run, %error, "task failed");
        self.report(ConnectorState::Failed, Some(error)).await;
    }

    /// The runner ended on its own, without reporting a failure: that is one, unless the run
    /// already failed or is over.
    pub(crate) async fn ended_unexpectedly(&self) {
        let mut gate = self.run.gate.lock().await;
        if gate.phase == Phase::Starting || gate.phase == Phase::Started {
            let error = "the task's runner ended without being stopped";
            tracing::error!(connector = %self.run.connector, task = self.run.task_id, run = self.run.run, %error, "task failed");
            gate.phase = Phase::Failed;
            self.write(&mut gate, ConnectorState::Failed, Some(error.to_string()))
                .await;
        }
    }

    pub async fn topic(&self, topic: &str) {
        let gate = self.run.gate.lock().await;
        if gate.phase == Phase::Closed {
            return;
        }
        if let Err(error) = self
            .run
            .store
            .add_topic(&self.run.connector, topic, self.run.task_id)
            .await
        {
            tracing::warn!(connector = %self.run.connector, %topic, %error, "cannot record active topic");
        }
        drop(gate);
    }

    /// The herder changed the wanted run state: shows it, if the task runs.
    pub(crate) async fn run_state_changed(&self) {
        let mut gate = self.run.gate.lock().await;
        if gate.phase == Phase::Started {
            let state = self.wanted();
            self.write(&mut gate, state, None).await;
        }
    }

    /// The runner returned (or panicked and that was reported): it reports nothing more.
    pub(crate) async fn finished(&self) {
        let mut gate = self.run.gate.lock().await;
        if gate.phase == Phase::Starting || gate.phase == Phase::Started {
            gate.phase = Phase::Finished;
        }
    }

    /// The herder is done with this run: writes `after`, then nothing more for the run. A write
    /// in progress completes first, so nothing of this run follows `after` in the log.
    pub(crate) async fn close(&self, after: AfterStop) {
        let mut gate = self.run.gate.lock().await;
        if gate.phase == Phase::Closed {
            return;
        }
        let failed = gate.phase == Phase::Failed;
        gate.phase = Phase::Closed;
        match after {
            AfterStop::Nothing => {}
            AfterStop::Unassigned if failed => {}
            AfterStop::Unassigned => {
                self.write(&mut gate, ConnectorState::Unassigned, None)
                    .await
            }
            AfterStop::Restarting => {
                self.write(&mut gate, ConnectorState::Restarting, None)
                    .await
            }
        }
    }

    fn wanted(&self) -> ConnectorState {
        match *self.run.run_state.borrow() {
            RunState::Running => ConnectorState::Running,
            RunState::Paused => ConnectorState::Paused,
        }
    }

    /// Writes under the gate, so the log holds the run's states in the order they were decided.
    async fn write(&self, gate: &mut Gate, state: ConnectorState, trace: Option<String>) {
        if trace.is_none() && gate.written == Some(state) {
            return;
        }
        let status = TaskStatus {
            state,
            trace,
            worker_id: self.run.worker_id.clone(),
            generation: self.run.generation,
            run: self.run.run,
            assignment_generation: self.run.assignment_generation,
        };
        match self
            .run
            .store
            .put_task(&self.run.connector, self.run.task_id, &status)
            .await
        {
            Ok(true) => gate.written = Some(state),
            Ok(false) => {
                // A later run of this task reported: this one is over, whatever it thinks.
                gate.phase = Phase::Closed;
            }
            Err(error) => {
                tracing::warn!(connector = %self.run.connector, task = self.run.task_id, %error, "cannot record task status")
            }
        }
    }
}
