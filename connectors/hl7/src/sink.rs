//! The MLLP sink: sends each record's value to a downstream receiver, one message at a time,
//! and moves to the next only once the receiver answered `AA`. `put` returns only when every
//! record was acknowledged or reported as errant, so the offsets the engine commits after
//! `flush` never cover an unacknowledged message. Between attempts at a refused message, `put`
//! returns a retriable error with the backoff as retry-after hint: the engine waits (and stops
//! waiting when the task stops), then puts the same batch again.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    ErrantRecordReporter, Props, SinkConnector, SinkRecord, SinkTask, SinkTaskContext, TaskConfig,
};
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::ack::{AckCode, parse_reply};
use crate::config::{SinkConfig, TLS_CA_FILE, sink_def};
use crate::message::read_header;
use crate::mllp::{ClientError, MllpClient};
use medconnect_api::tls;

#[derive(Debug, Default)]
pub struct MllpSinkConnector;

#[async_trait]
impl Connector for MllpSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.hl7.MllpSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["MllpSink"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Sink
    }

    fn config_def(&self) -> ConfigDef {
        sink_def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        SinkConfig::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // Each task holds its own connection; HL7 receivers usually want one sender, so
        // tasks.max=1 keeps a topic partition's order end to end.
        Ok(vec![context.config.clone(); max_tasks.max(1)])
    }
}

impl SinkConnector for MllpSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(MllpSinkTask::new(context)?))
    }
}

type RecordId = (String, i32, i64);

/// A record the receiver refused that has attempts left: the engine puts its batch again
/// after the backoff.
#[derive(Debug)]
struct Retrying {
    id: RecordId,
    attempts: u32,
    /// The wait before the attempt after the next one.
    delay: std::time::Duration,
}

/// The dead-letter header that carries a refusing ACK's text (MSA-3, else ERR), with the
/// connector's consent only (`errors.log.include.messages=true`): see
/// [`ConnectError::with_peer_text`].
pub const ACK_TEXT_HEADER: &str = "hl7.ack.text";

/// What became of one attempt to deliver a message.
enum Attempt {
    Accepted,
    /// AE/AR (`code`), no answer in time, or an answer that is not this message's ACK.
    Refused {
        code: Option<AckCode>,
        reason: String,
        /// The receiver's ACK text: it may quote the message (a patient's name, an id), so it
        /// stays out of `reason`, which becomes status traces and logs.
        peer_text: String,
    },
}

pub struct MllpSinkTask {
    connector: String,
    config: SinkConfig,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connection: Option<MllpClient>,
    errant: ErrantRecordReporter,
    /// Records of the batch in hand that were acknowledged or reported: when the engine puts
    /// the same batch again after a retriable failure, they are not sent twice.
    settled: HashSet<RecordId>,
    retrying: Option<Retrying>,
}

impl std::fmt::Debug for MllpSinkTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MllpSinkTask")
            .field("connector", &self.connector)
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

