//! The REST listener: plain TCP, or TLS from PEM files (rustls with ring through
//! `medconnect_api::tls`, no process-wide provider) with optional client certificates (mTLS),
//! and the client other workers are reached with (forwarded writes) over https.
//!
//! TLS handshakes run in their own tasks, off the accept loop: a client that connects and
//! never finishes its handshake holds up no one else, and gives up after
//! [`HANDSHAKE_TIMEOUT`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

pub use medconnect_api::tls::TlsError;

/// `[rest.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestTls {
    /// The listener's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Set: every client must present a certificate this CA (PEM) signed (mTLS), on top of
    /// its credentials. Other workers present `cert` (it then needs the clientAuth usage, or
    /// none).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The CA (PEM) that signed the other workers' certificates, trusted when forwarding to
    /// them over https; default `client_ca`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

impl RestTls {
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        medconnect_api::tls::acceptor(&self.cert, &self.key, self.client_ca.as_deref())
    }

    /// The https client for forwarding: trusts `ca` (or `client_ca`), and presents this
    /// worker's certificate when the others require one.
    pub fn forwarder(&self) -> Result<reqwest::ClientBuilder, TlsError> {
        let ca = self.ca.as_ref().or(self.client_ca.as_ref()).ok_or_else(|| {
            TlsError::Setup(
                "[rest.tls] ca is not set: the workers of a cluster forward writes to each other over https and must know the CA of each other's certificates".into(),
            )
        })?;
        let client = self
            .client_ca
            .as_ref()
            .map(|_| (self.cert.as_path(), self.key.as_path()));
        let config = medconnect_api::tls::client_config(ca, client)?;
        Ok(reqwest::Client::builder().use_preconfigured_tls(config))
    }
}

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes under way at once; past it, new connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// The REST API's listener, plain or TLS.
pub enum RestListener {
    Plain(TcpListener),
    Tls {
        local: SocketAddr,
        accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        /// Accepts and hands shakes; stopped when the listener is dropped.
        acceptor: AbortOnDrop,
    },
}

pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RestListener {
    pub fn plain(listener: TcpListener) -> Self {
        Self::Plain(listener)
    }

    pub fn tls(listener: TcpListener, tls: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (send, accepted) = mpsc::channel(64);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(%error, "REST listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, send) = (tls.clone(), send.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = send.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "REST TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "REST TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self::Tls {
            local,
            accepted,
            acceptor: AbortOnDrop(task),
        })
    }
}

impl Listener for RestListener {
    type Io = Either<TcpStream, TlsStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self {
            Self::Plain(listener) => {
                let (stream, peer) = Listener::accept(listener).await;
                (Either::Left(stream), peer)
            }
            Self::Tls { accepted, .. } => match accepted.recv().await {
                Some((stream, peer)) => (Either::Right(stream), peer),
                // The accept task ended (it only does when aborted): nothing more comes.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Plain(listener) => listener.local_addr(),
            Self::Tls { local, .. } => Ok(*local),
        }
    }
}

/// The peer of a REST connection (`ConnectInfo<Peer>` in a request's extensions): its address,
/// and over TLS with client certificates the SHA-256 of the certificate it presented (verified
/// by the handshake against `client_ca`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<[u8; 32]>,
}

impl Connected<IncomingStream<'_, RestListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, RestListener>) -> Self {
        let certificate = match stream.io() {
            Either::Right(tls) => tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| Sha256::digest(leaf.as_ref()).into()),
            Either::Left(_) => None,
        };
        Peer {
            addr: *stream.remote_addr(),
            certificate,
        }
    }
}
