//! The REST API's security, over real sockets: authentication (static bearer tokens, HTTP
//! basic, JWT against a JWKS file), roles (viewer / operator / admin) for each class of call,
//! TLS and client certificates, the audit topic, a `medconnect worker` that refuses to start
//! without authentication, and a forwarded write in a two-worker cluster audited once under its
//! original caller.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use medconnect_e2e::cluster_broker::ClusterBroker;
use medconnect_e2e::crash::{Processes, free_port, read_all};
use medconnect_e2e::{DEADLINE, TestCluster, eventually, medconnect_bin};
use medconnect_runtime::Worker;
use medconnect_runtime::rest::auth::basic::hash_password;
use medconnect_runtime::rest::auth::{AuthMode, JwtConfig};
use medconnect_runtime::rest::tls::RestTls;
use rcgen::KeyPair;
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A secret planted in connector configs: it must never reach the audit topic.
const PLANTED: &str = "planted-secret-7f3a";
const VIEWER: &str = "viewer-token-0123456789";
const OPERATOR: &str = "operator-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The tokens file of the tests: one token per role.
fn write_tokens(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("tokens.toml");
    let mut text = String::new();
    for (name, role, token) in [
        ("dashboard", "viewer", VIEWER),
        ("night-shift", "operator", OPERATOR),
        ("deployer", "admin", ADMIN),
    ] {
        text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha256_hex(token)
        ));
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

fn write_users(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("users.toml");
    let hash = hash_password("correct horse battery").map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(
        &path,
        format!("[[users]]\nname = \"alice\"\nrole = \"operator\"\npassword_hash = \"{hash}\"\n"),
    )?;
    Ok(path)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// One call: status, `WWW-Authenticate` values, JSON body.
async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    authorization: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Vec<String>, Value)> {
    let mut request = http.request(method, url);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let challenges = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, challenges, body))
}

/// A worker in this process with authentication from `dir`, on the embedded broker.
async fn secured_worker(
    cluster: &TestCluster,
    dir: &Path,
    jwt: Option<JwtConfig>,
) -> anyhow::Result<Worker> {
    let mut config = cluster.worker_config();
    config.rest.auth = Some(AuthMode::Required);
    config.rest.tokens_file = Some(write_tokens(dir)?);
    config.rest.users_file = Some(write_users(dir)?);
    config.rest.jwt = jwt;
    Ok(Worker::start(config, medconnect::builtin_plugins()).await?)
}

fn datagen(rate: &str) -> Value {
    json!({
        "connector.class": "DatagenSource",
        "topic": "secured-vitals",
        "rate": rate,
        "tasks.max": "1",
        "upstream.password": PLANTED,
    })
}

/// Every record of the audit topic, as JSON, once `complete` holds for them.
async fn audit_records(
    bootstrap: &str,
    topic: &str,
    complete: impl Fn(&[Value]) -> bool + Send + 'static,
) -> anyhow::Result<(Vec<Value>, String)> {
    let records = read_all(bootstrap, topic, move |read| {
        let values: Vec<Value> = read
            .iter()
            .filter_map(|r| serde_json::from_slice(r.value.as_deref()?).ok())
            .collect();
        complete(&values)
    })
    .await?;
    let raw: String = records
        .iter()
        .filter_map(|r| r.value.as_deref())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let values = records
        .iter()
        .filter_map(|r| serde_json::from_slice(r.value.as_deref()?).ok())
        .collect();
    Ok((values, raw))
}

fn with_action<'a>(records: &'a [Value], action: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["action"] == action).collect()
}

/// The one successful change of a kind.
fn succeeded<'a>(records: &'a [Value], action: &str) -> anyhow::Result<&'a Value> {
    let found: Vec<&Value> = with_action(records, action)
        .into_iter()
        .filter(|r| r["outcome"] == "success")
        .collect();
    ensure!(
        found.len() == 1,
        "{} successful {action} records",
        found.len()
    );
    Ok(found[0])
}