impl MllpSinkTask {
    /// The task for one task config (what the connector's `create_task` boxes).
    pub fn new(context: SinkTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: SinkConfig::parse(&context.config)?,
            connector: context.connector_name,
            tls: None,
            connection: None,
            errant: context.errant_records,
            settled: HashSet::new(),
            retrying: None,
        })
    }

    async fn connect(&self) -> ConnectResult<MllpClient> {
        let config = &self.config;
        let tls = self
            .tls
            .as_ref()
            .map(|(connector, name)| (connector, name.clone()));
        MllpClient::connect(
            &config.host,
            config.port,
            config.connect_timeout,
            tls,
            config.max_message_bytes,
        )
        .await
        .map_err(|e| ConnectError::retriable(e.to_string()))
    }

    /// Sends one message and reads its answer. A connection that was already open may have been
    /// closed by the receiver in the meantime (restart, idle timeout): that is retried once on
    /// a new connection. A receiver that cannot be reached is a retriable error for the engine.
    async fn exchange(&mut self, value: &Bytes, control_id: &str) -> ConnectResult<Attempt> {
        let config = self.config.clone();
        let mut reused = self.connection.is_some();
        loop {
            let mut connection = match self.connection.take() {
                Some(connection) => connection,
                None => self.connect().await?,
            };
            match connection.request(value, config.ack_timeout).await {
                Ok(frame) => {
                    return Ok(match parse_reply(&frame) {
                        Ok(reply)
                            if !reply.control_id.is_empty()
                                && !control_id.is_empty()
                                && reply.control_id != control_id =>
                        {
                            // Out of step with the receiver: start over on a new connection.
                            Attempt::Refused {
                                code: None,
                                reason: "the receiver acknowledged another message".into(),
                                peer_text: String::new(),
                            }
                        }
                        Ok(reply) => {
                            self.connection = Some(connection);
                            match reply.code {
                                AckCode::Accept => Attempt::Accepted,
                                code => Attempt::Refused {
                                    code: Some(code),
                                    reason: format!("the receiver answered {}", code.as_str()),
                                    peer_text: reply.text,
                                },
                            }
                        }
                        Err(error) => Attempt::Refused {
                            code: None,
                            reason: format!("unreadable ACK: {error}"),
                            peer_text: String::new(),
                        },
                    });
                }
                // A late ACK on this connection would be taken for the next message's: drop it.
                Err(ClientError::Timeout(after)) => {
                    return Ok(Attempt::Refused {
                        code: None,
                        reason: format!("no ACK within {after:?}"),
                        peer_text: String::new(),
                    });
                }
                Err(ClientError::Frame(crate::mllp::MllpError::FrameTooLarge { max })) => {
                    return Ok(Attempt::Refused {
                        code: None,
                        reason: format!("the receiver's answer exceeds {max} bytes"),
                        peer_text: String::new(),
                    });
                }
                // The receiver stopped reading: like one that cannot be reached, and the
                // connection (holding part of a frame) is dropped.
                Err(error @ ClientError::WriteTimeout(_)) => {
                    return Err(ConnectError::retriable(format!(
                        "MLLP receiver {}:{}: {error}",
                        config.host, config.port
                    )));
                }
                Err(error) if reused => {
                    tracing::debug!(connector = %self.connector, %error, "MLLP connection lost; reconnecting");
                    reused = false;
                }
                Err(error) => {
                    return Err(ConnectError::retriable(format!(
                        "MLLP receiver {}:{}: {error}",
                        config.host, config.port
                    )));
                }
            }
        }
    }

    /// Delivers one record: `Ok` once acknowledged, or once reported as errant after the
    /// configured attempts.
    ///
    /// Between attempts this does not sleep: it returns a retriable error carrying the backoff
    /// as its retry-after hint, and the engine waits and puts the same batch again (records
    /// already settled are skipped). A sleep inside `put` could not be cut short by a stop —
    /// `put` and `stop` both take `&mut self`, so the engine cannot call `stop` before `put`
    /// returns, and a token cancelled in `stop` would be cancelled too late — while the
    /// engine's wait between retries ends the moment the task is asked to stop.
    async fn deliver(&mut self, record: &SinkRecord, value: &Bytes) -> ConnectResult<()> {
        let config = self.config.clone();
        let control_id = read_header(&String::from_utf8_lossy(value))
            .map(|h| h.control_id)
            .unwrap_or_default();
        let id = record_id(record);
        let done = match self.retrying.take() {
            Some(retrying) if retrying.id == id => retrying,
            _ => Retrying {
                id,
                attempts: 0,
                delay: config.backoff,
            },
        };
        let attempt = done.attempts.saturating_add(1);
        let (reason, peer_text) = match self.exchange(value, &control_id).await? {
            Attempt::Accepted => {
                tracing::debug!(connector = %self.connector, %control_id, attempt, "message acknowledged by the receiver");
                return Ok(());
            }
            Attempt::Refused {
                code,
                reason,
                peer_text,
            } => {
                tracing::warn!(
                    connector = %self.connector,
                    %control_id,
                    topic = %record.record.topic,
                    partition = record.kafka_partition,
                    offset = record.kafka_offset,
                    attempt,
                    max_attempts = config.max_attempts,
                    code = code.map_or("none", AckCode::as_str),
                    "message not accepted by the receiver"
                );
                (reason, peer_text)
            }
        };
        if attempt < config.max_attempts {
            let wait = done.delay;
            self.retrying = Some(Retrying {
                attempts: attempt,
                delay: done.delay.saturating_mul(2).min(config.backoff_max),
                ..done
            });
            return Err(ConnectError::retriable(format!(
                "message {control_id} not accepted (attempt {attempt} of {}): {reason}",
                config.max_attempts
            ))
            .with_peer_text(ACK_TEXT_HEADER, peer_text)
            .with_retry_after(wait));
        }
        self.errant
            .report(
                record.clone(),
                ConnectError::data(format!(
                    "not accepted after {} attempts: {reason}",
                    config.max_attempts
                ))
                .with_peer_text(ACK_TEXT_HEADER, peer_text),
            )
            .await
    }
}

/// A record's Kafka position: how a batch put again is matched with what was done before.
fn record_id(record: &SinkRecord) -> RecordId {
    (
        record.record.topic.clone(),
        record.kafka_partition,
        record.kafka_offset,
    )
}

#[async_trait]
impl SinkTask for MllpSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let config = &self.config;
        self.tls = match &config.tls {
            Some(t) => {
                let client = t
                    .client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path()));
                let connector = tls::connector(&t.ca, client)
                    .map_err(|e| ConnectError::config(TLS_CA_FILE, e.to_string()))?;
                let name = tls::server_name(&t.server_name).map_err(|e| {
                    ConnectError::config(crate::config::TLS_SERVER_NAME, e.to_string())
                })?;
                Some((connector, name))
            }
            None => None,
        };
        tracing::info!(
            connector = %self.connector,
            host = %config.host,
            port = config.port,
            tls = self.tls.is_some(),
            "MLLP sink started"
        );
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        for record in &records {
            let id = record_id(record);
            if self.settled.contains(&id) {
                continue;
            }
            // A tombstone carries no message to send.
            if let Some(value) = record.record.value.as_ref().filter(|v| !v.is_empty()) {
                self.deliver(record, value).await?;
            }
            self.settled.insert(id);
        }
        self.settled.clear();
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        // `put` returns only after every record was acknowledged or reported.
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.connection = None;
        Ok(())
    }
}

#[cfg(test)]
#[path = "sink_tests.rs"]
mod tests;
