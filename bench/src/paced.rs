//! Paced load for the request/acknowledge benches (MLLP, MQTT): N senders, each waiting for
//! its acknowledgement before the next message, at a fixed total rate or as fast as they can;
//! every latency kept for percentiles.

use std::time::{Duration, Instant};

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
