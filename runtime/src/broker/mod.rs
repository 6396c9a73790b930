//! An embedded Kafka-API broker (tansu, in-memory storage) for `medconnect dev`,
//! `medconnect broker` and the tests: any Kafka client can talk to it, no install needed.
//! Its data lives as long as the process; production clusters use a real Kafka.

use std::net::{SocketAddr, TcpListener};

use tansu_broker::broker::Broker;
use tansu_broker::coordinator::group::administrator::Controller;
use tansu_storage::StorageContainer;
use thiserror::Error;
use tokio::task::JoinHandle;
use url::Url;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Port {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid broker address: {0}")]
    Url(#[from] url::ParseError),
    #[error("the embedded broker did not start: {0}")]
    Start(String),
}

/// Consumer settings for clients of this broker (a worker's `[consumer]`). tansu 0.6 answers a
/// fetch only after sleeping at least half of its `fetch.wait.max.ms`, even when records are
/// waiting, so librdkafka's default of 500 ms put a quarter to half a second on every read: a
/// REST write, which waits for the config topic to read back, took 2-3 s. 25 ms brings that
/// to ~150 ms for ~5% of a core while idle. Real Kafka answers as soon as data arrives, so
/// workers against it keep the default.
pub const CONSUMER_SETTINGS: &[(&str, &str)] = &[("fetch.wait.max.ms", "25")];

pub struct EmbeddedBroker {
    addr: SocketAddr,
    /// Ends with why the broker stopped serving.
    serving: JoinHandle<String>,
}

impl EmbeddedBroker {
    /// Starts a broker on `listen`; port 0 picks a free port. Returns once it accepts connections.
    pub async fn start(listen: SocketAddr) -> Result<Self, BrokerError> {
        Self::start_advertising(listen, None).await
    }

    /// Starts a broker that tells clients to reach it at `advertised` (e.g. a proxy in front).
    pub async fn start_advertising(
        listen: SocketAddr,
        advertised: Option<SocketAddr>,
    ) -> Result<Self, BrokerError> {
        let addr = if listen.port() == 0 {
            // tansu binds by URL: find a free port first.
            let probe = TcpListener::bind(listen).map_err(|source| BrokerError::Port {
                addr: listen,
                source,
            })?;
            probe.local_addr().map_err(|source| BrokerError::Port {
                addr: listen,
                source,
            })?
        } else {
            // tansu reports a port in use only in its log, and something else listening there
            // would then pass for the broker: find out first, as a start-up error.
            probe_bind(listen).await?;
            listen
        };
        let url = Url::parse(&format!("tcp://{addr}"))?;
        let advertised = Url::parse(&format!("tcp://{}", advertised.unwrap_or(addr)))?;
        let mut broker = Broker::<Controller<StorageContainer>, StorageContainer>::builder()
            .node_id(1)
            .cluster_id("medconnect-dev")
            .incarnation_id(uuid::Uuid::new_v4())
            .advertised_listener(advertised)
            .storage(Url::parse("memory://tansu/")?)
            .listener(url)
            .silent(true)
            .build()
            .await
            .map_err(|e| BrokerError::Start(format!("{e:?}")))?;
        let mut serving = tokio::spawn(async move {
            match broker.serve(tokio::time::Instant::now()).await {
                Ok(()) => "it ended".to_string(),
                Err(error) => format!("{error:?}"),
            }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() || serving.is_finished() {
            if serving.is_finished() {
                let reason = (&mut serving).await.unwrap_or_else(|e| e.to_string());
                return Err(BrokerError::Start(format!("on {addr}: {reason}")));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::Start(format!("nothing listens on {addr}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::info!(%addr, "embedded Kafka-API broker listening");
        Ok(Self { addr, serving })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn bootstrap_servers(&self) -> String {
        self.addr.to_string()
    }

    /// Resolves with the reason if the broker stops serving on its own (it should not).
    pub async fn stopped(&mut self) -> String {
        let reason = match (&mut self.serving).await {
            Ok(reason) => reason,
            Err(error) => error.to_string(),
        };
        tracing::error!(addr = %self.addr, %reason, "embedded broker stopped");
        reason
    }

    /// Stops the broker; its data is gone.
    pub fn stop(self) {
        self.serving.abort();
    }
}

/// Fails with [`BrokerError::Port`] if `addr` cannot be listened on (in use, not ours).
/// SO_REUSEADDR as tansu's own listener has it, so a port whose last connections linger in
/// TIME_WAIT (a broker restarted on the same port) is not taken for a port in use.
async fn probe_bind(addr: SocketAddr) -> Result<(), BrokerError> {
    let port_error = |source| BrokerError::Port { addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(port_error)?;
    socket.set_reuseaddr(true).map_err(port_error)?;
    socket.bind(addr).map_err(port_error)?;
    socket.listen(1).map_err(port_error)?;
    Ok(())
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.serving.abort();
    }
}
