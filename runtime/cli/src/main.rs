//! The `medconnect` binary.

use std::io::IsTerminal;
#[cfg(feature = "embedded-broker")]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medconnect_runtime::rest::LogLevels;
#[cfg(feature = "embedded-broker")]
use medconnect_runtime::worker::connector_name;
use medconnect_runtime::{Worker, WorkerConfig};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

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
    Worker {
        config: PathBuf,
        /// Overrides the config's `worker_id` (e.g. a Kubernetes pod name).
        #[arg(long)]
        worker_id: Option<String>,
        /// Overrides `[rest] advertised_url`: where the other workers reach this one.
        #[arg(long)]
        advertised_url: Option<String>,
    },
    /// Run librdkafka's mock Kafka cluster: a test broker whose group coordinator expires
    /// members that stop heartbeating (the embedded broker's does not), for trying a worker
    /// cluster's failover on one machine. It has no CreateTopics: create topics with --topic.
    MockBroker {
        /// `name:partitions`, repeated: topics to create at start.
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
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
    /// Print the Argon2id hash of a password read from standard input (one line), for the
    /// `password_hash` of a user in `[rest] users_file`.
    HashPassword,
    /// Run the embedded Kafka-API broker alone (in-memory storage).
    #[cfg(feature = "embedded-broker")]
    Broker {
        #[arg(long, default_value = "127.0.0.1:9092")]
        listen: SocketAddr,
    },
}

const DEFAULT_LOG: &str = "info,rdkafka=warn,tansu=warn";

