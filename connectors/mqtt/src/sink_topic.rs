//! The sink's MQTT topic template: `devices/${key}/commands`, with `${key}`, `${topic}` (the
//! Kafka topic) and `${header.<name>}`.

use medconnect_api::Record;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
    KafkaTopic,
    Header(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTopic(Vec<Part>);

/// Why a record has no MQTT topic.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("the record has no key (or one that is not UTF-8) for ${{key}}")]
    NoKey,
    #[error("the record has no UTF-8 header '{0}'")]
    NoHeader(String),
    #[error("'{0}' is not a topic to publish to (empty, or with + or #)")]
    Invalid(String),
}

impl SinkTopic {
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template.trim();
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or("an unclosed '${'")?;
            parts.push(match &after[..end] {
                "key" => Part::Key,
                "topic" => Part::KafkaTopic,
                name => match name.strip_prefix("header.") {
                    Some(header) if !header.is_empty() => Part::Header(header.to_string()),
                    _ => {
                        return Err(format!(
                            "'${{{name}}}' is not ${{key}}, ${{topic}} or ${{header.<name>}}"
                        ));
                    }
                },
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let literal: String = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        if parts.is_empty() || literal.contains(['+', '#']) {
            return Err(
                "an MQTT topic template, without + or #, such as devices/${key}/commands".into(),
            );
        }
        Ok(Self(parts))
    }

    pub fn check(template: &str) -> Result<(), String> {
        Self::parse(template).map(|_| ())
    }

    /// The topic for `record`.
    pub fn render(&self, record: &Record) -> Result<String, TopicError> {
        let mut topic = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => topic.push_str(text),
                Part::KafkaTopic => topic.push_str(&record.topic),
                Part::Key => {
                    let key = record
                        .key
                        .as_deref()
                        .and_then(|k| std::str::from_utf8(k).ok());
                    topic.push_str(key.filter(|k| !k.is_empty()).ok_or(TopicError::NoKey)?);
                }
                Part::Header(name) => topic.push_str(
                    record
                        .headers
                        .last_str(name)
                        .ok_or_else(|| TopicError::NoHeader(name.clone()))?,
                ),
            }
        }
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(TopicError::Invalid(topic));
        }
        Ok(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_key_topic_and_headers() {
        let template = SinkTopic::parse("devices/${key}/${header.kind}/${topic}").unwrap();
        let record = Record::new("orders")
            .with_key("pump-3")
            .with_header("kind", "commands");
        assert_eq!(
            template.render(&record).unwrap(),
            "devices/pump-3/commands/orders"
        );
        assert_eq!(
            template.render(&Record::new("orders")),
            Err(TopicError::NoKey)
        );
        let wild = Record::new("o").with_key("+").with_header("kind", "c");
        assert!(matches!(
            template.render(&wild),
            Err(TopicError::Invalid(_))
        ));
        assert!(SinkTopic::parse("devices/+/x").is_err());
        assert!(SinkTopic::parse("${nope}").is_err());
    }
}
