//! The MLLP listener source.
//!
//! Each connection is served by its own tokio task that reads one message, hands its record to
//! `poll()` through a bounded queue with an [`AckHandle`], waits for the engine to complete the
//! handle, answers the sender, and only then reads the next message: so `AA` means durable in
//! Kafka, and a connection's messages reach Kafka in the order they were sent.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use medconnect_api::{
    AckHandle, ConfigDef, ConnectError, ConnectResult, Connector, ConnectorContext, ConnectorKind,
    Delivery, Placement, Props, SourceConnector, SourceRecord, SourceTask, SourceTaskContext,
    TaskConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ack::{self, Ack, AckCode, AckError, ErrorCondition, ErrorLocation};
use crate::batch::{self, Batch, Frame};
use crate::config::{AckMode, SourceConfig, TOPIC_MAX_DISTINCT, source_def};
use crate::limits::IdleConnections;
use crate::message::{self, MshHeader, Rejection, read_header, rejected_record};
use crate::mllp::codec::START_BLOCK;
use crate::mllp::{BoxedStream, MllpCodec, MllpError};
use medconnect_api::limits::{ByteBudget, PeerLimits, Reservation, TopicCap};
use medconnect_api::tls;

/// How long `stop()` waits for connection tasks to wind down.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest engine reason echoed to a sender in MSA-3.
const MAX_REASON_CHARS: usize = 120;
/// Most bytes read from a connection at once: what a connection may hold beyond its share of
/// the frame budget (the budget is taken for what was read, right after the read).
const READ_CHUNK: usize = 8 * 1024;
/// How long a new connection waits for the idle one it evicted to close.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct MllpSourceConnector;

#[async_trait]
impl Connector for MllpSourceConnector {
    fn class(&self) -> &'static str {
        "io.medconnect.connectors.hl7.MllpSourceConnector"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["MllpSource"]
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
        SourceConfig::validate(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        context: &ConnectorContext,
        _max_tasks: usize,
    ) -> ConnectResult<Vec<TaskConfig>> {
        // One listener per worker: more tasks on one worker could not share the port.
        Ok(vec![context.config.clone()])
    }

    fn placement(&self) -> Placement {
        Placement::EveryWorker
    }

    /// One listener per worker: more tasks on one worker could not share the port.
    fn max_tasks(&self) -> Option<u32> {
        Some(1)
    }
}

impl SourceConnector for MllpSourceConnector {
    fn create_task(&self, context: SourceTaskContext) -> ConnectResult<Box<dyn SourceTask>> {
        Ok(Box::new(MllpSourceTask::new(context)?))
    }
}

/// What every connection task shares.
struct Shared {
    connector: String,
    config: SourceConfig,
    queue: mpsc::Sender<SourceRecord>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    budget: Arc<ByteBudget>,
    peers: Arc<PeerLimits>,
    idle: Arc<IdleConnections>,
    /// Only when the topic template names MSH-9: a fixed topic needs no cap.
    topics: Option<TopicCap>,
}

pub struct MllpSourceTask {
    connector: String,
    task_id: u32,
    config: SourceConfig,
    records: Option<mpsc::Receiver<SourceRecord>>,
    local_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    batch_max: usize,
    budget: Option<Arc<ByteBudget>>,
    idle: Option<Arc<IdleConnections>>,
    /// The worker's budget for every listener; this listener's lies within it.
    worker_budget: Arc<ByteBudget>,
}

impl std::fmt::Debug for MllpSourceTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MllpSourceTask")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl MllpSourceTask {
    /// The task for one task config (what the connector's `create_task` boxes).
    pub fn new(context: SourceTaskContext) -> ConnectResult<Self> {
        let config = SourceConfig::parse(&context.config)?;
        Ok(Self {
            connector: context.connector_name,
            task_id: context.task_id,
            batch_max: config.poll_batch_max,
            config,
            records: None,
            local_addr: None,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            budget: None,
            idle: None,
            worker_budget: context.listener_budget,
        })
    }

    /// The listener's frame budget once started: bytes held for senders now, at most ever,
    /// and connections refused for want of it (its own; the worker's refusals are counted on
    /// the worker's budget).
    pub fn frame_budget(&self) -> Option<Arc<ByteBudget>> {
        self.budget.clone()
    }

    /// Connections waiting for their sender's next message (the ones evicted first when
    /// every connection slot is taken).
    pub fn idle_connections(&self) -> usize {
        self.idle.as_ref().map_or(0, |idle| idle.len())
    }

    /// The address the listener is bound to, once started (the port chosen when `mllp.port`
    /// is 0). Also written to `listener.address.file` when that is set.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

