//! HL7 v2 field access: `PID-5`-style addressing on a message's segments, with the
//! separators the message declares in MSH-1/MSH-2. Segments are kept as text, so fields a
//! transform does not touch come out byte for byte as they came in.

pub struct Message {
    segments: Vec<String>,
    /// The separator found between segments (`\r` by the standard, `\n` seen in practice).
    segment_separator: &'static str,
    field: char,
    component: char,
}

impl Message {
    /// Parses a message that starts with an MSH segment.
    pub fn parse(text: &str) -> Result<Message, String> {
        if !text.starts_with("MSH") || text.len() < 8 {
            return Err("not an HL7 v2 message: it does not start with an MSH segment".to_string());
        }
        let mut chars = text[3..].chars();
        let field = chars.next().unwrap_or('|');
        let component = chars.next().unwrap_or('^');
        let segment_separator = if text.contains('\r') { "\r" } else { "\n" };
        let trailing = text.ends_with(segment_separator);
        let mut segments: Vec<String> = text.split(segment_separator).map(str::to_string).collect();
        if trailing {
            segments.pop();
        }
        Ok(Message {
            segments,
            segment_separator,
            field,
            component,
        })
    }

    pub fn component_separator(&self) -> char {
        self.component
    }

    /// Splits `PID-5` into ("PID", 5).
    pub fn address(spec: &str) -> Option<(&str, usize)> {
        let mut parts = spec.splitn(2, '-');
        let segment = parts.next()?;
        let index = parts.next()?.parse().ok()?;
        if segment.len() == 3 && index > 0 {
            Some((segment, index))
        } else {
            None
        }
    }

    /// Where field `index` of a segment sits after splitting on the field separator: MSH-1
    /// *is* the separator, so MSH fields are shifted by one.
    fn position(segment: &str, index: usize) -> usize {
        if segment == "MSH" {
            index - 1
        } else {
            index
        }
    }

    /// The first occurrence of a field (`get("MSH", 9)`), if present.
    pub fn get(&self, segment: &str, index: usize) -> Option<&str> {
        let position = Self::position(segment, index);
        self.segments
            .iter()
            .find(|s| s.starts_with(segment) && s[segment.len()..].starts_with(self.field))
            .and_then(|s| s.split(self.field).nth(position))
    }

    /// Replaces a field in every segment of that name that has it; returns how many.
    pub fn replace(&mut self, segment: &str, index: usize, mut with: impl FnMut(&str) -> String) -> usize {
        let position = Self::position(segment, index);
        let field = self.field;
        let mut replaced = 0;
        for s in self.segments.iter_mut() {
            if !(s.starts_with(segment) && s[segment.len()..].starts_with(field)) {
                continue;
            }
            let mut fields: Vec<String> = s.split(field).map(str::to_string).collect();
            if position < fields.len() && !fields[position].is_empty() && position > 0 {
                fields[position] = with(&fields[position]);
                replaced += 1;
                *s = fields.join(&field.to_string());
            }
        }
        replaced
    }

    pub fn to_text(&self) -> String {
        let mut out = self.segments.join(self.segment_separator);
        out.push_str(self.segment_separator);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_addressed_as_in_the_standard() {
        let text = "MSH|^~\\&|EPIC|ICU|||202401011200||ADT^A01|1|P|2.5\rPID|1||MRN1||DOE^JANE||19800101|F\r";
        let mut message = Message::parse(text).unwrap();
        assert_eq!(message.get("MSH", 9), Some("ADT^A01"));
        assert_eq!(message.get("PID", 5), Some("DOE^JANE"));
        assert_eq!(message.replace("PID", 7, |_| "X".into()), 1);
        assert_eq!(message.replace("PID", 19, |_| "X".into()), 0);
        assert!(message.to_text().contains("PID|1||MRN1||DOE^JANE||X|F\r"));
        assert_eq!(Message::address("PID-19"), Some(("PID", 19)));
    }
}
