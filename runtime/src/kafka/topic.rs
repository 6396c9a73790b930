//! A topic's handle in librdkafka, for a sender that sends record after record to one topic,
//! and a send that lends the record's bytes to librdkafka instead of copying them.
//!
//! What rdkafka's `send` costs per record beyond the work itself (profile of `bench/pipeline`,
//! the source task's thread): the topic name made into a C string (an allocation and a copy),
//! librdkafka's look-up of the topic by name under the client's lock, and a copy of key and
//! value into a buffer librdkafka allocates for the message (`RD_KAFKA_MSG_F_COPY`). A handle
//! looked up once spares the first two; the record's key and value are reference-counted
//! `Bytes` that librdkafka may read in place, kept alive by the record's delivery report
//! (dropped once it is served), which spares the third.

use std::ffi::{CString, c_void};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;
use medconnect_api::Record;
use rdkafka::bindings as rdsys;
use rdkafka::bindings::rd_kafka_vtype_t as VType;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;

use super::producer::{DeliveryFuture, Pending, Producer};

/// A topic of one producer, as librdkafka knows it. Clones share the handle.
#[derive(Clone)]
pub struct Topic(Arc<Handle>);

struct Handle {
    native: NonNull<rdsys::rd_kafka_topic_t>,
    name: String,
    /// The client the handle belongs to: it outlives the handle.
    producer: Producer,
}

// SAFETY: librdkafka's topic handles are thread-safe (its own threads share them).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is ours (from `rd_kafka_topic_new`), and its client is live: the
        // `producer` field is dropped after this.
        unsafe { rdsys::rd_kafka_topic_destroy(self.native.as_ptr()) };
    }
}

impl Producer {
    /// The handle of topic `name` for sending with this producer. librdkafka gives the topic
    /// the producer's topic settings (`acks`, `message.timeout.ms`, ...), as when sending by
    /// name.
    pub fn topic(&self, name: &str) -> Result<Topic, KafkaError> {
        let c_name = CString::new(name)?;
        let client = self.0.inner.client().native_ptr();
        // SAFETY: `client` is live while `self` is; the name is copied by librdkafka; a null
        // configuration means the producer's default topic configuration.
        let native = unsafe { rdsys::rd_kafka_topic_new(client, c_name.as_ptr(), ptr::null_mut()) };
        let native = NonNull::new(native).ok_or_else(|| {
            // SAFETY: reads this thread's last librdkafka error.
            KafkaError::MessageProduction(unsafe { rdsys::rd_kafka_last_error() }.into())
        })?;
        Ok(Topic(Arc::new(Handle {
            native,
            name: name.to_string(),
            producer: self.clone(),
        })))
    }
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Queues `record` to this topic (its own `topic` field is not read: the handle names the
    /// topic) without copying its key and value: librdkafka reads them in place until it
    /// reports the delivery, and the future resolves once Kafka answered. A full queue or any
    /// other refusal is answered at once, and the record is left as it was.
    pub fn send(&self, record: &Record) -> Result<DeliveryFuture, KafkaError> {
        let (answer, delivery) = oneshot::channel();
        let mut pending = Pending::new(answer);
        let (key, value) = pending
            .lent
            .insert((record.key.clone(), record.value.clone()));
        let (key, value) = (memory(key.as_ref()), memory(value.as_ref()));
        let headers = NativeHeaders::of(record);
        let client = self.0.producer.0.inner.client().native_ptr();
        let opaque = Box::into_raw(pending);
        let arguments = [
            argument(VType::RD_KAFKA_VTYPE_RKT, |u| {
                u.rkt = self.0.native.as_ptr()
            }),
            argument(VType::RD_KAFKA_VTYPE_PARTITION, |u| {
                u.i32_ = record.partition.unwrap_or(-1)
            }),
            // No `RD_KAFKA_MSG_F_COPY`, no `RD_KAFKA_MSG_F_FREE`: lent, neither copied nor freed.
            argument(VType::RD_KAFKA_VTYPE_MSGFLAGS, |u| u.i = 0),
            argument(VType::RD_KAFKA_VTYPE_VALUE, |u| u.mem = value),
            argument(VType::RD_KAFKA_VTYPE_KEY, |u| u.mem = key),
            argument(VType::RD_KAFKA_VTYPE_OPAQUE, |u| u.ptr = opaque.cast()),
            argument(VType::RD_KAFKA_VTYPE_TIMESTAMP, |u| {
                u.i64_ = record.timestamp.unwrap_or(0)
            }),
            argument(VType::RD_KAFKA_VTYPE_HEADERS, |u| {
                u.headers = headers.as_ref().map_or(ptr::null_mut(), |h| h.0.as_ptr())
            }),
        ];
        // SAFETY: the client and the topic handle are live (`self` holds both). The key and
        // value point into the `Bytes` owned by `opaque`, which librdkafka hands back with the
        // delivery report, served by `Deliveries::delivery`, which drops it only after the
        // message's last use (librdkafka neither reads nor frees lent bytes afterwards; were
        // the report never served, the box would leak, never be freed early). On success
        // librdkafka owns the headers; on failure it took nothing, and the opaque is ours again.
        let error =
            unsafe { rdsys::rd_kafka_produceva(client, arguments.as_ptr(), arguments.len()) };
        if error.is_null() {
            std::mem::forget(headers);
            return Ok(DeliveryFuture(delivery));
        }
        // SAFETY: `error` is ours to read and destroy; `opaque` came from `Box::into_raw` above
        // and librdkafka refused the message, so nothing else refers to it.
        let code = unsafe {
            let code = rdsys::rd_kafka_error_code(error);
            rdsys::rd_kafka_error_destroy(error);
            drop(Box::from_raw(opaque));
            code
        };
        Err(KafkaError::MessageProduction(RDKafkaErrorCode::from(code)))
    }
}

/// A record's headers in librdkafka's form; destroyed here unless librdkafka took them.
struct NativeHeaders(NonNull<rdsys::rd_kafka_headers_t>);

impl NativeHeaders {
    /// `None` for a record without headers.
    fn of(record: &Record) -> Option<Self> {
        if record.headers.is_empty() {
            return None;
        }
        // SAFETY: librdkafka allocates the list (it aborts rather than return null).
        let headers = Self(NonNull::new(unsafe {
            rdsys::rd_kafka_headers_new(record.headers.len())
        })?);
        for (name, value) in record.headers.iter() {
            let (value, size) = value.map_or((ptr::null(), 0), |v| (v.as_ptr(), v.len()));
            // SAFETY: the list is ours and writable; librdkafka copies name and value. It
            // refuses only a read-only list, which this is not.
            unsafe {
                rdsys::rd_kafka_header_add(
                    headers.0.as_ptr(),
                    name.as_ptr().cast(),
                    name.len() as isize,
                    value.cast(),
                    size as isize,
                )
            };
        }
        Some(headers)
    }
}

impl Drop for NativeHeaders {
    fn drop(&mut self) {
        // SAFETY: the list is ours (it is forgotten once librdkafka owns it).
        unsafe { rdsys::rd_kafka_headers_destroy(self.0.as_ptr()) };
    }
}

fn memory(bytes: Option<&Bytes>) -> rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
    let (ptr, size) = bytes.map_or((ptr::null_mut(), 0), |b| {
        (b.as_ptr().cast_mut().cast::<c_void>(), b.len())
    });
    rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 { ptr, size }
}

