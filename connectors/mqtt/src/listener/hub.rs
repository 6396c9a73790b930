//! Messages to devices connected to a listener (commands, alarms): each running listener task
//! registers its hub under its connector name in this process; the sink with
//! `mqtt.sink.target=listener` finds it by that name and hands each message to the
//! connections whose subscriptions match its topic. Both live in this crate, so the engine
//! knows nothing of it; a hub only reaches devices connected to this worker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};

use bytes::Bytes;
use medconnect_api::relay;
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::subscriptions;

/// A running listener's hub, and its answer to other workers' sinks.
struct Registered {
    hub: Weak<Hub>,
    /// Withdrawn with the hub: another worker's sink then finds no listener here.
    _relay: relay::Serving,
}

/// Listener hubs by connector name.
static HUBS: LazyLock<Mutex<HashMap<String, Registered>>> = LazyLock::new(Default::default);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them (single inserts/removes).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes `hub` the one of listener `connector` (a restarted task replaces its predecessor's),
/// here and for sinks on other workers of the cluster.
pub fn register(connector: &str, hub: &Arc<Hub>) {
    let relay = crate::relay::serve(connector, hub);
    lock(&HUBS).insert(
        connector.to_string(),
        Registered {
            hub: Arc::downgrade(hub),
            _relay: relay,
        },
    );
    hub.changed.notify_waiters();
}

/// Removes `hub` if it is still the one registered for `connector`.
pub fn unregister(connector: &str, hub: &Arc<Hub>) {
    let mut hubs = lock(&HUBS);
    if hubs
        .get(connector)
        .is_some_and(|h| std::ptr::eq(h.hub.as_ptr(), Arc::as_ptr(hub)))
    {
        hubs.remove(connector);
    }
}

/// The hub of listener `connector`, when that listener runs in this process.
pub fn find(connector: &str) -> Option<Arc<Hub>> {
    lock(&HUBS).get(connector).and_then(|h| h.hub.upgrade())
}

/// What became of a message handed to a connection.
#[derive(Debug)]
pub enum Outcome {
    /// The device acknowledged it (QoS 1: PUBACK), or it was written (QoS 0).
    Delivered,
    /// The device refused it (MQTT 5 PUBACK reason >= 0x80): sending it again would not help.
    Refused(String),
}

/// A message for one connection. Dropping `done` unanswered means the connection ended first:
/// the message may not have reached the device.
#[derive(Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub done: oneshot::Sender<Outcome>,
}

/// One connected device that may subscribe.
#[derive(Debug)]
pub struct Link {
    pub client_id: String,
    subscriptions: Mutex<Vec<(String, QoS)>>,
    messages: mpsc::Sender<Message>,
}

impl Link {
    /// The QoS the device gets `topic` with, when one of its subscriptions matches (the
    /// highest granted of those that do).
    fn granted(&self, topic: &str) -> Option<QoS> {
        lock(&self.subscriptions)
            .iter()
            .filter(|(filter, _)| subscriptions::matches(filter, topic))
            .map(|(_, qos)| *qos)
            .max_by_key(|qos| *qos as u8)
    }

    /// Hands `message` to the connection; waits while its queue is full. `Err`: the
    /// connection has ended.
    pub async fn send(&self, message: Message) -> Result<(), Message> {
        self.messages.send(message).await.map_err(|e| e.0)
    }
}

#[derive(Debug, Default)]
pub struct Hub {
    links: Mutex<HashMap<u64, Arc<Link>>>,
    next: AtomicU64,
    /// Woken when a device subscribes or the hub is registered: waiting messages look again.
    changed: Notify,
}

