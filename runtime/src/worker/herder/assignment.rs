//! Which worker runs which task: the seam the cluster fills.

use medconnect_api::Placement;

/// Decides which connectors and tasks this worker runs. The herder asks it at each reconcile,
/// and runs exactly the tasks it names.
pub trait Assignment: Send + Sync {
    /// Whether this worker owns the connector: the owner records the connector's status.
    fn owns_connector(&self, connector: &str) -> bool;

    /// The ids of the connector's tasks that run here. `task_count` is the number of task
    /// configs the config topic holds; every-worker connectors run one task per worker, with
    /// ids the cluster gives out.
    fn tasks_here(&self, connector: &str, placement: Placement, task_count: usize) -> Vec<u32>;

    /// The cluster generation the current assignment came with, recorded in the statuses of
    /// what starts under it; none for a worker alone.
    fn generation(&self) -> Option<i32> {
        None
    }
}

/// A worker alone: every connector and every task runs here (an every-worker connector's one
/// task too).
#[derive(Debug, Default, Clone, Copy)]
pub struct EveryTaskHere;

impl Assignment for EveryTaskHere {
    fn owns_connector(&self, _connector: &str) -> bool {
        true
    }

    fn tasks_here(&self, _connector: &str, placement: Placement, task_count: usize) -> Vec<u32> {
        match placement {
            Placement::Distributed => (0..task_count as u32).collect(),
            Placement::EveryWorker => (0..task_count.min(1) as u32).collect(),
        }
    }
}
