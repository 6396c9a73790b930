//! The source connector and its task: each resource type's `_history` is polled with
//! `_since` = the latest change seen minus `fhir.overlap.ms`, every page followed; the changes
//! are sorted oldest first (the server lists newest first) and those not seen before, by
//! (id, versionId), become records. The offset of a resource type (its source partition) holds
//! the latest change seen and the versions seen within the overlap window, so a restart neither
//! skips nor repeats a version.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use medconnect_api::{
    AckHandle, ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    Delivery, OffsetReader, Placement, Props, Record, SourceConnector, SourceOffset,
    SourcePartition, SourceRecord, SourceTask, SourceTaskContext, TaskConfig, content_type,
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{FhirClient, FhirError};
use crate::config::{
    LISTENER_PORT, RESOURCE_TYPES, SUBSCRIPTION_ID, SourceConfig, source_def, subscription_def,
};
use crate::hook::{Receiver, Settled, Trigger};
use crate::sink::{check_server, client_error};
use crate::time::{self, Nanos};

pub const HEADER_RESOURCE_TYPE: &str = "fhir.resource.type";
pub const HEADER_ID: &str = "fhir.id";
pub const HEADER_VERSION_ID: &str = "fhir.version.id";
pub const HEADER_LAST_UPDATED: &str = "fhir.last.updated";

/// Offset fields: the latest change seen, and the versions seen within the overlap window.
const OFFSET_SINCE: &str = "since";
const OFFSET_SEEN: &str = "seen";
/// Source partition field.
const PARTITION_TYPE: &str = "resource_type";

/// At most this many versions are remembered within the overlap window (a burst larger than
/// this within the window may be emitted twice after a restart, never skipped).
const MAX_SEEN: usize = 100_000;

#[derive(Debug, Default)]
pub struct FhirSourceConnector;

#[async_trait]
impl Connector for FhirSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.fhir.FhirSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["FhirSource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        source_def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = SourceConfig::parse(config)?;
        let client = FhirClient::new(&config.connection).map_err(client_error)?;
        let server = check_server(&client).await?;
        tracing::info!(%server, "FHIR source validated against the server");
        Ok(())
    }

    /// The resource types, split round-robin over at most `max_tasks` tasks.
    async fn task_configs(
        &self,
        context: &ConnectorContext,
        max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        let config = SourceConfig::parse(&context.config)?;
        let tasks = max_tasks.clamp(1, config.resource_types.len());
        let mut groups = vec![Vec::new(); tasks];
        for (i, resource_type) in config.resource_types.iter().enumerate() {
            groups[i % tasks].push(resource_type.clone());
        }
        Ok(groups
            .into_iter()
            .map(|types| {
                let mut task = context.config.clone();
                task.insert(RESOURCE_TYPES.to_string(), types.join(","));
                task
            })
            .collect())
    }
}

impl SourceConnector for FhirSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(FhirSourceTask::new(context)?))
    }
}

/// The rest-hook receiver for R4 Subscriptions (Backport IG): one task on every worker, each
/// listening on `fhir.listener.port` behind a load balancer. A notification makes the task read
/// the `_history` of the resource types it names at once (the records are those of the polling
/// source: every version, in order, offsets per resource type), and the server is answered
/// only once those records are durable in Kafka. Polling every `fhir.poll.interval.ms` (a
/// minute by default) and at start is the safety net: what changed while no receiver answered
/// arrives then, or at the next notification.
#[derive(Debug, Default)]
pub struct FhirSubscriptionSourceConnector;

#[async_trait]
impl Connector for FhirSubscriptionSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.fhir.FhirSubscriptionSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["FhirSubscriptionSource"]
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Source
    }

    fn config_def(&self) -> ConfigDef {
        subscription_def()
    }

    async fn validate(&self, config: &Props) -> ConnectResult<()> {
        let config = SourceConfig::parse_subscription(config)?;
        let client = FhirClient::new(&config.connection).map_err(client_error)?;
        let server = check_server(&client).await?;
        tracing::info!(%server, "FHIR subscription source validated against the server");
        Ok(())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // One receiver per worker: more tasks on one worker could not share the port.
        Ok(vec![context.config.clone()])
    }

    fn placement(&self) -> Placement {
        Placement::EveryWorker
    }

    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }
}

impl SourceConnector for FhirSubscriptionSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(FhirSourceTask::with_receiver(context)?))
    }
}

