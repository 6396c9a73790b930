//! `nisshi-broker --listen 127.0.0.1:9092 [--initial-rebalance-delay-ms 0]`: an in-memory
//! Kafka-API broker whose group coordinator follows Kafka's (members expire after their session
//! timeout and the rebalance completes once the live members rejoin). Stops on SIGINT/SIGTERM.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nisshi_broker::broker::Broker;
use nisshi_broker::coordinator::group::administrator::GroupCoordinatorConfig;
use url::Url;

struct Args {
    listen: String,
    initial_rebalance_delay: Duration,
}

fn args() -> Result<Args> {
    let mut parsed = Args {
        listen: "127.0.0.1:9092".into(),
        initial_rebalance_delay: Duration::from_millis(0),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => parsed.listen = value()?,
            "--initial-rebalance-delay-ms" => {
                parsed.initial_rebalance_delay = Duration::from_millis(value()?.parse()?)
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = args()?;
    let listener = Url::parse(&format!("tcp://{}", args.listen))?;
    let broker = Broker::builder()
        .node_id(1)
        .cluster_id("medconnect-nisshi")
        .incarnation_id(uuid::Uuid::new_v4())
        .advertised_listener(listener.clone())
        .storage(Url::parse("memory://")?)
        .listener(listener)
        .silent(true)
        .group_coordinator(GroupCoordinatorConfig {
            initial_rebalance_delay: args.initial_rebalance_delay,
            ..GroupCoordinatorConfig::default()
        })
        .build()
        .await
        .context("building the broker")?;
    broker.main(Instant::now()).await.context("serving")?;
    Ok(())
}
