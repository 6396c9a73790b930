//! The writer: a tokio task that groups documents into `_bulk` requests (`batch.size`,
//! `bulk.size.bytes`, `linger.ms`), keeps up to `max.in.flight.requests` of them in flight,
//! retries what the cluster pushes back on, dead-letters what it refuses, and marks what it
//! acknowledged in the [`Tracker`] for `pre_commit`.
//!
//! It runs beside the task rather than inside `put`, so a partial batch is sent after
//! `linger.ms` even when no more records come, and a slow or pushing-back cluster fills the
//! queue (and the task pauses its partitions) instead of holding `put` until the engine gives
//! up on it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use medconnect_api::{
    ConnectError, ConnectResult, ErrantRecordReporter, SinkPartitions, TopicPartition,
};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::bulk::{BulkError, EsClient, ItemError, ItemOutcome};
use crate::config::{MalformedDocuments, SinkConfig};
use crate::document::Document;
use medconnect_api::acknowledgements::Tracker;

/// The longest wait between two rounds of retries, whatever `retry.backoff.ms` and
/// `max.retries` multiply to.
const MAX_ROUND_WAIT: Duration = Duration::from_secs(60);

enum Command {
    Write(Box<Document>),
    /// Send what is queued now, without waiting for `linger.ms`.
    Flush,
}

/// The task's handle on its writer; dropping it stops the writer and abandons its requests
/// (their records were not committed, so they are delivered again).
pub struct Writer {
    commands: mpsc::UnboundedSender<Command>,
    actor: JoinHandle<()>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.actor.abort();
    }
}

/// What the writer needs besides its settings.
pub struct Wiring {
    pub connector: String,
    pub client: Arc<EsClient>,
    pub tracker: Arc<Tracker>,
    pub errant: ErrantRecordReporter,
    pub partitions: SinkPartitions,
    /// Queued and in-flight documents at or below which paused partitions are resumed.
    pub resume_at: usize,
}

impl Writer {
    pub fn start(config: &SinkConfig, wiring: Wiring) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let batcher = Batcher {
            retry: RetryPolicy {
                max_retries: config.max_retries,
                backoff: config.retry_backoff,
            },
            batch_size: config.batch_size,
            bulk_size_bytes: config.bulk_size_bytes,
            max_in_flight: config.max_in_flight,
            linger: config.linger,
            malformed: config.malformed,
            wiring,
            queue: VecDeque::new(),
            queued_bytes: 0,
            hold_until: None,
            flushing: false,
            in_flight: JoinSet::new(),
        };
        Self {
            commands,
            actor: tokio::spawn(batcher.run(receiver)),
        }
    }

    pub fn write(&self, document: Box<Document>) -> ConnectResult<()> {
        self.commands
            .send(Command::Write(document))
            .map_err(|_| ConnectError::fatal("the Elasticsearch writer has stopped"))
    }

    pub fn flush(&self) -> ConnectResult<()> {
        self.commands
            .send(Command::Flush)
            .map_err(|_| ConnectError::fatal("the Elasticsearch writer has stopped"))
    }
}

#[derive(Debug, Clone, Copy)]
struct RetryPolicy {
    max_retries: u32,
    backoff: Duration,
}

impl RetryPolicy {
    fn wait(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let exponential = self
            .backoff
            .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
            .min(MAX_ROUND_WAIT);
        hint.map_or(exponential, |hint| hint.max(exponential))
    }
}

/// What one request (with its retries) did with its documents.
#[derive(Default)]
struct Outcome {
    written: Vec<Document>,
    malformed: Vec<(Document, ItemError)>,
    refused: Vec<(Document, ItemError)>,
    /// Still pushed back on after every retry: queued again for the next round.
    pending: Vec<Document>,
    last_error: Option<String>,
    retry_after: Option<Duration>,
    fatal: Option<BulkError>,
}

fn encode(documents: &[Document]) -> Vec<u8> {
    let mut body = Vec::with_capacity(documents.iter().map(Document::encoded_len).sum());
    for document in documents {
        document.encode(&mut body);
    }
    body
}

