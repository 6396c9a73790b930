//! The engine's Kafka producer: rdkafka's `BaseProducer` with a delivery future per record
//! (as rdkafka's `FutureProducer` gives), its delivery reports served by a tokio task that
//! librdkafka wakes when they arrive, and that takes no CPU while there is nothing to deliver.
//!
//! Why not `FutureProducer`: its polling thread calls `poll(100 ms)`, and rdkafka turns the
//! time left into whole milliseconds, so the last millisecond of every call is spent calling
//! `rd_kafka_queue_poll(0)` and `clock_gettime` in a loop (librdkafka had the same bug in its
//! own main loop, librdkafka#4684). A profile of `bench/mllp` at full rate found each idle
//! producer of the worker (stores, audit, dead-letter, the task's) spinning there for 7–8 %
//! of a core, about half a core in all, on a machine of two; idle, a worker's producers cost
//! ~1 % of a core each.
//!
//! Why a task and not a polling thread of our own (as this module had first): each delivered
//! batch then cost two wake-ups before the record's awaiting task ran (librdkafka's broker
//! thread woke the polling thread, which woke the runtime); now the broker thread wakes the
//! runtime, and the futures are completed on the thread that runs their tasks. And a producer
//! adds no thread besides librdkafka's own.

use std::ffi::c_void;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;
use rdkafka::bindings as rdsys;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::types::{RDKafka, RDKafkaErrorCode, RDKafkaQueue};
use tokio::sync::Notify;

pub use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};

/// Hands each record's delivery report to its [`DeliveryFuture`].
#[derive(Default)]
pub struct Deliveries {
    /// Notified by librdkafka when an event lands on the producer's empty main queue (where
    /// delivery reports go): the delivery task then serves the queue. It lives in the client's
    /// context, which librdkafka's threads outlive never: the client is destroyed (its threads
    /// joined) before its context is dropped.
    events: Notify,
}

impl ClientContext for Deliveries {}

/// What a record's delivery report brings back from librdkafka: where its answer goes and,
/// for a record librdkafka did not copy ([`super::Topic::send`]), the bytes it reads until
/// then.
pub struct Pending {
    pub(super) answer: oneshot::Sender<OwnedDeliveryResult>,
    /// Key and value lent to librdkafka; dropped with the report, once it is done with them.
    pub(super) lent: Option<(Option<Bytes>, Option<Bytes>)>,
}

impl Pending {
    pub(super) fn new(answer: oneshot::Sender<OwnedDeliveryResult>) -> Box<Self> {
        Box::new(Self { answer, lent: None })
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp(),
            }),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // The sender may have stopped waiting (a task that stopped): nothing to tell. The
        // lent bytes go with `pending`: librdkafka reads a message's bytes no more once it
        // has reported its delivery (it only frees the message, and never a lent payload).
        let _ = pending.answer.send(owned);
    }
}

/// The outcome of one record: Kafka's acknowledgement (`acks=all`) or why it was not written;
/// `Err(Canceled)` when the producer was dropped before answering.
pub struct DeliveryFuture(pub(super) oneshot::Receiver<OwnedDeliveryResult>);

