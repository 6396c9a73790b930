//! From an MQTT topic to a Kafka topic and key: a topic pattern with named captures
//! (`devices/+device/vitals`) and templates that use them (`${device}`, `${mqtt.topic}`).

use std::collections::BTreeMap;

/// The template variable that stands for the whole MQTT topic.
pub const MQTT_TOPIC_VARIABLE: &str = "mqtt.topic";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    /// `+name`: one level, captured under `name` (`+` alone captures nothing).
    Capture(Option<String>),
    /// `#`: the remaining levels, last level of the pattern only.
    Rest,
}

/// A topic pattern such as `devices/+device/vitals`. An empty pattern matches every topic and
/// captures nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicPattern(Vec<Level>);

impl TopicPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.trim().is_empty() {
            return Ok(Self::default());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let level = if *part == "#" {
                if index + 1 != parts.len() {
                    return Err("'#' may only be the last level".into());
                }
                Level::Rest
            } else if let Some(name) = part.strip_prefix('+') {
                if name.contains(['+', '#', '$', '{', '}']) {
                    return Err(format!("'{part}' is not a capture such as +device"));
                }
                Level::Capture((!name.is_empty()).then(|| name.to_string()))
            } else if part.contains(['+', '#']) {
                return Err(format!("'{part}': '+' and '#' must fill a whole level"));
            } else {
                Level::Literal(part.to_string())
            };
            levels.push(level);
        }
        Ok(Self(levels))
    }

    pub fn check(pattern: &str) -> Result<(), String> {
        Self::parse(pattern).map(|_| ())
    }

    /// The names this pattern captures.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|level| match level {
            Level::Capture(Some(name)) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The captures of `topic`, or `None` when it does not match.
    pub fn captures(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let mut found = BTreeMap::new();
        if self.0.is_empty() {
            return Some(found);
        }
        let mut levels = topic.split('/');
        for level in &self.0 {
            match level {
                Level::Rest => return Some(found),
                Level::Literal(expected) => {
                    if levels.next()? != expected {
                        return None;
                    }
                }
                Level::Capture(name) => {
                    let value = levels.next()?;
                    if let Some(name) = name {
                        found.insert(name.clone(), value.to_string());
                    }
                }
            }
        }
        levels.next().is_none().then_some(found)
    }
}

/// A template such as `device.${device}.vitals`: `${name}` stands for a capture of the topic
/// pattern or for `mqtt.topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("'${{{0}}}' is neither mqtt.topic nor a capture of the topic pattern")]
    Unknown(String),
    #[error("an unclosed '${{' in the template")]
    Unclosed,
}

impl Template {
    pub fn new(template: &str) -> Self {
        Self(template.to_string())
    }

    /// Whether the template has variables: its output then depends on what is published.
    pub fn has_variables(&self) -> bool {
        self.0.contains("${")
    }

    /// Checks every variable is known (captures of `pattern`, or `mqtt.topic`).
    pub fn check_against(&self, pattern: &TopicPattern) -> Result<(), TemplateError> {
        for name in self.variables()? {
            if name != MQTT_TOPIC_VARIABLE && !pattern.names().any(|n| n == name) {
                return Err(TemplateError::Unknown(name.to_string()));
            }
        }
        Ok(())
    }

    fn variables(&self) -> Result<Vec<&str>, TemplateError> {
        let mut names = Vec::new();
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or(TemplateError::Unclosed)?;
            names.push(&after[..end]);
            rest = &after[end + 1..];
        }
        Ok(names)
    }

    /// The template with its variables filled in; `mqtt.topic` is the MQTT topic as is.
    pub fn render(&self, mqtt_topic: &str, captures: &BTreeMap<String, String>) -> String {
        let mut out = String::with_capacity(self.0.len() + mqtt_topic.len());
        let mut rest = self.0.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                out.push_str(&rest[start..]);
                return out;
            };
            let name = &after[..end];
            if name == MQTT_TOPIC_VARIABLE {
                out.push_str(mqtt_topic);
            } else if let Some(value) = captures.get(name) {
                out.push_str(value);
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// A Kafka topic name from a rendered template: MQTT's `/` becomes `.`, and any other
/// character Kafka does not allow becomes `_`. `None` when nothing usable is left.
pub fn kafka_topic_name(rendered: &str) -> Option<String> {
    let name: String = rendered
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') => c,
            _ => '_',
        })
        .collect();
    let usable = !name.is_empty() && name.len() <= 249 && name != "." && name != "..";
    usable.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_name_levels_and_reject_other_topics() {
        let pattern = TopicPattern::parse("devices/+device/vitals").unwrap();
        let found = pattern.captures("devices/monitor-7/vitals").unwrap();
        assert_eq!(found.get("device").map(String::as_str), Some("monitor-7"));
        assert!(pattern.captures("devices/monitor-7/alarms").is_none());
        assert!(pattern.captures("devices/monitor-7/vitals/extra").is_none());
        assert!(
            TopicPattern::parse("devices/#")
                .unwrap()
                .captures("devices/a/b")
                .is_some()
        );
        assert!(TopicPattern::parse("a/#/b").is_err());
        assert!(TopicPattern::parse("a/b+").is_err());
    }

    #[test]
    fn templates_fill_captures_and_the_topic() {
        let pattern = TopicPattern::parse("devices/+device/+kind").unwrap();
        let template = Template::new("device.${kind}");
        assert!(template.check_against(&pattern).is_ok());
        assert_eq!(
            Template::new("${nope}").check_against(&pattern),
            Err(TemplateError::Unknown("nope".into()))
        );
        let found = pattern.captures("devices/pump-1/vitals").unwrap();
        assert_eq!(
            template.render("devices/pump-1/vitals", &found),
            "device.vitals"
        );
        assert_eq!(
            kafka_topic_name(&Template::new("${mqtt.topic}").render("devices/pump 1/v", &found)),
            Some("devices.pump_1.v".into())
        );
        assert_eq!(kafka_topic_name(""), None);
    }
}
