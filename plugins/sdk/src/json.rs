//! A small JSON value: parse, edit, write. Objects keep their key order and numbers keep
//! their text, so fields a transform does not touch come out as they came in.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number's text as it appeared (or as written by [`Value::number`]).
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// A number from a float; integers print without a fraction, others shortest-exact.
    pub fn number(n: f64) -> Value {
        if n.is_finite() && n.fract() == 0.0 && n.abs() < 1e15 {
            Value::Number(format!("{}", n as i64))
        } else if n.is_finite() {
            Value::Number(format!("{}", n))
        } else {
            Value::Null
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(text) => text.parse().ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A member of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        match self {
            Value::Object(members) => members.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// A member by dotted path (`patient.birthDate`).
    pub fn pointer_mut(&mut self, path: &str) -> Option<&mut Value> {
        let mut current = self;
        for part in path.split('.') {
            current = current.get_mut(part)?;
        }
        Some(current)
    }

    pub fn pointer(&self, path: &str) -> Option<&Value> {
        let mut current = self;
        for part in path.split('.') {
            current = current.get(part)?;
        }
        Some(current)
    }

    /// Sets (or adds, at the end) a member of an object; does nothing on other values.
    pub fn set(&mut self, key: &str, value: Value) {
        if let Value::Object(members) = self {
            match members.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = value,
                None => members.push((key.to_string(), value)),
            }
        }
    }

    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(n),
            Value::String(s) => write_string(out, s),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Value::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(out, key);
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses a complete JSON text; the error says where it went wrong, not what it contained.
pub fn parse(text: &str) -> Result<Value, String> {
    let mut parser = Parser { bytes: text.as_bytes(), at: 0, depth: 0 };
    let value = parser.value()?;
    parser.space();
    if parser.at != parser.bytes.len() {
        return Err(format!("unexpected text after the JSON value at byte {}", parser.at));
    }
    Ok(value)
}

const MAX_DEPTH: usize = 128;

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{} at byte {}", what, self.at))
    }

    fn space(&mut self) {
        while self.at < self.bytes.len() && matches!(self.bytes[self.at], b' ' | b'\t' | b'\n' | b'\r') {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, literal: &str, value: Value) -> Result<Value, String> {
        if self.bytes[self.at..].starts_with(literal.as_bytes()) {
            self.at += literal.len();
            Ok(value)
        } else {
            self.fail("invalid literal")
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.space();
        match self.peek() {
            None => self.fail("unexpected end of JSON"),
            Some(b'n') => self.expect("null", Value::Null),
            Some(b't') => self.expect("true", Value::Bool(true)),
            Some(b'f') => self.expect("false", Value::Bool(false)),
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => self.nested(|p| p.array()),
            Some(b'{') => self.nested(|p| p.object()),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(_) => self.fail("unexpected character"),
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Result<Value, String>) -> Result<Value, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.fail("JSON nested too deeply");
        }
        let value = f(self);
        self.depth -= 1;
        value
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.at;
        while self.at < self.bytes.len() && matches!(self.bytes[self.at], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
            self.at += 1;
        }
        let text = std::str::from_utf8(&self.bytes[start..self.at]).map_err(|_| "invalid number".to_string())?;
        if text.parse::<f64>().is_err() {
            return self.fail("invalid number");
        }
        Ok(Value::Number(text.to_string()))
    }

    fn string(&mut self) -> Result<String, String> {
        self.at += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return self.fail("unterminated string"),
                Some(b'"') => {
                    self.at += 1;
                    return String::from_utf8(out).map_err(|_| "invalid UTF-8 in a string".to_string());
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            let c = self.unicode_escape()?;
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                            continue;
                        }
                        _ => return self.fail("invalid escape"),
                    };
                    self.at += 1;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(escaped.encode_utf8(&mut buf).as_bytes());
                }
                Some(c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }

    /// After the `u` of `\uXXXX` (and its low surrogate, if any); leaves `at` past it.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let hex = |p: &mut Self| -> Result<u32, String> {
            let digits = p.bytes.get(p.at + 1..p.at + 5).ok_or_else(|| "truncated \\u escape".to_string())?;
            let text = std::str::from_utf8(digits).map_err(|_| "invalid \\u escape".to_string())?;
            let code = u32::from_str_radix(text, 16).map_err(|_| "invalid \\u escape".to_string())?;
            p.at += 5;
            Ok(code)
        };
        let high = hex(self)?;
        if (0xD800..0xDC00).contains(&high) && self.bytes[self.at..].starts_with(b"\\u") {
            self.at += 1;
            let low = hex(self)?;
            let code = 0x10000 + ((high - 0xD800) << 10) + (low.wrapping_sub(0xDC00) & 0x3FF);
            return Ok(char::from_u32(code).unwrap_or('\u{FFFD}'));
        }
        Ok(char::from_u32(high).unwrap_or('\u{FFFD}'))
    }

    fn array(&mut self) -> Result<Value, String> {
        self.at += 1;
        let mut items = Vec::new();
        self.space();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                _ => return self.fail("expected , or ]"),
            }
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.at += 1;
        let mut members = Vec::new();
        self.space();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.space();
            if self.peek() != Some(b'"') {
                return self.fail("expected a member name");
            }
            let key = self.string()?;
            self.space();
            if self.peek() != Some(b':') {
                return self.fail("expected :");
            }
            self.at += 1;
            members.push((key, self.value()?));
            self.space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Object(members));
                }
                _ => return self.fail("expected , or }"),
            }
        }
    }
}