/// One version of a resource from a `_history` Bundle.
#[derive(Debug, Clone)]
struct Change {
    id: String,
    version: String,
    last_updated: Nanos,
    /// As the server wrote it.
    last_updated_text: String,
    /// The resource's JSON, serialized once; `None`: a deletion.
    resource: Option<bytes::Bytes>,
}

impl Change {
    fn seen_key(&self) -> String {
        format!("{}/{}", self.id, self.version)
    }

    /// Sort key: time, then id, then the version as a number where it is one.
    fn order(&self) -> (Nanos, &str, u64, &str) {
        (
            self.last_updated,
            &self.id,
            self.version.parse().unwrap_or(u64::MAX),
            &self.version,
        )
    }
}

/// `W/"3"` -> `3`.
fn etag_version(etag: &str) -> Option<String> {
    let version = etag.trim().trim_start_matches("W/").trim_matches('"');
    (!version.is_empty()).then(|| version.to_string())
}

/// A history entry as a change; `None` when it lacks what identifies a version.
fn change_of(entry: &Value, resource_type: &str) -> Option<Change> {
    let response = &entry["response"];
    let resource = entry.get("resource").filter(|r| r.is_object());
    let deleted = entry["request"]["method"].as_str() == Some("DELETE") || resource.is_none();
    let (id, version, last_updated_text) = match resource {
        Some(resource) if !deleted => {
            if resource["resourceType"].as_str() != Some(resource_type) {
                return None;
            }
            let id = resource["id"].as_str()?.to_string();
            let version = resource["meta"]["versionId"]
                .as_str()
                .map(str::to_string)
                .or_else(|| response["etag"].as_str().and_then(etag_version))?;
            // The response's lastModified when given (hfs: nanoseconds), else meta.lastUpdated.
            let last = response["lastModified"]
                .as_str()
                .or_else(|| resource["meta"]["lastUpdated"].as_str())?;
            (id, version, last.to_string())
        }
        _ => {
            let url = entry["request"]["url"]
                .as_str()
                .or_else(|| entry["fullUrl"].as_str())?;
            let mut segments = url.split('/').rev().filter(|s| !s.is_empty());
            let mut id = segments.next()?;
            if let Some(rest) = url.split("/_history/").next()
                && url.contains("/_history/")
            {
                id = rest.rsplit('/').next()?;
            }
            let version = response["etag"].as_str().and_then(etag_version)?;
            let last = response["lastModified"].as_str()?;
            (id.to_string(), version, last.to_string())
        }
    };
    let last_updated = time::parse(&last_updated_text)?;
    Some(Change {
        id,
        version,
        last_updated,
        last_updated_text,
        resource: if deleted {
            None
        } else {
            resource
                .and_then(|r| serde_json::to_vec(r).ok())
                .map(bytes::Bytes::from)
        },
    })
}

/// What has been read of one resource type.
#[derive(Debug, Clone, Default)]
struct Cursor {
    /// The latest change seen.
    since: Option<Nanos>,
    /// Versions seen at or after `since - overlap`, oldest first.
    window: VecDeque<(Nanos, String)>,
    seen: HashSet<String>,
}

impl Cursor {
    fn from_offset(offset: &SourceOffset) -> Self {
        let mut cursor = Self {
            since: offset
                .get(OFFSET_SINCE)
                .and_then(Value::as_str)
                .and_then(time::parse),
            ..Self::default()
        };
        if let Some(seen) = offset.get(OFFSET_SEEN).and_then(Value::as_array) {
            for item in seen {
                if let (Some(at), Some(key)) = (
                    item.get(0).and_then(Value::as_str).and_then(time::parse),
                    item.get(1).and_then(Value::as_str),
                ) {
                    cursor.window.push_back((at, key.to_string()));
                    cursor.seen.insert(key.to_string());
                }
            }
        }
        cursor
    }

    fn offset(&self) -> SourceOffset {
        let mut offset = Map::new();
        if let Some(since) = self.since {
            offset.insert(OFFSET_SINCE.into(), Value::String(time::format(since)));
        }
        offset.insert(
            OFFSET_SEEN.into(),
            Value::Array(
                self.window
                    .iter()
                    .map(|(at, key)| json!([time::format(*at), key]))
                    .collect(),
            ),
        );
        offset
    }

