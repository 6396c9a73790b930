//! The `medconnect` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medconnect_runtime::{Plugins, Worker, WorkerConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "medconnect",
    version,
    about = "A Kafka Connect-style connector runtime for healthcare data"
)]
struct Cli {
    /// Log as JSON lines (for log shippers) instead of text.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker against a Kafka cluster, configured by a TOML file.
    Worker { config: PathBuf },
    /// Run a broker, a worker and the REST API in one process: nothing else to install.
    #[cfg(feature = "embedded-broker")]
    Dev {
        /// Where the embedded Kafka-API broker listens.
        #[arg(long, default_value = "127.0.0.1:9092")]
        kafka: SocketAddr,
        /// Where the REST API listens.
        #[arg(long, default_value = "127.0.0.1:8083")]
        rest: SocketAddr,
        /// Connector configs (Connect's JSON: {"name", "config"}) to create at start.
        #[arg(long = "connector")]
        connectors: Vec<PathBuf>,
    },
    /// Run the embedded Kafka-API broker alone (in-memory storage).
    #[cfg(feature = "embedded-broker")]
    Broker {
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: SocketAddr,
    },
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_env("MEDCONNECT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,tansu=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.json_logs);
    match cli.command {
        Command::Worker { config } => {
            let config = WorkerConfig::from_file(&config)?;
            let worker = Worker::start(config, Plugins::builtin()).await?;
            wait_for_signal().await;
            worker.shutdown().await;
        }
        #[cfg(feature = "embedded-broker")]
        Command::Dev {
            kafka,
            rest,
            connectors,
        } => {
            let broker = medconnect_runtime::broker::EmbeddedBroker::start(kafka).await?;
            let mut config = WorkerConfig::new(&broker.bootstrap_servers())
                .with_consumer_settings(medconnect_runtime::broker::CONSUMER_SETTINGS);
            config.rest.listen = rest;
            let worker = Worker::start(config, Plugins::builtin()).await?;
            for path in connectors {
                create_from_file(&worker, &path).await?;
            }
            println!(
                "medconnect dev: REST http://{} , Kafka {}",
                worker.rest_addr(),
                broker.bootstrap_servers()
            );
            wait_for_signal().await;
            worker.shutdown().await;
            broker.stop();
        }
        #[cfg(feature = "embedded-broker")]
        Command::Broker { listen } => {
            let broker = medconnect_runtime::broker::EmbeddedBroker::start(listen).await?;
            println!("medconnect broker: Kafka {}", broker.bootstrap_servers());
            wait_for_signal().await;
            broker.stop();
        }
    }
    Ok(())
}

/// Creates a connector from a Connect-style JSON file, as `POST /connectors` would.
async fn create_from_file(worker: &Worker, path: &PathBuf) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let name = value["name"]
        .as_str()
        .context("connector file needs a \"name\"")?
        .to_string();
    let config = value["config"]
        .as_object()
        .context("connector file needs a \"config\" object")?
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map_or_else(|| v.to_string(), str::to_string),
            )
        })
        .collect();
    if worker.herder().info(&name).is_ok() {
        worker.herder().put_config(&name, config).await?;
    } else {
        worker.herder().create(&name, config, None).await?;
    }
    Ok(())
}
