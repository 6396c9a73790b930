//! The datagen settings, declared once and read into typed structs: the connector's at
//! validation, each task's when it starts.

use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Validator,
};

use crate::generator::Schema;

pub const TOPIC: &str = "topic";
pub const SCHEMA: &str = "schema";
pub const RATE: &str = "rate";
pub const MAX_RECORDS: &str = "max.records";
pub const BATCH_SIZE: &str = "batch.size";
pub const SEED: &str = "seed";
/// Task-level: this task's share of `max.records` (set by the connector, not by users).
pub const TASK_MAX_RECORDS: &str = "task.max.records";
/// Task-level: how many tasks share `rate` (set by the connector). Task configs written before
/// it existed carry their share of the rate in `rate` and no count: they read as 1.
pub const TASK_COUNT: &str = "task.count";

/// The slowest rate other than 0: one record every 11.6 days. Slower ones are surely typos
/// (`1e-300` would put the next record beyond what a clock can represent).
pub const MIN_RATE: f64 = 1e-6;

fn rate_check(value: &str) -> Result<(), String> {
    let rate: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("'{value}' is not a number"))?;
    if !rate.is_finite() {
        return Err(format!("'{value}' is not a finite number"));
    }
    if rate < 0.0 {
        return Err("must be at least 0".into());
    }
    if rate > 0.0 && rate < MIN_RATE {
        return Err(format!(
            "must be 0 (as fast as Kafka takes them) or at least {MIN_RATE} records per second"
        ));
    }
    Ok(())
}

pub fn def() -> ConfigDef {
    ConfigDef::new()
        .define_required(TOPIC, ConfigType::String, Importance::High, "Topic the generated events are written to.")
        .with_validator(Validator::NonEmpty)
        .define(SCHEMA, ConfigType::String, "vitals", Importance::High,
            "Kind of events: `vitals` (bedside monitor readings), `adt` (patient admit/transfer/discharge events) or `mixed`.")
        .with_validator(Validator::OneOf(vec!["vitals", "adt", "mixed"]))
        .define(RATE, ConfigType::Double, "10", Importance::Medium,
            "Records per second per connector, spread over its tasks; 0 generates as fast as Kafka takes them. Otherwise at least 0.000001.")
        .with_validator(Validator::custom(rate_check))
        .define(MAX_RECORDS, ConfigType::Long, "0", Importance::Medium,
            "Total records to generate across all tasks, then stay idle; 0 means no limit.")
        .with_validator(Validator::at_least(0.0))
        .define(BATCH_SIZE, ConfigType::Int, "500", Importance::Low, "Records returned per poll.")
        .with_validator(Validator::between(1.0, 100_000.0))
        .define(SEED, ConfigType::Long, "42", Importance::Low, "Seed of the generator: the same seed gives the same events.")
        .in_group("Datagen")
}

/// A datagen connector's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DatagenConfig {
    pub topic: String,
    pub schema: Schema,
    /// Records per second for the whole connector; 0: as fast as Kafka takes them.
    pub rate: f64,
    /// Records across all tasks; 0: no limit.
    pub max_records: u64,
    pub batch_size: u64,
    pub seed: u64,
}

impl DatagenConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = def().parse(props)?;
        Ok(Self {
            topic: parsed.string(TOPIC)?,
            schema: parsed.string(SCHEMA)?.parse()?,
            rate: parsed.double(RATE)?,
            max_records: parsed.int_as(MAX_RECORDS)?,
            batch_size: parsed.int_as(BATCH_SIZE)?,
            // Any 64 bits make a seed: a negative one is read as its two's complement.
            seed: parsed.int(SEED)? as u64,
        })
    }
}

/// How often a task emits a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// As fast as Kafka takes them (rate 0, or a rate too high for a clock to space out).
    Unthrottled,
    Every(Duration),
    /// So slow that the next record lies beyond what a clock can represent: none ever comes.
    Never,
}

/// One task's settings: the connector's, and its share of the work.
#[derive(Debug, Clone, PartialEq)]
pub struct DatagenTaskConfig {
    pub connector: DatagenConfig,
    /// This task's records; 0: no limit.
    pub max_records: u64,
    /// How many tasks share the connector's rate.
    pub tasks: u32,
}

