//! The guest ABI's binary encoding (plugins/ABI.md, version 1): what the host writes into guest
//! memory and how it reads the guest's answer. Decoding never trusts the guest: every length
//! is checked against the bytes actually returned.

use bytes::Bytes;
use medconnect_api::{Headers, Props, Record};

/// The ABI version this host speaks; a module's `medconnect_abi_version()` must return it.
pub const ABI_VERSION: i32 = 1;

pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ALLOC: &str = "alloc";
pub const EXPORT_VERSION: &str = "medconnect_abi_version";
pub const EXPORT_TRANSFORM: &str = "medconnect_transform";
pub const EXPORT_CONFIGURE: &str = "medconnect_configure";

const STATUS_RECORD: u8 = 0;
const STATUS_DROP: u8 = 1;
const STATUS_ERROR: u8 = 2;
/// `configure` answers `STATUS_OK` (the same byte as a record) when it accepts its settings.
const STATUS_OK: u8 = STATUS_RECORD;

const FLAG_TIMESTAMP: u8 = 1;

/// What a guest's `medconnect_transform` decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Record(Record),
    Drop,
    Error(String),
}

/// The guest answered bytes that do not follow the ABI.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct Malformed(pub String);

/// Splits the `i64` a guest returns into the `(ptr, len)` of its answer in guest memory.
pub fn unpack(packed: i64) -> (u32, u32) {
    let bits = packed as u64;
    ((bits >> 32) as u32, bits as u32)
}

pub fn encode_record(record: &Record) -> Vec<u8> {
    let size = 32
        + record.topic.len()
        + record.key.as_ref().map_or(0, Bytes::len)
        + record.value.as_ref().map_or(0, Bytes::len)
        + record
            .headers
            .iter()
            .map(|(n, v)| 8 + n.len() + v.map_or(0, Bytes::len))
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    put_str(&mut out, &record.topic);
    out.extend_from_slice(&record.partition.unwrap_or(-1).to_le_bytes());
    out.push(if record.timestamp.is_some() {
        FLAG_TIMESTAMP
    } else {
        0
    });
    out.extend_from_slice(&record.timestamp.unwrap_or(0).to_le_bytes());
    put_opt(&mut out, record.key.as_deref());
    put_opt(&mut out, record.value.as_deref());
    out.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
    for (name, value) in record.headers.iter() {
        put_str(&mut out, name);
        put_opt(&mut out, value.map(|v| v.as_ref()));
    }
    out
}

/// The transform's `config.*` settings, prefix removed, for `medconnect_configure`.
pub fn encode_config(config: &Props) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(config.len() as u32).to_le_bytes());
    for (key, value) in config {
        put_str(&mut out, key);
        put_str(&mut out, value);
    }
    out
}

pub fn decode_outcome(bytes: &[u8]) -> Result<Outcome, Malformed> {
    let mut reader = Reader { bytes, at: 0 };
    let outcome = match reader.u8()? {
        STATUS_RECORD => Outcome::Record(reader.record()?),
        STATUS_DROP => Outcome::Drop,
        STATUS_ERROR => Outcome::Error(reader.string()?),
        other => return Err(Malformed(format!("unknown status byte {other}"))),
    };
    reader.finish()?;
    Ok(outcome)
}

/// `Ok(None)`: configuration accepted; `Ok(Some(message))`: the guest rejected it.
pub fn decode_configured(bytes: &[u8]) -> Result<Option<String>, Malformed> {
    let mut reader = Reader { bytes, at: 0 };
    let answer = match reader.u8()? {
        STATUS_OK => None,
        STATUS_ERROR => Some(reader.string()?),
        other => return Err(Malformed(format!("unknown status byte {other}"))),
    };
    reader.finish()?;
    Ok(answer)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as i32).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                Malformed(format!(
                    "answer truncated at byte {} (needs {n} more)",
                    self.at
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_le_bytes)
    }

    fn i32(&mut self) -> Result<i32, Malformed> {
        self.array().map(i32::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, Malformed> {
        self.array().map(i64::from_le_bytes)
    }

    fn string(&mut self) -> Result<String, Malformed> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed("a string is not UTF-8".into()))
    }

    fn optional(&mut self) -> Result<Option<Bytes>, Malformed> {
        match self.i32()? {
            -1 => Ok(None),
            len if len < 0 => Err(Malformed(format!("negative length {len}"))),
            len => Ok(Some(Bytes::copy_from_slice(self.take(len as usize)?))),
        }
    }

    fn record(&mut self) -> Result<Record, Malformed> {
        let topic = self.string()?;
        let partition = Some(self.i32()?).filter(|p| *p >= 0);
        let flags = self.u8()?;
        let timestamp = self.i64()?;
        let key = self.optional()?;
        let value = self.optional()?;
        let count = self.u32()?;
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = self.string()?;
            headers.push((name, self.optional()?));
        }
        Ok(Record {
            topic,
            partition,
            key,
            value,
            headers: headers.into_iter().collect::<Headers>(),
            timestamp: (flags & FLAG_TIMESTAMP != 0).then_some(timestamp),
        })
    }

    fn finish(&self) -> Result<(), Malformed> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(Malformed(format!(
                "{} trailing bytes after the answer",
                self.bytes.len() - self.at
            )))
        }
    }
}

#[cfg(test)]
#[path = "abi_fuzz.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(record: &Record) -> Vec<u8> {
        let mut bytes = vec![STATUS_RECORD];
        bytes.extend(encode_record(record));
        bytes
    }

    #[test]
    fn a_record_survives_the_round_trip_with_nulls_and_repeated_headers() {
        let mut record = Record::new("adt")
            .with_key("MRN1")
            .with_value("MSH|^~\\&|")
            .with_header("content-type", "application/hl7-v2")
            .with_header("content-type", "x")
            .with_timestamp(1_700_000_000_123);
        record.headers.add_null("trace");
        record.partition = Some(3);
        assert_eq!(
            decode_outcome(&answer(&record)),
            Ok(Outcome::Record(record))
        );

        let bare = Record::new("");
        assert_eq!(decode_outcome(&answer(&bare)), Ok(Outcome::Record(bare)));
    }

    #[test]
    fn drop_and_error_answers_decode() {
        assert_eq!(decode_outcome(&[STATUS_DROP]), Ok(Outcome::Drop));
        let mut error = vec![STATUS_ERROR, 3, 0, 0, 0];
        error.extend_from_slice(b"bad");
        assert_eq!(decode_outcome(&error), Ok(Outcome::Error("bad".into())));
        assert_eq!(decode_configured(&[STATUS_OK]), Ok(None));
    }

    #[test]
    fn garbage_from_a_guest_is_an_error_not_a_panic() {
        let record = answer(&Record::new("t").with_value("v"));
        for cut in 0..record.len() {
            assert!(decode_outcome(&record[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_outcome(&[9]).is_err());
        assert!(decode_outcome(&[STATUS_DROP, 0]).is_err());
        let mut huge = vec![STATUS_ERROR];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_outcome(&huge).is_err());
    }

    #[test]
    fn packed_results_split_into_pointer_and_length() {
        assert_eq!(unpack((0x1234_i64 << 32) | 0x10), (0x1234, 0x10));
        assert_eq!(unpack(-1), (u32::MAX, u32::MAX));
    }
}
