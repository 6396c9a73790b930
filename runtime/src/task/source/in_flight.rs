//! One record between `poll` and its settlement: what will settle it (Kafka's acknowledgement,
//! a dead-letter write, a skip) and what becomes of it when Kafka refused it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::kafka::DeliveryFuture;
use medconnect_api::{
    AckHandle, ConnectError, ConnectResult, Delivery, SourceOffset, SourcePartition,
};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::future_producer::OwnedDeliveryResult;

use crate::task::errors::{DeadLetterResult, Verdict, dead_letter_result, refuses_the_record};

/// How a record in flight will be settled. No boxed future per record: this is the hot path.
pub(super) enum Outcome {
    /// Settled already (filtered, skipped); taken once.
    Ready(Option<ConnectResult<Delivery>>),
    /// Awaiting Kafka's acknowledgement; the topic is kept only when a listener awaits the ack.
    Produced {
        delivery: DeliveryFuture,
        topic: Option<String>,
    },
    /// Awaiting the dead-letter write of a rejected record.
    DeadLettered {
        delivery: DeliveryFuture,
        reason: String,
    },
}

/// A record in flight; resolves to its fate. Kept in poll order by `FuturesOrdered`.
pub(super) struct InFlight {
    pub(super) position: Option<(SourcePartition, SourceOffset)>,
    pub(super) ack: Option<AckHandle>,
    pub(super) outcome: Outcome,
    /// When Kafka first refused this record, for retries within `errors.retry.timeout`.
    pub(super) first_failure: Option<tokio::time::Instant>,
}

impl Future for InFlight {
    type Output = Completed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completed> {
        let this = self.get_mut();
        let mut refused = None;
        let outcome = match &mut this.outcome {
            Outcome::Ready(result) => result
                .take()
                .unwrap_or_else(|| Err(ConnectError::fatal("a settled record was polled again"))),
            Outcome::Produced { delivery, topic } => match Pin::new(delivery).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(d))) => Ok(Delivery::Written {
                    topic: topic.take().unwrap_or_default(),
                    partition: d.partition,
                    offset: d.offset,
                }),
                Poll::Ready(Ok(Err((error, message)))) => {
                    refused = Some(message);
                    Err(produce_error(&error))
                }
                Poll::Ready(Err(_)) => Err(ConnectError::retriable("the producer was closed")),
            },
            Outcome::DeadLettered { delivery, reason } => match Pin::new(delivery).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(answer) => dead_lettered(answer, std::mem::take(reason)),
            },
        };
        Poll::Ready(Completed {
            position: this.position.take(),
            ack: this.ack.take(),
            outcome,
            refused,
            first_failure: this.first_failure,
        })
    }
}

/// A record whose fate is known, in poll order.
pub(super) struct Completed {
    pub(super) position: Option<(SourcePartition, SourceOffset)>,
    pub(super) ack: Option<AckHandle>,
    pub(super) outcome: Result<Delivery, ConnectError>,
    /// The record as Kafka gave it back when it refused it: to retry or dead-letter it.
    pub(super) refused: Option<OwnedMessage>,
    pub(super) first_failure: Option<tokio::time::Instant>,
}

/// A record's delivery once its dead-letter write was answered.
pub(super) fn dead_lettered(
    answer: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    reason: String,
) -> ConnectResult<Delivery> {
    Ok(match dead_letter_result(answer)? {
        DeadLetterResult::Written => Delivery::DeadLettered { reason },
        DeadLetterResult::Refused(why) => Delivery::Rejected {
            reason: format!("{reason}; the dead-letter topic refused it too: {why}"),
        },
    })
}

/// What Kafka's refusal of a record means. A record too large or invalid for its topic is bad
/// data (that record fails: dead-letter topic, or a negative acknowledgement to its sender);
/// anything else (broker unreachable past `delivery.timeout.ms`, ...) is not the record's fault
/// and is never skipped silently.
pub(super) fn produce_error(error: &KafkaError) -> ConnectError {
    if refuses_the_record(error) {
        ConnectError::data(format!("Kafka refused the record: {error}"))
    } else {
        ConnectError::retriable(format!("Kafka did not take the record: {error}"))
    }
}

/// What becomes of a record that was not written.
pub(super) enum AfterFailure {
    /// Sent again; settles in the same place.
    Retry(Outcome, tokio::time::Instant),
    /// Settled without failing the task (dead-lettered, skipped, or its sender told).
    Settled(Delivery),
    /// The task fails; no offset passes this record.
    Fail(ConnectError),
}

/// The error policy's answer for a refused record, before its dead-letter write is confirmed.
pub(super) struct Refusal {
    pub(super) verdict: Verdict,
    pub(super) error: ConnectError,
}

impl Refusal {
    /// The record's delivery once the dead-letter topic has it (or it was skipped), or the
    /// error that fails the task.
    pub(super) async fn await_dead_letter(self) -> ConnectResult<Delivery> {
        let reason = self.error.to_string();
        match self.verdict {
            Verdict::Fail(error) => Err(error),
            Verdict::Skipped => Ok(Delivery::Rejected { reason }),
            Verdict::DeadLettered(delivery) => dead_lettered(delivery.await, reason),
        }
    }
}
