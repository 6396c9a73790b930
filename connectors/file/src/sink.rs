//! Appends each record's value as one line; `flush` syncs the file to disk, so offsets the
//! engine commits afterwards never run ahead of what the file holds.

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props,
    SinkConnector, SinkRecord, SinkTask, SinkTaskContext, TaskConfig,
};
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::config::{FileSinkConfig, sink_def};

#[derive(Debug, Default)]
pub struct FileSinkConnector;

#[async_trait]
impl Connector for FileSinkConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.file.FileSinkConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["FileSink", "FileStreamSink"]
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
        FileSinkConfig::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone()])
    }

    /// Several writers appending to one file would interleave partial lines.
    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }
}

impl SinkConnector for FileSinkConnector {
    fn create_task(&self, context: SinkTaskContext) -> ConnectResult<Box<dyn SinkTask>> {
        Ok(Box::new(FileSinkTask {
            config: FileSinkConfig::parse(&context.config)?,
            writer: None,
        }))
    }
}

#[derive(Debug)]
pub struct FileSinkTask {
    config: FileSinkConfig,
    writer: Option<BufWriter<File>>,
}

#[async_trait]
impl SinkTask for FileSinkTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let path = &self.config.file;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| ConnectError::fatal(format!("cannot open {path}: {e}")))?;
        self.writer = Some(BufWriter::new(file));
        Ok(())
    }

    async fn put(&mut self, records: Vec<SinkRecord>) -> ConnectResult<()> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("file sink used before start"))?;
        // Tombstones carry no value to write.
        for value in records.iter().filter_map(|r| r.record.value.as_ref()) {
            writer.write_all(value).await?;
            writer.write_all(b"\n").await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> ConnectResult<()> {
        if let Some(writer) = self.writer.as_mut() {
            writer.flush().await?;
            writer.get_ref().sync_data().await?;
        }
        Ok(())
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.flush().await?;
        self.writer = None;
        Ok(())
    }
}
