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
    /// CPU time of the senders' own process, when they ran in one.
    pub senders_cpu: Option<Duration>,
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
        senders_cpu: None,
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

/// The bench's Kafka-API broker: a process of its own (`medconnect broker`), as Kafka is to a
/// worker in production, or, with `MEDCONNECT_BENCH_BROKER=embedded`, on this process's runtime
/// threads (how these benches ran before 2026-12-01, kept to compare with earlier figures).
enum Broker {
    Apart(crate::process::BrokerProcess),
    Embedded(medconnect_runtime::broker::EmbeddedBroker),
}

impl Broker {
    async fn start() -> anyhow::Result<Self> {
        Ok(match std::env::var("MEDCONNECT_BENCH_BROKER").as_deref() {
            Ok("embedded") => Self::Embedded(
                medconnect_runtime::broker::EmbeddedBroker::start("127.0.0.1:0".parse()?).await?,
            ),
            Ok("apart") | Err(_) => Self::Apart(crate::process::BrokerProcess::start()?),
            Ok(other) => {
                anyhow::bail!("MEDCONNECT_BENCH_BROKER={other}: expected apart or embedded")
            }
        })
    }

    fn bootstrap_servers(&self) -> String {
        match self {
            Self::Apart(broker) => broker.bootstrap_servers().to_string(),
            Self::Embedded(broker) => broker.bootstrap_servers(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Apart(broker) => Some(broker.pid()),
            Self::Embedded(_) => None,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Self::Apart(_) => "broker in a process of its own",
            Self::Embedded(_) => "broker embedded in this process",
        }
    }
}

/// A broker, an in-process worker running one listener source, and a raw producer with the
/// worker's producer settings (`linger.ms` given to both) for the baseline.
pub struct ListenerBench {
    broker: Broker,
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
        let broker = Broker::start().await?;
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

    /// The broker's process, when it runs in one of its own (its CPU time is then measured).
    pub fn broker_pid(&self) -> Option<u32> {
        self.broker.pid()
    }

    pub fn describe(&self) -> &'static str {
        self.broker.describe()
    }

    pub async fn stop(self) {
        self.worker.shutdown().await;
        if let Broker::Embedded(broker) = self.broker {
            broker.stop();
        }
    }
}

/// The headers of the record a listener makes of one message: what the raw producer adds to
/// the key and value so that both contenders write the same records to Kafka. Given the sender,
/// the message's number and its key.
pub type RawHeaders = fn(usize, u64, &str) -> Vec<(&'static str, Vec<u8>)>;

/// The baseline: `senders` loops each producing `message(sender, seq)` (key, value) to `topic`
/// with `headers(sender, seq, key)`, awaiting its delivery, paced by `load`. Without `headers`, the
/// key and value alone, and no headers are built: what the listener's record carries beyond
/// them then shows as the gap between the two raw runs.
pub async fn raw_run(
    producer: rdkafka::producer::FutureProducer,
    topic: &'static str,
    senders: usize,
    seconds: u64,
    load: Load,
    message: fn(usize, u64) -> (String, Vec<u8>),
    headers: Option<RawHeaders>,
) -> anyhow::Result<Outcome> {
    use rdkafka::message::{Header, OwnedHeaders};
    drive(senders, seconds, load, move |sender, seq| {
        let producer = producer.clone();
        async move {
            let (key, value) = message(sender, seq);
            let mut record = rdkafka::producer::FutureRecord::to(topic)
                .key(&key)
                .payload(&value);
            if let Some(headers) = headers {
                let headers = headers(sender, seq, &key);
                let mut owned = OwnedHeaders::new_with_capacity(headers.len());
                for (key, value) in &headers {
                    owned = owned.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                record = record.headers(owned);
            }
            producer
                .send(record, Duration::from_secs(30))
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

    /// Runs the senders with `run`, measuring the CPU time this process spends on them.
    pub async fn measure<Fut>(run: Fut) -> anyhow::Result<Outcome>
    where
        Fut: std::future::Future<Output = anyhow::Result<Outcome>>,
    {
        let before = crate::process::own_cpu_time()?;
        let mut outcome = run.await?;
        outcome.senders_cpu = Some(crate::process::own_cpu_time()? - before);
        Ok(outcome)
    }

    /// Hands the outcome to the parent on stdout: the elapsed time, the senders' CPU time,
    /// then every latency (ns).
    pub fn report(outcome: &Outcome) {
        use std::fmt::Write;
        let mut out = format!(
            "{}\n{}\n",
            outcome.elapsed.as_nanos(),
            outcome.senders_cpu.unwrap_or_default().as_nanos()
        );
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
    let mut next_nanos = || -> anyhow::Result<Duration> {
        let line = lines
            .next()
            .ok_or_else(|| anyhow::anyhow!("the senders' process reported too little"))?;
        Ok(Duration::from_nanos(line.parse()?))
    };
    let elapsed = next_nanos()?;
    let senders_cpu = next_nanos()?;
    let latencies = lines
        .map(|line| Ok(Duration::from_nanos(line.parse()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Outcome {
        messages: latencies.len(),
        elapsed,
        latencies,
        senders_cpu: Some(senders_cpu),
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
    /// CPU time per message (µs) of this process (worker or raw producer, and in-process
    /// senders), of the broker's process (0 when embedded) and of the senders' own process.
    cpu: [f64; 3],
}

impl Figures {
    fn total_cpu(&self) -> f64 {
        self.cpu.iter().sum()
    }
}

impl Rounds {
    /// Runs `rounds` rounds of `contenders`, `run(i)` running contender `i` once. Each round
    /// starts with the next contender, so none always runs first or last. Prints each outcome.
    /// The CPU time of this process and of `broker`'s is measured around each run.
    pub async fn run<F, Fut>(
        rounds: usize,
        contenders: &[&'static str],
        broker: Option<u32>,
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
                let before = crate::process::CpuMark::now(broker)?;
                let outcome = run(contender).await?;
                let used = before.used(broker)?;
                results.add(contenders[contender], &outcome, used);
            }
        }
        Ok(results)
    }

    /// Prints `who`'s outcome in this round and keeps its figures.
    fn add(&mut self, who: &'static str, outcome: &Outcome, used: crate::process::CpuMark) {
        outcome.print(who);
        let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / outcome.messages.max(1) as f64;
        let figures = Figures {
            rate: outcome.rate(),
            p50: ms(outcome.percentile(0.5)),
            p99: ms(outcome.percentile(0.99)),
            cpu: [
                per_message(used.own),
                per_message(used.broker),
                per_message(outcome.senders_cpu.unwrap_or_default()),
            ],
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
                "  {who:<22} {:>8.0} msg/s   latency p50 {:>7.2} ms  p99 {:>7.2} ms   CPU per message {:>5.1} µs (this process {:.1}, broker {:.1}, senders' process {:.1})",
                median(column(|f| f.rate)),
                median(column(|f| f.p50)),
                median(column(|f| f.p99)),
                median(column(|f| f.total_cpu())),
                median(column(|f| f.cpu[0])),
                median(column(|f| f.cpu[1])),
                median(column(|f| f.cpu[2])),
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
            let (rate, p99, cpu) = (
                ratios(|f| f.rate),
                ratios(|f| f.p99),
                ratios(|f| f.total_cpu()),
            );
            println!(
                "  ratio {who}/{baseline}: throughput {:.2} (rounds {}), p99 latency {:.2} (rounds {}), CPU per message {:.2} (rounds {})",
                median(rate.clone()),
                sorted(rate),
                median(p99.clone()),
                sorted(p99),
                median(cpu.clone()),
                sorted(cpu),
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
