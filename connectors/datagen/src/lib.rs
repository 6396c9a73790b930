//! `datagen`: a source of realistic synthetic healthcare events as JSON.
//!
//! Records are a pure function of (seed, task, sequence number), so a task resumed from its
//! stored offset continues the exact stream it would have produced: tests can count records
//! and find every sequence number once.

pub mod config;
mod generator;

use async_trait::async_trait;
use medconnect_api::{
    ConfigDef, ConnectResult, Connector, ConnectorContext, ConnectorKind, Props, Record,
    SourceConnector, SourcePartition, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
    content_type,
};
use serde_json::{Map, Value, json};
use tokio::time::{Duration, Instant};

pub use config::{
    BATCH_SIZE, DatagenConfig, DatagenTaskConfig, MAX_RECORDS, Pace, RATE, SCHEMA, SEED, TOPIC,
};
use config::{TASK_COUNT, TASK_MAX_RECORDS};
pub use generator::{Schema, generate};

/// The longest a poll waits before returning an empty batch when nothing is due (limit
/// reached, a slow pace): idle without spinning, and without holding `poll` for long (the
/// engine pauses between polls).
const IDLE: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct DatagenSourceConnector;

#[async_trait]
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
        config::def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        DatagenConfig::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let config = DatagenConfig::parse(&context.config)?;
        // The engine bounds max_tasks by tasks.max and the worker's limit.
        let tasks = u32::try_from(max_tasks.max(1)).unwrap_or(u32::MAX);
        let total = config.max_records;
        let count = u64::from(tasks);
        Ok((0..tasks)
            .map(|task| {
                let mut props = context.config.clone();
                let share = if total == 0 {
                    0
                } else {
                    total / count + u64::from(u64::from(task) < total % count)
                };
                props.insert(TASK_MAX_RECORDS.into(), share.to_string());
                // The rate stays as given; each task paces itself at rate / task.count.
                props.insert(TASK_COUNT.into(), tasks.to_string());
                props
            })
            .collect())
    }
}

impl SourceConnector for DatagenSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        let config = DatagenTaskConfig::parse(&context.config)?;
        let partition = SourcePartition::from_iter([
            (
                "generator".to_string(),
                json!(config.connector.schema.as_str()),
            ),
            ("task".to_string(), json!(context.task_id)),
        ]);
        Ok(Box::new(DatagenSourceTask {
            pace: config.pace(),
            config,
            context,
            next_seq: 0,
            next_due: None,
            partition,
        }))
    }
}

pub struct DatagenSourceTask {
    config: DatagenTaskConfig,
    context: SourceTaskContext,
    next_seq: u64,
    pace: Pace,
    /// When the next record is due (throttled tasks; set on the first poll).
    next_due: Option<Instant>,
    partition: SourcePartition,
}

impl DatagenSourceTask {
    fn batch_len(&self, config: &DatagenTaskConfig) -> u64 {
        let left = if config.max_records == 0 {
            u64::MAX - self.next_seq
        } else {
            config.max_records.saturating_sub(self.next_seq)
        };
        left.min(config.connector.batch_size)
    }

    /// How many of `count` records are due now (0: none yet, or none ever). Waits at most
    /// [`IDLE`], so a slow pace never holds `poll` for long.
    async fn due(&mut self, count: u64) -> u64 {
        let interval = match self.pace {
            Pace::Unthrottled => return count,
            Pace::Never => {
                tokio::time::sleep(IDLE).await;
                return 0;
            }
            Pace::Every(interval) => interval,
        };
        let now = Instant::now();
        let due = *self.next_due.get_or_insert(now);
        if due > now {
            if due - now > IDLE {
                tokio::time::sleep(IDLE).await;
                return 0;
            }
            tokio::time::sleep_until(due).await;
        }
        // Emit what is due by now (at least one), so low rates send single records.
        let elapsed = Instant::now().saturating_duration_since(due);
        let behind = elapsed.as_nanos() / interval.as_nanos().max(1);
        let count = count.min(u64::try_from(behind).unwrap_or(u64::MAX).saturating_add(1));
        // A next due time past what the clock can hold: this task has emitted its last record.
        let next = u32::try_from(count)
            .ok()
            .and_then(|n| interval.checked_mul(n))
            .and_then(|span| due.checked_add(span));
        match next {
            Some(next) => self.next_due = Some(next),
            None => self.pace = Pace::Never,
        }
        count
    }
}

