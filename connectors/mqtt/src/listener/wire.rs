//! The MQTT wire protocol of the listener, through `rumqttc`'s codecs (3.1.1 in
//! `rumqttc::mqttbytes::v4`, 5 in `rumqttc::v5::mqttbytes::v5`): which version a client
//! speaks, its packets in one shape for both, and the answers encoded in its version.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::{QoS, mqttbytes};

/// The protocol a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Self::V311 => "3.1.1",
            Self::V5 => "5",
        }
    }
}

/// Why no packet could be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol level {0} is not MQTT 3.1.1 (4) or 5")]
    UnsupportedVersion(u8),
    #[error("the first packet is not CONNECT")]
    NotConnect,
}

/// What a client sent, in the same shape for 3.1.1 and 5.
#[derive(Debug)]
pub enum Incoming {
    Connect(Connect),
    Publish(Publish),
    PubRel {
        pkid: u16,
    },
    PingReq,
    /// Topic filters with the QoS asked for each.
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    /// The device acknowledged a publish the listener sent it (a command); MQTT 5 may refuse
    /// it with a reason code of 0x80 or more.
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    Disconnect,
    /// Packets a client may send that need no answer here (PUBREC, PUBCOMP, AUTH ...).
    Ignored,
}

#[derive(Debug)]
pub struct Connect {
    pub client_id: String,
    pub keep_alive_s: u16,
    pub clean_start: bool,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    /// MQTT 5: how many QoS 1/2 publishes the device takes unacknowledged at once.
    pub receive_maximum: Option<u16>,
}

#[derive(Debug)]
pub struct Publish {
    pub topic: String,
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
    pub retain: bool,
    pub payload: Bytes,
    /// MQTT 5 properties: user properties (kept as headers) and the content type.
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    /// MQTT 5: a topic alias, which the listener does not allow (it announces none).
    pub topic_alias: Option<u16>,
}

/// The size of the first packet in `buffer`, once its fixed header is complete.
fn frame(buffer: &BytesMut, max: usize) -> Result<Option<(u8, usize)>, WireError> {
    match mqttbytes::check(buffer.iter(), usize::MAX) {
        Ok(header) => {
            let size = header.frame_length();
            if size > max {
                return Err(WireError::TooLarge { size, max });
            }
            let first = buffer.first().copied().unwrap_or_default();
            Ok(Some((first, size)))
        }
        Err(mqttbytes::Error::InsufficientBytes(_)) => {
            // A header that already announces more than the maximum is refused before the
            // body arrives: no client makes the listener buffer past `max`.
            if let Some(size) = announced_size(buffer)
                && size > max
            {
                return Err(WireError::TooLarge { size, max });
            }
            Ok(None)
        }
        Err(error) => Err(WireError::Malformed(error.to_string())),
    }
}

/// The frame size a partial fixed header already announces, when its length is complete.
fn announced_size(buffer: &BytesMut) -> Option<usize> {
    let mut remaining = 0usize;
    for (index, byte) in buffer.iter().skip(1).take(4).enumerate() {
        remaining += usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Some(1 + index + 1 + remaining);
        }
    }
    None
}

/// The protocol level of a complete CONNECT packet of `size` bytes at the start of `buffer`.
pub fn connect_version(buffer: &BytesMut, max: usize) -> Result<Option<Version>, WireError> {
    let Some((first, size)) = frame(buffer, max)? else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(WireError::NotConnect);
    }
    // Fixed header: 1 byte + 1..4 length bytes; then the protocol name (2 + 4 bytes, "MQTT")
    // and the level.
    let header_len = (1..5)
        .find(|i| buffer.get(*i).is_some_and(|b| b & 0x80 == 0))
        .map(|i| i + 1)
        .ok_or_else(|| WireError::Malformed("bad remaining length".into()))?;
    let level_at = header_len + 6;
    if level_at >= size {
        return Err(WireError::Malformed("CONNECT too short".into()));
    }
    match buffer.get(level_at).copied() {
        Some(4) => Ok(Some(Version::V311)),
        Some(5) => Ok(Some(Version::V5)),
        Some(level) => Err(WireError::UnsupportedVersion(level)),
        None => Ok(None),
    }
}

