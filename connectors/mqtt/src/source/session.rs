//! The connection to the broker: connects, subscribes, turns each PUBLISH into a record for
//! `poll()`, and reconnects with backoff when the connection is lost.
//!
//! Memory stays bounded: the queue to `poll()` is bounded, and while it is full this loop
//! stops reading from the socket, so the broker holds further messages (it sends at most its
//! in-flight window of unacknowledged QoS 1 messages anyway).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use medconnect_api::{AckHandle, SourceRecord};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::acks::{ConnectionNumber, PendingAck};
use super::records::to_record;
use crate::config::SourceConfig;

/// Room in rumqttc's request channel: one PUBACK per packet id at most, so acknowledgements
/// never wait for room.
pub const REQUEST_CHANNEL_CAPACITY: usize = 65_535;

/// Why the session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to the MQTT broker at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: ConnectionError,
    },
    #[error("the broker refused the subscription to '{0}'")]
    SubscriptionRefused(String),
}

pub fn options(config: &SourceConfig) -> MqttOptions {
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(config.clean_session)
        .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
        .set_manual_acks(true);
    if let Some(credentials) = &config.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    options
}

fn qos(config: &SourceConfig) -> QoS {
    if config.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Everything the connection loop owns.
pub struct Session {
    pub config: Arc<SourceConfig>,
    pub client: AsyncClient,
    pub event_loop: EventLoop,
    pub records: mpsc::Sender<SourceRecord>,
    pub pending_acks: mpsc::Sender<PendingAck>,
    pub connection: ConnectionNumber,
    pub shutdown: CancellationToken,
    /// Told once the subscriptions are in place (or why they are not).
    pub ready: Option<oneshot::Sender<Result<(), SessionError>>>,
    /// Asked when a record could not be written: reconnect, so the broker resends it.
    pub resend: mpsc::Receiver<u64>,
}

impl Session {
    fn address(&self) -> String {
        format!("{}:{}", self.config.host, self.config.port)
    }

    fn subscribe(&self) {
        let filters = self
            .config
            .topics
            .iter()
            .map(|topic| SubscribeFilter::new(topic.clone(), qos(&self.config)));
        if let Err(error) = self.client.try_subscribe_many(filters) {
            tracing::warn!(%error, "SUBSCRIBE not queued");
        }
    }

    fn tell_ready(&mut self, outcome: Result<(), SessionError>) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(outcome);
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self) {
        let mut backoff = self.config.reconnect_backoff;
        let mut subscribed_once = false;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = self.event_loop.poll() => event,
                Some(failed_on) = self.resend.recv(), if !self.config.clean_session => {
                    if failed_on != self.connection.current() {
                        continue;
                    }
                    // Interrupting poll is safe here: the connection is dropped anyway.
                    tracing::warn!(broker = %self.address(), retry_in_ms = backoff.as_millis() as u64, "records not written to Kafka: reconnecting so that the broker sends them again");
                    self.event_loop.clean();
                    self.connection.next();
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_backoff_max);
                    continue;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    self.connection.next();
                    backoff = self.config.reconnect_backoff;
                    tracing::info!(broker = %self.address(), client_id = %self.config.client_id, session_present = connack.session_present, "connected to the MQTT broker");
                    // A resumed session keeps its subscriptions; a new one, or this task's
                    // first connection (the filters may have changed), subscribes.
                    if !connack.session_present || !subscribed_once {
                        subscribed_once = true;
                        self.subscribe();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    let refused = suback
                        .return_codes
                        .iter()
                        .position(|code| matches!(code, SubscribeReasonCode::Failure));
                    match refused {
                        Some(index) => {
                            let filter = self.config.topics.get(index).cloned().unwrap_or_default();
                            tracing::error!(%filter, "the broker refused the subscription");
                            self.tell_ready(Err(SessionError::SubscriptionRefused(filter)));
                        }
                        None => self.tell_ready(Ok(())),
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if !self.hand_over(publish).await {
                        break;
                    }
                }
                Ok(_) => {}
                Err(source) => {
                    // rumqttc dropped the connection and any PUBACK not yet written: the broker
                    // resends those messages on the next connection (duplicates in Kafka).
                    self.connection.next();
                    tracing::warn!(broker = %self.address(), error = %source, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost");
                    if self.ready.is_some() {
                        let address = self.address();
                        self.tell_ready(Err(SessionError::Connect { address, source }));
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.reconnect_backoff_max);
                }
            }
        }
    }

    /// Queues the record for `poll()` and, for QoS 1, its PUBACK for when it is settled.
    /// `false` once the task is stopping.
    async fn hand_over(&mut self, publish: rumqttc::Publish) -> bool {
        let (handle, delivery) = AckHandle::channel();
        let record = to_record(&self.config, &publish, handle);
        if publish.qos != QoS::AtMostOnce {
            let mut header_only = publish;
            header_only.payload = Bytes::new();
            let pending = PendingAck {
                publish: header_only,
                connection: self.connection.current(),
                delivery,
            };
            let queued = tokio::select! {
                _ = self.shutdown.cancelled() => false,
                sent = self.pending_acks.send(pending) => sent.is_ok(),
            };
            if !queued {
                return false;
            }
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            sent = self.records.send(record) => sent.is_ok(),
        }
    }
}

/// The longest `stop()` waits for the loops to end.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
