//! One device connection: CONNECT checked, each QoS 1/2 PUBLISH handed to the engine as a
//! record whose PUBACK (QoS 1) or PUBREC (QoS 2) is written only once the engine settled it.
//!
//! Rules:
//! - `Written`, `DeadLettered`, `Filtered`: durable or settled on purpose: acknowledged.
//! - `Rejected` (Kafka refuses the record itself, no dead-letter topic): MQTT 5 gets a negative
//!   acknowledgement (reason "payload format invalid", so the device does not resend it);
//!   3.1.1 has none, so it is acknowledged (the engine has logged why) — resending would be
//!   refused again, forever.
//! - `Failed` or a handle dropped (Kafka unreachable, task stopping): no acknowledgement, and
//!   the connection is closed so the device resends, with DUP, on its next connection.
//! - A connection that closes with publishes pending loses nothing: they were not
//!   acknowledged, the device still holds them.
//!
//! Memory per connection is bounded: the read buffer by `mqtt.max.packet.bytes` (a packet
//! announcing more is refused from its header), pending publishes by `mqtt.max.inflight`
//! (beyond it the connection is not read). Over all connections, what they hold (read buffers
//! and publishes waiting for Kafka) is taken from the listener's byte budget, within the
//! worker's, before each read: when it has no room the connection is not read until some
//! comes back, and one left waiting past its keep-alive limit is closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use medconnect_api::limits::Reservation;
use medconnect_api::{AckHandle, Delivery};
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Shared;
use super::auth::Admission;
use super::config::READ_CHUNK;
use super::hub::{Attached, Message, Outcome};
use super::record::{Device, Stamp, to_record};
use super::websocket::FrameError;
use super::wire::{self, Connect, Incoming, Outgoing, Refusal, Verdict, Version, WireError};

/// How long writing one answer may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A publish waiting for the engine to settle its record.
struct Pending {
    pkid: u16,
    /// What the publish holds of the budget (its topic and payload).
    bytes: usize,
    qos: QoS,
    /// What the acknowledgement says once the record is settled (the listener refused the
    /// topic or payload: it went to the dead-letter topic).
    verdict: Verdict,
    delivery: oneshot::Receiver<Delivery>,
}

