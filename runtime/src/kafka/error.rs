use medconnect_api::is_secret_name;
use rdkafka::error::KafkaError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("cannot create Kafka {client}: {source}")]
    Client {
        client: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("Kafka at {servers} did not answer: {reason}")]
    Unreachable { servers: String, reason: String },
}

impl KafkaSetupError {
    pub fn client(client: &'static str, source: KafkaError) -> Self {
        Self::Client {
            client,
            source: secret_hidden(source),
        }
    }
}

/// librdkafka's config errors name the setting and its value ("... sasl.jaas.config
/// org.apache...PlainLoginModule required password=..."), and its description may quote the
/// value too: for a secret setting, both become `[hidden]`. Every error of a client's
/// creation passes through here before it can reach a log line or a status trace.
pub fn secret_hidden(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, description, key, value)
            if is_secret_name(&key) && !value.is_empty() =>
        {
            let description = description.replace(&value, "[hidden]");
            KafkaError::ClientConfig(code, description, key, "[hidden]".into())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::ClientConfig;
    use rdkafka::admin::AdminClient;
    use rdkafka::client::DefaultClientContext;

    use super::*;

    #[test]
    fn a_refused_secret_setting_is_not_quoted_in_the_error() {
        // librdkafka refuses Java's JAAS config and quoted it whole in its error.
        let planted = "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"planted-jaas\";";
        let created: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("sasl.jaas.config", planted)
            .create();
        let Err(error) = created else {
            panic!("librdkafka took sasl.jaas.config")
        };
        assert!(
            error.to_string().contains("planted-jaas"),
            "the leak this guards against"
        );
        let error = KafkaSetupError::client("admin client", error);
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("planted-jaas"), "{shown}");
        assert!(shown.contains("sasl.jaas.config"), "{shown}");
    }
}