#[async_trait]
impl SourceTask for DatagenSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        self.pace = self.config.pace();
        self.next_due = None;
        let context = &self.context;
        self.next_seq = context
            .offsets
            .offset(&self.partition)
            .and_then(|offset| offset.get("seq").and_then(Value::as_u64))
            // A stored offset is data (PATCH .../offsets can set any): never overflow on it.
            .map_or(0, |seq| seq.saturating_add(1));
        tracing::info!(connector = %context.connector_name, task = context.task_id, resume_from = self.next_seq, pace = ?self.pace, "datagen task started");
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let config = &self.config;
        let count = match self.batch_len(config) {
            0 => {
                // Limit reached: idle without spinning; the engine calls again.
                tokio::time::sleep(IDLE).await;
                0
            }
            left => self.due(left).await,
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let config = &self.config;
        let first = self.next_seq;
        let records = (first..first.saturating_add(count))
            .map(|seq| {
                let event = generate(
                    config.connector.schema,
                    config.connector.seed,
                    self.context.task_id,
                    seq,
                );
                let record = Record::new(config.connector.topic.clone())
                    .with_key(event.key)
                    .with_value(event.value)
                    .with_header(content_type::HEADER, content_type::JSON)
                    .with_header("medconnect.datagen.kind", event.kind)
                    .with_timestamp(event.timestamp_ms);
                let offset = Map::from_iter([("seq".to_string(), json!(seq))]);
                SourceRecord::new(record, self.partition.clone(), offset)
            })
            .collect::<Vec<_>>();
        self.next_seq = first.saturating_add(records.len() as u64);
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use medconnect_api::{ConnectError, OffsetReader, SourceOffset};

    use super::*;

    /// Gives every partition the same stored offset.
    struct Stored(Option<u64>);

    impl OffsetReader for Stored {
        fn offset(&self, _partition: &SourcePartition) -> Option<SourceOffset> {
            self.0
                .map(|seq| Map::from_iter([("seq".to_string(), json!(seq))]))
        }
    }

    fn context(pairs: &[(&str, &str)], stored: Option<u64>) -> SourceTaskContext {
        SourceTaskContext {
            connector_name: "gen".into(),
            task_id: 0,
            config: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            offsets: Arc::new(Stored(stored)),
            listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
        }
    }

    async fn started(context: SourceTaskContext) -> Box<dyn SourceTask> {
        let mut task = DatagenSourceConnector
            .create_task(context)
            .expect("a valid task config");
        task.start().await.expect("starts");
        task
    }

    #[test]
    fn a_rate_too_small_to_pace_is_a_config_error_not_a_panic() {
        let created =
            DatagenSourceConnector.create_task(context(&[(TOPIC, "t"), (RATE, "1e-300")], None));
        assert!(
            matches!(created, Err(ConnectError::Config { ref field, .. }) if field == RATE),
            "{:?}",
            created.err()
        );
    }

    #[tokio::test]
    async fn the_slowest_pace_sends_one_record_then_idles_without_overflow() {
        // The slowest valid rate spread over the most tasks: one record every 136 million years.
        let mut task = started(context(
            &[(TOPIC, "t"), (RATE, "0.000001"), (TASK_COUNT, "4294967295")],
            None,
        ))
        .await;
        assert_eq!(task.poll().await.expect("polls").len(), 1);
        for _ in 0..3 {
            assert!(task.poll().await.expect("polls").is_empty());
        }
    }

    #[tokio::test]
    async fn a_stored_offset_at_the_end_of_the_sequence_does_not_overflow() {
        let mut task = started(context(&[(TOPIC, "t"), (RATE, "0")], Some(u64::MAX))).await;
        let records = task.poll().await.expect("polls");
        assert!(records.len() <= 1, "{}", records.len());
    }

    #[tokio::test]
    async fn task_configs_split_records_and_share_the_rate() {
        let config: Props = [(TOPIC, "t"), (RATE, "9"), (MAX_RECORDS, "10")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let tasks = DatagenSourceConnector
            .task_configs(
                &ConnectorContext {
                    connector_name: "gen".into(),
                    config,
                },
                3,
            )
            .await
            .expect("task configs");
        let parsed: Vec<DatagenTaskConfig> = tasks
            .iter()
            .map(|t| DatagenTaskConfig::parse(t).expect("valid task config"))
            .collect();
        assert_eq!(
            parsed.iter().map(|t| t.max_records).collect::<Vec<_>>(),
            vec![4, 3, 3]
        );
        assert!(
            parsed
                .iter()
                .all(|t| t.tasks == 3 && t.connector.rate == 9.0)
        );
        assert_eq!(
            parsed[0].pace(),
            Pace::Every(Duration::from_millis(333) + Duration::from_nanos(333_333))
        );
    }
}
