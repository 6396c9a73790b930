//! What can go wrong with a WASM transform, and which of those are the operator's (a config
//! error on the `module` setting) and which concern one record (dead-letter or task failure).

use medconnect_api::ConnectError;

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("cannot read WASM module {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid WebAssembly module: {message}")]
    Compile { path: String, message: String },
    #[error(
        "{path} imports {import}: WASM transforms get no host functions (no WASI, file system, network or clock); build the module without imports"
    )]
    Import { path: String, import: String },
    #[error("{path} does not export `{name}` as {wanted} (see plugins/ABI.md)")]
    Export {
        path: String,
        name: String,
        wanted: String,
    },
    #[error(
        "{path} speaks medconnect ABI version {found}; this worker speaks version {expected}: rebuild it with a matching SDK"
    )]
    AbiVersion {
        path: String,
        found: i32,
        expected: i32,
    },
    #[error("cannot instantiate {path}: {message}")]
    Instantiate { path: String, message: String },
    #[error("the WASM engine could not start: {0}")]
    Engine(String),
    #[error("the module rejected its configuration: {0}")]
    Configure(String),
    #[error("the transform exceeded its time limit of {0} ms (timeout.ms)")]
    Timeout(u64),
    #[error("the transform exceeded its memory limit of {0} bytes (memory.max.bytes)")]
    Memory(u64),
    #[error("the transform trapped: {0}")]
    Trap(String),
    #[error("the transform broke the ABI: {0}")]
    Protocol(String),
}

impl WasmError {
    /// A short cause for logs and metrics: never the record, never the guest's own message.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Compile { .. } => "compile",
            Self::Import { .. } => "import",
            Self::Export { .. } => "export",
            Self::AbiVersion { .. } => "abi-version",
            Self::Instantiate { .. } => "instantiate",
            Self::Engine(_) => "engine",
            Self::Configure(_) => "configure",
            Self::Timeout(_) => "timeout",
            Self::Memory(_) => "memory",
            Self::Trap(_) => "trap",
            Self::Protocol(_) => "protocol",
        }
    }

    /// While building the transform (validation, task start) every failure is the module's
    /// or its settings' fault, so it is reported on the setting to fix.
    pub fn at_setup(self) -> ConnectError {
        let field = match self {
            Self::Configure(_) => "config",
            _ => "module",
        };
        ConnectError::config(field, self.to_string())
    }

    /// While transforming a record: the record fails (`Data`), except when no instance can be
    /// had at all, which the next attempt may cure.
    pub fn at_record(self) -> ConnectError {
        match self {
            Self::Instantiate { .. } | Self::Engine(_) => ConnectError::retriable(self.to_string()),
            _ => ConnectError::data(self.to_string()),
        }
    }
}
