//! A PostgreSQL server of the benchmarks' own: Debian's postgresql-15 (`scripts/postgres-peers`),
//! `initdb` into a temporary directory, a free port, durable settings, `wal_level=logical`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

pub const USER: &str = "medconnect";

/// A server in a temporary directory, stopped on drop. As root it runs as `postgres`
/// (PostgreSQL refuses root).
pub struct Server {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
}

fn id_of(flag: &str, name: Option<&str>) -> Option<u32> {
    let out = Command::new("id").arg(flag).args(name).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

impl Server {
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

    /// A program of the server's installation (`pg_recvlogical`, ...).
    #[allow(dead_code, reason = "the CDC bench uses it, the sink bench does not")]
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start() -> anyhow::Result<Self> {
        let bin = std::env::var_os("MEDCONNECT_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
        if !bin.join("postgres").is_file() {
            bail!(
                "no PostgreSQL in {}: run scripts/postgres-peers",
                bin.display()
            );
        }
        let user = if id_of("-u", None) == Some(0) {
            Some((
                id_of("-u", Some("postgres")).context("no postgres user")?,
                id_of("-g", Some("postgres")).context("no postgres group")?,
            ))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("medconnect-pg-bench")
            .tempdir()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let server = Self {
            dir,
            bin,
            user,
            port,
        };
        let initdb = server
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
            .status()?;
        if !initdb.success() {
            bail!("initdb failed: {initdb}");
        }
        // Durable settings (fsync on, synchronous commit): what a real server pays per commit.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical",
            server.port,
            server.dir.path().display()
        );
        let started = server
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(server.data())
            .arg("-l")
            .arg(server.dir.path().join("server.log"))
            .args(["-w", "-o", &options])
            .status()?;
        if !started.success() {
            bail!("pg_ctl start failed: {started}");
        }
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w"])
            .status();
    }
}
