//! Settings of the FHIR source and sink, declared once and read into typed structs. Every
//! setting of the connector is under `fhir.`; one there that it does not declare is a typo,
//! refused by name.

use std::path::PathBuf;
use std::time::Duration;

use medconnect_api::{
    ConfigDef, ConfigType, ConnectError, ConnectResult, Importance, ParsedConfig, Props, Validator,
};

use crate::time;

pub const URL: &str = "fhir.url";
pub const AUTH_TYPE: &str = "fhir.auth.type";
pub const AUTH_USERNAME: &str = "fhir.auth.username";
pub const AUTH_PASSWORD: &str = "fhir.auth.password";
pub const AUTH_TOKEN: &str = "fhir.auth.token";
pub const AUTH_CLIENT_ID: &str = "fhir.auth.client.id";
pub const AUTH_PRIVATE_KEY_FILE: &str = "fhir.auth.private.key.file";
pub const AUTH_KEY_ID: &str = "fhir.auth.key.id";
pub const AUTH_SCOPE: &str = "fhir.auth.scope";
pub const AUTH_TOKEN_URL: &str = "fhir.auth.token.url";
pub const TLS_CA_FILE: &str = "fhir.tls.ca.file";
pub const CONNECT_TIMEOUT_MS: &str = "fhir.connect.timeout.ms";
pub const REQUEST_TIMEOUT_MS: &str = "fhir.request.timeout.ms";

pub const RESOURCE_TYPES: &str = "fhir.resource.types";
pub const TOPIC: &str = "fhir.topic";
pub const POLL_INTERVAL_MS: &str = "fhir.poll.interval.ms";
pub const OVERLAP_MS: &str = "fhir.overlap.ms";
pub const PAGE_SIZE: &str = "fhir.page.size";
pub const TOMBSTONES: &str = "fhir.tombstones";
pub const INITIAL_SINCE: &str = "fhir.initial.since";

pub const LISTENER_HOST: &str = "fhir.listener.host";
pub const LISTENER_PORT: &str = "fhir.listener.port";
pub const ACK_TIMEOUT_MS: &str = "fhir.ack.timeout.ms";
pub const SUBSCRIPTION_ID: &str = "fhir.subscription.id";
pub const SUBSCRIPTION_TOPIC: &str = "fhir.subscription.topic";
pub const SUBSCRIPTION_ENDPOINT: &str = "fhir.subscription.endpoint";
pub const SUBSCRIPTION_CONTENT: &str = "fhir.subscription.content";
pub const SUBSCRIPTION_HEARTBEAT_S: &str = "fhir.subscription.heartbeat.seconds";

pub const WRITE_MODE: &str = "fhir.write.mode";
pub const IDENTIFIER_SYSTEM: &str = "fhir.identifier.system";
pub const BUNDLE_TYPE: &str = "fhir.bundle.type";
pub const BUNDLE_SIZE: &str = "fhir.bundle.size";
pub const LINGER_MS: &str = "fhir.linger.ms";
pub const ON_TOMBSTONE: &str = "fhir.on.tombstone";
pub const RETRY_BACKOFF_MS: &str = "fhir.retry.backoff.ms";
pub const RETRY_BACKOFF_MAX_MS: &str = "fhir.retry.backoff.max.ms";
pub const CONFLICT_RETRIES: &str = "fhir.conflict.retries";
pub const MAX_BUFFERED_RECORDS: &str = "fhir.max.buffered.records";

/// The connector's own namespace: an undeclared setting under it is refused.
const OWN_PREFIXES: &[&str] = &["fhir."];

/// The longest timeout or interval accepted: a day.
const MAX_MS: f64 = 86_400_000.0;

/// A secret that never shows in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[hidden]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer(Secret),
    /// SMART Backend Services: client credentials with a signed JWT assertion.
    Smart(SmartSettings),
}

/// SMART Backend Services settings; the key file is read when the client is built (at
/// start or validation, not while the task's settings are parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartSettings {
    pub client_id: String,
    pub key_file: PathBuf,
    pub key_id: Option<String>,
    pub scope: String,
    /// `None`: from `[base]/.well-known/smart-configuration`.
    pub token_url: Option<String>,
}

/// How the FHIR server is reached; the same for the source and the sink.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// The service base URL, without a trailing `/` (`http://host:8080/fhir`).
    pub base: String,
    pub auth: Auth,
    pub tls_ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