/// 401 without and with bad credentials, 403 for a role too low for each class of call, the
/// calls each role may make, basic auth, and every change in the audit topic with who did it
/// and the answer, never with the planted secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_each_class_of_call_and_every_change_is_audited() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let dir = tempfile::tempdir()?;
    let worker = secured_worker(&cluster, dir.path(), None).await?;
    let base = format!("http://{}", worker.rest_addr());
    let url = |path: &str| format!("{base}{path}");
    let http = reqwest::Client::new();

    // Probes stay open; everything else needs credentials.
    for path in ["/health", "/health/ready"] {
        assert_eq!(
            call(&http, Method::GET, &url(path), None, None).await?.0,
            200,
            "{path}"
        );
    }
    let (code, challenges, body) =
        call(&http, Method::GET, &url("/connectors"), None, None).await?;
    assert_eq!(code, 401, "{body}");
    assert_eq!(body["error_code"], 401, "{body}");
    assert_eq!(
        challenges,
        vec![
            "Bearer realm=\"medconnect\"".to_string(),
            "Basic realm=\"medconnect\", charset=\"UTF-8\"".to_string()
        ]
    );
    for wrong in [
        bearer("not-a-token"),
        bearer(&format!("{ADMIN}x")),
        basic("alice", "wrong"),
        basic("mallory", "correct horse battery"),
        "Digest whatever".to_string(),
    ] {
        let (code, _, body) =
            call(&http, Method::GET, &url("/connectors"), Some(&wrong), None).await?;
        assert_eq!(code, 401, "{wrong}: {body}");
    }
    // Metrics need a viewer by default.
    assert_eq!(
        call(&http, Method::GET, &url("/metrics"), None, None)
            .await?
            .0,
        401
    );
    assert_eq!(
        call(
            &http,
            Method::GET,
            &url("/metrics"),
            Some(&bearer(VIEWER)),
            None
        )
        .await?
        .0,
        200
    );

    // A viewer reads but changes nothing.
    let viewer = Some(bearer(VIEWER));
    let operator = Some(bearer(OPERATOR));
    let admin = Some(bearer(ADMIN));
    let create = json!({"name": "guarded", "config": datagen("20")});
    let (code, _, body) = call(
        &http,
        Method::POST,
        &url("/connectors"),
        viewer.as_deref(),
        Some(&create),
    )
    .await?;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error_code"], 403, "{body}");
    let (code, _, body) = call(
        &http,
        Method::POST,
        &url("/connectors"),
        operator.as_deref(),
        Some(&create),
    )
    .await?;
    assert_eq!(code, 403, "operator may not create: {body}");
    let (code, _, body) = call(
        &http,
        Method::POST,
        &url("/connectors"),
        admin.as_deref(),
        Some(&create),
    )
    .await?;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["config"]["upstream.password"], "[hidden]", "{body}");

    let (code, _, config) = call(
        &http,
        Method::GET,
        &url("/connectors/guarded/config"),
        viewer.as_deref(),
        None,
    )
    .await?;
    assert_eq!(code, 200, "{config}");
    assert_eq!(config["upstream.password"], "[hidden]", "{config}");
    for path in ["/connectors/guarded/status", "/connector-plugins", "/"] {
        let (code, _, body) = call(&http, Method::GET, &url(path), viewer.as_deref(), None).await?;
        assert_eq!(code, 200, "{path}: {body}");
    }
    // A caller cannot name itself: the principal header counts only in a signed forwarded
    // request.
    let forged = http
        .put(url("/connectors/guarded/pause"))
        .header("authorization", bearer(VIEWER))
        .header(
            "x-medconnect-principal",
            r#"{"name":"root","role":"admin","via":"token","peer":null}"#,
        )
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 403);
    // Workers' calls to each other's connectors (an MQTT sink handing a command to the devices
    // on another worker's listener) take no REST caller, an admin neither, nor a request that
    // claims to be a worker's without the session key's signature.
    let relay = url("/internal/relay/mqtt-listener%2Fbedside-devices");
    let (code, _, body) = call(
        &http,
        Method::POST,
        &relay,
        Some(&bearer(ADMIN)),
        Some(&json!({"topic": "devices/pump-3/commands"})),
    )
    .await?;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("Only another worker")),
        "{body}"
    );
    let forged = http
        .post(&relay)
        .header("x-medconnect-forwarded-by", "w2")
        .header(
            "x-medconnect-principal",
            r#"{"name":"w2","role":"admin","via":"worker","peer":null}"#,
        )
        .header("x-medconnect-signature", "00".repeat(32))
        .body("{}\n")
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 403);
    for (method, path) in [
        (Method::PUT, "/connectors/guarded/pause"),
        (Method::PUT, "/connectors/guarded/stop"),
        (Method::POST, "/connectors/guarded/restart"),
        (Method::POST, "/connectors/guarded/tasks/0/restart"),
        (Method::DELETE, "/connectors/guarded"),
        (Method::GET, "/admin/loggers"),
    ] {
        let (code, _, body) =
            call(&http, method.clone(), &url(path), viewer.as_deref(), None).await?;
        assert_eq!(code, 403, "viewer {method} {path}: {body}");
    }

    // An operator (token, and alice with basic auth) pauses, resumes, restarts, stops.
    let alice = Some(basic("alice", "correct horse battery"));
    let operations = [
        (Method::PUT, "/connectors/guarded/pause", &operator, 202),
        (Method::PUT, "/connectors/guarded/resume", &alice, 202),
        (Method::POST, "/connectors/guarded/restart", &operator, 204),
        (
            Method::POST,
            "/connectors/guarded/tasks/0/restart",
            &alice,
            204,
        ),
    ];
    for (method, path, who, want) in &operations {
        let (code, _, body) = call(&http, method.clone(), &url(path), who.as_deref(), None).await?;
        assert_eq!(code, *want, "{method} {path}: {body}");
    }
    // Offsets to alter once the source has stored some.
    let offsets = eventually("the source's first stored offset", async || {
        let (code, _, body) = call(
            &http,
            Method::GET,
            &url("/connectors/guarded/offsets"),
            viewer.as_deref(),
            None,
        )
        .await
        .ok()?;
        (code == 200 && body["offsets"].as_array().is_some_and(|o| !o.is_empty())).then_some(body)
    })
    .await?;
    let (code, _, body) = call(
        &http,
        Method::PUT,
        &url("/connectors/guarded/stop"),
        operator.as_deref(),
        None,
    )
    .await?;
    assert_eq!(code, 204, "{body}");
    eventually("the connector STOPPED", async || {
        let (_, _, status) = call(
            &http,
            Method::GET,
            &url("/connectors/guarded/status"),
            viewer.as_deref(),
            None,
        )
        .await
        .ok()?;
        (status["connector"]["state"] == "STOPPED").then_some(())
    })
    .await?;
    let alter = json!({"offsets": [offsets["offsets"][0].clone()]});
    let admin_only: [(Method, &str, Option<Value>); 5] = [
        (Method::PATCH, "/connectors/guarded/offsets", Some(alter)),
        (Method::DELETE, "/connectors/guarded/offsets", None),
        (
            Method::PUT,
            "/admin/loggers/medconnect_runtime::task",
            Some(json!({"level": "DEBUG"})),
        ),
        (
            Method::PUT,
            "/connectors/guarded/config",
            Some(datagen("30")),
        ),
        (Method::DELETE, "/connectors/guarded", None),
    ];
    for (method, path, body) in &admin_only {
        let (code, _, answer) = call(
            &http,
            method.clone(),
            &url(path),
            operator.as_deref(),
            body.as_ref(),
        )
        .await?;
        assert_eq!(code, 403, "operator {method} {path}: {answer}");
    }
    let expected = [200, 200, 200, 200, 204];
    for ((method, path, body), want) in admin_only.iter().zip(expected) {
        let (code, _, answer) = call(
            &http,
            method.clone(),
            &url(path),
            admin.as_deref(),
            body.as_ref(),
        )
        .await?;
        assert_eq!(code, want, "admin {method} {path}: {answer}");
    }

    // The trail: each change once, with who, how, from where and the answer.
    let (records, raw) = audit_records(&cluster.bootstrap(), "medconnect-audit", |records| {
        records
            .iter()
            .any(|r| r["action"] == "delete" && r["status"] == 204)
    })
    .await?;
    assert!(
        !raw.contains(PLANTED),
        "the planted secret is in the audit topic:\n{raw}"
    );
    let successes: Vec<(String, String, String, u64)> = records
        .iter()
        .filter(|r| r["outcome"] == "success")
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_string(),
                r["principal"].as_str().unwrap_or_default().to_string(),
                r["auth"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let owned =
        |a: &str, p: &str, v: &str, s: u64| (a.to_string(), p.to_string(), v.to_string(), s);
    assert_eq!(
        successes,
        vec![
            owned("create", "deployer", "token", 201),
            owned("pause", "night-shift", "token", 202),
            owned("resume", "alice", "basic", 202),
            owned("restart", "night-shift", "token", 204),
            owned("restart-task", "alice", "basic", 204),
            owned("stop", "night-shift", "token", 204),
            owned("alter-offsets", "deployer", "token", 200),
            owned("reset-offsets", "deployer", "token", 200),
            owned("set-logger-level", "deployer", "token", 200),
            owned("put-config", "deployer", "token", 200),
            owned("delete", "deployer", "token", 204),
        ],
        "{raw}"
    );
    // Refused changes are in the trail too, as denied, with the role that was too low.
    let denied: Vec<(String, String, u64)> = records
        .iter()
        .filter(|r| r["outcome"] == "denied")
        .map(|r| {
            (
                r["action"].as_str().unwrap_or_default().to_string(),
                r["role"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(denied.len(), 2 + 1 + 5 + 5, "{denied:?}");
    assert!(
        denied.iter().all(|(_, _, status)| *status == 403),
        "{denied:?}"
    );
    assert_eq!(denied[0], ("create".to_string(), "viewer".to_string(), 403));
    assert_eq!(
        denied[1],
        ("create".to_string(), "operator".to_string(), 403)
    );
    let create = succeeded(&records, "create")?;
    assert_eq!(create["role"], "admin");
    assert_eq!(create["method"], "POST");
    assert_eq!(create["path"], "/connectors");
    assert_eq!(create["connector"], "guarded");
    assert_eq!(create["forwarded_by"], Value::Null);
    assert_eq!(create["worker"], worker.herder().worker_id());
    assert!(
        create["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{create}"
    );
    assert_eq!(create["request"]["config"]["upstream.password"], "[hidden]");
    assert_eq!(create["request"]["config"]["rate"], "20");
    let put = succeeded(&records, "put-config")?;
    assert_eq!(put["request"]["upstream.password"], "[hidden]", "{put}");
    let level = succeeded(&records, "set-logger-level")?;
    assert_eq!(level["request"], json!({"level": "DEBUG"}));
    assert!(
        create["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
        "{create}"
    );
    worker.shutdown().await;
    Ok(())
}

/// An ES256 key made here, its JWKS file, and tokens signed with it.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    kid: String,
}

impl Issuer {
    fn new(dir: &Path, kid: &str) -> anyhow::Result<(Self, PathBuf)> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = pair.public_key_raw();
        ensure!(
            raw.len() == 65 && raw[0] == 4,
            "an uncompressed P-256 point"
        );
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
        }]});
        let path = dir.join(format!("{kid}.jwks.json"));
        std::fs::write(&path, jwks.to_string())?;
        Ok((
            Self {
                key: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
                kid: kid.to_string(),
            },
            path,
        ))
    }

    fn token(&self, claims: Value) -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// JWTs: a valid one gives its role; expired, wrong audience or issuer, another key, or no
/// role: 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_tokens_are_checked_against_the_jwks() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let dir = tempfile::tempdir()?;
    let (issuer, jwks) = Issuer::new(dir.path(), "idp-1")?;
    let (stranger, _) = Issuer::new(dir.path(), "idp-1-forged")?;
    let worker = secured_worker(
        &cluster,
        dir.path(),
        Some(JwtConfig {
            jwks_file: jwks,
            issuer: "https://idp.hospital.example".into(),
            audience: "medconnect".into(),
            role_claim: "medconnect_role".into(),
            name_claim: "sub".into(),
            leeway_s: 5,
        }),
    )
    .await?;
    let base = format!("http://{}", worker.rest_addr());
    let http = reqwest::Client::new();
    let (code, _, body) = call(
        &http,
        Method::POST,
        &format!("{base}/connectors"),
        Some(&bearer(ADMIN)),
        Some(&json!({"name": "jwt-target", "config": datagen("5")})),
    )
    .await?;
    assert_eq!(code, 201, "{body}");

    let claims = |sub: &str, role: Value, aud: &str, iss: &str, exp: u64| json!({"sub": sub, "medconnect_role": role, "aud": aud, "iss": iss, "exp": exp});
    let iss = "https://idp.hospital.example";
    let later = now_s() + 600;
    let operator = issuer.token(claims("carol", json!("operator"), "medconnect", iss, later))?;
    let listed = issuer.token(claims(
        "dave",
        json!(["viewer", "admin"]),
        "medconnect",
        iss,
        later,
    ))?;
    let pause = format!("{base}/connectors/jwt-target/pause");
    let (code, _, body) = call(&http, Method::PUT, &pause, Some(&bearer(&operator)), None).await?;
    assert_eq!(code, 202, "{body}");
    let (code, _, body) = call(
        &http,
        Method::DELETE,
        &format!("{base}/connectors/jwt-target"),
        Some(&bearer(&operator)),
        None,
    )
    .await?;
    assert_eq!(code, 403, "an operator's JWT may not delete: {body}");
    let (code, _, body) = call(
        &http,
        Method::GET,
        &format!("{base}/admin/loggers"),
        Some(&bearer(&listed)),
        None,
    )
    .await?;
    assert_eq!(code, 200, "the highest role of a list counts: {body}");

    let refused = [
        (
            "expired",
            issuer.token(claims(
                "carol",
                json!("admin"),
                "medconnect",
                iss,
                now_s() - 3600,
            ))?,
        ),
        (
            "wrong audience",
            issuer.token(claims("carol", json!("admin"), "billing", iss, later))?,
        ),
        (
            "wrong issuer",
            issuer.token(claims(
                "carol",
                json!("admin"),
                "medconnect",
                "https://evil.example",
                later,
            ))?,
        ),
        (
            "unknown role",
            issuer.token(claims("carol", json!("root"), "medconnect", iss, later))?,
        ),
        (
            "another key",
            stranger.token(claims("carol", json!("admin"), "medconnect", iss, later))?,
        ),
    ];
    for (why, token) in &refused {
        let (code, challenges, body) = call(
            &http,
            Method::GET,
            &format!("{base}/connectors"),
            Some(&bearer(token)),
            None,
        )
        .await?;
        assert_eq!(code, 401, "{why}: {body}");
        assert!(challenges.iter().any(|c| c.starts_with("Bearer")), "{why}");
    }
    // The key id of the stranger's token is unknown; the same kid with another key fails the
    // signature.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("idp-1".into());
    let forged = jsonwebtoken::encode(
        &header,
        &claims("carol", json!("admin"), "medconnect", iss, later),
        &stranger.key,
    )?;
    let (code, _, _) = call(
        &http,
        Method::GET,
        &format!("{base}/connectors"),
        Some(&bearer(&forged)),
        None,
    )
    .await?;
    assert_eq!(
        code, 401,
        "a token signed with another key under the known kid"
    );

    let (records, _) = audit_records(&cluster.bootstrap(), "medconnect-audit", |records| {
        records.iter().any(|r| r["action"] == "pause")
    })
    .await?;
    let pause = with_action(&records, "pause");
    assert_eq!(pause.len(), 1, "{records:?}");
    assert_eq!(pause[0]["principal"], "carol");
    assert_eq!(pause[0]["auth"], "jwt");
    assert_eq!(pause[0]["role"], "operator");
    worker.shutdown().await;
    Ok(())
}