/// The next whole packet from `buffer`, or `None` until more bytes arrived.
pub fn read(
    buffer: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Option<Incoming>, WireError> {
    let Some((first, size)) = frame(buffer, max)? else {
        return Ok(None);
    };
    // An MQTT 5 DISCONNECT without a reason code (remaining length 0) is valid, but
    // rumqttc 0.25 refuses it as a packet that needs a payload.
    if version == Version::V5 && first >> 4 == 14 && size == 2 {
        buffer.advance(2);
        return Ok(Some(Incoming::Disconnect));
    }
    // The packet is decoded from its own copy, not split off the read buffer: a publish's
    // payload (kept until Kafka has its record) would share, and pin, the whole buffer, and
    // the next read would allocate a new one — per message. The copy holds just the packet,
    // which is what the byte budget counts for it.
    let mut packet = BytesMut::from(&buffer[..size]);
    buffer.advance(size);
    let max = usize::MAX;
    match version {
        Version::V311 => v4::Packet::read(&mut packet, max)
            .map(|p| Some(from_v4(p)))
            .map_err(|e| WireError::Malformed(e.to_string())),
        Version::V5 => v5::Packet::read(&mut packet, None)
            .map(|p| Some(from_v5(p)))
            .map_err(|e| WireError::Malformed(e.to_string())),
    }
}

fn from_v4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::Connect(c) => Incoming::Connect(Connect {
            client_id: c.client_id,
            keep_alive_s: c.keep_alive,
            clean_start: c.clean_session,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password.into_bytes()),
            receive_maximum: None,
        }),
        v4::Packet::Publish(p) => Incoming::Publish(Publish {
            topic: p.topic,
            qos: p.qos,
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            payload: p.payload,
            user_properties: Vec::new(),
            content_type: None,
            topic_alias: None,
        }),
        v4::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        v4::Packet::Disconnect => Incoming::Disconnect,
        _ => Incoming::Ignored,
    }
}