fn url_check(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(())
    } else {
        Err(format!("'{value}' is not an http:// or https:// URL"))
    }
}

/// A FHIR resource type name: a capital letter, then letters.
pub fn resource_type_check(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    match chars.next() {
        Some(first) if first.is_ascii_uppercase() && chars.all(|c| c.is_ascii_alphabetic()) => {
            Ok(())
        }
        _ => Err(format!("'{value}' is not a FHIR resource type name")),
    }
}

fn connection_def() -> ConfigDef {
    ConfigDef::new()
        .define_required(URL, ConfigType::String, Importance::High, "The FHIR R4 server's service base URL (http://host:8080/fhir).")
        .with_validator(Validator::custom(url_check))
        .define(AUTH_TYPE, ConfigType::String, "none", Importance::High, "none, basic (fhir.auth.username/fhir.auth.password), bearer (a static token in fhir.auth.token) or smart-backend (SMART Backend Services: fhir.auth.client.id and fhir.auth.private.key.file).")
        .with_validator(Validator::OneOf(vec!["none", "basic", "bearer", "smart-backend"]))
        .define(AUTH_USERNAME, ConfigType::String, "", Importance::Medium, "User for basic authentication.")
        .define(AUTH_PASSWORD, ConfigType::Password, "", Importance::Medium, "Password for basic authentication; use ${env:...} or ${file:...}.")
        .define(AUTH_TOKEN, ConfigType::Password, "", Importance::Medium, "Bearer token sent as Authorization: Bearer; use ${env:...} or ${file:...}.")
        .define(AUTH_CLIENT_ID, ConfigType::String, "", Importance::Medium, "SMART Backend Services: the client id registered with the server's authorization server (iss and sub of the assertion).")
        .define(AUTH_PRIVATE_KEY_FILE, ConfigType::String, "", Importance::Medium, "SMART Backend Services: PEM file of the client's private key, RSA (signs RS384) or P-384 (signs ES384), PKCS#8 (or PKCS#1 for RSA).")
        .define(AUTH_KEY_ID, ConfigType::String, "", Importance::Low, "SMART Backend Services: kid of the key in the client's registered JWKS (empty: none sent).")
        .define(AUTH_SCOPE, ConfigType::String, "system/*.read system/*.write", Importance::Medium, "SMART Backend Services: the scopes asked for.")
        .define(AUTH_TOKEN_URL, ConfigType::String, "", Importance::Low, "SMART Backend Services: the token endpoint; empty: token_endpoint of [base]/.well-known/smart-configuration.")
        .define(TLS_CA_FILE, ConfigType::String, "", Importance::Medium, "PEM file of the CA(s) that signed the server's certificate (https://), trusted besides the system's roots.")
        .define(CONNECT_TIMEOUT_MS, ConfigType::Long, "2000", Importance::Low, "How long establishing a connection may take.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(REQUEST_TIMEOUT_MS, ConfigType::Long, "60000", Importance::Low, "How long one request may wait for the server's answer; then it is retried.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .in_group("Connection")
}

fn connection(parsed: &ParsedConfig) -> ConnectResult<ConnectionConfig> {
    let base = parsed.string(URL)?.trim().trim_end_matches('/').to_string();
    let username = parsed.optional_string(AUTH_USERNAME);
    let password = parsed.optional_string(AUTH_PASSWORD).map(Secret);
    let token = parsed.optional_string(AUTH_TOKEN).map(Secret);
    let auth = match parsed.string(AUTH_TYPE)?.trim() {
        "basic" => match (username, password) {
            (Some(username), Some(password)) => Auth::Basic { username, password },
            (None, _) => {
                return Err(ConnectError::config(
                    AUTH_USERNAME,
                    "required with fhir.auth.type=basic",
                ));
            }
            (_, None) => {
                return Err(ConnectError::config(
                    AUTH_PASSWORD,
                    "required with fhir.auth.type=basic",
                ));
            }
        },
        "smart-backend" => {
            if username.is_some() || password.is_some() || token.is_some() {
                return Err(ConnectError::config(
                    AUTH_TYPE,
                    "smart-backend takes fhir.auth.client.id and fhir.auth.private.key.file, not a user, password or token",
                ));
            }
            let client_id = parsed.optional_string(AUTH_CLIENT_ID).ok_or_else(|| {
                ConnectError::config(AUTH_CLIENT_ID, "required with fhir.auth.type=smart-backend")
            })?;
            let key_file = parsed
                .optional_string(AUTH_PRIVATE_KEY_FILE)
                .ok_or_else(|| {
                    ConnectError::config(
                        AUTH_PRIVATE_KEY_FILE,
                        "required with fhir.auth.type=smart-backend",
                    )
                })?;
            let token_url = parsed.optional_string(AUTH_TOKEN_URL);
            if let Some(url) = &token_url {
                url_check(url).map_err(|r| ConnectError::config(AUTH_TOKEN_URL, r))?;
            }
            Auth::Smart(SmartSettings {
                client_id,
                key_file: PathBuf::from(key_file),
                key_id: parsed.optional_string(AUTH_KEY_ID),
                scope: parsed.string(AUTH_SCOPE)?,
                token_url,
            })
        }
        "bearer" => Auth::Bearer(token.ok_or_else(|| {
            ConnectError::config(AUTH_TOKEN, "required with fhir.auth.type=bearer")
        })?),
        _ => {
            if username.is_some() || password.is_some() || token.is_some() {
                return Err(ConnectError::config(
                    AUTH_TYPE,
                    "credentials are set but fhir.auth.type is none: say basic or bearer",
                ));
            }
            Auth::None
        }
    };
    Ok(ConnectionConfig {
        base,
        auth,
        tls_ca_file: parsed.optional_string(TLS_CA_FILE).map(PathBuf::from),
        connect_timeout: parsed.millis(CONNECT_TIMEOUT_MS)?,
        request_timeout: parsed.millis(REQUEST_TIMEOUT_MS)?,
    })
}

fn refuse_undeclared(props: &Props, def: &ConfigDef, what: &str) -> ConnectResult<()> {
    match def.undeclared(props, OWN_PREFIXES) {
        Some(name) => Err(ConnectError::config(
            name,
            format!("not a setting of the FHIR {what} (misspelled?)"),
        )),
        None => Ok(()),
    }
}

fn one_of<T: Copy>(parsed: &ParsedConfig, name: &str, values: &[(&str, T)]) -> ConnectResult<T> {
    let given = parsed.string(name)?;
    values
        .iter()
        .find(|(text, _)| *text == given.trim())
        .map(|(_, value)| *value)
        .ok_or_else(|| ConnectError::config(name, format!("'{given}' is not a known value")))
}

// ---------------------------------------------------------------------------------------
// Source

/// The topic template: `${resourceType}` stands for the resource's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate(String);

impl TopicTemplate {
    pub const PLACEHOLDER: &str = "${resourceType}";

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let rest = text.replace(Self::PLACEHOLDER, "");
        if rest.contains("${") {
            return Err(format!(
                "'{text}': the only placeholder is ${{resourceType}}"
            ));
        }
        let sample = text.replace(Self::PLACEHOLDER, "Patient");
        if sample.is_empty()
            || sample.len() > 249
            || !sample
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!(
                "'{text}' does not make a valid topic name (letters, digits, . _ -)"
            ));
        }
        Ok(Self(text.to_string()))
    }

    pub fn topic(&self, resource_type: &str) -> String {
        self.0.replace(Self::PLACEHOLDER, resource_type)
    }
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub connection: ConnectionConfig,
    pub resource_types: Vec<String>,
    pub topic: TopicTemplate,
    pub poll_interval: Duration,
    pub overlap: Duration,
    pub page_size: usize,
    pub tombstones: bool,
    /// Where a resource type without a stored offset starts (`None`: its whole history).
    pub initial_since: Option<time::Nanos>,
    /// The rest-hook receiver (FhirSubscriptionSource only).
    pub listener: Option<ListenerConfig>,
    /// The Subscription the task keeps on the server (FhirSubscriptionSource only).
    pub subscription: Option<SubscriptionSpec>,
}

