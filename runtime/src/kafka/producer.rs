//! The engine's Kafka producer: rdkafka's `BaseProducer` with a delivery future per record
//! (as rdkafka's `FutureProducer` gives) and a polling thread that sleeps while there is
//! nothing to deliver.
//!
//! Why not `FutureProducer`: its polling thread calls `poll(100 ms)`, and rdkafka turns the
//! time left into whole milliseconds, so the last millisecond of every call is spent calling
//! `rd_kafka_queue_poll(0)` and `clock_gettime` in a loop (librdkafka had the same bug in its
//! own main loop, librdkafka#4684). A profile of `bench/mllp` at full rate found each idle
//! producer of the worker (stores, audit, dead-letter, the task's) spinning there for 7–8 %
//! of a core, about half a core in all, on a machine of two; idle, a worker's producers cost
//! ~1 % of a core each. This thread polls in calls of [`POLL_CALL`]: deliveries are handed
//! over as they arrive (a call returns from its wait for each one), and the spin happens once
//! per call instead of ten times a second.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, FutureRecord, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

pub use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};

/// How long one call of the polling thread waits for deliveries. Longer calls spin less (one
/// millisecond per call) but let a dropped producer's connections live on for up to this long.
const POLL_CALL: Duration = Duration::from_secs(2);

/// Hands each record's delivery report to its [`DeliveryFuture`].
pub struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<oneshot::Sender<OwnedDeliveryResult>>;

    fn delivery(&self, result: &DeliveryResult<'_>, answer: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp(),
            }),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // The sender may have stopped waiting (a task that stopped): nothing to tell.
        let _ = answer.send(owned);
    }
}

/// The outcome of one record: Kafka's acknowledgement (`acks=all`) or why it was not written;
/// `Err(Canceled)` when the producer was dropped before answering.
pub struct DeliveryFuture(oneshot::Receiver<OwnedDeliveryResult>);

