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
    #[error("cannot reserve a port on {addr}: {source}")]
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
    serving: JoinHandle<()>,
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
        let serving = tokio::spawn(async move {
            if let Err(error) = broker.serve(tokio::time::Instant::now()).await {
                tracing::error!(?error, "embedded broker stopped");
            }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if serving.is_finished() || tokio::time::Instant::now() > deadline {
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

    /// Stops the broker; its data is gone.
    pub fn stop(self) {
        self.serving.abort();
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.serving.abort();
    }
}
