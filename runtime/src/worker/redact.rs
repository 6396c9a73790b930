//! How settings show in `Debug` output (and so in any log line that prints a config): the
//! values of settings named like secrets ([`medconnect_api::is_secret_name`], the rule REST
//! answers follow too) are replaced by `[hidden]` ([`SecretsHidden`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};

pub use medconnect_api::SecretsHidden;
use serde::Deserialize;

/// A Kafka client section of the worker config (`[kafka]`, `[producer]`, `[consumer]`,
/// `[admin]`): a map of librdkafka settings, which include `sasl.password` and
/// `ssl.key.password`; its `Debug` hides them.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct ClientSettings(pub BTreeMap<String, toml::Value>);

impl Deref for ClientSettings {
    type Target = BTreeMap<String, toml::Value>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for ClientSettings {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SecretsHidden(&self.0).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use crate::WorkerConfig;

    #[test]
    fn worker_and_kafka_settings_hide_secrets_in_debug_output() {
        let config = WorkerConfig::from_toml(
            r#"
            bootstrap_servers = "k:9092"
            [kafka]
            "security.protocol" = "SASL_SSL"
            "sasl.username" = "medconnect"
            "sasl.password" = "planted-kafka-password"
            "sasl.jaas.config" = "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"planted-jaas\";"
            [producer]
            "ssl.key.password" = "planted-key-password"
            [consumer]
            "ssl.keystore.password" = "planted-keystore-password"
            [admin]
            "sasl.oauthbearer.client.secret" = "planted-oauth-secret"
            "ssl.key.pem" = "planted-pem"
            "#,
        )
        .unwrap();
        let settings = config.kafka_settings();
        for shown in [
            format!("{config:?}"),
            format!("{config:#?}"),
            format!("{settings:?}"),
            format!("{settings:#?}"),
        ] {
            assert!(!shown.contains("planted"), "{shown}");
            assert!(
                shown.contains("SASL_SSL"),
                "other settings still show: {shown}"
            );
            assert!(shown.contains("[hidden]"), "{shown}");
        }
        let config = medconnect_api::props_from(&[
            ("connection.password", "planted-connector-password"),
            ("topic", "vitals"),
        ]);
        let context = medconnect_api::ConnectorContext {
            connector_name: "c".into(),
            config: config.clone(),
        };
        let entry = crate::store::ConnectorEntry {
            config: config.clone(),
            tasks: vec![config],
            ..Default::default()
        };
        for shown in [format!("{context:?}"), format!("{entry:#?}")] {
            assert!(!shown.contains("planted"), "{shown}");
            assert!(shown.contains("vitals"), "{shown}");
        }
        // The clients still get the values.
        assert_eq!(settings.common["sasl.password"], "planted-kafka-password");
        assert_eq!(
            settings
                .producer_config(&Default::default())
                .get("ssl.key.password"),
            Some("planted-key-password")
        );
    }
}