/// The test certificates (`medconnect_e2e::pki`: the workers' is `server`) in a directory of
/// their own.
struct Pki {
    _dir: tempfile::TempDir,
    files: medconnect_e2e::pki::Pki,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let files = medconnect_e2e::pki::Pki::write(dir.path(), "medconnect REST test CA")?;
        Ok(Self { _dir: dir, files })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.files.path(name)
    }

    /// A client trusting the CA, with the client certificate or without.
    fn client(&self, with_certificate: bool) -> anyhow::Result<reqwest::Client> {
        self.client_as(with_certificate.then_some("client"))
    }

    /// A client trusting the CA, presenting the certificate `stem` if given.
    fn client_as(&self, stem: Option<&str>) -> anyhow::Result<reqwest::Client> {
        let pair = stem.map(|stem| {
            (
                self.path(&format!("{stem}.crt")),
                self.path(&format!("{stem}.key")),
            )
        });
        let config = medconnect_api::tls::client_config(
            &self.path("ca.crt"),
            pair.as_ref()
                .map(|(cert, key)| (cert.as_path(), key.as_path())),
        )?;
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .timeout(Duration::from_secs(10))
            .build()?)
    }
}

/// TLS with client certificates: a client that trusts the CA and presents a certificate gets
/// answers; one that does not trust the CA, one without a certificate and plain HTTP get none.
/// A listed client certificate is a credential of its own (its role); an unlisted one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_ca_and_a_client_certificate() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pki = Pki::new()?;
    let dir = tempfile::tempdir()?;
    let certificates = dir.path().join("certificates.toml");
    std::fs::write(
        &certificates,
        format!(
            "[[certificates]]\nname = \"pump-gateway\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            std::fs::read_to_string(pki.path("client.sha256"))?
        ),
    )?;
    let mut config = cluster.worker_config();
    config.rest.auth = Some(AuthMode::Required);
    config.rest.tokens_file = Some(write_tokens(dir.path())?);
    config.rest.certificates_file = Some(certificates);
    // Certificates as credentials without client certificates asked for: refused.
    let error = Worker::start(config.clone(), medconnect::builtin_plugins())
        .await
        .err()
        .context("certificates_file without client_ca")?;
    assert!(error.to_string().contains("client_ca"), "{error}");
    config.rest.tls = Some(RestTls {
        cert: pki.path("server.crt"),
        key: pki.path("server.key"),
        client_ca: Some(pki.path("ca.crt")),
        ca: None,
    });
    let worker = Worker::start(config, medconnect::builtin_plugins()).await?;
    let port = worker.rest_addr().port();
    let https = format!("https://127.0.0.1:{port}/connectors");

    let (code, _, body) = call(
        &pki.client(true)?,
        Method::GET,
        &https,
        Some(&bearer(VIEWER)),
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    // A verified but unlisted certificate is no credential.
    let (code, _, _) = call(
        &pki.client_as(Some("other"))?,
        Method::GET,
        &https,
        None,
        None,
    )
    .await?;
    assert_eq!(code, 401);
    let (code, _, body) = call(
        &pki.client_as(Some("other"))?,
        Method::GET,
        &https,
        Some(&bearer(VIEWER)),
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    // The listed one is the operator pump-gateway.
    let (code, _, body) = call(&pki.client(true)?, Method::GET, &https, None, None).await?;
    assert_eq!(code, 200, "{body}");
    let (code, _, body) = call(
        &pki.client(true)?,
        Method::POST,
        &https,
        None,
        Some(&json!({"name": "by-certificate", "config": datagen("5")})),
    )
    .await?;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("certificate 'pump-gateway'") && m.contains("admin")),
        "{body}"
    );
    let (code, _, _) = call(
        &pki.client(true)?,
        Method::GET,
        &format!("https://localhost:{port}/health"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 200, "the certificate names localhost too");

    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let error = call(
        &untrusting,
        Method::GET,
        &https,
        Some(&bearer(VIEWER)),
        None,
    )
    .await
    .expect_err("a client that does not trust the CA gets no answer");
    assert!(format!("{error:?}").contains("certificate"), "{error:?}");
    let error = call(
        &pki.client(false)?,
        Method::GET,
        &https,
        Some(&bearer(VIEWER)),
        None,
    )
    .await
    .expect_err("a client without a certificate gets no answer");
    assert!(
        format!("{error:?}").to_lowercase().contains("certificate"),
        "{error:?}"
    );
    let plain = call(
        &reqwest::Client::new(),
        Method::GET,
        &format!("http://127.0.0.1:{port}/health"),
        None,
        None,
    )
    .await;
    assert!(plain.is_err(), "plain HTTP on the TLS port: {plain:?}");
    // The listener still serves after the failed handshakes.
    let (code, _, _) = call(
        &pki.client(true)?,
        Method::GET,
        &https,
        Some(&bearer(VIEWER)),
        None,
    )
    .await?;
    assert_eq!(code, 200);
    worker.shutdown().await;
    Ok(())
}

