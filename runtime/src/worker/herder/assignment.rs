//! Which worker runs which task: the seam the cluster fills.

/// Decides whether a connector's task runs on this worker. The herder asks it for every task
/// of every connector at each reconcile, and runs exactly the tasks it answers `true` for.
pub trait Assignment: Send + Sync {
    fn runs_here(&self, connector: &str, task: u32) -> bool;
}

/// A worker alone: every task runs here.
#[derive(Debug, Default, Clone, Copy)]
pub struct EveryTaskHere;

impl Assignment for EveryTaskHere {
    fn runs_here(&self, _connector: &str, _task: u32) -> bool {
        true
    }
}
