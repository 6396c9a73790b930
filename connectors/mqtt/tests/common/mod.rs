//! A real Mosquitto broker for the tests, and `mosquitto_pub` as the device. `scripts/mqtt-peers`
//! installs both; `MEDCONNECT_MOSQUITTO` names the broker binary if it is not on the PATH or in
//! /usr/sbin.

#![allow(dead_code)]

pub mod listener;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medconnect_api::{OffsetReader, Props, SourceOffset, SourcePartition, SourceTaskContext};

/// The broker binary; fails (never skips) when it is not installed.
fn mosquitto_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MEDCONNECT_MOSQUITTO") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!("mosquitto is not installed: run scripts/mqtt-peers (and set MEDCONNECT_MOSQUITTO to the path it prints)")
    })
}

/// A Mosquitto broker on a free port, with its config in a temporary directory; killed when
/// dropped.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A broker that admits only `user` with `password` (a `mosquitto_passwd` file).
    pub fn start_with_user(user: &str, password: &str) -> Self {
        Self::start_with(Some((user, password)))
    }

    fn start_with(credentials: Option<(&str, &str)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut access = "allow_anonymous true\n".to_string();
        if let Some((user, password)) = credentials {
            let file = dir.path().join("passwords");
            let status = Command::new("mosquitto_passwd")
                .arg("-c")
                .arg("-b")
                .arg(&file)
                .args([user, password])
                .status()
                .expect("mosquitto_passwd (scripts/mqtt-peers installs it)");
            assert!(status.success(), "mosquitto_passwd failed");
            access = format!("allow_anonymous false\npassword_file {}\n", file.display());
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("mosquitto.conf");
        // No queue limit: tests publish to offline persistent sessions (the default drops
        // beyond 1,000 queued messages).
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{access}persistence false\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let broker = Self {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker
    }

    pub fn uri(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Publishes each line as one QoS 1 message with `mosquitto_pub -l`, like a device that
    /// waits for its PUBACKs; returns once the process exits successfully.
    pub async fn publish_lines(&self, topic: &str, lines: &[String]) {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-l",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (scripts/mqtt-peers installs it)");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut input = lines.join("\n");
        input.push('\n');
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("write to mosquitto_pub");
        drop(stdin);
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .expect("mosquitto_pub finishes")
            .expect("mosquitto_pub runs");
        assert!(status.success(), "mosquitto_pub failed: {status}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct NoOffsets;

impl OffsetReader for NoOffsets {
    fn offset(&self, _partition: &SourcePartition) -> Option<SourceOffset> {
        None
    }
}

/// What the engine would give a source task.
pub fn source_context(config: Props) -> SourceTaskContext {
    SourceTaskContext {
        connector_name: "mqtt-test".into(),
        task_id: 0,
        config,
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    }
}

/// A TCP proxy in front of the broker whose `cut` closes every connection through it, as a
/// network failure would; new connections are forwarded again at once. Stops when dropped.
pub struct CuttableProxy {
    pub port: u16,
    current: Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    stop: tokio_util::sync::CancellationToken,
}

impl CuttableProxy {
    pub async fn start(upstream_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let current = Arc::new(std::sync::Mutex::new(
            tokio_util::sync::CancellationToken::new(),
        ));
        let stop = tokio_util::sync::CancellationToken::new();
        let (shared, stopping) = (current.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stopping.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let cut = shared.lock().expect("proxy token").clone();
                let stopping = stopping.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = stopping.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self {
            port,
            current,
            stop,
        }
    }

    pub fn uri(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Closes every connection made so far.
    pub fn cut(&self) {
        let mut current = self.current.lock().expect("proxy token");
        current.cancel();
        *current = tokio_util::sync::CancellationToken::new();
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A CA made in the test (rcgen), the listener's certificate for `localhost`, and a device
/// certificate whose common name is `pump-3`.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let write =
            |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).expect("write PEM");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "medconnect test CA");
        let ca =
            CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
        write("ca.crt", &ca.pem());
        for (stem, name, usage) in [
            ("server", "localhost", ExtendedKeyUsagePurpose::ServerAuth),
            ("device", "pump-3", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("sign");
            write(&format!("{stem}.crt"), &cert.pem());
            write(&format!("{stem}.key"), &key.serialize_pem());
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}
