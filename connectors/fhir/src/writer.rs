//! The writer: a tokio task beside the sink task that sends queued entries as batch or
//! transaction Bundles, one Bundle at a time (so writes to one resource keep their order),
//! sends again what the server pushed back on (429/503 honouring `Retry-After`, 5xx, no
//! answer) for as long as it takes, reports what the server refused (with its
//! OperationOutcome in the record's headers) and marks what it acknowledged in the
//! [`Tracker`] for `pre_commit`.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use medconnect_api::{ConnectError, ConnectResult, ErrantRecordReporter, SinkPartitions};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{FhirClient, FhirError, is_retriable_status, is_transient_code};
use crate::config::{BundleType, SinkConfig};
use crate::entry::Entry;
use crate::outcome::Outcome;
use medconnect_api::acknowledgements::Tracker;

/// Headers a refused record carries into the dead-letter topic (beside Connect's
/// `__connect.errors.*`): the HTTP status and the OperationOutcome's first error issue.
pub const HEADER_STATUS: &str = "fhir.outcome.status";
pub const HEADER_SEVERITY: &str = "fhir.outcome.severity";
pub const HEADER_CODE: &str = "fhir.outcome.code";
pub const HEADER_DIAGNOSTICS: &str = "fhir.outcome.diagnostics";

enum Command {
    Write(Box<Entry>),
    /// Send what is queued now, without waiting for `fhir.linger.ms`.
    Flush,
}

/// The task's handle on its writer; dropping it stops the writer and abandons its Bundle in
/// flight (its records were not committed, so they are delivered again).
pub struct Writer {
    commands: mpsc::UnboundedSender<Command>,
    actor: JoinHandle<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.actor.abort();
    }
}

pub struct Wiring {
    pub connector: String,
    pub client: Arc<FhirClient>,
    pub tracker: Arc<Tracker>,
    pub errant: ErrantRecordReporter,
    pub partitions: SinkPartitions,
    /// Records outstanding at or below which paused partitions are resumed.
    pub resume_at: usize,
}

impl Writer {
    pub fn start(config: &SinkConfig, wiring: Wiring) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let actor = Actor {
            bundle_type: config.bundle_type,
            bundle_size: config.bundle_size,
            linger: config.linger,
            backoff: config.retry_backoff,
            backoff_max: config.retry_backoff_max,
            conflict_retries: config.conflict_retries,
            wiring,
            queue: VecDeque::new(),
            flushing: false,
        };
        Self {
            commands,
            actor: tokio::spawn(actor.run(receiver)),
        }
    }

    pub fn write(&self, entry: Box<Entry>) -> ConnectResult<()> {
        self.commands
            .send(Command::Write(entry))
            .map_err(|_| ConnectError::fatal("the FHIR writer has stopped"))
    }

    pub fn flush(&self) -> ConnectResult<()> {
        self.commands
            .send(Command::Flush)
            .map_err(|_| ConnectError::fatal("the FHIR writer has stopped"))
    }
}

