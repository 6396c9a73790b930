//! rdkafka clients set up from the worker config.
//!
//! Every client gets the worker's `[kafka]` settings (bootstrap servers, SASL, TLS) and then
//! its own section (`[producer]`, `[consumer]`, `[admin]`), as Connect's `producer.*`,
//! `consumer.*` and `admin.*` prefixes do. A connector may override further with
//! `producer.override.*` / `consumer.override.*` in its config.

mod admin;
mod error;
mod producer;
mod producers;
mod topic;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use medconnect_api::Record;
use rdkafka::message::{Headers as _, Message};

use rdkafka::ClientConfig;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};

pub use admin::{TopicSpec, ensure_topics};
pub use error::{KafkaSetupError, secret_hidden};
pub use producer::{Delivery, DeliveryFuture, OwnedDeliveryResult, Producer};
pub use producers::ProducerPool;
pub use topic::Topic;

use crate::worker::redact::SecretsHidden;

/// Kafka client settings of a worker; `Debug` hides secrets (`sasl.password`, ...).
#[derive(Clone, Default)]
pub struct KafkaSettings {
    /// Applied to every client.
    pub common: BTreeMap<String, String>,
    pub producer: BTreeMap<String, String>,
    pub consumer: BTreeMap<String, String>,
    pub admin: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("common", &SecretsHidden(&self.common))
            .field("producer", &SecretsHidden(&self.producer))
            .field("consumer", &SecretsHidden(&self.consumer))
            .field("admin", &SecretsHidden(&self.admin))
            .finish()
    }
}

impl KafkaSettings {
    pub fn new(bootstrap_servers: &str) -> Self {
        let mut settings = Self::default();
        settings
            .common
            .insert("bootstrap.servers".into(), bootstrap_servers.into());
        settings
    }

    pub fn bootstrap_servers(&self) -> &str {
        self.common
            .get("bootstrap.servers")
            .map_or("", String::as_str)
    }

    fn base(&self, section: &BTreeMap<String, String>) -> ClientConfig {
        remember_secrets(self.common.iter().chain(section));
        let mut config = ClientConfig::new();
        for (key, value) in self.common.iter().chain(section) {
            config.set(key, value);
        }
        config
    }

    /// The producer for records and internal topics: durable before acknowledged.
    pub fn producer_config(&self, overrides: &BTreeMap<String, String>) -> ClientConfig {
        let mut config = ClientConfig::new();
        // The worker's own settings only: overrides come from connector configs, whose
        // inline values a caller chooses (see `secrets::resolve`).
        remember_secrets(self.common.iter().chain(&self.producer));
        // Safe defaults first: every one can be overridden except what durability needs.
        config.set("linger.ms", "5");
        config.set("compression.type", "lz4");
        for (key, value) in self.common.iter().chain(&self.producer).chain(overrides) {
            config.set(key, value);
        }
        // Never acknowledge a sender before every in-sync replica has the record.
        config.set("acks", "all");
        config.set("enable.idempotence", "true");
        config
    }

    pub fn producer(
        &self,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Producer, KafkaSetupError> {
        self.producer_config(overrides)
            .create()
            .map_err(|e| KafkaSetupError::client("producer", e))
    }

    /// A consumer that commits only when told (after a sink flushed).
    pub fn consumer_config(
        &self,
        group_id: Option<&str>,
        overrides: &BTreeMap<String, String>,
    ) -> ClientConfig {
        let mut config = self.base(&self.consumer);
        config.set("enable.auto.commit", "false");
        config.set("enable.auto.offset.store", "false");
        config.set("auto.offset.reset", "earliest");
        config.set("enable.partition.eof", "false");
        for (key, value) in overrides {
            config.set(key, value);
        }
        if let Some(group) = group_id {
            config.set("group.id", group);
        }
        config
    }

    pub fn stream_consumer(
        &self,
        group_id: Option<&str>,
        overrides: &BTreeMap<String, String>,
    ) -> Result<StreamConsumer, KafkaSetupError> {
        self.consumer_config(group_id, overrides)
            .create()
            .map_err(|e| KafkaSetupError::client("consumer", e))
    }

    /// A [`stream_consumer`](Self::stream_consumer) whose group events go to `context` (a sink
    /// runner takes over partition assignment to commit before a revocation completes).
    pub fn stream_consumer_with<C: ConsumerContext + 'static>(
        &self,
        group_id: Option<&str>,
        overrides: &BTreeMap<String, String>,
        context: C,
    ) -> Result<StreamConsumer<C>, KafkaSetupError> {
        self.consumer_config(group_id, overrides)
            .create_with_context(context)
            .map_err(|e| KafkaSetupError::client("consumer", e))
    }

    pub fn admin_config(&self) -> ClientConfig {
        self.base(&self.admin)
    }
}

/// Log lines are scrubbed of the clients' secret settings (a client library may quote them).
fn remember_secrets<'a>(settings: impl Iterator<Item = (&'a String, &'a String)>) {
    crate::worker::redact::remember(
        settings
            .filter(|(key, _)| medconnect_api::is_secret_name(key))
            .map(|(_, value)| value.as_str()),
    );
}

/// Keys of a connector config with `prefix` (`producer.override.`), prefix removed.
pub fn overrides_with_prefix(
    props: &BTreeMap<String, String>,
    prefix: &str,
) -> BTreeMap<String, String> {
    props
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

/// A Kafka message as a [`Record`]: a record a sink consumed, or one the producer handed back
/// with its refusal (to dead-letter or send again). The key, the value and the header values
/// are copied out of the client's buffer into one allocation and shared from there: a copy of
/// the record (a sink's batch kept for a retried `put`) then costs reference counts, not
/// allocations (a `Bytes` copied on its own allocates again when first cloned).
pub fn record_of(message: &impl Message) -> Record {
    let headers = message.headers();
    let length = message.key().map_or(0, <[u8]>::len)
        + message.payload().map_or(0, <[u8]>::len)
        + headers.map_or(0, |h| {
            h.iter()
                .map(|header| header.value.map_or(0, <[u8]>::len))
                .sum()
        });
    let mut buffer = BytesMut::with_capacity(length);
    let mut share = |bytes: &[u8]| -> Bytes {
        buffer.extend_from_slice(bytes);
        buffer.split().freeze()
    };
    let key = message.key().map(&mut share);
    let value = message.payload().map(&mut share);
    let headers = headers
        .map(|h| {
            h.iter()
                .map(|header| (header.key.to_string(), header.value.map(&mut share)))
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: message.topic().to_string(),
        partition: (message.partition() >= 0).then_some(message.partition()),
        key,
        value,
        headers,
        timestamp: message.timestamp().to_millis(),
    }
}
