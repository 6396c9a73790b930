//! Commands to devices connected to another worker: the sink with `mqtt.sink.target=listener`
//! runs on one worker, while a load balancer spread the devices over every worker's listener.
//! Each listener answers the relay channel `mqtt-listener/<its name>` (through the engine's
//! signed worker-to-worker calls, [`medconnect_api::relay`]); the sink asks every other
//! worker's listener, as it asks its own hub, for one delivery round: hand the message to the
//! devices subscribed there that have not acknowledged it yet, and say who acknowledged it.
//!
//! The request is a JSON line (what to deliver, to whom not, how long to hold on) followed by
//! the payload's bytes; the answer is a [`Round`] as JSON.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use medconnect_api::relay::{self, Peers, RelayError, RelayHandler};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::listener::hub::{Hub, Round};

/// The longest a call may make a listener hold on to a message: a bound for the receiving
/// worker whatever the caller asks (`mqtt.delivery.timeout.ms` is far below it by default).
const MAX_HOLD: Duration = Duration::from_secs(600);

/// How much longer than the round the caller waits for the answer (the network, the
/// receiving worker's own deadline checks).
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The relay channel of listener `listener`.
pub fn channel(listener: &str) -> String {
    format!("mqtt-listener/{listener}")
}

/// One delivery round asked of another worker's listener.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    topic: String,
    /// 0 or 1: the QoS the sink sends with (a QoS 0 subscription still gets QoS 0).
    qos: u8,
    /// Devices that acknowledged the message already (on any worker).
    skip: Vec<String>,
    /// How long to wait for a subscribed device, when none is there.
    wait_for_subscriber_ms: u64,
    /// How long the whole round may take.
    deadline_ms: u64,
}

fn encode(request: &Request, payload: &[u8]) -> Bytes {
    // Serialising a struct of strings and numbers cannot fail.
    let head = serde_json::to_vec(request).unwrap_or_default();
    let mut bytes = BytesMut::with_capacity(head.len() + 1 + payload.len());
    bytes.put_slice(&head);
    bytes.put_u8(b'\n');
    bytes.put_slice(payload);
    bytes.freeze()
}

fn decode(mut bytes: Bytes) -> Result<(Request, Bytes), String> {
    let end = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("a relay request starts with a JSON line")?;
    let head = bytes.split_to(end);
    let payload = bytes.split_off(1);
    let request: Request =
        serde_json::from_slice(&head).map_err(|e| format!("bad relay request: {e}"))?;
    if request.topic.is_empty() || request.topic.contains(['+', '#']) {
        return Err(format!(
            "'{}' is not a topic a message can be published to",
            request.topic
        ));
    }
    Ok((request, payload))
}

/// Makes `hub` answer other workers' sinks for listener `listener` until the guard goes.
pub(crate) fn serve(listener: &str, hub: &Arc<Hub>) -> relay::Serving {
    relay::serve(
        &channel(listener),
        Arc::new(ListenerRelay {
            hub: Arc::downgrade(hub),
        }),
    )
}

/// A listener's hub, answering another worker's sink.
struct ListenerRelay {
    hub: Weak<Hub>,
}

