//! Kafka Connect's error handling: retries with backoff for retriable failures within
//! `errors.retry.timeout`, then `errors.tolerance`: `none` fails the task, `all` skips the
//! record, writing it to the dead-letter topic (`errors.deadletterqueue.topic.name`) with
//! `__connect.errors.*` context headers when enabled. Sources have a dead-letter topic too.

use std::time::Duration;

use futures::channel::oneshot::Canceled;
use medconnect_api::{
    ConnectError, ConnectResult, ParsedConfig, Record, SourceOffset, SourcePartition,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::kafka::{DeliveryFuture, OwnedDeliveryResult, Producer};
use crate::metrics::TaskMetrics;
use crate::worker::secrets::Scrubber;

pub const TOLERANCE: &str = "errors.tolerance";
pub const RETRY_TIMEOUT: &str = "errors.retry.timeout";
pub const RETRY_DELAY_MAX: &str = "errors.retry.delay.max.ms";
pub const LOG_ENABLE: &str = "errors.log.enable";
pub const LOG_INCLUDE_MESSAGES: &str = "errors.log.include.messages";
pub const DLQ_TOPIC: &str = "errors.deadletterqueue.topic.name";
pub const DLQ_REPLICATION: &str = "errors.deadletterqueue.topic.replication.factor";
pub const DLQ_CONTEXT_HEADERS: &str = "errors.deadletterqueue.context.headers.enable";

const HEADER_PREFIX: &str = "__connect.errors.";

/// Where in the pipeline a failure happened (Connect's stage names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TaskPoll,
    Transformation,
    KafkaProduce,
    KafkaConsume,
    TaskPut,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskPoll => "TASK_POLL",
            Self::Transformation => "TRANSFORMATION",
            Self::KafkaProduce => "KAFKA_PRODUCE",
            Self::KafkaConsume => "KAFKA_CONSUME",
            Self::TaskPut => "TASK_PUT",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ErrorPolicy {
    pub tolerate_all: bool,
    /// `None`: retry for as long as the task runs (`errors.retry.timeout=-1`, as in Connect).
    pub retry_timeout: Option<Duration>,
    pub retry_delay_max: Duration,
    pub log_errors: bool,
    pub log_include_messages: bool,
    pub dlq_topic: Option<String>,
    pub dlq_replication_factor: i32,
    pub context_headers: bool,
}

impl ErrorPolicy {
    pub fn from_config(config: &ParsedConfig) -> ConnectResult<Self> {
        Ok(Self {
            tolerate_all: config.string(TOLERANCE)? == "all",
            retry_timeout: retry_timeout(config.int(RETRY_TIMEOUT)?),
            retry_delay_max: Duration::from_millis(config.int(RETRY_DELAY_MAX)?.max(1) as u64),
            log_errors: config.boolean(LOG_ENABLE)?,
            log_include_messages: config.boolean(LOG_INCLUDE_MESSAGES)?,
            dlq_topic: config.optional_string(DLQ_TOPIC),
            dlq_replication_factor: config.int(DLQ_REPLICATION)? as i32,
            context_headers: config.boolean(DLQ_CONTEXT_HEADERS)?,
        })
    }

    /// A retry schedule for one operation. With `forever`, retriable failures are retried
    /// until the task stops (Connect does this for a sink's `put`); otherwise until
    /// `errors.retry.timeout` has passed (never, with -1).
    pub fn backoff(&self, forever: bool) -> Backoff<'_> {
        let forever = forever || self.retry_timeout.is_none();
        Backoff {
            policy: self,
            started: tokio::time::Instant::now(),
            delay: Duration::from_millis(100).min(self.retry_delay_max),
            forever,
        }
    }
}

/// `errors.retry.timeout` in ms: -1 (or any negative) is Connect's "retry forever", 0 "never".
fn retry_timeout(ms: i64) -> Option<Duration> {
    u64::try_from(ms).ok().map(Duration::from_millis)
}

