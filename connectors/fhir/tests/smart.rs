//! SMART Backend Services against a real FHIR server (hfs) behind an authorizing proxy made
//! here: it publishes `.well-known/smart-configuration`, checks each client assertion (RS384 or
//! ES384 signature with the client's public key, iss/sub, aud, exp, a fresh jti) before it
//! issues a token, and forwards to hfs only requests with a token it issued and has not revoked.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use medconnect_api::{
    Record, SinkPartitions, SinkRecord, SinkTask, SourceTask, SourceTaskContext, props_from,
};
use ring::signature::{self, KeyPair};
use serde_json::{Value, json};
use support::{DEADLINE, shared, sink_task};

#[derive(Clone)]
struct AuthServer {
    upstream: String,
    url: String,
    client: reqwest::Client,
    client_id: String,
    alg: &'static str,
    public_key: Vec<u8>,
    tokens: Arc<Mutex<HashSet<String>>>,
    jtis: Arc<Mutex<HashSet<String>>>,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    /// Revoke every token when this many requests were forwarded.
    revoke_at: usize,
}

fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut buffer = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

fn form_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

impl AuthServer {
    /// Checks a client assertion; the reason when it is refused.
    fn check(&self, form: &str) -> Result<(), String> {
        let fields: std::collections::HashMap<String, String> = form
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), form_decode(v)))
            .collect();
        if fields.get("grant_type").map(String::as_str) != Some("client_credentials")
            || fields.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            || fields.get("scope").is_none_or(|s| s.is_empty())
        {
            return Err(format!("not a backend-services request: {fields:?}"));
        }
        let jwt = fields.get("client_assertion").ok_or("no assertion")?;
        let parts: Vec<&str> = jwt.split('.').collect();
        let [head, claims, sig] = parts[..] else {
            return Err("not a JWS".into());
        };
        let header: Value = serde_json::from_slice(&b64url_decode(head).ok_or("header")?)
            .map_err(|e| e.to_string())?;
        let claims: Value = serde_json::from_slice(&b64url_decode(claims).ok_or("claims")?)
            .map_err(|e| e.to_string())?;
        if header["alg"] != self.alg || header["typ"] != "JWT" {
            return Err(format!("header {header}"));
        }
        let algorithm: &dyn signature::VerificationAlgorithm = match self.alg {
            "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
            _ => &signature::ECDSA_P384_SHA384_FIXED,
        };
        signature::UnparsedPublicKey::new(algorithm, &self.public_key)
            .verify(
                format!("{head}.{}", parts[1]).as_bytes(),
                &b64url_decode(sig).ok_or("sig")?,
            )
            .map_err(|_| "bad signature".to_string())?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims["iss"] != self.client_id.as_str() || claims["sub"] != self.client_id.as_str() {
            return Err("iss/sub".into());
        }
        if claims["aud"] != format!("{}/auth/token", self.url).as_str() {
            return Err(format!("aud {}", claims["aud"]));
        }
        let exp = claims["exp"].as_u64().ok_or("exp")?;
        if exp <= now || exp > now + 300 {
            return Err("exp".into());
        }
        let jti = claims["jti"].as_str().ok_or("jti")?.to_string();
        if !self.jtis.lock().expect("lock").insert(jti) {
            return Err("jti replayed".into());
        }
        Ok(())
    }
}

