//! HL7 v2 messages: MSH validation, and the record a message becomes (key, headers, topic).
//!
//! The MSH is read by hand first, because the acknowledgement needs its fields (sender,
//! receiver, control id, encoding characters) even when the rest of the message is broken;
//! the segment structure is then checked, and the key read, as `hl7-parser` reads them
//! ([`crate::structure`]).
//! The record's value is always the raw bytes as received: nothing is re-encoded.

use bytes::Bytes;
use hl7_parser::message::Separators;
use hl7_parser::query::LocationQuery;
use medconnect_api::{Record, content_type};

use crate::ack::{AckCode, ErrorCondition, ErrorLocation};
use crate::structure::{self, Segments};

/// Record header names.
pub mod header {
    pub const MESSAGE_TYPE: &str = "hl7.message.type";
    pub const TRIGGER_EVENT: &str = "hl7.trigger.event";
    pub const MESSAGE_STRUCTURE: &str = "hl7.message.structure";
    pub const SENDING_APPLICATION: &str = "hl7.sending.application";
    pub const SENDING_FACILITY: &str = "hl7.sending.facility";
    pub const RECEIVING_APPLICATION: &str = "hl7.receiving.application";
    pub const RECEIVING_FACILITY: &str = "hl7.receiving.facility";
    pub const CONTROL_ID: &str = "hl7.control.id";
    pub const VERSION: &str = "hl7.version";
    pub const PROCESSING_ID: &str = "hl7.processing.id";
}

/// The default versions accepted (MSH-12.1).
pub const DEFAULT_VERSIONS: &str =
    "2.1,2.2,2.3,2.3.1,2.4,2.5,2.5.1,2.6,2.7,2.7.1,2.8,2.8.1,2.8.2,2.9";

/// The delimiters a message declares in MSH-1 and MSH-2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    pub field: char,
    pub component: char,
    pub repetition: char,
    pub escape: char,
    pub subcomponent: char,
    /// MSH-2 as sent (4 characters, or 5 with the v2.7 truncation character).
    pub characters: String,
}

impl Default for Encoding {
    fn default() -> Self {
        Self {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
            characters: "^~\\&".to_string(),
        }
    }
}

/// Why a message is not accepted, and how to answer its sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    /// The MSH as far as it could be read: the ACK swaps sender and receiver from it.
    pub header: Option<Box<MshHeader>>,
    pub code: AckCode,
    pub condition: ErrorCondition,
    pub location: Option<ErrorLocation>,
    /// Names fields, never their values (the reason reaches logs and the dead-letter topic).
    pub reason: String,
}

/// The MSH fields the connector uses. `*_raw` fields are the whole field as sent, for the
/// ACK; the others are the first component, for record headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MshHeader {
    pub encoding: Encoding,
    pub sending_application: String,
    pub sending_application_raw: String,
    pub sending_facility: String,
    pub sending_facility_raw: String,
    pub receiving_application: String,
    pub receiving_application_raw: String,
    pub receiving_facility: String,
    pub receiving_facility_raw: String,
    pub message_code: String,
    pub trigger_event: String,
    pub message_structure: String,
    pub control_id: String,
    pub control_id_raw: String,
    pub processing_id: String,
    pub version: String,
}

/// How messages are validated and keyed.
#[derive(Debug, Clone)]
pub struct Rules {
    pub versions: Vec<String>,
    /// Empty: every message type is accepted.
    pub message_types: Vec<String>,
    /// Accept `\n` and `\r\n` between segments besides the standard `\r`.
    pub lenient_newlines: bool,
    /// The field whose value keys the record; MSH-10 when absent or empty.
    pub key_field: Option<LocationQuery>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            versions: DEFAULT_VERSIONS.split(',').map(str::to_string).collect(),
            message_types: Vec::new(),
            lenient_newlines: true,
            key_field: LocationQuery::parse("PID.3.1").ok(),
        }
    }
}