fn write_address_file(path: &Path, address: SocketAddr) -> std::io::Result<()> {
    // Written whole then renamed, so a reader never sees a partial address.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, address.to_string())?;
    std::fs::rename(&tmp, path)
}

#[async_trait]
impl SourceTask for MllpSourceTask {
    async fn start(&mut self) -> ConnectResult<()> {
        let config = self.config.clone();
        let acceptor = match &config.tls {
            Some(t) => Some(
                tls::acceptor(&t.cert, &t.key, t.client_ca.as_deref()).map_err(|e| {
                    ConnectError::config(crate::config::TLS_CERT_FILE, e.to_string())
                })?,
            ),
            None => None,
        };
        let listener = medconnect_api::net::listen(&config.bind, config.port, config.share_port)
            .await
            .map_err(|e| {
                let message = format!("cannot listen on {}:{}: {e}", config.bind, config.port);
                // A previous task on this worker may still hold the port for a moment.
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    ConnectError::retriable(message)
                } else {
                    ConnectError::fatal(message)
                }
            })?;
        let address = listener.local_addr()?;
        if let Some(path) = &config.address_file {
            write_address_file(path, address).map_err(|e| {
                ConnectError::config(crate::config::LISTENER_ADDRESS_FILE, e.to_string())
            })?;
        }
        tracing::info!(
            connector = %self.connector,
            task = self.task_id,
            %address,
            tls = acceptor.is_some(),
            ack_mode = ?config.ack_mode,
            "MLLP listener bound"
        );
        let (queue, records) = mpsc::channel(config.queue_capacity);
        self.records = Some(records);
        self.local_addr = Some(address);
        self.shutdown = CancellationToken::new();
        self.tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let budget = self.worker_budget.within(config.frame_budget_bytes);
        self.budget = Some(budget.clone());
        let topics = config
            .topic
            .is_dynamic()
            .then(|| TopicCap::new(config.topic_max_distinct));
        let idle = IdleConnections::new();
        self.idle = Some(idle.clone());
        let shared = Arc::new(Shared {
            connector: self.connector.clone(),
            peers: PeerLimits::new(config.max_connections_per_peer),
            idle,
            config,
            queue,
            tls: acceptor,
            shutdown: self.shutdown.clone(),
            budget,
            topics,
        });
        self.tracker
            .spawn(accept_loop(listener, shared, self.tracker.clone(), limit));
        Ok(())
    }

    async fn poll(&mut self) -> ConnectResult<Vec<SourceRecord>> {
        let records = self
            .records
            .as_mut()
            .ok_or_else(|| ConnectError::fatal("MLLP source polled before start"))?;
        let Some(first) = records.recv().await else {
            return Err(ConnectError::fatal("the MLLP listener has stopped"));
        };
        let mut batch = vec![first];
        while batch.len() < self.batch_max {
            match records.try_recv() {
                Ok(record) => batch.push(record),
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn stop(&mut self) -> ConnectResult<()> {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("MLLP connections did not close within the grace period");
        }
        // Records never polled drop their handles: their senders get no AA and retransmit.
        self.records = None;
        Ok(())
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = shared.peers.enter(peer.ip()) else {
                    tracing::warn!(connector = %shared.connector, %peer, max = shared.config.max_connections_per_peer, "too many MLLP connections from this address; closing the new one");
                    continue;
                };
                let Some(permit) = connection_slot(&limit, &shared).await else {
                    tracing::warn!(connector = %shared.connector, %peer, "too many MLLP connections and none idle; closing the new one");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tracker.spawn(async move {
                    serve(stream, peer, shared).await;
                    drop(slot);
                    drop(permit);
                });
            }
            Err(error) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(connector = %shared.connector, %error, "accepting an MLLP connection failed");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    tracing::info!(connector = %shared.connector, "MLLP listener closed");
}

/// A connection slot: a free one, else the one of the connection idle the longest.
async fn connection_slot(
    limit: &Arc<Semaphore>,
    shared: &Shared,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(permit) = limit.clone().try_acquire_owned() {
        return Some(permit);
    }
    if !shared.idle.evict_oldest() {
        return None;
    }
    tracing::info!(connector = %shared.connector, "every MLLP connection slot taken; closed the connection idle the longest");
    tokio::time::timeout(EVICTION_WAIT, limit.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
}

/// Why reading the next message ended without one.
#[derive(Debug)]
enum ReadEnd {
    Closed,
    IdleTimeout,
    ReadTimeout,
    /// The listener's frame budget, or the worker's, cannot hold what this connection sent.
    Budget,
    Frame(MllpError),
}

struct Connection {
    stream: BoxedStream,
    codec: MllpCodec,
    buffer: BytesMut,
    peer: SocketAddr,
    /// Covers the bytes buffered and the message awaiting its answer.
    reservation: Reservation,
    idle: Arc<IdleConnections>,
    /// Cancelled when the connection is evicted while idle.
    evicted: CancellationToken,
}

impl Connection {
    async fn next_frame(
        &mut self,
        idle: Option<Duration>,
        read_timeout: Duration,
    ) -> Result<Bytes, ReadEnd> {
        // Checked: a deadline past what the clock can hold is no deadline (validation keeps
        // timeouts within a day; this keeps a hand-made config from panicking the listener).
        let idle_deadline = idle.and_then(|d| Instant::now().checked_add(d));
        // Fixed when the frame starts, so a sender trickling bytes cannot hold the
        // connection (and its buffer) open for ever.
        let mut frame_deadline: Option<Instant> = None;
        loop {
            if let Some(frame) = self
                .codec
                .decode(&mut self.buffer)
                .map_err(ReadEnd::Frame)?
            {
                return Ok(frame);
            }
            // Bytes dropped outside frames, and the previous message once answered, no
            // longer count.
            self.reservation.shrink_to(self.buffer.len());
            let deadline = if self.codec.in_frame() {
                if frame_deadline.is_none() {
                    frame_deadline = Instant::now().checked_add(read_timeout);
                }
                frame_deadline
            } else {
                idle_deadline
            };
            // Waiting for a new message with nothing buffered: evictable until bytes arrive.
            let _idle = (!self.codec.in_frame() && self.buffer.is_empty())
                .then(|| self.idle.enter(&self.evicted));
            self.buffer.reserve(READ_CHUNK);
            let before = self.buffer.len();
            let mut limited = (&mut self.buffer).limit(READ_CHUNK);
            let read = match deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut limited))
                        .await
                    {
                        Ok(read) => read,
                        Err(_) if self.codec.in_frame() => return Err(ReadEnd::ReadTimeout),
                        Err(_) => return Err(ReadEnd::IdleTimeout),
                    }
                }
                None => self.stream.read_buf(&mut limited).await,
            };
            match read {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(_) => {}
                Err(error) => return Err(ReadEnd::Frame(MllpError::Io(error))),
            }
            if !self.reservation.grow(self.buffer.len() - before) {
                return Err(ReadEnd::Budget);
            }
        }
    }

    async fn answer(&mut self, reply: Bytes, write_timeout: Duration) -> bool {
        let framed = MllpCodec::frame(&reply);
        let write = async {
            self.stream.write_all(&framed).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(write_timeout, write).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                tracing::debug!(peer = %self.peer, %error, "writing the ACK failed");
                false
            }
            Err(_) => {
                tracing::debug!(peer = %self.peer, "writing the ACK timed out");
                false
            }
        }
    }
}