#[async_trait]
impl RelayHandler for ListenerRelay {
    async fn handle(&self, request: Bytes) -> Result<Bytes, String> {
        let (request, payload) = decode(request)?;
        let hub = self.hub.upgrade().ok_or("the listener has stopped")?;
        let now = Instant::now();
        let hold = Duration::from_millis(request.deadline_ms).min(MAX_HOLD);
        let wait = Duration::from_millis(request.wait_for_subscriber_ms).min(hold);
        let qos = if request.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let skip: HashSet<String> = request.skip.into_iter().collect();
        let round = hub
            .deliver_round(&request.topic, payload, qos, &skip, now + wait, now + hold)
            .await;
        serde_json::to_vec(&round)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

/// One delivery round on worker `peer`'s listener `listener`. A worker that runs no such
/// listener (yet), or does not answer, holds no device: an empty round (its devices, if it
/// died, connect again elsewhere).
#[allow(clippy::too_many_arguments)] // one round's parts, as the local round takes them
pub async fn remote_round(
    peers: &dyn Peers,
    peer: &str,
    listener: &str,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    skip: &HashSet<String>,
    wait_for_subscriber: Instant,
    deadline: Instant,
) -> Round {
    let now = Instant::now();
    let hold = deadline.saturating_duration_since(now);
    let request = Request {
        topic: topic.to_string(),
        qos: if qos == QoS::AtMostOnce { 0 } else { 1 },
        skip: skip.iter().cloned().collect(),
        wait_for_subscriber_ms: millis(wait_for_subscriber.saturating_duration_since(now)),
        deadline_ms: millis(hold),
    };
    let answer = peers
        .call(
            peer,
            &channel(listener),
            encode(&request, payload),
            hold + ANSWER_MARGIN,
        )
        .await;
    let failed = match answer {
        Ok(answer) => match serde_json::from_slice::<Round>(&answer) {
            Ok(round) => return round,
            Err(error) => format!("an answer that is not a delivery round: {error}"),
        },
        // It does not run the listener (yet): nothing to say.
        Err(RelayError::NoHandler { .. } | RelayError::NotAMember(_)) => return Round::default(),
        Err(error) => error.to_string(),
    };
    tracing::warn!(%peer, %listener, mqtt_topic = %topic, reason = %failed, "another worker's MQTT listener did not take part in delivering a message");
    Round::default()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_its_encoding_with_any_payload_bytes() {
        let request = Request {
            topic: "devices/pump-3/commands".into(),
            qos: 1,
            skip: vec!["monitor-7".into()],
            wait_for_subscriber_ms: 1000,
            deadline_ms: 60_000,
        };
        let payload = b"\n{\"set-rate\":12.5}\n\0\xff";
        let (decoded, bytes) = decode(encode(&request, payload)).expect("decodes");
        assert_eq!(decoded.topic, request.topic);
        assert_eq!(decoded.skip, request.skip);
        assert_eq!(decoded.deadline_ms, 60_000);
        assert_eq!(&bytes[..], payload);
    }

    #[test]
    fn a_request_without_a_publishable_topic_is_refused() {
        for topic in ["", "devices/+/commands", "devices/#"] {
            let request = Request {
                topic: topic.into(),
                qos: 1,
                skip: Vec::new(),
                wait_for_subscriber_ms: 0,
                deadline_ms: 0,
            };
            assert!(decode(encode(&request, b"x")).is_err(), "{topic}");
        }
        assert!(decode(Bytes::from_static(b"no json line")).is_err());
        assert!(decode(Bytes::from_static(b"{\"topic\":1}\n")).is_err());
    }

    #[tokio::test]
    async fn a_listener_answers_a_round_for_its_devices_and_skips_those_that_acknowledged() {
        let hub = Arc::new(Hub::default());
        let handler = ListenerRelay {
            hub: Arc::downgrade(&hub),
        };
        let (pump, mut pump_messages) = hub.attach("pump-3", 4);
        pump.subscribe("devices/pump-3/commands", QoS::AtLeastOnce);
        let device = tokio::spawn(async move {
            let message = pump_messages.recv().await.expect("a message");
            assert_eq!(&message.payload[..], b"{\"stop\":true}");
            let _ = message.done.send(crate::listener::hub::Outcome::Delivered);
        });
        let ask = |skip: Vec<String>| Request {
            topic: "devices/pump-3/commands".into(),
            qos: 1,
            skip,
            wait_for_subscriber_ms: 0,
            deadline_ms: 5_000,
        };
        let answer = handler
            .handle(encode(&ask(Vec::new()), b"{\"stop\":true}"))
            .await
            .expect("answered");
        let round: Round = serde_json::from_slice(&answer).expect("a round");
        assert_eq!(round.acknowledged, vec!["pump-3".to_string()]);
        assert!(round.owed.is_empty() && round.refused.is_none());
        device.await.expect("the device saw it");
        // Acknowledged already: nothing to do, nobody found.
        let answer = handler
            .handle(encode(&ask(vec!["pump-3".into()]), b"{}"))
            .await
            .expect("answered");
        let round: Round = serde_json::from_slice(&answer).expect("a round");
        assert_eq!(round, Round::default());
        drop(pump);
    }
}
