//! The PostgreSQL CDC source against `pg_recvlogical` reading the same changes, in the same
//! run, on a server of its own (Debian's postgresql-15, `scripts/postgres-peers`).
//!
//!   cargo run -p medconnect-bench --bin postgres-cdc -- [inserts] [updates]
//!
//! Two logical slots (pgoutput) are created before the changes are written, so both hold the
//! same changes: `inserts` rows inserted and `updates` rows updated, in transactions of 100.
//! Each reader is timed from its connection to its last change, one after the other.
//! `pg_recvlogical` (PostgreSQL's own client, C) streams its slot to `/dev/null` until the WAL
//! position after the last change: the raw replication read, the bound. The CDC task streams
//! the other, driven as the engine drives it (`poll`, then `commit` with the offsets of what it
//! returned), without Kafka: it decodes every change and builds its record (JSON envelope,
//! key, offset). Prints changes/s of both and the ratio, and checks the count.

mod postgres_server;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use medconnect_api::{OffsetReader, SourceOffset, SourcePartition, SourceTask, SourceTaskContext};
use medconnect_postgres::PostgresCdcSourceTask;
use postgres_server::Server;
use sqlx::Connection;
use sqlx::postgres::PgConnection;

struct NoOffsets;

impl OffsetReader for NoOffsets {
    fn offset(&self, _: &SourcePartition) -> Option<SourceOffset> {
        None
    }
}

fn arg(n: usize, default: u64) -> anyhow::Result<u64> {
    std::env::args()
        .nth(n)
        .map(|a| a.parse().context("a number"))
        .transpose()
        .map(|v| v.unwrap_or(default))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let inserts = arg(1, 200_000)?;
    let updates = arg(2, 100_000)?.min(inserts);
    let server = Server::start()?;
    let url = server.url();
    let mut admin = PgConnection::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE obs (id bigint PRIMARY KEY, patient text NOT NULL, hr int, spo2 int, \
           temp numeric(4,1), observed_at timestamptz NOT NULL, note text); \
         CREATE PUBLICATION bench_pub FOR TABLE obs;",
    )
    .execute(&mut admin)
    .await?;
    for slot in ["raw", "cdc"] {
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(slot)
            .execute(&mut admin)
            .await?;
    }

    let config = [
        ("connection.url", url.as_str()),
        ("slot.name", "cdc"),
        ("publication.name", "bench_pub"),
        ("snapshot.mode", "never"),
        ("topic.prefix", "bench"),
        ("heartbeat.interval.ms", "0"),
    ];
    let mut task = PostgresCdcSourceTask::new(SourceTaskContext {
        connector_name: "bench".into(),
        task_id: 0,
        config: medconnect_api::props_from(&config),
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    })?;
    let written = Instant::now();
    for first in (0..inserts).step_by(100) {
        let last = (first + 100).min(inserts);
        sqlx::raw_sql(&format!(
            "INSERT INTO obs SELECT g, 'MRN' || lpad((g % 5000)::text, 8, '0'), 60 + g % 40, 90 + g % 10, \
               36.5 + (g % 10) / 10.0, '2024-01-01 12:00:00+00'::timestamptz + g * interval '1 second', \
               CASE WHEN g % 7 = 0 THEN 'rechecked' END \
             FROM generate_series({first}, {}) g",
            last - 1
        ))
        .execute(&mut admin)
        .await?;
    }
    for first in (0..updates).step_by(100) {
        let last = (first + 100).min(updates);
        sqlx::raw_sql(&format!(
            "UPDATE obs SET hr = hr + 1, note = 'updated' WHERE id >= {first} AND id < {last}"
        ))
        .execute(&mut admin)
        .await?;
    }
    let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut admin)
        .await?;
    let changes = inserts + updates;
    println!(
        "{changes} changes ({inserts} inserts, {updates} updates, 100 a transaction) written in {:.1}s; WAL end {end}",
        written.elapsed().as_secs_f64()
    );

    // The bound: PostgreSQL's own client reading the same changes from its slot.
    let raw_started = Instant::now();
    let status = std::process::Command::new(server.program("pg_recvlogical"))
        .args([
            "-d",
            &url,
            "--slot",
            "raw",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=bench_pub"])
        .args(["-E", &end])
        .status()?;
    let raw_seconds = raw_started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }

    // The task connects and streams from its slot's start: timed as pg_recvlogical is.
    let started = Instant::now();
    task.start().await?;
    let mut got = 0u64;
    let mut bytes = 0usize;
    while got < changes {
        let records = task.poll().await?;
        let stored: Vec<(SourcePartition, SourceOffset)> = records
            .last()
            .map(|r| vec![(r.source_partition.clone(), r.source_offset.clone())])
            .unwrap_or_default();
        for record in &records {
            bytes += record.record.value.as_ref().map_or(0, |v| v.len());
        }
        got += records
            .iter()
            .filter(|r| r.record.topic == "bench.public.obs")
            .count() as u64;
        task.commit(&stored).await?;
        if started.elapsed().as_secs() > 600 {
            bail!("only {got} of {changes} changes in 10 minutes");
        }
    }
    let cdc_seconds = started.elapsed().as_secs_f64();
    task.stop().await?;
    if got != changes {
        bail!("the CDC task returned {got} changes, {changes} were written");
    }
    let _ = admin.close().await;
    drop(server);

    let cdc_rate = changes as f64 / cdc_seconds;
    let raw_rate = changes as f64 / raw_seconds;
    println!(
        "  CDC task (decode + JSON envelope + record): {cdc_rate:>9.0} changes/s ({cdc_seconds:.2}s, {} MB of values)",
        bytes / 1_000_000
    );
    println!(
        "  pg_recvlogical (raw pgoutput to /dev/null): {raw_rate:>9.0} changes/s ({raw_seconds:.2}s)"
    );
    println!("  ratio {:.2}", cdc_rate / raw_rate);
    Ok(())
}