async fn handle(
    State(auth): State<AuthServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if path == "/.well-known/smart-configuration" {
        return axum::Json(json!({"token_endpoint": format!("{}/auth/token", auth.url), "grant_types_supported": ["client_credentials"]})).into_response();
    }
    if path == "/auth/token" {
        return match auth.check(&String::from_utf8_lossy(&body)) {
            Ok(()) => {
                let n = auth.issued.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("token-{n}");
                auth.tokens.lock().expect("lock").insert(token.clone());
                axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": 3600, "scope": "system/*.*"})).into_response()
            }
            Err(reason) => {
                eprintln!("token refused: {reason}");
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "invalid_client"})),
                )
                    .into_response()
            }
        };
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    if !auth.tokens.lock().expect("lock").contains(&token) {
        auth.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if auth.forwarded.fetch_add(1, Ordering::SeqCst) + 1 == auth.revoke_at {
        auth.tokens.lock().expect("lock").clear();
    }
    let mut request = auth
        .client
        .request(method, format!("{}{path}", auth.upstream))
        .body(body);
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let Ok(answer) = request.send().await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let status = answer.status();
    let text = answer.bytes().await.unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        text,
    )
        .into_response()
}

async fn serve(alg: &'static str, public_key: Vec<u8>, revoke_at: usize) -> AuthServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let auth = AuthServer {
        upstream: shared().url.clone(),
        url,
        client: reqwest::Client::new(),
        client_id: "medconnect-test".into(),
        alg,
        public_key,
        tokens: Arc::default(),
        jtis: Arc::default(),
        issued: Arc::default(),
        refused: Arc::default(),
        forwarded: Arc::default(),
        revoke_at,
    };
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(auth.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    auth
}

/// A P-384 key (PKCS#8 PEM) and its public point.
fn p384_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("a P-384 key");
    let path = dir.join(name);
    std::fs::write(&path, key.serialize_pem()).expect("write the key");
    (path, key.public_key_raw().to_vec())
}

#[tokio::test]
async fn the_sink_writes_with_es384_assertions_and_a_revoked_token_is_replaced() {
    let hfs = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let (key_file, public_key) = p384_key(dir.path(), "client.pem");
    // Every token is revoked after the 5th request: the next one gets 401 and a new token.
    let auth = serve("ES384", public_key, 5).await;
    let key_file = key_file.to_string_lossy().to_string();
    let system = "urn:test:smart";
    let records: Vec<SinkRecord> = (0..300)
        .map(|i| {
            SinkRecord {
            record: Record::new("smart").with_key(format!("Observation/smart-{i}")).with_value(
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                       "identifier": [{"system": system, "value": i.to_string()}]})
                .to_string(),
            ),
            kafka_partition: 0,
            kafka_offset: i,
        }
        })
        .collect();
    let (mut task, mut errant) = sink_task(
        &auth.url,
        &[
            ("fhir.auth.type", "smart-backend"),
            ("fhir.auth.client.id", "medconnect-test"),
            ("fhir.auth.private.key.file", &key_file),
            ("fhir.auth.key.id", "key-1"),
            ("fhir.bundle.size", "20"),
        ],
        SinkPartitions::detached(),
    )
    .await;
    support::put_all(&mut task, &records, 100).await;
    assert_eq!(hfs.count("Observation", system).await, 300);
    assert!(errant.try_recv().is_err());
    assert_eq!(
        auth.issued.load(Ordering::SeqCst),
        2,
        "one token, and one after the revocation"
    );
    assert_eq!(
        auth.refused.load(Ordering::SeqCst),
        1,
        "the request with the revoked token"
    );

    // Another key than the one registered: the token endpoint refuses, the task fails.
    let (other_key, _) = p384_key(dir.path(), "other.pem");
    let other_key = other_key.to_string_lossy().to_string();
    let (mut task, _) = sink_task(
        &auth.url,
        &[
            ("fhir.auth.type", "smart-backend"),
            ("fhir.auth.client.id", "medconnect-test"),
            ("fhir.auth.private.key.file", &other_key),
        ],
        SinkPartitions::detached(),
    )
    .await;
    task.put(records[..1].to_vec()).await.expect("queued");
    let error = tokio::time::timeout(DEADLINE, task.flush())
        .await
        .expect("flush returns")
        .expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("SMART authorization failed") && message.contains("401"),
        "{message}"
    );
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

#[tokio::test]
async fn the_source_reads_with_rs384_assertions() {
    let hfs = shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("rsa.pem");
    // ring cannot make RSA keys: openssl does (PKCS#8).
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key_file)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "openssl genpkey: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pem = std::fs::read(&key_file).expect("the key");
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&pem).expect("PKCS#8")
    };
    let public_key = signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .expect("an RSA key")
        .public_key()
        .as_ref()
        .to_vec();
    let auth = serve("RS384", public_key, usize::MAX).await;
    let entries: Vec<Value> = (0..10)
        .map(|i| {
            json!({"resource": {"resourceType": "Practitioner", "id": format!("smart-{i}")},
                        "request": {"method": "PUT", "url": format!("Practitioner/smart-{i}")}})
        })
        .collect();
    hfs.transaction(entries).await;
    let key_file = key_file.to_string_lossy().to_string();
    let mut task = medconnect_fhir::FhirSourceTask::new(SourceTaskContext {
        connector_name: "smart-source".into(),
        task_id: 0,
        config: props_from(&[
            ("fhir.url", &auth.url),
            ("fhir.resource.types", "Practitioner"),
            ("fhir.auth.type", "smart-backend"),
            ("fhir.auth.client.id", "medconnect-test"),
            ("fhir.auth.private.key.file", &key_file),
            ("fhir.auth.scope", "system/Practitioner.read"),
        ]),
        offsets: Arc::new(NoOffsets),
        listener_budget: medconnect_api::limits::ByteBudget::unlimited(),
    })
    .expect("valid");
    task.start().await.expect("start");
    let records = tokio::time::timeout(DEADLINE, task.poll())
        .await
        .expect("poll returns")
        .expect("poll");
    assert_eq!(records.len(), 10);
    assert_eq!(auth.issued.load(Ordering::SeqCst), 1);
    assert_eq!(auth.refused.load(Ordering::SeqCst), 0);
}

struct NoOffsets;

impl medconnect_api::OffsetReader for NoOffsets {
    fn offset(&self, _: &medconnect_api::SourcePartition) -> Option<medconnect_api::SourceOffset> {
        None
    }
}
