//! HL7 v2 batches (v2.5 chapter 2.10.3) in one MLLP frame:
//! `[FHS] { [BHS] { MSH ... } [BTS] } [FTS]`, or several MSH messages without any envelope.
//!
//! Each message becomes its own record; the answer is one frame holding a batch of ACKs in
//! the same envelope (FHS/BHS with sender and receiver swapped, BHS-12/FHS-12 referring to the
//! original control ids, one ACK per message, BTS-1 the count of ACKs, FTS-1 the count of
//! batches). A batch whose structure is broken (segments outside any message, trailer counts
//! that do not match) is rejected as a whole: every message is answered AR, none is stored.

use bytes::Bytes;

use crate::ack::{self, escape};
use crate::message::{Encoding, MshHeader, read_header, split_header_segment};

/// What kind of segment starts a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Msh,
    Fhs,
    Bhs,
    Bts,
    Fts,
    Other,
}

fn kind(segment: &[u8]) -> Kind {
    let name = segment.get(..3).unwrap_or(segment);
    // A header segment name is followed by its field separator; a trailer's by a field
    // separator or nothing (BTS alone on its line).
    let next = segment.get(3).copied();
    let delimited = next.is_some_and(|b| b.is_ascii_graphic() && !b.is_ascii_alphanumeric());
    match name {
        b"MSH" if delimited => Kind::Msh,
        b"FHS" if delimited => Kind::Fhs,
        b"BHS" if delimited => Kind::Bhs,
        b"BTS" if delimited || next.is_none() => Kind::Bts,
        b"FTS" if delimited || next.is_none() => Kind::Fts,
        _ => Kind::Other,
    }
}

/// The sender side of an FHS or BHS, for the envelope of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    pub encoding: Encoding,
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    /// FHS-11 / BHS-11: what the answer's FHS-12 / BHS-12 refers to.
    pub control_id: String,
}

impl Envelope {
    fn read(segment: &str, name: &str) -> Option<Self> {
        let (fields, encoding) = split_header_segment(segment, name).ok()?;
        let get = |n: usize| fields.get(n).copied().unwrap_or("").to_string();
        Some(Self {
            sending_application: get(3),
            sending_facility: get(4),
            receiving_application: get(5),
            receiving_facility: get(6),
            control_id: get(11),
            encoding,
        })
    }

    /// The envelope of a batch without BHS: taken from its first message's MSH.
    fn from_message(header: &MshHeader) -> Self {
        Self {
            encoding: header.encoding.clone(),
            sending_application: header.sending_application_raw.clone(),
            sending_facility: header.sending_facility_raw.clone(),
            receiving_application: header.receiving_application_raw.clone(),
            receiving_facility: header.receiving_facility_raw.clone(),
            control_id: String::new(),
        }
    }
}

/// One batch: its BHS (if any), its messages in order, and what its BTS declares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Group {
    pub header: Option<Envelope>,
    pub messages: Vec<Bytes>,
    declared: Option<String>,
    closed: bool,
}

/// A frame holding a batch (or a file of batches), split into its messages.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    pub file: Option<Envelope>,
    pub groups: Vec<Group>,
    declared_groups: Option<String>,
    /// Why the batch as a whole cannot be taken (its messages are then all answered AR).
    pub invalid: Option<String>,
}

impl Batch {
    /// Every message, in the order sent.
    pub fn messages(&self) -> impl Iterator<Item = &Bytes> {
        self.groups.iter().flat_map(|g| g.messages.iter())
    }

    pub fn message_count(&self) -> usize {
        self.groups.iter().map(|g| g.messages.len()).sum()
    }
}

/// What a frame holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// At most one MSH and no batch segment: a single message (or no message at all), handled
    /// as such.
    Single,
    Batch(Box<Batch>),
}