impl Future for DeliveryFuture {
    type Output = Result<OwnedDeliveryResult, oneshot::Canceled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// A producer whose every send returns a [`DeliveryFuture`]; clones share one producer.
#[derive(Clone)]
pub struct Producer(Arc<Handle>);

/// The producer and its polling thread's stop flag, set when the last clone goes.
struct Handle {
    inner: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
}

impl FromClientConfig for Producer {
    fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        let inner = Arc::new(BaseProducer::from_config_and_context(config, Deliveries)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopping) = (inner.clone(), stop.clone());
        std::thread::Builder::new()
            .name("producer deliveries".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    polled.poll(POLL_CALL);
                }
                // Dropping the last handle here purges what is unsent and flushes, which
                // answers every record's future.
            })
            .map_err(|e| KafkaError::ClientCreation(format!("producer polling thread: {e}")))?;
        Ok(Self(Arc::new(Handle { inner, stop })))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Not joined: the thread ends within `POLL_CALL` and drops the last handle then.
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Producer {
    /// Queues `record`; its future resolves once Kafka answered. A full queue (or any other
    /// refusal) returns the record at once with the error.
    #[allow(clippy::result_large_err)] // the record is handed back, as rdkafka does
    pub fn send_result<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (answer, delivery) = oneshot::channel();
        let FutureRecord {
            topic,
            partition,
            payload,
            key,
            timestamp,
            headers,
        } = record;
        let base = BaseRecord {
            topic,
            partition,
            payload,
            key,
            timestamp,
            headers,
            delivery_opaque: Box::new(answer),
        };
        match self.0.inner.send(base) {
            Ok(()) => Ok(DeliveryFuture(delivery)),
            Err((error, base)) => Err((
                error,
                FutureRecord {
                    topic: base.topic,
                    partition: base.partition,
                    payload: base.payload,
                    key: base.key,
                    timestamp: base.timestamp,
                    headers: base.headers,
                },
            )),
        }
    }

    /// Sends `record` and waits for Kafka's answer, retrying a full queue for up to
    /// `queue_timeout`.
    pub async fn send<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<Delivery, KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let started = Instant::now();
        loop {
            match self.send_result(record) {
                Ok(delivery) => {
                    return match delivery.await {
                        Ok(Ok(delivery)) => Ok(delivery),
                        Ok(Err((error, _))) => Err(error),
                        Err(oneshot::Canceled) => Err(KafkaError::Canceled),
                    };
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if started.elapsed() < queue_timeout =>
                {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }
}

#[cfg(all(test, feature = "embedded-broker"))]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::kafka::{KafkaSettings, TopicSpec, ensure_topics};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn producer(
        broker: &EmbeddedBroker,
        topic: &str,
        overrides: &[(&str, &str)],
    ) -> Result<Producer, Box<dyn std::error::Error>> {
        let settings = KafkaSettings::new(&broker.bootstrap_servers());
        ensure_topics(&settings, &[TopicSpec::regular(topic, 1, 1)]).await?;
        let overrides: BTreeMap<String, String> = overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(settings.producer(&overrides)?)
    }

    /// Sends one text record and waits for Kafka's answer.
    async fn send_one(producer: &Producer, topic: &str, value: &str) -> KafkaResult<Delivery> {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(topic).payload(value);
        producer.send(record, Duration::from_secs(10)).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_send_is_answered_with_its_offset_in_send_order() -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let producer = producer(&broker, "answers", &[]).await?;
        let mut deliveries = Vec::new();
        for n in 0..200 {
            let value = format!("record {n}");
            let record: FutureRecord<'_, str, str> = FutureRecord::to("answers").payload(&value);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
        }
        let mut offsets = Vec::new();
        for delivery in deliveries {
            let delivery = delivery.await?.map_err(|(e, _)| e)?;
            assert_eq!(delivery.partition, 0);
            offsets.push(delivery.offset);
        }
        assert_eq!(offsets, (0..200).collect::<Vec<i64>>());
        let sent = send_one(&producer, "answers", "one more").await?;
        assert_eq!(sent.offset, 200);
        broker.stop();
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_the_producer_refuses_comes_back_with_the_reason() -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let producer = producer(&broker, "small", &[("message.max.bytes", "2000")]).await?;
        let big = vec![b'x'; 4000];
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to("small").payload(&big);
        let refused = producer.send_result(record).err().ok_or("sent")?;
        assert_eq!(
            refused.0,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
        );
        assert_eq!(refused.1.payload.map(<[u8]>::len), Some(4000));
        broker.stop();
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_kafka_never_took_is_answered_with_the_failure() -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let producer = producer(&broker, "gone", &[("message.timeout.ms", "1500")]).await?;
        send_one(&producer, "gone", "first").await?;
        broker.stop();
        let record: FutureRecord<'_, str, str> = FutureRecord::to("gone").payload("lost?");
        let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
        let answer = tokio::time::timeout(Duration::from_secs(30), delivery).await??;
        let (error, message) = answer.err().ok_or("delivered with the broker gone")?;
        assert_eq!(
            error,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
        );
        assert_eq!(message.payload(), Some(&b"lost?"[..]));
        Ok(())
    }

    /// CPU ticks (1/100 s) of this process's threads named like the polling thread.
    fn polling_threads() -> Vec<(String, u64)> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|task| {
                let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
                if !name.starts_with("producer deliv") {
                    return None;
                }
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                // After the name's closing parenthesis: utime and stime are fields 12 and 13.
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                let ticks =
                    fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
                Some((task.file_name().to_string_lossy().into_owned(), ticks))
            })
            .collect()
    }

    /// rdkafka's own polling thread spins for the last millisecond of each 100 ms call: 60 ms
    /// of CPU in these 6 s. This one sleeps until a delivery or the end of its call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_producer_thread_takes_no_cpu_and_ends_once_the_producer_is_dropped()
    -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let before: Vec<String> = polling_threads().into_iter().map(|(id, _)| id).collect();
        let producer = producer(&broker, "idle", &[]).await?;
        send_one(&producer, "idle", "warm").await?;
        let ours = || {
            polling_threads()
                .into_iter()
                .find(|(id, _)| !before.contains(id))
        };
        let (thread, start) = ours().ok_or("no polling thread")?;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (_, end) = ours().ok_or("the polling thread ended")?;
        assert!(
            end - start <= 2,
            "the idle polling thread {thread} used {} ms of CPU in 6 s",
            (end - start) * 10
        );
        drop(producer);
        let deadline = Instant::now() + POLL_CALL + Duration::from_secs(10);
        while ours().is_some() {
            assert!(
                Instant::now() < deadline,
                "the polling thread outlived its producer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        broker.stop();
        Ok(())
    }
}
