//! The worker cluster: who is alive is decided by Kafka's group coordinator, and the leader it
//! elects assigns connectors and tasks.
//!
//! Every worker joins the group `group_id` with the protocol type `medconnect` (not
//! `consumer`: librdkafka cannot join with another type, so [`coordinator`] speaks
//! JoinGroup/SyncGroup/Heartbeat/LeaveGroup itself). Its JoinGroup metadata says what it runs;
//! the leader computes a balanced, sticky, cooperative assignment ([`assignor`]) from its
//! config snapshot and hands each member its share in SyncGroup ([`protocol`]). A member
//! applies its share through the herder's [`Assignment`](super::Assignment) seam: what it
//! lost stops, what it gained starts.
//!
//! Losing membership (the coordinator says the member is unknown or of an old generation, or
//! no heartbeat succeeded for nearly a session timeout) stops every task here before anything
//! else, so a worker cut off from Kafka, or paused past its session, never writes beside the
//! tasks' new owners.

pub mod assignor;
pub mod coordinator;
pub mod departed;
pub mod protocol;
mod scram;
pub mod security;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use medconnect_api::Placement;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::assignor::Demand;
use self::coordinator::{Coordinator, CoordinatorError, Joined, code};
use self::departed::Departed;
use self::protocol::{MemberAssignment, MemberMetadata, PROTOCOL_NAME, PROTOCOL_TYPE, Work};
use self::security::Security;
use super::herder::{Assignment, Herder};
use crate::rest::signature::SessionKey;
use crate::store::ConfigStore;

/// The `[cluster]` table of the worker config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `false` runs the worker alone (every task here, no group): `medconnect dev` does.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A worker that sent no heartbeat for this long is dead to the coordinator: its work
    /// moves. Kafka refuses less than its `group.min.session.timeout.ms` (6 s by default).
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// How long the coordinator waits for every member to rejoin in a rebalance.
    #[serde(default = "default_rebalance_timeout_ms")]
    pub rebalance_timeout_ms: u64,
    /// How long the leader waits before sending its SyncGroup. 0 for Kafka; librdkafka's mock
    /// cluster ends a sync as soon as the leader's assignments arrive and refuses the followers'
    /// SyncGroups that come after (INVALID_REQUEST), so against it give the followers ~200 ms.
    #[serde(default)]
    pub leader_sync_delay_ms: u64,
    /// Connect's `scheduled.rebalance.max.delay.ms`: how long the work of a worker that left
    /// waits for it to come back before it moves to the others. 0 (default): it moves at once.
    #[serde(default)]
    pub scheduled_rebalance_max_delay_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            session_timeout_ms: default_session_timeout_ms(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            rebalance_timeout_ms: default_rebalance_timeout_ms(),
            leader_sync_delay_ms: 0,
            scheduled_rebalance_max_delay_ms: 0,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_session_timeout_ms() -> u64 {
    6_000
}
fn default_heartbeat_interval_ms() -> u64 {
    1_000
}
fn default_rebalance_timeout_ms() -> u64 {
    60_000
}

impl ClusterConfig {
    fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.session_timeout_ms)
    }
    fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    fn rebalance_timeout(&self) -> Duration {
        Duration::from_millis(self.rebalance_timeout_ms)
    }
}

/// What this worker knows of the cluster, for REST and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Set once a generation was joined and its assignment applied; cleared when lost.
    pub generation: Option<i32>,
    pub leader_url: Option<String>,
    pub is_leader: bool,
    /// Live members by worker id, with their REST URLs.
    pub members: Vec<(String, String)>,
    /// Signs and checks requests between members ([`crate::rest::signature`]).
    pub session_key: SessionKey,
}

/// The work this worker was assigned, and in which generation: the herder runs exactly this.
#[derive(Debug, Default)]
pub struct ClusterAssignment {
    work: Mutex<Work>,
    generation: Mutex<Option<i32>>,
}

