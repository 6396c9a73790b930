//! The `index` template: `${topic}` and a date from the record's timestamp, such as
//! `vitals-${yyyy.MM.dd}`, resolved per record into an index name.

use std::time::{SystemTime, UNIX_EPOCH};

use medconnect_api::time::civil_from_days;
/// `@timestamp`'s form: RFC 3339 in UTC with milliseconds.
pub use medconnect_api::time::rfc3339_millis;

#[derive(Debug, Clone, PartialEq, Eq)]
enum DatePart {
    Year,
    Month,
    Day,
    Hour,
    Literal(char),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    Date(Vec<DatePart>),
}

/// A parsed `index` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexTemplate {
    parts: Vec<Part>,
}

/// Characters an index name may not contain (Elasticsearch and OpenSearch alike).
const FORBIDDEN: &[char] = &['\\', '/', '*', '?', '"', '<', '>', '|', ' ', ',', '#', ':'];

fn date_pattern(pattern: &str) -> Result<Vec<DatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(c) = rest.chars().next() {
        let (part, len) = if rest.starts_with("yyyy") {
            (DatePart::Year, 4)
        } else if rest.starts_with("MM") {
            (DatePart::Month, 2)
        } else if rest.starts_with("dd") {
            (DatePart::Day, 2)
        } else if rest.starts_with("HH") {
            (DatePart::Hour, 2)
        } else if matches!(c, '.' | '-' | '_') {
            (DatePart::Literal(c), 1)
        } else {
            return Err(format!(
                "'${{{pattern}}}' is neither ${{topic}} nor a date pattern of yyyy, MM, dd, HH and . - _"
            ));
        };
        parts.push(part);
        rest = &rest[len..];
    }
    Ok(parts)
}

fn check_literal(literal: &str) -> Result<(), String> {
    if literal
        .chars()
        .any(|c| c.is_uppercase() || FORBIDDEN.contains(&c))
    {
        return Err(format!(
            "'{literal}' cannot be part of an index name (lower case, none of \\ / * ? \" < > | , # : or spaces)"
        ));
    }
    Ok(())
}

impl IndexTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        let template = template.trim();
        if template.is_empty() {
            return Err("must not be empty".into());
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                check_literal(&rest[..start])?;
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("'{template}' has a '${{' without its '}}'"))?;
            let name = &after[..end];
            parts.push(if name == "topic" {
                Part::Topic
            } else {
                Part::Date(date_pattern(name)?)
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            check_literal(rest)?;
            parts.push(Part::Literal(rest.to_string()));
        }
        if let Some(Part::Literal(first)) = parts.first()
            && first.starts_with(['-', '_', '+', '.'])
        {
            return Err(format!(
                "'{template}': an index name cannot start with - _ + or ."
            ));
        }
        Ok(Self { parts })
    }

    /// Whether the name depends on the record's timestamp.
    pub fn uses_date(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Date(_)))
    }

    /// The index of a record of `topic` stamped `timestamp_ms` (UTC). A record without a
    /// timestamp (Kafka gives every record one; a transform may drop it) takes the time now.
    pub fn resolve(&self, topic: &str, timestamp_ms: Option<i64>) -> String {
        let mut name = String::new();
        let mut date = None;
        for part in &self.parts {
            match part {
                Part::Literal(text) => name.push_str(text),
                Part::Topic => name.push_str(&topic.to_lowercase()),
                Part::Date(pattern) => {
                    let (year, month, day, hour) =
                        *date.get_or_insert_with(|| civil(timestamp_ms.unwrap_or_else(now_ms)));
                    for piece in pattern {
                        match piece {
                            DatePart::Year => name.push_str(&format!("{year:04}")),
                            DatePart::Month => name.push_str(&format!("{month:02}")),
                            DatePart::Day => name.push_str(&format!("{day:02}")),
                            DatePart::Hour => name.push_str(&format!("{hour:02}")),
                            DatePart::Literal(c) => name.push(*c),
                        }
                    }
                }
            }
        }
        name
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Year, month, day and hour (UTC) of a time in ms since the epoch.
fn civil(timestamp_ms: i64) -> (i64, u32, u32, u32) {
    let seconds = timestamp_ms.div_euclid(1000);
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let hour = (seconds.rem_euclid(86_400) / 3600) as u32;
    (year, month, day, hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_rfc_3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_704_164_645_123),
            "2024-01-02T03:04:05.123Z"
        );
        assert_eq!(
            rfc3339_millis(1_709_251_199_999),
            "2024-02-29T23:59:59.999Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn dates_come_from_the_record_timestamp_in_utc() {
        let template = IndexTemplate::parse("vitals-${yyyy.MM.dd}").expect("valid");
        assert!(template.uses_date());
        assert_eq!(template.resolve("t", Some(0)), "vitals-1970.01.01");
        // 2024-02-29T23:59:59.999Z, a leap day, then the next millisecond.
        assert_eq!(
            template.resolve("t", Some(1_709_251_199_999)),
            "vitals-2024.02.29"
        );
        assert_eq!(
            template.resolve("t", Some(1_709_251_200_000)),
            "vitals-2024.03.01"
        );
        // Before the epoch.
        assert_eq!(template.resolve("t", Some(-1)), "vitals-1969.12.31");
        let hourly = IndexTemplate::parse("${topic}-${yyyy-MM-dd_HH}").expect("valid");
        assert_eq!(
            hourly.resolve("ICU.Vitals", Some(1_704_164_645_000)),
            "icu.vitals-2024-01-02_03"
        );
    }

    #[test]
    fn templates_that_cannot_name_an_index_are_refused() {
        for bad in [
            "",
            "Vitals",
            "a b",
            "v-${yyyy.QQ}",
            "v-${topic",
            "_v",
            "v*",
            "${date}",
        ] {
            assert!(IndexTemplate::parse(bad).is_err(), "{bad}");
        }
        let plain = IndexTemplate::parse("${topic}").expect("valid");
        assert!(!plain.uses_date());
        assert_eq!(plain.resolve("Vitals", None), "vitals");
    }
}
