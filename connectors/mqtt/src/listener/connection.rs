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
//! (beyond it the connection is not read).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use medconnect_api::{AckHandle, Delivery};
use rumqttc::QoS;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Shared;
use super::auth::Admission;
use super::record::{Device, to_record};
use super::wire::{self, Connect, Incoming, Outgoing, Refusal, Verdict, Version, WireError};

/// How long writing one answer may take before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A publish waiting for the engine to settle its record.
struct Pending {
    pkid: u16,
    qos: QoS,
    /// What the acknowledgement says once the record is settled (the listener refused the
    /// topic or payload: it went to the dead-letter topic).
    verdict: Verdict,
    delivery: oneshot::Receiver<Delivery>,
}

async fn settled(pending: Pending) -> (u16, QoS, Verdict, Option<Delivery>) {
    (
        pending.pkid,
        pending.qos,
        pending.verdict,
        pending.delivery.await.ok(),
    )
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
}

struct Conn<S> {
    stream: S,
    buffer: BytesMut,
    out: BytesMut,
    version: Version,
    peer: SocketAddr,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self, packet: Outgoing) -> Result<(), End> {
        self.out.clear();
        if !wire::write(packet, self.version, &mut self.out) {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(End::Io(error)),
            Err(_) => Err(End::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Reads more bytes; `Closed` at end of stream.
    async fn fill(&mut self) -> Result<(), End> {
        self.buffer.reserve(4096);
        match self.stream.read_buf(&mut self.buffer).await {
            Ok(0) => Err(End::Closed),
            Ok(_) => Ok(()),
            Err(error) => Err(End::Io(error)),
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
) -> Result<(Conn<S>, Connect), (Option<Conn<S>>, End)> {
    let mut conn = Conn {
        stream,
        buffer: BytesMut::with_capacity(1024),
        out: BytesMut::with_capacity(64),
        version: Version::V311,
        peer,
    };
    loop {
        match wire::connect_version(&conn.buffer, max) {
            Ok(Some(version)) => {
                conn.version = version;
                break;
            }
            Ok(None) => {
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
    let connecting = tokio::time::timeout(config.connect_timeout, read_connect(stream, peer, max));
    let (mut conn, connect) = match connecting.await {
        Ok(Ok(connected)) => connected,
        Ok(Err((conn, end))) => {
            tracing::debug!(connector = %shared.connector, %peer, reason = %end, "MQTT connection closed before CONNECT");
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
    // A publishing device's session holds nothing the listener must keep (no subscriptions,
    // nothing queued for it; QoS 2 releases are answered whether remembered or not), so a
    // device asking to resume one is told it is present: then it resends, with DUP, whatever
    // was not acknowledged before — on this worker or another — instead of discarding it.
    let connack = Outgoing::ConnAck {
        session_present: !connect.clean_start && assigned.is_none(),
        assigned_client_id: assigned,
        receive_maximum: config.max_inflight,
        max_packet_size: u32::try_from(max).unwrap_or(u32::MAX),
        server_keep_alive_s: (keep_alive != connect.keep_alive_s).then_some(keep_alive),
    };
    if conn.send(connack).await.is_err() {
        return;
    }
    tracing::debug!(connector = %shared.connector, %peer, client_id = %device.client_id, version = conn.version.name(), keep_alive, "MQTT device connected");

    let end = session(
        &mut conn,
        &device,
        Duration::from_millis(u64::from(keep_alive) * 1500),
        &shared,
    )
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
        End::Closed | End::Disconnected | End::Io(_) => {}
    }
    if matches!(end, End::Wire(_) | End::Protocol(_) | End::NotDurable) {
        tracing::warn!(connector = %shared.connector, peer = %conn.peer, client_id = %device.client_id, reason = %end, "MQTT connection closed");
    } else {
        tracing::debug!(connector = %shared.connector, peer = %conn.peer, client_id = %device.client_id, reason = %end, "MQTT connection closed");
    }
    let _ = conn.stream.shutdown().await;
}

/// The connected part: publishes in, acknowledgements out, until the connection ends.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    device: &Device,
    silence_limit: Duration,
    shared: &Shared,
) -> End {
    let config = &shared.config;
    let mut pending = FuturesUnordered::new();
    // Packet ids with a record in the engine (a resend with DUP is not stored twice) and,
    // for QoS 2, those PUBREC'd and waiting for their PUBREL.
    let mut in_engine: HashSet<u16> = HashSet::new();
    let mut awaiting_release: HashSet<u16> = HashSet::new();
    let mut last_heard = Instant::now();
    loop {
        // Whole packets already buffered are handled before reading more.
        let packet = match wire::read(&mut conn.buffer, conn.version, config.max_packet_bytes) {
            Ok(packet) => packet,
            Err(error) => return End::Wire(error),
        };
        if let Some(packet) = packet {
            last_heard = Instant::now();
            match packet {
                Incoming::Publish(publish) => {
                    if publish.qos as u8 > config.max_qos {
                        return End::Protocol("a publish above mqtt.max.qos");
                    }
                    if publish.topic_alias.is_some() {
                        return End::Protocol("a topic alias (the listener allows none)");
                    }
                    let pkid = publish.pkid;
                    let qos = publish.qos;
                    if qos == QoS::AtMostOnce {
                        let (record, _) = to_record(config, device, publish, None);
                        if shared.enqueue(record).await.is_err() {
                            return End::ShuttingDown;
                        }
                        continue;
                    }
                    if in_engine.contains(&pkid) {
                        // The same message again (DUP) while its record is on its way.
                        continue;
                    }
                    if awaiting_release.contains(&pkid) {
                        // QoS 2 resent before our PUBREC arrived: it is stored already.
                        let answer = Outgoing::PubRec {
                            pkid,
                            verdict: Verdict::Stored,
                        };
                        if let Err(end) = conn.send(answer).await {
                            return end;
                        }
                        continue;
                    }
                    let (ack, delivery) = AckHandle::channel();
                    let (record, verdict) = to_record(config, device, publish, Some(ack));
                    if shared.enqueue(record).await.is_err() {
                        return End::ShuttingDown;
                    }
                    in_engine.insert(pkid);
                    pending.push(settled(Pending {
                        pkid,
                        qos,
                        verdict,
                        delivery,
                    }));
                }
                Incoming::PubRel { pkid } => {
                    awaiting_release.remove(&pkid);
                    if let Err(end) = conn.send(Outgoing::PubComp { pkid }).await {
                        return end;
                    }
                }
                Incoming::PingReq => {
                    if let Err(end) = conn.send(Outgoing::PingResp).await {
                        return end;
                    }
                }
                Incoming::Subscribe { pkid, filters } => {
                    if let Err(end) = conn.send(Outgoing::SubAck { pkid, filters }).await {
                        return end;
                    }
                }
                Incoming::Unsubscribe { pkid, filters } => {
                    if let Err(end) = conn.send(Outgoing::UnsubAck { pkid, filters }).await {
                        return end;
                    }
                }
                Incoming::Disconnect => return End::Disconnected,
                Incoming::Connect(_) => return End::Protocol("a second CONNECT"),
                Incoming::Ignored => {}
            }
            continue;
        }

        let may_read = pending.len() < usize::from(config.max_inflight);
        let deadline = last_heard + silence_limit;
        tokio::select! {
            _ = shared.shutdown.cancelled() => return End::ShuttingDown,
            Some((pkid, qos, verdict, delivery)) = pending.next(), if !pending.is_empty() => {
                in_engine.remove(&pkid);
                let verdict = match delivery {
                    Some(Delivery::Written { .. } | Delivery::DeadLettered { .. } | Delivery::Filtered) => verdict,
                    Some(Delivery::Rejected { .. }) if verdict == Verdict::Stored => Verdict::PayloadInvalid,
                    Some(Delivery::Rejected { .. }) => verdict,
                    Some(Delivery::Failed { .. }) | None => return End::NotDurable,
                };
                let answer = if qos == QoS::ExactlyOnce {
                    if verdict == Verdict::Stored {
                        awaiting_release.insert(pkid);
                    }
                    Outgoing::PubRec { pkid, verdict }
                } else {
                    Outgoing::PubAck { pkid, verdict }
                };
                if let Err(end) = conn.send(answer).await {
                    return end;
                }
            }
            filled = conn.fill(), if may_read => {
                if let Err(end) = filled {
                    return end;
                }
            }
            _ = tokio::time::sleep_until(deadline), if may_read => {
                // Only while the listener reads: a client whose PINGREQs wait unread behind
                // a full in-flight window is not silent.
                return End::KeepAliveTimeout;
            }
        }
    }
}