impl ClusterAssignment {
    fn set(&self, work: Work, generation: Option<i32>) {
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = generation;
        *self.work.lock().unwrap_or_else(PoisonError::into_inner) = work;
    }

    fn current(&self) -> Work {
        self.work
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Assignment for ClusterAssignment {
    fn owns_connector(&self, connector: &str) -> bool {
        self.work
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .connectors
            .contains(connector)
    }

    fn tasks_here(&self, connector: &str, _placement: Placement, _task_count: usize) -> Vec<u32> {
        self.work
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .iter()
            .filter(|t| t.connector == connector)
            .map(|t| t.task)
            .collect()
    }

    fn generation(&self) -> Option<i32> {
        *self
            .generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs this worker's group membership until `shutdown`.
pub struct Membership {
    pub config: ClusterConfig,
    pub bootstrap_servers: String,
    /// TLS and SASL for the coordinator connection, from the workers' Kafka settings.
    pub security: Security,
    pub group_id: String,
    pub worker_id: String,
    pub url: String,
    pub herder: Arc<Herder>,
    pub configs: Arc<ConfigStore>,
    pub assignment: Arc<ClusterAssignment>,
    pub view: watch::Sender<ClusterView>,
    /// What the leader assigned from in its last generation: connectors created since (even
    /// while it was assigning) make it rebalance.
    pub assigned: Mutex<Demand>,
    /// The leader's memory of workers that left ([`departed`]).
    pub departed: Mutex<Departed>,
}

/// How a stable generation ended.
enum Stable {
    Rebalance,
    Shutdown,
    /// The fencing deadline passed without a heartbeat answered.
    Lost,
    Failed(CoordinatorError),
}

/// What the membership loop does next after a failed request.
enum Next {
    Rejoin,
    Reconnect,
}

impl Membership {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut member_id = String::new();
        // Until this moment, nothing runs here: a member that has not joined owns no work.
        let mut deadline: Option<Instant> = None;
        'connect: loop {
            let connected = tokio::select! {
                c = Coordinator::connect(&self.bootstrap_servers, &self.group_id, &self.worker_id, &self.security, self.config.session_timeout()) => c,
                _ = self.fence_at(deadline) => {
                    self.lose("no heartbeat reached the coordinator within the session timeout").await;
                    deadline = None;
                    continue 'connect;
                }
                _ = shutdown.cancelled() => return,
            };
            let mut coordinator = match connected {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, group = %self.group_id, "cannot reach the group coordinator");
                    tokio::select! {
                        _ = tokio::time::sleep(self.config.heartbeat_interval()) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue 'connect;
                }
            };
            loop {
                // While its JoinGroup waits, a member is alive to the coordinator until the
                // rebalance timeout, not the session timeout.
                let joining_deadline = deadline.map(|d| {
                    d.max(
                        Instant::now()
                            + self
                                .config
                                .rebalance_timeout()
                                .saturating_sub(self.config.heartbeat_interval()),
                    )
                });
                let joined = tokio::select! {
                    j = self.join_and_sync(&mut coordinator, &mut member_id) => j,
                    _ = self.fence_at(joining_deadline) => {
                        self.lose("the rebalance outlasted the rebalance timeout").await;
                        deadline = None;
                        continue 'connect;
                    }
                    _ = shutdown.cancelled() => { self.leave(&mut coordinator, &member_id).await; return; }
                };
                let (joined, assignment) = match joined {
                    Ok(done) => done,
                    Err(error) => {
                        match self
                            .after_failure(&error, &mut member_id, &mut deadline)
                            .await
                        {
                            Next::Rejoin => continue,
                            Next::Reconnect => continue 'connect,
                        }
                    }
                };
                let synced_at = Instant::now();
                let revoked = !assignment.revoked.is_empty();
                self.apply(&joined, assignment).await;
                deadline = Some(synced_at + self.fence_after());
                if revoked {
                    // What was revoked has stopped: rejoin now so its new owner gets it.
                    continue;
                }
                match self
                    .heartbeat_until_rebalance(&mut coordinator, &joined, &mut deadline, &shutdown)
                    .await
                {
                    Stable::Rebalance => continue,
                    Stable::Shutdown => {
                        self.leave(&mut coordinator, &member_id).await;
                        return;
                    }
                    Stable::Lost => {
                        self.lose(
                            "no heartbeat reached the coordinator within the session timeout",
                        )
                        .await;
                        deadline = None;
                        continue 'connect;
                    }
                    Stable::Failed(error) => {
                        match self
                            .after_failure(&error, &mut member_id, &mut deadline)
                            .await
                        {
                            Next::Rejoin => continue,
                            Next::Reconnect => continue 'connect,
                        }
                    }
                }
            }
        }
    }

    /// How long after the last heartbeat the coordinator saw this member may still count it
    /// as alive: a heartbeat interval short of the session timeout, so the tasks here stop
    /// before the coordinator gives them to someone else.
    fn fence_after(&self) -> Duration {
        self.config
            .session_timeout()
            .saturating_sub(self.config.heartbeat_interval())
    }

    async fn fence_at(&self, deadline: Option<Instant>) {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }

    async fn join_and_sync(
        &self,
        coordinator: &mut Coordinator,
        member_id: &mut String,
    ) -> Result<(Joined, MemberAssignment), CoordinatorError> {
        let metadata = MemberMetadata {
            worker_id: self.worker_id.clone(),
            url: self.url.clone(),
            config_offset: self.configs.position(),
            running: self.assignment.current(),
        };
        let metadata = Bytes::from(serde_json::to_vec(&metadata).unwrap_or_default());
        let joined = coordinator
            .join(
                member_id,
                PROTOCOL_TYPE,
                PROTOCOL_NAME,
                metadata,
                self.config.session_timeout(),
                self.config.rebalance_timeout(),
            )
            .await?;
        // Kept even if the sync fails: rejoining with it spares the group a ghost member.
        member_id.clone_from(&joined.member_id);
        let assignments = if joined.is_leader() {
            let assignments = self.lead(&joined).await;
            if self.config.leader_sync_delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(self.config.leader_sync_delay_ms)).await;
            }
            assignments
        } else {
            Vec::new()
        };
        let answer = coordinator
            .sync(joined.generation, &joined.member_id, assignments)
            .await?;
        let assignment: MemberAssignment =
            serde_json::from_slice(&answer).map_err(|e| CoordinatorError::Protocol {
                request: "SyncGroup",
                reason: format!(
                    "the leader's assignment ({} bytes) is not one this worker reads: {e}",
                    answer.len()
                ),
            })?;
        Ok((joined, assignment))
    }

    /// The leader's part: read the config topic as far as any member did, then assign.
    async fn lead(&self, joined: &Joined) -> Vec<(String, Bytes)> {
        let mut members: BTreeMap<String, MemberMetadata> = BTreeMap::new();
        for member in &joined.members {
            match serde_json::from_slice::<MemberMetadata>(&member.metadata) {
                Ok(metadata) => {
                    members.insert(member.member_id.clone(), metadata);
                }
                Err(error) => {
                    tracing::warn!(member = %member.member_id, %error, "a member's metadata is unreadable; it gets no work");
                    members.insert(
                        member.member_id.clone(),
                        MemberMetadata {
                            worker_id: member.member_id.clone(),
                            url: String::new(),
                            config_offset: 0,
                            running: Work::default(),
                        },
                    );
                }
            }
        }
        let furthest = members.values().map(|m| m.config_offset).max().unwrap_or(0);
        if let Err(error) = self.configs.read_to(furthest).await {
            tracing::warn!(%error, "the leader could not read the config topic as far as a member did");
        }
        let demand = self.herder.demand();
        *self.assigned.lock().unwrap_or_else(PoisonError::into_inner) = demand.clone();
        let present = members.values().map(|m| m.worker_id.clone()).collect();
        let held = self
            .departed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .before_assign(
                &present,
                Instant::now(),
                Duration::from_millis(self.config.scheduled_rebalance_max_delay_ms),
            );
        if !held.work.is_empty() {
            tracing::info!(
                held = held.work.len(),
                "holding the work of workers that left until they come back or the delay is over"
            );
        }
        let mut to_assign = demand.clone();
        to_assign
            .connectors
            .retain(|c| !held.work.connectors.contains(c));
        to_assign.tasks.retain(|t| !held.work.tasks.contains(t));
        let running: BTreeMap<String, Work> = members
            .iter()
            .map(|(id, m)| {
                let mut running = m.running.clone();
                // A worker that came back within the delay keeps what it had.
                if let Some(back) = held.returning.get(&m.worker_id) {
                    running.connectors.extend(back.connectors.iter().cloned());
                    running.tasks.extend(back.tasks.iter().cloned());
                }
                (id.clone(), running)
            })
            .collect();
        let shares = assignor::assign(&to_assign, &running);
        let given = shares
            .iter()
            .filter_map(|(member, share)| {
                Some((members.get(member)?.worker_id.clone(), share.work.clone()))
            })
            .collect();
        self.departed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .after_assign(given);
        // Every-worker tasks numbered past the member count belonged to workers now gone.
        let herder = self.herder.clone();
        let count = members.len() as u32;
        let every_worker = demand.every_worker.clone();
        tokio::spawn(async move {
            for connector in every_worker {
                herder.forget_tasks_from(&connector, count).await;
            }
        });
        let session_key = SessionKey::random();
        let roster: Vec<(String, String)> = members
            .values()
            .map(|m| (m.worker_id.clone(), m.url.clone()))
            .collect();
        shares
            .into_iter()
            .map(|(member, share)| {
                let assignment = MemberAssignment {
                    leader_id: joined.member_id.clone(),
                    leader_url: self.url.clone(),
                    config_offset: self.configs.position(),
                    work: share.work,
                    revoked: share.revoked,
                    members: roster.clone(),
                    session_key: session_key.clone(),
                };
                let bytes = serde_json::to_vec(&assignment).unwrap_or_default();
                (member, Bytes::from(bytes))
            })
            .collect()
    }

    /// Runs this member's share: stops what it lost (waiting for those stops), starts the rest.
    async fn apply(&self, joined: &Joined, assignment: MemberAssignment) {
        tracing::info!(
            generation = joined.generation,
            leader = joined.is_leader(),
            connectors = assignment.work.connectors.len(),
            tasks = assignment.work.tasks.len(),
            revoked = assignment.revoked.len(),
            members = assignment.members.len(),
            "joined the cluster"
        );
        if let Err(error) = self.configs.read_to(assignment.config_offset).await {
            tracing::warn!(%error, "cannot read the config topic as far as the leader did");
        }
        self.assignment
            .set(assignment.work, Some(joined.generation));
        self.herder.reconcile_and_wait().await;
        self.view.send_replace(ClusterView {
            generation: Some(joined.generation),
            leader_url: Some(assignment.leader_url),
            is_leader: joined.is_leader(),
            members: assignment.members,
            session_key: assignment.session_key,
        });
    }

    /// Heartbeats until a rebalance, shutdown, a failure, or the fencing deadline (a worker
    /// frozen past it, SIGSTOP or a long pause, finds it passed the moment it runs again). The
    /// leader also rejoins when the config topic asks for work nobody was given.
    async fn heartbeat_until_rebalance(
        &self,
        coordinator: &mut Coordinator,
        joined: &Joined,
        deadline: &mut Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Stable {
        let mut changes = self.configs.changes();
        let assigned = self
            .assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // Connectors created while this generation was being assigned are in no one's share.
        if joined.is_leader() && self.herder.demand() != assigned {
            tracing::info!("connectors changed while assigning: rebalancing");
            return Stable::Rebalance;
        }
        let release = self
            .departed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_release()
            .filter(|_| joined.is_leader());
        loop {
            tokio::select! {
                biased;
                _ = self.fence_at(*deadline) => return Stable::Lost,
                _ = shutdown.cancelled() => return Stable::Shutdown,
                // Held work of a worker that did not come back in time moves now.
                _ = self.fence_at(release) => return Stable::Rebalance,
                _ = tokio::time::sleep(self.config.heartbeat_interval()) => {}
                changed = changes.changed(), if joined.is_leader() => {
                    if changed.is_ok() {
                        // Let a burst (connector, task configs, commit) land first.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        changes.borrow_and_update();
                        if self.herder.demand() != assigned {
                            tracing::info!("connectors changed: rebalancing");
                            return Stable::Rebalance;
                        }
                    }
                    continue;
                }
            }
            let sent = Instant::now();
            let beat = tokio::select! {
                biased;
                _ = self.fence_at(*deadline) => return Stable::Lost,
                beat = coordinator.heartbeat(joined.generation, &joined.member_id) => beat,
            };
            match beat {
                Ok(()) => *deadline = Some(sent + self.fence_after()),
                Err(error) if error.code() == Some(code::REBALANCE_IN_PROGRESS) => {
                    return Stable::Rebalance;
                }
                Err(error) => return Stable::Failed(error),
            }
        }
    }

    async fn after_failure(
        &self,
        error: &CoordinatorError,
        member_id: &mut String,
        deadline: &mut Option<Instant>,
    ) -> Next {
        match error.code() {
            Some(code::REBALANCE_IN_PROGRESS) => Next::Rejoin,
            Some(code::UNKNOWN_MEMBER_ID | code::ILLEGAL_GENERATION | code::FENCED_INSTANCE_ID) => {
                self.lose(&error.to_string()).await;
                *deadline = None;
                if error.code() == Some(code::UNKNOWN_MEMBER_ID) {
                    member_id.clear();
                }
                Next::Rejoin
            }
            _ if error.needs_rediscovery() => {
                tracing::warn!(%error, "lost the group coordinator; finding it again");
                Next::Reconnect
            }
            _ => {
                tracing::warn!(%error, "cannot take part in the cluster's group");
                tokio::time::sleep(self.config.heartbeat_interval()).await;
                Next::Reconnect
            }
        }
    }

    /// Membership is gone: every task here stops before anything else happens.
    async fn lose(&self, reason: &str) {
        tracing::warn!(reason, "lost cluster membership: stopping every task here");
        self.view.send_modify(|view| view.generation = None);
        self.assignment.set(Work::default(), None);
        self.herder.reconcile_and_wait().await;
    }

    /// Stops the work here, then leaves the group so the others rebalance at once.
    async fn leave(&self, coordinator: &mut Coordinator, member_id: &str) {
        self.assignment.set(Work::default(), None);
        self.herder.reconcile_and_wait().await;
        if member_id.is_empty() {
            return;
        }
        match coordinator.leave(member_id).await {
            Ok(()) => tracing::info!("left the cluster"),
            Err(error) => {
                tracing::warn!(%error, "could not leave the group; the others wait for the session timeout")
            }
        }
    }
}

/// What the config snapshot asks to run, for the assignor.
pub(crate) fn demand_of<'a>(
    connectors: impl Iterator<Item = (&'a String, usize, bool, Placement)>,
) -> Demand {
    let mut demand = Demand::default();
    for (name, tasks, stopped, placement) in connectors {
        demand.connectors.insert(name.clone());
        if stopped {
            continue;
        }
        match placement {
            Placement::EveryWorker => {
                demand.every_worker.insert(name.clone());
            }
            Placement::Distributed => {
                for task in 0..tasks as u32 {
                    demand.tasks.insert(protocol::TaskId::new(name, task));
                }
            }
        }
    }
    demand
}
