//! The PostgreSQL sink against `COPY` of the same rows into a table of the same shape, in the
//! same run, on a server of its own (Debian's postgresql-15, `scripts/postgres-peers`).
//!
//!   cargo run -p medconnect-bench --bin postgres -- [rows] [batch.size] [rounds]
//!
//! Without `batch.size` the sink runs with its default (`batch.size` and `batch.max.bytes`
//! unset), and the COPY in transactions uses that default's rows.
//!
//! The sink task is driven as the engine drives it (`put` in batches of 500, then `flush`),
//! without Kafka: this measures the sink itself, with `insert.mode=upsert` and `pk.mode=kafka`
//! (the idempotent setting) and with plain `insert` without a key. `COPY ... FROM STDIN` gets
//! the same rows already rendered as COPY text, in one stream: the fastest way in, the bound.
//! The same COPY cut into transactions of `batch.size` rows, a commit each as the sink makes,
//! is printed too: what the server alone does at that transaction size, no client work.
//! Tables are emptied between runs; each contender runs `rounds` times (3), alternated, and
//! the best run counts. Prints rows/s and the ratios, and checks every row arrived.

mod postgres_server;

use std::time::Instant;

use anyhow::{Context, bail};
use medconnect_api::{
    ErrantRecordReporter, Props, Record, SinkPartitions, SinkRecord, SinkTask, SinkTaskContext,
};
use medconnect_postgres::PostgresSinkTask;
use medconnect_postgres::config::DEFAULT_BATCH_SIZE;
use postgres_server::Server;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// Records handed to one `put`, as the engine's sink batches.
const PUT_BATCH: usize = 500;

fn records(count: usize) -> Vec<SinkRecord> {
    (0..count)
        .map(|n| {
            let value = format!(
                r#"{{"patient_id":"MRN{:08}","hr":{},"spo2":{},"temp":36.{},"alarm":{},"observed_at":"2024-01-01T12:{:02}:{:02}Z","ward":"ICU"}}"#,
                n % 5000,
                60 + n % 40,
                90 + n % 10,
                n % 10,
                n % 3 == 0,
                (n / 60) % 60,
                n % 60
            );
            SinkRecord {
                record: Record::new("vitals").with_value(value),
                kafka_partition: 0,
                kafka_offset: n as i64,
            }
        })
        .collect()
}

/// The same rows as COPY text, in the sink's column order (the `kafka` key columns if
/// `keyed`, then the fields sorted by name).
fn copy_text(records: &[SinkRecord], keyed: bool) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(records.len() * 120);
    for record in records {
        let value: serde_json::Value =
            serde_json::from_slice(record.record.value.as_deref().unwrap_or_default())?;
        let map = value.as_object().context("an object")?;
        let mut line = String::new();
        if keyed {
            line = format!(
                "{}\t{}\t{}\t",
                record.record.topic, record.kafka_partition, record.kafka_offset
            );
        }
        let mut fields: Vec<(&String, &serde_json::Value)> = map.iter().collect();
        fields.sort_by(|a, b| a.0.cmp(b.0));
        for (n, (_, field)) in fields.into_iter().enumerate() {
            if n > 0 {
                line.push('\t');
            }
            match field {
                serde_json::Value::String(s) => line.push_str(s),
                other => line.push_str(&other.to_string()),
            }
        }
        line.push('\n');
        out.extend_from_slice(line.as_bytes());
    }
    Ok(out)
}

fn sink(url: &str, settings: &[(&str, &str)]) -> anyhow::Result<PostgresSinkTask> {
    let mut config: Props = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config.insert("connection.url".into(), url.to_string());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    Ok(PostgresSinkTask::new(SinkTaskContext {
        connector_name: "bench".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })?)
}

async fn count(connection: &mut PgConnection, table: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\""))
            .fetch_one(connection)
            .await?,
    )
}

/// Rows/s of the sink writing `records` into an empty table.
async fn run_sink(
    url: &str,
    settings: &[(&str, &str)],
    records: &[SinkRecord],
    admin: &mut PgConnection,
    table: &str,
) -> anyhow::Result<f64> {
    sqlx::raw_sql(&format!("TRUNCATE \"{table}\""))
        .execute(&mut *admin)
        .await?;
    let mut task = sink(url, settings)?;
    // The engine hands `put` records it owns: copying them is the bench's work, not timed.
    let batches: Vec<Vec<SinkRecord>> = records.chunks(PUT_BATCH).map(<[_]>::to_vec).collect();
    // On a worker thread, as the engine runs a sink task (`tokio::spawn`): driven by
    // `block_on` on the main thread, it waited for a worker to hand over each socket wake-up.
    let elapsed = tokio::spawn(async move {
        task.start().await?;
        let started = Instant::now();
        for batch in batches {
            task.put(batch).await?;
        }
        task.flush().await?;
        let elapsed = started.elapsed().as_secs_f64();
        task.stop().await?;
        anyhow::Ok(elapsed)
    })
    .await??;
    let rows = count(admin, table).await?;
    if rows != records.len() as i64 {
        bail!("the sink wrote {rows} rows of {}", records.len());
    }
    Ok(records.len() as f64 / elapsed)
}