    fn record(&mut self, change: &Change, overlap: Duration) {
        self.since = Some(
            self.since
                .map_or(change.last_updated, |s| s.max(change.last_updated)),
        );
        if self.seen.insert(change.seen_key()) {
            // Kept in time order: changes come sorted, late ones go in their place.
            let position = self
                .window
                .iter()
                .rposition(|(at, _)| *at <= change.last_updated)
                .map_or(0, |p| p + 1);
            self.window
                .insert(position, (change.last_updated, change.seen_key()));
        }
        self.prune(overlap);
    }

    fn prune(&mut self, overlap: Duration) {
        let Some(since) = self.since else { return };
        let horizon = since - overlap.as_nanos() as Nanos;
        while let Some((at, key)) = self.window.front() {
            if *at >= horizon && self.window.len() <= MAX_SEEN {
                break;
            }
            self.seen.remove(key);
            self.window.pop_front();
        }
    }
}

struct TypeState {
    resource_type: String,
    partition: SourcePartition,
    cursor: Cursor,
    due: Instant,
}

pub struct FhirSourceTask {
    connector: String,
    config: SourceConfig,
    offsets: Arc<dyn OffsetReader>,
    client: Option<FhirClient>,
    types: Vec<TypeState>,
    hook: Option<Hook>,
}

/// The running receiver: its HTTP server, the reads it asks for, and the acknowledgements
/// of the records it waits on.
struct Hook {
    triggers: mpsc::Receiver<Trigger>,
    acks: mpsc::UnboundedSender<(u64, oneshot::Receiver<Delivery>)>,
    /// The sequence number of the last record emitted.
    seq: u64,
    server: JoinHandle<()>,
    settler: JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.server.abort();
        self.settler.abort();
    }
}

/// Follows the records' acknowledgements in order: how far they are settled, and how many
/// were not written.
async fn settle(
    mut acks: mpsc::UnboundedReceiver<(u64, oneshot::Receiver<Delivery>)>,
    settled: watch::Sender<Settled>,
) {
    let mut state = Settled::default();
    while let Some((seq, ack)) = acks.recv().await {
        let written = matches!(
            ack.await,
            Ok(Delivery::Written { .. } | Delivery::Filtered | Delivery::DeadLettered { .. })
        );
        if !written {
            state.failures += 1;
        }
        state.settled = seq;
        let _ = settled.send(state);
    }
}

impl std::fmt::Debug for FhirSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FhirSourceTask")
            .field("connector", &self.connector)
            .field("url", &self.config.connection.base)
            .field("resource_types", &self.config.resource_types)
            .finish()
    }
}

fn source_partition(resource_type: &str) -> SourcePartition {
    SourcePartition::from_iter([(
        PARTITION_TYPE.to_string(),
        Value::String(resource_type.to_string()),
    )])
}

