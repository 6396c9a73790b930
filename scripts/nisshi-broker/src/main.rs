//! `nisshi-broker --listen 127.0.0.1:9092 [--initial-rebalance-delay-ms 0]
//! [--tls-cert cert.pem --tls-key key.pem]`: an in-memory
//! Kafka-API broker whose group coordinator follows Kafka's (members expire after their session
//! timeout and the rebalance completes once the live members rejoin). Stops on SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use nisshi_broker::broker::Broker;
use nisshi_broker::coordinator::group::administrator::{Controller, GroupCoordinatorConfig};
use nisshi_storage::ArcDynStorage;
use url::Url;

struct Args {
    listen: String,
    initial_rebalance_delay: Duration,
    tls_cert: Option<String>,
    tls_key: Option<String>,
}

fn args() -> Result<Args> {
    let mut parsed = Args {
        listen: "127.0.0.1:9092".into(),
        initial_rebalance_delay: Duration::from_millis(0),
        tls_cert: None,
        tls_key: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => parsed.listen = value()?,
            "--initial-rebalance-delay-ms" => {
                parsed.initial_rebalance_delay = Duration::from_millis(value()?.parse()?)
            }
            "--tls-cert" => parsed.tls_cert = Some(value()?),
            "--tls-key" => parsed.tls_key = Some(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(parsed)
}

/// A TLS listener's config from a PEM certificate chain and key (no client certificates).
fn tls(cert: &str, key: &str) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {cert}"))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {cert}"))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {key}"))?;
    rustls::ServerConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key")
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = args()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls(cert, key)?),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let listener = Url::parse(&format!("tcp://{}", args.listen))?;
    let broker = Broker::<Controller<ArcDynStorage>, ArcDynStorage>::builder()
        .node_id(1)
        .cluster_id("medconnect-nisshi")
        .incarnation_id(uuid::Uuid::new_v4())
        .advertised_listener(listener.clone())
        .storage(Url::parse("memory://")?)
        .listener(listener)
        .silent(true)
        .tls_server_config(tls)
        .group_coordinator(GroupCoordinatorConfig {
            initial_rebalance_delay: args.initial_rebalance_delay,
            ..GroupCoordinatorConfig::default()
        })
        .build()
        .await
        .context("building the broker")?;
    broker.main(tokio::time::Instant::now()).await.context("serving")?;
    Ok(())
}