async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let config = &shared.config;
    let stream: BoxedStream = match &shared.tls {
        Some(acceptor) => {
            match tokio::time::timeout(config.read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Box::new(tls),
                Ok(Err(error)) => {
                    tracing::warn!(connector = %shared.connector, %peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(connector = %shared.connector, %peer, "TLS handshake timed out");
                    return;
                }
            }
        }
        None => Box::new(stream),
    };
    tracing::debug!(connector = %shared.connector, %peer, "MLLP connection opened");
    let mut connection = Connection {
        stream,
        codec: MllpCodec::new(config.max_message_bytes),
        buffer: BytesMut::new(),
        peer,
        reservation: Reservation::new(shared.budget.clone()),
        idle: shared.idle.clone(),
        evicted: CancellationToken::new(),
    };
    let evicted = connection.evicted.clone();
    loop {
        let next = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = evicted.cancelled() => {
                tracing::debug!(connector = %shared.connector, %peer, "idle MLLP connection closed for a new one");
                break;
            }
            next = connection.next_frame(config.idle_timeout, config.read_timeout) => next,
        };
        match next {
            Ok(payload) => {
                if !handle_frame(&mut connection, payload, &shared).await {
                    break;
                }
            }
            Err(ReadEnd::Budget) => {
                tracing::warn!(connector = %shared.connector, %peer, budget = shared.budget.capacity(), held = shared.budget.used(), worker_held = shared.budget.parent().map(|w| w.used()), "MLLP frame budget (the listener's or the worker's) exhausted; rejecting and closing");
                // The frame's MSH is at its start (the buffer's, or after the start block
                // when the frame began in the last read): the NACK can name the message.
                // What was read is dropped at once.
                let buffer = &connection.buffer;
                let from = if connection.codec.in_frame() {
                    Some(0)
                } else {
                    buffer.iter().position(|b| *b == START_BLOCK).map(|p| p + 1)
                };
                let header = from.and_then(|from| {
                    let head = &buffer[from..buffer.len().min(from + 1024)];
                    read_header(&String::from_utf8_lossy(head)).ok()
                });
                connection.buffer = BytesMut::new();
                connection.reservation.shrink_to(0);
                let reply = nack(
                    header.as_ref(),
                    AckCode::Reject,
                    ErrorCondition::ApplicationInternal,
                    "system busy (listener memory budget exhausted), retry later",
                );
                connection.answer(reply, config.read_timeout).await;
                break;
            }
            Err(ReadEnd::Frame(MllpError::FrameTooLarge { max })) => {
                tracing::warn!(connector = %shared.connector, %peer, max, "MLLP message too large; rejecting and closing");
                let reply = nack(
                    None,
                    AckCode::Reject,
                    ErrorCondition::ApplicationInternal,
                    &format!("message exceeds the maximum size of {max} bytes"),
                );
                connection.answer(reply, config.read_timeout).await;
                break;
            }
            Err(end) => {
                tracing::debug!(connector = %shared.connector, %peer, reason = ?end, "MLLP connection closing");
                break;
            }
        }
    }
    if connection.codec.discarded() > 0 {
        tracing::debug!(connector = %shared.connector, %peer, bytes = connection.codec.discarded(), "bytes outside MLLP frames were discarded");
    }
    let _ = connection.stream.shutdown().await;
}