/// Installs the subscriber with its filter behind a reload handle, so `/admin/loggers` can
/// change levels at run time; returns the levels the REST API reads and changes.
fn init_logs(json: bool) -> LogLevels {
    let levels = std::env::var("MEDCONNECT_LOG")
        .ok()
        .and_then(|text| LogLevels::from_directives(&text).ok())
        .or_else(|| LogLevels::from_directives(DEFAULT_LOG).ok())
        .unwrap_or_default();
    let filter = levels
        .env_filter()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a person at a terminal, not in files and log shippers. Every line is
    // scrubbed of the secret values the worker knows (resolved references, Kafka passwords).
    let format = tracing_subscriber::fmt::layer()
        .with_writer(medconnect_runtime::worker::redact::ScrubbedLogs(
            std::io::stderr,
        ))
        .with_ansi(std::io::stderr().is_terminal());
    let format = if json {
        format.json().boxed()
    } else {
        format.boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .init();
    levels.apply_with(move |filter| handle.reload(filter).map_err(|e| e.to_string()));
    levels
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

/// How long a failed worker may take to stop its tasks before the process exits anyway.
const FAILED_SHUTDOWN: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_levels = init_logs(cli.json_logs);
    // One clear message and a non-zero exit for anything that keeps the process from doing
    // its job, at start or later: never a process that runs half-started.
    match run(cli.command, log_levels).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %describe(&error), "medconnect cannot run");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, log_levels: LogLevels) -> anyhow::Result<()> {
    match command {
        Command::Worker {
            config,
            worker_id,
            advertised_url,
        } => {
            let mut config = WorkerConfig::from_file(&config)?;
            if worker_id.is_some() {
                config.worker_id = worker_id;
            }
            if advertised_url.is_some() {
                config.rest.advertised_url = advertised_url;
            }
            let worker =
                Worker::start_with_log_levels(config, medconnect::builtin_plugins(), log_levels)
                    .await
                    .context("the worker did not start")?;
            tokio::select! {
                _ = wait_for_signal() => worker.shutdown().await,
                reason = worker.failed() => return Err(stop_failed(worker, reason).await),
            }
        }
        #[cfg(feature = "embedded-broker")]
        Command::Dev {
            kafka,
            rest,
            connectors,
        } => {
            let mut broker = medconnect_runtime::broker::EmbeddedBroker::start(kafka)
                .await
                .context("the embedded Kafka-API broker did not start")?;
            // Open REST API (WorkerConfig::new: rest.auth = "none"): a development process on
            // this machine; the banner and the log say so.
            let mut config = WorkerConfig::new(&broker.bootstrap_servers())
                .with_consumer_settings(medconnect_runtime::broker::CONSUMER_SETTINGS);
            config.rest.listen = rest;
            // References may read MEDCONNECT_SECRET_* variables, nothing else (configs/worker.toml).
            config.config_providers =
                medconnect_runtime::worker::config_providers::ConfigProviders::dev();
            if !rest.ip().is_loopback() {
                tracing::warn!(rest = %rest, "medconnect dev serves its REST API without authentication on a non-loopback address: anyone who reaches it may change connectors");
            }
            let worker =
                Worker::start_with_log_levels(config, medconnect::builtin_plugins(), log_levels)
                    .await
                    .context("the worker did not start")?;
            for path in connectors {
                create_from_file(&worker, &path).await?;
            }
            println!(
                "medconnect dev: REST http://{} (open: no authentication, development only), Kafka {}",
                worker.rest_addr(),
                broker.bootstrap_servers()
            );
            tokio::select! {
                _ = wait_for_signal() => {
                    worker.shutdown().await;
                    broker.stop();
                }
                reason = worker.failed() => return Err(stop_failed(worker, reason).await),
                reason = broker.stopped() => {
                    let reason = format!("the embedded Kafka-API broker stopped: {reason}");
                    return Err(stop_failed(worker, reason).await);
                }
            }
        }
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!password.is_empty(), "the password is empty");
            let hash = medconnect_runtime::rest::auth::basic::hash_password(password)
                .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
            println!("{hash}");
        }
        Command::MockBroker { topics } => {
            let cluster = rdkafka::mocking::MockCluster::new(1)
                .context("librdkafka's mock cluster did not start")?;
            for topic in &topics {
                let (name, partitions) = topic
                    .rsplit_once(':')
                    .and_then(|(n, p)| Some((n, p.parse::<i32>().ok()?)))
                    .with_context(|| format!("--topic {topic}: expected name:partitions"))?;
                cluster
                    .create_topic(name, partitions, 1)
                    .with_context(|| format!("cannot create topic {name}"))?;
            }
            println!(
                "medconnect mock-broker: Kafka {}",
                cluster.bootstrap_servers()
            );
            wait_for_signal().await;
        }
        #[cfg(feature = "embedded-broker")]
        Command::Broker { listen } => {
            let mut broker = medconnect_runtime::broker::EmbeddedBroker::start(listen)
                .await
                .context("the embedded Kafka-API broker did not start")?;
            println!("medconnect broker: Kafka {}", broker.bootstrap_servers());
            tokio::select! {
                _ = wait_for_signal() => broker.stop(),
                reason = broker.stopped() => anyhow::bail!("the embedded Kafka-API broker stopped: {reason}"),
            }
        }
    }
    Ok(())
}

/// The error and its causes on one line, each cause left out when the message before it
/// already says it (errors that print their source as well as returning it).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Stops a worker that cannot go on, within [`FAILED_SHUTDOWN`]; the error to exit with.
async fn stop_failed(worker: Worker, reason: String) -> anyhow::Error {
    tracing::error!(%reason, "the worker cannot go on; stopping it");
    if tokio::time::timeout(FAILED_SHUTDOWN, worker.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within {FAILED_SHUTDOWN:?}; exiting anyway");
    }
    anyhow::anyhow!("the worker stopped: {reason}")
}

/// Creates a connector from a Connect-style JSON file, as `POST /connectors` would; only
/// `dev --connector` reads such files.
#[cfg(feature = "embedded-broker")]
async fn create_from_file(worker: &Worker, path: &PathBuf) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let name = value["name"]
        .as_str()
        .map(connector_name::trim)
        .context("connector file needs a \"name\"")?
        .to_string();
    connector_name::check(&name)
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
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
