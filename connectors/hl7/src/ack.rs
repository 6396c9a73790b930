//! HL7 v2 acknowledgements (original mode): building the ACK a listener answers with, and
//! reading the ACK a downstream receiver answers the sink with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use medconnect_api::time::civil_from_days;

use crate::message::{Encoding, MshHeader, split_msh};

/// MSA-1 in original mode. Enhanced-mode commit codes (`CA`/`CE`/`CR`) are read as their
/// application counterparts when a receiver answers with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    /// `AA`: the message is durable.
    Accept,
    /// `AE`: the message was read but is invalid; a retransmission of the same bytes fails too.
    Error,
    /// `AR`: the message was not taken: busy, stopped, unsupported version, or refused as a
    /// whole (larger than the listener or Kafka accepts).
    Reject,
}

impl AckCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "AA",
            Self::Error => "AE",
            Self::Reject => "AR",
        }
    }

    fn parse(code: &str) -> Option<Self> {
        match code.trim() {
            "AA" | "CA" => Some(Self::Accept),
            "AE" | "CE" => Some(Self::Error),
            "AR" | "CR" => Some(Self::Reject),
            _ => None,
        }
    }
}

/// HL7 table 0357 (message error condition codes) — the ones this connector reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCondition {
    SegmentSequence,
    RequiredFieldMissing,
    DataType,
    UnsupportedMessageType,
    UnsupportedVersion,
    ApplicationInternal,
}

impl ErrorCondition {
    pub fn code(self) -> u16 {
        match self {
            Self::SegmentSequence => 100,
            Self::RequiredFieldMissing => 101,
            Self::DataType => 102,
            Self::UnsupportedMessageType => 200,
            Self::UnsupportedVersion => 203,
            Self::ApplicationInternal => 207,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::SegmentSequence => "Segment sequence error",
            Self::RequiredFieldMissing => "Required field missing",
            Self::DataType => "Data type error",
            Self::UnsupportedMessageType => "Unsupported message type",
            Self::UnsupportedVersion => "Unsupported version id",
            Self::ApplicationInternal => "Application internal error",
        }
    }
}

/// Where in the original message an error lies (segment, field), for ERR-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorLocation {
    pub segment: &'static str,
    pub field: u16,
}

/// The error reported in the ERR segment of a negative acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    pub condition: ErrorCondition,
    pub location: Option<ErrorLocation>,
}

/// What goes into an acknowledgement.
#[derive(Debug, Clone)]
pub struct Ack<'a> {
    pub code: AckCode,
    /// MSA-3 (and ERR-8 for errors). Must not contain patient data.
    pub text: &'a str,
    pub error: Option<AckError>,
}

const GENERIC_VERSION: &str = "2.5";
const GENERIC_APPLICATION: &str = "MEDCONNECT";

/// Builds the acknowledgement of `original` (its MSH, if it could be read at all): sender and
/// receiver swapped, MSH-9 `ACK^<event>^ACK`, MSA-2 the original control id, the original
/// encoding characters, version and processing id. Without an original header (bytes that are
/// not a message) a generic MSH with the standard encoding characters is used.
pub fn build(original: Option<&MshHeader>, ack: &Ack<'_>) -> Bytes {
    let default_encoding = Encoding::default();
    let enc = original.map_or(&default_encoding, |h| &h.encoding);
    let f = enc.field;
    let c = enc.component;
    let s = enc.subcomponent;
    let event = original.map_or("", |h| h.trigger_event.as_str());
    let message_type = if event.is_empty() {
        "ACK".to_string()
    } else {
        format!("ACK{c}{event}{c}ACK")
    };
    let version = original
        .map(|h| h.version.as_str())
        .filter(|v| is_version_like(v))
        .unwrap_or(GENERIC_VERSION);
    let processing = original
        .map(|h| h.processing_id.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("P");
    let (sending_app, sending_fac, receiving_app, receiving_fac) = match original {
        Some(h) => (
            h.receiving_application_raw.as_str(),
            h.receiving_facility_raw.as_str(),
            h.sending_application_raw.as_str(),
            h.sending_facility_raw.as_str(),
        ),
        None => (GENERIC_APPLICATION, "", "", ""),
    };
    let control_id = original.map_or("", |h| h.control_id_raw.as_str());
    let text = escape(ack.text, enc);

    let mut out = String::with_capacity(256);
    out.push_str("MSH");
    out.push(f);
    out.push_str(&enc.characters);
    for field in [
        sending_app,
        sending_fac,
        receiving_app,
        receiving_fac,
        &timestamp_now(),
        "",
        &message_type,
        &next_control_id(),
        processing,
        version,
    ] {
        out.push(f);
        out.push_str(field);
    }
    out.push('\r');
    out.push_str(&format!(
        "MSA{f}{}{f}{control_id}{f}{text}",
        ack.code.as_str()
    ));
    if let Some(error) = ack.error.as_ref().filter(|_| ack.code != AckCode::Accept) {
        out.push('\r');
        let code = error.condition.code();
        let name = error.condition.text();
        let (eld, location) = match error.location {
            Some(l) => (
                format!("{seg}{c}1{c}{field}{c}", seg = l.segment, field = l.field),
                format!("{seg}{c}1{c}{field}", seg = l.segment, field = l.field),
            ),
            None => (format!("{c}{c}{c}"), String::new()),
        };
        // ERR-1 for receivers before v2.5, ERR-2..4 and ERR-8 for v2.5 and later.
        out.push_str(&format!(
            "ERR{f}{eld}{code}{s}{name}{s}HL70357{f}{location}{f}{code}{c}{name}{c}HL70357{f}E{f}{f}{f}{f}{text}"
        ));
    }
    out.push('\r');
    Bytes::from(out)
}

fn is_version_like(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= 8
        && version.chars().all(|ch| ch.is_ascii_digit() || ch == '.')
}

/// Escapes the encoding characters in free text (HL7 escape sequences), and replaces
/// segment separators so text can never start a segment of its own.
pub(crate) fn escape(text: &str, enc: &Encoding) -> String {
    let e = enc.escape;
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        let code = if ch == enc.field {
            Some('F')
        } else if ch == enc.component {
            Some('S')
        } else if ch == enc.subcomponent {
            Some('T')
        } else if ch == enc.repetition {
            Some('R')
        } else if ch == e {
            Some('E')
        } else {
            None
        };
        match code {
            Some(code) => {
                out.push(e);
                out.push(code);
                out.push(e);
            }
            None if ch == '\r' || ch == '\n' => out.push(' '),
            None => out.push(ch),
        }
    }
    out
}