/// Sends one batch, and again what the cluster pushed back on, up to `max.retries` times.
async fn deliver(client: Arc<EsClient>, documents: Vec<Document>, retry: RetryPolicy) -> Outcome {
    let mut outcome = Outcome {
        pending: documents,
        ..Outcome::default()
    };
    for attempt in 0..=retry.max_retries {
        let answer = client.bulk(encode(&outcome.pending)).await;
        outcome.retry_after = None;
        match answer {
            Ok(response) => match response.items(outcome.pending.len()) {
                Some(items) => {
                    let outcomes: Vec<ItemOutcome> = items
                        .iter()
                        .zip(&outcome.pending)
                        .map(|(item, document)| item.outcome(document.operation))
                        .collect();
                    let mut again = Vec::new();
                    for (document, item) in outcome.pending.drain(..).zip(outcomes) {
                        match item {
                            ItemOutcome::Written => outcome.written.push(document),
                            ItemOutcome::Retry => again.push(document),
                            ItemOutcome::Malformed(error) => {
                                outcome.malformed.push((document, error))
                            }
                            ItemOutcome::Refused(error) => outcome.refused.push((document, error)),
                        }
                    }
                    if !again.is_empty() {
                        outcome.last_error = Some(format!(
                            "{} documents pushed back by the cluster",
                            again.len()
                        ));
                    }
                    outcome.pending = again;
                }
                None => {
                    outcome.last_error =
                        Some("a _bulk answer without one item per document".into());
                }
            },
            Err(error) if error.is_retriable() => {
                outcome.retry_after = error.retry_after();
                outcome.last_error = Some(error.to_string());
            }
            Err(error) => {
                outcome.fatal = Some(error);
                return outcome;
            }
        }
        if outcome.pending.is_empty() {
            break;
        }
        if attempt < retry.max_retries {
            tokio::time::sleep(retry.wait(attempt, outcome.retry_after)).await;
        }
    }
    outcome
}

struct Batcher {
    retry: RetryPolicy,
    batch_size: usize,
    bulk_size_bytes: usize,
    max_in_flight: usize,
    linger: Duration,
    malformed: MalformedDocuments,
    wiring: Wiring,
    /// Documents waiting to be sent, with when each was queued.
    queue: VecDeque<(Instant, Document)>,
    queued_bytes: usize,
    /// After a round of retries gave documents back: nothing is sent before this.
    hold_until: Option<Instant>,
    flushing: bool,
    in_flight: JoinSet<Outcome>,
}

