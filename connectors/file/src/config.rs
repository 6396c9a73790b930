//! The file connectors' settings, declared once and read into typed structs at validation and
//! when a task starts.

use std::time::Duration;

use medconnect_api::{ConfigDef, ConfigType, ConnectResult, Importance, Props, Validator};

pub const FILE: &str = "file";
pub const TOPIC: &str = "topic";
pub const BATCH_SIZE: &str = "batch.size";
pub const POLL_INTERVAL_MS: &str = "poll.interval.ms";

pub fn source_def() -> ConfigDef {
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

pub fn sink_def() -> ConfigDef {
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

/// A file source's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSourceConfig {
    /// As written: it is also the source partition offsets are stored under.
    pub file: String,
    pub topic: String,
    pub batch_size: usize,
    pub poll_interval: Duration,
}

impl FileSourceConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = source_def().parse(props)?;
        Ok(Self {
            file: parsed.string(FILE)?,
            topic: parsed.string(TOPIC)?,
            batch_size: parsed.int_as(BATCH_SIZE)?,
            poll_interval: parsed.millis(POLL_INTERVAL_MS)?,
        })
    }
}

/// A file sink's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkConfig {
    pub file: String,
}

impl FileSinkConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let parsed = sink_def().parse(props)?;
        Ok(Self {
            file: parsed.string(FILE)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use medconnect_api::ConnectError;

    use super::*;

    use medconnect_api::props_from as props;

    #[test]
    fn settings_parse_into_typed_configs() {
        let source = FileSourceConfig::parse(&props(&[(FILE, "/tmp/in.txt"), (TOPIC, "lines")]))
            .expect("valid");
        assert_eq!(
            source,
            FileSourceConfig {
                file: "/tmp/in.txt".into(),
                topic: "lines".into(),
                batch_size: 1000,
                poll_interval: Duration::from_millis(200),
            }
        );
        let sink = FileSinkConfig::parse(&props(&[(FILE, "/tmp/out.txt")])).expect("valid");
        assert_eq!(sink.file, "/tmp/out.txt");
    }

    #[test]
    fn errors_name_the_setting() {
        let field = |pairs: &[(&str, &str)]| match FileSourceConfig::parse(&props(pairs)) {
            Err(ConnectError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        assert_eq!(field(&[(TOPIC, "t")]), FILE);
        assert_eq!(field(&[(FILE, "f")]), TOPIC);
        assert_eq!(
            field(&[(FILE, "f"), (TOPIC, "t"), (BATCH_SIZE, "0")]),
            BATCH_SIZE
        );
        assert_eq!(
            field(&[(FILE, "f"), (TOPIC, "t"), (POLL_INTERVAL_MS, "NaN")]),
            POLL_INTERVAL_MS
        );
        assert!(matches!(
            FileSinkConfig::parse(&props(&[(FILE, " ")])),
            Err(ConnectError::Config { field, .. }) if field == FILE
        ));
    }
}
