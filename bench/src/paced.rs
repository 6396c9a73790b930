//! Paced load for the request/acknowledge benches (MLLP, MQTT): N senders, each waiting for
//! its acknowledgement before the next message, at a fixed total rate or as fast as they can;
//! every latency kept for percentiles.

use std::time::{Duration, Instant};

use crate::stats::median;

/// `None`: as fast as possible; `Some(rate)`: total messages per second over all senders.
#[derive(Clone, Copy)]
pub enum Load {
    Max,
    Fixed(f64),
}

pub struct Outcome {
    pub messages: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }

    pub fn print(&self, who: &str) {
        println!(
            "  {who:<22} {:>8.0} msg/s   latency p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms   ({} messages)",
            self.rate(),
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
            self.messages
        );
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `senders` loops of `send` for `seconds`, paced by `load`; gathers every latency.
pub async fn drive<F, Fut>(
    senders: usize,
    seconds: u64,
    load: Load,
    send: F,
) -> anyhow::Result<Outcome>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for sender in 0..senders {
        let send = send.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let interval = match load {
                Load::Max => None,
                Load::Fixed(rate) => Some(Duration::from_secs_f64(senders as f64 / rate)),
            };
            // Spread the senders' schedules over one interval.
            let mut next = Instant::now()
                + interval.map_or(Duration::ZERO, |i| {
                    i.mul_f64(sender as f64 / senders as f64)
                });
            let mut seq = 0u64;
            while Instant::now() < until {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                let sent = Instant::now();
                send(sender, seq).await?;
                latencies.push(sent.elapsed());
                seq += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Outcome {
        messages: latencies.len(),
        elapsed,
        latencies,
    })
}

/// `[senders] [seconds] [linger.ms] [rounds]` from the command line, with defaults.
pub struct Args {
    pub senders: usize,
    pub seconds: u64,
    pub linger: String,
    pub rounds: usize,
}

pub fn args(default_senders: usize) -> anyhow::Result<Args> {
    let senders = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(default_senders);
    let seconds = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10);
    let linger = std::env::args().nth(3).unwrap_or_else(|| "1".into());
    let rounds = std::env::args()
        .nth(4)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    Ok(Args {
        senders,
        seconds,
        linger,
        rounds: rounds.max(1),
    })
}

/// An embedded broker and an in-process worker running one listener source, and a raw producer
/// with the worker's producer settings (`linger.ms` given to both) for the baseline.
pub struct ListenerBench {
    broker: medconnect_runtime::broker::EmbeddedBroker,
    worker: medconnect_runtime::Worker,
    pub producer: rdkafka::producer::FutureProducer,
}

impl ListenerBench {
    /// Starts the broker and worker, creates `topics` (one partition each) and the connector
    /// `config` (which makes it listen on `port`), and waits until the listener accepts there.
    pub async fn start(
        topics: &[&str],
        connector: &str,
        config: Vec<(&str, String)>,
        port: u16,
        linger: &str,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
        let broker =
            medconnect_runtime::broker::EmbeddedBroker::start("127.0.0.1:0".parse()?).await?;
        let bootstrap = broker.bootstrap_servers();
        let mut worker_config = medconnect_runtime::WorkerConfig::new(&bootstrap);
        worker_config.rest.listen = "127.0.0.1:0".parse()?;
        let worker =
            medconnect_runtime::Worker::start(worker_config, medconnect::builtin_plugins()).await?;
        let settings = KafkaSettings::new(&bootstrap);
        let specs: Vec<TopicSpec> = topics.iter().map(|t| TopicSpec::regular(t, 1, 1)).collect();
        ensure_topics(&settings, &specs).await?;
        let mut props: std::collections::BTreeMap<String, String> = config
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        props.insert("producer.override.linger.ms".into(), linger.to_string());
        worker
            .herder()
            .create(connector, props.into_iter().collect(), None)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                anyhow::bail!("the {connector} listener did not start");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let overrides = [("linger.ms".to_string(), linger.to_string())].into();
        let producer = settings
            .producer_config(&overrides)
            .create()
            .context("producer")?;
        Ok(Self {
            broker,
            worker,
            producer,
        })
    }

    pub async fn stop(self) {
        self.worker.shutdown().await;
        self.broker.stop();
    }
}

/// The baseline: `senders` loops each producing `message(sender, seq)` (key, value) to `topic`
/// and awaiting its delivery, paced by `load`.
pub async fn raw_run(
    producer: rdkafka::producer::FutureProducer,
    topic: &'static str,
    senders: usize,
    seconds: u64,
    load: Load,
    message: fn(usize, u64) -> (String, Vec<u8>),
) -> anyhow::Result<Outcome> {
    drive(senders, seconds, load, move |sender, seq| {
        let producer = producer.clone();
        async move {
            let (key, value) = message(sender, seq);
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(topic)
                        .key(&key)
                        .payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
            Ok(())
        }
    })
    .await
}

/// Set in a child process of a listener bench: `port senders seconds load` of its senders.
const SENDERS_ENV: &str = "MEDCONNECT_BENCH_SENDERS";

/// The senders a child process of a listener bench runs, against the listener at `port`.
pub struct Senders {
    pub port: u16,
    pub senders: usize,
    pub seconds: u64,
    pub load: Load,
}