async fn exit_of(processes: &mut Processes, name: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !processes.exited(name) {
        if tokio::time::Instant::now() > deadline {
            bail!("{name} still runs");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `medconnect worker` without authentication configured exits non-zero naming `rest.auth`;
/// `auth = "none"` beside a tokens file is refused too. Neither needs Kafka to find out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_to_start_without_authentication() -> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let tokens = write_tokens(processes.dir())?;
    for (name, rest) in [
        ("bare", String::new()),
        (
            "conflicting",
            format!("auth = \"none\"\ntokens_file = \"{}\"\n", tokens.display()),
        ),
    ] {
        let config = processes.path(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "bootstrap_servers = \"127.0.0.1:1\"\n[rest]\nlisten = \"127.0.0.1:{}\"\n{rest}",
                free_port()?
            ),
        )?;
        let config = config.display().to_string();
        processes.spawn(name, &medconnect_bin()?, &["worker", &config], &[])?;
        exit_of(&mut processes, name).await?;
        let stderr = processes.stderr(name);
        assert!(
            stderr.contains("medconnect cannot run"),
            "{name}:\n{stderr}"
        );
        match name {
            "bare" => assert!(
                stderr.contains("rest.auth = \\\"none\\\"")
                    || stderr.contains("rest.auth = \"none\""),
                "names rest.auth:\n{stderr}"
            ),
            _ => assert!(
                stderr.contains("tokens_file is set"),
                "names the conflict:\n{stderr}"
            ),
        }
    }
    // The exit code: non-zero.
    let config = processes.path("bare.toml").display().to_string();
    let status = std::process::Command::new(medconnect_bin()?)
        .args(["worker", &config])
        .output()?;
    assert_eq!(status.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&status.stderr)
            .contains("tokens_file, users_file, certificates_file or [rest.jwt]")
    );
    Ok(())
}

