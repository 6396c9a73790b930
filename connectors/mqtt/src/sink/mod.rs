//! The sink: Kafka records to MQTT — through a broker (`mqtt.sink.target=broker`, the
//! default) or straight to the devices connected to a listener source on this worker
//! (`mqtt.sink.target=listener`).

mod broker;
mod devices;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props, SinkConnector,
    SinkOffsets, SinkRecord, SinkTask, SinkTaskContext, TaskConfig, TopicPartition,
};

use crate::config::{CLIENT_ID, SinkConfig, SinkTarget, sink_def};

#[derive(Debug, Default)]
pub struct MqttSinkConnector;

#[async_trait]
impl Connector for MqttSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.mqtt.MqttSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["MqttSink"]
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

    /// Towards a broker each task connects with its own client id, `<mqtt.client.id>-<n>`: a
    /// broker closes the older of two connections with the same id. Towards the listener one
    /// task: messages to one device keep their order only within one task.
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let config = SinkConfig::parse(&context.config)?;
        if config.target != SinkTarget::Broker {
            return Ok(vec![context.config.clone()]);
        }
        Ok((0..max_tasks.max(1))
            .map(|n| {
                let mut task = context.config.clone();
                task.insert(CLIENT_ID.to_string(), format!("{}-{n}", config.client_id));
                task
            })
            .collect())
    }
}

impl SinkConnector for MqttSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(MqttSinkTask::new(context)?))
    }
}

/// The sink task of either target.
#[derive(Debug)]
pub struct MqttSinkTask(Inner);

#[derive(Debug)]
enum Inner {
    Broker(broker::BrokerSink),
    Devices(Box<devices::DeviceSink>),
}

impl MqttSinkTask {
    pub fn new(context: SinkTaskContext) -> ConnectResult<Self> {
        let config = SinkConfig::parse(&context.config)?;
        Ok(Self(match config.target.clone() {
            SinkTarget::Broker => Inner::Broker(broker::BrokerSink::new(config, context)?),
            SinkTarget::Listener { connector } => Inner::Devices(Box::new(
                devices::DeviceSink::new(config, connector, context),
            )),
        }))
    }

    fn task(&mut self) -> &mut dyn SinkTask {
        match &mut self.0 {
            Inner::Broker(task) => task,
            Inner::Devices(task) => task.as_mut(),
        }
    }
}

#[async_trait]
impl SinkTask for MqttSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        self.task().start().await
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        self.task().put(records).await
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        self.task().flush().await
    }

    async fn pre_commit(&mut self, offsets: &SinkOffsets) -> ConnectResult<SinkOffsets> {
        self.task().pre_commit(offsets).await
    }

    async fn open(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.task().open(partitions).await
    }

    async fn close(&mut self, partitions: &[TopicPartition]) -> ConnectResult<()> {
        self.task().close(partitions).await
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.task().stop().await
    }
}
