//! Write a medconnect single-message transform in Rust and compile it to WebAssembly.
//!
//! ```ignore
//! use medconnect_guest::{export_transform, Error, Record};
//!
//! fn tag(mut record: Record) -> Result<Option<Record>, Error> {
//!     record.set_header("checked", "yes");
//!     Ok(Some(record))
//! }
//! export_transform!(tag);
//! ```
//!
//! A transform with settings implements [`Transform`] and is exported with
//! `export_transform!(configured MyTransform)`; its `configure` receives the connector's
//! `transforms.<alias>.config.*` settings. Build with
//! `--target wasm32-unknown-unknown --crate-type cdylib`. The ABI it implements is
//! `plugins/ABI.md` (version 1); the module imports nothing.

use std::collections::BTreeMap;
use std::fmt;

pub mod hash;
pub mod hl7;
pub mod json;

/// The ABI version this SDK implements.
pub const ABI_VERSION: i32 = 1;

/// The transform's settings: `transforms.<alias>.config.<key>` with the prefix removed.
pub type Config = BTreeMap<String, String>;

/// Why a record (or a configuration) is rejected. The message reaches the dead-letter
/// topic's `__connect.errors.exception.message` header: do not put patient data in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error(message.to_string())
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error(message)
    }
}

/// A Kafka record as the transform sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    /// `None`: the producer's partitioner decides.
    pub partition: Option<i32>,
    /// Milliseconds since the epoch.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In order; a name may repeat; a value may be null.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Record {
    pub fn new(topic: &str) -> Self {
        Record {
            topic: topic.to_string(),
            ..Record::default()
        }
    }

    /// The last value of a header, as Kafka clients read it.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Replaces every header of this name with one value.
    pub fn set_header(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.to_string(), Some(value.into())));
    }

    pub fn remove_header(&mut self, name: &str) {
        self.headers.retain(|(n, _)| n != name);
    }

    /// The value as UTF-8 text, if it is.
    pub fn value_str(&self) -> Option<&str> {
        self.value.as_deref().and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `content-type` header (`application/hl7-v2`, `application/json`, ...).
    pub fn content_type(&self) -> Option<&str> {
        self.header_str("content-type")
    }

    /// Whether the value is an HL7 v2 message: by content type, or by its `MSH|` start.
    pub fn is_hl7(&self) -> bool {
        match self.content_type() {
            Some(ct) => ct.starts_with("application/hl7-v2"),
            None => self.value.as_deref().map_or(false, |v| v.starts_with(b"MSH|")),
        }
    }
}

/// A transform with settings, and state kept across records.
pub trait Transform: Sized {
    /// Called once per instance before the first record; an error makes the connector invalid.
    fn configure(config: &Config) -> Result<Self, Error>;

    /// `Ok(None)` drops the record; `Err` fails it (dead-letter topic or task failure).
    fn transform(&mut self, record: Record) -> Result<Option<Record>, Error>;
}