impl DatagenTaskConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let connector = DatagenConfig::parse(props)?;
        let max_records = match props.get(TASK_MAX_RECORDS) {
            Some(share) => share.trim().parse().map_err(|_| {
                ConnectError::config(TASK_MAX_RECORDS, format!("'{share}' is not a record count"))
            })?,
            None => connector.max_records,
        };
        let tasks = match props.get(TASK_COUNT) {
            Some(count) => count
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ConnectError::config(TASK_COUNT, format!("'{count}' is not a task count"))
                })?,
            None => 1,
        };
        Ok(Self {
            connector,
            max_records,
            tasks,
        })
    }

    /// Time between this task's records. Checked conversions only: no rate, however odd,
    /// may panic a task (`Duration::from_secs_f64` does on overflow).
    pub fn pace(&self) -> Pace {
        let rate = self.connector.rate;
        if rate.is_nan() || rate <= 0.0 {
            return Pace::Unthrottled;
        }
        match Duration::try_from_secs_f64(f64::from(self.tasks) / rate) {
            Ok(interval) if interval.is_zero() => Pace::Unthrottled,
            Ok(interval) => Pace::Every(interval),
            Err(_) => Pace::Never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use medconnect_api::props_from as props;

    fn field(pairs: &[(&str, &str)]) -> String {
        match DatagenConfig::parse(&props(pairs)) {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_parse_into_a_typed_config() {
        let config = DatagenConfig::parse(&props(&[(TOPIC, "vitals")])).expect("valid");
        assert_eq!(
            config,
            DatagenConfig {
                topic: "vitals".into(),
                schema: Schema::Vitals,
                rate: 10.0,
                max_records: 0,
                batch_size: 500,
                seed: 42,
            }
        );
    }

    #[test]
    fn rates_that_cannot_be_paced_are_refused_by_name() {
        for bad in ["1e-300", "0.0000001", "NaN", "inf", "-1", "1e400"] {
            assert_eq!(field(&[(TOPIC, "t"), (RATE, bad)]), RATE, "{bad}");
        }
        for good in ["0", "0.000001", "50", "1e300"] {
            assert!(
                DatagenConfig::parse(&props(&[(TOPIC, "t"), (RATE, good)])).is_ok(),
                "{good}"
            );
        }
        assert_eq!(field(&[(TOPIC, "t"), (MAX_RECORDS, "-1")]), MAX_RECORDS);
        assert_eq!(field(&[(TOPIC, "t"), (BATCH_SIZE, "0")]), BATCH_SIZE);
        assert_eq!(field(&[(TOPIC, "t"), (SCHEMA, "labs")]), SCHEMA);
    }

    #[test]
    fn pace_never_panics_whatever_the_rate() {
        let task = |rate: f64, tasks: u32| DatagenTaskConfig {
            connector: DatagenConfig {
                rate,
                ..DatagenConfig::parse(&props(&[(TOPIC, "t")])).expect("valid")
            },
            max_records: 0,
            tasks,
        };
        assert_eq!(task(0.0, 1).pace(), Pace::Unthrottled);
        assert_eq!(task(1e300, 1).pace(), Pace::Unthrottled);
        assert_eq!(task(f64::INFINITY, 1).pace(), Pace::Unthrottled);
        assert_eq!(task(f64::NAN, 1).pace(), Pace::Unthrottled);
        assert_eq!(task(1e-300, 1).pace(), Pace::Never);
        assert!(matches!(task(1e-6, u32::MAX).pace(), Pace::Every(_)));
        assert_eq!(task(f64::MIN_POSITIVE, 1000).pace(), Pace::Never);
        assert_eq!(task(4.0, 2).pace(), Pace::Every(Duration::from_millis(500)));
    }

    #[test]
    fn task_settings_are_checked_too() {
        let base = [(TOPIC, "t")];
        let with = |extra: (&str, &str)| {
            let mut p = props(&base);
            p.insert(extra.0.into(), extra.1.into());
            DatagenTaskConfig::parse(&p)
        };
        assert_eq!(with((TASK_COUNT, "3")).expect("valid").tasks, 3);
        assert_eq!(with((TASK_MAX_RECORDS, "7")).expect("valid").max_records, 7);
        assert!(
            matches!(with((TASK_COUNT, "0")), Err(ConnectError::Config { field, .. }) if field == TASK_COUNT)
        );
        assert!(
            matches!(with((TASK_MAX_RECORDS, "-3")), Err(ConnectError::Config { field, .. }) if field == TASK_MAX_RECORDS)
        );
    }
}
