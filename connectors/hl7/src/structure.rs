//! The segment structure of an HL7 v2 message and its key, read as `hl7-parser` 0.3 reads
//! them but without building its tree (fields, repeats, components, subcomponents, each a
//! `Vec`) for every segment: at full rate that tree was 16 % of the MLLP bench's CPU, for a
//! message whose value is kept as raw bytes anyway.
//!
//! The grammar (hl7-parser's `parser::message`): the MSH segment up to the first segment
//! separator; then at most one separator, and segments joined by single separators, each
//! three alphanumeric characters, the field separator and anything up to the next separator.
//! Reading stops before the first separator not followed by a segment. The separator is `\r`;
//! with lenient newlines also `\r\n` and `\n`. `structure_tests.rs` checks this module against
//! hl7-parser's full parse on generated messages. One difference, on purpose: a segment name
//! is three alphanumeric characters, where hl7-parser (a nom quirk: the name measured in
//! bytes, taken in characters) also took `aé|` for one.

use hl7_parser::message::Separators;
use hl7_parser::query::LocationQuery;

/// The segments of a message in order, MSH first, as hl7-parser reads them. Once the
/// iterator is done, [`Segments::end`] is the byte where reading stopped: anything after it
/// but separators makes the message invalid.
pub struct Segments<'a> {
    text: &'a str,
    field: char,
    lenient_newlines: bool,
    state: State,
    end: usize,
}

#[derive(Clone, Copy)]
enum State {
    Msh,
    /// After the MSH: a segment may start here (past at most one separator).
    First(usize),
    /// After a segment: a separator and a segment may follow.
    Next,
    Done,
}

impl<'a> Segments<'a> {
    /// `text` starts with `MSH` and the delimiters [`crate::message::split_msh`] accepted.
    pub fn new(text: &'a str, field: char, lenient_newlines: bool) -> Self {
        Self {
            text,
            field,
            lenient_newlines,
            state: State::Msh,
            end: 0,
        }
    }

    /// Where reading stopped (meaningful once the iterator returned `None`).
    pub fn end(&self) -> usize {
        self.end
    }

    fn is_newline(&self, byte: u8) -> bool {
        byte == b'\r' || (self.lenient_newlines && byte == b'\n')
    }

    /// The end of the line starting at `from`: its first segment separator, or the text's end.
    fn line_end(&self, from: usize) -> usize {
        self.text.as_bytes()[from..]
            .iter()
            .position(|b| self.is_newline(*b))
            .map_or(self.text.len(), |at| from + at)
    }

    /// The length of the segment separator at `at`, 0 when there is none.
    fn separator_len(&self, at: usize) -> usize {
        let rest = &self.text.as_bytes()[at..];
        match rest {
            [b'\r', b'\n', ..] if self.lenient_newlines => 2,
            [b'\n', ..] if self.lenient_newlines => 1,
            [b'\r', ..] => 1,
            _ => 0,
        }
    }

    /// The end of a segment starting at `at`, if one does: three alphanumeric characters
    /// (Unicode's, as hl7-parser's `char::is_alphanumeric`) and the field separator.
    fn segment_at(&self, at: usize) -> Option<usize> {
        let mut chars = self.text[at..].char_indices();
        for _ in 0..3 {
            chars.next().filter(|(_, c)| c.is_alphanumeric())?;
        }
        let (offset, separator) = chars.next()?;
        (separator == self.field).then(|| self.line_end(at + offset + separator.len_utf8()))
    }

    fn segment_from(&mut self, start: usize) -> Option<&'a str> {
        match self.segment_at(start) {
            Some(end) => {
                self.end = end;
                self.state = State::Next;
                Some(&self.text[start..end])
            }
            None => {
                self.state = State::Done;
                None
            }
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match self.state {
            State::Msh => {
                let end = self.line_end(0);
                self.end = end;
                self.state = State::First(end + self.separator_len(end));
                Some(&self.text[..end])
            }
            State::First(start) => {
                self.end = start;
                self.segment_from(start)
            }
            State::Next => {
                let separator = self.separator_len(self.end);
                if separator == 0 {
                    self.state = State::Done;
                    return None;
                }
                self.segment_from(self.end + separator)
            }
            State::Done => None,
        }
    }
}

/// The segment's name: what precedes its first field separator.
pub fn name(segment: &str, field: char) -> &str {
    segment.split(field).next().unwrap_or("")
}

/// The raw value `query` points at within `segment` (a line [`Segments`] returned, named as
/// the query's segment; `first` when it is the message's header), as hl7-parser's
/// `Message::query` reads it.
pub fn key(
    segment: &str,
    first: bool,
    separators: Separators,
    query: &LocationQuery,
) -> Option<String> {
    if first {
        // MSH-1 and MSH-2 are the delimiters, numbered so only by hl7-parser's MSH reader (a
        // later MSH segment is read as any other); a key in the MSH is rare, so it is parsed.
        let msh =
            hl7_parser::Message::parse_with_lenient_newlines(segment, separators.lenient_newlines)
                .ok()?;
        return msh
            .query(query.clone())
            .map(|value| value.raw_value().to_string());
    }
    split_value(segment, separators, query).map(str::to_string)
}

/// The queried value in a segment other than the header. hl7-parser's nesting (a field is
/// repeats split by `~`, a repeat components split by `^`, a component subcomponents split
/// by `&`, each level ending at any higher separator) is splitting at each level in turn.
fn split_value<'a>(
    segment: &'a str,
    separators: Separators,
    query: &LocationQuery,
) -> Option<&'a str> {
    let Some(field) = query.field else {
        return Some(segment);
    };
    let (_name, fields) = segment.split_once(separators.field)?;
    let field = nth(fields, separators.field, field)?;
    if query.component.is_none() && query.repeat.is_none() {
        return Some(field);
    }
    let repeat = nth(field, separators.repetition, query.repeat.unwrap_or(1))?;
    let Some(component) = query.component else {
        return Some(repeat);
    };
    let component = nth(repeat, separators.component, component)?;
    match query.subcomponent {
        Some(subcomponent) => nth(component, separators.subcomponent, subcomponent),
        None => Some(component),
    }
}

/// The `number`th (1-based; 0 is none) piece of `text` split at `separator`.
fn nth(text: &str, separator: char, number: usize) -> Option<&str> {
    text.split(separator).nth(number.checked_sub(1)?)
}

#[cfg(test)]
#[path = "structure_tests.rs"]
mod tests;
