//! TLS against a real PostgreSQL 15 with a certificate of a test CA (made with openssl):
//! the sink and the CDC source connect with `sslmode=verify-full&sslrootcert=<ca>` and the
//! server sees TLS sessions (`pg_stat_ssl`); a CA that did not sign the server's certificate
//! is refused at validation, naming `connection.url`.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use medconnect_api::{ConnectError, Connector, SinkTask, SourceTask};
use medconnect_postgres::{
    PostgresCdcSourceConnector, PostgresCdcSourceTask, PostgresSinkConnector,
};
use support::{
    DEADLINE, MemoryOffsets, PgServer, count, execute, poll_until, put_all, record, sink_task,
    source_context,
};

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (installed with Debian's openssl package)");
    assert!(status.success(), "openssl {args:?}: {status}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`; and a second CA that
/// signed nothing.
fn certificates(dir: &Path) {
    let day = ["-days", "2"];
    openssl(
        dir,
        &[
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=medconnect test CA",
            ][..],
            &day,
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "other.key",
                "-out",
                "other-ca.pem",
                "-subj",
                "/CN=another CA",
            ][..],
            &day,
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions file");
    openssl(
        dir,
        &[
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-extfile",
                "server.ext",
            ][..],
            &day,
        ]
        .concat(),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("key permissions");
}

struct Tls {
    server: PgServer,
    ca: String,
    other_ca: String,
}

fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let mut files = None;
        let server = PgServer::start_with(|dir| {
            certificates(dir);
            files = Some(dir.to_path_buf());
            format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            )
        });
        let dir = files.expect("certificates made");
        Tls {
            server,
            ca: dir.join("ca.pem").display().to_string(),
            other_ca: dir.join("other-ca.pem").display().to_string(),
        }
    })
}

fn verified(url: &str, ca: &str) -> String {
    format!("{url}?sslmode=verify-full&sslrootcert={ca}")
}

async fn tls_sessions(url: &str, application: &str) -> i64 {
    count(
        url,
        &format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.application_name = '{application}' AND a.datname = current_database()"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_writes_over_verified_tls() {
    let tls = tls();
    let url = tls.server.database("tls_sink").await;
    let (mut task, mut errant) = sink_task(&verified(&url, &tls.ca), &[("auto.create", "true")]);
    task.start().await.expect("start over TLS");
    let records: Vec<_> = (0..100)
        .map(|n| record("obs", n, None, Some(&format!("{{\"n\":{n}}}"))))
        .collect();
    put_all(&mut task, &records).await;
    assert_eq!(count(&url, "SELECT count(*) FROM obs").await, 100);
    assert_eq!(
        tls_sessions(&url, "medconnect-postgres").await,
        1,
        "the sink's session is TLS"
    );
    assert!(support::drain(&mut errant).is_empty());
    task.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_refused_naming_the_url() {
    let tls = tls();
    let url = tls.server.database("tls_refused").await;
    let config = support::props(&[("connection.url", &verified(&url, &tls.other_ca))]);
    match PostgresSinkConnector.validate(&config).await {
        Err(ConnectError::Config { field, reason }) => {
            assert_eq!(field, "connection.url");
            assert!(reason.to_lowercase().contains("certificate"), "{reason}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cdc_source_streams_over_verified_tls() {
    let tls = tls();
    let url = tls.server.database("tls_cdc").await;
    execute(
        &url,
        "CREATE TABLE patients (id int PRIMARY KEY, name text)",
    )
    .await;
    let offsets = MemoryOffsets::default();
    // The replication client verifies host names, not IP addresses: the certificate's DNS name.
    let by_name = verified(&url, &tls.ca).replace("127.0.0.1", "localhost");
    let by_ip = support::props(&[
        ("connection.url", &verified(&url, &tls.ca)),
        ("slot.name", "tls_cdc"),
        ("publication.name", "tls_pub"),
        ("topic.prefix", "ehr"),
    ]);
    match PostgresCdcSourceConnector.validate(&by_ip).await {
        Err(ConnectError::Config { field, .. }) => assert_eq!(field, "connection.url"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let mut task = PostgresCdcSourceTask::new(source_context(
        &by_name,
        &[
            ("slot.name", "tls_cdc"),
            ("publication.name", "tls_pub"),
            ("table.include", "patients"),
            ("topic.prefix", "ehr"),
            ("heartbeat.interval.ms", "0"),
        ],
        &offsets,
    ))
    .expect("a valid task config");
    task.start().await.expect("start over TLS");
    let heartbeat = poll_until(&mut task, 1, DEADLINE).await;
    assert_eq!(heartbeat[0].record.topic, "__medconnect-heartbeat.ehr");
    execute(&url, "INSERT INTO patients VALUES (1, 'Ada')").await;
    let change = poll_until(&mut task, 1, DEADLINE).await;
    assert_eq!(support::value_json(&change[0])["after"]["name"], "Ada");
    assert_eq!(
        tls_sessions(&url, "medconnect-cdc-tls_cdc").await,
        1,
        "the replication session is TLS"
    );
    task.stop().await.expect("stop");
}