fn from_v5(packet: v5::Packet) -> Incoming {
    match packet {
        v5::Packet::Connect(c, _will, login) => Incoming::Connect(Connect {
            client_id: c.client_id,
            keep_alive_s: c.keep_alive,
            clean_start: c.clean_start,
            username: login.as_ref().map(|l| l.username.clone()),
            password: login.map(|l| l.password.into_bytes()),
            receive_maximum: c.properties.and_then(|p| p.receive_maximum),
        }),
        v5::Packet::Publish(p) => {
            let (user_properties, content_type, topic_alias) = match p.properties {
                Some(props) => (props.user_properties, props.content_type, props.topic_alias),
                None => (Vec::new(), None, None),
            };
            Incoming::Publish(Publish {
                // Not UTF-8: an empty topic, which the session refuses as invalid (MQTT 5
                // requires UTF-8 topic names; 3.1.1's decoder refuses the packet itself).
                topic: String::from_utf8(p.topic.to_vec()).unwrap_or_default(),
                qos: from_v5_qos(p.qos),
                pkid: p.pkid,
                dup: p.dup,
                retain: p.retain,
                payload: p.payload,
                user_properties,
                content_type,
                topic_alias,
            })
        }
        v5::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, from_v5_qos(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PubAck(a) => Incoming::PubAck {
            pkid: a.pkid,
            refused: match a.reason {
                v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers => None,
                reason => Some(format!("{reason:?}")),
            },
        },
        v5::Packet::Disconnect(_) => Incoming::Disconnect,
        _ => Incoming::Ignored,
    }
}

fn from_v5_qos(qos: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn to_v5_qos(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    NotAuthorized,
    BadClientId,
    ConnectionRate,
}

/// What an acknowledgement says of its publish (MQTT 5 carries it as the reason code; 3.1.1
/// acknowledges alike, the record is in the dead-letter topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Stored,
    /// The topic fits no mapping, or holds a wildcard or NUL (0x90).
    TopicInvalid,
    /// The payload failed `payload.format` (0x99), or Kafka refused the record itself.
    PayloadInvalid,
    /// Its Kafka topic would be one more than `kafka.topic.max.distinct` allows (0x97).
    QuotaExceeded,
}

/// What the listener answers.
#[derive(Debug)]
pub enum Outgoing {
    ConnAck {
        /// Whether the device resumes a session: it then resends, with DUP, what was not
        /// acknowledged (a client told "no session" discards it).
        session_present: bool,
        /// The client id the server chose, for a client that sent none (MQTT 5 tells it).
        assigned_client_id: Option<String>,
        receive_maximum: u16,
        max_packet_size: u32,
        server_keep_alive_s: Option<u16>,
        /// Whether devices may subscribe (to commands) with wildcards.
        subscriptions: bool,
    },
    Refused(Refusal),
    PubAck {
        pkid: u16,
        verdict: Verdict,
    },
    PubRec {
        pkid: u16,
        verdict: Verdict,
    },
    PubComp {
        pkid: u16,
    },
    PingResp,
    /// Per filter, the QoS granted, or `None`: refused (3.1.1 0x80, MQTT 5 0x87 not
    /// authorised).
    SubAck {
        pkid: u16,
        granted: Vec<Option<QoS>>,
    },
    /// Per filter, whether a subscription existed.
    UnsubAck {
        pkid: u16,
        existed: Vec<bool>,
    },
    /// A message to the device (a command from the sink); `pkid` 0 at QoS 0.
    Publish {
        pkid: u16,
        qos: QoS,
        topic: String,
        payload: bytes::Bytes,
    },
    /// MQTT 5 only (3.1.1 has no server DISCONNECT: the connection is just closed).
    Disconnect(v5::DisconnectReasonCode),
}

/// Appends `packet` in `version`'s encoding; `false` when there is nothing to send in it.
pub fn write(packet: Outgoing, version: Version, out: &mut BytesMut) -> bool {
    let max = usize::MAX;
    match version {
        Version::V311 => match to_v4(packet) {
            Some(packet) => packet.write(out, max).is_ok(),
            None => false,
        },
        Version::V5 => to_v5(packet).write(out, None).is_ok(),
    }
}

fn to_v4(packet: Outgoing) -> Option<v4::Packet> {
    use v4::ConnectReturnCode as Code;
    Some(match packet {
        Outgoing::ConnAck {
            session_present, ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(Code::Success, session_present)),
        Outgoing::Refused(refusal) => {
            let code = match refusal {
                Refusal::BadCredentials => Code::BadUserNamePassword,
                Refusal::NotAuthorized => Code::NotAuthorized,
                Refusal::BadClientId => Code::BadClientId,
                Refusal::ConnectionRate => Code::ServiceUnavailable,
            };
            v4::Packet::ConnAck(v4::ConnAck::new(code, false))
        }
        // 3.1.1 has no negative acknowledgement: a refused record is acknowledged (it is in
        // the engine's log), a failed one is answered by closing the connection instead.
        Outgoing::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outgoing::PubRec { pkid, .. } => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Outgoing::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Outgoing::PingResp => v4::Packet::PingResp,
        Outgoing::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|g| {
                    g.map_or(
                        v4::SubscribeReasonCode::Failure,
                        v4::SubscribeReasonCode::Success,
                    )
                })
                .collect(),
        )),
        Outgoing::Publish {
            pkid,
            qos,
            topic,
            payload,
        } => v4::Packet::Publish(v4::Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            pkid,
            payload,
        }),
        Outgoing::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Outgoing::Disconnect(_) => return None,
    })
}

