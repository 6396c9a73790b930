//! HL7 over MLLP into Kafka: N concurrent senders, each waiting for its ACK as real senders
//! do, against a raw rdkafka producer awaiting each delivery with the same concurrency.
//!
//!   cargo run -p medconnect-bench --bin mllp -- [senders] [seconds] [linger.ms] [rounds]
//!
//! The raw producer sends the records the MLLP source makes (key, value, and the content type
//! and MSH fields as headers); it runs once more with the key and value alone ("no headers"),
//! so what the headers cost the client shows beside what the runtime costs.
//! `linger.ms` (default 1) is given to both producers: with senders that wait for each ACK,
//! the producer's batching delay is paid on every message.
//! Two loads for both contenders: a fixed 1,000 messages/s (latency without queueing) and the
//! maximum rate. Prints messages/s and ACK (or delivery) latency p50/p99/max, and the ratio.
//! The senders run twice: in this process (on the runtime threads the worker uses, as the issue
//! measured it), and in a process of their own (this program again), as real senders are apart
//! from the worker: the same two cores, but not the worker's runtime threads.
//! Each load runs `[rounds]` rounds (default 3), each contender once per round, each round
//! starting with the next one; the summary gives the medians over rounds and the median of the
//! ratios each round measured (with every round's): this machine's other load moves one
//! round's ratio by a third either way.
//! Each contender's CPU time per message is measured too (this process, the broker's, the
//! senders' own when apart; see `paced.rs`): unlike the rate, it hardly moves with the
//! machine's other load, and it says what each message costs beyond the raw producer's.

mod paced;
mod process;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use medconnect_hl7::mllp::client::MllpClient;
use paced::{ListenerBench, Load, Outcome, RawHeaders, Rounds, Senders, drive, in_child, raw_run};

fn adt(sender: usize, seq: u64) -> Vec<u8> {
    format!(
        "MSH|^~\\&|EPIC|GENHOSP|MEDCONNECT|DC|20261122120000||ADT^A08^ADT_A01|S{sender}N{seq}|P|2.5.1\rEVN|A08|20261122120000\rPID|1||PAT{sender:04}^^^GENHOSP^MR||DOE^JANE^Q||19800101|F|||1 MAIN ST^^BOSTON^MA^02110\rPV1|1|I|ICU^101^A|||||||MED\rOBX|1|NM|8867-4^Heart rate^LN||78|/min|||||F\r"
    )
    .into_bytes()
}

async fn mllp_run(port: u16, senders: usize, seconds: u64, load: Load) -> anyhow::Result<Outcome> {
    let mut clients = Vec::new();
    for _ in 0..senders {
        clients.push(Arc::new(tokio::sync::Mutex::new(
            MllpClient::connect("127.0.0.1", port, Duration::from_secs(10), None, 1 << 20).await?,
        )));
    }
    let clients = Arc::new(clients);
    drive(senders, seconds, load, move |sender, seq| {
        let clients = clients.clone();
        async move {
            let mut client = clients[sender].lock().await;
            let ack = client
                .request(&adt(sender, seq), Duration::from_secs(30))
                .await?;
            if !ack.windows(7).any(|w| w == b"MSA|AA|") {
                bail!("not acknowledged: {}", String::from_utf8_lossy(&ack));
            }
            Ok(())
        }
    })
    .await
}

/// An ADT message for the raw producer, keyed by patient as the MLLP source keys it.
fn raw_message(sender: usize, seq: u64) -> (String, Vec<u8>) {
    (format!("PAT{sender:04}"), adt(sender, seq))
}

/// The headers the MLLP source gives the record of [`adt`]'s message (`medconnect_hl7::message`:
/// content type and the MSH fields).
fn raw_headers(sender: usize, seq: u64, _key: &str) -> Vec<(&'static str, Vec<u8>)> {
    use medconnect_api::record::content_type;
    use medconnect_hl7::message::header;
    let text = |value: &str| value.as_bytes().to_vec();
    vec![
        (content_type::HEADER, text(content_type::HL7_V2)),
        (header::MESSAGE_TYPE, text("ADT")),
        (header::TRIGGER_EVENT, text("A08")),
        (header::MESSAGE_STRUCTURE, text("ADT_A01")),
        (header::SENDING_APPLICATION, text("EPIC")),
        (header::SENDING_FACILITY, text("GENHOSP")),
        (header::RECEIVING_APPLICATION, text("MEDCONNECT")),
        (header::RECEIVING_FACILITY, text("DC")),
        (header::CONTROL_ID, format!("S{sender}N{seq}").into_bytes()),
        (header::PROCESSING_ID, text("P")),
        (header::VERSION, text("2.5.1")),
    ]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Some(child) = Senders::from_env()? {
        let outcome = Senders::measure(mllp_run(
            child.port,
            child.senders,
            child.seconds,
            child.load,
        ))
        .await?;
        Senders::report(&outcome);
        return Ok(());
    }
    let paced::Args {
        senders,
        seconds,
        linger,
        rounds,
    } = paced::args(16)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bench = ListenerBench::start(
        &["hl7.adt", "raw.adt"],
        "bench-mllp",
        vec![
            ("connector.class", "MllpSource".to_string()),
            ("mllp.bind", "127.0.0.1".to_string()),
            ("mllp.port", port.to_string()),
            // Every sender is on this host: the per-address limit (32) would cap [senders].
            ("mllp.max.connections.per.peer", "0".to_string()),
            ("topic", "hl7.adt".to_string()),
        ],
        port,
        &linger,
    )
    .await?;
    let raw = |senders, seconds, load, headers: bool| {
        raw_run(
            bench.producer.clone(),
            "raw.adt",
            senders,
            seconds,
            load,
            raw_message,
            headers.then_some(raw_headers as RawHeaders),
        )
    };
    // Warm both paths (connections, metadata, first batch).
    mllp_run(port, 1, 1, Load::Fixed(100.0)).await?;
    raw(1, 1, Load::Fixed(100.0), true).await?;

    println!(
        "== HL7 ADT (~330 bytes) over MLLP into Kafka vs raw producer: {senders} senders, {seconds} s per run, linger.ms={linger}, {rounds} rounds, {}",
        bench.describe()
    );
    const IN_PROC: &str = "MLLP, senders in-proc";
    const APART: &str = "MLLP, senders apart";
    const RAW: &str = "raw producer";
    const RAW_BARE: &str = "raw, no headers";
    for (label, load) in [
        ("fixed 1000 msg/s", Load::Fixed(1000.0)),
        ("maximum rate", Load::Max),
    ] {
        println!("{label}:");
        let results = Rounds::run(
            rounds,
            &[IN_PROC, APART, RAW, RAW_BARE],
            bench.broker_pid(),
            |contender| {
                let raw = &raw;
                async move {
                    match contender {
                        0 => mllp_run(port, senders, seconds, load).await,
                        1 => in_child(port, senders, seconds, load).await,
                        2 => raw(senders, seconds, load, true).await,
                        _ => raw(senders, seconds, load, false).await,
                    }
                }
            },
        )
        .await?;
        results.summarize(RAW);
    }
    bench.stop().await;
    Ok(())
}