/// Segments of `payload` as (start, end) byte ranges, empty lines skipped.
fn segments(payload: &[u8], lenient_newlines: bool) -> Vec<(usize, usize)> {
    let is_end = |b: u8| b == b'\r' || (lenient_newlines && b == b'\n');
    let mut out = Vec::new();
    let mut start = 0;
    for (i, b) in payload.iter().enumerate() {
        if is_end(*b) {
            if i > start {
                out.push((start, i));
            }
            start = i + 1;
        }
    }
    if start < payload.len() {
        out.push((start, payload.len()));
    }
    out
}

/// Reads a frame: a single message, or a batch split into its messages (each a slice of the
/// frame, segment terminators included, so a record's value is the bytes as sent).
pub fn split(payload: &Bytes, lenient_newlines: bool) -> Frame {
    let segments = segments(payload, lenient_newlines);
    let kinds: Vec<Kind> = segments
        .iter()
        .map(|&(s, e)| kind(&payload[s..e]))
        .collect();
    let headers = kinds.iter().filter(|k| **k == Kind::Msh).count();
    let enveloped = kinds
        .iter()
        .any(|k| matches!(k, Kind::Fhs | Kind::Bhs | Kind::Bts | Kind::Fts));
    if headers <= 1 && !enveloped {
        return Frame::Single;
    }
    let mut batch = Batch::default();
    let text = |(s, e): (usize, usize)| String::from_utf8_lossy(&payload[s..e]).into_owned();
    let mut message_start: Option<usize> = None;
    let mut file_ended = false;
    let close_message = |batch: &mut Batch, start: &mut Option<usize>, end: usize| {
        if let Some(start) = start.take() {
            let group = current_group(batch);
            group.messages.push(payload.slice(start..end));
        }
    };
    for (i, (&range, kind)) in segments.iter().zip(&kinds).enumerate() {
        if file_ended {
            batch.invalid = Some("segments after FTS".into());
            break;
        }
        match kind {
            Kind::Other => {
                if message_start.is_none() {
                    batch.invalid = Some(format!(
                        "segment {} outside any message of the batch",
                        segment_name(&payload[range.0..range.1])
                    ));
                    break;
                }
            }
            Kind::Msh => {
                close_message(&mut batch, &mut message_start, range.0);
                message_start = Some(range.0);
            }
            Kind::Fhs => {
                close_message(&mut batch, &mut message_start, range.0);
                if i != 0 {
                    batch.invalid = Some("FHS is not the first segment".into());
                    break;
                }
                batch.file = Envelope::read(&text(range), "FHS");
                if batch.file.is_none() {
                    batch.invalid = Some("FHS-1/FHS-2 do not declare valid delimiters".into());
                    break;
                }
            }
            Kind::Bhs => {
                close_message(&mut batch, &mut message_start, range.0);
                let Some(header) = Envelope::read(&text(range), "BHS") else {
                    batch.invalid = Some("BHS-1/BHS-2 do not declare valid delimiters".into());
                    break;
                };
                batch.groups.push(Group {
                    header: Some(header),
                    ..Group::default()
                });
            }
            Kind::Bts => {
                close_message(&mut batch, &mut message_start, range.0);
                let group = current_group(&mut batch);
                group.declared = Some(first_field(&text(range)));
                group.closed = true;
            }
            Kind::Fts => {
                close_message(&mut batch, &mut message_start, range.0);
                batch.declared_groups = Some(first_field(&text(range)));
                file_ended = true;
            }
        }
    }
    close_message(&mut batch, &mut message_start, payload.len());
    if batch.invalid.is_none() {
        batch.invalid = check_counts(&batch);
    }
    Frame::Batch(Box::new(batch))
}

/// The group messages go to: the last one, unless it was closed by its BTS.
fn current_group(batch: &mut Batch) -> &mut Group {
    if batch.groups.last().is_none_or(|g| g.closed) {
        batch.groups.push(Group::default());
    }
    let last = batch.groups.len() - 1;
    &mut batch.groups[last]
}

fn segment_name(segment: &[u8]) -> String {
    // A segment name is three characters; anything else is shown as such, never quoted.
    let name = segment.get(..3).unwrap_or(segment);
    if name.len() == 3 && name.iter().all(u8::is_ascii_alphanumeric) {
        String::from_utf8_lossy(name).into_owned()
    } else {
        "(unreadable)".to_string()
    }
}