fn nack(header: Option<&MshHeader>, code: AckCode, condition: ErrorCondition, text: &str) -> Bytes {
    ack::build(
        header,
        &Ack {
            code,
            text,
            error: Some(AckError {
                condition,
                location: None,
            }),
        },
    )
}

/// The NACK of a message that failed validation, pointing at the offending field.
fn rejection_reply(rejection: &message::Rejection) -> Bytes {
    ack::build(
        rejection.header.as_deref(),
        &Ack {
            code: rejection.code,
            text: &rejection.reason,
            error: Some(AckError {
                condition: rejection.condition,
                location: rejection.location.filter(|l| l.field > 0),
            }),
        },
    )
}

fn shorten(reason: &str) -> String {
    reason.chars().take(MAX_REASON_CHARS).collect()
}

/// A message handed to the engine: what its answer needs once the engine is done with it.
struct Submitted {
    header: Option<MshHeader>,
    rejection: Option<Rejection>,
    done: oneshot::Receiver<Delivery>,
}

/// The rejection of a valid message whose topic would pass the topic cap: AR (the sender's
/// configuration, not the message, has to change), kept in the dead-letter topic if any.
fn topic_capped(header: &MshHeader, max: usize) -> Rejection {
    let code: String = header.message_code.chars().take(8).collect();
    Rejection {
        header: Some(Box::new(header.clone())),
        code: AckCode::Reject,
        condition: ErrorCondition::UnsupportedMessageType,
        location: Some(ErrorLocation {
            segment: "MSH",
            field: 9,
        }),
        reason: format!(
            "message type {code} would need a new topic beyond the {max} allowed ({TOPIC_MAX_DISTINCT})"
        ),
    }
}

