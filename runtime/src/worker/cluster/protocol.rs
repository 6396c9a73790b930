//! What workers tell each other through the group coordinator: each member's metadata in its
//! JoinGroup, and the leader's assignment to each member in SyncGroup. JSON, versioned by the
//! protocol name ([`PROTOCOL_NAME`]), so a worker of another version that cannot read it joins
//! with a protocol the group does not share and the coordinator refuses it with a clear error.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::rest::signature::SessionKey;

/// The group's protocol type: only medconnect workers join a group of this type.
pub const PROTOCOL_TYPE: &str = "medconnect";
/// The one protocol this version speaks: sticky balanced assignment, JSON encoded.
pub const PROTOCOL_NAME: &str = "medconnect-sticky-v1";

/// A unit of work: a connector (its status, for the worker that owns it) or one of its tasks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId {
    pub connector: String,
    pub task: u32,
}

impl TaskId {
    pub fn new(connector: &str, task: u32) -> Self {
        Self {
            connector: connector.to_string(),
            task,
        }
    }
}

/// What one worker runs: the connectors it owns and the tasks it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Work {
    #[serde(default)]
    pub connectors: BTreeSet<String>,
    #[serde(default)]
    pub tasks: BTreeSet<TaskId>,
}

impl Work {
    pub fn is_empty(&self) -> bool {
        self.connectors.is_empty() && self.tasks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.connectors.len() + self.tasks.len()
    }
}

/// A member's JoinGroup metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberMetadata {
    pub worker_id: String,
    /// Where the worker's REST API answers other workers (forwarded writes).
    pub url: String,
    /// How far the worker read the config topic (the next offset it will read).
    pub config_offset: i64,
    /// What it runs now: the leader keeps it there unless it must move (sticky).
    pub running: Work,
}

/// The leader's answer to one member in SyncGroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAssignment {
    pub leader_id: String,
    pub leader_url: String,
    /// How far the leader had read the config topic when it assigned.
    pub config_offset: i64,
    /// What this member runs in this generation.
    pub work: Work,
    /// Work taken from this member to give to another: once it stopped it, the member rejoins
    /// at once, so the next generation hands it over (never two owners at the same time).
    pub revoked: Work,
    /// Every member in this generation, by worker id with its REST URL.
    pub members: Vec<(String, String)>,
    /// Signs requests forwarded between members in this generation.
    pub session_key: SessionKey,
}