fn argument(
    vtype: VType,
    set: impl FnOnce(&mut rdsys::rd_kafka_vu_s__bindgen_ty_1),
) -> rdsys::rd_kafka_vu_t {
    let mut u = rdsys::rd_kafka_vu_s__bindgen_ty_1 { _pad: [0; 64] };
    set(&mut u);
    rdsys::rd_kafka_vu_t { vtype, u }
}

#[cfg(all(test, feature = "embedded-broker"))]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};

    use super::*;
    use crate::broker::EmbeddedBroker;
    use crate::kafka::producer::tests::producer;
    use crate::kafka::{KafkaSettings, record_of};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn topic_of(
        broker: &EmbeddedBroker,
        name: &str,
        overrides: &[(&str, &str)],
    ) -> Result<Topic, Box<dyn std::error::Error>> {
        Ok(producer(broker, name, overrides).await?.topic(name)?)
    }

    /// Reads `count` records of `topic` from its start (30 s deadline).
    async fn read(
        broker: &EmbeddedBroker,
        topic: &str,
        count: usize,
    ) -> Result<Vec<Record>, Box<dyn std::error::Error>> {
        let settings = KafkaSettings::new(&broker.bootstrap_servers());
        let consumer = settings.stream_consumer(Some("topic-tests"), &BTreeMap::new())?;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&partitions)?;
        let mut stream = consumer.stream();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut records = Vec::new();
        while records.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, stream.next())
                .await?
                .ok_or("the consumer stopped")??;
            records.push(record_of(&message));
        }
        Ok(records)
    }

    /// Key, value, headers and timestamp arrive as sent, though librdkafka never copied key or
    /// value and each record was dropped as soon as it was queued; the bytes lent are given
    /// back once Kafka answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_sent_by_handle_arrive_whole_and_their_lent_bytes_are_given_back() -> TestResult
    {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let topic = topic_of(&broker, "lent", &[]).await?;
        assert_eq!(topic.name(), "lent");
        let mut values = Vec::new();
        let mut deliveries = Vec::new();
        for n in 0..100 {
            let value = Bytes::from(format!("reading {n}: {}", "x".repeat(n * 10)));
            let record = Record::new("ignored: the handle names the topic")
                .with_key(format!("device-{}", n % 7))
                .with_value(value.clone())
                .with_header("content-type", "application/json")
                .with_timestamp(1_700_000_000_000 + n as i64);
            deliveries.push(topic.send(&record)?);
            values.push(value);
        }
        for (n, delivery) in deliveries.into_iter().enumerate() {
            let delivered = delivery.await?.map_err(|(e, _)| e)?;
            assert_eq!(delivered.offset, n as i64);
        }
        // The delivery report dropped librdkafka's share: each value is ours alone again.
        assert!(values.iter().all(Bytes::is_unique), "lent bytes kept");
        let records = read(&broker, "lent", 100).await?;
        for (n, record) in records.iter().enumerate() {
            assert_eq!(record.topic, "lent");
            assert_eq!(record.value.as_ref(), Some(&values[n]));
            assert_eq!(
                record.key.as_deref(),
                Some(format!("device-{}", n % 7).as_bytes())
            );
            assert_eq!(record.content_type(), Some("application/json"));
            assert_eq!(record.timestamp, Some(1_700_000_000_000 + n as i64));
        }
        broker.stop();
        Ok(())
    }

    /// A record the producer refuses is answered at once and nothing of it stays lent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_refused_at_once_keeps_nothing_lent() -> TestResult {
        let broker = EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let topic = topic_of(&broker, "small", &[("message.max.bytes", "2000")]).await?;
        let big = Bytes::from(vec![b'x'; 4000]);
        let record = Record::new("small")
            .with_value(big.clone())
            .with_header("content-type", "text/plain");
        let refused = topic.send(&record).err().ok_or("sent")?;
        assert_eq!(
            refused,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
        );
        drop(record);
        assert!(big.is_unique(), "the refused record's bytes are still lent");
        broker.stop();
        Ok(())
    }
}
