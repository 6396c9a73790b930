//! The listener source: devices connect to medconnect over MQTT 3.1.1 or 5 (on TCP, TLS, or
//! WebSocket over either) and get their PUBACK (QoS 1) or PUBREC (QoS 2) only once the engine
//! reports the record durable in Kafka — unlike a broker that acknowledges on receipt
//! (rumqttd 0.20 appends to its in-memory log and acknowledges at once, with no hook to wait
//! for Kafka; so this listener speaks the protocol itself, with rumqttc's codecs). One
//! listener per worker (placement every worker), so a TCP load balancer spreads devices over
//! the cluster.

mod auth;
pub mod config;
mod connection;
pub(crate) mod hub;
mod identity;
mod rate;
mod record;
mod subscriptions;
mod websocket;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::limits::{ByteBudget, PeerLimits};
use medconnect_api::tls;
use medconnect_api::{
    ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind, Placement,
    Props, SourceConnector, SourceRecord, SourceTask, SourceTaskContext, TaskConfig,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{ListenerConfig, Transport, listener_def};
pub use record::{HEADER_CERT_CN, HEADER_USERNAME, USER_PROPERTY_PREFIX};

use rate::ConnectRate;

/// How long `stop` waits for connections to close.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct MqttListenerSourceConnector;

#[async_trait]
impl Connector for MqttListenerSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.mqtt.MqttListenerSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["MqttListenerSource", "MqttDeviceSource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        listener_def()
    }

    fn placement(&self) -> Placement {
        Placement::EveryWorker
    }

    /// One listener per worker: more tasks on one worker could not share the port.
    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        ListenerConfig::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        Ok(vec![context.config.clone()])
    }
}

impl SourceConnector for MqttListenerSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(MqttListenerSourceTask::new(context)?))
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    connector: String,
    config: ListenerConfig,
    tls: Option<TlsAcceptor>,
    queue: mpsc::Sender<SourceRecord>,
    shutdown: CancellationToken,
    connect_rate: ConnectRate,
    clients: AtomicU64,
    /// Where the sink finds the connected devices that subscribed.
    hub: Arc<hub::Hub>,
    /// Bytes every connection holds (packets being read, publishes waiting for Kafka),
    /// within the worker's budget for all listeners.
    budget: Arc<ByteBudget>,
    peers: Arc<PeerLimits>,
}

impl Shared {
    /// Hands a record to the task's `poll`; waits while the queue is full (the connection is
    /// not read meanwhile). An error: the task is stopping.
    async fn enqueue(&self, record: SourceRecord) -> Result<(), ()> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Err(()),
            sent = self.queue.send(record) => sent.map_err(|_| ()),
        }
    }

    fn next_client_number(&self) -> u64 {
        self.clients.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct MqttListenerSourceTask {
    connector: String,
    config: ListenerConfig,
    records: Option<mpsc::Receiver<SourceRecord>>,
    local_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    hub: Option<Arc<hub::Hub>>,
    /// The worker's budget for every listener; this listener's lies within it.
    worker_budget: Arc<ByteBudget>,
    budget: Option<Arc<ByteBudget>>,
}

impl std::fmt::Debug for MqttListenerSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttListenerSourceTask")
            .field("connector", &self.connector)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl MqttListenerSourceTask {
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: ListenerConfig::parse(&context.config)?,
            connector: context.connector_name,
            records: None,
            local_addr: None,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            hub: None,
            worker_budget: context.listener_budget,
            budget: None,
        })
    }

    /// The listener's byte budget once started: bytes held for devices now, at most ever, and
    /// reads refused for want of it.
    pub fn budget(&self) -> Option<Arc<ByteBudget>> {
        self.budget.clone()
    }

    /// The address the listener is bound to, once started.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

