//! The rest-hook receiver of FhirSubscriptionSource: it takes the server's notifications
//! (R4 Subscriptions Backport IG: a `history` Bundle whose first entry is a `Parameters`
//! SubscriptionStatus), turns each event-notification into an immediate `_history` read of the
//! resource types it names (an id-only notification carries no resource; the history has every
//! version, deletions included), and answers the server only once the records that read
//! produced, and every record before them, are durable in Kafka: 200 then, 503 when one was
//! not written or `fhir.ack.timeout.ms` passed (the server sends the notification again). A
//! heartbeat or notification that reports more events than this receiver saw (an event-number
//! gap) reads every resource type: what a lost notification was about is caught up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// A read the receiver asks of the task: these resource types, now. The task answers with
/// the sequence number of the last record it has emitted once the read is done.
#[derive(Debug)]
pub struct Trigger {
    pub types: Vec<String>,
    pub reply: oneshot::Sender<u64>,
}

/// How far the task's records are settled: every record up to `settled` (by sequence) has an
/// outcome, and `failures` of them were not written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    pub settled: u64,
    pub failures: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Handshake,
    Heartbeat,
    Event,
    Other,
}

/// What a notification says.
#[derive(Debug)]
struct Notification {
    kind: Kind,
    subscription: String,
    events_since_start: Option<u64>,
    event_numbers: Vec<u64>,
    focus_types: Vec<String>,
}

fn number(value: &Value) -> Option<u64> {
    [
        "valueString",
        "valueUnsignedInt",
        "valueInteger64",
        "valueInteger",
        "valueDecimal",
    ]
    .iter()
    .find_map(|field| match &value[*field] {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    })
}