/// Rewrites the members at `paths` (dotted, through objects only) of a JSON text without
/// building a tree: `replace(path, raw_value_text)` returns the new raw JSON text for that
/// member, or `None` to keep it. Everything else is copied byte for byte. The whole text is
/// still checked to be valid JSON. Member names are matched as written, escapes included.
pub fn replace_members(
    text: &str,
    paths: &[String],
    replace: &mut dyn FnMut(&str, &str) -> Option<String>,
) -> Result<String, String> {
    let mut editor = Editor {
        parser: Parser { bytes: text.as_bytes(), at: 0, depth: 0 },
        text,
        paths,
        out: String::with_capacity(text.len() + 16),
        copied: 0,
        path: String::new(),
        replace,
    };
    editor.value(true)?;
    editor.parser.space();
    if editor.parser.at != text.len() {
        return Err(format!("unexpected text after the JSON value at byte {}", editor.parser.at));
    }
    editor.out.push_str(&text[editor.copied..]);
    Ok(editor.out)
}

struct Editor<'a, 'r> {
    parser: Parser<'a>,
    text: &'a str,
    paths: &'a [String],
    out: String,
    /// Input up to here is already in `out`.
    copied: usize,
    /// The dotted path of the object being scanned ("" at the top).
    path: String,
    replace: &'r mut dyn FnMut(&str, &str) -> Option<String>,
}

impl<'a, 'r> Editor<'a, 'r> {
    /// Skips (validating) one value; `track` says whether members below may match a path.
    fn value(&mut self, track: bool) -> Result<(), String> {
        self.parser.space();
        match self.parser.peek() {
            Some(b'{') => {
                self.parser.depth += 1;
                if self.parser.depth > MAX_DEPTH {
                    return self.parser.fail("JSON nested too deeply");
                }
                self.object(track)?;
                self.parser.depth -= 1;
                Ok(())
            }
            Some(b'[') => {
                self.parser.depth += 1;
                if self.parser.depth > MAX_DEPTH {
                    return self.parser.fail("JSON nested too deeply");
                }
                self.parser.at += 1;
                self.parser.space();
                if self.parser.peek() == Some(b']') {
                    self.parser.at += 1;
                } else {
                    loop {
                        self.value(false)?;
                        self.parser.space();
                        match self.parser.peek() {
                            Some(b',') => self.parser.at += 1,
                            Some(b']') => {
                                self.parser.at += 1;
                                break;
                            }
                            _ => return self.parser.fail("expected , or ]"),
                        }
                    }
                }
                self.parser.depth -= 1;
                Ok(())
            }
            Some(b'"') => self.skip_string(),
            Some(_) => self.parser.value().map(|_| ()),
            None => self.parser.fail("unexpected end of JSON"),
        }
    }