/// `"201 Created"` -> 201.
fn entry_status(answer: &Value) -> Option<u16> {
    answer["response"]["status"]
        .as_str()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

enum Verdict {
    Written,
    Again,
    Refused {
        status: u16,
        outcome: Option<Outcome>,
    },
    /// 412 to an `If-Match`: read the resource to tell a redelivery from a conflict.
    Check {
        outcome: Option<Outcome>,
    },
}

/// A resource without `meta` (and `text`, which servers may generate): what a write set.
fn content(resource: &Value) -> Value {
    let mut resource = resource.clone();
    if let Some(map) = resource.as_object_mut() {
        map.remove("meta");
        map.remove("text");
    }
    resource
}

struct Actor {
    bundle_type: BundleType,
    bundle_size: usize,
    linger: Duration,
    backoff: Duration,
    backoff_max: Duration,
    conflict_retries: u32,
    wiring: Wiring,
    queue: VecDeque<Entry>,
    flushing: bool,
}

impl Actor {
    fn take(&mut self, command: Command) {
        match command {
            Command::Write(entry) => self.queue.push_back(*entry),
            Command::Flush => self.flushing = true,
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.queue.is_empty() {
                self.flushing = false;
                match commands.recv().await {
                    Some(command) => self.take(command),
                    None => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.take(command);
            }
            if self.queue.len() < self.bundle_size && !self.flushing && !self.linger.is_zero() {
                let deadline = Instant::now() + self.linger;
                loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            Some(command) => self.take(command),
                            None => return,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                    if self.queue.len() >= self.bundle_size || self.flushing {
                        break;
                    }
                }
            }
            let bundle = self.next_bundle();
            if !bundle.is_empty() {
                self.deliver(bundle).await;
            }
        }
    }

    /// Up to `bundle.size` entries from the head of the queue, stopping before a second entry
    /// for the same target (it goes in the next Bundle, after the first is acknowledged).
    fn next_bundle(&mut self) -> Vec<Entry> {
        let mut targets = HashSet::new();
        let mut bundle = Vec::new();
        while bundle.len() < self.bundle_size {
            match self.queue.front() {
                Some(entry) if !targets.contains(&entry.target) => {
                    targets.insert(entry.target.clone());
                    if let Some(entry) = self.queue.pop_front() {
                        bundle.push(entry);
                    }
                }
                _ => break,
            }
        }
        bundle
    }

    fn wait(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let exponential = self
            .backoff
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        hint.map_or(exponential, |hint| hint.max(exponential))
            .min(self.backoff_max)
    }

    /// Sends `entries` until each is written or refused: retriable failures are retried
    /// without end (the task pauses its partitions meanwhile), a refused transaction is sent
    /// again as a batch, and a batch refused as a whole is sent entry by entry.
    async fn deliver(&mut self, entries: Vec<Entry>) {
        let mut pending = entries;
        let mut bundle_type = self.bundle_type;
        let mut one_by_one = false;
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let size = if one_by_one { 1 } else { pending.len() };
            let chunk: Vec<Entry> = pending.drain(..size).collect();
            let body = bundle_body(bundle_type, &chunk);
            let answer = self.wiring.client.bundle(body).await;
            let mut again = Vec::new();
            let mut retry_hint = None;
            match answer {
                Ok(response) => {
                    let answers = response["entry"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    if answers.len() != chunk.len() {
                        tracing::warn!(connector = %self.wiring.connector, entries = chunk.len(), answers = answers.len(), "a Bundle answer without one entry per request; sending it again");
                        again = chunk;
                    } else {
                        let mut written = Vec::new();
                        for (mut entry, answer) in chunk.into_iter().zip(answers) {
                            match self.verdict(&mut entry, answer) {
                                Verdict::Written => written.push(entry),
                                Verdict::Again => again.push(entry),
                                Verdict::Refused { status, outcome } => {
                                    self.refuse(entry, status, outcome).await
                                }
                                Verdict::Check { outcome } => {
                                    match self.already_there(&entry).await {
                                        Some(true) => written.push(entry),
                                        Some(false) => self.refuse(entry, 412, outcome).await,
                                        None => again.push(entry),
                                    }
                                }
                            }
                        }
                        if let Some(first) = written.first() {
                            tracing::debug!(connector = %self.wiring.connector, written = written.len(), again = again.len(), first_partition = first.partition.partition, first_offset = first.record.kafka_offset, "Bundle answered");
                        }
                        self.settle(&written);
                    }
                }
                Err(error) if error.is_retriable() => {
                    retry_hint = error.retry_after();
                    tracing::warn!(connector = %self.wiring.connector, %error, entries = chunk.len(), attempt, "FHIR server busy or away; sending the Bundle again");
                    again = chunk;
                }
                Err(
                    error @ (FhirError::Status {
                        status: 401 | 403, ..
                    }
                    | FhirError::Auth(_)
                    | FhirError::Key(_)),
                ) => {
                    self.wiring.tracker.fail(ConnectError::fatal(format!(
                        "the FHIR server refused the sink's credentials: {error}"
                    )));
                    return;
                }
                Err(FhirError::Status {
                    status, outcome, ..
                }) if bundle_type == BundleType::Transaction => {
                    tracing::warn!(connector = %self.wiring.connector, status, entries = chunk.len(), outcome = ?outcome.map(|o| o.to_string()), "transaction refused; sending its entries as a batch to find the ones the server refuses");
                    bundle_type = BundleType::Batch;
                    again = chunk;
                }
                Err(FhirError::Status {
                    status, outcome, ..
                }) if chunk.len() > 1 => {
                    tracing::warn!(connector = %self.wiring.connector, status, entries = chunk.len(), outcome = ?outcome.map(|o| o.to_string()), "Bundle refused as a whole; sending its entries one by one");
                    one_by_one = true;
                    again = chunk;
                }
                Err(FhirError::Status {
                    status, outcome, ..
                }) => {
                    for entry in chunk {
                        self.refuse(entry, status, outcome.clone()).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(connector = %self.wiring.connector, %error, attempt, "unexpected answer to a Bundle; sending it again");
                    again = chunk;
                }
            }
            if again.is_empty() {
                attempt = 0;
                continue;
            }
            let rest = std::mem::take(&mut pending);
            pending = again;
            pending.extend(rest);
            tokio::time::sleep(self.wait(attempt, retry_hint)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    fn verdict(&self, entry: &mut Entry, answer: &Value) -> Verdict {
        let Some(status) = entry_status(answer) else {
            return Verdict::Again;
        };
        match status {
            200..=299 => Verdict::Written,
            // Already gone: a delete delivered again.
            404 | 410 if entry.method == "DELETE" => Verdict::Written,
            412 if entry.if_match => Verdict::Check {
                outcome: Outcome::parse(&answer["response"]["outcome"]),
            },
            409 | 412 => {
                entry.conflicts += 1;
                if entry.conflicts > self.conflict_retries {
                    Verdict::Refused {
                        status,
                        outcome: Outcome::parse(&answer["response"]["outcome"]),
                    }
                } else {
                    Verdict::Again
                }
            }
            status if is_retriable_status(status) => Verdict::Again,
            status => {
                let outcome = Outcome::parse(&answer["response"]["outcome"]);
                if outcome.as_ref().is_some_and(|o| is_transient_code(&o.code)) {
                    Verdict::Again
                } else {
                    Verdict::Refused { status, outcome }
                }
            }
        }
    }

    /// Whether the server's current resource has this entry's content (a versioned write
    /// delivered again, after it was written); `None` when it cannot be read now.
    async fn already_there(&self, entry: &Entry) -> Option<bool> {
        let url = format!("{}/{}", self.wiring.client.base(), entry.target);
        match self.wiring.client.get(&url).await {
            Ok(current) => Some(content(&current) == content(&entry.entry["resource"])),
            Err(error) if error.is_retriable() => None,
            Err(_) => Some(false),
        }
    }

    fn settle(&self, written: &[Entry]) {
        self.wiring.tracker.settle(
            written
                .iter()
                .map(|e| (&e.partition, e.record.kafka_offset)),
        );
        let mut state = self.wiring.tracker.lock();
        if state.paused && state.count() <= self.wiring.resume_at {
            let assignment = self.wiring.partitions.assignment();
            match self.wiring.partitions.resume(&assignment) {
                Ok(()) => {
                    state.paused = false;
                    tracing::info!(connector = %self.wiring.connector, outstanding = state.count(), "FHIR server caught up; partitions resumed");
                }
                Err(error) => {
                    tracing::warn!(connector = %self.wiring.connector, %error, "cannot resume partitions")
                }
            }
        }
    }

    /// Reports a refused entry: the OperationOutcome's status, severity and code in its
    /// headers (for the dead-letter topic) and in the error (status traces, logs); its
    /// diagnostics, which may quote the resource, only as the error's peer text, which the
    /// engine puts in the `fhir.outcome.diagnostics` header with the connector's consent
    /// (`errors.log.include.messages=true`).
    async fn refuse(&self, entry: Entry, status: u16, outcome: Option<Outcome>) {
        let mut record = entry.record.clone();
        let headers = &mut record.record.headers;
        headers.set(HEADER_STATUS, status.to_string());
        let summary = match &outcome {
            Some(outcome) => {
                headers.set(HEADER_SEVERITY, outcome.severity.clone());
                headers.set(HEADER_CODE, outcome.code.clone());
                format!(", {outcome}")
            }
            None => String::new(),
        };
        tracing::warn!(connector = %self.wiring.connector, topic = %entry.partition.topic, partition = entry.partition.partition, offset = entry.record.kafka_offset, status, outcome = ?outcome.as_ref().map(|o| o.to_string()), "the FHIR server refused an entry");
        let error = ConnectError::data(format!(
            "the FHIR server refused the {} entry: HTTP {status}{summary}",
            entry.method
        ))
        .with_peer_text(
            HEADER_DIAGNOSTICS,
            outcome.map(|o| o.diagnostics).unwrap_or_default(),
        );
        match self.wiring.errant.report(record, error).await {
            Ok(()) => self.settle(std::slice::from_ref(&entry)),
            Err(error) => self.wiring.tracker.fail(error),
        }
    }
}

fn bundle_body(bundle_type: BundleType, entries: &[Entry]) -> Vec<u8> {
    let body = json!({
        "resourceType": "Bundle",
        "type": bundle_type.as_str(),
        "entry": entries.iter().map(|e| &e.entry).collect::<Vec<_>>(),
    });
    body.to_string().into_bytes()
}