fn to_v5(packet: Outgoing) -> v5::Packet {
    use v5::ConnectReturnCode as Code;
    match packet {
        Outgoing::ConnAck {
            session_present,
            assigned_client_id,
            receive_maximum,
            max_packet_size,
            server_keep_alive_s,
            subscriptions,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: Code::Success,
            properties: Some(v5::ConnAckProperties {
                receive_max: Some(receive_maximum),
                max_packet_size: Some(max_packet_size),
                assigned_client_identifier: assigned_client_id,
                server_keep_alive: server_keep_alive_s,
                retain_available: Some(0),
                wildcard_subscription_available: Some(u8::from(subscriptions)),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                session_expiry_interval: None,
                max_qos: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Outgoing::Refused(refusal) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: match refusal {
                Refusal::BadCredentials => Code::BadUserNamePassword,
                Refusal::NotAuthorized => Code::NotAuthorized,
                Refusal::BadClientId => Code::ClientIdentifierNotValid,
                Refusal::ConnectionRate => Code::ConnectionRateExceeded,
            },
            properties: None,
        }),
        Outgoing::PubAck { pkid, verdict } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match verdict {
                Verdict::Stored => v5::PubAckReason::Success,
                Verdict::TopicInvalid => v5::PubAckReason::TopicNameInvalid,
                Verdict::PayloadInvalid => v5::PubAckReason::PayloadFormatInvalid,
                Verdict::QuotaExceeded => v5::PubAckReason::QuotaExceeded,
            },
            properties: None,
        }),
        Outgoing::PubRec { pkid, verdict } => v5::Packet::PubRec(v5::PubRec {
            pkid,
            reason: match verdict {
                Verdict::Stored => v5::PubRecReason::Success,
                Verdict::TopicInvalid => v5::PubRecReason::TopicNameInvalid,
                Verdict::PayloadInvalid => v5::PubRecReason::PayloadFormatInvalid,
                Verdict::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
            },
            properties: None,
        }),
        Outgoing::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        Outgoing::PingResp => v5::Packet::PingResp(v5::PingResp),
        Outgoing::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|g| match g {
                    Some(qos) => v5::SubscribeReasonCode::Success(to_v5_qos(qos)),
                    None => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Outgoing::UnsubAck { pkid, existed } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: existed
                .into_iter()
                .map(|e| {
                    if e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }),
        Outgoing::Publish {
            pkid,
            qos,
            topic,
            payload,
        } => v5::Packet::Publish(v5::Publish {
            dup: false,
            qos: to_v5_qos(qos),
            retain: false,
            topic: topic.into(),
            pkid,
            payload,
            properties: None,
        }),
        Outgoing::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect::new(reason)),
    }
}

#[cfg(test)]
#[path = "wire_fuzz.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_v4(packet: v4::Packet) -> BytesMut {
        let mut out = BytesMut::new();
        packet.write(&mut out, usize::MAX).unwrap();
        out
    }

    #[test]
    fn reads_a_3_1_1_connect_and_publish() {
        let mut connect = v4::Connect::new("pump-3");
        connect.set_login("device", "secret");
        let mut buffer = encoded_v4(v4::Packet::Connect(connect));
        assert_eq!(connect_version(&buffer, 1024).unwrap(), Some(Version::V311));
        let Some(Incoming::Connect(c)) = read(&mut buffer, Version::V311, 1024).unwrap() else {
            panic!("not a connect");
        };
        assert_eq!(c.client_id, "pump-3");
        assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
        let mut publish = v4::Publish::new("devices/pump-3/vitals", QoS::AtLeastOnce, "x");
        publish.pkid = 7;
        let mut buffer = encoded_v4(v4::Packet::Publish(publish));
        let tail = buffer.split_off(buffer.len() - 1);
        assert!(read(&mut buffer, Version::V311, 1024).unwrap().is_none());
        buffer.unsplit(tail);
        let Some(Incoming::Publish(p)) = read(&mut buffer, Version::V311, 1024).unwrap() else {
            panic!("not a publish");
        };
        assert_eq!((p.pkid, p.qos), (7, QoS::AtLeastOnce));
    }

    #[test]
    fn refuses_a_packet_over_the_maximum_from_its_header_alone() {
        // A PUBLISH announcing 1 MiB: refused with only its first 4 bytes read.
        let buffer = BytesMut::from(&[0x32, 0x80, 0x80, 0x40][..]);
        let mut partial = buffer.clone();
        assert!(matches!(
            read(&mut partial, Version::V311, 1024),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [
            &[0x10, 0x02, 0x00, 0x04][..],
            &[0xff; 8][..],
            &[0x30, 0x01, 0x00][..],
        ] {
            let mut buffer = BytesMut::from(bytes);
            let _ = connect_version(&buffer, 1024);
            let _ = read(&mut buffer, Version::V311, 1024);
            let mut buffer = BytesMut::from(bytes);
            let _ = read(&mut buffer, Version::V5, 1024);
        }
    }
}
