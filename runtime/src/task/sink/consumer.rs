//! The task's consumer: its group membership, and rebalances handed to the runner, which
//! (un)assigns partitions once the task dealt with them.

use std::sync::{Arc, Mutex};

use medconnect_api::TopicPartition;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use tokio::sync::mpsc;

use crate::kafka::{KafkaSettings, KafkaSetupError};

use super::lock;

/// A change of the task's partitions, handed from the consumer's rebalance callback to the
/// runner, which (un)assigns them once it dealt with them.
#[derive(Debug)]
pub(super) enum Rebalance {
    Assign(Vec<TopicPartition>),
    Revoke(Vec<TopicPartition>),
}

/// The consumer's context: forwards rebalances to the runner while it handles them, and
/// applies them itself (as rdkafka's default does) once the runner stopped listening, e.g.
/// while the consumer closes.
pub struct RebalanceContext {
    pub(super) runner: Mutex<Option<mpsc::UnboundedSender<Rebalance>>>,
}

impl RebalanceContext {
    /// From now on rebalances are applied at once, without the runner.
    pub(super) fn detach(&self) {
        lock(&self.runner).take();
    }
}

impl ClientContext for RebalanceContext {}

/// Detaches the runner from the consumer's rebalances when dropped: a runner dropped midway
/// (a panic, a run abandoned at shutdown) must not leave the consumer's close waiting for an
/// unassignment nobody will make (`BaseConsumer`'s drop polls until the group is left).
pub(super) struct Detach(pub(super) Arc<RebalanceContext>);

impl Drop for Detach {
    fn drop(&mut self) {
        self.0.detach();
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions = partitions_of(tpl);
        let event = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(partitions),
            other => {
                // rdkafka calls this only for assignments and revocations.
                tracing::warn!(error = ?other, "unexpected rebalance event");
                return;
            }
        };
        let event = match lock(&self.runner).as_ref() {
            Some(runner) => match runner.send(event) {
                Ok(()) => return,
                Err(mpsc::error::SendError(event)) => event,
            },
            None => event,
        };
        let applied = match event {
            Rebalance::Assign(_) => assign(consumer, tpl),
            Rebalance::Revoke(_) => unassign(consumer, tpl),
        };
        if let Err(error) = applied {
            tracing::warn!(%error, "cannot apply a rebalance");
        }
    }
}

/// Assigns partitions the way the group's rebalance protocol requires.
pub(super) fn assign<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_assign(partitions),
        _ => consumer.assign(partitions),
    }
}

/// Unassigns revoked partitions: only those under the cooperative protocol, all of them under
/// the eager one (which always revokes the whole assignment).
pub(super) fn unassign<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &TopicPartitionList,
) -> KafkaResult<()> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(partitions),
        _ => consumer.unassign(),
    }
}

pub(super) fn protocol_name<C: ConsumerContext>(consumer: &impl Consumer<C>) -> &'static str {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => "cooperative",
        RebalanceProtocol::Eager => "eager",
        RebalanceProtocol::None => "none",
    }
}

pub(super) fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

pub(super) type GroupConsumer = StreamConsumer<RebalanceContext>;

/// How often a sink's consumer refreshes its topic metadata. librdkafka looks for a
/// subscribed topic that does not exist yet only at this refresh (5 minutes by default; the
/// Java consumer Kafka Connect uses asks again at once), so a sink created before its topic
/// exists (a source and its sink created together, the source's topic made by its first
/// record) would read nothing for up to 5 minutes. One small metadata request per sink task
/// every 5 s; `consumer.override.topic.metadata.refresh.interval.ms` or the worker's
/// `[consumer]` settings change it.
pub const TOPIC_DISCOVERY: (&str, &str) = ("topic.metadata.refresh.interval.ms", "5000");

/// A sink task's group consumer, with the rebalances it hands to the runner.
pub struct SinkConsumer {
    pub(super) consumer: GroupConsumer,
    pub(super) rebalances: mpsc::UnboundedReceiver<Rebalance>,
}

impl SinkConsumer {
    /// A consumer in group `group_id`. Unless the worker's or the connector's settings say
    /// otherwise, it looks for its topics every [`TOPIC_DISCOVERY`] interval.
    pub fn create(
        kafka: &KafkaSettings,
        group_id: Option<&str>,
        overrides: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, KafkaSetupError> {
        let (runner, rebalances) = mpsc::unbounded_channel();
        let context = RebalanceContext {
            runner: Mutex::new(Some(runner)),
        };
        let (key, value) = TOPIC_DISCOVERY;
        let mut settings = overrides.clone();
        if !kafka.common.contains_key(key) && !kafka.consumer.contains_key(key) {
            settings
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
        let consumer = kafka.stream_consumer_with(group_id, &settings, context)?;
        Ok(Self {
            consumer,
            rebalances,
        })
    }
}
