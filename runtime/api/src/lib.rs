//! The connector API of medconnect.
//!
//! Connectors depend on this crate only: the record model, the source and sink traits, the
//! `ConfigDef` that declares and validates their settings, the `Transform` trait and the
//! error type that tells retriable from fatal failures. The engine (`medconnect-runtime`)
//! drives these traits; nothing here knows about Kafka clients or the REST API.

pub mod acknowledgements;
pub mod config;
pub mod connector;
pub mod error;
pub mod limits;
pub mod net;
pub mod record;
pub mod relay;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transform;

pub use config::{
    ConfigDef, ConfigKey, ConfigType, ConfigValue, Importance, ParsedConfig, Props, SecretsHidden,
    Validator, is_secret_name, props_from,
};
pub use connector::{
    Connector, ConnectorContext, ConnectorKind, ErrantRecordHandler, ErrantRecordReporter,
    ErrantReport, OffsetReader, PartitionControl, Placement, SinkConnector, SinkOffsets,
    SinkPartitions, SinkTask, SinkTaskContext, SourceConnector, SourceTask, SourceTaskContext,
    TaskConfig, TopicPartition,
};
pub use error::{ConnectError, ConnectResult, PeerText};
pub use record::{
    AckHandle, Delivery, HeaderName, Headers, Record, SinkRecord, SourceOffset, SourcePartition,
    SourceRecord, content_type,
};
pub use transform::Transform;
