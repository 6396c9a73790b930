//! How settings show in `Debug` output (and so in any log line that prints a config): the
//! values of settings named like secrets ([`medconnect_api::is_secret_name`], the rule REST
//! answers follow too) are replaced by `[hidden]` ([`SecretsHidden`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::sync::{PoisonError, RwLock};

pub use medconnect_api::SecretsHidden;
use serde::Deserialize;
use tracing_subscriber::fmt::MakeWriter;

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

/// Secret values this process knows (the resolved secret settings of every connector config
/// it resolved, the secret settings of its Kafka clients): log lines are written through
/// [`ScrubbedLogs`], which replaces them. The last line of defence: errors are scrubbed where
/// they are made, but a log line may quote an error no one scrubbed (a client library's).
static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Values shorter than this are not replaced (see `secrets::Scrubber`).
const SHORTEST_KNOWN: usize = 3;

/// Adds values to the ones every log line is scrubbed of.
pub fn remember<'a>(values: impl IntoIterator<Item = &'a str>) {
    let new: Vec<&str> = {
        let known = KNOWN.read().unwrap_or_else(PoisonError::into_inner);
        values
            .into_iter()
            .filter(|v| v.len() >= SHORTEST_KNOWN && !known.iter().any(|k| k == v))
            .collect()
    };
    if new.is_empty() {
        return;
    }
    let mut known = KNOWN.write().unwrap_or_else(PoisonError::into_inner);
    for value in new {
        if !known.iter().any(|k| k == value) {
            known.push(value.to_string());
        }
    }
    // Longest first, so that a value containing another is replaced whole.
    known.sort_by_key(|v| std::cmp::Reverse(v.len()));
}

/// `text` with every remembered secret replaced by `[hidden]`; `None` if it holds none.
pub(crate) fn scrubbed(text: &str) -> Option<String> {
    let known = KNOWN.read().unwrap_or_else(PoisonError::into_inner);
    if !known.iter().any(|v| text.contains(v.as_str())) {
        return None;
    }
    Some(known.iter().fold(text.to_string(), |text, v| {
        text.replace(v.as_str(), "[hidden]")
    }))
}

/// A log writer (`tracing_subscriber::fmt().with_writer(ScrubbedLogs(std::io::stderr))`) that
/// replaces remembered secrets in every line. The fmt layer writes each event with one
/// `write_all` of the whole formatted line, so a value is never split between two writes.
#[derive(Clone, Copy)]
pub struct ScrubbedLogs<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for ScrubbedLogs<M> {
    type Writer = ScrubbedWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedWriter(self.0.make_writer())
    }
}

pub struct ScrubbedWriter<W>(W);

impl<W: Write> Write for ScrubbedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf).ok().and_then(scrubbed) {
            Some(text) => self.0.write_all(text.as_bytes())?,
            None => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod log_tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_are_scrubbed_of_remembered_secrets() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ScrubbedLogs(move || sink.clone()))
            .with_ansi(false)
            .finish();
        remember(["planted-log-secret-1", "pl"]);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(
                error = "login with planted-log-secret-1 refused",
                "task failed"
            );
            tracing::info!("nothing secret: pl stays");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("planted-log-secret-1"), "{text}");
        assert!(text.contains("login with [hidden] refused"), "{text}");
        assert!(text.contains("pl stays"), "{text}");
    }
}