/// A message that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hl7Message {
    pub raw: Bytes,
    pub header: MshHeader,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MshError {
    #[error("the message does not start with an MSH segment")]
    NotMsh,
    #[error("MSH-1/MSH-2 do not declare valid, distinct delimiters")]
    BadDelimiters,
}

fn is_delimiter(ch: char) -> bool {
    ch.is_ascii_graphic() && !ch.is_ascii_alphanumeric()
}

/// Splits the MSH segment into fields numbered as in the standard: `fields[n]` is MSH-n for
/// n >= 3 (`fields[0]` is "MSH", `fields[1]` MSH-1, `fields[2]` MSH-2).
pub fn split_msh(text: &str) -> Result<(Vec<&str>, Encoding), MshError> {
    split_header_segment(text, "MSH")
}

/// As [`split_msh`], for any segment that declares the delimiters as MSH does (FHS, BHS).
pub fn split_header_segment<'a>(
    text: &'a str,
    name: &str,
) -> Result<(Vec<&'a str>, Encoding), MshError> {
    let text = text.trim_start_matches(['\r', '\n', ' ', '\t']);
    let rest = text.strip_prefix(name).ok_or(MshError::NotMsh)?;
    let mut chars = rest.chars();
    let field = chars
        .next()
        .filter(|c| is_delimiter(*c))
        .ok_or(MshError::BadDelimiters)?;
    let line_end = rest.find(['\r', '\n']).unwrap_or(rest.len());
    let line = &rest[field.len_utf8()..line_end];
    let mut fields: Vec<&str> = Vec::with_capacity(24);
    fields.push(&text[..name.len()]);
    fields.push(&rest[..field.len_utf8()]);
    fields.extend(line.split(field));
    let characters = fields.get(2).copied().unwrap_or("");
    let enc: Vec<char> = characters.chars().collect();
    let distinct = enc
        .iter()
        .enumerate()
        .all(|(i, c)| !enc[..i].contains(c) && *c != field);
    if !(enc.len() == 4 || enc.len() == 5) || !enc.iter().all(|c| is_delimiter(*c)) || !distinct {
        return Err(MshError::BadDelimiters);
    }
    let encoding = Encoding {
        field,
        component: enc[0],
        repetition: enc[1],
        escape: enc[2],
        subcomponent: enc[3],
        characters: characters.to_string(),
    };
    Ok((fields, encoding))
}

fn component(value: &str, enc: &Encoding, n: usize) -> String {
    value
        .split(enc.repetition)
        .next()
        .and_then(|first| first.split(enc.component).nth(n))
        .unwrap_or("")
        .to_string()
}

/// Reads the MSH fields, without validating them.
pub fn read_header(text: &str) -> Result<MshHeader, MshError> {
    let (fields, encoding) = split_msh(text)?;
    let get = |n: usize| fields.get(n).copied().unwrap_or("");
    Ok(MshHeader {
        sending_application: component(get(3), &encoding, 0),
        sending_application_raw: get(3).to_string(),
        sending_facility: component(get(4), &encoding, 0),
        sending_facility_raw: get(4).to_string(),
        receiving_application: component(get(5), &encoding, 0),
        receiving_application_raw: get(5).to_string(),
        receiving_facility: component(get(6), &encoding, 0),
        receiving_facility_raw: get(6).to_string(),
        message_code: component(get(9), &encoding, 0),
        trigger_event: component(get(9), &encoding, 1),
        message_structure: component(get(9), &encoding, 2),
        control_id: component(get(10), &encoding, 0),
        control_id_raw: get(10).to_string(),
        processing_id: get(11).to_string(),
        version: component(get(12), &encoding, 0),
        encoding,
    })
}

fn reject(
    header: &MshHeader,
    code: AckCode,
    condition: ErrorCondition,
    field: u16,
    reason: impl Into<String>,
) -> Rejection {
    Rejection {
        header: Some(Box::new(header.clone())),
        code,
        condition,
        location: Some(ErrorLocation {
            segment: "MSH",
            field,
        }),
        reason: reason.into(),
    }
}