#[async_trait]
impl SourceTask for MqttListenerSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let config = self.config.clone();
        let acceptor = match &config.tls {
            Some(t) => Some(
                tls::acceptor(&t.cert, &t.key, t.client_ca.as_deref())
                    .map_err(|e| ConnectError::config(config::TLS_CERT_FILE, e.to_string()))?,
            ),
            None => None,
        };
        let listener = medconnect_api::net::listen(&config.bind, config.port, config.share_port)
            .await
            .map_err(|e| {
                let message = format!("cannot listen on {}:{}: {e}", config.bind, config.port);
                // A previous task on this worker may still hold the port for a moment.
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    ConnectError::retriable(message)
                } else {
                    ConnectError::fatal(message)
                }
            })?;
        let address = listener.local_addr()?;
        tracing::info!(connector = %self.connector, %address, tls = acceptor.is_some(), transport = ?config.transport, client_certificates = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), devices = config.users.len(), anonymous = config.allow_anonymous, "MQTT listener bound");
        let (queue, records) = mpsc::channel(config.queue_capacity);
        self.records = Some(records);
        self.local_addr = Some(address);
        self.shutdown = CancellationToken::new();
        self.tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let hub = Arc::new(hub::Hub::default());
        hub::register(&self.connector, &hub);
        self.hub = Some(hub.clone());
        let budget = self.worker_budget.within(config.budget_bytes);
        self.budget = Some(budget.clone());
        let shared = Arc::new(Shared {
            budget,
            peers: PeerLimits::new(config.max_connections_per_peer),
            connector: self.connector.clone(),
            connect_rate: ConnectRate::new(config.connect_rate),
            config,
            tls: acceptor,
            queue,
            shutdown: self.shutdown.clone(),
            clients: AtomicU64::new(0),
            hub,
        });
        self.tracker
            .spawn(accept_loop(listener, shared, self.tracker.clone(), limit));
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let records = self
            .records
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("MQTT listener polled before start"))?;
        let Some(first) = records.recv().await else {
            return Err(ConnectError::fatal("the MQTT listener has stopped"));
        };
        let mut batch = vec![first];
        while batch.len() < self.config.poll_batch_max {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        if let Some(hub) = self.hub.take() {
            hub::unregister(&self.connector, &hub);
        }
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(connector = %self.connector, "MQTT connections did not close within the grace period");
        }
        // Records never polled drop their handles: their devices get no PUBACK and resend.
        self.records = None;
        Ok(())
    }
}

/// One connection, after its TLS handshake when the listener has TLS; the client
/// certificate's common name, if any, is the device's identity.
async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Some(acceptor) = &shared.tls else {
        carry(stream, peer, None, shared).await;
        return;
    };
    let handshake = tokio::time::timeout(shared.config.connect_timeout, acceptor.accept(stream));
    match handshake.await {
        Ok(Ok(tls)) => {
            let common_name = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| identity::common_name(cert));
            carry(tls, peer, common_name, shared).await;
        }
        Ok(Err(error)) => {
            tracing::warn!(connector = %shared.connector, %peer, %error, "MQTT TLS handshake failed");
        }
        Err(_) => {
            tracing::warn!(connector = %shared.connector, %peer, "MQTT TLS handshake timed out");
        }
    }
}

/// MQTT on the connection: straight, or in WebSocket frames after an HTTP upgrade.
async fn carry<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    certificate_cn: Option<String>,
    shared: Arc<Shared>,
) {
    match shared.config.transport.clone() {
        Transport::Tcp => connection::serve(stream, peer, certificate_cn, shared).await,
        Transport::WebSocket { path } => {
            websocket::serve(stream, peer, certificate_cn, shared, &path).await
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(connector = %shared.connector, %peer, max = shared.config.max_connections, "too many MQTT connections; closing the new one");
                    continue;
                };
                let Some(slot) = shared.peers.enter(peer.ip()) else {
                    tracing::warn!(connector = %shared.connector, %peer, max = shared.peers.max(), "too many MQTT connections from one address; closing the new one");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tracker.spawn(async move {
                    serve(stream, peer, shared).await;
                    drop((permit, slot));
                });
            }
            Err(error) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(connector = %shared.connector, %error, "accepting an MQTT connection failed");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    tracing::info!(connector = %shared.connector, "MQTT listener closed");
}