/// Validates one message and makes its record (or, rejected, its dead-letter record).
fn submit(payload: Bytes, shared: &Shared, peer: SocketAddr) -> (SourceRecord, Submitted) {
    let config = &shared.config;
    let (handle, done) = AckHandle::channel();
    let parsed = message::parse_bytes(payload.clone(), &config.rules).and_then(|message| {
        let record = message.to_record(&config.topic);
        match &shared.topics {
            Some(cap) if !cap.admit(&record.topic) => Err(topic_capped(&message.header, cap.max())),
            _ => Ok((record, message.header)),
        }
    });
    match parsed {
        Ok((record, header)) => (
            SourceRecord::acknowledged(record, handle),
            Submitted {
                header: Some(header),
                rejection: None,
                done,
            },
        ),
        Err(rejection) => {
            tracing::warn!(
                connector = %shared.connector,
                %peer,
                control_id = rejection.header.as_deref().map_or("", |h| h.control_id.as_str()),
                code = rejection.code.as_str(),
                reason = %rejection.reason,
                "HL7 message rejected"
            );
            let record = rejected_record(&payload, &rejection, &config.topic);
            let reason = ConnectError::data(rejection.reason.clone());
            (
                SourceRecord::rejected(record, reason, Some(handle)),
                Submitted {
                    header: rejection.header.as_deref().cloned(),
                    rejection: Some(rejection),
                    done,
                },
            )
        }
    }
}

/// Waits for the engine (unless acknowledging at once); `None` when the task stops first.
async fn settle(
    submitted: &mut Submitted,
    shared: &Shared,
) -> Option<Option<Result<Delivery, oneshot::error::RecvError>>> {
    match shared.config.ack_mode {
        AckMode::Immediate => Some(None),
        AckMode::AfterCommit => tokio::select! {
            _ = shared.shutdown.cancelled() => None,
            outcome = &mut submitted.done => Some(Some(outcome)),
        },
    }
}

/// The acknowledgement of one message, from what became of its record: `AA` only for a record
/// Kafka has (or that a transform dropped on purpose).
fn answer_for(
    submitted: &Submitted,
    outcome: Option<Result<Delivery, oneshot::error::RecvError>>,
) -> Bytes {
    let header = submitted.header.as_ref();
    match (&submitted.rejection, outcome) {
        (Some(rejection), _) => rejection_reply(rejection),
        (None, None)
        | (None, Some(Ok(Delivery::Written { .. })))
        | (None, Some(Ok(Delivery::Filtered))) => ack::build(
            header,
            &Ack {
                code: AckCode::Accept,
                text: "",
                error: None,
            },
        ),
        // Kept in the dead-letter topic, flagged as in error.
        (None, Some(Ok(Delivery::DeadLettered { reason }))) => nack(
            header,
            AckCode::Error,
            ErrorCondition::ApplicationInternal,
            &format!("message rejected: {}", shorten(&reason)),
        ),
        // Refused as a whole (too large for Kafka, invalid for its topic) and kept nowhere:
        // AR, as the listener answers a message over its own size limit. Only this record
        // fails; the connection and the listener go on.
        (None, Some(Ok(Delivery::Rejected { reason }))) => nack(
            header,
            AckCode::Reject,
            ErrorCondition::ApplicationInternal,
            &format!("message not stored: {}", shorten(&reason)),
        ),
        (None, Some(Ok(Delivery::Failed { reason }))) => nack(
            header,
            AckCode::Reject,
            ErrorCondition::ApplicationInternal,
            &format!("message not stored, retry later: {}", shorten(&reason)),
        ),
        (None, Some(Err(_))) => nack(
            header,
            AckCode::Reject,
            ErrorCondition::ApplicationInternal,
            "message not stored, retry later",
        ),
    }
}

