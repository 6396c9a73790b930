//! A running worker process: the internal topics, the stores that read them, the herder and
//! the REST API, started together and stopped together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::kafka::{KafkaSetupError, TopicSpec, ensure_topics};
use crate::metrics::Metrics;
use crate::rest::audit::AuditLog;
use crate::rest::auth::{AuthError, Authenticator};
use crate::rest::tls::{RestListener, TlsError};
use crate::rest::{self, LogLevels, RestState};
use crate::store::{ConfigStore, OffsetStore, StatusStore, StoreError};
use crate::worker::cluster::security::{Security, SecurityError};
use crate::worker::cluster::{ClusterAssignment, ClusterView, Membership};
use crate::worker::herder::{self, Assignment, EveryTaskHere, Herder, HerderError};
use crate::worker::{Plugins, WorkerConfig, cluster_watch};

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Herder(#[from] HerderError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("[rest.tls]: {0}")]
    Tls(#[from] TlsError),
    /// The group coordinator connection is a client of our own (see `worker::cluster`): what
    /// it cannot secure as the Kafka settings ask is refused before anything starts.
    #[error("[kafka] for cluster membership: {0}")]
    ClusterSecurity(#[from] SecurityError),
    #[error("Kafka at {servers} did not answer within {timeout:?} while {what}")]
    StartTimeout {
        servers: String,
        what: &'static str,
        timeout: Duration,
    },
}

/// A running worker. Dropping it without `shutdown` abandons its tasks.
pub struct Worker {
    herder: Arc<Herder>,
    rest_addr: SocketAddr,
    shutdown: CancellationToken,
    background: Vec<JoinHandle<()>>,
    /// Set once the worker cannot go on (its Kafka state is gone, its REST server stopped).
    failure: watch::Receiver<Option<String>>,
    cluster: watch::Receiver<ClusterView>,
}

impl Worker {
    /// Starts a worker: creates missing internal topics, reads them, starts the connectors
    /// they hold and serves the REST API. Its `/admin/loggers` records levels but steers no
    /// subscriber: see [`Worker::start_with_log_levels`].
    pub async fn start(config: WorkerConfig, plugins: Plugins) -> Result<Self, WorkerError> {
        Self::start_with_log_levels(config, plugins, LogLevels::default()).await
    }

    /// As [`Worker::start`], with `/admin/loggers` reading and changing `log_levels`.
    ///
    /// Every part that can fail to start (the REST listener, reaching Kafka, the internal
    /// topics, the stores) fails here, with what and where, within
    /// `startup_timeout_ms` for Kafka: never a worker that runs half-started.
    pub async fn start_with_log_levels(
        config: WorkerConfig,
        plugins: Plugins,
        log_levels: LogLevels,
    ) -> Result<Self, WorkerError> {
        // Who may call the REST API first: a worker config that does not say is refused
        // before anything else starts.
        let auth = Arc::new(Authenticator::load(config.rest.auth_settings())?);
        let tls = config
            .rest
            .tls
            .as_ref()
            .map(|tls| tls.acceptor())
            .transpose()?;
        // The listener next: a port in use is the most common start-up failure and needs
        // no broker to find out.
        let listener = TcpListener::bind(config.rest.listen)
            .await
            .map_err(|source| WorkerError::Listen {
                addr: config.rest.listen,
                source,
            })?;
        let rest_addr = listener
            .local_addr()
            .map_err(|source| WorkerError::Listen {
                addr: config.rest.listen,
                source,
            })?;
        let listener = match tls {
            Some(tls) => {
                RestListener::tls(listener, tls).map_err(|source| WorkerError::Listen {
                    addr: config.rest.listen,
                    source,
                })?
            }
            None => RestListener::plain(listener),
        };
        // Forwarding to other workers: over https, trusting the cluster's CA, with TLS on.
        let forwarder = match &config.rest.tls {
            Some(tls) if config.cluster.enabled => tls.forwarder()?,
            _ => reqwest::Client::builder(),
        }
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| HerderError::Internal(format!("HTTP client: {e}")))?;
        let scheme = if config.rest.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let kafka = config.kafka_settings();
        let coordinator_security = if config.cluster.enabled {
            Security::from_settings(&kafka.common)?
        } else {
            Security::default()
        };
        let topics = &config.internal_topics;
        let internal = vec![
            topics.config.clone(),
            topics.offsets.clone(),
            topics.status.clone(),
        ];
        let startup_timeout = config.startup_timeout();
        let timed_out = |what| WorkerError::StartTimeout {
            servers: kafka.bootstrap_servers().to_string(),
            what,
            timeout: startup_timeout,
        };
        // librdkafka retries an unreachable cluster forever: bound the wait for it.
        let cluster = cluster_watch::look(&kafka, &internal, startup_timeout).await?;
        tokio::time::timeout(
            startup_timeout,
            ensure_topics(
                &kafka,
                &[
                    TopicSpec::compacted(&topics.config, 1, topics.replication_factor),
                    TopicSpec::compacted(
                        &topics.offsets,
                        topics.offsets_partitions,
                        topics.replication_factor,
                    ),
                    TopicSpec::compacted(
                        &topics.status,
                        topics.status_partitions,
                        topics.replication_factor,
                    ),
                    TopicSpec::retained(
                        &topics.audit,
                        1,
                        topics.replication_factor,
                        topics.audit_retention_ms,
                    ),
                ],
            ),
        )
        .await
        .map_err(|_| timed_out("creating the internal topics"))??;
        let (configs, offsets, statuses) = tokio::try_join!(
            ConfigStore::open(&kafka, &topics.config),
            OffsetStore::open(&kafka, &topics.offsets),
            StatusStore::open(&kafka, &topics.status),
        )?;
        let worker_id = config
            .worker_id
            .clone()
            .unwrap_or_else(|| rest_addr.to_string());
        let configs = Arc::new(configs);
        let metrics = Metrics::default();
        let cluster_assignment = config
            .cluster
            .enabled
            .then(|| Arc::new(ClusterAssignment::default()));
        let assignment: Arc<dyn Assignment> = match &cluster_assignment {
            Some(assignment) => assignment.clone(),
            None => Arc::new(EveryTaskHere),
        };
        // Alone, a worker is its own leader from the start; in a cluster it waits to join.
        let cluster_view = watch::Sender::new(if config.cluster.enabled {
            ClusterView::default()
        } else {
            ClusterView {
                generation: Some(0),
                leader_url: None,
                is_leader: true,
                members: Vec::new(),
                session_key: Default::default(),
            }
        });
        let peers = Arc::new(rest::relay::ClusterPeers::new(
            worker_id.clone(),
            cluster_view.subscribe(),
            forwarder.clone(),
        ));
        let herder = Arc::new(Herder::new(herder::HerderParts {
            worker_id,
            plugins,
            configs: configs.clone(),
            offsets: Arc::new(offsets),
            statuses: Arc::new(statuses),
            kafka: kafka.clone(),
            runner: config.runner_settings(),
            metrics,
            assignment,
            peers,
        })?);
        let shutdown = CancellationToken::new();
        let (failure_tx, failure) = watch::channel(None);
        let rest = tokio::spawn({
            let state = RestState {
                herder: herder.clone(),
                kafka_cluster_id: cluster.cluster_id.clone(),
                log_levels,
                max_config_bytes: rest::max_config_bytes(message_max_bytes(&kafka)),
                failure: failure.clone(),
                cluster: cluster_view.subscribe(),
                forwarder,
                auth: auth.clone(),
                audit: Arc::new(AuditLog::new(
                    herder.worker_id(),
                    Some((kafka.producer(&Default::default())?, topics.audit.clone())),
                )),
            };
            let (shutdown, failure) = (shutdown.clone(), failure_tx.clone());
            async move {
                rest::serve(listener, state, shutdown.clone()).await;
                if !shutdown.is_cancelled() {
                    failure.send_replace(Some(format!("the REST server on {rest_addr} stopped")));
                }
            }
        });
        herder.reconcile().await;
        let watcher = tokio::spawn(follow_config_topic(
            herder.clone(),
            configs.clone(),
            shutdown.clone(),
        ));
        let mut background = vec![rest, watcher];
        if let Some(assignment) = cluster_assignment {
            if config.rest.advertised_url.is_none() && rest_addr.ip().is_unspecified() {
                tracing::warn!(
                    rest = %rest_addr,
                    "the REST API listens on every address and [rest] advertised_url is not set: other workers cannot forward requests here"
                );
            }
            let membership = Membership {
                config: config.cluster.clone(),
                bootstrap_servers: kafka.bootstrap_servers().to_string(),
                security: coordinator_security,
                group_id: config.group_id.clone(),
                worker_id: herder.worker_id().to_string(),
                url: config
                    .rest
                    .advertised_url
                    .clone()
                    .unwrap_or_else(|| format!("{scheme}://{rest_addr}")),
                herder: herder.clone(),
                configs,
                assignment,
                view: cluster_view.clone(),
                assigned: Default::default(),
                departed: Default::default(),
            };
            background.push(tokio::spawn(membership.run(shutdown.clone())));
        }
        let cluster_watch = tokio::spawn(cluster_watch::watch(
            kafka.clone(),
            internal,
            cluster.cluster_id,
            failure_tx,
            shutdown.clone(),
        ));
        background.push(cluster_watch);
        if auth.is_open() {
            tracing::warn!(rest = %rest_addr, "the REST API is open (rest.auth = \"none\"): anyone who reaches it may change connectors");
        } else if config.rest.tls.is_none() && !rest_addr.ip().is_loopback() {
            // Tokens and passwords would cross the network readable by anyone on the path.
            tracing::warn!(rest = %rest_addr, "the REST API takes credentials over plain HTTP on a non-loopback address: set [rest.tls] unless a TLS proxy or an encrypted network is in front of it");
        }
        tracing::info!(rest = %rest_addr, worker = herder.worker_id(), tls = config.rest.tls.is_some(), auth = if auth.is_open() { "none" } else { "required" }, "worker started");
        Ok(Self {
            herder,
            rest_addr,
            shutdown,
            background,
            failure,
            cluster: cluster_view.subscribe(),
        })
    }

    pub fn rest_addr(&self) -> SocketAddr {
        self.rest_addr
    }

    pub fn herder(&self) -> &Arc<Herder> {
        &self.herder
    }

    /// The cluster as this worker sees it (a worker alone: generation 0, its own leader).
    pub fn cluster(&self) -> ClusterView {
        self.cluster.borrow().clone()
    }

    /// Resolves with the reason once the worker cannot go on (its Kafka cluster lost the
    /// internal topics or was replaced, its REST server stopped); pending while it works.
    /// The caller decides what follows: the `medconnect` binary exits non-zero.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The sender lives in background tasks that end only at shutdown.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops serving, then stops every task after it delivered and committed what it holds.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for handle in self.background {
            let _ = handle.await;
        }
        self.herder.shutdown().await;
        tracing::info!("worker stopped");
    }
}

/// The largest record the worker's producers send (librdkafka's `message.max.bytes`).
fn message_max_bytes(kafka: &crate::kafka::KafkaSettings) -> usize {
    const LIBRDKAFKA_DEFAULT: usize = 1_000_000;
    kafka
        .producer
        .get("message.max.bytes")
        .or_else(|| kafka.common.get("message.max.bytes"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(LIBRDKAFKA_DEFAULT)
}

/// Reconciles whenever the config topic changes, including changes made by other processes.
async fn follow_config_topic(
    herder: Arc<Herder>,
    configs: Arc<ConfigStore>,
    shutdown: CancellationToken,
) {
    let mut changes = configs.changes();
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // Let a burst of records (task configs + commit) arrive before acting on them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                changes.borrow_and_update();
                herder.reconcile().await;
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
