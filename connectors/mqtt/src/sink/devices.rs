//! The sink towards the devices connected to a listener source (`mqtt.sink.target=listener`),
//! on this worker and, through [`crate::relay`], on every other worker of the cluster: each
//! record goes to every connected device whose subscription matches its topic, at QoS 1 (or
//! 0), and counts as delivered once each of them PUBACKed it. A record with no such device
//! waits — through the device's reconnections — up to `mqtt.delivery.timeout.ms`, then is
//! reported as errant (dead-letter topic with `__connect.errors.*` headers, or task failure,
//! per `errors.tolerance`). `pre_commit` commits only up to the first record not yet settled
//! that way.
//!
//! Records for one MQTT topic go one at a time, in offset order (a device gets its commands
//! in order, also after a reconnect); different topics go in parallel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use medconnect_api::acknowledgements::Tracker;
use medconnect_api::relay::Peers;
use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordReporter, SinkOffsets, SinkRecord, SinkTask,
    SinkTaskContext, TopicPartition,
};
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SinkConfig;
use crate::listener::hub::{self, Round};
use crate::relay;

/// How often a record waiting for its device looks for a listener that is not running on this
/// worker yet.
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// How long one round waits for a device to (re)subscribe when none took the message yet.
/// Another worker's listener answers a round at its end, so this bounds how late a device
/// that subscribed there gets a waiting message.
const WAIT_FOR_SUBSCRIBER: Duration = Duration::from_secs(1);

/// One record on its way to its devices.
struct Job {
    record: SinkRecord,
    partition: TopicPartition,
    offset: i64,
    topic: String,
    deadline: Instant,
}

/// What the delivery loop needs.
struct Context {
    connector: String,
    listener: String,
    qos: QoS,
    timeout: Duration,
    max_queued: usize,
    errant: ErrantRecordReporter,
    tracker: Arc<Tracker>,
    /// The other workers, whose listeners hold the devices connected there.
    peers: Arc<dyn Peers>,
}

impl Context {
    /// Settles a record: delivered, or reported as errant first (a failing report fails the
    /// task, and the record stays unsettled so nothing past it is committed).
    async fn settle(&self, job: Job, outcome: Result<(), String>) {
        if let Err(reason) = outcome {
            tracing::warn!(connector = %self.connector, listener = %self.listener, mqtt_topic = %job.topic, partition = job.partition.partition, offset = job.offset, %reason, "a message did not reach its device");
            if let Err(error) = self
                .errant
                .report(job.record, ConnectError::data(reason))
                .await
            {
                self.tracker.fail(error);
                return;
            }
        }
        self.tracker.settle([(&job.partition, job.offset)]);
    }
}

pub struct DeviceSink {
    context: Arc<Context>,
    config: SinkConfig,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    /// Per partition, the offset after the last record queued: a batch put again is not
    /// queued twice.
    next: HashMap<TopicPartition, i64>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for DeviceSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSink")
            .field("connector", &self.context.connector)
            .field("listener", &self.context.listener)
            .finish()
    }
}

impl DeviceSink {
    pub fn new(config: SinkConfig, listener: String, context: SinkTaskContext) -> Self {
        Self {
            context: Arc::new(Context {
                connector: context.connector_name,
                listener,
                qos: if config.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                },
                timeout: config.delivery_timeout,
                max_queued: config.device_max_queued,
                errant: context.errant_records,
                tracker: Arc::new(Tracker::default()),
                peers: context.peers,
            }),
            config,
            jobs: None,
            next: HashMap::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    async fn wind_down(&mut self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        self.jobs = None;
    }
}

#[async_trait]
impl SinkTask for DeviceSink {
    async fn start(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        self.shutdown = CancellationToken::new();
        self.tasks = TaskTracker::new();
        let (jobs, receiver) = mpsc::unbounded_channel();
        self.tasks.spawn(dispatch(
            self.context.clone(),
            receiver,
            self.shutdown.clone(),
        ));
        self.jobs = Some(jobs);
        if hub::find(&self.context.listener).is_none() {
            tracing::warn!(connector = %self.context.connector, listener = %self.context.listener, "no MQTT listener of that name runs on this worker (yet): records wait for it up to mqtt.delivery.timeout.ms");
        }
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        self.context.tracker.check()?;
        let jobs = self
            .jobs
            .clone()
            .ok_or_else(|| ConnectError::fatal("MQTT sink used before start"))?;
        for record in records {
            let partition =
                TopicPartition::new(record.record.topic.clone(), record.kafka_partition);
            let offset = record.kafka_offset;
            if self.next.get(&partition).is_some_and(|next| offset < *next) {
                continue;
            }
            self.next.insert(partition.clone(), offset + 1);
            let topic = match self.config.topic.render(&record.record) {
                Ok(topic) => topic,
                Err(error) => {
                    self.context
                        .errant
                        .report(record, ConnectError::data(error.to_string()))
                        .await?;
                    continue;
                }
            };
            self.context.tracker.add(partition.clone(), offset);
            let job = Job {
                record,
                partition,
                offset,
                topic,
                deadline: Instant::now() + self.context.timeout,
            };
            jobs.send(job)
                .map_err(|_| ConnectError::fatal("the MQTT delivery loop has stopped"))?;
        }
        // Bounded memory: at most mqtt.inflight records on their way.
        let limit = usize::from(self.config.inflight);
        self.context
            .tracker
            .wait_until(|state| state.count() < limit)
            .await
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        self.context
            .tracker
            .wait_until(|state| state.count() == 0)
            .await
    }

