//! The broker a worker cluster runs against in the cluster tests, as a separate process.
//!
//! By default librdkafka's mock cluster (`medconnect mock-broker`, built with the workspace):
//! its group coordinator expires dead members, but in every rebalance it waits the session
//! timeout less 1 s for members to rejoin, where Kafka waits only until every live member
//! rejoined.
//! `MEDCONNECT_CLUSTER_BROKER=nisshi` runs them against the stand-alone nisshi broker instead
//! (`scripts/nisshi` builds it, ~12 min once, and prints the path this reads from
//! `MEDCONNECT_NISSHI_BIN`, default `$MEDCONNECT_CACHE/nisshi-0.8.1/bin/nisshi-broker`): its
//! coordinator ends a rebalance once the live members rejoined, as Kafka's does.

use std::path::PathBuf;

use anyhow::{Context, bail};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};

use crate::crash::{Processes, free_port};
use crate::pki::Pki;
use crate::{eventually, medconnect_bin};

/// Which broker program the cluster tests start.
#[derive(Debug, Clone)]
pub enum ClusterBroker {
    Mock,
    Nisshi(PathBuf),
}

impl ClusterBroker {
    /// The broker `MEDCONNECT_CLUSTER_BROKER` names (`mock`, the default, or `nisshi`).
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("MEDCONNECT_CLUSTER_BROKER").as_deref() {
            Err(_) | Ok("" | "mock") => Ok(Self::Mock),
            Ok("nisshi") => Ok(Self::Nisshi(nisshi_bin()?)),
            Ok(other) => bail!("MEDCONNECT_CLUSTER_BROKER={other}: expected mock or nisshi"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Mock => "librdkafka mock cluster",
            Self::Nisshi(_) => "nisshi 0.8.1",
        }
    }

    /// Starts the broker as process `broker` with the workers' `internal` topics (compacted)
    /// and `topics` created, each given as `name:partitions`; its bootstrap address.
    pub async fn start(
        &self,
        processes: &mut Processes,
        internal: &[&str],
        topics: &[&str],
    ) -> anyhow::Result<String> {
        match self {
            Self::Mock => {
                let all: Vec<&str> = internal.iter().chain(topics).copied().collect();
                start_mock(processes, &all).await
            }
            Self::Nisshi(bin) => {
                start_nisshi(
                    processes,
                    bin,
                    &[],
                    KafkaSettings::new(""),
                    internal,
                    topics,
                )
                .await
            }
        }
    }
}

fn nisshi_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("MEDCONNECT_NISSHI_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = std::env::var_os("MEDCONNECT_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/medconnect"))
                })
                .context("neither MEDCONNECT_CACHE nor HOME is set")?;
            cache.join("nisshi-0.8.1/bin/nisshi-broker")
        }
    };
    if !path.exists() {
        bail!("{} not found: run scripts/nisshi first", path.display());
    }
    Ok(path)
}

impl ClusterBroker {
    /// The nisshi broker serving TLS with `pki`'s server certificate (the mock cluster has no
    /// TLS listener), with the topics created over TLS; its bootstrap address.
    pub async fn start_tls(
        processes: &mut Processes,
        nisshi: &std::path::Path,
        pki: &Pki,
        internal: &[&str],
        topics: &[&str],
    ) -> anyhow::Result<String> {
        let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
        let tls = [
            "--tls-cert",
            cert.to_str().context("temp path")?,
            "--tls-key",
            key.to_str().context("temp path")?,
        ];
        let mut settings = KafkaSettings::new("");
        settings
            .common
            .insert("security.protocol".into(), "SSL".into());
        settings.common.insert(
            "ssl.ca.location".into(),
            pki.path("ca.crt").display().to_string(),
        );
        start_nisshi(processes, nisshi, &tls, settings, internal, topics).await
    }
}

async fn start_mock(processes: &mut Processes, topics: &[&str]) -> anyhow::Result<String> {
    let bin = medconnect_bin()?;
    let mut args = vec!["mock-broker"];
    for topic in topics {
        args.extend(["--topic", topic]);
    }
    processes.spawn("broker", &bin, &args, &[])?;
    let bootstrap = eventually("the mock broker to start", async || {
        let out = processes.stdout("broker");
        out.lines()
            .find_map(|l| l.strip_prefix("medconnect mock-broker: Kafka "))
            .map(|b| Some(b.trim().to_string()))
            .or_else(|| processes.exited("broker").then_some(None))
    })
    .await?;
    bootstrap.context("the mock broker exited while starting")
}

async fn start_nisshi(
    processes: &mut Processes,
    bin: &std::path::Path,
    extra_args: &[&str],
    mut settings: KafkaSettings,
    internal: &[&str],
    topics: &[&str],
) -> anyhow::Result<String> {
    let bootstrap = format!("127.0.0.1:{}", free_port()?);
    let mut args = vec!["--listen", &bootstrap];
    args.extend(extra_args);
    processes.spawn("broker", bin, &args, &[])?;
    let listening = eventually("the nisshi broker to listen", async || {
        if tokio::net::TcpStream::connect(&bootstrap).await.is_ok() {
            Some(true)
        } else {
            processes.exited("broker").then_some(false)
        }
    })
    .await?;
    if !listening {
        bail!("the nisshi broker exited: {}", processes.stderr("broker"));
    }
    let spec = |topic: &&str, compacted: bool| {
        let (name, partitions) = topic
            .split_once(':')
            .with_context(|| format!("topic {topic}: expected name:partitions"))?;
        let spec = TopicSpec::regular(name, partitions.parse()?, 1);
        Ok(TopicSpec { compacted, ..spec })
    };
    let specs = internal
        .iter()
        .map(|t| spec(t, true))
        .chain(topics.iter().map(|t| spec(t, false)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    settings
        .common
        .insert("bootstrap.servers".into(), bootstrap.clone());
    ensure_topics(&settings, &specs)
        .await
        .context("creating the test topics on the nisshi broker")?;
    Ok(bootstrap)
}