/// The message's delimiters as hl7-parser takes them.
fn separators(encoding: &Encoding, rules: &Rules) -> Separators {
    Separators {
        field: encoding.field,
        component: encoding.component,
        subcomponent: encoding.subcomponent,
        repetition: encoding.repetition,
        escape: encoding.escape,
        lenient_newlines: rules.lenient_newlines,
    }
}

fn is_code(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 8
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads the segments of `body`: where reading stopped, and the segment the key query names
/// (with whether it is the message's MSH), if there is one.
fn walk<'a>(body: &'a str, field: char, rules: &Rules) -> (usize, Option<(&'a str, bool)>) {
    // Segment numbers are 1-based: 0 points at no segment.
    let wanted = rules
        .key_field
        .as_ref()
        .and_then(|query| Some((query, query.segment_index.unwrap_or(1).checked_sub(1)?)));
    let mut key_segment = None;
    let mut named = 0;
    let mut segments = Segments::new(body, field, rules.lenient_newlines);
    for (position, segment) in (&mut segments).enumerate() {
        if let Some((query, index)) = wanted
            && key_segment.is_none()
            && structure::name(segment, field) == query.segment
        {
            if named == index {
                key_segment = Some((segment, position == 0));
            }
            named += 1;
        }
    }
    (segments.end(), key_segment)
}

/// Validates a message and extracts what its record needs.
pub fn parse(raw: &[u8], rules: &Rules) -> Result<Hl7Message, Rejection> {
    parse_bytes(Bytes::copy_from_slice(raw), rules)
}

/// As [`parse`], keeping `raw` (shared, not copied) as the message's value.
pub fn parse_bytes(raw: Bytes, rules: &Rules) -> Result<Hl7Message, Rejection> {
    let text = String::from_utf8_lossy(&raw);
    let header = read_header(&text).map_err(|error| Rejection {
        header: None,
        code: match error {
            MshError::NotMsh => AckCode::Reject,
            MshError::BadDelimiters => AckCode::Error,
        },
        condition: match error {
            MshError::NotMsh => ErrorCondition::SegmentSequence,
            MshError::BadDelimiters => ErrorCondition::DataType,
        },
        location: Some(ErrorLocation {
            segment: "MSH",
            field: match error {
                MshError::NotMsh => 0,
                MshError::BadDelimiters => 2,
            },
        }),
        reason: error.to_string(),
    })?;
    if header.message_code.is_empty() {
        return Err(reject(
            &header,
            AckCode::Error,
            ErrorCondition::RequiredFieldMissing,
            9,
            "MSH-9 (message type) is missing",
        ));
    }
    if !is_code(&header.message_code)
        || !(header.trigger_event.is_empty() || is_code(&header.trigger_event))
    {
        return Err(reject(
            &header,
            AckCode::Error,
            ErrorCondition::DataType,
            9,
            "MSH-9 (message type) is not a valid code",
        ));
    }
    if header.control_id.trim().is_empty() {
        return Err(reject(
            &header,
            AckCode::Error,
            ErrorCondition::RequiredFieldMissing,
            10,
            "MSH-10 (message control id) is missing",
        ));
    }
    if header.version.is_empty() {
        return Err(reject(
            &header,
            AckCode::Error,
            ErrorCondition::RequiredFieldMissing,
            12,
            "MSH-12 (version id) is missing",
        ));
    }
    if !rules.versions.contains(&header.version) {
        // Versions are short tokens, not patient data: naming it helps the sender's team.
        let version: String = header.version.chars().take(16).collect();
        return Err(reject(
            &header,
            AckCode::Reject,
            ErrorCondition::UnsupportedVersion,
            12,
            format!("MSH-12 version '{version}' is not supported"),
        ));
    }
    if !rules.message_types.is_empty()
        && !rules
            .message_types
            .iter()
            .any(|t| t.eq_ignore_ascii_case(&header.message_code))
    {
        return Err(reject(
            &header,
            AckCode::Reject,
            ErrorCondition::UnsupportedMessageType,
            9,
            format!("message type {} is not accepted", header.message_code),
        ));
    }
    let body = text.trim_start_matches(['\r', '\n', ' ', '\t']);
    let (parsed_len, key_segment) = walk(body, header.encoding.field, rules);
    if !body
        .get(parsed_len..)
        .unwrap_or("")
        .trim_matches(['\r', '\n'])
        .is_empty()
    {
        return Err(Rejection {
            header: Some(Box::new(header.clone())),
            code: AckCode::Error,
            condition: ErrorCondition::SegmentSequence,
            location: None,
            reason: format!(
                "the message structure is invalid (unreadable segment at byte {parsed_len})"
            ),
        });
    }
    let key = match (&rules.key_field, key_segment) {
        (Some(query), Some((segment, first))) => {
            structure::key(segment, first, separators(&header.encoding, rules), query)
        }
        _ => None,
    }
    .filter(|value| !value.is_empty())
    .unwrap_or_else(|| header.control_id.clone());
    Ok(Hl7Message { raw, header, key })
}

/// The topic of a message: a template where `${message.type}` and `${trigger.event}` stand
/// for MSH-9.1 and MSH-9.2 in lower case (`hl7.${message.type}` -> `hl7.adt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate(String);

impl TopicTemplate {
    pub const MESSAGE_TYPE: &'static str = "${message.type}";
    pub const TRIGGER_EVENT: &'static str = "${trigger.event}";

    pub fn new(template: impl Into<String>) -> Self {
        Self(template.into())
    }

    /// Whether the topic depends on the message (so senders choose how many topics there are).
    pub fn is_dynamic(&self) -> bool {
        self.0.contains(Self::MESSAGE_TYPE) || self.0.contains(Self::TRIGGER_EVENT)
    }

    /// Whether the template yields legal Kafka topic names for any message type.
    pub fn check(template: &str) -> Result<(), String> {
        let sample = Self::new(template).resolve(Some(&MshHeader::default()));
        if sample.is_empty() || sample.len() > 200 {
            return Err("the topic must have 1 to 200 characters".into());
        }
        if !sample
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err("a topic may hold only letters, digits, '.', '_', '-' besides ${message.type} and ${trigger.event}".into());
        }
        Ok(())
    }

    /// Message types are validated as short alphanumeric codes, so the result stays a legal
    /// topic name; an unknown type (a rejected message) reads as `unknown`.
    pub fn resolve(&self, header: Option<&MshHeader>) -> String {
        let pick = |value: Option<&String>| {
            value
                .filter(|v| is_code(v))
                .map_or_else(|| "unknown".to_string(), |v| v.to_ascii_lowercase())
        };
        self.0
            .replace(Self::MESSAGE_TYPE, &pick(header.map(|h| &h.message_code)))
            .replace(Self::TRIGGER_EVENT, &pick(header.map(|h| &h.trigger_event)))
    }
}

