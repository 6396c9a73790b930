//! What the runner lends the task through its context: the errant-record reporter (the error
//! policy applied per record, dead-letter writes awaited before any commit) and control over
//! its partitions (pause/resume).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::Shared;
use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordHandler, ErrantReport, PartitionControl, SinkRecord,
    TopicPartition,
};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::Consumer;

use crate::task::errors::{ErrorReporter, Origin, Stage, Verdict, dead_letter_result};

use super::consumer::{GroupConsumer, partitions_of};
use super::lock;

/// Errant records reported by the task or the runner: the error policy is applied when they
/// are reported, and every dead-letter write is awaited before offsets are committed.
pub(super) struct ErrantRecords {
    pub(super) errors: Arc<ErrorReporter>,
    /// Dead-letter writes not yet confirmed (shared: the reporting task may await them too).
    pub(super) outstanding: Mutex<Vec<Shared<ErrantReport>>>,
    /// The first error that was not tolerated: the task fails with it.
    pub(super) failure: Mutex<Option<ConnectError>>,
}

impl ErrantRecords {
    pub(super) fn new(errors: Arc<ErrorReporter>) -> Self {
        Self {
            errors,
            outstanding: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        }
    }

    pub(super) fn apply(
        &self,
        stage: Stage,
        class: &str,
        record: &SinkRecord,
        error: ConnectError,
    ) -> ErrantReport {
        let origin = Origin::Kafka {
            topic: &record.record.topic,
            partition: record.kafka_partition,
            offset: record.kafka_offset,
        };

        let report: ErrantReport =
            match self
                .errors
                .report(stage, class, &record.record, origin, error)
            {
                Verdict::Fail(error) => {
                    lock(&self.failure).get_or_insert_with(|| error.clone());
                    Box::pin(std::future::ready(Err(error)))
                }
                Verdict::Skipped => return Box::pin(std::future::ready(Ok(()))),
                Verdict::DeadLettered(delivery) => {
                    Box::pin(async move { dead_letter_result(delivery.await).map(|_| ()) })
                }
            };
        let shared = report.shared();
        lock(&self.outstanding).push(shared.clone());
        Box::pin(shared)
    }

    /// Waits for every report made so far; the error that fails the task, if any.
    pub(super) async fn settle(&self) -> ConnectResult<()> {
        let outstanding = std::mem::take(&mut *lock(&self.outstanding));
        for report in outstanding {
            if let Err(error) = report.await {
                lock(&self.failure).get_or_insert_with(|| error.clone());
            }
        }
        self.check()
    }

    /// The failure a report caused, if any.
    pub(super) fn check(&self) -> ConnectResult<()> {
        match lock(&self.failure).clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

impl ErrantRecordHandler for ErrantRecords {
    fn report(&self, record: SinkRecord, error: ConnectError) -> ErrantReport {
        self.apply(Stage::TaskPut, "SinkTask", &record, error)
    }
}

/// Pausing and resuming partitions on behalf of the task ([`SinkPartitions`]).
pub(super) struct ConsumerPartitions {
    pub(super) consumer: Arc<GroupConsumer>,
    pub(super) paused_by_task: Mutex<BTreeSet<TopicPartition>>,
}

impl ConsumerPartitions {
    pub(super) fn list(partitions: &[TopicPartition]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for partition in partitions {
            list.add_partition(&partition.topic, partition.partition);
        }
        list
    }
}

impl PartitionControl for ConsumerPartitions {
    fn assignment(&self) -> Vec<TopicPartition> {
        self.consumer
            .assignment()
            .map(|list| partitions_of(&list))
            .unwrap_or_default()
    }

    fn pause(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        lock(&self.paused_by_task).extend(partitions.iter().cloned());
        self.consumer
            .pause(&Self::list(partitions))
            .map_err(|e| ConnectError::retriable(format!("cannot pause partitions: {e}")))
    }

    fn resume(&self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        let mut paused = lock(&self.paused_by_task);
        for partition in partitions {
            paused.remove(partition);
        }
        drop(paused);
        self.consumer
            .resume(&Self::list(partitions))
            .map_err(|e| ConnectError::retriable(format!("cannot resume partitions: {e}")))
    }
}