impl Senders {
    /// `Some` in a child started by [`in_child`].
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Ok(spec) = std::env::var(SENDERS_ENV) else {
            return Ok(None);
        };
        let parts: Vec<&str> = spec.split_whitespace().collect();
        let [port, senders, seconds, load] = parts[..] else {
            anyhow::bail!("{SENDERS_ENV}={spec}: expected `port senders seconds load`");
        };
        let load = match load {
            "max" => Load::Max,
            rate => Load::Fixed(rate.parse()?),
        };
        Ok(Some(Self {
            port: port.parse()?,
            senders: senders.parse()?,
            seconds: seconds.parse()?,
            load,
        }))
    }

    /// Hands the outcome to the parent on stdout: the elapsed time, then every latency (ns).
    pub fn report(outcome: &Outcome) {
        use std::fmt::Write;
        let mut out = format!("{}\n", outcome.elapsed.as_nanos());
        for latency in &outcome.latencies {
            let _ = writeln!(out, "{}", latency.as_nanos());
        }
        print!("{out}");
    }
}

/// Runs the senders in a child process (this program again, told so by [`SENDERS_ENV`]), with
/// its own runtime and threads, as real senders are programs of their own; the worker then
/// shares the machine's cores with them but not its runtime's threads.
pub async fn in_child(
    port: u16,
    senders: usize,
    seconds: u64,
    load: Load,
) -> anyhow::Result<Outcome> {
    let load = match load {
        Load::Max => "max".to_string(),
        Load::Fixed(rate) => rate.to_string(),
    };
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .env(SENDERS_ENV, format!("{port} {senders} {seconds} {load}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    if !output.status.success() {
        anyhow::bail!("the senders' process failed: {}", output.status);
    }
    let text = String::from_utf8(output.stdout)?;
    let mut lines = text.lines();
    let elapsed = Duration::from_nanos(
        lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("the senders' process reported nothing"))?
            .parse()?,
    );
    let latencies = lines
        .map(|line| Ok(Duration::from_nanos(line.parse()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Outcome {
        messages: latencies.len(),
        elapsed,
        latencies,
    })
}

/// What each contender did in every round of one load. The summary gives, for each, the
/// median over rounds of its rate and latencies and of its ratios to the baseline's in the same
/// round (with every round's, sorted), so one round that the machine's other load slowed
/// decides nothing.
#[derive(Default)]
pub struct Rounds {
    contenders: Vec<(&'static str, Vec<Figures>)>,
}

#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
}

impl Rounds {
    /// Runs `rounds` rounds of `contenders`, `run(i)` running contender `i` once. Each round
    /// starts with the next contender, so none always runs first or last. Prints each outcome.
    pub async fn run<F, Fut>(
        rounds: usize,
        contenders: &[&'static str],
        mut run: F,
    ) -> anyhow::Result<Self>
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Outcome>>,
    {
        let mut results = Self::default();
        for round in 0..rounds {
            for turn in 0..contenders.len() {
                let contender = (round + turn) % contenders.len();
                let outcome = run(contender).await?;
                results.add(contenders[contender], &outcome);
            }
        }
        Ok(results)
    }

    /// Prints `who`'s outcome in this round and keeps its figures.
    fn add(&mut self, who: &'static str, outcome: &Outcome) {
        outcome.print(who);
        let figures = Figures {
            rate: outcome.rate(),
            p50: ms(outcome.percentile(0.5)),
            p99: ms(outcome.percentile(0.99)),
        };
        match self.contenders.iter_mut().find(|(name, _)| *name == who) {
            Some((_, rounds)) => rounds.push(figures),
            None => self.contenders.push((who, vec![figures])),
        }
    }

    /// Medians over the rounds, and every contender's ratios to `baseline`.
    pub fn summarize(&self, baseline: &str) {
        let Some((_, base)) = self.contenders.iter().find(|(name, _)| *name == baseline) else {
            return;
        };
        let rounds = base.len();
        println!("  median of {rounds} rounds:");
        for (who, figures) in &self.contenders {
            let column = |f: fn(&Figures) -> f64| figures.iter().map(f).collect::<Vec<_>>();
            println!(
                "  {who:<22} {:>8.0} msg/s   latency p50 {:>7.2} ms  p99 {:>7.2} ms",
                median(column(|f| f.rate)),
                median(column(|f| f.p50)),
                median(column(|f| f.p99)),
            );
        }
        for (who, figures) in self.contenders.iter().filter(|(name, _)| *name != baseline) {
            let ratios = |f: fn(&Figures) -> f64| {
                figures
                    .iter()
                    .zip(base)
                    .map(|(own, base)| f(own) / f(base).max(f64::EPSILON))
                    .collect::<Vec<_>>()
            };
            let (rate, p99) = (ratios(|f| f.rate), ratios(|f| f.p99));
            println!(
                "  ratio {who}/{baseline}: throughput {:.2} (rounds {}), p99 latency {:.2} (rounds {})",
                median(rate.clone()),
                sorted(rate),
                median(p99.clone()),
                sorted(p99),
            );
        }
    }
}

/// `values` sorted, two decimals each.
fn sorted(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    values
        .iter()
        .map(|v| format!("{v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}
