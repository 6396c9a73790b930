//! mask-phi: de-identifies records before they leave the integration layer.
//!
//! Settings (`transforms.<alias>.config.*`):
//! - `fields`: JSON fields to protect, dotted paths allowed (`ssn,patient.birthDate`).
//! - `hl7.fields`: HL7 v2 fields to protect (default `PID-5,PID-7,PID-19`: name, birth date, SSN).
//! - `mode`: `mask` (default: the value becomes `mask.with`) or `hash` (salted SHA-256 in hex,
//!   so the same patient stays linkable without the identifier).
//! - `mask.with`: the replacement text (default `***`); `salt`: prepended before hashing.
//!
//! HL7 values (`content-type: application/hl7-v2`, or starting with `MSH|`) get `hl7.fields`;
//! other values are parsed as JSON objects and get `fields`. A value that is neither fails the
//! record: passing it through unmasked could leak what this transform exists to protect.

use medconnect_guest::hash::{hex, sha256};
use medconnect_guest::hl7::Message;
use medconnect_guest::json::{self, Value};
use medconnect_guest::{export_transform, list, Config, Error, Record, Transform};

enum Mode {
    Mask(String),
    Hash(String),
}

struct MaskPhi {
    fields: Vec<String>,
    hl7_fields: Vec<(String, usize)>,
    mode: Mode,
}

impl MaskPhi {
    fn protect(&self, text: &str) -> String {
        match &self.mode {
            Mode::Mask(with) => with.clone(),
            Mode::Hash(salt) => {
                let mut input = salt.as_bytes().to_vec();
                input.extend_from_slice(text.as_bytes());
                hex(&sha256(&input))
            }
        }
    }

    /// The new raw JSON for a member's raw JSON: strings are protected by content, other
    /// values by their JSON text; `null` stays, there is nothing to hide.
    fn protect_json(&self, raw: &str) -> Option<String> {
        let text = match raw.as_bytes().first() {
            Some(b'n') => return None,
            Some(b'"') => match json::parse(raw) {
                Ok(Value::String(s)) => s,
                _ => raw.to_string(),
            },
            _ => raw.to_string(),
        };
        Some(Value::String(self.protect(&text)).to_json())
    }
}

impl Transform for MaskPhi {
    fn configure(config: &Config) -> Result<Self, Error> {
        let mode = match config.get("mode").map(String::as_str) {
            None | Some("mask") => Mode::Mask(config.get("mask.with").cloned().unwrap_or_else(|| "***".to_string())),
            Some("hash") => Mode::Hash(config.get("salt").cloned().unwrap_or_default()),
            Some(other) => return Err(Error::new(format!("mode must be mask or hash, not '{}'", other))),
        };
        let mut hl7_fields = Vec::new();
        let specs = if config.contains_key("hl7.fields") {
            list(config, "hl7.fields")
        } else {
            vec!["PID-5".to_string(), "PID-7".to_string(), "PID-19".to_string()]
        };
        for spec in specs {
            match Message::address(&spec) {
                Some((segment, index)) => hl7_fields.push((segment.to_string(), index)),
                None => return Err(Error::new(format!("hl7.fields: '{}' is not like PID-5", spec))),
            }
        }
        let fields = list(config, "fields");
        if fields.is_empty() && hl7_fields.is_empty() {
            return Err(Error::new("set fields (JSON) or hl7.fields (HL7 v2): there is nothing to mask"));
        }
        Ok(MaskPhi { fields, hl7_fields, mode })
    }

    fn transform(&mut self, mut record: Record) -> Result<Option<Record>, Error> {
        let text = match record.value_str() {
            Some(text) => text,
            None if record.value.is_none() => return Ok(Some(record)),
            None => return Err(Error::new("the value is not UTF-8 text")),
        };
        let masked = if record.is_hl7() {
            let mut message = Message::parse(text)?;
            for (segment, index) in &self.hl7_fields {
                let component = message.component_separator();
                message.replace(segment, *index, |field| {
                    // Keep the component structure (DOE^JANE -> ***^***) so parsers downstream
                    // still find the components they expect.
                    field
                        .split(component)
                        .map(|c| if c.is_empty() { String::new() } else { self.protect(c) })
                        .collect::<Vec<_>>()
                        .join(&component.to_string())
                });
            }
            message.to_text()
        } else {
            // Edited in place, not parsed into a tree: masking is the hot path of a de-identifying
            // pipeline, and untouched fields come out byte for byte.
            if !text.trim_start().starts_with('{') {
                return Err(Error::new("the value is not JSON: a JSON object was expected"));
            }
            json::replace_members(text, &self.fields, &mut |_, raw| self.protect_json(raw))
                .map_err(|e| Error::new(format!("the value is not JSON: {}", e)))?
        };
        record.value = Some(masked.into_bytes());
        Ok(Some(record))
    }
}

export_transform!(configured MaskPhi);
