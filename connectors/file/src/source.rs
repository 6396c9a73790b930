//! Tails a file: each complete line becomes a record; the byte position after the line is the
//! stored offset, so a restarted task continues with the next line.

use std::io::SeekFrom;

use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props,
    Record, SourceConnector, SourcePartition, SourceRecord, SourceTask, SourceTaskContext,
    TaskConfig, content_type,
};
use serde_json::{Map, Value, json};
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use crate::config::{FileSourceConfig, source_def};

#[derive(Debug, Default)]
pub struct FileSourceConnector;

#[async_trait]
impl Connector for FileSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.file.FileSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["FileSource", "FileStreamSource"]
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
        FileSourceConfig::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone()])
    }

    /// One file, one reader: more tasks would read the same lines twice.
    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }
}

impl SourceConnector for FileSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        let config = FileSourceConfig::parse(&context.config)?;
        let partition = SourcePartition::from_iter([("filename".to_string(), json!(config.file))]);
        Ok(Box::new(FileSourceTask {
            config,
            context,
            reader: None,
            position: 0,
            partition,
        }))
    }
}

pub struct FileSourceTask {
    config: FileSourceConfig,
    context: SourceTaskContext,
    reader: Option<BufReader<File>>,
    /// Byte position after the last complete line returned.
    position: u64,
    partition: SourcePartition,
}

impl FileSourceTask {
    async fn open(&mut self, path: &str) -> ConnectResult<bool> {
        match File::open(path).await {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(self.position)).await?;
                self.reader = Some(BufReader::new(file));
                Ok(true)
            }
            // The file may appear later: a tail waits for it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(ConnectError::fatal(format!("cannot open {path}: {error}"))),
        }
    }
}

#[async_trait]
impl SourceTask for FileSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let (config, context) = (&self.config, &self.context);
        self.position = context
            .offsets
            .offset(&self.partition)
            .and_then(|o| o.get("position").and_then(Value::as_u64))
            .unwrap_or(0);
        self.reader = None;
        tracing::info!(connector = %context.connector_name, file = %config.file, position = self.position, "file source started");
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let config = self.config.clone();
        if self.reader.is_none() && !self.open(&config.file).await? {
            tokio::time::sleep(config.poll_interval).await;
            return Ok(Vec::new());
        }
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        let mut line = Vec::new();
        while records.len() < config.batch_size {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).await?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                // A line still being written: read it again, whole, on the next poll.
                reader.seek(SeekFrom::Start(self.position)).await?;
                break;
            }
            self.position += read as u64;
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let record = Record::new(config.topic.clone())
                .with_value(Bytes::copy_from_slice(text))
                .with_header(content_type::HEADER, content_type::TEXT);
            let offset = Map::from_iter([("position".to_string(), json!(self.position))]);
            records.push(SourceRecord::new(record, self.partition.clone(), offset));
        }
        if records.is_empty() {
            tokio::time::sleep(config.poll_interval).await;
        }
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.reader = None;
        Ok(())
    }
}
