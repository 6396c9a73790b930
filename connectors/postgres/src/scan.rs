//! The common record read without serde: one flat JSON object whose names have no escapes
//! and whose values are strings without escapes, numbers, `true`, `false` or `null`. Read
//! through serde_json, such a record took two thirds of the streamed rows' client time (a
//! profile: its map and raw-value machinery per field). This reader accepts nothing
//! serde_json would refuse and gives the same fields; for anything else (an escape, a nested
//! value, text that is not JSON) it gives `None` and serde_json reads the record (tested
//! against it on generated and mangled records).

use std::borrow::Cow;

use crate::direct::Field;

/// Appends the fields of `text`, one flat object as above; `None` when it is not one (then
/// `out` may hold some of its fields).
pub fn flat_object<'a>(text: &'a str, out: &mut Vec<Field<'a>>) -> Option<()> {
    let bytes = text.as_bytes();
    let mut at = spaces(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = spaces(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        return end(bytes, at + 1);
    }
    loop {
        let (start, stop) = string(bytes, at)?;
        let name = text.get(start..stop)?;
        at = spaces(bytes, stop + 1);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        at = spaces(bytes, at + 1);
        let value_end = value(bytes, at)?;
        out.push((Cow::Borrowed(name), text.get(at..value_end)?));
        at = spaces(bytes, value_end);
        match bytes.get(at) {
            Some(b',') => at = spaces(bytes, at + 1),
            Some(b'}') => return end(bytes, at + 1),
            _ => return None,
        }
    }
}

/// JSON's whitespace from `at` on: where it ends.
fn spaces(bytes: &[u8], mut at: usize) -> usize {
    while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Nothing but whitespace after the object.
fn end(bytes: &[u8], at: usize) -> Option<()> {
    (spaces(bytes, at) == bytes.len()).then_some(())
}

/// A string at `at` (its opening quote) without escapes or control characters: the range of
/// its text, between the quotes.
fn string(bytes: &[u8], at: usize) -> Option<(usize, usize)> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let length = bytes
        .get(start..)?
        .iter()
        .position(|b| *b == b'"' || *b == b'\\' || *b < 0x20)?;
    let stop = start + length;
    (bytes.get(stop) == Some(&b'"')).then_some((start, stop))
}

/// A value at `at`: where it ends.
fn value(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string(bytes, at).map(|(_, stop)| stop + 1),
        b't' => word(bytes, at, b"true"),
        b'f' => word(bytes, at, b"false"),
        b'n' => word(bytes, at, b"null"),
        b'-' | b'0'..=b'9' => number(bytes, at),
        _ => None,
    }
}

fn word(bytes: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    (bytes.get(at..at + word.len())? == word).then_some(at + word.len())
}

fn digits(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(u8::is_ascii_digit) {
        at += 1;
    }
    at
}

/// JSON's number: `-`, `0` or digits not starting with 0, a fraction, an exponent.
fn number(bytes: &[u8], mut at: usize) -> Option<usize> {
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    match bytes.get(at)? {
        b'0' => at += 1,
        b'1'..=b'9' => at = digits(bytes, at),
        _ => return None,
    }
    if bytes.get(at) == Some(&b'.') {
        let after = digits(bytes, at + 1);
        if after == at + 1 {
            return None;
        }
        at = after;
    }
    if matches!(bytes.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let after = digits(bytes, at);
        if after == at {
            return None;
        }
        at = after;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_json's reading of `text` (what `direct::fields` falls back to).
    fn serde(text: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        crate::direct::serde_fields(text, &mut out)?;
        Some(
            out.into_iter()
                .map(|(name, raw)| (name.into_owned(), raw.to_string()))
                .collect(),
        )
    }

    fn scanned(text: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        flat_object(text, &mut out)?;
        Some(
            out.into_iter()
                .map(|(name, raw)| (name.into_owned(), raw.to_string()))
                .collect(),
        )
    }

    /// Whenever this reader accepts, serde_json accepts and reads the same fields.
    fn agrees(text: &str) -> bool {
        match scanned(text) {
            Some(fields) => {
                assert_eq!(Some(fields), serde(text), "{text:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn flat_objects_are_read_as_serde_json_reads_them() {
        for text in [
            "{}",
            " { } ",
            r#"{"a":1}"#,
            "\t{\n\"a\" : -0 ,\r\"b\":\"x y\",\"a\":null }\n",
            r#"{"":true,"f":false,"n":null,"s":"","é":"ü"}"#,
            r#"{"i":123456789012345678901234567890,"d":-1.5e+300,"e":2E-7,"z":0.0}"#,
        ] {
            assert!(agrees(text), "refused: {text}");
        }
        // serde_json refuses these, or they are left to it.
        for text in [
            "",
            "{",
            "}",
            "[]",
            "1",
            "{} {}",
            "{}x",
            r#"{"a":1,}"#,
            r#"{,"a":1}"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":+1}"#,
            r#"{"a":tru}"#,
            r#"{"a":True}"#,
            r#"{"a":nul}"#,
            r#"{"a":"x}"#,
            r#"{"a":"tab	in"}"#,
            r#"{"a":"esc\"aped"}"#,
            r#"{"a\u0062":1}"#,
            r#"{"a":{"b":1}}"#,
            r#"{"a":[1]}"#,
            r#"{a:1}"#,
            "{\"a\":1}\u{feff}",
            "\u{feff}{\"a\":1}",
            r#"{"a":NaN}"#,
            r#"{"a":Infinity}"#,
        ] {
            assert!(scanned(text).is_none(), "accepted: {text}");
        }
    }

    #[test]
    fn mangled_records_are_never_read_otherwise_than_by_serde_json() {
        // A record, then every one-byte deletion, duplication and replacement by a byte that
        // matters to JSON.
        let record = r#"{"patient_id":"MRN00000042","hr":72,"temp":36.6,"alarm":false,"x":null,"e":-1.5E+3}"#;
        let specials = b" \t\n{}[]\":,.-+eE0123456789tfnulsa\\";
        let mut accepted = 0;
        let mut tried = 0;
        for at in 0..record.len() {
            let bytes = record.as_bytes();
            let mut variants: Vec<Vec<u8>> = vec![
                [&bytes[..at], &bytes[at + 1..]].concat(),
                [&bytes[..=at], &bytes[at..]].concat(),
            ];
            for special in specials {
                let mut changed = bytes.to_vec();
                changed[at] = *special;
                variants.push(changed);
            }
            for variant in variants {
                let Ok(text) = String::from_utf8(variant) else {
                    continue;
                };
                tried += 1;
                accepted += usize::from(agrees(&text));
            }
        }
        // Most mangled records are still JSON.
        assert!(accepted > tried / 4, "{accepted} of {tried}");
        assert!(agrees(record));
    }
}
