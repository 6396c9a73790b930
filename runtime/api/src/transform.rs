//! Single-message transforms.

use crate::{ConnectResult, Props, Record};

/// A single-message transform: called once per record on the task's thread, so it must be
/// cheap. `Ok(None)` drops the record; an error fails the record (dead-letter topic or task
/// failure according to `errors.tolerance`).
pub trait Transform: Send {
    fn apply(&mut self, record: Record) -> ConnectResult<Option<Record>>;

    /// Releases what the transform holds (a WASM instance, a cache) when the task stops.
    fn close(&mut self) {}
}

/// Builds a transform from its `transforms.<alias>.*` settings (prefix stripped).
pub type TransformFactory = fn(&Props) -> ConnectResult<Box<dyn Transform>>;
