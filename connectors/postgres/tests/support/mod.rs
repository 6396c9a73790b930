//! What the tests against a real PostgreSQL share: a server of their own (Debian's
//! postgresql-15 binaries, `initdb` into a temporary directory, a free port, trust
//! authentication for the user `medconnect`), a task driven as the engine drives it, records,
//! and queries that count rows.
//!
//! Starting a server takes seconds, so the tests of one binary share one ([`shared`]), each
//! in a database of its own; a test that stops and restarts its server starts its own.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use medconnect_api::{
    ConnectError, ErrantRecordReporter, OffsetReader, Record, SinkPartitions, SinkRecord, SinkTask,
    SinkTaskContext, SourceOffset, SourcePartition, SourceRecord, SourceTask, SourceTaskContext,
};
use medconnect_postgres::PostgresSinkTask;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::mpsc;

pub const USER: &str = "medconnect";

/// The directory of initdb, postgres and pg_ctl; fails (never skips) when they are missing.
fn pg_bin() -> PathBuf {
    let bin = std::env::var_os("MEDCONNECT_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    assert!(
        bin.join("postgres").is_file() && bin.join("initdb").is_file(),
        "PostgreSQL is not installed in {}: run scripts/postgres-peers (and set MEDCONNECT_PG_BIN to the path it prints if it is not the default)",
        bin.display()
    );
    bin
}

/// PostgreSQL refuses to run as root: as root (CI), the server runs as Debian's `postgres`
/// user, which owns its directory.
fn server_user() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .is_some_and(|uid| uid.trim() == "0");
    if !root {
        return None;
    }
    Some((
        id("-u").expect("a postgres user (created by Debian's postgresql package)"),
        id("-g").expect("the postgres user's group"),
    ))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A PostgreSQL server of its own in a temporary directory, stopped on drop — and, through a
/// watchdog that waits for its stdin to close, when the test process ends, even without drop
/// (a shared server in a static) or by a panic.
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    /// Stops the server and removes its directory once its stdin closes.
    watchdog: Option<Child>,
    /// More `-c name=value` options for the server.
    extra: String,
}

impl PgServer {
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            command.uid(uid).gid(gid);
        }
        command.stdin(Stdio::null()).stdout(Stdio::null());
        command
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// A server with more options: `extra` gets the server's directory (owned by the server's
    /// user) to put files in, and returns `-c name=value` options.
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("medconnect-pg")
            .tempdir()
            .expect("a temporary directory");
        let user = server_user();
        std::fs::create_dir(dir.path().join("socket")).expect("socket directory");
        if let Some((uid, gid)) = user {
            for path in [dir.path().to_path_buf(), dir.path().join("socket")] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
            }
        }
        let server = Self {
            dir,
            port: free_port(),
            bin: pg_bin(),
            user,
            watchdog: None,
            extra: String::new(),
        };
        let status = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args([
                "-U",
                USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed: {status}");
        let mut server = server;
        server.extra = extra(server.dir.path());
        // Files the options name belong to the server's user (a key file must).
        if let Ok(entries) = std::fs::read_dir(server.dir.path()) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    server.own(&entry.path());
                }
            }
        }
        server.run();
        server
    }

    /// Starts the server (again) on its port.
    pub fn run(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c fsync=off -c max_connections=40 {}",
            self.port,
            self.dir.path().join("socket").display(),
            self.extra
        );
        let status = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "-o", &options])
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed: {status}; see {}",
            self.dir.path().join("server.log").display()
        );
        if self.watchdog.is_none() {
            let script = format!(
                "cat >/dev/null; {} stop -D {} -m immediate; rm -rf {}",
                self.bin.join("pg_ctl").display(),
                self.data().display(),
                self.dir.path().display()
            );
            let mut child = Command::new("sh");
            child
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some((uid, gid)) = self.user {
                child.uid(uid).gid(gid);
            }
            self.watchdog = Some(child.spawn().expect("start the watchdog"));
        }
    }

    /// Stops the server (a fast shutdown: connections are cut, as in a restart).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w"])
            .stderr(Stdio::null())
            .status();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A new empty database for one test.
    pub async fn database(&self, name: &str) -> String {
        let mut admin = PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the server");
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("drop database");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create database");
        let _ = admin.close().await;
        self.url(name)
    }

    pub fn log_path(&self) -> &Path {
        self.dir.path()
    }

    /// Gives a file to the server's user (PostgreSQL refuses a key file it does not own).
    pub fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w"])
            .stderr(Stdio::null())
            .status();
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

/// The server the tests of this binary share.
pub fn shared() -> &'static PgServer {
    static SERVER: OnceLock<PgServer> = OnceLock::new();
    SERVER.get_or_init(PgServer::start)
}

pub use medconnect_api::props_from as props;

/// A task as the engine creates it, reporting errant records to the returned receiver.
pub fn sink_task(
    url: &str,
    pairs: &[(&str, &str)],
) -> (
    PostgresSinkTask,
    mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
) {
    let mut config = props(pairs);
    config.insert("connection.url".into(), url.to_string());
    let (tx, rx) = mpsc::unbounded_channel();
    let task = PostgresSinkTask::new(SinkTaskContext {
        connector_name: "pg-test".into(),
        task_id: 0,
        config,
        errant_records: ErrantRecordReporter::collecting(tx),
        partitions: SinkPartitions::detached(),
        peers: medconnect_api::relay::alone(),
    })
    .expect("a valid task config");
    (task, rx)
}

