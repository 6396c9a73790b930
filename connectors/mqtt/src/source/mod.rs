//! The broker source: medconnect subscribes to an existing MQTT broker and sends each
//! message's PUBACK only once the engine reports its record durable.

mod acks;
mod records;
mod session;

use std::sync::Arc;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props,
    SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use acks::acknowledges;
pub use records::{HEADER_CLIENT_ID, HEADER_DUP, HEADER_QOS, HEADER_RETAIN, HEADER_TOPIC};

use crate::config::{CLIENT_ID, SourceConfig, source_def};
use acks::ConnectionNumber;
use session::{REQUEST_CHANNEL_CAPACITY, STOP_GRACE, Session, SessionError, options};

#[derive(Debug, Default)]
pub struct MqttBrokerSourceConnector;

#[async_trait]
impl Connector for MqttBrokerSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.mqtt.MqttBrokerSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["MqttBrokerSource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        source_def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        SourceConfig::parse(config).map(|_| ())
    }

    /// Several tasks only with shared subscriptions (each gets its own client id, `<id>-<n>`):
    /// with plain ones every task would receive every message.
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let config = SourceConfig::parse(&context.config)?;
        if !config.all_shared() || max_tasks <= 1 {
            return Ok(vec![context.config.clone()]);
        }
        Ok((0..max_tasks)
            .map(|n| {
                let mut task = context.config.clone();
                task.insert(CLIENT_ID.to_string(), format!("{}-{n}", config.client_id));
                task
            })
            .collect())
    }
}

impl SourceConnector for MqttBrokerSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(MqttBrokerSourceTask::new(context)?))
    }
}

pub struct MqttBrokerSourceTask {
    config: Arc<SourceConfig>,
    records: Option<mpsc::Receiver<SourceRecord>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for MqttBrokerSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttBrokerSourceTask")
            .field("client_id", &self.config.client_id)
            .finish()
    }
}

impl MqttBrokerSourceTask {
    /// The task for one task config (what the connector's `create_task` boxes).
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: Arc::new(SourceConfig::parse(&context.config)?),
            records: None,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Ends the loops of an earlier start (a retried start, or `stop`).
    async fn wind_down(&mut self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("the MQTT session did not end within the grace period");
        }
        // Records never polled drop their handles: no PUBACK, the broker resends them.
        self.records = None;
    }
}

/// A refusal that retrying cannot fix: the credentials are wrong or not allowed.
fn refused_for_credentials(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
    )
}

#[async_trait]
impl SourceTask for MqttBrokerSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        self.shutdown = CancellationToken::new();
        self.tracker = TaskTracker::new();

        let (client, event_loop) =
            AsyncClient::new(options(&self.config), REQUEST_CHANNEL_CAPACITY);
        let (records_tx, records_rx) = mpsc::channel(self.config.queue_capacity);
        let (acks_tx, acks_rx) = mpsc::channel(self.config.queue_capacity);
        let (ready_tx, ready_rx) = oneshot::channel();
        let connection = ConnectionNumber::default();
        let (resend_tx, resend_rx) = mpsc::channel(1);
        self.tracker.spawn(acks::run(
            client.clone(),
            acks_rx,
            connection.clone(),
            resend_tx,
            self.shutdown.clone(),
        ));
        self.tracker.spawn(
            Session {
                config: self.config.clone(),
                client,
                event_loop,
                records: records_tx,
                pending_acks: acks_tx,
                connection,
                shutdown: self.shutdown.clone(),
                ready: Some(ready_tx),
                resend: resend_rx,
            }
            .run(),
        );
        self.records = Some(records_rx);

        let outcome = tokio::time::timeout(self.config.connect_timeout, ready_rx).await;
        let failure = match outcome {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(SessionError::SubscriptionRefused(filter)))) => ConnectError::config(
                crate::config::TOPICS,
                format!(
                    "the broker refused the subscription to '{filter}' (not authorised, or an invalid filter)"
                ),
            ),
            Ok(Ok(Err(SessionError::Connect {
                source: ConnectionError::ConnectionRefused(code),
                ..
            }))) if refused_for_credentials(code) => ConnectError::config(
                crate::config::USERNAME,
                format!(
                    "the broker refused the CONNECT ({code:?}): check mqtt.username and mqtt.password"
                ),
            ),
            Ok(Ok(Err(error))) => ConnectError::retriable(error.to_string()).caused_by(error),
            Ok(Err(_)) => ConnectError::fatal("the MQTT session ended before it was ready"),
            Err(_) => ConnectError::retriable(format!(
                "no CONNACK and SUBACK from the MQTT broker at {}:{} within {:?}",
                self.config.host, self.config.port, self.config.connect_timeout
            )),
        };
        self.wind_down().await;
        Err(failure)
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let records = self
            .records
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("MQTT source polled before start"))?;
        let Some(first) = records.recv().await else {
            return Err(ConnectError::fatal("the MQTT session has stopped"));
        };
        let mut batch = vec![first];
        while batch.len() < self.config.poll_batch_max {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.wind_down().await;
        Ok(())
    }
}
