//! TimestampRouter: renames the topic after the record's timestamp (`vitals` ->
//! `vitals-20240229`), for time-partitioned indexes and tables. Connect's `TimestampRouter`
//! with its settings: `topic.format` (`${topic}` and `${timestamp}` are replaced) and
//! `timestamp.format`, a Java `SimpleDateFormat` pattern applied in UTC.
//!
//! Supported pattern letters, with Java's meaning and padding to the letter count: `y` (year;
//! `yy` two digits), `M` (month number; `MMM` names are not supported), `d` (day of month), `H`
//! (hour 0-23), `m` (minute), `s` (second), `S` (millisecond). Text between single quotes is
//! literal (`''` is a quote), and so is every character that is not a letter. Any other letter
//! is refused when the transform is built, never at the first record.

use medconnect_api::time::civil_from_days;
use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};

use super::TransformPlugin;

const DEFAULT_TOPIC_FORMAT: &str = "${topic}-${timestamp}";
const DEFAULT_TIMESTAMP_FORMAT: &str = "yyyyMMdd";

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define(
            "topic.format",
            ConfigType::String,
            DEFAULT_TOPIC_FORMAT,
            Importance::High,
            "New topic name; `${topic}` and `${timestamp}` are replaced.",
        )
        .with_validator(Validator::NonEmpty)
        .define(
            "timestamp.format",
            ConfigType::String,
            DEFAULT_TIMESTAMP_FORMAT,
            Importance::High,
            "Java SimpleDateFormat pattern of `${timestamp}`, in UTC; letters y M d H m s S.",
        )
        .with_validator(Validator::custom(|v| DateFormat::parse(v).map(|_| ())))
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.TimestampRouter",
        aliases: &["TimestampRouter"],
        config_def,
        create: |props| TimestampRouter::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Text(String),
    Field(char, usize),
}

/// A `SimpleDateFormat` pattern reduced to the letters medconnect formats.
#[derive(Debug)]
struct DateFormat(Vec<Token>);

impl DateFormat {
    fn parse(pattern: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        let mut text = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    text.push('\'');
                    continue;
                }
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated quote in '{pattern}'")),
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            text.push('\'');
                        }
                        Some('\'') => break,
                        Some(other) => text.push(other),
                    }
                }
            } else if c.is_ascii_alphabetic() {
                let mut count = 1;
                while chars.peek() == Some(&c) {
                    chars.next();
                    count += 1;
                }
                let supported =
                    matches!(c, 'y' | 'd' | 'H' | 'm' | 's' | 'S') || (c == 'M' && count <= 2);
                if !supported {
                    return Err(format!(
                        "pattern letter '{}' is not supported; use y, M/MM, d, H, m, s, S or quote literal text",
                        c.to_string().repeat(count)
                    ));
                }
                if !text.is_empty() {
                    tokens.push(Token::Text(std::mem::take(&mut text)));
                }
                tokens.push(Token::Field(c, count));
            } else {
                text.push(c);
            }
        }
        if !text.is_empty() {
            tokens.push(Token::Text(text));
        }
        Ok(Self(tokens))
    }

    fn format(&self, epoch_ms: i64) -> String {
        let days = epoch_ms.div_euclid(86_400_000);
        let ms_of_day = epoch_ms.rem_euclid(86_400_000);
        let (year, month, day) = civil_from_days(days);
        let mut out = String::new();
        for token in &self.0 {
            match *token {
                Token::Text(ref text) => out.push_str(text),
                Token::Field(letter, count) => {
                    let number = match letter {
                        'y' if count == 2 => year.rem_euclid(100),
                        'y' => year,
                        'M' => i64::from(month),
                        'd' => i64::from(day),
                        'H' => ms_of_day / 3_600_000,
                        'm' => ms_of_day / 60_000 % 60,
                        's' => ms_of_day / 1000 % 60,
                        _ => ms_of_day % 1000,
                    };
                    out.push_str(&format!("{number:0count$}"));
                }
            }
        }
        out
    }
}

