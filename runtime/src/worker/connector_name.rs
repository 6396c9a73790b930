//! Which connector names are acceptable, as Kafka Connect decides it.
//!
//! Connect trims the name given to `POST /connectors` and validates it with
//! `ConfigDef.NonEmptyStringWithoutControlChars`: not empty, and no ISO control character
//! (U+0000..U+001F, U+007F..U+009F; Java's `Character.isISOControl`). medconnect also refuses
//! '/', since a name is a path segment of every `/connectors/{name}/...` URL. A name with a
//! control character would otherwise reach record keys, HTTP headers (`Location`) and log
//! lines raw.

/// Trims as Connect does (Java's `String.trim`): every char up to U+0020 at either end, which
/// is not Rust's `trim` (Unicode white space, e.g. U+0085, but not NUL).
pub fn trim(name: &str) -> &str {
    name.trim_matches(|c| c <= ' ')
}

/// Why a name is refused, worded as Connect words it.
pub fn check(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Connector name is invalid: String may not be empty".into());
    }
    let controls: Vec<String> = name
        .chars()
        .filter(|c| c.is_control())
        .map(|c| u32::from(c).to_string())
        .collect();
    if !controls.is_empty() {
        return Err(format!(
            "Connector name is invalid: String may not contain control sequences but had the following ASCII chars: {}",
            controls.join(", ")
        ));
    }
    if name.contains('/') {
        return Err("Connector name is invalid: it may not contain '/'".into());
    }
    Ok(())
}

/// `name` as one percent-encoded URL path segment (for `Location: /connectors/{name}`).
pub fn path_segment(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rules() {
        assert!(check("vitals-generator.v2 (icu)").is_ok());
        assert!(check("Überwachung").is_ok());
        assert!(check("").is_err());
        let newline = check("a\nb").unwrap_err();
        assert!(newline.contains("ASCII chars: 10"), "{newline}");
        // C1 controls are ISO control characters too.
        assert!(check("a\u{85}b").is_err());
        assert!(check("a\u{7f}").is_err());
        assert!(check("a/b").is_err());
    }

    #[test]
    fn trims_as_java_does() {
        assert_eq!(trim(" \n\u{0}name\t "), "name");
        assert_eq!(trim("name\u{85}"), "name\u{85}");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(path_segment("a b/ü"), "a%20b%2F%C3%BC");
        assert_eq!(path_segment("plain-name_1.x~"), "plain-name_1.x~");
    }
}