impl Hub {
    /// Registers a connection; its messages arrive on the receiver (at most `capacity`
    /// queued). The link leaves the hub when the guard is dropped.
    pub fn attach(
        self: &Arc<Self>,
        client_id: &str,
        capacity: usize,
    ) -> (Attached, mpsc::Receiver<Message>) {
        let (messages, receiver) = mpsc::channel(capacity.max(1));
        let link = Arc::new(Link {
            client_id: client_id.to_string(),
            subscriptions: Mutex::new(Vec::new()),
            messages,
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.links).insert(id, link.clone());
        (
            Attached {
                hub: self.clone(),
                id,
                link,
            },
            receiver,
        )
    }

    /// Connections with a subscription matching `topic`, and the QoS each gets it with.
    pub fn subscribers(&self, topic: &str) -> Vec<(Arc<Link>, QoS)> {
        lock(&self.links)
            .values()
            .filter_map(|link| link.granted(topic).map(|qos| (link.clone(), qos)))
            .collect()
    }

    /// Resolves at the next subscription (or registration); create it before looking, so
    /// nothing between the look and the wait is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// One round of delivering a message: hands it to every connection subscribed to
    /// `topic` whose device is not in `skip` (they acknowledged it already), then waits for
    /// their outcomes until `deadline`. With no such connection, first waits for one to
    /// subscribe until `wait_for_subscriber`. A device subscribed at QoS 0 gets it at QoS 0.
    pub async fn deliver_round(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        skip: &HashSet<String>,
        wait_for_subscriber: Instant,
        deadline: Instant,
    ) -> Round {
        let targets = loop {
            let changed = self.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let targets: Vec<_> = self
                .subscribers(topic)
                .into_iter()
                .filter(|(link, _)| !skip.contains(&link.client_id))
                .collect();
            if !targets.is_empty() {
                break targets;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(wait_for_subscriber) => return Round::default(),
            }
        };
        let mut round = Round::default();
        let mut waiting = Vec::with_capacity(targets.len());
        for (link, granted) in targets {
            let qos = if granted == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                qos
            };
            let (done, outcome) = oneshot::channel();
            let message = Message {
                topic: topic.to_string(),
                payload: payload.clone(),
                qos,
                done,
            };
            match tokio::time::timeout_at(deadline, link.send(message)).await {
                Ok(Ok(())) => waiting.push((link.client_id.clone(), outcome)),
                // Its connection ended, or its queue stayed full up to the deadline.
                Ok(Err(_)) | Err(_) => round.owed.push(link.client_id.clone()),
            }
        }
        for (client_id, outcome) in waiting {
            match tokio::time::timeout_at(deadline, outcome).await {
                Ok(Ok(Outcome::Delivered)) => round.acknowledged.push(client_id),
                Ok(Ok(Outcome::Refused(reason))) => {
                    round.refused = Some((client_id, reason));
                    return round;
                }
                // The connection ended before the PUBACK, or the deadline came first.
                Ok(Err(_)) | Err(_) => round.owed.push(client_id),
            }
        }
        round
    }
}

/// What one round of delivering a message to one hub's devices came to (also the answer a
/// worker sends back for its hub, see [`crate::relay`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Round {
    /// Devices that acknowledged the message (QoS 1: PUBACK; QoS 0: written).
    pub acknowledged: Vec<String>,
    /// Devices that had it and did not acknowledge it: their connection ended, or the
    /// deadline came first. They get it again when they are back.
    pub owed: Vec<String>,
    /// A device that refused it (MQTT 5 PUBACK reason >= 0x80), and why.
    pub refused: Option<(String, String)>,
}

/// A connection's place in the hub.
#[derive(Debug)]
pub struct Attached {
    hub: Arc<Hub>,
    id: u64,
    link: Arc<Link>,
}

impl Attached {
    /// Adds (or replaces the QoS of) a subscription, and wakes messages waiting for one.
    pub fn subscribe(&self, filter: &str, qos: QoS) {
        {
            let mut subscriptions = lock(&self.link.subscriptions);
            match subscriptions.iter_mut().find(|(f, _)| f == filter) {
                Some(existing) => existing.1 = qos,
                None => subscriptions.push((filter.to_string(), qos)),
            }
        }
        self.hub.changed.notify_waiters();
    }

    /// Whether the subscription existed.
    pub fn unsubscribe(&self, filter: &str) -> bool {
        let mut subscriptions = lock(&self.link.subscriptions);
        let before = subscriptions.len();
        subscriptions.retain(|(f, _)| f != filter);
        subscriptions.len() != before
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        lock(&self.hub.links).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_reach_matching_subscribers_only() {
        let hub = Arc::new(Hub::default());
        register("hub-test", &hub);
        assert!(find("hub-test").is_some());
        let (pump, mut pump_rx) = hub.attach("pump-3", 4);
        let (_monitor, _monitor_rx) = hub.attach("monitor-7", 4);
        pump.subscribe("devices/pump-3/commands", QoS::AtLeastOnce);
        let found = hub.subscribers("devices/pump-3/commands");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0.client_id, "pump-3");
        let (done, _outcome) = oneshot::channel();
        let message = Message {
            topic: "devices/pump-3/commands".into(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            done,
        };
        assert!(found[0].0.send(message).await.is_ok());
        assert!(pump_rx.recv().await.is_some());
        assert!(pump.unsubscribe("devices/pump-3/commands"));
        assert!(hub.subscribers("devices/pump-3/commands").is_empty());
        drop(pump);
        assert_eq!(lock(&hub.links).len(), 1);
        unregister("hub-test", &hub);
        assert!(find("hub-test").is_none());
    }
}
