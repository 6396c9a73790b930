//! What the benches that run `medconnect` as separate processes share.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `medconnect` binary built beside this bench.
pub fn medconnect_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("medconnect");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build -p medconnect --bin medconnect)",
            path.display()
        );
    }
    Ok(path)
}

/// A port free on 127.0.0.1 a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Creates a connector through the REST API of the worker at `base` and returns how long the
/// request that created it took. A worker that has not joined its group yet answers 409, as
/// Connect does; like a client, this tries again (for up to 30 s).
#[allow(dead_code)] // `cluster` creates through a chosen worker and reports a 409 as it comes
pub async fn create_connector(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> anyhow::Result<std::time::Duration> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let started = std::time::Instant::now();
        let response = client
            .post(format!("{base}/connectors"))
            .json(body)
            .send()
            .await?;
        match response.status().as_u16() {
            201 => return Ok(started.elapsed()),
            409 if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            code => bail!(
                "creating a connector failed: {code} {}",
                response.text().await?
            ),
        }
    }
}

/// CPU time (user + system) process `pid` has used so far, threads that ended included:
/// `/proc/<pid>/stat`, in the kernel's USER_HZ of 100 ticks a second (on every platform Rust
/// targets here).
#[allow(dead_code)] // `cluster` reads no CPU time
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("short stat line")?.parse()?)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// CPU time this process has used so far, threads that ended included (see [`cpu_time`]).
#[allow(dead_code)] // `cluster` and `tasks` read none of their own
pub fn own_cpu_time() -> anyhow::Result<Duration> {
    cpu_time(std::process::id())
}

/// CPU time used so far by this process and by the broker's, when it runs in a process of its
/// own (zero otherwise: an embedded broker's time is this process's).
#[allow(dead_code)] // `cluster`, `sink` and `tasks` measure none this way
#[derive(Clone, Copy)]
pub struct CpuMark {
    pub own: Duration,
    pub broker: Duration,
}

#[allow(dead_code)]
impl CpuMark {
    pub fn now(broker: Option<u32>) -> anyhow::Result<Self> {
        Ok(Self {
            own: own_cpu_time()?,
            broker: broker.map(cpu_time).transpose()?.unwrap_or_default(),
        })
    }

    /// What was used since this mark.
    pub fn used(&self, broker: Option<u32>) -> anyhow::Result<Self> {
        let now = Self::now(broker)?;
        Ok(Self {
            own: now.own.saturating_sub(self.own),
            broker: now.broker.saturating_sub(self.broker),
        })
    }
}

/// A child process, killed (and reaped) when dropped.
#[allow(dead_code)] // `cluster` and `sink` start none this way
pub struct ChildProcess(pub Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The embedded Kafka-API broker as a process of its own (`medconnect broker`), as Kafka is
/// to a worker in production: its threads do not share a runtime, or the bench's CPU time,
/// with what is measured. Killed when dropped.
#[allow(dead_code)] // only some benches run their broker apart
pub struct BrokerProcess {
    child: ChildProcess,
    bootstrap: String,
}

#[allow(dead_code)]
impl BrokerProcess {
    /// Starts the broker on a free port and returns once it accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let bootstrap = format!("127.0.0.1:{port}");
        let mut broker = Self {
            child: ChildProcess(
                Command::new(medconnect_binary()?)
                    .args(["broker", "--listen", &bootstrap])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ),
            bootstrap,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = broker.child.0.try_wait()? {
                bail!("the broker exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("the broker did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(broker)
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}