/// MSH-10 of our own acknowledgements: unique per process, at most 20 characters (the v2.3
/// limit of the field).
pub(crate) fn next_control_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("MC{millis:x}{:05x}", n & 0xF_FFFF)
}

/// MSH-7 in UTC, `YYYYMMDDHHMMSS+0000`.
pub(crate) fn timestamp_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}+0000",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// An acknowledgement received from a downstream receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckReply {
    pub code: AckCode,
    /// MSA-2: the control id of the message acknowledged.
    pub control_id: String,
    /// MSA-3, else ERR-8, else ERR-3's text (for logs and the dead-letter reason).
    pub text: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckParseError {
    #[error("the reply is not an HL7 message: {0}")]
    NotHl7(String),
    #[error("the reply has no MSA segment")]
    NoMsa,
    #[error("the reply's MSA-1 is not an acknowledgement code")]
    BadCode,
}

/// Reads the MSA (and ERR) of an acknowledgement.
pub fn parse_reply(raw: &[u8]) -> Result<AckReply, AckParseError> {
    let text = String::from_utf8_lossy(raw);
    let (_, encoding) = split_msh(&text).map_err(|e| AckParseError::NotHl7(e.to_string()))?;
    let f = encoding.field;
    let segments = text
        .split(['\r', '\n'])
        .map(|s| s.split(f).collect::<Vec<_>>());
    let mut msa: Option<Vec<&str>> = None;
    let mut err_text = String::new();
    for fields in segments {
        match fields.first().copied() {
            Some("MSA") if msa.is_none() => msa = Some(fields),
            Some("ERR") if err_text.is_empty() => {
                let diagnostic = fields.get(8).copied().unwrap_or("");
                let coded = fields
                    .get(3)
                    .and_then(|v| v.split(encoding.component).nth(1))
                    .unwrap_or("");
                err_text = if diagnostic.is_empty() {
                    coded
                } else {
                    diagnostic
                }
                .to_string();
            }
            _ => {}
        }
    }
    let msa = msa.ok_or(AckParseError::NoMsa)?;
    let code = msa
        .get(1)
        .and_then(|c| AckCode::parse(c))
        .ok_or(AckParseError::BadCode)?;
    let msa_text = msa.get(3).copied().unwrap_or("").to_string();
    Ok(AckReply {
        code,
        control_id: msa.get(2).copied().unwrap_or("").to_string(),
        text: if msa_text.is_empty() {
            err_text
        } else {
            msa_text
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Rules, parse};
    use crate::samples::ADT_A01 as ADT;

    fn fields(segment: &str) -> Vec<&str> {
        segment.split('|').collect()
    }

    fn segments(ack: &Bytes) -> Vec<String> {
        std::str::from_utf8(ack)
            .expect("ack is text")
            .split('\r')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn an_accept_swaps_sender_and_receiver_and_echoes_the_control_id() {
        let message = parse(ADT.as_bytes(), &Rules::default()).expect("valid");
        let ack = build(
            Some(&message.header),
            &Ack {
                code: AckCode::Accept,
                text: "",
                error: None,
            },
        );
        let segs = segments(&ack);
        assert_eq!(segs.len(), 2, "no ERR on an accept: {segs:?}");
        let msh = fields(&segs[0]);
        assert_eq!(msh[0], "MSH");
        assert_eq!(msh[1], "^~\\&");
        assert_eq!(
            (msh[2], msh[3], msh[4], msh[5]),
            ("MEDCONNECT", "DC", "EPIC", "HOSP")
        );
        assert_eq!(msh[8], "ACK^A01^ACK");
        assert!(!msh[9].is_empty() && msh[9] != "MSG00001" && msh[9].len() <= 20);
        assert_eq!((msh[10], msh[11]), ("P", "2.5.1"));
        assert_eq!(
            msh[6].len(),
            19,
            "timestamp YYYYMMDDHHMMSS+0000: {}",
            msh[6]
        );
        assert_eq!(fields(&segs[1]), vec!["MSA", "AA", "MSG00001", ""]);
    }

    #[test]
    fn an_error_carries_msa_text_and_an_err_segment() {
        let message = parse(ADT.as_bytes(), &Rules::default()).expect("valid");
        let ack = build(
            Some(&message.header),
            &Ack {
                code: AckCode::Error,
                text: "bad | value",
                error: Some(AckError {
                    condition: ErrorCondition::RequiredFieldMissing,
                    location: Some(ErrorLocation {
                        segment: "MSH",
                        field: 10,
                    }),
                }),
            },
        );
        let segs = segments(&ack);
        assert_eq!(segs.len(), 3);
        let msa = fields(&segs[1]);
        assert_eq!(msa, vec!["MSA", "AE", "MSG00001", "bad \\F\\ value"]);
        let err = fields(&segs[2]);
        assert_eq!(err[0], "ERR");
        assert_eq!(err[1], "MSH^1^10^101&Required field missing&HL70357");
        assert_eq!(err[2], "MSH^1^10");
        assert_eq!(err[3], "101^Required field missing^HL70357");
        assert_eq!(err[4], "E");
        assert_eq!(err[8], "bad \\F\\ value");
        let reply = parse_reply(&ack).expect("our own ack reads back");
        assert_eq!(reply.code, AckCode::Error);
        assert_eq!(reply.control_id, "MSG00001");
    }

    #[test]
    fn the_original_encoding_characters_are_kept() {
        let raw = "MSH#$~\\&#APP#FAC#RCV#RFAC#2024##ORU$R01#C1#T#2.4\r";
        let message = parse(raw.as_bytes(), &Rules::default()).expect("valid");
        let ack = build(
            Some(&message.header),
            &Ack {
                code: AckCode::Reject,
                text: "busy",
                error: Some(AckError {
                    condition: ErrorCondition::ApplicationInternal,
                    location: None,
                }),
            },
        );
        let segs = segments(&ack);
        let msh: Vec<&str> = segs[0].split('#').collect();
        assert_eq!(msh[1], "$~\\&");
        assert_eq!(msh[8], "ACK$R01$ACK");
        assert_eq!(msh[10], "T");
        assert_eq!(segs[1], "MSA#AR#C1#busy");
        assert!(segs[2].starts_with("ERR#$$$207&Application internal error&HL70357##207$"));
    }

    #[test]
    fn a_generic_ack_answers_bytes_that_are_no_message() {
        let ack = build(
            None,
            &Ack {
                code: AckCode::Reject,
                text: "not an HL7 message",
                error: Some(AckError {
                    condition: ErrorCondition::SegmentSequence,
                    location: None,
                }),
            },
        );
        let segs = segments(&ack);
        let msh = fields(&segs[0]);
        assert_eq!(
            (msh[1], msh[2], msh[8], msh[11]),
            ("^~\\&", "MEDCONNECT", "ACK", "2.5")
        );
        assert_eq!(
            fields(&segs[1]),
            vec!["MSA", "AR", "", "not an HL7 message"]
        );
        assert!(segs[2].starts_with("ERR|"));
    }

    #[test]
    fn replies_are_read_with_their_codes() {
        let reply =
            parse_reply(b"MSH|^~\\&|R|RF|S|SF|2024||ACK^A01|X|P|2.5\rMSA|CA|M1\r").expect("reply");
        assert_eq!(reply.code, AckCode::Accept);
        let reply =
            parse_reply(b"MSH|^~\\&|R|RF|S|SF|2024||ACK|X|P|2.5\nMSA|AR|M2\nERR||||E||||down\n")
                .expect("reply");
        assert_eq!(
            (reply.code, reply.control_id.as_str(), reply.text.as_str()),
            (AckCode::Reject, "M2", "down")
        );
        assert_eq!(
            parse_reply(b"MSH|^~\\&|R\rPID|1\r"),
            Err(AckParseError::NoMsa)
        );
        assert_eq!(
            parse_reply(b"MSH|^~\\&|R\rMSA|XX|1\r"),
            Err(AckParseError::BadCode)
        );
        assert!(matches!(
            parse_reply(b"hello"),
            Err(AckParseError::NotHl7(_))
        ));
    }
}