/// BTS-1 / FTS-1: the field after the segment name (whatever the delimiter).
fn first_field(segment: &str) -> String {
    let mut chars = segment.chars().skip(3);
    match chars.next() {
        Some(separator) => chars.take_while(|c| *c != separator).collect(),
        None => String::new(),
    }
}

/// Trailers that declare counts must match what arrived: a mismatch is a truncated or
/// corrupted batch, and taking part of it would be taking something else than was sent.
fn check_counts(batch: &Batch) -> Option<String> {
    for (n, group) in batch.groups.iter().enumerate() {
        if let Some(declared) = group.declared.as_deref().map(str::trim)
            && !declared.is_empty()
            && declared.parse::<usize>().ok() != Some(group.messages.len())
        {
            return Some(format!(
                "BTS-1 of batch {} does not match the {} messages it holds",
                n + 1,
                group.messages.len()
            ));
        }
    }
    if let Some(declared) = batch.declared_groups.as_deref().map(str::trim)
        && !declared.is_empty()
        && declared.parse::<usize>().ok() != Some(batch.groups.len())
    {
        return Some(format!(
            "FTS-1 does not match the {} batches the file holds",
            batch.groups.len()
        ));
    }
    None
}

fn envelope_segment(name: &str, original: &Envelope, comment: &str, out: &mut String) {
    let f = original.encoding.field;
    out.push_str(name);
    out.push(f);
    out.push_str(&original.encoding.characters);
    for field in [
        original.receiving_application.as_str(),
        original.receiving_facility.as_str(),
        original.sending_application.as_str(),
        original.sending_facility.as_str(),
        &ack::timestamp_now(),
        "",
        "",
        &escape(comment, &original.encoding),
        &ack::next_control_id(),
        original.control_id.as_str(),
    ] {
        out.push(f);
        out.push_str(field);
    }
    out.push('\r');
}

/// The answer to a batch: `acks` holds one acknowledgement per message, in order (each as
/// `ack::build` makes it). `comment` (no patient data) goes to BHS-10/BTS-2 of each batch.
pub fn reply(batch: &Batch, first: Option<&MshHeader>, acks: &[Bytes], comment: &str) -> Bytes {
    let default = first.map_or_else(Envelope::default, Envelope::from_message);
    let mut out = String::with_capacity(256 + acks.iter().map(Bytes::len).sum::<usize>());
    if let Some(file) = &batch.file {
        envelope_segment("FHS", file, comment, &mut out);
    }
    let mut acks = acks.iter();
    let groups: Vec<Group> = if batch.groups.is_empty() {
        vec![Group::default()]
    } else {
        batch.groups.clone()
    };
    for group in &groups {
        let header = group
            .header
            .as_ref()
            .or(batch.file.as_ref())
            .unwrap_or(&default);
        let envelope = Envelope {
            control_id: group
                .header
                .as_ref()
                .map(|h| h.control_id.clone())
                .unwrap_or_default(),
            ..header.clone()
        };
        envelope_segment("BHS", &envelope, comment, &mut out);
        let f = envelope.encoding.field;
        let mut count = 0usize;
        for _ in &group.messages {
            if let Some(ack) = acks.next() {
                out.push_str(&String::from_utf8_lossy(ack));
                count += 1;
            }
        }
        out.push_str(&format!(
            "BTS{f}{count}{f}{}\r",
            escape(comment, &envelope.encoding)
        ));
    }
    if let Some(file) = &batch.file {
        let f = file.encoding.field;
        out.push_str(&format!("FTS{f}{}\r", groups.len()));
    }
    Bytes::from(out)
}

/// The MSH of a batch's first readable message, for an answer that has no envelope of its own.
pub fn first_header(batch: &Batch) -> Option<MshHeader> {
    batch
        .messages()
        .find_map(|m| read_header(&String::from_utf8_lossy(m)).ok())
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