/// Two `medconnect worker` processes over https with client certificates and tokens: a create
/// and a pause sent to the follower are forwarded to the leader over https, executed there and
/// audited once, by the leader, under the caller who sent them, naming the follower; a forged
/// forwarded request (a principal without the session key's signature) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_is_audited_once_under_its_caller() -> anyhow::Result<()> {
    let mut processes = Processes::new()?;
    let outcome = forwarded(&mut processes).await;
    processes.report(outcome)
}

async fn forwarded(processes: &mut Processes) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let bootstrap = ClusterBroker::from_env()?
        .start(
            processes,
            &[
                "secure-configs:1",
                "secure-offsets:5",
                "secure-status:3",
                "secure-audit:1",
            ],
            &["secured-vitals:1"],
        )
        .await?;
    let tokens = write_tokens(processes.dir())?;
    let mut urls = Vec::new();
    for worker in ["w1", "w2"] {
        let port = free_port()?;
        let config = processes.path(&format!("{worker}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"group_id = "secure-cluster"
bootstrap_servers = "{bootstrap}"
worker_id = "{worker}"

[rest]
listen = "127.0.0.1:{port}"
tokens_file = "{tokens}"

[rest.tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"

[internal_topics]
config = "secure-configs"
offsets = "secure-offsets"
status = "secure-status"
audit = "secure-audit"

[cluster]
leader_sync_delay_ms = 200

[consumer]
"fetch.wait.max.ms" = 100
"#,
                tokens = tokens.display(),
                cert = pki.path("server.crt").display(),
                key = pki.path("server.key").display(),
                ca = pki.path("ca.crt").display(),
            ),
        )?;
        let config = config.display().to_string();
        processes.spawn(worker, &medconnect_bin()?, &["worker", &config], &[])?;
        urls.push((worker, format!("https://127.0.0.1:{port}")));
    }
    let http = pki.client(true)?;
    let mut leader = None;
    for (worker, url) in &urls {
        let ready = eventually(&format!("{worker} ready in a cluster of 2"), async || {
            let (code, _, body) = call(
                &http,
                Method::GET,
                &format!("{url}/health/ready"),
                None,
                None,
            )
            .await
            .ok()?;
            (code == 200 && body["members"] == 2).then_some(body)
        })
        .await?;
        if ready["leader"] == true {
            leader = Some(worker.to_string());
        }
    }
    let leader = leader.context("no leader")?;
    let (follower, follower_url) = urls
        .iter()
        .find(|(w, _)| **w != leader)
        .map(|(w, u)| (w.to_string(), u.clone()))
        .context("no follower")?;
    let leader_url = &urls
        .iter()
        .find(|(w, _)| **w == leader)
        .context("leader")?
        .1;

    let (code, _, body) = call(
        &http,
        Method::POST,
        &format!("{follower_url}/connectors"),
        Some(&bearer(ADMIN)),
        Some(&json!({"name": "relayed", "config": datagen("5")})),
    )
    .await?;
    assert_eq!(code, 201, "create through the follower: {body}");
    let (code, _, body) = call(
        &http,
        Method::PUT,
        &format!("{follower_url}/connectors/relayed/pause"),
        Some(&bearer(OPERATOR)),
        None,
    )
    .await?;
    assert_eq!(code, 202, "pause through the follower: {body}");
    // The follower checks the role before forwarding.
    let (code, _, body) = call(
        &http,
        Method::DELETE,
        &format!("{follower_url}/connectors/relayed"),
        Some(&bearer(OPERATOR)),
        None,
    )
    .await?;
    assert_eq!(code, 403, "{body}");
    // A request that claims to be forwarded, naming an admin, without the session key.
    let forged = http
        .delete(format!("{leader_url}/connectors/relayed"))
        .header("authorization", bearer(VIEWER))
        .header("x-medconnect-forwarded-by", follower.as_str())
        .header(
            "x-medconnect-principal",
            r#"{"name":"root","role":"admin","via":"token","peer":null}"#,
        )
        .header("x-medconnect-signature", "00".repeat(32))
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 403);
    let (code, _, info) = call(
        &http,
        Method::GET,
        &format!("{leader_url}/connectors/relayed"),
        Some(&bearer(VIEWER)),
        None,
    )
    .await?;
    assert_eq!(code, 200, "still there: {info}");
    // A task restarts where it runs: sent to the other worker, it is forwarded to the owner
    // (not the leader), which records it.
    let owner = eventually("task 0 placed on a worker", async || {
        let (_, _, status) = call(
            &http,
            Method::GET,
            &format!("{leader_url}/connectors/relayed/status"),
            Some(&bearer(VIEWER)),
            None,
        )
        .await
        .ok()?;
        status["tasks"][0]["worker_id"].as_str().map(str::to_string)
    })
    .await?;
    let (elsewhere, elsewhere_url) = urls
        .iter()
        .find(|(w, _)| **w != owner)
        .map(|(w, u)| (w.to_string(), u.clone()))
        .context("a worker not running task 0")?;
    let (code, _, body) = call(
        &http,
        Method::POST,
        &format!("{elsewhere_url}/connectors/relayed/tasks/0/restart"),
        Some(&bearer(OPERATOR)),
        None,
    )
    .await?;
    assert_eq!(code, 204, "{body}");
    // A connector restart with its tasks, through the follower: the leader records it; the task
    // restart the leader then asks of the task's worker is part of it, not a second record.
    let (code, _, body) = call(
        &http,
        Method::POST,
        &format!("{follower_url}/connectors/relayed/restart?includeTasks=true"),
        Some(&bearer(OPERATOR)),
        None,
    )
    .await?;
    assert_eq!(code, 202, "{body}");

    let (records, raw) = audit_records(&bootstrap, "secure-audit", |records| {
        ["pause", "delete", "restart-task", "restart"]
            .iter()
            .all(|action| records.iter().any(|r| r["action"] == *action))
    })
    .await?;
    assert!(!raw.contains(PLANTED), "{raw}");
    let creates = with_action(&records, "create");
    assert_eq!(creates.len(), 1, "recorded once: {raw}");
    let create = creates[0];
    assert_eq!(create["principal"], "deployer");
    assert_eq!(create["role"], "admin");
    assert_eq!(create["auth"], "token");
    assert_eq!(create["worker"], leader.as_str(), "recorded where it ran");
    assert_eq!(create["forwarded_by"], follower.as_str());
    assert_eq!(create["status"], 201);
    assert!(
        create["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{create}"
    );
    let pauses = with_action(&records, "pause");
    assert_eq!(pauses.len(), 1, "{raw}");
    assert_eq!(pauses[0]["principal"], "night-shift");
    assert_eq!(pauses[0]["worker"], leader.as_str());
    assert_eq!(pauses[0]["forwarded_by"], follower.as_str());
    assert_eq!(pauses[0]["status"], 202);
    // The refused delete: recorded once, by the follower that refused it.
    let deletes = with_action(&records, "delete");
    assert_eq!(deletes.len(), 1, "{raw}");
    assert_eq!(deletes[0]["outcome"], "denied");
    assert_eq!(deletes[0]["worker"], follower.as_str());
    assert_eq!(deletes[0]["principal"], "night-shift");
    let task_restarts = with_action(&records, "restart-task");
    assert_eq!(task_restarts.len(), 1, "{raw}");
    assert_eq!(task_restarts[0]["worker"], owner.as_str());
    assert_eq!(task_restarts[0]["forwarded_by"], elsewhere.as_str());
    assert_eq!(task_restarts[0]["principal"], "night-shift");
    assert_eq!(task_restarts[0]["status"], 204);
    let restarts = with_action(&records, "restart");
    assert_eq!(restarts.len(), 1, "{raw}");
    assert_eq!(restarts[0]["worker"], leader.as_str());
    assert_eq!(restarts[0]["forwarded_by"], follower.as_str());
    assert_eq!(
        restarts[0]["path"],
        "/connectors/relayed/restart?includeTasks=true"
    );
    assert_eq!(restarts[0]["status"], 202);
    Ok(())
}

/// `medconnect hash-password` prints an Argon2id hash a users file takes, for that password
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_makes_a_users_file_entry() -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new(medconnect_bin()?)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"night shift 42\n")?;
    let output = child.wait_with_output()?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let hash = String::from_utf8(output.stdout)?.trim().to_string();
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("users.json");
    std::fs::write(
        &path,
        json!({"users": [{"name": "bob", "role": "viewer", "password_hash": hash}]}).to_string(),
    )?;
    let users = medconnect_runtime::rest::auth::basic::Users::load(&path)?;
    use medconnect_runtime::rest::auth::Role;
    assert_eq!(
        users.check("bob", "night shift 42").await,
        Some(Role::Viewer)
    );
    assert_eq!(users.check("bob", "night shift 42\n").await, None);
    assert_eq!(users.check("bob", "night shift").await, None);
    Ok(())
}
