//! WASM transforms: user-written single-message transforms compiled to WebAssembly and run
//! sandboxed by wasmtime, following the guest ABI in `plugins/ABI.md`.
//!
//! `transforms.<alias>.type=wasm`, `.module=<path>`, `.memory.max.bytes`, `.timeout.ms`, and
//! `.config.<key>` settings handed to the guest's `medconnect_configure`.

mod abi;
mod error;
mod host;
mod limits;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, Props, Record, Transform,
    Validator,
};

use self::abi::Outcome;
use self::host::{Guest, LoadedModule};
pub use self::limits::Limits;
use super::TransformPlugin;

pub const CLASS: &str = "io.medconnect.transforms.Wasm";
const CONFIG_PREFIX: &str = "config.";

fn config_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(
            "module",
            ConfigType::String,
            Importance::High,
            "Path of the WebAssembly module (.wasm, or .wat text) on the worker, relative to the worker's working directory unless absolute.",
        )
        .with_validator(Validator::NonEmpty)
        .define(
            "memory.max.bytes",
            ConfigType::Long,
            limits::DEFAULT_MEMORY_BYTES.to_string(),
            Importance::Medium,
            "Largest linear memory the module may grow to; a grow past it fails the record.",
        )
        .with_validator(Validator::between(limits::MIN_MEMORY_BYTES as f64, limits::MAX_MEMORY_BYTES as f64))
        .define(
            "timeout.ms",
            ConfigType::Long,
            limits::DEFAULT_TIMEOUT_MS.to_string(),
            Importance::Medium,
            "Wall-clock limit for one record; a call past it fails the record. 0 disables the limit (trusted modules only).",
        )
        .with_validator(Validator::between(0.0, 60_000.0))
}

pub fn plugin() -> TransformPlugin {
    TransformPlugin {
        class: CLASS,
        aliases: &["wasm", "Wasm"],
        config_def,
        create: |props| WasmTransform::new(props).map(|t| Box::new(t) as Box<dyn Transform>),
    }
}

/// Reads the limits from a transform's settings (prefix removed); defaults where absent.
fn limits(props: &Props) -> ConnectResult<Limits> {
    let number = |key: &str, default: u64| -> ConnectResult<u64> {
        props.get(key).map_or(Ok(default), |v| {
            v.trim().parse().map_err(|_| {
                ConnectError::config(key, format!("'{v}' is not a non-negative integer"))
            })
        })
    };
    let timeout_ms = number("timeout.ms", limits::DEFAULT_TIMEOUT_MS)?;
    Ok(Limits {
        memory_bytes: number("memory.max.bytes", limits::DEFAULT_MEMORY_BYTES)?,
        timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
    })
}

/// One task's WASM transform.
pub struct WasmTransform {
    module: String,
    guest: Guest,
}

impl WasmTransform {
    pub fn new(props: &Props) -> ConnectResult<Self> {
        let module = props
            .get("module")
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| {
                ConnectError::config("module", "a WASM transform needs the path of its module")
            })?
            .trim()
            .to_string();
        let limits = limits(props)?;
        let config: Props = props
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(CONFIG_PREFIX)
                    .map(|k| (k.to_string(), v.clone()))
            })
            .collect();
        let loaded: Arc<LoadedModule> = host::load(Path::new(&module), limits.timeout.is_some())
            .map_err(error::WasmError::at_setup)?;
        let guest = Guest::new(loaded, limits, &config).map_err(error::WasmError::at_setup)?;
        Ok(Self { module, guest })
    }
}

impl Transform for WasmTransform {
    fn apply(&mut self, record: Record) -> ConnectResult<Option<Record>> {
        let answer = self.guest.call(&abi::encode_record(&record)).map_err(|e| {
            // The cause and the module only: the record is patient data.
            tracing::warn!(module = %self.module, cause = e.cause(), "WASM transform failed a record; its instance is rebuilt");
            e.at_record()
        })?;
        match abi::decode_outcome(&answer) {
            Ok(Outcome::Record(out)) => Ok(Some(out)),
            Ok(Outcome::Drop) => Ok(None),
            Ok(Outcome::Error(message)) => Err(ConnectError::data(format!(
                "the transform rejected the record: {message}"
            ))),
            Err(malformed) => Err(error::WasmError::Protocol(malformed.0).at_record()),
        }
    }
}

#[cfg(test)]
mod tests;