    async fn pre_commit(&mut self, offsets: &SinkOffsets) -> ConnectResult<SinkOffsets> {
        self.context.tracker.check()?;
        Ok(self.context.tracker.lock().committable(offsets))
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        // Records of these partitions still queued are still delivered (their next owner may
        // deliver them again: at least once); only their bookkeeping goes.
        self.context.tracker.forget(partitions);
        for partition in partitions {
            self.next.remove(partition);
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        Ok(())
    }
}

/// Queues records per MQTT topic and delivers the head of each queue.
async fn dispatch(
    context: Arc<Context>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    shutdown: CancellationToken,
) {
    let mut lanes: HashMap<String, VecDeque<Job>> = HashMap::new();
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            job = jobs.recv() => {
                let Some(job) = job else { return };
                let lane = lanes.entry(job.topic.clone()).or_default();
                if lane.len() >= context.max_queued {
                    let reason = format!(
                        "{} records already wait for MQTT topic '{}' (mqtt.device.max.queued): its device is away or slow",
                        lane.len(),
                        job.topic
                    );
                    context.settle(job, Err(reason)).await;
                    continue;
                }
                if lane.is_empty() {
                    running.push(deliver(context.clone(), &job));
                }
                lane.push_back(job);
            }
            Some((topic, outcome)) = running.next(), if !running.is_empty() => {
                let Some(lane) = lanes.get_mut(&topic) else { continue };
                let done = lane.pop_front();
                match lane.front() {
                    Some(next) => running.push(deliver(context.clone(), next)),
                    None => {
                        lanes.remove(&topic);
                    }
                }
                if let Some(job) = done {
                    context.settle(job, outcome).await;
                }
            }
        }
    }
}

/// Delivers `job`'s value to its devices; resolves with its topic and the outcome.
fn deliver(
    context: Arc<Context>,
    job: &Job,
) -> impl Future<Output = (String, Result<(), String>)> + use<> {
    let topic = job.topic.clone();
    let payload = job.record.record.value.clone().unwrap_or_default();
    let deadline = job.deadline;
    async move {
        let outcome = deliver_until(&context, &topic, payload, deadline).await;
        (topic, outcome)
    }
}

/// Sends the message to every device subscribed to `topic` — on this worker's listener and on
/// every other worker's — that has not acknowledged it yet, again after a device's connection
/// ended before its PUBACK, until all of them did or the deadline passed.
async fn deliver_until(
    context: &Context,
    topic: &str,
    payload: Bytes,
    deadline: Instant,
) -> Result<(), String> {
    let mut acknowledged: HashSet<String> = HashSet::new();
    // Devices whose connection ended with the message unacknowledged.
    let mut owed: HashSet<String> = HashSet::new();
    let timeout = context.timeout;
    let gave_up = |owed: &HashSet<String>| {
        if owed.is_empty() {
            format!(
                "no device subscribed to '{topic}' on listener '{}' (on any worker) acknowledged the message within {timeout:?}",
                context.listener
            )
        } else {
            let mut names: Vec<&String> = owed.iter().collect();
            names.sort();
            format!(
                "device(s) {names:?} disconnected before acknowledging the message on '{topic}' and did not take it again within {timeout:?}"
            )
        }
    };
    // The first round goes to the devices there are; later ones wait for one to (re)subscribe.
    let mut first = true;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(gave_up(&owed));
        }
        let wait_for_subscriber = if first {
            now
        } else {
            (now + WAIT_FOR_SUBSCRIBER).min(deadline)
        };
        first = false;
        let local = local_round(
            context,
            topic,
            payload.clone(),
            &acknowledged,
            wait_for_subscriber,
            deadline,
        );
        let others = context.peers.others();
        let remote = join_all(others.iter().map(|peer| {
            relay::remote_round(
                context.peers.as_ref(),
                peer,
                &context.listener,
                topic,
                &payload,
                context.qos,
                &acknowledged,
                wait_for_subscriber,
                deadline,
            )
        }));
        let (local, remote) = tokio::join!(local, remote);
        for round in std::iter::once(local).chain(remote) {
            if let Some((client_id, reason)) = round.refused {
                return Err(format!(
                    "device '{client_id}' refused the message on '{topic}': {reason}"
                ));
            }
            for client_id in round.owed {
                if !acknowledged.contains(&client_id) {
                    owed.insert(client_id);
                }
            }
            for client_id in round.acknowledged {
                owed.remove(&client_id);
                acknowledged.insert(client_id);
            }
        }
        if owed.is_empty() && !acknowledged.is_empty() {
            return Ok(());
        }
    }
}

/// One round on this worker's listener; with none running here (yet), waits for it until
/// `wait_for_subscriber`.
async fn local_round(
    context: &Context,
    topic: &str,
    payload: Bytes,
    skip: &HashSet<String>,
    wait_for_subscriber: Instant,
    deadline: Instant,
) -> Round {
    loop {
        if let Some(hub) = hub::find(&context.listener) {
            return hub
                .deliver_round(
                    topic,
                    payload,
                    context.qos,
                    skip,
                    wait_for_subscriber,
                    deadline,
                )
                .await;
        }
        if Instant::now() >= wait_for_subscriber {
            return Round::default();
        }
        tokio::time::sleep_until((Instant::now() + LOOK_AGAIN).min(wait_for_subscriber)).await;
    }
}
