//! The PostgreSQL sink in a real worker against a real broker: datagen vitals through Kafka
//! (3 partitions) into a table the sink creates on a PostgreSQL 15 of the test's own
//! (`scripts/postgres-peers`). Every record lands once, keyed by its Kafka position, and the
//! committed offsets reach the end.

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
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
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