/// Where the rest-hook receiver listens, and how long a notification waits for its records
/// to be durable before the server is answered 503 (and sends it again).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: String,
    pub ack_timeout: Duration,
}

/// A Subscription (R4 Backport IG) the task puts on the server at start: rest-hook to
/// `endpoint`, on `topic`.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    pub id: String,
    pub topic: String,
    pub endpoint: String,
    pub content: String,
    pub heartbeat_seconds: u32,
}

pub fn source_def() -> ConfigDef {
    polling_def("1000")
}

/// The settings of FhirSubscriptionSource: the polling source's (polls become the safety
/// net, every minute by default), the receiver's and the managed Subscription's.
pub fn subscription_def() -> ConfigDef {
    polling_def("60000")
        .define(LISTENER_HOST, ConfigType::String, "0.0.0.0", Importance::Medium, "Address the rest-hook receiver binds (every worker runs one).")
        .define_required(LISTENER_PORT, ConfigType::Int, Importance::High, "Port the rest-hook receiver binds, the same on every worker (behind a load balancer).")
        .with_validator(Validator::between(1.0, 65_535.0))
        .define(ACK_TIMEOUT_MS, ConfigType::Long, "30000", Importance::Low, "How long a notification waits for its records to be durable in Kafka; then the server is answered 503 and sends it again.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(SUBSCRIPTION_ID, ConfigType::String, "", Importance::High, "Id of a Subscription the task puts on the server at start (PUT Subscription/<id>, status requested: the server handshakes and activates it again after an outage). Empty: the Subscription is managed elsewhere.")
        .with_validator(Validator::custom(|v| if v.is_empty() || (v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')) { Ok(()) } else { Err(format!("'{v}' is not a FHIR id")) }))
        .define(SUBSCRIPTION_TOPIC, ConfigType::String, "", Importance::High, "The SubscriptionTopic canonical URL of the managed Subscription (Subscription.criteria in the R4 Backport IG).")
        .define(SUBSCRIPTION_ENDPOINT, ConfigType::String, "", Importance::High, "The URL the server posts notifications to: the load balancer in front of the workers' receivers.")
        .define(SUBSCRIPTION_CONTENT, ConfigType::String, "id-only", Importance::Medium, "Payload of the managed Subscription: id-only or full-resource (either way the versions are read from _history; full-resource over plain http is refused by some servers).")
        .with_validator(Validator::OneOf(vec!["id-only", "full-resource", "empty"]))
        .define(SUBSCRIPTION_HEARTBEAT_S, ConfigType::Int, "60", Importance::Low, "Heartbeat period asked of the server; a heartbeat that reports more events than were received starts a catch-up read.")
        .with_validator(Validator::between(1.0, 86_400.0))
        .in_group("Subscription")
}

fn polling_def(poll_interval_default: &'static str) -> ConfigDef {
    connection_def()
        .define_required(RESOURCE_TYPES, ConfigType::List, Importance::High, "Resource types to read the changes of (Patient,Observation); split over the tasks.")
        .with_validator(Validator::custom(|v| {
            v.split(',').map(str::trim).filter(|t| !t.is_empty()).try_for_each(resource_type_check)
        }))
        .define(TOPIC, ConfigType::String, "fhir.${resourceType}", Importance::High, "Topic of the records; ${resourceType} stands for the resource's type.")
        .with_validator(Validator::custom(|v| TopicTemplate::parse(v).map(|_| ())))
        .define(POLL_INTERVAL_MS, ConfigType::Long, poll_interval_default, Importance::Medium, "How often each resource type's _history is asked for changes when the last poll found none (with a rest-hook receiver: the safety net behind the notifications).")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(OVERLAP_MS, ConfigType::Long, "2000", Importance::Medium, "Each poll reads again this far back before the latest change seen (_since = latest - overlap), so a change the server committed late with an earlier lastUpdated is not skipped; versions already emitted are recognised by (id, versionId) and not emitted twice.")
        .with_validator(Validator::between(0.0, MAX_MS))
        .define(PAGE_SIZE, ConfigType::Int, "500", Importance::Low, "Entries per _history page (_count).")
        .with_validator(Validator::between(1.0, 10_000.0))
        .define(TOMBSTONES, ConfigType::Boolean, "true", Importance::Medium, "true: a deleted resource becomes a record with key Type/id and a null value (a tombstone); false: deletions are skipped.")
        .define(INITIAL_SINCE, ConfigType::String, "", Importance::Medium, "Where a resource type without a stored offset starts: an instant (2026-01-01T00:00:00Z); empty: its whole history.")
        .with_validator(Validator::custom(|v| {
            if v.trim().is_empty() || time::parse(v).is_some() { Ok(()) } else { Err(format!("'{v}' is not an instant (2026-01-01T00:00:00Z)")) }
        }))
        .in_group("Source")
}

impl SourceConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        Self::parse_with(props, source_def(), "source").map(|(config, _)| config)
    }

    /// The settings of FhirSubscriptionSource.
    pub fn parse_subscription(props: &Props) -> ConnectResult<Self> {
        let (mut config, parsed) =
            Self::parse_with(props, subscription_def(), "subscription source")?;
        let port: u16 = parsed.int_as(LISTENER_PORT)?;
        config.listener = Some(ListenerConfig {
            address: format!("{}:{port}", parsed.string(LISTENER_HOST)?.trim()),
            ack_timeout: parsed.millis(ACK_TIMEOUT_MS)?,
        });
        config.subscription = match parsed.optional_string(SUBSCRIPTION_ID) {
            None => None,
            Some(id) => {
                let topic = parsed.optional_string(SUBSCRIPTION_TOPIC).ok_or_else(|| {
                    ConnectError::config(SUBSCRIPTION_TOPIC, "required with fhir.subscription.id")
                })?;
                let endpoint = parsed
                    .optional_string(SUBSCRIPTION_ENDPOINT)
                    .ok_or_else(|| {
                        ConnectError::config(
                            SUBSCRIPTION_ENDPOINT,
                            "required with fhir.subscription.id",
                        )
                    })?;
                url_check(&endpoint).map_err(|r| ConnectError::config(SUBSCRIPTION_ENDPOINT, r))?;
                Some(SubscriptionSpec {
                    id,
                    topic: topic.trim().to_string(),
                    endpoint: endpoint.trim().to_string(),
                    content: parsed.string(SUBSCRIPTION_CONTENT)?,
                    heartbeat_seconds: parsed.int_as(SUBSCRIPTION_HEARTBEAT_S)?,
                })
            }
        };
        Ok(config)
    }

    fn parse_with(
        props: &Props,
        def: ConfigDef,
        what: &str,
    ) -> ConnectResult<(Self, ParsedConfig)> {
        refuse_undeclared(props, &def, what)?;
        let parsed = def.parse(props)?;
        let mut resource_types: Vec<String> = Vec::new();
        for name in parsed.list(RESOURCE_TYPES)? {
            let name = name.trim().to_string();
            resource_type_check(&name).map_err(|r| ConnectError::config(RESOURCE_TYPES, r))?;
            if !resource_types.contains(&name) {
                resource_types.push(name);
            }
        }
        if resource_types.is_empty() {
            return Err(ConnectError::config(
                RESOURCE_TYPES,
                "at least one resource type",
            ));
        }
        let topic = TopicTemplate::parse(&parsed.string(TOPIC)?)
            .map_err(|r| ConnectError::config(TOPIC, r))?;
        let initial_since = match parsed.optional_string(INITIAL_SINCE) {
            Some(text) => Some(time::parse(&text).ok_or_else(|| {
                ConnectError::config(INITIAL_SINCE, format!("'{text}' is not an instant"))
            })?),
            None => None,
        };
        let config = Self {
            connection: connection(&parsed)?,
            resource_types,
            topic,
            poll_interval: parsed.millis(POLL_INTERVAL_MS)?,
            overlap: parsed.millis(OVERLAP_MS)?,
            page_size: parsed.int_as(PAGE_SIZE)?,
            tombstones: parsed.boolean(TOMBSTONES)?,
            initial_since,
            listener: None,
            subscription: None,
        };
        Ok((config, parsed))
    }
}

// ---------------------------------------------------------------------------------------
// Sink

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `PUT Type/id`: the id from the record key (`Type/id`) or the resource's `id`.
    Upsert,
    /// `PUT Type?identifier=system|value`: updates the resource with that identifier, or
    /// creates it.
    ConditionalUpdate,
    /// `POST Type` with `If-None-Exist: identifier=system|value`: creates it only when no
    /// resource has that identifier.
    ConditionalCreate,
    /// `PUT Type/id` with `If-Match` on the resource's `meta.versionId`: only over that
    /// version. A 412 re-reads the resource: the same content is a redelivery (written),
    /// another is reported as errant.
    Versioned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleType {
    Batch,
    Transaction,
}

impl BundleType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Transaction => "transaction",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTombstone {
    /// `DELETE Type/id` of the record key.
    Delete,
    Ignore,
    /// Reported as errant.
    Fail,
}

#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub connection: ConnectionConfig,
    pub write_mode: WriteMode,
    pub identifier_system: Option<String>,
    pub bundle_type: BundleType,
    pub bundle_size: usize,
    pub linger: Duration,
    pub on_tombstone: OnTombstone,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub conflict_retries: u32,
    pub max_buffered: usize,
}

pub fn sink_def() -> ConfigDef {
    connection_def()
        .define(WRITE_MODE, ConfigType::String, "upsert", Importance::High, "upsert: PUT Type/id (id from the record key Type/id, else the resource's id); conditional-update: PUT Type?identifier=system|value; conditional-create: POST Type with If-None-Exist on the identifier; versioned: PUT Type/id with If-Match on the resource's meta.versionId (a 412 re-reads the resource: the same content is a redelivery, another goes to the dead-letter topic). Each is idempotent: a record delivered again changes nothing but the versionId.")
        .with_validator(Validator::OneOf(vec!["upsert", "conditional-update", "conditional-create", "versioned"]))
        .define(IDENTIFIER_SYSTEM, ConfigType::String, "", Importance::Medium, "For the conditional modes: the system of the identifier to match on; empty: the resource's first identifier.")
        .define(BUNDLE_TYPE, ConfigType::String, "batch", Importance::Medium, "batch: entries succeed or fail one by one; transaction: all of a Bundle or nothing (a refused transaction is sent again as a batch to find the entries the server refuses).")
        .with_validator(Validator::OneOf(vec!["batch", "transaction"]))
        .define(BUNDLE_SIZE, ConfigType::Int, "100", Importance::Medium, "Entries per Bundle at most.")
        .with_validator(Validator::between(1.0, 10_000.0))
        .define(LINGER_MS, ConfigType::Long, "5", Importance::Low, "How long a partial Bundle waits for more records before it is sent.")
        .with_validator(Validator::between(0.0, MAX_MS))
        .define(ON_TOMBSTONE, ConfigType::String, "delete", Importance::Medium, "A record with a null value: delete (DELETE Type/id of its key), ignore, or fail (reported as errant).")
        .with_validator(Validator::OneOf(vec!["delete", "ignore", "fail"]))
        .define(RETRY_BACKOFF_MS, ConfigType::Long, "100", Importance::Low, "First wait before sending again what the server pushed back on (429, 503, 5xx, no answer), doubled each time; a longer Retry-After is honoured.")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(RETRY_BACKOFF_MAX_MS, ConfigType::Long, "30000", Importance::Low, "The longest wait between two attempts (Retry-After included).")
        .with_validator(Validator::between(1.0, MAX_MS))
        .define(CONFLICT_RETRIES, ConfigType::Int, "3", Importance::Low, "Times an entry answered 409 or 412 is sent again before it is reported as errant.")
        .with_validator(Validator::between(0.0, 100.0))
        .define(MAX_BUFFERED_RECORDS, ConfigType::Int, "10000", Importance::Low, "Records put but not yet acknowledged by the server beyond which the task pauses its partitions (resumed at half).")
        .with_validator(Validator::between(1.0, 10_000_000.0))
        .in_group("Sink")
}

impl SinkConfig {
    pub fn parse(props: &Props) -> ConnectResult<Self> {
        let def = sink_def();
        refuse_undeclared(props, &def, "sink")?;
        let parsed = def.parse(props)?;
        let retry_backoff = parsed.millis(RETRY_BACKOFF_MS)?;
        let retry_backoff_max = parsed.millis(RETRY_BACKOFF_MAX_MS)?;
        if retry_backoff_max < retry_backoff {
            return Err(ConnectError::config(
                RETRY_BACKOFF_MAX_MS,
                "must not be below fhir.retry.backoff.ms",
            ));
        }
        Ok(Self {
            connection: connection(&parsed)?,
            write_mode: one_of(
                &parsed,
                WRITE_MODE,
                &[
                    ("upsert", WriteMode::Upsert),
                    ("conditional-update", WriteMode::ConditionalUpdate),
                    ("conditional-create", WriteMode::ConditionalCreate),
                    ("versioned", WriteMode::Versioned),
                ],
            )?,
            identifier_system: parsed.optional_string(IDENTIFIER_SYSTEM),
            bundle_type: one_of(
                &parsed,
                BUNDLE_TYPE,
                &[
                    ("batch", BundleType::Batch),
                    ("transaction", BundleType::Transaction),
                ],
            )?,
            bundle_size: parsed.int_as(BUNDLE_SIZE)?,
            linger: parsed.millis(LINGER_MS)?,
            on_tombstone: one_of(
                &parsed,
                ON_TOMBSTONE,
                &[
                    ("delete", OnTombstone::Delete),
                    ("ignore", OnTombstone::Ignore),
                    ("fail", OnTombstone::Fail),
                ],
            )?,
            retry_backoff,
            retry_backoff_max,
            conflict_retries: parsed.int_as(CONFLICT_RETRIES)?,
            max_buffered: parsed.int_as(MAX_BUFFERED_RECORDS)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medconnect_api::props_from;

    #[test]
    fn undeclared_fhir_settings_are_refused_by_name() {
        let props = props_from(&[("fhir.url", "http://h:1"), ("fhir.bundle.sise", "10")]);
        let error = SinkConfig::parse(&props).expect_err("typo");
        assert!(
            matches!(error, ConnectError::Config { ref field, .. } if field == "fhir.bundle.sise"),
            "{error}"
        );
        let props = props_from(&[
            ("fhir.url", "http://h:1"),
            ("fhir.resource.types", "Patient"),
            ("fhir.overlap", "1"),
        ]);
        assert!(SourceConfig::parse(&props).is_err());
        // Connect's common settings are not ours to refuse.
        let props = props_from(&[
            ("fhir.url", "http://h:1/"),
            ("topics", "x"),
            ("errors.tolerance", "all"),
        ]);
        let config = SinkConfig::parse(&props).expect("valid");
        assert_eq!(config.connection.base, "http://h:1");
        assert_eq!(config.write_mode, WriteMode::Upsert);
        assert_eq!(config.bundle_type, BundleType::Batch);
    }

    #[test]
    fn credentials_need_their_auth_type_and_stay_hidden() {
        let props = props_from(&[("fhir.url", "http://h:1"), ("fhir.auth.token", "s3cret")]);
        assert!(SinkConfig::parse(&props).is_err());
        let props = props_from(&[
            ("fhir.url", "http://h:1"),
            ("fhir.auth.type", "bearer"),
            ("fhir.auth.token", "s3cret"),
        ]);
        let config = SinkConfig::parse(&props).expect("valid");
        assert!(!format!("{config:?}").contains("s3cret"));
        let props = props_from(&[
            ("fhir.url", "http://h:1"),
            ("fhir.auth.type", "basic"),
            ("fhir.auth.username", "u"),
        ]);
        let error = SinkConfig::parse(&props).expect_err("no password");
        assert!(matches!(error, ConnectError::Config { ref field, .. } if field == AUTH_PASSWORD));
    }

    #[test]
    fn source_settings_parse() {
        let props = props_from(&[
            ("fhir.url", "http://h:1"),
            ("fhir.resource.types", "Patient, Observation,Patient"),
            ("fhir.initial.since", "2026-01-01T00:00:00Z"),
        ]);
        let config = SourceConfig::parse(&props).expect("valid");
        assert_eq!(config.resource_types, ["Patient", "Observation"]);
        assert_eq!(config.topic.topic("Patient"), "fhir.Patient");
        assert!(config.initial_since.is_some());
        for (name, value) in [
            ("fhir.resource.types", "patient"),
            ("fhir.topic", "x.${type}"),
            ("fhir.initial.since", "yesterday"),
        ] {
            let mut props = props.clone();
            props.insert(name.into(), value.into());
            let error = SourceConfig::parse(&props).expect_err(value);
            assert!(
                matches!(error, ConnectError::Config { ref field, .. } if field == name),
                "{error}"
            );
        }
    }
}

#[cfg(test)]
mod example_configs {
    use super::*;

    fn example(name: &str) -> Props {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("the example config");
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        json["config"]
            .as_object()
            .expect("a config object")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_string()))
            .collect()
    }

    #[test]
    fn the_example_configs_parse() {
        let source = SourceConfig::parse(&example("fhir-source.json")).expect("fhir-source.json");
        assert_eq!(
            source.resource_types,
            ["Patient", "Encounter", "Observation"]
        );
        let sink = SinkConfig::parse(&example("fhir-sink.json")).expect("fhir-sink.json");
        assert_eq!(sink.bundle_size, 100);
    }
}