impl FhirSourceTask {
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: SourceConfig::parse(&context.config)?,
            connector: context.connector_name,
            offsets: context.offsets,
            client: None,
            types: Vec::new(),
            hook: None,
        })
    }

    /// A task of FhirSubscriptionSource: a polling source with a rest-hook receiver.
    pub fn with_receiver(context: SourceTaskContext) -> ConnectResult<Self> {
        Ok(Self {
            config: SourceConfig::parse_subscription(&context.config)?,
            connector: context.connector_name,
            offsets: context.offsets,
            client: None,
            types: Vec::new(),
            hook: None,
        })
    }

    /// Starts the receiver, then puts the managed Subscription (the server handshakes with
    /// the receiver at once).
    async fn start_receiver(&mut self, client: &FhirClient) -> ConnectResult<()> {
        let Some(listener) = self.config.listener.clone() else {
            return Ok(());
        };
        self.hook = None;
        let socket = tokio::net::TcpListener::bind(&listener.address)
            .await
            .map_err(|e| {
                let error = ConnectError::from(e);
                if error.is_retriable() {
                    error
                } else {
                    ConnectError::config(
                        LISTENER_PORT,
                        format!("cannot listen on {}: {error}", listener.address),
                    )
                }
            })?;
        let (triggers_tx, triggers) = mpsc::channel(64);
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let (settled_tx, settled) = watch::channel(Settled::default());
        let receiver = Receiver {
            connector: self.connector.clone(),
            triggers: triggers_tx,
            settled,
            resource_types: Arc::new(self.config.resource_types.clone()),
            ack_timeout: listener.ack_timeout,
            events: Arc::default(),
        };
        let connector = self.connector.clone();
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(socket, crate::hook::router(receiver)).await {
                tracing::error!(connector = %connector, %error, "the rest-hook receiver stopped");
            }
        });
        self.hook = Some(Hook {
            triggers,
            acks,
            seq: 0,
            server,
            settler: tokio::spawn(settle(acks_rx, settled_tx)),
        });
        tracing::info!(connector = %self.connector, address = %listener.address, "rest-hook receiver listening");
        if let Some(spec) = &self.config.subscription {
            let resource = crate::hook::subscription_resource(spec, &self.connector);
            match client
                .put(&format!("Subscription/{}", spec.id), &resource)
                .await
            {
                Ok(_) => {
                    tracing::info!(connector = %self.connector, subscription = %spec.id, "Subscription requested")
                }
                Err(error) if error.is_retriable() => {
                    return Err(ConnectError::retriable(format!(
                        "cannot put the Subscription: {error}"
                    )));
                }
                Err(error) => {
                    return Err(ConnectError::config(
                        SUBSCRIPTION_ID,
                        format!("the server refused the Subscription: {error}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// With several receivers (one per worker), another one may have read further: its
    /// stored offset is taken when it is ahead of this task's.
    fn catch_up_cursor(&mut self, index: usize) {
        let state = &mut self.types[index];
        if let Some(stored) = self.offsets.offset(&state.partition) {
            let stored = Cursor::from_offset(&stored);
            if stored.since > state.cursor.since {
                state.cursor = stored;
            }
        }
    }

    /// The page URL a `next` link names, on the configured base: a server that writes its own
    /// base URL into links (behind a proxy, another host name) is still asked through ours.
    fn next_url(&self, link: &str, resource_type: &str) -> Option<String> {
        let marker = format!("/{resource_type}/_history");
        let at = link.find(&marker)?;
        Some(format!("{}{}", self.config.connection.base, &link[at..]))
    }

    /// Every change of one resource type since `since`, all pages, oldest first.
    async fn history(
        &self,
        client: &FhirClient,
        resource_type: &str,
        since: Option<Nanos>,
    ) -> Result<Vec<Change>, FhirError> {
        let mut url = format!(
            "{}/{resource_type}/_history?_count={}",
            self.config.connection.base, self.config.page_size
        );
        if let Some(since) = since {
            url.push_str(&format!("&_since={}", time::format(since)));
        }
        let mut changes = Vec::new();
        let mut skipped = 0usize;
        let mut pages = 0usize;
        loop {
            let page = client.get(&url).await?;
            pages += 1;
            for entry in page["entry"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                match change_of(entry, resource_type) {
                    Some(change) => changes.push(change),
                    None => skipped += 1,
                }
            }
            let next = page["link"]
                .as_array()
                .and_then(|links| {
                    links
                        .iter()
                        .find(|l| l["relation"].as_str() == Some("next"))
                })
                .and_then(|l| l["url"].as_str());
            match next.and_then(|link| self.next_url(link, resource_type)) {
                Some(next) if next != url => url = next,
                _ => break,
            }
        }
        if skipped > 0 {
            tracing::warn!(connector = %self.connector, resource_type, skipped, "history entries without an id, version or time skipped");
        }
        tracing::debug!(connector = %self.connector, resource_type, pages, changes = changes.len(), "history read");
        changes.sort_by(|a, b| a.order().cmp(&b.order()));
        Ok(changes)
    }

    /// Reads one resource type's new versions; `None` when the server did not answer (the
    /// type is due again after the poll interval or the server's Retry-After).
    async fn read(
        &mut self,
        client: &FhirClient,
        index: usize,
    ) -> ConnectResult<Option<Vec<SourceRecord>>> {
        let overlap = self.config.overlap;
        let (resource_type, since) = {
            let state = &self.types[index];
            let since = state
                .cursor
                .since
                .map(|since| since - overlap.as_nanos() as Nanos);
            (state.resource_type.clone(), since)
        };
        let changes = match self.history(client, &resource_type, since).await {
            Ok(changes) => changes,
            Err(error) if error.is_retriable() => {
                let wait = error
                    .retry_after()
                    .unwrap_or(self.config.poll_interval)
                    .max(self.config.poll_interval);
                tracing::warn!(connector = %self.connector, resource_type, %error, wait_ms = wait.as_millis() as u64, "cannot read the history; trying again");
                self.types[index].due = Instant::now() + wait;
                return Ok(None);
            }
            Err(
                error @ FhirError::Status {
                    status: 401 | 403, ..
                },
            ) => {
                return Err(ConnectError::fatal(format!(
                    "the FHIR server refused the source's credentials: {error}"
                )));
            }
            Err(error) => {
                return Err(ConnectError::fatal(format!(
                    "cannot read the {resource_type} history: {error}"
                )));
            }
        };
        let state = &mut self.types[index];
        let fresh: Vec<Change> = changes
            .into_iter()
            .filter(|c| !state.cursor.seen.contains(&c.seen_key()))
            .collect();
        if fresh.is_empty() {
            state.due = Instant::now() + self.config.poll_interval;
            return Ok(Some(Vec::new()));
        }
        let before = state.cursor.offset();
        for change in &fresh {
            state.cursor.record(change, overlap);
        }
        let after = state.cursor.offset();
        // More may have come while these were read: ask again at once.
        state.due = Instant::now();
        let partition = state.partition.clone();
        let emitted: Vec<&Change> = fresh
            .iter()
            .filter(|c| c.resource.is_some() || self.config.tombstones)
            .collect();
        let last = emitted.len().saturating_sub(1);
        let records = emitted
            .iter()
            .enumerate()
            .filter_map(|(i, change)| {
                let offset = if i == last {
                    after.clone()
                } else {
                    before.clone()
                };
                self.to_record(&resource_type, change, offset, &partition)
            })
            .collect::<Vec<_>>();
        tracing::debug!(connector = %self.connector, resource_type, records = records.len(), "changes read");
        Ok(Some(records))
    }

    /// With a receiver, every record carries an acknowledgement, followed in order so that a
    /// notification is answered only once the records of its read are durable.
    fn acknowledged(&mut self, mut records: Vec<SourceRecord>) -> Vec<SourceRecord> {
        if let Some(hook) = &mut self.hook {
            for record in &mut records {
                let (ack, delivered) = AckHandle::channel();
                hook.seq += 1;
                record.ack = Some(ack);
                let _ = hook.acks.send((hook.seq, delivered));
            }
        }
        records
    }

    fn to_record(
        &self,
        resource_type: &str,
        change: &Change,
        offset: SourceOffset,
        partition: &SourcePartition,
    ) -> Option<SourceRecord> {
        let mut record = Record::new(self.config.topic.topic(resource_type))
            .with_key(format!("{resource_type}/{}", change.id))
            .with_header(HEADER_RESOURCE_TYPE, resource_type.to_string())
            .with_header(HEADER_ID, change.id.clone())
            .with_header(HEADER_VERSION_ID, change.version.clone())
            .with_header(HEADER_LAST_UPDATED, change.last_updated_text.clone())
            .with_timestamp(time::millis(change.last_updated));
        match &change.resource {
            Some(resource) => {
                record = record
                    .with_header(content_type::HEADER, content_type::FHIR_JSON)
                    .with_value(resource.clone());
            }
            None if self.config.tombstones => {}
            None => return None,
        }
        Some(SourceRecord::new(record, partition.clone(), offset))
    }
}

#[async_trait]
impl SourceTask for FhirSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let client = FhirClient::new(&self.config.connection).map_err(client_error)?;
        let now = Instant::now();
        self.types = self
            .config
            .resource_types
            .iter()
            .map(|resource_type| {
                let partition = source_partition(resource_type);
                let cursor = match self.offsets.offset(&partition) {
                    Some(offset) => Cursor::from_offset(&offset),
                    None => Cursor {
                        since: self.config.initial_since,
                        ..Cursor::default()
                    },
                };
                TypeState {
                    resource_type: resource_type.clone(),
                    partition,
                    cursor,
                    due: now,
                }
            })
            .collect();
        self.start_receiver(&client).await?;
        tracing::info!(connector = %self.connector, resource_types = ?self.config.resource_types, "FHIR source started");
        self.client = Some(client);
        Ok(())
    }

    /// Waits until a resource type is due (or, with a receiver, a notification asks for a
    /// read), reads its history and returns its new versions, oldest first. Every record but
    /// the last of a type carries the offset from before this read, the last one the offset
    /// after it: a crash in between reads them again (duplicates), never past them.
    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let client = self
            .client
            .clone()
            .ok_or_else(|| ConnectError::fatal("poll before start"))?;
        let Some(index) = (0..self.types.len()).min_by_key(|&i| self.types[i].due) else {
            return Ok(Vec::new());
        };
        let due = self.types[index].due;
        let mut triggered = Vec::new();
        match &mut self.hook {
            Some(hook) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    trigger = hook.triggers.recv() => triggered.extend(trigger),
                }
                while let Ok(trigger) = hook.triggers.try_recv() {
                    triggered.push(trigger);
                }
            }
            None => tokio::time::sleep_until(due).await,
        }
        if triggered.is_empty() {
            if self.hook.is_some() {
                self.catch_up_cursor(index);
            }
            let records = self.read(&client, index).await?.unwrap_or_default();
            return Ok(self.acknowledged(records));
        }
        let mut types: Vec<String> = Vec::new();
        for trigger in &triggered {
            for kind in &trigger.types {
                if !types.contains(kind) {
                    types.push(kind.clone());
                }
            }
        }
        let mut records = Vec::new();
        let mut complete = true;
        for kind in types {
            let Some(index) = self.types.iter().position(|t| t.resource_type == kind) else {
                continue;
            };
            self.catch_up_cursor(index);
            match self.read(&client, index).await? {
                Some(read) => records.extend(read),
                None => complete = false,
            }
        }
        let records = self.acknowledged(records);
        // A read that failed leaves its notifications unanswered (503: sent again).
        if complete && let Some(hook) = &self.hook {
            for trigger in triggered {
                let _ = trigger.reply.send(hook.seq);
            }
        }
        Ok(records)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        // The receiver stops listening: its port is free for the task's next start.
        self.hook = None;
        self.client = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_entries_become_changes_and_deletions() {
        let put = json!({"fullUrl": "http://h/Patient/p1", "request": {"method": "PUT", "url": "Patient/p1"},
            "response": {"status": "200", "etag": "W/\"2\"", "lastModified": "2026-11-30T06:15:02.514857907+00:00"},
            "resource": {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2", "lastUpdated": "2026-11-30T06:15:02.514Z"}}});
        let change = change_of(&put, "Patient").expect("a change");
        assert_eq!((change.id.as_str(), change.version.as_str()), ("p1", "2"));
        assert!(change.resource.is_some());
        let delete = json!({"fullUrl": "http://h/Patient/p1", "request": {"method": "DELETE", "url": "Patient/p1"},
            "response": {"status": "204", "etag": "W/\"3\"", "lastModified": "2026-11-30T06:15:02.526165773+00:00"}});
        let change = change_of(&delete, "Patient").expect("a deletion");
        assert_eq!((change.id.as_str(), change.version.as_str()), ("p1", "3"));
        assert!(change.resource.is_none());
        let delete = json!({"request": {"method": "DELETE", "url": "Patient/p7/_history/4"},
            "response": {"etag": "W/\"4\"", "lastModified": "2026-11-30T06:15:02Z"}});
        assert_eq!(change_of(&delete, "Patient").expect("a deletion").id, "p7");
        assert!(change_of(&json!({"request": {"method": "DELETE"}}), "Patient").is_none());
    }

    #[test]
    fn the_cursor_keeps_the_overlap_window_and_survives_an_offset() {
        let overlap = Duration::from_secs(2);
        let at = |s: &str| time::parse(s).expect("instant");
        let change = |id: &str, t: &str| Change {
            id: id.into(),
            version: "1".into(),
            last_updated: at(t),
            last_updated_text: t.into(),
            resource: None,
        };
        let mut cursor = Cursor::default();
        cursor.record(&change("a", "2026-01-01T00:00:00Z"), overlap);
        cursor.record(&change("b", "2026-01-01T00:00:01Z"), overlap);
        cursor.record(&change("c", "2026-01-01T00:00:03Z"), overlap);
        // a is out of the window (before 00:00:01), b and c are in.
        assert_eq!(cursor.since, Some(at("2026-01-01T00:00:03Z")));
        assert!(!cursor.seen.contains("a/1"));
        assert!(cursor.seen.contains("b/1") && cursor.seen.contains("c/1"));
        // A late change with an earlier time goes into its place.
        cursor.record(&change("d", "2026-01-01T00:00:02Z"), overlap);
        let restored = Cursor::from_offset(&cursor.offset());
        assert_eq!(restored.since, cursor.since);
        assert_eq!(restored.window, cursor.window);
        assert_eq!(
            restored
                .window
                .iter()
                .map(|(_, k)| k.as_str())
                .collect::<Vec<_>>(),
            ["b/1", "d/1", "c/1"]
        );
    }
}