/// Generates the module's exports (`alloc`, `medconnect_abi_version`,
/// `medconnect_transform`, `medconnect_configure`) for a function
/// `fn(Record) -> Result<Option<Record>, Error>`, or, with `configured`, for a type that
/// implements [`Transform`]. Use it once, in the crate compiled as `cdylib`.
#[macro_export]
macro_rules! export_transform {
    (configured $ty:ty) => {
        ::std::thread_local! {
            static MEDCONNECT_STATE: ::std::cell::RefCell<::std::option::Option<$ty>> =
                ::std::cell::RefCell::new(::std::option::Option::None);
        }

        #[no_mangle]
        pub extern "C" fn medconnect_configure(ptr: i32, len: i32) -> i64 {
            let input = unsafe { $crate::__private::take_input(ptr, len) };
            $crate::__private::configure(&input, |config| {
                let state = <$ty as $crate::Transform>::configure(config)?;
                MEDCONNECT_STATE.with(|s| *s.borrow_mut() = ::std::option::Option::Some(state));
                ::std::result::Result::Ok(())
            })
        }

        #[no_mangle]
        pub extern "C" fn medconnect_transform(ptr: i32, len: i32) -> i64 {
            let input = unsafe { $crate::__private::take_input(ptr, len) };
            $crate::__private::transform(&input, |record| {
                MEDCONNECT_STATE.with(|s| match s.borrow_mut().as_mut() {
                    ::std::option::Option::Some(state) => $crate::Transform::transform(state, record),
                    ::std::option::Option::None => ::std::result::Result::Err($crate::Error::new(
                        "the transform was not configured",
                    )),
                })
            })
        }

        $crate::__export_common!();
    };
    ($function:path) => {
        #[no_mangle]
        pub extern "C" fn medconnect_transform(ptr: i32, len: i32) -> i64 {
            let input = unsafe { $crate::__private::take_input(ptr, len) };
            $crate::__private::transform(&input, $function)
        }

        $crate::__export_common!();
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_common {
    () => {
        #[no_mangle]
        pub extern "C" fn medconnect_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        #[no_mangle]
        pub extern "C" fn alloc(len: i32) -> i32 {
            $crate::__private::alloc(len)
        }
    };
}

/// The ABI plumbing the macro expands to. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;

    use super::{codec, Config, Error, Record};

    thread_local! {
        // The last answer: it must stay valid until the host has copied it, i.e. until the
        // next call, which replaces it.
        static ANSWER: RefCell<Vec<u8>> = RefCell::new(Vec::new());
    }

    /// A buffer of exactly `len` bytes handed to the host, who fills it with the input.
    pub fn alloc(len: i32) -> i32 {
        let buffer = vec![0u8; len.max(0) as usize].into_boxed_slice();
        Box::into_raw(buffer) as *mut u8 as usize as i32
    }

    /// Takes back ownership of a buffer made by [`alloc`].
    ///
    /// # Safety
    /// `ptr` and `len` must come from one call of [`alloc`], taken back once.
    pub unsafe fn take_input(ptr: i32, len: i32) -> Box<[u8]> {
        let slice = std::ptr::slice_from_raw_parts_mut(ptr as usize as *mut u8, len.max(0) as usize);
        Box::from_raw(slice)
    }

    fn answer(bytes: Vec<u8>) -> i64 {
        ANSWER.with(|a| {
            let mut a = a.borrow_mut();
            *a = bytes;
            ((a.as_ptr() as usize as u64) << 32 | a.len() as u64) as i64
        })
    }

    pub fn transform<F>(input: &[u8], function: F) -> i64
    where
        F: FnOnce(Record) -> Result<Option<Record>, Error>,
    {
        let outcome = match codec::decode_record(input) {
            Ok(record) => function(record),
            Err(error) => Err(error),
        };
        answer(codec::encode_outcome(outcome))
    }

    pub fn configure<F>(input: &[u8], function: F) -> i64
    where
        F: FnOnce(&Config) -> Result<(), Error>,
    {
        let result = codec::decode_config(input).and_then(|config| function(&config));
        answer(match result {
            Ok(()) => vec![0],
            Err(error) => codec::encode_error(&error),
        })
    }
}

/// The record encoding of ABI version 1 (see plugins/ABI.md), little-endian throughout.
pub mod codec {
    use super::{Config, Error, Record};

    const STATUS_RECORD: u8 = 0;
    const STATUS_DROP: u8 = 1;
    const STATUS_ERROR: u8 = 2;

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
            if n > self.bytes.len() - self.at {
                return Err(Error::new("the host sent a truncated record"));
            }
            let slice = &self.bytes[self.at..self.at + n];
            self.at += n;
            Ok(slice)
        }
        fn u32(&mut self) -> Result<u32, Error> {
            let b = self.take(4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn i32(&mut self) -> Result<i32, Error> {
            self.u32().map(|v| v as i32)
        }
        fn i64(&mut self) -> Result<i64, Error> {
            let b = self.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok(i64::from_le_bytes(a))
        }
        fn string(&mut self) -> Result<String, Error> {
            let len = self.u32()? as usize;
            String::from_utf8(self.take(len)?.to_vec()).map_err(|_| Error::new("the host sent a non-UTF-8 string"))
        }
        fn optional(&mut self) -> Result<Option<Vec<u8>>, Error> {
            match self.i32()? {
                -1 => Ok(None),
                len if len < 0 => Err(Error::new("the host sent a negative length")),
                len => Ok(Some(self.take(len as usize)?.to_vec())),
            }
        }
    }

    pub fn decode_record(bytes: &[u8]) -> Result<Record, Error> {
        let mut r = Reader { bytes, at: 0 };
        let topic = r.string()?;
        let partition = r.i32()?;
        let flags = r.take(1)?[0];
        let timestamp = r.i64()?;
        let key = r.optional()?;
        let value = r.optional()?;
        let count = r.u32()?;
        let mut headers = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let name = r.string()?;
            headers.push((name, r.optional()?));
        }
        Ok(Record {
            topic,
            partition: if partition >= 0 { Some(partition) } else { None },
            timestamp: if flags & 1 != 0 { Some(timestamp) } else { None },
            key,
            value,
            headers,
        })
    }

    pub fn decode_config(bytes: &[u8]) -> Result<Config, Error> {
        let mut r = Reader { bytes, at: 0 };
        let count = r.u32()?;
        let mut config = Config::new();
        for _ in 0..count {
            let key = r.string()?;
            config.insert(key, r.string()?);
        }
        Ok(config)
    }

    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s);
    }

    fn put_opt(out: &mut Vec<u8>, b: &Option<Vec<u8>>) {
        match b {
            None => out.extend_from_slice(&(-1i32).to_le_bytes()),
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }

    pub fn encode_record(out: &mut Vec<u8>, record: &Record) {
        put_str(out, record.topic.as_bytes());
        out.extend_from_slice(&record.partition.unwrap_or(-1).to_le_bytes());
        out.push(if record.timestamp.is_some() { 1 } else { 0 });
        out.extend_from_slice(&record.timestamp.unwrap_or(0).to_le_bytes());
        put_opt(out, &record.key);
        put_opt(out, &record.value);
        out.extend_from_slice(&(record.headers.len() as u32).to_le_bytes());
        for (name, value) in &record.headers {
            put_str(out, name.as_bytes());
            put_opt(out, value);
        }
    }

    pub fn encode_error(error: &Error) -> Vec<u8> {
        let mut out = vec![STATUS_ERROR];
        put_str(&mut out, error.0.as_bytes());
        out
    }

    pub fn encode_outcome(outcome: Result<Option<Record>, Error>) -> Vec<u8> {
        match outcome {
            Ok(Some(record)) => {
                let mut out = Vec::with_capacity(64 + record.value.as_ref().map_or(0, Vec::len));
                out.push(STATUS_RECORD);
                encode_record(&mut out, &record);
                out
            }
            Ok(None) => vec![STATUS_DROP],
            Err(error) => encode_error(&error),
        }
    }
}

/// Reads a list setting (`a, b,c`) into its trimmed, non-empty items.
pub fn list(config: &Config, key: &str) -> Vec<String> {
    config
        .get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_codec() {
        let record = Record {
            topic: "adt".into(),
            partition: Some(2),
            timestamp: Some(7),
            key: None,
            value: Some(b"MSH|".to_vec()),
            headers: vec![("a".into(), None), ("a".into(), Some(b"1".to_vec()))],
        };
        let mut bytes = Vec::new();
        codec::encode_record(&mut bytes, &record);
        assert_eq!(codec::decode_record(&bytes), Ok(record));
        assert!(codec::decode_record(&bytes[..bytes.len() - 1]).is_err());
    }
}
