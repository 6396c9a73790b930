//! The built-in connectors, registered for the `medconnect` binary and for tests and
//! benchmarks that run workers in-process. They live here, not in `medconnect-runtime`, so the
//! engine depends on the connector API only and never on a connector crate.

use std::sync::Arc;

use medconnect_runtime::Plugins;

/// The allocator of every program that links the built-in connectors (the `medconnect`
/// binary, the benches, in-process tests). glibc's malloc was a quarter of the MLLP listener's
/// CPU at full rate: records are allocated on connection tasks and freed on the pipeline's
/// thread, the cross-thread pattern glibc's arenas handle worst.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The connectors built into the `medconnect` binary: the datagen source, the file source and
/// sink, the HL7 MLLP source and sink, the Elasticsearch/OpenSearch sink, the PostgreSQL sink,
/// query source and CDC source, the MQTT broker source, listener source and sink, and the FHIR
/// polling source, subscription source and sink. Add more with [`Plugins::with_source`] and
/// [`Plugins::with_sink`].
pub fn builtin_plugins() -> Plugins {
    Plugins::default()
        .with_source(Arc::new(medconnect_datagen::DatagenSourceConnector))
        .with_source(Arc::new(medconnect_file::FileSourceConnector))
        .with_sink(Arc::new(medconnect_file::FileSinkConnector))
        .with_source(Arc::new(medconnect_hl7::MllpSourceConnector))
        .with_sink(Arc::new(medconnect_hl7::MllpSinkConnector))
        .with_sink(Arc::new(
            medconnect_elasticsearch::ElasticsearchSinkConnector,
        ))
        .with_sink(Arc::new(medconnect_postgres::PostgresSinkConnector))
        .with_source(Arc::new(medconnect_postgres::PostgresSourceConnector))
        .with_source(Arc::new(medconnect_postgres::PostgresCdcSourceConnector))
        .with_source(Arc::new(medconnect_mqtt::MqttBrokerSourceConnector))
        .with_source(Arc::new(medconnect_mqtt::MqttListenerSourceConnector))
        .with_sink(Arc::new(medconnect_mqtt::MqttSinkConnector))
        .with_source(Arc::new(medconnect_fhir::FhirSourceConnector))
        .with_source(Arc::new(medconnect_fhir::FhirSubscriptionSourceConnector))
        .with_sink(Arc::new(medconnect_fhir::FhirSinkConnector))
}
