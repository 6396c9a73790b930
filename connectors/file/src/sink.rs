//! Appends each record's value as one line; `flush` syncs the file to disk, so offsets the
//! engine commits afterwards never run ahead of what the file holds.

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    Importance, SinkConnector, SinkRecord, SinkTask, SinkTaskContext, TaskConfig, Validator,
};
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncWriteExt, BufWriter};

use crate::FILE;

#[derive(Debug, Default)]
pub struct FileSinkConnector;

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
        ConfigDef::new()
            .define_required(
                FILE,
                ConfigType::String,
                Importance::High,
                "Path of the file records are appended to, one value per line.",
            )
            .with_validator(Validator::NonEmpty)
            .in_group("File")
    }

    fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // Several writers appending to one file would interleave partial lines.
        Ok(vec![context.config.clone()])
    }
}

impl SinkConnector for FileSinkConnector {
    fn create_task(&self) -> Box<dyn SinkTask> {
        Box::<FileSinkTask>::default()
    }
}

#[derive(Debug, Default)]
pub struct FileSinkTask {
    path: String,
    writer: Option<BufWriter<File>>,
}

#[async_trait]
impl SinkTask for FileSinkTask {
    async fn start(&mut self, context: SinkTaskContext) -> ConnectResult<()> {
        let parsed = FileSinkConnector.config_def().parse(&context.config)?;
        self.path = parsed.string(FILE)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(|e| ConnectError::fatal(format!("cannot open {}: {e}", self.path)))?;
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
