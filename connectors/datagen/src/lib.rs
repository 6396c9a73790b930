//! `datagen`: a source of realistic synthetic healthcare events as JSON.
//!
//! Records are a pure function of (seed, task, sequence number), so a task resumed from its
//! stored offset continues the exact stream it would have produced: tests can count records
//! and find every sequence number once.

mod generator;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectResult, Connector, ConnectorContext, ConnectorKind, Importance,
    Record, SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig, Validator,
    content_type,
};
use serde_json::{Map, Value, json};
use tokio::time::{Duration, Instant};

pub use generator::{Schema, generate};

pub const TOPIC: &str = "topic";
pub const SCHEMA: &str = "schema";
pub const RATE: &str = "rate";
pub const MAX_RECORDS: &str = "max.records";
pub const BATCH_SIZE: &str = "batch.size";
pub const SEED: &str = "seed";
/// Task-level: this task's share of `max.records` (set by the connector, not by users).
const TASK_MAX_RECORDS: &str = "task.max.records";

#[derive(Debug, Default)]
pub struct DatagenSourceConnector;

impl Connector for DatagenSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.datagen.DatagenSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["DatagenSource", "datagen"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        ConfigDef::new()
            .define_required(TOPIC, ConfigType::String, Importance::High, "Topic the generated events are written to.")
            .with_validator(Validator::NonEmpty)
            .define(SCHEMA, ConfigType::String, "vitals", Importance::High,
                "Kind of events: `vitals` (bedside monitor readings), `adt` (patient admit/transfer/discharge events) or `mixed`.")
            .with_validator(Validator::OneOf(vec!["vitals", "adt", "mixed"]))
            .define(RATE, ConfigType::Double, "10", Importance::Medium,
                "Records per second per connector, spread over its tasks; 0 generates as fast as Kafka takes them.")
            .with_validator(Validator::at_least(0.0))
            .define(MAX_RECORDS, ConfigType::Long, "0", Importance::Medium,
                "Total records to generate across all tasks, then stay idle; 0 means no limit.")
            .with_validator(Validator::at_least(0.0))
            .define(BATCH_SIZE, ConfigType::Int, "500", Importance::Low, "Records returned per poll.")
            .with_validator(Validator::between(1.0, 100_000.0))
            .define(SEED, ConfigType::Long, "42", Importance::Low, "Seed of the generator: the same seed gives the same events.")
            .in_group("Datagen")
    }

    fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let parsed = self.config_def().parse(&context.config)?;
        let total = parsed.int(MAX_RECORDS)?.max(0) as u64;
        let tasks = max_tasks.max(1) as u64;
        let rate = parsed.double(RATE)? / tasks as f64;
        Ok((0..tasks)
            .map(|task| {
                let mut config = context.config.clone();
                let share = if total == 0 {
                    0
                } else {
                    total / tasks + u64::from(task < total % tasks)
                };
                config.insert(TASK_MAX_RECORDS.into(), share.to_string());
                config.insert(RATE.into(), rate.to_string());
                config
            })
            .collect())
    }
}

impl SourceConnector for DatagenSourceConnector {
    fn create_task(&self) -> Box<dyn SourceTask> {
        Box::<DatagenSourceTask>::default()
    }
}

#[derive(Debug, Default)]
pub struct DatagenSourceTask {
    topic: String,
    schema: Schema,
    seed: u64,
    task_id: u32,
    next_seq: u64,
    /// 0: unbounded.
    limit: u64,
    batch_size: u64,
    /// Time between records; zero when unthrottled.
    interval: Duration,
    next_due: Option<Instant>,
    partition: Map<String, Value>,
}

impl DatagenSourceTask {
    fn batch_len(&self) -> u64 {
        let left = if self.limit == 0 {
            u64::MAX
        } else {
            self.limit.saturating_sub(self.next_seq)
        };
        left.min(self.batch_size)
    }
}

#[async_trait]
impl SourceTask for DatagenSourceTask {
    async fn start(&mut self, context: SourceTaskContext) -> ConnectResult<()> {
        let parsed = DatagenSourceConnector.config_def().parse(&context.config)?;
        self.topic = parsed.string(TOPIC)?;
        self.schema = parsed.string(SCHEMA)?.parse()?;
        self.seed = parsed.int(SEED)? as u64;
        self.task_id = context.task_id;
        self.limit = context
            .config
            .get(TASK_MAX_RECORDS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(parsed.int(MAX_RECORDS)?.max(0) as u64);
        self.batch_size = parsed.int(BATCH_SIZE)?.max(1) as u64;
        let rate = parsed.double(RATE)?;
        self.interval = if rate > 0.0 {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::ZERO
        };
        self.partition = Map::from_iter([
            ("generator".to_string(), json!(self.schema.as_str())),
            ("task".to_string(), json!(self.task_id)),
        ]);
        self.next_seq = context
            .offsets
            .offset(&self.partition)
            .and_then(|offset| offset.get("seq").and_then(Value::as_u64))
            .map_or(0, |seq| seq + 1);
        tracing::info!(connector = %context.connector_name, task = self.task_id, resume_from = self.next_seq, "datagen task started");
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let mut count = self.batch_len();
        if count == 0 {
            // Limit reached: idle without spinning; the engine calls again.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(Vec::new());
        }
        if !self.interval.is_zero() {
            let now = Instant::now();
            let due = *self.next_due.get_or_insert(now);
            if due > now {
                tokio::time::sleep_until(due).await;
            }
            // Emit what is due by now (at least one), so low rates send single records.
            let elapsed = Instant::now().saturating_duration_since(due);
            let due_count = 1 + (elapsed.as_secs_f64() / self.interval.as_secs_f64()) as u64;
            count = count.min(due_count);
            self.next_due = Some(due + self.interval * count as u32);
        }
        let records = (self.next_seq..self.next_seq + count)
            .map(|seq| {
                let event = generate(self.schema, self.seed, self.task_id, seq);
                let record = Record::new(self.topic.clone())
                    .with_key(event.key)
                    .with_value(event.value)
                    .with_header(content_type::HEADER, content_type::JSON)
                    .with_header("medconnect.datagen.kind", event.kind)
                    .with_timestamp(event.timestamp_ms);
                let offset = Map::from_iter([("seq".to_string(), json!(seq))]);
                SourceRecord::new(record, self.partition.clone(), offset)
            })
            .collect();
        self.next_seq += count;
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}