#[derive(Debug)]
struct TimestampRouter {
    topic_format: String,
    timestamp_format: DateFormat,
}

impl TimestampRouter {
    fn new(props: &Props) -> ConnectResult<Self> {
        let topic_format = props
            .get("topic.format")
            .filter(|f| !f.is_empty())
            .map_or(DEFAULT_TOPIC_FORMAT, String::as_str);
        let pattern = props
            .get("timestamp.format")
            .filter(|f| !f.is_empty())
            .map_or(DEFAULT_TIMESTAMP_FORMAT, String::as_str);
        Ok(Self {
            topic_format: topic_format.to_string(),
            timestamp_format: DateFormat::parse(pattern)
                .map_err(|reason| ConnectError::config("timestamp.format", reason))?,
        })
    }
}

impl Transform for TimestampRouter {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        let timestamp = record.timestamp.ok_or_else(|| {
            ConnectError::data(format!(
                "record of topic {} has no timestamp to route by",
                record.topic
            ))
        })?;
        let formatted = self.timestamp_format.format(timestamp);
        record.topic = self
            .topic_format
            .replace("${topic}", &record.topic)
            .replace("${timestamp}", &formatted);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};

    fn format(pattern: &str, epoch_ms: i64) -> String {
        DateFormat::parse(pattern).unwrap().format(epoch_ms)
    }

    #[test]
    fn formats_the_supported_letters_in_utc() {
        // 2023-11-14T22:13:20.042Z
        let t = 1_700_000_000_042;
        assert_eq!(format("yyyyMMdd", t), "20231114");
        assert_eq!(
            format("yyyy-MM-dd'T'HH:mm:ss.SSS", t),
            "2023-11-14T22:13:20.042"
        );
        assert_eq!(format("yy/M/d H 'o''clock'", t), "23/11/14 22 o'clock");
        assert_eq!(format("yyyyMMdd", 0), "19700101");
        assert_eq!(
            format("yyyyMMdd", 1_709_164_800_000),
            "20240229",
            "a leap day"
        );
        assert_eq!(
            format("yyyy-MM-dd HH:mm:ss.SSS", -1),
            "1969-12-31 23:59:59.999"
        );
        assert_eq!(
            format("yyyyMMdd", 951_782_400_000),
            "20000229",
            "a leap day of a century leap year"
        );
    }

    #[test]
    fn routes_by_the_record_timestamp_with_connect_defaults() {
        let mut t = build(&plugin(), &[]).unwrap();
        let out = t
            .apply(
                Record::new("vitals")
                    .with_value("x")
                    .with_timestamp(1_709_164_800_000),
            )
            .unwrap()
            .unwrap();
        assert_eq!(out.topic, "vitals-20240229");

        let mut t = build(
            &plugin(),
            &[
                ("topic.format", "archive.${timestamp}.${topic}"),
                ("timestamp.format", "yyyy-MM"),
            ],
        )
        .unwrap();
        let out = t
            .apply(Record::new("labs").with_timestamp(1_700_000_000_000))
            .unwrap()
            .unwrap();
        assert_eq!(out.topic, "archive.2023-11.labs");
    }

    #[test]
    fn a_record_without_timestamp_is_a_data_error() {
        let mut t = build(&plugin(), &[]).unwrap();
        assert!(
            t.apply(Record::new("vitals").with_value("{}"))
                .unwrap_err()
                .is_record_error()
        );
    }

    #[test]
    fn unsupported_pattern_letters_name_the_setting() {
        assert_eq!(
            config_field(build(&plugin(), &[("timestamp.format", "yyyy-MMM-dd")])),
            "timestamp.format"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("timestamp.format", "EEE")])),
            "timestamp.format"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("timestamp.format", "yyyy'x")])),
            "timestamp.format"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("topic.format", "")])),
            "topic.format"
        );
    }
}
