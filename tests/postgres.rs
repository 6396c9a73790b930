//! PostgreSQL connectors in real workers against a real broker, on a PostgreSQL 15 of the
//! test's own (`scripts/postgres-peers`, `wal_level=logical`):
//! - the sink: datagen vitals through Kafka (3 partitions) into a table the sink creates. Every
//!   record lands once, keyed by its Kafka position, and the committed offsets reach the end;
//! - the CDC source, crash-tested: changes committed while a worker process (its own, the
//!   broker in another) streams them, the worker SIGKILLed mid-stream and started again. No
//!   change is lost; the duplicates are counted and printed (`crash:` line); the slot's
//!   `confirmed_flush_lsn` at the kill is not past the offset stored in the offset topic.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use medconnect_e2e::{TestCluster, eventually, json};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

/// A server initdb'd into a temporary directory on a free port, stopped on drop; as root it
/// runs as `postgres` (PostgreSQL refuses root).
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
}

fn id_of(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl Postgres {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn start() -> Self {
        let bin = std::env::var_os("MEDCONNECT_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert!(
            bin.join("postgres").is_file(),
            "PostgreSQL missing in {}: run scripts/postgres-peers",
            bin.display()
        );
        let user = (id_of(&["-u"]) == Some(0)).then(|| {
            (
                id_of(&["-u", "postgres"]).expect("a postgres user"),
                id_of(&["-g", "postgres"]).expect("a postgres group"),
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("medconnect-pg-e2e")
            .tempdir()
            .expect("a temporary directory");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let server = Self {
            dir,
            bin,
            user,
            port,
        };
        let data = server.dir.path().join("data");
        let initdb = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "medconnect", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .status()
            .expect("run initdb");
        assert!(initdb.success(), "initdb: {initdb}");
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c wal_level=logical",
            server.dir.path().display()
        );
        let started = server
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(server.dir.path().join("server.log"))
            .args(["-w", "-o", &options])
            .status()
            .expect("run pg_ctl");
        assert!(started.success(), "pg_ctl start: {started}");
        server
    }

    fn url(&self) -> String {
        format!("postgres://medconnect@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w"])
            .status();
    }
}

async fn rows(url: &str) -> Option<(i64, i64)> {
    let mut connection = PgConnection::connect(url).await.ok()?;
    let counted: (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (__connect_partition, __connect_offset)) FROM vitals",
    )
    .fetch_one(&mut connection)
    .await
    .ok()?;
    let _ = connection.close().await;
    Some(counted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vitals_become_rows_once_each_and_the_offsets_are_committed() -> anyhow::Result<()> {
    let postgres = Postgres::start();
    let url = postgres.url();
    let cluster = TestCluster::start().await?;
    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create(
            "vitals-in",
            json!({"connector.class": "DatagenSource", "topic": "vitals", "rate": "0",
                   "max.records": "3000", "topic.creation.default.partitions": "3"}),
        )
        .await?;
    worker
        .rest
        .create(
            "vitals-registry",
            json!({"connector.class": "PostgresSink", "topics": "vitals",
                   "connection.url": url, "insert.mode": "upsert", "pk.mode": "kafka",
                   "auto.create": "true", "auto.evolve": "true", "batch.size": "500"}),
        )
        .await?;
    worker
        .wait_for_state("vitals-registry", "RUNNING", 1)
        .await?;

    let (count, distinct) = eventually("3,000 rows in vitals", async || {
        rows(&url).await.filter(|(n, _)| *n >= 3000)
    })
    .await?;
    assert_eq!((count, distinct), (3000, 3000), "each record once");

    eventually("offsets committed up to the end", async || {
        let (_, offsets) = worker
            .rest
            .get("/connectors/vitals-registry/offsets")
            .await
            .ok()?;
        let total: i64 = offsets["offsets"]
            .as_array()?
            .iter()
            .filter_map(|o| o["offset"]["kafka_offset"].as_i64())
            .sum();
        (total == 3000).then_some(())
    })
    .await?;
    let (_, status) = worker
        .rest
        .get("/connectors/vitals-registry/status")
        .await?;
    assert_eq!(status["tasks"][0]["state"], "RUNNING");
    worker.shutdown().await;
    Ok(())
}

/// The sink's dead-letter queue end to end: 200 records of which two break a CHECK
/// constraint, one a NOT NULL and one is not JSON. Exactly those four land in the
/// dead-letter topic with `__connect.errors.*` headers naming their position and the SQLSTATE
/// or the parse error; the 196 others are rows; offsets are committed to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_land_alone_in_the_dead_letter_topic() -> anyhow::Result<()> {
    let postgres = Postgres::start();
    let url = postgres.url();
    {
        let mut connection = PgConnection::connect(&url).await?;
        sqlx::raw_sql(
            "CREATE TABLE readings (id bigint PRIMARY KEY, \
               hr int NOT NULL CONSTRAINT hr_plausible CHECK (hr BETWEEN 20 AND 300), ward text)",
        )
        .execute(&mut connection)
        .await?;
        let _ = connection.close().await;
    }
    let cluster = TestCluster::start().await?;
    let bad: [(i64, &str); 4] = [
        (37, r#"{"id":37,"hr":999,"ward":"icu"}"#),
        (111, r#"{"id":111,"hr":5,"ward":"icu"}"#),
        (150, r#"{"id":150,"hr":null,"ward":"icu"}"#),
        (180, "not json"),
    ];
    let values: Vec<String> = (0..200i64)
        .map(|n| match bad.iter().find(|(id, _)| *id == n) {
            Some((_, value)) => value.to_string(),
            None => format!(r#"{{"id":{n},"hr":{},"ward":"icu"}}"#, 60 + n % 40),
        })
        .collect();
    let records: Vec<(Option<&str>, &str)> = values.iter().map(|v| (None, v.as_str())).collect();
    cluster.produce("readings", &records).await?;
    let worker = cluster.start_worker().await?;
    worker
        .rest
        .create(
            "readings-sink",
            json!({"connector.class": "PostgresSink", "topics": "readings",
                   "connection.url": url, "insert.mode": "upsert", "pk.mode": "record_value",
                   "pk.fields": "id", "batch.size": "50", "errors.tolerance": "all",
                   "errors.deadletterqueue.topic.name": "readings.dlq",
                   "errors.deadletterqueue.context.headers.enable": "true"}),
        )
        .await?;
    let dead = cluster.read_topic("readings.dlq", 4).await?;
    let offsets: Vec<i64> = dead
        .iter()
        .filter_map(|r| r.header("__connect.errors.offset")?.parse().ok())
        .collect();
    assert_eq!(
        offsets,
        [37, 111, 150, 180],
        "exactly the refused records, in order"
    );
    for record in &dead[..2] {
        let message = record
            .header("__connect.errors.exception.message")
            .unwrap_or_default();
        assert!(
            message.contains("23514") && message.contains("hr_plausible"),
            "{message}"
        );
        assert!(
            !message.contains("999"),
            "no row values in the error: {message}"
        );
    }
    let not_null = dead[2]
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(not_null.contains("23502"), "{not_null}");
    let not_json = dead[3]
        .header("__connect.errors.exception.message")
        .unwrap_or_default();
    assert!(not_json.contains("not JSON"), "{not_json}");
    assert_eq!(
        dead[3].value.as_deref(),
        Some("not json"),
        "the record as it was"
    );

    let rows = eventually("196 rows", async || {
        let mut connection = PgConnection::connect(&url).await.ok()?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
            .fetch_one(&mut connection)
            .await
            .ok()?;
        let _ = connection.close().await;
        (n >= 196).then_some(n)
    })
    .await?;
    assert_eq!(rows, 196);
    eventually("offsets committed up to the end", async || {
        let (_, offsets) = worker
            .rest
            .get("/connectors/readings-sink/offsets")
            .await
            .ok()?;
        let committed: i64 = offsets["offsets"]
            .as_array()?
            .iter()
            .filter_map(|o| o["offset"]["kafka_offset"].as_i64())
            .sum();
        (committed == 200).then_some(())
    })
    .await?;
    assert_eq!(
        cluster.count_records("readings.dlq").await?,
        4,
        "nothing else dead-lettered"
    );
    worker.shutdown().await;
    Ok(())
}

/// The query-mode source in a real worker: 701 rows (one of them committed after 200 later
/// ones), then the worker stopped, 300 more rows, the worker started again from the offsets it
/// stored in the offset topic: 1,001 records, each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_source_reads_late_commits_and_resumes_after_a_restart() -> anyhow::Result<()> {
    let postgres = Postgres::start();
    let url = postgres.url();
    let execute = async |sql: &str| -> anyhow::Result<()> {
        let mut connection = PgConnection::connect(&url).await?;
        sqlx::Executor::execute(&mut connection, sql).await?;
        let _ = connection.close().await;
        Ok(())
    };
    execute(
        "CREATE TABLE lab (id bigserial PRIMARY KEY, result text, at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO lab (result) SELECT 'early' FROM generate_series(1, 500)",
    )
    .await?;
    let cluster = TestCluster::start().await?;
    let config = cluster.worker_config();
    let worker = cluster.start_worker_with(config.clone()).await?;
    worker
        .rest
        .create(
            "lab-results",
            json!({"connector.class": "PostgresSource", "connection.url": url,
                   "mode": "timestamp+incrementing", "table.whitelist": "lab",
                   "timestamp.column.name": "at", "incrementing.column.name": "id",
                   "topic.prefix": "pg.", "poll.interval.ms": "100", "batch.max.rows": "100"}),
        )
        .await?;
    // T1 takes id 501 and stays open while 200 later rows commit.
    let mut t1 = PgConnection::connect(&url).await?;
    sqlx::Executor::execute(&mut t1, "BEGIN; INSERT INTO lab (result) VALUES ('late')").await?;
    execute("INSERT INTO lab (result) SELECT 'later' FROM generate_series(1, 200)").await?;
    sqlx::Executor::execute(&mut t1, "COMMIT").await?;
    let _ = t1.close().await;
    let stored = async |worker: &medconnect_e2e::TestWorker| -> Option<i64> {
        let (_, offsets) = worker
            .rest
            .get("/connectors/lab-results/offsets")
            .await
            .ok()?;
        offsets["offsets"]
            .as_array()?
            .iter()
            .find_map(|o| o["offset"]["incrementing"].as_i64())
    };
    eventually("the offset of row 701 stored", async || {
        (stored(&worker).await == Some(701)).then_some(())
    })
    .await?;
    worker.shutdown().await;

    execute("INSERT INTO lab (result) SELECT 'while stopped' FROM generate_series(1, 300)").await?;
    let worker = cluster.start_worker_with(config).await?;
    eventually("the offset of row 1001 stored", async || {
        (stored(&worker).await == Some(1001)).then_some(())
    })
    .await?;
    let records = cluster.read_all("pg.lab").await?;
    let ids: Vec<i64> = records
        .iter()
        .filter_map(|r| r.json()["id"].as_i64())
        .collect();
    let distinct: std::collections::BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), 1001, "every row");
    assert_eq!(distinct.first().zip(distinct.last()), Some((&1, &1001)));
    assert!(!distinct.contains(&0));
    assert_eq!(ids.len(), 1001, "no row twice");
    worker.shutdown().await;
    Ok(())
}

mod cdc_crash {
    //! The CDC source's crash test. The worker that is killed runs in a process of its own:
    //! `medconnect worker`.

    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::{Duration, Instant};

    use anyhow::{Context, ensure};
    use medconnect_e2e::crash::{
        OFFSETS_TOPIC, Processes, Read, read_all, report_line, start_broker, start_worker,
        write_worker_config,
    };
    use medconnect_e2e::{Rest, eventually, json};
    use serde_json::Value;
    use sqlx::Connection;
    use sqlx::postgres::PgConnection;

    use super::Postgres;

    const CONNECTOR: &str = "crash-ehr-cdc";
    const TOPIC: &str = "crash.public.events";
    const SLOT: &str = "crash_cdc";
    /// Transactions committed while the worker streams: each inserts a row, every 4th also
    /// updates the row before it, every 10th also deletes the row five before it.
    const TRANSACTIONS: i64 = 2_000;
    /// Rows in the table before the connector starts: the snapshot reads them.
    const SNAPSHOT_ROWS: i64 = 100;

    /// What one transaction changes, as (op, id) pairs; deletes are followed by a tombstone.
    fn plan(k: i64) -> (String, Vec<(&'static str, i64)>) {
        let mut sql = format!("BEGIN; INSERT INTO events (id, v) VALUES ({k}, 0);");
        let mut changes = vec![("c", k)];
        if k % 4 == 0 {
            sql.push_str(&format!("UPDATE events SET v = 1 WHERE id = {};", k - 1));
            changes.push(("u", k - 1));
        }
        if k % 10 == 0 {
            sql.push_str(&format!("DELETE FROM events WHERE id = {};", k - 5));
            changes.push(("d", k - 5));
            changes.push(("tombstone", k - 5));
        }
        sql.push_str("COMMIT");
        (sql, changes)
    }

    fn identity(record: &Read) -> anyhow::Result<(String, i64)> {
        let key: Value =
            serde_json::from_slice(record.key.as_deref().context("a change without a key")?)?;
        let id = key["id"].as_i64().context("a key without id")?;
        let op = match record.value.as_deref() {
            None => "tombstone".to_string(),
            Some(value) => {
                let value: Value = serde_json::from_slice(value)?;
                value["op"]
                    .as_str()
                    .context("a value without op")?
                    .to_string()
            }
        };
        Ok((op, id))
    }

    async fn stored_lsn(rest: &Rest) -> Option<u64> {
        let (code, body) = rest
            .get(&format!("/connectors/{CONNECTOR}/offsets"))
            .await
            .ok()?;
        if code != 200 {
            return None;
        }
        body["offsets"]
            .as_array()?
            .iter()
            .find_map(|o| o["offset"]["lsn"].as_u64())
    }

    /// The latest offset of the connector in the offset topic, as a plain consumer reads it.
    async fn offset_topic_lsn(bootstrap: &str) -> anyhow::Result<u64> {
        let records = read_all(bootstrap, OFFSETS_TOPIC, |records| {
            records.iter().any(|r| {
                r.key
                    .as_deref()
                    .and_then(|k| serde_json::from_slice::<Value>(k).ok())
                    .is_some_and(|k| k[0] == CONNECTOR)
            })
        })
        .await?;
        let mut lsn = None;
        for record in records {
            let Some(key) = record.key.as_deref() else {
                continue;
            };
            let key: Value = serde_json::from_slice(key)?;
            if key[0] != CONNECTOR {
                continue;
            }
            let value: Value = serde_json::from_slice(record.value.as_deref().unwrap_or(b"null"))?;
            if let Some(stored) = value["lsn"].as_u64() {
                lsn = Some(stored);
            }
        }
        lsn.context("no offset with an lsn in the offset topic")
    }

    async fn confirmed_flush(url: &str) -> anyhow::Result<u64> {
        let mut connection = PgConnection::connect(url).await?;
        let text: String = sqlx::query_scalar(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(SLOT)
        .fetch_one(&mut connection)
        .await?;
        let _ = connection.close().await;
        Ok(text.parse()?)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cdc_loses_no_change_when_its_worker_is_sigkilled_mid_stream() -> anyhow::Result<()> {
        let mut processes = Processes::new()?;
        let postgres = Postgres::start();
        let outcome = crash(&mut processes, &postgres.url()).await;
        processes.report(outcome)
    }

    async fn crash(processes: &mut Processes, url: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        {
            let mut connection = PgConnection::connect(url).await?;
            sqlx::raw_sql(&format!(
                "CREATE TABLE events (id bigint PRIMARY KEY, v int NOT NULL, at timestamptz DEFAULT now()); \
                 INSERT INTO events (id, v) SELECT -g, 0 FROM generate_series(1, {SNAPSHOT_ROWS}) g"
            ))
            .execute(&mut connection)
            .await?;
            let _ = connection.close().await;
        }
        let bootstrap = start_broker(processes).await?;
        let toml = write_worker_config(processes, &bootstrap, 500)?;
        let rest = start_worker(processes, "worker-1", &toml).await?;
        rest.create(
            CONNECTOR,
            json!({"connector.class": "PostgresCdcSource", "connection.url": url,
                   "slot.name": SLOT, "publication.name": "crash_pub", "table.include": "public.events",
                   "topic.prefix": "crash", "heartbeat.interval.ms": "1000", "status.interval.ms": "100"}),
        )
        .await?;

        // The snapshot is complete once its heartbeat's offset is stored: rows committed from
        // now on are changes.
        eventually("the snapshot to complete", async || stored_lsn(&rest).await).await?;
        // The writer commits the transactions one by one, about 400 a second, across the kill.
        let committed = Arc::new(AtomicI64::new(0));
        let writer = {
            let (url, committed) = (url.to_string(), committed.clone());
            tokio::spawn(async move {
                let mut connection = PgConnection::connect(&url).await?;
                for k in 1..=TRANSACTIONS {
                    let (sql, _) = plan(k);
                    sqlx::Executor::execute(&mut connection, sql.as_str()).await?;
                    committed.store(k, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let _ = connection.close().await;
                anyhow::Ok(())
            })
        };
        let kill_after = TRANSACTIONS * 4 / 10;
        eventually(
            "40% committed and an offset of the stream stored",
            async || {
                (committed.load(Ordering::Acquire) >= kill_after
                    && stored_lsn(&rest).await.is_some())
                .then_some(())
            },
        )
        .await?;
        processes.kill("worker-1")?;
        let killed_after = started.elapsed();
        let committed_at_kill = committed.load(Ordering::Acquire);
        let confirmed = confirmed_flush(url).await?;
        let stored = offset_topic_lsn(&bootstrap).await?;
        report_line(format!(
            "crash: postgres CDC worker killed after {:.1}s with {committed_at_kill} of {TRANSACTIONS} transactions committed; slot confirmed at {confirmed}, offset topic at {stored}",
            killed_after.as_secs_f64()
        ));
        ensure!(
            confirmed <= stored,
            "the slot was confirmed at LSN {confirmed}, past the stored offset {stored}"
        );

        let rest = start_worker(processes, "worker-2", &toml).await?;
        writer.await??;
        let mut expected: BTreeSet<(String, i64)> =
            (1..=SNAPSHOT_ROWS).map(|g| ("r".to_string(), -g)).collect();
        for k in 1..=TRANSACTIONS {
            expected.extend(plan(k).1.into_iter().map(|(op, id)| (op.to_string(), id)));
        }
        let wanted = expected.clone();
        let records = read_all(&bootstrap, TOPIC, move |records| {
            let got: BTreeSet<(String, i64)> =
                records.iter().filter_map(|r| identity(r).ok()).collect();
            wanted.iter().all(|w| got.contains(w))
        })
        .await?;
        let mut counts: BTreeMap<(String, i64), usize> = BTreeMap::new();
        for record in &records {
            *counts.entry(identity(record)?).or_default() += 1;
        }
        let missing: Vec<&(String, i64)> = expected
            .iter()
            .filter(|e| !counts.contains_key(*e))
            .collect();
        let unexpected: Vec<&(String, i64)> =
            counts.keys().filter(|c| !expected.contains(*c)).collect();
        let duplicates: usize = counts.values().map(|n| n - 1).sum();
        let (_, status) = rest.get(&format!("/connectors/{CONNECTOR}/status")).await?;
        report_line(format!(
            "crash: postgres CDC {} changes expected ({SNAPSHOT_ROWS} snapshot reads), {} records in {TOPIC}: {} missing, {duplicates} duplicates, {} unexpected; task {}; {:.1}s in all",
            expected.len(),
            records.len(),
            missing.len(),
            unexpected.len(),
            status["tasks"][0]["state"],
            started.elapsed().as_secs_f64()
        ));
        ensure!(
            missing.is_empty(),
            "{} change(s) lost: first {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        ensure!(
            unexpected.is_empty(),
            "records of no change: {unexpected:?}"
        );
        ensure!(
            status["tasks"][0]["state"] == "RUNNING",
            "task state after the restart: {status}"
        );
        Ok(())
    }
}