impl Batcher {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            self.launch_ready();
            let wake = self.next_wake();
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    self.apply(command);
                    // Take what else is waiting before deciding what to send.
                    while let Ok(command) = commands.try_recv() {
                        self.apply(command);
                    }
                }
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match joined {
                        Ok(outcome) => self.settle(outcome).await,
                        Err(error) => self.wiring.tracker.fail(ConnectError::fatal(format!(
                            "a _bulk request ended abnormally: {error}"
                        ))),
                    }
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Write(document) => {
                self.queued_bytes += document.encoded_len();
                self.queue.push_back((Instant::now(), *document));
            }
            Command::Flush => self.flushing = true,
        }
    }

    fn full_batch_queued(&self) -> bool {
        self.queue.len() >= self.batch_size || self.queued_bytes >= self.bulk_size_bytes
    }

    /// When the next batch may go: `None` when nothing is queued or no request slot is free
    /// (a finishing request wakes the loop then).
    fn next_wake(&self) -> Option<Instant> {
        let (queued_at, _) = self.queue.front()?;
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let sendable = if self.flushing || self.full_batch_queued() {
            Instant::now()
        } else {
            *queued_at + self.linger
        };
        Some(self.hold_until.map_or(sendable, |hold| hold.max(sendable)))
    }

    fn launch_ready(&mut self) {
        while self.in_flight.len() < self.max_in_flight
            && self.next_wake().is_some_and(|at| at <= Instant::now())
        {
            self.hold_until = None;
            let batch = self.take_batch();
            let client = self.wiring.client.clone();
            self.in_flight.spawn(deliver(client, batch, self.retry));
        }
        if self.queue.is_empty() && self.in_flight.is_empty() {
            self.flushing = false;
        }
    }

    fn take_batch(&mut self) -> Vec<Document> {
        let mut batch = Vec::with_capacity(self.batch_size.min(self.queue.len()));
        let mut bytes = 0;
        while batch.len() < self.batch_size {
            let Some((_, next)) = self.queue.front() else {
                break;
            };
            let size = next.encoded_len();
            // A document larger than the limit goes alone.
            if !batch.is_empty() && bytes + size > self.bulk_size_bytes {
                break;
            }
            bytes += size;
            self.queued_bytes = self.queued_bytes.saturating_sub(size);
            if let Some((_, document)) = self.queue.pop_front() {
                batch.push(document);
            }
        }
        batch
    }

    /// Applies a finished request: acknowledged documents become committable, refused ones
    /// are reported first (so no commit passes them before the dead-letter topic has them),
    /// and pushed-back ones wait for the next round.
    async fn settle(&mut self, outcome: Outcome) {
        let connector = &self.wiring.connector;
        let tracker = self.wiring.tracker.clone();
        tracker.settle(outcome.written.iter().map(position));
        // Logs name a record by its Kafka position, never by its document id: ids may come
        // from record keys (a patient's identifier).
        for (document, error) in outcome.malformed {
            match self.malformed {
                MalformedDocuments::Ignore => {
                    tracing::debug!(%connector, index = %document.index, topic = %document.partition.topic, partition = document.partition.partition, offset = document.record.kafka_offset, error_type = %error.kind, "malformed document ignored");
                }
                MalformedDocuments::Warn => {
                    tracing::warn!(%connector, index = %document.index, topic = %document.partition.topic, partition = document.partition.partition, offset = document.record.kafka_offset, error_type = %error.kind, "malformed document skipped");
                }
                MalformedDocuments::Fail => self.report(&document, &error).await,
            }
            tracker.settle([position(&document)]);
        }
        for (document, error) in outcome.refused {
            self.report(&document, &error).await;
            tracker.settle([position(&document)]);
        }
        if let Some(error) = outcome.fatal {
            tracing::error!(%connector, %error, "the cluster refused a _bulk request");
            tracker.fail(ConnectError::fatal(format!(
                "the cluster refused a _bulk request: {error}"
            )));
        }
        if !outcome.pending.is_empty() {
            let wait = self.retry.wait(self.retry.max_retries, outcome.retry_after);
            tracing::warn!(
                %connector,
                documents = outcome.pending.len(),
                retries = self.retry.max_retries,
                wait_ms = wait.as_millis() as u64,
                error = outcome.last_error.as_deref().unwrap_or("unknown"),
                "the cluster keeps pushing back; documents wait for the next round"
            );
            for document in outcome.pending.into_iter().rev() {
                self.queued_bytes += document.encoded_len();
                self.queue.push_front((Instant::now(), document));
            }
            self.hold_until = Some(Instant::now() + wait);
        }
        self.resume_if_drained();
    }

    async fn report(&self, document: &Document, error: &ItemError) {
        tracing::debug!(connector = %self.wiring.connector, index = %document.index, topic = %document.partition.topic, partition = document.partition.partition, offset = document.record.kafka_offset, error_type = %error.kind, "document refused by the cluster; reported as errant");
        let reported = self
            .wiring
            .errant
            .report(
                document.record.clone(),
                ConnectError::data(format!(
                    "the cluster refused the document: {}: {}",
                    error.kind, error.reason
                )),
            )
            .await;
        if let Err(error) = reported {
            self.wiring.tracker.fail(error);
        }
    }

    fn resume_if_drained(&self) {
        let tracker = &self.wiring.tracker;
        let mut state = tracker.lock();
        if state.paused && state.count() <= self.wiring.resume_at {
            let partitions = self.wiring.partitions.assignment();
            match self.wiring.partitions.resume(&partitions) {
                Ok(()) => {
                    state.paused = false;
                    tracing::info!(connector = %self.wiring.connector, outstanding = state.count(), "cluster caught up; partitions resumed");
                }
                Err(error) => {
                    tracing::warn!(connector = %self.wiring.connector, %error, "cannot resume partitions")
                }
            }
        }
    }
}

fn position(document: &Document) -> (&TopicPartition, i64) {
    (&document.partition, document.record.kafka_offset)
}
