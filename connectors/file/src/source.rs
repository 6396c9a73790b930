//! Tails a file: each complete line becomes a record; the byte position after the line is the
//! stored offset, so a restarted task continues with the next line.

use std::io::SeekFrom;

use async_trait::async_trait;
use bytes::Bytes;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    Importance, Record, SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
    Validator, content_type,
};
use serde_json::{Map, Value, json};
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::time::Duration;

use crate::{BATCH_SIZE, FILE, POLL_INTERVAL_MS, TOPIC};

#[derive(Debug, Default)]
pub struct FileSourceConnector;

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
        ConfigDef::new()
            .define_required(
                FILE,
                ConfigType::String,
                Importance::High,
                "Path of the file to tail.",
            )
            .with_validator(Validator::NonEmpty)
            .define_required(
                TOPIC,
                ConfigType::String,
                Importance::High,
                "Topic each line is written to.",
            )
            .with_validator(Validator::NonEmpty)
            .define(
                BATCH_SIZE,
                ConfigType::Int,
                "1000",
                Importance::Low,
                "Lines returned per poll at most.",
            )
            .with_validator(Validator::between(1.0, 1_000_000.0))
            .define(
                POLL_INTERVAL_MS,
                ConfigType::Long,
                "200",
                Importance::Low,
                "Wait before looking again at the end of the file.",
            )
            .with_validator(Validator::between(1.0, 60_000.0))
            .in_group("File")
    }

    fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // One file, one reader: more tasks would read the same lines twice.
        Ok(vec![context.config.clone()])
    }
}

impl SourceConnector for FileSourceConnector {
    fn create_task(&self) -> Box<dyn SourceTask> {
        Box::<FileSourceTask>::default()
    }
}

#[derive(Debug, Default)]
pub struct FileSourceTask {
    path: String,
    topic: String,
    batch_size: usize,
    poll_interval: Duration,
    reader: Option<BufReader<File>>,
    /// Byte position after the last complete line returned.
    position: u64,
    partition: Map<String, Value>,
}

impl FileSourceTask {
    async fn open(&mut self) -> ConnectResult<bool> {
        match File::open(&self.path).await {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(self.position)).await?;
                self.reader = Some(BufReader::new(file));
                Ok(true)
            }
            // The file may appear later: a tail waits for it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(ConnectError::fatal(format!(
                "cannot open {}: {error}",
                self.path
            ))),
        }
    }
}

#[async_trait]
impl SourceTask for FileSourceTask {
    async fn start(&mut self, context: SourceTaskContext) -> ConnectResult<()> {
        let parsed = FileSourceConnector.config_def().parse(&context.config)?;
        self.path = parsed.string(FILE)?;
        self.topic = parsed.string(TOPIC)?;
        self.batch_size = parsed.int(BATCH_SIZE)? as usize;
        self.poll_interval = Duration::from_millis(parsed.int(POLL_INTERVAL_MS)? as u64);
        self.partition = Map::from_iter([("filename".to_string(), json!(self.path))]);
        self.position = context
            .offsets
            .offset(&self.partition)
            .and_then(|o| o.get("position").and_then(Value::as_u64))
            .unwrap_or(0);
        tracing::info!(connector = %context.connector_name, file = %self.path, position = self.position, "file source started");
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        if self.reader.is_none() && !self.open().await? {
            tokio::time::sleep(self.poll_interval).await;
            return Ok(Vec::new());
        }
        let Some(reader) = self.reader.as_mut() else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        let mut line = Vec::new();
        while records.len() < self.batch_size {
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
            let record = Record::new(self.topic.clone())
                .with_value(Bytes::copy_from_slice(text))
                .with_header(content_type::HEADER, content_type::TEXT);
            let offset = Map::from_iter([("position".to_string(), json!(self.position))]);
            records.push(SourceRecord::new(record, self.partition.clone(), offset));
        }
        if records.is_empty() {
            tokio::time::sleep(self.poll_interval).await;
        }
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.reader = None;
        Ok(())
    }
}