/// The front publish's delivery, once the engine settled it (`None`: its handle was dropped
/// unanswered). Acknowledgements go out in the order the publishes came, as MQTT asks.
async fn front_settled(pending: &mut VecDeque<Pending>) -> Option<Delivery> {
    match pending.front_mut() {
        Some(front) => (&mut front.delivery).await.ok(),
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Messages to the device awaiting its PUBACK, by the packet id the listener gave them.
struct Outbound {
    waiting: HashMap<u16, oneshot::Sender<Outcome>>,
    /// QoS 0 messages queued for the next write: delivered once it succeeds.
    written: Vec<oneshot::Sender<Outcome>>,
    last_pkid: u16,
    max: usize,
}

impl Outbound {
    fn new(max: usize) -> Self {
        Self {
            waiting: HashMap::new(),
            written: Vec::new(),
            last_pkid: 0,
            max: max.max(1),
        }
    }

    fn has_room(&self) -> bool {
        self.waiting.len() < self.max
    }

    /// The next packet id not awaiting a PUBACK (1..=65535; `has_room` keeps one free).
    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid != 0 && !self.waiting.contains_key(&self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

/// A connection's side of the hub: what the sink sends the device.
struct Commands {
    attached: Attached,
    messages: tokio::sync::mpsc::Receiver<Message>,
    outbound: Outbound,
}

async fn next_message(commands: &mut Option<Commands>) -> Option<Message> {
    match commands {
        Some(commands) => commands.messages.recv().await,
        None => std::future::pending().await,
    }
}

/// Why a connection ended (logged; never with payloads).
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("closed by the device")]
    Closed,
    #[error("DISCONNECT")]
    Disconnected,
    #[error("silent past 1.5 keep-alive intervals")]
    KeepAliveTimeout,
    #[error("{0}")]
    Wire(WireError),
    #[error("I/O: {0}")]
    Io(std::io::Error),
    /// Kafka did not take a record: the device resends it on its next connection.
    #[error("a record was not written to Kafka; the device is to resend it")]
    NotDurable,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("the listener is stopping")]
    ShuttingDown,
    /// The byte budget had no room for this connection's next read for too long.
    #[error("no room in the listener's byte budget")]
    BudgetExhausted,
}

impl End {
    /// A WebSocket frame too large for any packet is a packet too large (MQTT 5 devices are
    /// told so, as on TCP); any other read error ends the connection as is.
    fn read_failed(error: std::io::Error) -> Self {
        match error.get_ref().and_then(|e| e.downcast_ref::<FrameError>()) {
            Some(FrameError::TooLarge { size, max }) => End::Wire(WireError::TooLarge {
                size: *size,
                max: *max,
            }),
            _ => End::Io(error),
        }
    }
}

struct Conn<S> {
    stream: S,
    buffer: BytesMut,
    out: BytesMut,
    version: Version,
    peer: SocketAddr,
    /// What this connection holds of the byte budget: its buffer, its publishes waiting for
    /// Kafka, and room for the next read.
    reservation: Reservation,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Encodes `packet` behind what is already queued; written by the next `write_out`.
    fn queue(&mut self, packet: Outgoing) {
        wire::write(packet, self.version, &mut self.out);
    }

    /// Writes everything queued in one go: the answers to all packets handled in one wake
    /// share a write (one system call, not one per PUBACK).
    async fn write_out(&mut self) -> Result<(), End> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
        self.out.clear();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(End::Io(error)),
            Err(_) => Err(End::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    async fn send(&mut self, packet: Outgoing) -> Result<(), End> {
        self.queue(packet);
        self.write_out().await
    }

    /// Reads at most [`READ_CHUNK`] more bytes (room the caller took from the budget);
    /// `Closed` at end of stream.
    async fn fill(&mut self) -> Result<(), End> {
        self.buffer.reserve(READ_CHUNK);
        match self
            .stream
            .read_buf(&mut (&mut self.buffer).limit(READ_CHUNK))
            .await
        {
            Ok(0) => Err(End::Closed),
            Ok(_) => Ok(()),
            Err(error) => Err(End::read_failed(error)),
        }
    }

    /// MQTT 5 clients are told why they are closed; 3.1.1 ones just see the close.
    async fn disconnect(&mut self, reason: DisconnectReasonCode) {
        let _ = self.send(Outgoing::Disconnect(reason)).await;
    }
}

/// Reads the CONNECT: which version, then the packet in it.
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    max: usize,
    reservation: Reservation,
) -> Result<(Conn<S>, Connect), (Option<Conn<S>>, End)> {
    let mut conn = Conn {
        stream,
        buffer: BytesMut::with_capacity(1024),
        out: BytesMut::with_capacity(64),
        version: Version::V311,
        peer,
        reservation,
    };
    loop {
        match wire::connect_version(&conn.buffer, max) {
            Ok(Some(version)) => {
                conn.version = version;
                break;
            }
            Ok(None) => {
                // A device not yet connected does not wait for room: it is turned away.
                let room = conn.buffer.len() + READ_CHUNK;
                if !conn.reservation.resize_to(room) {
                    return Err((Some(conn), End::BudgetExhausted));
                }
                if let Err(end) = conn.fill().await {
                    return Err((None, end));
                }
            }
            Err(WireError::UnsupportedVersion(level)) => {
                // Answered in 3.1.1's form, which every version reads: protocol refused.
                let mut out = BytesMut::new();
                let refused =
                    rumqttc::mqttbytes::v4::Packet::ConnAck(rumqttc::mqttbytes::v4::ConnAck::new(
                        rumqttc::mqttbytes::v4::ConnectReturnCode::RefusedProtocolVersion,
                        false,
                    ));
                if refused.write(&mut out, usize::MAX).is_ok() {
                    let _ = conn.stream.write_all(&out).await;
                }
                return Err((None, End::Wire(WireError::UnsupportedVersion(level))));
            }
            Err(error) => return Err((None, End::Wire(error))),
        }
    }
    match wire::read(&mut conn.buffer, conn.version, max) {
        Ok(Some(Incoming::Connect(connect))) => Ok((conn, connect)),
        Ok(_) => Err((Some(conn), End::Protocol("the first packet is not CONNECT"))),
        Err(error) => Err((Some(conn), End::Wire(error))),
    }
}

/// One device connection; `certificate_cn` is the common name of the client certificate it
/// presented (mTLS), which authenticates it unless `mqtt.users` names its username.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    certificate_cn: Option<String>,
    shared: Arc<Shared>,
) {
    let config = &shared.config;
    let max = config.max_packet_bytes;
    let reservation = Reservation::new(shared.budget.clone());
    let connecting = tokio::time::timeout(
        config.connect_timeout,
        read_connect(stream, peer, max, reservation),
    );
    let (mut conn, connect) = match connecting.await {
        Ok(Ok(connected)) => connected,
        Ok(Err((conn, end))) => {
            if matches!(end, End::BudgetExhausted) {
                tracing::warn!(connector = %shared.connector, %peer, budget = shared.budget.capacity(), held = shared.budget.used(), worker_held = shared.budget.parent().map(|w| w.used()), "MQTT byte budget (the listener's or the worker's) exhausted; closing a new connection");
            } else {
                tracing::debug!(connector = %shared.connector, %peer, reason = %end, "MQTT connection closed before CONNECT");
            }
            if let Some(mut conn) = conn {
                conn.disconnect(DisconnectReasonCode::ProtocolError).await;
            }
            return;
        }
        Err(_) => {
            tracing::debug!(connector = %shared.connector, %peer, "no CONNECT in time; closing");
            return;
        }
    };

    let refusal = if !shared.connect_rate.try_take() {
        Some(Refusal::ConnectionRate)
    } else {
        // A verified client certificate authenticates the device as a username would.
        match config.users.check(
            connect.username.as_deref(),
            connect.password.as_deref(),
            config.allow_anonymous || certificate_cn.is_some(),
        ) {
            Admission::Accepted => None,
            Admission::BadCredentials => Some(Refusal::BadCredentials),
            Admission::NotAuthorized => Some(Refusal::NotAuthorized),
        }
    };
    let refusal = refusal.or_else(|| {
        (connect.client_id.is_empty() && !connect.clean_start).then_some(Refusal::BadClientId)
    });
    if let Some(refusal) = refusal {
        tracing::warn!(connector = %shared.connector, %peer, client_id = %connect.client_id, username = connect.username.as_deref().unwrap_or(""), ?refusal, version = conn.version.name(), "MQTT CONNECT refused");
        let _ = conn.send(Outgoing::Refused(refusal)).await;
        return;
    }

    let assigned = connect
        .client_id
        .is_empty()
        .then(|| format!("medconnect-{}", shared.next_client_number()));
    let device = Device {
        client_id: assigned.clone().unwrap_or(connect.client_id),
        username: connect.username.filter(|u| !u.is_empty()),
        certificate_cn,
    };
    // Keep-alive: what the client asked, within the maximum (0 — none — gets the maximum).
    let keep_alive = match connect.keep_alive_s {
        0 => config.keep_alive_max,
        asked => asked.min(config.keep_alive_max),
    };
    // A publishing device's session holds nothing the listener must keep (nothing queued for
    // it — commands wait in the sink —, QoS 2 releases are answered whether remembered or
    // not), so a device asking to resume one is told it is present: then it resends, with
    // DUP, whatever was not acknowledged before — on this worker or another — instead of
    // discarding it. Subscriptions are not kept across connections: a device subscribes after
    // each CONNECT (documented), and until it does its commands wait in the sink.
    let connack = Outgoing::ConnAck {
        session_present: !connect.clean_start && assigned.is_none(),
        assigned_client_id: assigned,
        receive_maximum: config.max_inflight,
        max_packet_size: u32::try_from(max).unwrap_or(u32::MAX),
        server_keep_alive_s: (keep_alive != connect.keep_alive_s).then_some(keep_alive),
        subscriptions: !config.subscribe_allowed.is_empty(),
    };
    if conn.send(connack).await.is_err() {
        return;
    }
    tracing::debug!(connector = %shared.connector, %peer, client_id = %device.client_id, version = conn.version.name(), keep_alive, "MQTT device connected");

    // Devices may subscribe (to commands from the sink): the connection joins the hub.
    let link = (!config.subscribe_allowed.is_empty()).then(|| {
        let inflight = connect
            .receive_maximum
            .unwrap_or(u16::MAX)
            .min(config.commands_inflight);
        let (attached, messages) = shared.hub.attach(&device.client_id, usize::from(inflight));
        Commands {
            attached,
            messages,
            outbound: Outbound::new(usize::from(inflight)),
        }
    });
    let end = Session {
        conn: &mut conn,
        device: &device,
        stamp: Stamp::new(config, &device),
        shared: &shared,
        pending: VecDeque::new(),
        pending_bytes: 0,
        in_engine: HashSet::new(),
        awaiting_release: HashSet::new(),
        commands: link,
    }
    .run(Duration::from_millis(u64::from(keep_alive) * 1500))
    .await;
    match &end {
        End::KeepAliveTimeout => {
            conn.disconnect(DisconnectReasonCode::KeepAliveTimeout)
                .await
        }
        End::Wire(WireError::TooLarge { .. }) => {
            conn.disconnect(DisconnectReasonCode::PacketTooLarge).await
        }
        End::Wire(_) => conn.disconnect(DisconnectReasonCode::MalformedPacket).await,
        End::Protocol(_) => conn.disconnect(DisconnectReasonCode::ProtocolError).await,
        End::ShuttingDown => {
            conn.disconnect(DisconnectReasonCode::ServerShuttingDown)
                .await
        }
        End::NotDurable => {
            conn.disconnect(DisconnectReasonCode::UnspecifiedError)
                .await
        }
        End::BudgetExhausted => conn.disconnect(DisconnectReasonCode::QuotaExceeded).await,
        End::Closed | End::Disconnected | End::Io(_) => {}
    }
    if matches!(
        end,
        End::Wire(_) | End::Protocol(_) | End::NotDurable | End::BudgetExhausted
    ) {
        tracing::warn!(connector = %shared.connector, peer = %conn.peer, client_id = %device.client_id, reason = %end, "MQTT connection closed");
    } else {
        tracing::debug!(connector = %shared.connector, peer = %conn.peer, client_id = %device.client_id, reason = %end, "MQTT connection closed");
    }
    let _ = conn.stream.shutdown().await;
}