    fn skip_string(&mut self) -> Result<(), String> {
        let bytes = self.parser.bytes;
        let mut at = self.parser.at + 1;
        while at < bytes.len() {
            match bytes[at] {
                b'\\' => at += 2,
                b'"' => {
                    self.parser.at = at + 1;
                    return Ok(());
                }
                c if c < 0x20 => {
                    self.parser.at = at;
                    return self.parser.fail("control character in a string");
                }
                _ => at += 1,
            }
        }
        self.parser.at = at;
        self.parser.fail("unterminated string")
    }

    fn object(&mut self, track: bool) -> Result<(), String> {
        self.parser.at += 1;
        self.parser.space();
        if self.parser.peek() == Some(b'}') {
            self.parser.at += 1;
            return Ok(());
        }
        loop {
            self.parser.space();
            if self.parser.peek() != Some(b'"') {
                return self.parser.fail("expected a member name");
            }
            let key_start = self.parser.at + 1;
            self.skip_string()?;
            let key = &self.text[key_start..self.parser.at - 1];
            self.parser.space();
            if self.parser.peek() != Some(b':') {
                return self.parser.fail("expected :");
            }
            self.parser.at += 1;
            self.parser.space();
            let saved = self.path.len();
            let mut child_track = false;
            let mut matched = false;
            if track {
                if !self.path.is_empty() {
                    self.path.push('.');
                }
                self.path.push_str(key);
                for p in self.paths {
                    if p == &self.path {
                        matched = true;
                    } else if p.len() > self.path.len() && p.starts_with(self.path.as_str()) && p.as_bytes()[self.path.len()] == b'.' {
                        child_track = true;
                    }
                }
            }
            let start = self.parser.at;
            self.value(child_track)?;
            if matched {
                let text = self.text;
                let raw = &text[start..self.parser.at];
                if let Some(new) = (self.replace)(&self.path, raw) {
                    self.out.push_str(&text[self.copied..start]);
                    self.out.push_str(&new);
                    self.copied = self.parser.at;
                }
            }
            self.path.truncate(saved);
            self.parser.space();
            match self.parser.peek() {
                Some(b',') => self.parser.at += 1,
                Some(b'}') => {
                    self.parser.at += 1;
                    return Ok(());
                }
                _ => return self.parser.fail("expected , or }"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_keep_order_and_number_text() {
        let text = r#"{"b":1.50,"a":[true,null,"x\"\u00e9"],"c":{"d":-2e3}}"#;
        let value = parse(text).unwrap();
        assert_eq!(value.to_json(), r#"{"b":1.50,"a":[true,null,"x\"é"],"c":{"d":-2e3}}"#);
        assert!(parse("{").is_err());
        assert!(parse("[1,]").is_err());
        assert!(parse("1 2").is_err());
    }

    #[test]
    fn members_are_replaced_in_place() {
        let text = r#"{"a": "x", "b": {"c": 1, "a": [1, {"a": 2}]}, "d": null}"#;
        let paths = vec!["a".to_string(), "b.c".to_string(), "d".to_string()];
        let mut seen = Vec::new();
        let out = replace_members(text, &paths, &mut |path, raw| {
            seen.push((path.to_string(), raw.to_string()));
            if raw == "null" { None } else { Some("\"*\"".to_string()) }
        })
        .unwrap();
        assert_eq!(out, r#"{"a": "*", "b": {"c": "*", "a": [1, {"a": 2}]}, "d": null}"#);
        assert_eq!(seen.len(), 3);
        assert!(replace_members("{\"a\": }", &paths, &mut |_, _| None).is_err());
        assert!(replace_members("{\"a\": 1} x", &paths, &mut |_, _| None).is_err());
        assert!(replace_members("[1, 2]", &paths, &mut |_, _| None).is_ok());
    }
}