/// Exponential backoff capped at `errors.retry.delay.max.ms`.
pub struct Backoff<'a> {
    policy: &'a ErrorPolicy,
    started: tokio::time::Instant,
    delay: Duration,
    forever: bool,
}

impl Backoff<'_> {
    /// After a failure: waits, and tells whether to try again (only retriable failures are,
    /// within the timeout, while the task runs).
    pub async fn retry_after(&mut self, error: &ConnectError, stop: &CancellationToken) -> bool {
        let in_time = self.forever
            || self
                .policy
                .retry_timeout
                .is_some_and(|timeout| self.started.elapsed() < timeout);
        if !error.is_retriable() || !in_time || stop.is_cancelled() {
            return false;
        }
        // A task that says when to try again (an HTTP 429/503 Retry-After, a connector's own
        // configured backoff) knows better than the engine's schedule: its hint is the wait.
        let delay = error.retry_after().unwrap_or(self.delay);
        tracing::debug!(%error, ?delay, "retriable failure; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return false,
        }
        self.delay = (self.delay * 2).min(self.policy.retry_delay_max);
        true
    }
}

/// Whether Kafka refused a record for what it is (too large, invalid for its topic or
/// partition) rather than because it could not be reached: sending it again will not help.
pub(crate) fn refuses_the_record(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidRecord
                | MessageBatchTooLarge
                | UnknownPartition
                | InvalidTopic
                | BadMessage
        )
    )
}

/// What became of a dead-letter write once Kafka answered.
pub(crate) enum DeadLetterResult {
    Written,
    /// Refused for what the record is (too large for the dead-letter topic as well): the
    /// record is skipped, as with `errors.tolerance=all` and no dead-letter topic.
    Refused(String),
}

/// Reads Kafka's answer to a dead-letter write; an `Err` fails the task.
pub(crate) fn dead_letter_result(
    answer: Result<OwnedDeliveryResult, Canceled>,
) -> ConnectResult<DeadLetterResult> {
    match answer {
        Ok(Ok(_)) => Ok(DeadLetterResult::Written),
        Ok(Err((error, _))) if refuses_the_record(&error) => {
            tracing::error!(%error, "the dead-letter topic refused the record too; skipped");
            Ok(DeadLetterResult::Refused(error.to_string()))
        }
        Ok(Err((error, _))) => Err(ConnectError::fatal(format!(
            "a dead-letter record was not acknowledged by Kafka: {error}"
        ))),
        Err(_) => Err(ConnectError::fatal(
            "a dead-letter record was not acknowledged: the producer was closed",
        )),
    }
}

