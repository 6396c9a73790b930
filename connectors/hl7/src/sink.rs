//! The MLLP sink: sends each record's value to a downstream receiver, one message at a time,
//! and moves to the next only once the receiver answered `AA`. `put` returns only when every
//! record was acknowledged or reported as errant, so the offsets the engine commits after
//! `flush` never cover an unacknowledged message.

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
use crate::mllp::{ClientError, MllpClient, tls};

#[derive(Debug, Default)]
pub struct MllpSinkConnector;

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

    fn validate(&self, config: &Props) -> ConnectResult<()> {
        SinkConfig::parse(config).map(|_| ())
    }

    fn task_configs(
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
    fn create_task(&self) -> Box<dyn SinkTask> {
        Box::<MllpSinkTask>::default()
    }
}

/// What became of one attempt to deliver a message.
enum Attempt {
    Accepted,
    /// AE/AR (`code`), no answer in time, or an answer that is not this message's ACK.
    Refused {
        code: Option<AckCode>,
        reason: String,
    },
}

#[derive(Default)]
pub struct MllpSinkTask {
    connector: String,
    config: Option<SinkConfig>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connection: Option<MllpClient>,
    errant: Option<ErrantRecordReporter>,
    /// Records of the batch in hand that were acknowledged or reported: when the engine puts
    /// the same batch again after a retriable failure, they are not sent twice.
    settled: HashSet<(String, i32, i64)>,
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
    fn config(&self) -> ConnectResult<&SinkConfig> {
        self.config
            .as_ref()
            .ok_or_else(|| ConnectError::fatal("MLLP sink used before start"))
    }

    async fn connect(&self) -> ConnectResult<MllpClient> {
        let config = self.config()?;
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
        let config = self.config()?.clone();
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
                            }
                        }
                        Ok(reply) => {
                            self.connection = Some(connection);
                            match reply.code {
                                AckCode::Accept => Attempt::Accepted,
                                code => {
                                    tracing::debug!(connector = %self.connector, %control_id, text = %reply.text, "receiver's ACK text");
                                    Attempt::Refused {
                                        code: Some(code),
                                        reason: format!(
                                            "the receiver answered {}: {}",
                                            code.as_str(),
                                            reply.text
                                        ),
                                    }
                                }
                            }
                        }
                        Err(error) => Attempt::Refused {
                            code: None,
                            reason: format!("unreadable ACK: {error}"),
                        },
                    });
                }
                // A late ACK on this connection would be taken for the next message's: drop it.
                Err(ClientError::Timeout(after)) => {
                    return Ok(Attempt::Refused {
                        code: None,
                        reason: format!("no ACK within {after:?}"),
                    });
                }
                Err(ClientError::Frame(crate::mllp::MllpError::FrameTooLarge { max })) => {
                    return Ok(Attempt::Refused {
                        code: None,
                        reason: format!("the receiver's answer exceeds {max} bytes"),
                    });
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
    async fn deliver(&mut self, record: &SinkRecord, value: &Bytes) -> ConnectResult<()> {
        let config = self.config()?.clone();
        let control_id = read_header(&String::from_utf8_lossy(value))
            .map(|h| h.control_id)
            .unwrap_or_default();
        let mut delay = config.backoff;
        let mut last = String::new();
        for attempt in 1..=config.max_attempts {
            match self.exchange(value, &control_id).await? {
                Attempt::Accepted => {
                    tracing::debug!(connector = %self.connector, %control_id, attempt, "message acknowledged by the receiver");
                    return Ok(());
                }
                Attempt::Refused { code, reason } => {
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
                    last = reason;
                }
            }
            if attempt < config.max_attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.backoff_max);
            }
        }
        let reporter = self
            .errant
            .as_ref()
            .ok_or_else(|| ConnectError::fatal("MLLP sink used before start"))?;
        reporter
            .report(
                record.clone(),
                ConnectError::data(format!(
                    "not accepted after {} attempts: {last}",
                    config.max_attempts
                )),
            )
            .await
    }
}

#[async_trait]
impl SinkTask for MllpSinkTask {
    async fn start(&mut self, context: SinkTaskContext) -> ConnectResult<()> {
        let config = SinkConfig::parse(&context.config)?;
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
            connector = %context.connector_name,
            task = context.task_id,
            host = %config.host,
            port = config.port,
            tls = self.tls.is_some(),
            "MLLP sink started"
        );
        self.connector = context.connector_name;
        self.errant = Some(context.errant_records);
        self.config = Some(config);
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        for record in &records {
            let id = (
                record.record.topic.clone(),
                record.kafka_partition,
                record.kafka_offset,
            );
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