/// Processes one frame (a message or a batch) and answers it; `false` ends the connection.
async fn handle_frame(connection: &mut Connection, payload: Bytes, shared: &Shared) -> bool {
    match batch::split(&payload, shared.config.rules.lenient_newlines) {
        Frame::Single => handle_message(connection, payload, shared).await,
        Frame::Batch(batch) => handle_batch(connection, *batch, shared).await,
    }
}

/// Processes one message and answers it; `false` ends the connection.
async fn handle_message(connection: &mut Connection, payload: Bytes, shared: &Shared) -> bool {
    let config = &shared.config;
    let peer = connection.peer;
    let (record, mut submitted) = submit(payload, shared, peer);
    let control_id = submitted
        .header
        .as_ref()
        .map_or("", |h| h.control_id.as_str())
        .to_string();
    match shared.queue.try_send(record) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(connector = %shared.connector, %peer, %control_id, "queue full; answering AR (busy)");
            let reply = nack(
                submitted.header.as_ref(),
                AckCode::Reject,
                ErrorCondition::ApplicationInternal,
                "system busy, retry later",
            );
            return connection.answer(reply, config.read_timeout).await;
        }
        // The task is stopping: no answer, the sender retransmits to a running worker.
        Err(mpsc::error::TrySendError::Closed(_)) => return false,
    }
    let Some(outcome) = settle(&mut submitted, shared).await else {
        return false;
    };
    let reply = answer_for(&submitted, outcome);
    tracing::debug!(connector = %shared.connector, %peer, %control_id, "HL7 message answered");
    connection.answer(reply, config.read_timeout).await
}

/// Every message of a batch answered the same way, none handed to the engine.
fn refuse_batch(batch: &Batch, reason: &str) -> Bytes {
    let acks: Vec<Bytes> = batch
        .messages()
        .map(|m| {
            let header = read_header(&String::from_utf8_lossy(m)).ok();
            nack(
                header.as_ref(),
                AckCode::Reject,
                ErrorCondition::ApplicationInternal,
                reason,
            )
        })
        .collect();
    batch::reply(batch, batch::first_header(batch).as_ref(), &acks, reason)
}

/// Processes a batch: every message is its own record, queued together (all or none, so the
/// batch keeps its order and is never half taken for want of room), and the batch of ACKs is
/// answered once every record's fate is known; `false` ends the connection.
async fn handle_batch(connection: &mut Connection, batch: Batch, shared: &Shared) -> bool {
    let config = &shared.config;
    let peer = connection.peer;
    let count = batch.message_count();
    let refusal = if let Some(reason) = &batch.invalid {
        Some(format!("batch rejected: {reason}"))
    } else if count > config.queue_capacity {
        Some(format!(
            "batch rejected: {count} messages is more than the listener queues at once"
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        tracing::warn!(connector = %shared.connector, %peer, messages = count, %reason, "HL7 batch rejected");
        return connection
            .answer(refuse_batch(&batch, &reason), config.read_timeout)
            .await;
    }
    let permits = match shared.queue.try_reserve_many(count) {
        Ok(permits) => Some(permits),
        Err(mpsc::error::TrySendError::Full(())) => None,
        Err(mpsc::error::TrySendError::Closed(())) => return false,
    };
    let Some(permits) = permits else {
        tracing::warn!(connector = %shared.connector, %peer, messages = count, "queue full; answering the batch AR (busy)");
        return connection
            .answer(
                refuse_batch(&batch, "system busy, retry later"),
                config.read_timeout,
            )
            .await;
    };
    let mut submitted = Vec::with_capacity(count);
    for (permit, message) in permits.zip(batch.messages()) {
        let (record, pending) = submit(message.clone(), shared, peer);
        permit.send(record);
        submitted.push(pending);
    }
    let mut acks = Vec::with_capacity(count);
    for pending in &mut submitted {
        let Some(outcome) = settle(pending, shared).await else {
            return false;
        };
        acks.push(answer_for(pending, outcome));
    }
    let reply = batch::reply(&batch, batch::first_header(&batch).as_ref(), &acks, "");
    tracing::debug!(connector = %shared.connector, %peer, messages = count, "HL7 batch answered");
    connection.answer(reply, config.read_timeout).await
}

#[cfg(test)]
#[path = "source_tests.rs"]
mod tests;