/// The connected part: publishes in, acknowledgements out, messages to the device out and
/// their PUBACKs in, until the connection ends.
struct Session<'a, S> {
    conn: &'a mut Conn<S>,
    device: &'a Device,
    /// What each of its records shares (header values, the last topic's route).
    stamp: Stamp,
    shared: &'a Shared,
    /// Publishes whose records are with the engine, in the order they came.
    pending: VecDeque<Pending>,
    /// The bytes of `pending`'s publishes, held in the budget until each is answered.
    pending_bytes: usize,
    /// Packet ids with a record in the engine (a resend with DUP is not stored twice).
    in_engine: HashSet<u16>,
    /// QoS 2 packet ids PUBREC'd and waiting for their PUBREL.
    awaiting_release: HashSet<u16>,
    /// Set when devices may subscribe.
    commands: Option<Commands>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<'_, S> {
    async fn run(mut self, silence_limit: Duration) -> End {
        let config = &self.shared.config;
        let mut last_heard = Instant::now();
        let budget = self.shared.budget.clone();
        // Since when the connection has been waiting for room in the budget to read.
        let mut room_wait_since: Option<Instant> = None;
        // One timer for the connection, moved on only when it fires (not re-armed per packet).
        let keep_alive = tokio::time::sleep(silence_limit);
        tokio::pin!(keep_alive);
        // One wait for the shutdown for the connection's life: registered once with the
        // listener's token, not again (under its lock, shared by every connection) per wake.
        let shared = self.shared;
        let shutdown = shared.shutdown.cancelled();
        tokio::pin!(shutdown);
        loop {
            // Whole packets already buffered are handled before reading more.
            loop {
                match wire::read(
                    &mut self.conn.buffer,
                    self.conn.version,
                    config.max_packet_bytes,
                ) {
                    Ok(Some(packet)) => {
                        last_heard = Instant::now();
                        if let Err(end) = self.handle(packet).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => return End::Wire(error),
                }
            }
            if let Err(end) = self.answer_settled() {
                return end;
            }
            if let Err(end) = self.conn.write_out().await {
                return end;
            }
            if let Some(commands) = &mut self.commands {
                for done in commands.outbound.written.drain(..) {
                    let _ = done.send(Outcome::Delivered);
                }
            }

            // Room for the next read is taken from the budget first; what the buffer and the
            // pending publishes hold stays taken, the rest goes back.
            let wants_read = self.pending.len() < usize::from(config.max_inflight);
            let holds = self.conn.buffer.len() + self.pending_bytes;
            let may_read = wants_read && self.conn.reservation.resize_to(holds + READ_CHUNK);
            if !may_read {
                self.conn.reservation.shrink_to(holds);
            }
            let waits_for_room = wants_read && !may_read;
            let room_deadline = match (waits_for_room, room_wait_since) {
                (false, _) => {
                    room_wait_since = None;
                    None
                }
                (true, Some(since)) => Some(since + silence_limit),
                (true, None) => {
                    let now = Instant::now();
                    room_wait_since = Some(now);
                    tracing::debug!(connector = %self.shared.connector, client_id = %self.device.client_id, held = budget.used(), "MQTT connection waits for room in the byte budget");
                    Some(now + silence_limit)
                }
            };
            let may_send = self
                .commands
                .as_ref()
                .is_some_and(|c| c.outbound.has_room());
            // In this order (no random draw per wake): the shutdown, then acknowledgements
            // owed, messages to the device, and reads.
            tokio::select! {
                biased;
                _ = &mut shutdown => return End::ShuttingDown,
                delivery = front_settled(&mut self.pending), if !self.pending.is_empty() => {
                    if let Some(front) = self.pending.pop_front()
                        && let Err(end) = self.answer(front, delivery)
                    {
                        return end;
                    }
                }
                message = next_message(&mut self.commands), if may_send => {
                    if let Some(message) = message {
                        self.start(message);
                    }
                }
                filled = self.conn.fill(), if may_read => {
                    if let Err(end) = filled {
                        return end;
                    }
                }
                _ = budget.wait_for_room(READ_CHUNK), if waits_for_room => {}
                _ = sleep_until_some(room_deadline), if waits_for_room => {
                    return End::BudgetExhausted;
                }
                _ = &mut keep_alive, if may_read => {
                    // Only while the listener reads: a client whose PINGREQs wait unread
                    // behind a full in-flight window is not silent.
                    let deadline = last_heard + silence_limit;
                    if Instant::now() >= deadline {
                        return End::KeepAliveTimeout;
                    }
                    keep_alive.as_mut().reset(deadline);
                }
            }
        }
    }

    async fn handle(&mut self, packet: Incoming) -> Result<(), End> {
        let config = &self.shared.config;
        match packet {
            Incoming::Publish(publish) => {
                if publish.qos as u8 > config.max_qos {
                    return Err(End::Protocol("a publish above mqtt.max.qos"));
                }
                if publish.topic_alias.is_some() {
                    return Err(End::Protocol("a topic alias (the listener allows none)"));
                }
                let pkid = publish.pkid;
                let qos = publish.qos;
                if qos == QoS::AtMostOnce {
                    let (record, _) = to_record(config, &mut self.stamp, publish, None);
                    return self.enqueue(record).await;
                }
                if self.in_engine.contains(&pkid) {
                    // The same message again (DUP) while its record is on its way.
                    return Ok(());
                }
                if self.awaiting_release.contains(&pkid) {
                    // QoS 2 resent before our PUBREC arrived: it is stored already.
                    self.conn.queue(Outgoing::PubRec {
                        pkid,
                        verdict: Verdict::Stored,
                    });
                    return Ok(());
                }
                let bytes = publish.topic.len() + publish.payload.len();
                let (ack, delivery) = AckHandle::channel();
                let (record, verdict) = to_record(config, &mut self.stamp, publish, Some(ack));
                self.enqueue(record).await?;
                self.in_engine.insert(pkid);
                self.pending_bytes += bytes;
                self.pending.push_back(Pending {
                    pkid,
                    bytes,
                    qos,
                    verdict,
                    delivery,
                });
            }
            Incoming::PubRel { pkid } => {
                self.awaiting_release.remove(&pkid);
                self.conn.queue(Outgoing::PubComp { pkid });
            }
            Incoming::PingReq => self.conn.queue(Outgoing::PingResp),
            Incoming::Subscribe { pkid, filters } => {
                let granted = filters
                    .iter()
                    .map(|(filter, qos)| self.subscribe(filter, *qos))
                    .collect();
                self.conn.queue(Outgoing::SubAck { pkid, granted });
            }
            Incoming::Unsubscribe { pkid, filters } => {
                let existed = filters
                    .iter()
                    .map(|filter| {
                        self.commands
                            .as_ref()
                            .is_some_and(|c| c.attached.unsubscribe(filter))
                    })
                    .collect();
                self.conn.queue(Outgoing::UnsubAck { pkid, existed });
            }
            Incoming::PubAck { pkid, refused } => {
                let done = self
                    .commands
                    .as_mut()
                    .and_then(|c| c.outbound.waiting.remove(&pkid));
                match (done, refused) {
                    (Some(done), None) => {
                        let _ = done.send(Outcome::Delivered);
                    }
                    (Some(done), Some(reason)) => {
                        tracing::warn!(connector = %self.shared.connector, client_id = %self.device.client_id, pkid, %reason, "the device refused a message");
                        let _ = done.send(Outcome::Refused(reason));
                    }
                    (None, _) => {
                        tracing::debug!(connector = %self.shared.connector, client_id = %self.device.client_id, pkid, "PUBACK for no message in flight");
                    }
                }
            }
            Incoming::Disconnect => return Err(End::Disconnected),
            Incoming::Connect(_) => return Err(End::Protocol("a second CONNECT")),
            Incoming::Ignored => {}
        }
        Ok(())
    }

    /// Hands a record to the task's `poll`: at once when the queue has room (no wait set up
    /// for it, nor for the shutdown), else waiting for room as `Shared::enqueue` does.
    async fn enqueue(&mut self, record: medconnect_api::SourceRecord) -> Result<(), End> {
        use tokio::sync::mpsc::error::TrySendError;
        match self.shared.queue.try_send(record) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(record)) => self
                .shared
                .enqueue(record)
                .await
                .map_err(|()| End::ShuttingDown),
            Err(TrySendError::Closed(_)) => Err(End::ShuttingDown),
        }
    }

    /// The QoS granted for `filter`, or `None` when it is outside `mqtt.subscribe.allowed`.
    /// Messages go to devices at QoS 1 at most (a QoS 2 subscription is granted 1).
    fn subscribe(&self, filter: &str, asked: QoS) -> Option<QoS> {
        let commands = self.commands.as_ref()?;
        let permitted = self
            .shared
            .config
            .subscribe_allowed
            .permits(filter, self.device);
        if !permitted {
            tracing::warn!(connector = %self.shared.connector, client_id = %self.device.client_id, %filter, "MQTT subscription refused: outside mqtt.subscribe.allowed");
            return None;
        }
        let granted = if asked == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        commands.attached.subscribe(filter, granted);
        tracing::info!(connector = %self.shared.connector, client_id = %self.device.client_id, %filter, qos = granted as u8, "MQTT device subscribed");
        Some(granted)
    }

    /// Queues a message for the device: at QoS 1 it awaits the device's PUBACK.
    fn start(&mut self, message: Message) {
        let Some(commands) = &mut self.commands else {
            return;
        };
        let Message {
            topic,
            payload,
            qos,
            done,
        } = message;
        if qos == QoS::AtMostOnce {
            self.conn.queue(Outgoing::Publish {
                pkid: 0,
                qos,
                topic,
                payload,
            });
            commands.outbound.written.push(done);
            return;
        }
        let pkid = commands.outbound.next_pkid();
        self.conn.queue(Outgoing::Publish {
            pkid,
            qos: QoS::AtLeastOnce,
            topic,
            payload,
        });
        commands.outbound.waiting.insert(pkid, done);
    }

    /// Answers every publish at the front whose record is already settled, in order.
    fn answer_settled(&mut self) -> Result<(), End> {
        while let Some(front) = self.pending.front_mut() {
            let delivery = match front.delivery.try_recv() {
                Ok(delivery) => Some(delivery),
                Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                Err(oneshot::error::TryRecvError::Closed) => None,
            };
            if let Some(front) = self.pending.pop_front() {
                self.answer(front, delivery)?;
            }
        }
        Ok(())
    }

    /// Queues the acknowledgement of a settled publish; a record Kafka did not take ends the
    /// connection instead (the device resends it).
    fn answer(&mut self, pending: Pending, delivery: Option<Delivery>) -> Result<(), End> {
        let Pending {
            pkid,
            bytes,
            qos,
            verdict,
            ..
        } = pending;
        self.in_engine.remove(&pkid);
        self.pending_bytes -= bytes;
        let verdict = match delivery {
            Some(Delivery::Written { .. } | Delivery::DeadLettered { .. } | Delivery::Filtered) => {
                verdict
            }
            Some(Delivery::Rejected { .. }) if verdict == Verdict::Stored => {
                Verdict::PayloadInvalid
            }
            Some(Delivery::Rejected { .. }) => verdict,
            Some(Delivery::Failed { .. }) | None => return Err(End::NotDurable),
        };
        let answer = if qos == QoS::ExactlyOnce {
            if verdict == Verdict::Stored {
                self.awaiting_release.insert(pkid);
            }
            Outgoing::PubRec { pkid, verdict }
        } else {
            Outgoing::PubAck { pkid, verdict }
        };
        self.conn.queue(answer);
        Ok(())
    }
}