pub fn record(topic: &str, offset: i64, key: Option<&str>, value: Option<&str>) -> SinkRecord {
    let mut record = Record::new(topic);
    record.key = key.map(|k| k.to_string().into());
    record.value = value.map(|v| v.to_string().into());
    SinkRecord {
        record,
        kafka_partition: 0,
        kafka_offset: offset,
    }
}

/// Puts records in batches of 500, as the engine hands them over, then flushes.
pub async fn put_all(task: &mut PostgresSinkTask, records: &[SinkRecord]) {
    for batch in records.chunks(500) {
        task.put(batch.to_vec()).await.expect("put");
    }
    task.flush().await.expect("flush");
}

pub fn drain(
    rx: &mut mpsc::UnboundedReceiver<(SinkRecord, ConnectError)>,
) -> Vec<(SinkRecord, ConnectError)> {
    let mut out = Vec::new();
    while let Ok(report) = rx.try_recv() {
        out.push(report);
    }
    out
}

pub async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect")
}

pub async fn count(url: &str, sql: &str) -> i64 {
    let mut connection = connect(url).await;
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(&mut connection)
        .await
        .expect("count query");
    let _ = connection.close().await;
    n
}

pub async fn execute(url: &str, sql: &str) {
    let mut connection = connect(url).await;
    sqlx::raw_sql(sql)
        .execute(&mut connection)
        .await
        .expect("statement");
    let _ = connection.close().await;
}

pub const DEADLINE: Duration = Duration::from_secs(60);

/// An offset store in memory: what the engine would have stored (the latest offset per source
/// partition of the records it was given).
#[derive(Default, Clone)]
pub struct MemoryOffsets(Arc<Mutex<HashMap<String, (SourcePartition, SourceOffset)>>>);

impl MemoryOffsets {
    /// Stores the offsets of these records, in order, as the engine does once Kafka has them.
    pub fn store(&self, records: &[SourceRecord]) -> Vec<(SourcePartition, SourceOffset)> {
        let mut stored = self.0.lock().expect("offsets lock");
        let mut latest: HashMap<String, (SourcePartition, SourceOffset)> = HashMap::new();
        for record in records.iter().filter(|r| !r.source_partition.is_empty()) {
            let key =
                serde_json::Value::Object(record.source_partition.clone().into_map()).to_string();
            let entry = (
                record.source_partition.clone(),
                record.source_offset.clone(),
            );
            stored.insert(key.clone(), entry.clone());
            latest.insert(key, entry);
        }
        latest.into_values().collect()
    }
}

impl OffsetReader for MemoryOffsets {
    fn offset(&self, partition: &SourcePartition) -> Option<SourceOffset> {
        let key = serde_json::Value::Object((**partition).clone()).to_string();
        let stored = self.0.lock().ok()?;
        stored.get(&key).map(|(_, offset)| offset.clone())
    }

    fn partitions(&self) -> Vec<SourcePartition> {
        self.0
            .lock()
            .map(|s| s.values().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default()
    }
}

/// A source task's context with these settings (and `connection.url`) and offsets.
pub fn source_context(
    url: &str,
    pairs: &[(&str, &str)],
    offsets: &MemoryOffsets,
) -> SourceTaskContext {
    let mut config = props(pairs);
    config.insert("connection.url".into(), url.to_string());
    SourceTaskContext {
        connector_name: "pg-source-test".into(),
        task_id: 0,
        config,
        offsets: Arc::new(offsets.clone()),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    }
}

/// Polls until `want` records came (never more than asked for is an error the caller checks),
/// or fails at the deadline.
pub async fn poll_until<T: SourceTask + ?Sized>(
    task: &mut T,
    want: usize,
    deadline: Duration,
) -> Vec<SourceRecord> {
    let until = tokio::time::Instant::now() + deadline;
    let mut got = Vec::new();
    while got.len() < want {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {want} records before the deadline",
            got.len()
        );
        match tokio::time::timeout(left, task.poll()).await {
            Ok(Ok(records)) => got.extend(records),
            Ok(Err(error)) => panic!("poll failed: {error}"),
            Err(_) => panic!("only {} of {want} records before the deadline", got.len()),
        }
    }
    got
}

/// Polls for `period`, returning whatever came.
pub async fn poll_for<T: SourceTask + ?Sized>(task: &mut T, period: Duration) -> Vec<SourceRecord> {
    let until = tokio::time::Instant::now() + period;
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return got;
        }
        match tokio::time::timeout(left, task.poll()).await {
            Ok(Ok(records)) => got.extend(records),
            Ok(Err(error)) => panic!("poll failed: {error}"),
            Err(_) => return got,
        }
    }
}

/// A record value's JSON.
pub fn value_json(record: &SourceRecord) -> serde_json::Value {
    record
        .record
        .value
        .as_ref()
        .and_then(|v| serde_json::from_slice(v).ok())
        .unwrap_or(serde_json::Value::Null)
}