/// Rows/s of COPY of the pre-rendered rows into an empty table: one COPY (one transaction)
/// per element of `transactions`.
async fn run_copy(
    admin: &mut PgConnection,
    table: &str,
    transactions: &[&[u8]],
    expected: usize,
) -> anyhow::Result<f64> {
    sqlx::raw_sql(&format!("TRUNCATE \"{table}\""))
        .execute(&mut *admin)
        .await?;
    let statement = format!("COPY \"{table}\" FROM STDIN");
    let started = Instant::now();
    let mut rows = 0;
    for text in transactions {
        let mut copy = admin.copy_in_raw(&statement).await?;
        for chunk in text.chunks(1 << 20) {
            copy.send(chunk).await?;
        }
        rows += copy.finish().await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if rows != expected as u64 {
        bail!("COPY wrote {rows} rows of {expected}");
    }
    Ok(expected as f64 / elapsed)
}

/// COPY text cut into transactions of `rows` lines.
fn transactions(text: &[u8], rows: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(rows - 1)
            .map_or(rest.len(), |(at, _)| at + 1);
        let (head, tail) = rest.split_at(end);
        out.push(head);
        rest = tail;
    }
    out
}

fn arg(n: usize, default: usize) -> anyhow::Result<usize> {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().context("a number"))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = arg(1, 200_000)?;
    // Given, the sink is configured with it; not given, the sink's default is measured.
    let given = std::env::args().nth(2).is_some();
    let batch = arg(2, DEFAULT_BATCH_SIZE)?.max(1);
    let rounds = arg(3, 3)?.max(1);
    let batch_size = batch.to_string();
    let server = Server::start()?;
    let url = server.url();
    let mut admin = PgConnection::connect(&url).await?;
    let records = records(rows);
    let keyed_text = copy_text(&records, true)?;
    let plain_text = copy_text(&records, false)?;
    let keyed_batches = transactions(&keyed_text, batch);
    let plain_batches = transactions(&plain_text, batch);

    let mut upsert = vec![
        ("table.name.format", "upsert_${topic}"),
        ("insert.mode", "upsert"),
        ("pk.mode", "kafka"),
        ("auto.create", "true"),
    ];
    let mut insert = vec![
        ("table.name.format", "insert_${topic}"),
        ("insert.mode", "insert"),
        ("pk.mode", "none"),
        ("auto.create", "true"),
    ];
    if given {
        upsert.push(("batch.size", batch_size.as_str()));
        insert.push(("batch.size", batch_size.as_str()));
    }
    // The tables, created by the sink from a first record; COPY targets of the same shapes.
    for settings in [&upsert[..], &insert[..]] {
        let mut task = sink(&url, settings)?;
        task.start().await?;
        task.put(records[..1].to_vec()).await?;
        task.flush().await?;
        task.stop().await?;
    }
    sqlx::raw_sql(
        "CREATE TABLE copy_keyed (LIKE upsert_vitals INCLUDING ALL); \
         CREATE TABLE copy_plain (LIKE insert_vitals INCLUDING ALL);",
    )
    .execute(&mut admin)
    .await?;

    let (mut best_upsert, mut best_insert, mut best_copy_keyed, mut best_copy_plain) =
        (0f64, 0f64, 0f64, 0f64);
    let (mut best_batched_keyed, mut best_batched_plain) = (0f64, 0f64);
    for _ in 0..rounds {
        best_copy_keyed = best_copy_keyed
            .max(run_copy(&mut admin, "copy_keyed", &[&keyed_text[..]], rows).await?);
        best_upsert =
            best_upsert.max(run_sink(&url, &upsert, &records, &mut admin, "upsert_vitals").await?);
        best_batched_keyed =
            best_batched_keyed.max(run_copy(&mut admin, "copy_keyed", &keyed_batches, rows).await?);
        best_copy_plain = best_copy_plain
            .max(run_copy(&mut admin, "copy_plain", &[&plain_text[..]], rows).await?);
        best_insert =
            best_insert.max(run_sink(&url, &insert, &records, &mut admin, "insert_vitals").await?);
        best_batched_plain =
            best_batched_plain.max(run_copy(&mut admin, "copy_plain", &plain_batches, rows).await?);
    }
    let _ = admin.close().await;
    drop(server);

    let which = if given { "" } else { " (the default)" };
    println!(
        "{rows} rows of 10 columns (3 key + 7 fields), batch.size {batch_size}{which}, best of {rounds}:"
    );
    println!(
        "  keyed (primary key __connect_*):  sink upsert {:>9.0} rows/s   COPY {:>9.0} rows/s   ratio {:.2}",
        best_upsert,
        best_copy_keyed,
        best_upsert / best_copy_keyed
    );
    println!(
        "  no key:                           sink insert {:>9.0} rows/s   COPY {:>9.0} rows/s   ratio {:.2}",
        best_insert,
        best_copy_plain,
        best_insert / best_copy_plain
    );
    println!(
        "  COPY in transactions of {batch_size} rows (one commit per batch, as the sink): keyed {:.0} rows/s ({:.2} of COPY, the sink {:.2} of it), no key {:.0} rows/s ({:.2}, the sink {:.2})",
        best_batched_keyed,
        best_batched_keyed / best_copy_keyed,
        best_upsert / best_batched_keyed,
        best_batched_plain,
        best_batched_plain / best_copy_plain,
        best_insert / best_batched_plain
    );
    Ok(())
}