/// Where a failed record came from, for the context headers.
pub enum Origin<'a> {
    /// A source record's partition and offset; `None` for a listener's input (an HL7
    /// message has no position to resume from), shown as empty objects.
    Source(Option<&'a (SourcePartition, SourceOffset)>),
    Kafka {
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
}

/// What to do with a record that failed.
pub enum Verdict {
    /// Tolerated; written to the dead-letter topic (await the future before committing past it).
    DeadLettered(DeliveryFuture),
    /// Tolerated without a dead-letter topic: skipped.
    Skipped,
    /// Not tolerated: the task fails with this error.
    Fail(ConnectError),
}

/// Applies a task's error policy to failed records.
pub struct ErrorReporter {
    pub policy: ErrorPolicy,
    connector: String,
    task_id: u32,
    producer: Producer,
    metrics: TaskMetrics,
    /// Takes the task's secret values out of errors before they are logged or written to the
    /// dead-letter topic's headers (a connector's error may quote its resolved config).
    scrubber: Scrubber,
}

impl ErrorReporter {
    pub fn new(
        policy: ErrorPolicy,
        connector: &str,
        task_id: u32,
        producer: Producer,
        metrics: TaskMetrics,
        scrubber: Scrubber,
    ) -> Self {
        Self {
            policy,
            connector: connector.to_string(),
            task_id,
            producer,
            metrics,
            scrubber,
        }
    }

    /// Decides the fate of one failed record; `class` names the failing component.
    pub fn report(
        &self,
        stage: Stage,
        class: &str,
        record: &Record,
        origin: Origin<'_>,
        error: ConnectError,
    ) -> Verdict {
        let tolerated = self.policy.tolerate_all
            && !matches!(error, ConnectError::Fatal(_) | ConnectError::Config { .. });
        self.decide(stage, class, record, origin, error, tolerated)
    }

    /// Input a source rejected and already answered (an AE to an HL7 sender): it goes to the
    /// dead-letter topic if there is one, whatever `errors.tolerance` says, and never fails the task.
    pub fn reject(
        &self,
        stage: Stage,
        class: &str,
        record: &Record,
        origin: Origin<'_>,
        error: ConnectError,
    ) -> Verdict {
        self.decide(stage, class, record, origin, error, true)
    }

    fn decide(
        &self,
        stage: Stage,
        class: &str,
        record: &Record,
        origin: Origin<'_>,
        error: ConnectError,
        tolerated: bool,
    ) -> Verdict {
        let error = self.scrubber.error(error);
        self.metrics.error(stage.as_str());
        if self.policy.log_errors || !tolerated {
            if self.policy.log_include_messages {
                let peer_text = error.peer_text().map(|p| p.text());
                tracing::error!(connector = %self.connector, task = self.task_id, stage = stage.as_str(), %class, %error, ?peer_text, record = ?record, "record failed");
            } else {
                // Payloads carry patient data: only metadata is logged by default.
                tracing::error!(connector = %self.connector, task = self.task_id, stage = stage.as_str(), %class, %error, topic = %record.topic, "record failed");
            }
        }
        if !tolerated {
            return Verdict::Fail(error);
        }
        let Some(topic) = self.policy.dlq_topic.as_deref() else {
            return Verdict::Skipped;
        };
        let mut headers = OwnedHeaders::new();
        for (name, value) in record.headers.iter() {
            headers = headers.insert(Header {
                key: name,
                value: value.map(|v| v.as_ref()),
            });
        }
        // What the peer said may quote the record's patient data: only with the connector's
        // consent, the one errors.log.include.messages gives for its logs.
        if self.policy.log_include_messages
            && let Some(peer) = error.peer_text()
        {
            headers = headers.insert(Header {
                key: peer.header(),
                value: Some(peer.text().as_bytes()),
            });
        }
        if self.policy.context_headers {
            for (name, value) in self.context(stage, class, record, &origin, &error) {
                headers = headers.insert(Header {
                    key: &format!("{HEADER_PREFIX}{name}"),
                    value: Some(value.as_bytes()),
                });
            }
        }
        let mut dead: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = record.key.as_deref() {
            dead = dead.key(key);
        }
        if let Some(value) = record.value.as_deref() {
            dead = dead.payload(value);
        }
        if let Some(timestamp) = record.timestamp {
            dead = dead.timestamp(timestamp);
        }
        match self.producer.send_result(dead) {
            Ok(delivery) => {
                self.metrics.dead_lettered();
                Verdict::DeadLettered(delivery)
            }
            // Too large for the dead-letter topic as well: tolerated and skipped, as Connect
            // does when its dead-letter write fails; the metadata is logged, never the payload.
            Err((error, _)) if refuses_the_record(&error) => {
                tracing::error!(connector = %self.connector, task = self.task_id, stage = stage.as_str(), dlq = %topic, %error, "the dead-letter topic refused the record too; skipped");
                Verdict::Skipped
            }
            Err((error, _)) => Verdict::Fail(ConnectError::fatal(format!(
                "cannot write to dead-letter topic {topic}: {error}"
            ))),
        }
    }

    fn context(
        &self,
        stage: Stage,
        class: &str,
        record: &Record,
        origin: &Origin<'_>,
        error: &ConnectError,
    ) -> Vec<(&'static str, String)> {
        let mut headers = Vec::with_capacity(12);
        match origin {
            Origin::Kafka {
                topic,
                partition,
                offset,
            } => {
                headers.push(("topic", topic.to_string()));
                headers.push(("partition", partition.to_string()));
                headers.push(("offset", offset.to_string()));
            }
            Origin::Source(position) => {
                let json = |map: Option<&serde_json::Map<String, Value>>| {
                    Value::Object(map.cloned().unwrap_or_default()).to_string()
                };
                headers.push(("topic", record.topic.clone()));
                headers.push(("source.partition", json(position.map(|(p, _)| &**p))));
                headers.push(("source.offset", json(position.map(|(_, o)| o))));
            }
        }
        headers.push(("connector.name", self.connector.clone()));
        headers.push(("task.id", self.task_id.to_string()));
        headers.push(("stage", stage.as_str().to_string()));
        headers.push(("class.name", class.to_string()));
        headers.push(("exception.class.name", error.class_name().to_string()));
        headers.push(("exception.message", error.to_string()));
        headers.push(("exception.stacktrace", format!("{error:?}")));
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(timeout_ms: i64) -> ErrorPolicy {
        ErrorPolicy {
            tolerate_all: false,
            retry_timeout: retry_timeout(timeout_ms),
            retry_delay_max: Duration::from_millis(10),
            log_errors: false,
            log_include_messages: false,
            dlq_topic: None,
            dlq_replication_factor: 1,
            context_headers: false,
        }
    }

    async fn attempts(
        policy: &ErrorPolicy,
        forever: bool,
        mut outcome: impl FnMut(u32) -> ConnectResult<u32>,
    ) -> (ConnectResult<u32>, u32) {
        let stop = CancellationToken::new();
        let mut backoff = policy.backoff(forever);
        let mut calls = 0;
        loop {
            calls += 1;
            match outcome(calls) {
                Err(error) if backoff.retry_after(&error, &stop).await => continue,
                other => return (other, calls),
            }
        }
    }

    #[tokio::test]
    async fn retriable_failures_are_retried_until_success() {
        let (result, calls) = attempts(&policy(5_000), false, |n| {
            if n < 3 {
                Err(ConnectError::retriable("busy"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(result, Ok(3));
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    async fn without_retry_timeout_a_retriable_failure_is_returned_at_once() {
        let (result, calls) =
            attempts(&policy(0), false, |_| Err(ConnectError::retriable("busy"))).await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn data_errors_are_never_retried() {
        let (result, calls) =
            attempts(&policy(5_000), true, |_| Err(ConnectError::data("bad"))).await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn minus_one_retries_until_success_however_long() {
        // Connect's -1: retry forever. A clamp to 0 would give up after the first failure.
        let (result, calls) = attempts(&policy(-1), false, |n| {
            if n < 6 {
                Err(ConnectError::retriable("busy"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(result, Ok(6));
        assert_eq!(calls, 6);
    }

    #[test]
    fn retry_timeout_setting_maps_minus_one_to_forever() {
        assert_eq!(retry_timeout(-1), None);
        assert_eq!(retry_timeout(0), Some(Duration::ZERO));
        assert_eq!(retry_timeout(1500), Some(Duration::from_millis(1500)));
    }

    #[tokio::test]
    async fn a_retry_after_hint_is_the_wait() {
        // The engine's own delay would be 10 ms (retry.delay.max); the task asked for 300 ms.
        // A sleep never ends early, so the lower bound cannot flake.
        let policy = policy(-1);
        let mut backoff = policy.backoff(false);
        let busy = ConnectError::retriable("429").with_retry_after(Duration::from_millis(300));
        let started = tokio::time::Instant::now();
        assert!(backoff.retry_after(&busy, &CancellationToken::new()).await);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
