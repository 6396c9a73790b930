//! RegexRouter: renames the topic of records whose whole topic name matches `regex` to
//! `replacement`, Connect's `RegexRouter` with its settings. The replacement uses Java's syntax
//! (`$1`, `${name}`, `\$` for a literal dollar) so Connect configs carry over; it is checked
//! against the regex's groups when the transform is built, not at the first record. The regex
//! itself is Rust's `regex` syntax, which covers Java's except look-around and backreferences.

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};
use regex::{Captures, Regex};

use super::TransformPlugin;

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "regex",
            ConfigType::String,
            Importance::High,
            "Regular expression the whole topic name must match.",
        )
        .with_validator(Validator::custom(|v| {
            Regex::new(v)
                .map(|_| ())
                .map_err(|e| format!("not a valid regular expression: {e}"))
        }))
        .define_required(
            "replacement",
            ConfigType::String,
            Importance::High,
            "New topic name; `$1` or `${name}` insert the regex's groups.",
        )
        .with_validator(Validator::NonEmpty)
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: "org.apache.kafka.connect.transforms.RegexRouter",
        aliases: &["RegexRouter"],
        config_def,
        create: |props| RegexRouter::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Group(usize),
    Named(String),
}

#[derive(Debug)]
struct RegexRouter {
    regex: Regex,
    replacement: Vec<Piece>,
}

impl RegexRouter {
    fn new(props: &Props) -> ConnectResult<Self> {
        let pattern = props.get("regex").map_or("", String::as_str);
        // Anchored because Connect requires `matcher.matches()`, a match of the whole name.
        let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            ConnectError::config("regex", format!("not a valid regular expression: {e}"))
        })?;
        let replacement = props.get("replacement").map_or("", String::as_str);
        let replacement = parse_replacement(replacement, &regex)
            .map_err(|reason| ConnectError::config("replacement", reason))?;
        Ok(Self { regex, replacement })
    }

    fn expand(&self, captures: &Captures<'_>) -> String {
        let mut topic = String::new();
        for piece in &self.replacement {
            match piece {
                Piece::Text(text) => topic.push_str(text),
                // A group that did not take part in the match inserts nothing, as in Java.
                Piece::Group(index) => {
                    topic.push_str(captures.get(*index).map_or("", |m| m.as_str()))
                }
                Piece::Named(name) => {
                    topic.push_str(captures.name(name).map_or("", |m| m.as_str()))
                }
            }
        }
        topic
    }
}

/// Parses a Java `Matcher.replaceFirst` replacement, with Java's rules for where a group
/// number ends (`$12` is group 12 only if the regex has 12 groups, else group 1 then `2`).
fn parse_replacement(replacement: &str, regex: &Regex) -> Result<Vec<Piece>, String> {
    let groups = regex.captures_len() - 1;
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.push(chars.next().ok_or("a trailing '\\' escapes nothing")?),
            '$' => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                match chars.next() {
                    Some('{') => {
                        let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                        if !regex.capture_names().flatten().any(|n| n == name) {
                            return Err(format!("the regex has no group named '{name}'"));
                        }
                        pieces.push(Piece::Named(name));
                    }
                    Some(d) if d.is_ascii_digit() => {
                        let mut index = d.to_digit(10).map_or(0, |d| d as usize);
                        if index > groups {
                            return Err(format!("the regex has no group {index}"));
                        }
                        while let Some(next) = chars.peek().and_then(|c| c.to_digit(10)) {
                            let longer = index * 10 + next as usize;
                            if longer > groups {
                                break;
                            }
                            index = longer;
                            chars.next();
                        }
                        pieces.push(Piece::Group(index));
                    }
                    _ => return Err("'$' must be followed by a group number or {name}; write '\\$' for a dollar sign".to_string()),
                }
            }
            other => text.push(other),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

impl Transform for RegexRouter {
    fn apply(&mut self, mut record: Record) -> ConnectResult<Option<Record>> {
        if let Some(captures) = self.regex.captures(&record.topic) {
            record.topic = self.expand(&captures);
        }
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::json::{build, config_field};

    fn route(pairs: &[(&str, &str)], topic: &str) -> String {
        let mut t = build(&plugin(), pairs).unwrap();
        t.apply(Record::new(topic).with_value("not even json"))
            .unwrap()
            .unwrap()
            .topic
    }

    #[test]
    fn routes_with_java_style_groups() {
        let rule = [
            ("regex", "hospital-(.*)-vitals"),
            ("replacement", "vitals.$1"),
        ];
        assert_eq!(route(&rule, "hospital-lyon-vitals"), "vitals.lyon");
        let named = [
            ("regex", "(?<site>[a-z]+)_(?<kind>[a-z]+)"),
            ("replacement", "${kind}.${site}\\$"),
        ];
        assert_eq!(route(&named, "lyon_labs"), "labs.lyon$");
        // Group 1 then the digit 0: the regex has no group 10.
        assert_eq!(
            route(&[("regex", "(a)(b)"), ("replacement", "$10")], "ab"),
            "a0"
        );
    }

    #[test]
    fn the_whole_topic_must_match() {
        let rule = [("regex", "vitals"), ("replacement", "routed")];
        assert_eq!(route(&rule, "vitals"), "routed");
        assert_eq!(
            route(&rule, "vitals-icu"),
            "vitals-icu",
            "a partial match leaves the topic"
        );
        assert_eq!(route(&rule, "old-vitals"), "old-vitals");
    }

    #[test]
    fn config_errors_name_the_setting() {
        assert_eq!(
            config_field(build(&plugin(), &[("replacement", "x")])),
            "regex"
        );
        assert_eq!(
            config_field(build(
                &plugin(),
                &[("regex", "(unclosed"), ("replacement", "x")]
            )),
            "regex"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("regex", "a")])),
            "replacement"
        );
        assert_eq!(
            config_field(build(&plugin(), &[("regex", "(a)"), ("replacement", "$2")])),
            "replacement"
        );
        assert_eq!(
            config_field(build(
                &plugin(),
                &[("regex", "(a)"), ("replacement", "${x}")]
            )),
            "replacement"
        );
        assert_eq!(
            config_field(build(
                &plugin(),
                &[("regex", "(a)"), ("replacement", "cost$")]
            )),
            "replacement"
        );
        assert_eq!(
            config_field(build(
                &plugin(),
                &[("regex", "(a)"), ("replacement", "x\\")]
            )),
            "replacement"
        );
    }
}