fn add_headers(record: &mut Record, header: &MshHeader) {
    let pairs = [
        (header::MESSAGE_TYPE, &header.message_code),
        (header::TRIGGER_EVENT, &header.trigger_event),
        (header::MESSAGE_STRUCTURE, &header.message_structure),
        (header::SENDING_APPLICATION, &header.sending_application),
        (header::SENDING_FACILITY, &header.sending_facility),
        (header::RECEIVING_APPLICATION, &header.receiving_application),
        (header::RECEIVING_FACILITY, &header.receiving_facility),
        (header::CONTROL_ID, &header.control_id),
        (header::PROCESSING_ID, &header.processing_id),
        (header::VERSION, &header.version),
    ];
    for (name, value) in pairs {
        if !value.is_empty() {
            record.headers.add(name, Bytes::from(value.clone()));
        }
    }
}

impl Hl7Message {
    pub fn to_record(&self, topic: &TopicTemplate) -> Record {
        let mut record = Record::new(topic.resolve(Some(&self.header)))
            .with_key(Bytes::from(self.key.clone()))
            .with_value(self.raw.clone())
            .with_header(content_type::HEADER, content_type::HL7_V2);
        add_headers(&mut record, &self.header);
        record
    }
}

/// The record of a rejected message, for the dead-letter topic: the raw bytes and whatever
/// headers could be read; keyed by the control id when there is one.
pub fn rejected_record(raw: &Bytes, rejection: &Rejection, topic: &TopicTemplate) -> Record {
    let mut record = Record::new(topic.resolve(rejection.header.as_deref()))
        .with_value(raw.clone())
        .with_header(content_type::HEADER, content_type::HL7_V2);
    if let Some(header) = &rejection.header {
        if !header.control_id.is_empty() {
            record.key = Some(Bytes::from(header.control_id.clone()));
        }
        add_headers(&mut record, header);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{ADT_A01, ORU_R01};

    fn rejected(raw: &str) -> Rejection {
        parse(raw.as_bytes(), &Rules::default()).expect_err("must be rejected")
    }

    #[test]
    fn an_adt_a01_is_keyed_by_patient_id_and_routed_by_type() {
        let message = parse(ADT_A01.as_bytes(), &Rules::default()).expect("valid");
        assert_eq!(message.key, "PAT123");
        let record = message.to_record(&TopicTemplate::new("hl7.${message.type}"));
        assert_eq!(record.topic, "hl7.adt");
        assert_eq!(record.key.as_deref(), Some(&b"PAT123"[..]));
        assert_eq!(record.value.as_deref(), Some(ADT_A01.as_bytes()));
        let h = &record.headers;
        assert_eq!(h.last_str("content-type"), Some("application/hl7-v2"));
        assert_eq!(h.last_str(header::MESSAGE_TYPE), Some("ADT"));
        assert_eq!(h.last_str(header::TRIGGER_EVENT), Some("A01"));
        assert_eq!(h.last_str(header::MESSAGE_STRUCTURE), Some("ADT_A01"));
        assert_eq!(h.last_str(header::SENDING_APPLICATION), Some("EPIC"));
        assert_eq!(h.last_str(header::SENDING_FACILITY), Some("HOSP"));
        assert_eq!(h.last_str(header::CONTROL_ID), Some("MSG00001"));
        assert_eq!(h.last_str(header::VERSION), Some("2.5.1"));
    }

    #[test]
    fn an_oru_r01_with_newlines_is_accepted_when_lenient() {
        let with_newlines = ORU_R01.replace('\r', "\n");
        let message = parse(with_newlines.as_bytes(), &Rules::default()).expect("valid");
        assert_eq!(message.key, "77");
        assert_eq!(message.header.message_code, "ORU");
        assert_eq!(
            TopicTemplate::new("hl7.${message.type}").resolve(Some(&message.header)),
            "hl7.oru"
        );
    }

    #[test]
    fn the_key_falls_back_to_the_control_id() {
        let no_pid = "MSH|^~\\&|A|B|C|D|2024||ACK^A01|CTRL9|P|2.5\rMSA|AA|X\r";
        assert_eq!(
            parse(no_pid.as_bytes(), &Rules::default())
                .expect("valid")
                .key,
            "CTRL9"
        );
        let rules = Rules {
            key_field: None,
            ..Rules::default()
        };
        assert_eq!(
            parse(ADT_A01.as_bytes(), &rules).expect("valid").key,
            "MSG00001"
        );
        let rules = Rules {
            key_field: LocationQuery::parse("PID.5.1").ok(),
            ..Rules::default()
        };
        assert_eq!(parse(ADT_A01.as_bytes(), &rules).expect("valid").key, "DOE");
    }

    #[test]
    fn bytes_that_are_no_message_are_rejected_without_a_header() {
        let r = rejected("hello world");
        assert_eq!(
            (r.code, r.condition, r.header),
            (AckCode::Reject, ErrorCondition::SegmentSequence, None)
        );
    }

    #[test]
    fn bad_delimiters_are_an_error() {
        for raw in [
            "MSH|^~|A|B\r",
            "MSH|^^\\&|A\r",
            "MSHA^~\\&|A\r",
            "MSH|^~\\&&&|A\r",
            "MSH",
        ] {
            let r = rejected(raw);
            assert_eq!(
                (r.code, r.condition),
                (AckCode::Error, ErrorCondition::DataType),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn missing_required_fields_are_an_error_naming_the_field() {
        let r = rejected("MSH|^~\\&|A|B|C|D|2024||ADT^A01||P|2.5\rPID|1\r");
        assert_eq!(
            (r.code, r.condition),
            (AckCode::Error, ErrorCondition::RequiredFieldMissing)
        );
        assert_eq!(
            r.location,
            Some(ErrorLocation {
                segment: "MSH",
                field: 10
            })
        );
        assert!(r.reason.contains("MSH-10"));
        assert_eq!(
            r.header.as_deref().map(|h| h.sending_application.as_str()),
            Some("A")
        );

        let r = rejected("MSH|^~\\&|A|B|C|D|2024|||C1|P|2.5\r");
        assert_eq!(
            r.location,
            Some(ErrorLocation {
                segment: "MSH",
                field: 9
            })
        );
        let r = rejected("MSH|^~\\&|A|B|C|D|2024||ADT^A01|C1|P\r");
        assert_eq!(
            r.location,
            Some(ErrorLocation {
                segment: "MSH",
                field: 12
            })
        );
        assert_eq!(r.code, AckCode::Error);
    }

    #[test]
    fn an_unsupported_version_is_rejected() {
        let r = rejected("MSH|^~\\&|A|B|C|D|2024||ADT^A01|C1|P|3.0\r");
        assert_eq!(
            (r.code, r.condition),
            (AckCode::Reject, ErrorCondition::UnsupportedVersion)
        );
    }

    #[test]
    fn unaccepted_message_types_are_rejected() {
        let rules = Rules {
            message_types: vec!["ORU".into()],
            ..Rules::default()
        };
        let r = parse(ADT_A01.as_bytes(), &rules).expect_err("ADT not accepted");
        assert_eq!(
            (r.code, r.condition),
            (AckCode::Reject, ErrorCondition::UnsupportedMessageType)
        );
        assert!(parse(ORU_R01.as_bytes(), &rules).is_ok());
    }

    #[test]
    fn a_broken_body_is_an_error_without_quoting_it() {
        let raw = format!("{ADT_A01}P\rSECRET-NAME|x");
        let r = rejected(&raw);
        assert_eq!(r.code, AckCode::Error);
        assert!(!r.reason.contains("SECRET"), "{}", r.reason);
    }

    #[test]
    fn rejected_records_keep_the_bytes_and_readable_headers() {
        let raw = Bytes::from_static(b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|C1|P|3.0\r");
        let r = parse(&raw, &Rules::default()).expect_err("rejected");
        let record = rejected_record(&raw, &r, &TopicTemplate::new("hl7.${message.type}"));
        assert_eq!(record.value.as_ref(), Some(&raw));
        assert_eq!(record.key.as_deref(), Some(&b"C1"[..]));
        assert_eq!(record.headers.last_str(header::MESSAGE_TYPE), Some("ADT"));
        let junk = Bytes::from_static(b"\x00\xff");
        let r = parse(&junk, &Rules::default()).expect_err("rejected");
        assert_eq!(
            rejected_record(&junk, &r, &TopicTemplate::new("hl7.${message.type}")).topic,
            "hl7.unknown"
        );
    }

    #[test]
    fn topic_templates_are_checked() {
        assert!(TopicTemplate::check("hl7.${message.type}").is_ok());
        assert!(TopicTemplate::check("hl7-inbound").is_ok());
        assert!(TopicTemplate::check("hl7 ${message.type}").is_err());
        assert!(TopicTemplate::check("").is_err());
    }
}