impl Notification {
    fn parse(bundle: &Value) -> Option<Self> {
        let status = bundle["entry"]
            .as_array()?
            .iter()
            .map(|e| &e["resource"])
            .find(|r| {
                r["resourceType"] == "Parameters" || r["resourceType"] == "SubscriptionStatus"
            })?;
        let mut notification = Self {
            kind: Kind::Other,
            subscription: String::new(),
            events_since_start: None,
            event_numbers: Vec::new(),
            focus_types: Vec::new(),
        };
        let mut focus = |reference: &str| {
            // "Patient/123", or an absolute URL ending in Type/id.
            let mut segments = reference.rsplit('/');
            let _id = segments.next();
            if let Some(kind) = segments.next()
                && crate::config::resource_type_check(kind).is_ok()
                && !notification.focus_types.iter().any(|t| t == kind)
            {
                notification.focus_types.push(kind.to_string());
            }
        };
        let kind_of = |code: &str| match code {
            "handshake" => Kind::Handshake,
            "heartbeat" => Kind::Heartbeat,
            "event-notification" => Kind::Event,
            _ => Kind::Other,
        };
        for parameter in status["parameter"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            match parameter["name"].as_str() {
                Some("type") => {
                    notification.kind = kind_of(parameter["valueCode"].as_str().unwrap_or_default())
                }
                Some("subscription") => {
                    notification.subscription = parameter["valueReference"]["reference"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
                Some("events-since-subscription-start") => {
                    notification.events_since_start = number(parameter)
                }
                Some("notification-event") => {
                    for part in parameter["part"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                    {
                        match part["name"].as_str() {
                            Some("event-number") => notification.event_numbers.extend(number(part)),
                            Some("focus") => {
                                if let Some(reference) =
                                    part["valueReference"]["reference"].as_str()
                                {
                                    focus(reference);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(notification)
    }
}

#[derive(Clone)]
pub struct Receiver {
    pub connector: String,
    pub triggers: mpsc::Sender<Trigger>,
    pub settled: watch::Receiver<Settled>,
    pub resource_types: Arc<Vec<String>>,
    pub ack_timeout: Duration,
    /// The highest event number seen per subscription.
    pub events: Arc<Mutex<HashMap<String, u64>>>,
}

fn outcome(status: StatusCode, code: &str, text: &str) -> Response {
    let body = json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]});
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

impl Receiver {
    /// Which resource types to read for this notification (none: answer at once).
    fn types_to_read(&self, notification: &Notification) -> Vec<String> {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = events.get(&notification.subscription).copied();
        let first = notification.event_numbers.iter().min().copied();
        let reported = notification
            .event_numbers
            .iter()
            .max()
            .copied()
            .into_iter()
            .chain(notification.events_since_start)
            .max();
        if let Some(reported) = reported {
            let entry = events.entry(notification.subscription.clone()).or_insert(0);
            *entry = (*entry).max(reported);
        }
        // Events this receiver never saw: a lost notification, or the receiver was down.
        let gap = match (seen, notification.kind) {
            (Some(seen), Kind::Heartbeat) => {
                notification.events_since_start.is_some_and(|n| n > seen)
            }
            (Some(seen), Kind::Event) => first.is_some_and(|first| first > seen + 1),
            _ => false,
        };
        if gap {
            tracing::info!(connector = %self.connector, subscription = %notification.subscription, seen = seen.unwrap_or(0), reported = reported.unwrap_or(0), "events missed; reading every resource type");
            return self.resource_types.to_vec();
        }
        match notification.kind {
            Kind::Event if notification.focus_types.is_empty() => self.resource_types.to_vec(),
            Kind::Event => notification
                .focus_types
                .iter()
                .filter(|t| self.resource_types.contains(t))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Asks the task to read `types` and waits until what it emitted is settled.
    async fn read_and_wait(&self, types: Vec<String>) -> Result<(), &'static str> {
        let before = *self.settled.borrow();
        let (reply, answer) = oneshot::channel();
        self.triggers
            .send(Trigger { types, reply })
            .await
            .map_err(|_| "the task is stopping")?;
        let mut settled = self.settled.clone();
        let wait = async {
            let target = answer.await.map_err(|_| "the task did not read")?;
            let state = settled
                .wait_for(|state| state.settled >= target || state.failures > before.failures)
                .await
                .map_err(|_| "the task is stopping")?;
            if state.failures > before.failures {
                Err("a record was not written to Kafka")
            } else {
                Ok(())
            }
        };
        tokio::time::timeout(self.ack_timeout, wait)
            .await
            .map_err(|_| "the records were not durable within fhir.ack.timeout.ms")?
    }
}

pub async fn notify(State(receiver): State<Receiver>, body: Bytes) -> Response {
    let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
        return outcome(StatusCode::BAD_REQUEST, "invalid", "not JSON");
    };
    let Some(notification) = Notification::parse(&bundle) else {
        return outcome(
            StatusCode::BAD_REQUEST,
            "invalid",
            "not a subscription notification Bundle",
        );
    };
    let types = receiver.types_to_read(&notification);
    tracing::debug!(connector = %receiver.connector, kind = ?notification.kind, subscription = %notification.subscription, events = ?notification.event_numbers, types = ?types, "notification");
    if types.is_empty() {
        return StatusCode::OK.into_response();
    }
    match receiver.read_and_wait(types).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(reason) => {
            tracing::warn!(connector = %receiver.connector, subscription = %notification.subscription, reason, "notification answered 503: the server will send it again");
            outcome(StatusCode::SERVICE_UNAVAILABLE, "transient", reason)
        }
    }
}

pub fn router(receiver: Receiver) -> axum::Router {
    axum::Router::new()
        .fallback(axum::routing::post(notify))
        .with_state(receiver)
}

/// The Subscription (R4 Backport IG) of `spec`, status requested.
pub fn subscription_resource(spec: &crate::config::SubscriptionSpec, connector: &str) -> Value {
    const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
    json!({
        "resourceType": "Subscription",
        "id": spec.id,
        "status": "requested",
        "reason": format!("medconnect connector {connector}"),
        "criteria": spec.topic,
        "channel": {
            "type": "rest-hook",
            "endpoint": spec.endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": spec.content}]},
            "extension": [{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": spec.heartbeat_seconds}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (Receiver, mpsc::Receiver<Trigger>) {
        let (triggers, rx) = mpsc::channel(4);
        let (_tx, settled) = watch::channel(Settled::default());
        (
            Receiver {
                connector: "c".into(),
                triggers,
                settled,
                resource_types: Arc::new(vec!["Patient".into(), "Observation".into()]),
                ack_timeout: Duration::from_secs(1),
                events: Arc::default(),
            },
            rx,
        )
    }

    fn event(numbers: &[u64], since: u64, focus: &str) -> Value {
        let events: Vec<Value> = numbers
            .iter()
            .map(|n| {
                json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": n.to_string()},
                {"name": "focus", "valueReference": {"reference": focus}}]})
            })
            .collect();
        let mut parameters = vec![
            json!({"name": "subscription", "valueReference": {"reference": "Subscription/s"}}),
            json!({"name": "type", "valueCode": "event-notification"}),
            json!({"name": "events-since-subscription-start", "valueString": since.to_string()}),
        ];
        parameters.extend(events);
        json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Parameters", "parameter": parameters}}]})
    }

    #[test]
    fn events_read_their_focus_types_and_gaps_read_everything() {
        let (receiver, _rx) = receiver();
        let first = Notification::parse(&event(&[1], 1, "Patient/p1")).expect("parsed");
        assert_eq!(receiver.types_to_read(&first), ["Patient"]);
        let next =
            Notification::parse(&event(&[2], 2, "http://h/fhir/Observation/o1")).expect("parsed");
        assert_eq!(receiver.types_to_read(&next), ["Observation"]);
        // Events 3 and 4 never came.
        let after_gap = Notification::parse(&event(&[5], 5, "Patient/p2")).expect("parsed");
        assert_eq!(
            receiver.types_to_read(&after_gap),
            ["Patient", "Observation"]
        );
        let heartbeat = json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "Subscription/s"}},
            {"name": "type", "valueCode": "heartbeat"},
            {"name": "events-since-subscription-start", "valueString": "5"}]}}]});
        assert!(
            receiver
                .types_to_read(&Notification::parse(&heartbeat).expect("parsed"))
                .is_empty()
        );
        let behind = heartbeat.to_string().replace("\"5\"", "\"7\"");
        let behind: Value = serde_json::from_str(&behind).expect("json");
        assert_eq!(
            receiver
                .types_to_read(&Notification::parse(&behind).expect("parsed"))
                .len(),
            2
        );
        let other = Notification::parse(&event(&[1], 1, "Encounter/e1")).expect("parsed");
        assert!(
            receiver.types_to_read(&other).is_empty(),
            "not a type of this connector"
        );
    }
}
