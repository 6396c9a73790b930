//! The sink towards a broker: publishes each record's value to an MQTT topic built from its
//! key, headers and Kafka topic. With QoS 1 a record counts as delivered only once the broker's PUBACK for it
//! arrived, with QoS 2 once its PUBCOMP did: `flush` waits for those of everything put before
//! it, so the engine commits no offset past a message the broker has not acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordReporter, SinkRecord, SinkTask, SinkTaskContext,
};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SinkConfig;

/// Room a PUBLISH needs beyond its topic and payload (fixed header, lengths, packet id).
const PUBLISH_OVERHEAD_BYTES: usize = 16;

/// What the connection loop reports to the task.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Publishes the broker acknowledged (QoS 1: PUBACK, QoS 2: PUBCOMP) or that were written
    /// (QoS 0).
    settled: u64,
    /// Set when the broker's session was lost with publishes unacknowledged: they will never
    /// be acknowledged, so nothing past them may be committed.
    lost: Option<String>,
}

pub struct BrokerSink {
    config: Arc<SinkConfig>,
    errant: ErrantRecordReporter,
    client: Option<AsyncClient>,
    progress: Option<watch::Receiver<Progress>>,
    requested: Arc<AtomicU64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for BrokerSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSink")
            .field("client_id", &self.config.client_id)
            .finish()
    }
}

impl BrokerSink {
    pub fn new(config: SinkConfig, context: SinkTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: Arc::new(config),
            errant: context.errant_records,
            client: None,
            progress: None,
            requested: Arc::new(AtomicU64::new(0)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    fn qos(&self) -> QoS {
        match self.config.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        }
    }

    async fn wind_down(&mut self) {
        self.shutdown.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.tracker.wait()).await;
        self.client = None;
        self.progress = None;
    }
}

fn options(config: &SinkConfig) -> MqttOptions {
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(config.clean_session)
        .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
        .set_inflight(config.inflight);
    if let Some(credentials) = &config.credentials {
        options.set_credentials(credentials.username.clone(), credentials.password.clone());
    }
    options
}

/// Drives the connection: counts PUBACKs (PUBCOMPs at QoS 2), reconnects with backoff, notices a lost session.
async fn run_connection(
    mut event_loop: EventLoop,
    config: Arc<SinkConfig>,
    requested: Arc<AtomicU64>,
    progress: watch::Sender<Progress>,
    shutdown: CancellationToken,
) {
    let mut backoff = config.reconnect_backoff;
    let mut connected_before = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = event_loop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                backoff = config.reconnect_backoff;
                tracing::info!(client_id = %config.client_id, session_present = connack.session_present, "MQTT sink connected");
                let outstanding = requested
                    .load(Ordering::SeqCst)
                    .saturating_sub(progress.borrow().settled);
                if connected_before && !connack.session_present && outstanding > 0 {
                    progress.send_modify(|p| {
                        p.lost = Some(format!(
                            "the broker lost the session with {outstanding} publishes not acknowledged"
                        ))
                    });
                }
                connected_before = true;
            }
            Ok(Event::Incoming(Packet::PubAck(_))) if config.qos == 1 => {
                progress.send_modify(|p| p.settled += 1);
            }
            // QoS 2: the PUBREC only says the broker has the message; it is released to
            // subscribers, and the exchange over, with the PUBCOMP (rumqttc answers the
            // PUBREC with PUBREL itself, and sends it again after a reconnect).
            Ok(Event::Incoming(Packet::PubComp(_))) if config.qos == 2 => {
                progress.send_modify(|p| p.settled += 1);
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) if config.qos == 0 => {
                progress.send_modify(|p| p.settled += 1);
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(client_id = %config.client_id, %error, retry_in_ms = backoff.as_millis() as u64, "MQTT sink connection lost");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(config.reconnect_backoff_max);
            }
        }
    }
}

#[async_trait]
impl SinkTask for BrokerSink {
    async fn start(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        self.shutdown = CancellationToken::new();
        self.tracker = TaskTracker::new();
        self.requested.store(0, Ordering::SeqCst);
        let (client, event_loop) =
            AsyncClient::new(options(&self.config), usize::from(self.config.inflight));
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        self.tracker.spawn(run_connection(
            event_loop,
            self.config.clone(),
            self.requested.clone(),
            progress_tx,
            self.shutdown.clone(),
        ));
        self.client = Some(client);
        self.progress = Some(progress_rx);
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        let client = self
            .client
            .clone()
            .ok_or_else(|| ConnectError::fatal("MQTT sink used before start"))?;
        for record in records {
            let topic = match self.config.topic.render(&record.record) {
                Ok(topic) => topic,
                Err(error) => {
                    self.errant
                        .report(record, ConnectError::data(error.to_string()))
                        .await?;
                    continue;
                }
            };
            // A tombstone publishes an empty payload (with retain, that clears the topic).
            let payload = record.record.value.clone().unwrap_or_else(Bytes::new);
            if payload.len() + topic.len() + PUBLISH_OVERHEAD_BYTES > self.config.max_packet_bytes {
                let reason = format!(
                    "a PUBLISH of {} bytes is over mqtt.max.packet.bytes ({})",
                    payload.len() + topic.len(),
                    self.config.max_packet_bytes
                );
                self.errant
                    .report(record, ConnectError::data(reason))
                    .await?;
                continue;
            }
            // Waits while the broker's in-flight window is full: memory stays bounded.
            client
                .publish_bytes(topic, self.qos(), self.config.retain, payload)
                .await
                .map_err(|e| {
                    ConnectError::fatal(format!("the MQTT connection loop has stopped: {e}"))
                })?;
            self.requested.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        let progress = self
            .progress
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("MQTT sink flushed before start"))?;
        let requested = self.requested.load(Ordering::SeqCst);
        let waited = tokio::time::timeout(
            self.config.ack_timeout,
            progress.wait_for(|p| p.lost.is_some() || p.settled >= requested),
        )
        .await
        .map(|outcome| outcome.map(|p| p.lost.clone()));
        match waited {
            Err(_) => {
                let settled = progress.borrow().settled;
                Err(ConnectError::retriable(format!(
                    "{} of {requested} publishes not acknowledged by the broker within {:?}",
                    requested.saturating_sub(settled),
                    self.config.ack_timeout
                )))
            }
            Ok(Err(_)) => Err(ConnectError::fatal("the MQTT connection loop has stopped")),
            // Those publishes will never be acknowledged: fail the task, so that its restart
            // reads them again from the last committed offset.
            Ok(Ok(Some(lost))) => Err(ConnectError::fatal(lost)),
            Ok(Ok(None)) => Ok(()),
        }
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        Ok(())
    }
}