impl Future for DeliveryFuture {
    type Output = Result<OwnedDeliveryResult, oneshot::Canceled>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// A producer whose every send returns a [`DeliveryFuture`]; clones share one producer.
#[derive(Clone)]
pub struct Producer(pub(super) Arc<Handle>);

/// The producer and its delivery task's stop flag, set when the last clone goes.
pub(super) struct Handle {
    pub(super) inner: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
}

impl FromClientConfig for Producer {
    fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        let inner = Arc::new(BaseProducer::from_config_and_context(
            config,
            Deliveries::default(),
        )?);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            KafkaError::ClientCreation(
                "a producer is created inside a tokio runtime: a task of it serves the deliveries"
                    .into(),
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        runtime.spawn(serve_deliveries(
            ServedQueue::new(inner.clone()),
            stop.clone(),
        ));
        Ok(Self(Arc::new(Handle { inner, stop })))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The delivery task is woken to end; it drops the last handle of the client.
        self.stop.store(true, Ordering::Relaxed);
        self.inner.context().events.notify_one();
    }
}

/// Called by librdkafka (on its own thread) when an event is put on the main queue while it
/// was empty. It must not call librdkafka: it only wakes the delivery task.
unsafe extern "C" fn main_queue_has_events(_client: *mut RDKafka, events: *mut c_void) {
    // SAFETY: `events` is the `Notify` in the client's context (see `Deliveries::events`),
    // which outlives every librdkafka thread of the client.
    let events = unsafe { &*(events as *const Notify) };
    events.notify_one();
}

/// The producer's main queue, served from a tokio task: librdkafka's broker thread wakes the
/// task itself (`rd_kafka_queue_cb_event_enable`), and the task hands each delivery to its
/// future on a runtime thread.
struct ServedQueue {
    /// Our handle on the main queue (to read its length); given back before the producer.
    queue: *mut RDKafkaQueue,
    producer: Option<Arc<BaseProducer<Deliveries>>>,
}

// SAFETY: librdkafka's queue handles are thread-safe; this one is used by one task at a time.
unsafe impl Send for ServedQueue {}

impl ServedQueue {
    fn new(producer: Arc<BaseProducer<Deliveries>>) -> Self {
        let client = producer.client().native_ptr();
        let events = &producer.context().events as *const Notify as *mut c_void;
        // SAFETY: `client` is live while `producer` is; the queue handle is destroyed in `drop`
        // before the producer goes, and the callback's `events` outlives the client.
        let queue = unsafe {
            let queue = rdsys::rd_kafka_queue_get_main(client);
            rdsys::rd_kafka_queue_cb_event_enable(queue, Some(main_queue_has_events), events);
            queue
        };
        Self {
            queue,
            producer: Some(producer),
        }
    }

    fn has_events(&self) -> bool {
        // SAFETY: the handle is live until `drop`.
        unsafe { rdsys::rd_kafka_queue_length(self.queue) > 0 }
    }
}

impl Drop for ServedQueue {
    fn drop(&mut self) {
        // SAFETY: the handle was ours, and the client is still live (`producer` goes after).
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue) };
        if let Some(producer) = self.producer.take() {
            // The last handle purges what is unsent and flushes for up to 500 ms: not on a
            // runtime thread.
            let _ = std::thread::Builder::new()
                .name("producer close".into())
                .spawn(move || drop(producer));
        }
    }
}

/// The longest a delivery waits should librdkafka ever not call back for it.
const MISSED_WAKE_BOUND: Duration = Duration::from_secs(1);

/// Serves `queue` until the producer's last handle is dropped.
async fn serve_deliveries(served: ServedQueue, stop: Arc<AtomicBool>) {
    let Some(producer) = served.producer.clone() else {
        return;
    };
    while !stop.load(Ordering::Relaxed) {
        let mut served_events = 0;
        while served.has_events() {
            producer.poll(Duration::ZERO);
            served_events += 1;
            // An event holds a batch of deliveries: a long run of them lets other tasks in.
            if served_events % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // A permit is kept when the callback fires while nothing waits: no wake-up is lost
        // between the length read above and this wait. librdkafka calls back only when the
        // queue was empty; the second's timeout bounds what a call it ever missed would cost
        // (one timer a second per producer, shared by its tasks).
        let _ = tokio::time::timeout(MISSED_WAKE_BOUND, producer.context().events.notified()).await;
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
            delivery_opaque: Pending::new(answer),
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
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::kafka::{KafkaSettings, TopicSpec, ensure_topics};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// A producer with `overrides` on a broker where `topic` exists (one partition).
    pub(in crate::kafka) async fn producer(
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

    /// The names of this process's threads.
    fn thread_names() -> Vec<String> {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim_end().to_string())
            .collect()
    }

    /// Deliveries are served by a task librdkafka wakes, not by a polling thread per producer
    /// (which cost a wake-up more per delivered batch, and a thread per producer); the task
    /// ends, and the client with it, once the producer's last handle is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_are_served_without_a_thread_of_their_own_until_the_producer_is_dropped()
    -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let producer = producer(&broker, "served", &[]).await?;
        for n in 0..3 {
            let sent = send_one(&producer, "served", &format!("record {n}")).await?;
            assert_eq!(sent.offset, n);
        }
        // Other tests of this binary run beside this one: no producer of theirs has one either.
        let pollers: Vec<String> = thread_names()
            .into_iter()
            .filter(|name| name.starts_with("producer deliv"))
            .collect();
        assert!(pollers.is_empty(), "polling threads: {pollers:?}");
        let client = Arc::downgrade(&producer.0.inner);
        drop(producer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the producer's client outlived its last handle"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker.stop();
        Ok(())
    }
}
