//! PUBACKs, sent only for records whose delivery the engine has settled.
//!
//! Each QoS 1 message waits here for its record's [`Delivery`]. Rules:
//! - `Written` (in Kafka), `DeadLettered` (in the dead-letter topic), `Filtered` (a transform
//!   dropped it on purpose): durable or settled, so PUBACK;
//! - `Rejected` (Kafka refuses the record itself, no dead-letter topic): sending it again
//!   would be refused again, forever, and would hold one of the broker's in-flight slots; the
//!   engine has logged it with the reason: PUBACK;
//! - `Failed`, or a handle dropped unanswered (Kafka unreachable, task stopping): no PUBACK,
//!   so the broker sends the message again on the next connection. An MQTT 3.1.1 broker
//!   resends only then, so a `Failed` record also asks the session to reconnect (with backoff,
//!   persistent sessions only): else the message would hold one of the broker's in-flight
//!   slots until the connection happened to drop.
//!
//! An acknowledgement is sent only on the connection the message arrived on: the broker
//! numbers messages per connection, and after a reconnect it resends what was not
//! acknowledged (with DUP), so an old packet id might name another message by then.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use medconnect_api::Delivery;
use rumqttc::{AsyncClient, Publish};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A QoS 1 message whose PUBACK waits for its record's delivery.
pub struct PendingAck {
    /// The PUBLISH without its payload (only the packet id and QoS matter for the PUBACK).
    pub publish: Publish,
    /// The connection it arrived on.
    pub connection: u64,
    pub delivery: oneshot::Receiver<Delivery>,
}

/// Which connection to the broker is current; bumped whenever one ends or begins.
#[derive(Debug, Default, Clone)]
pub struct ConnectionNumber(Arc<AtomicU64>);

impl ConnectionNumber {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn next(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether a settled delivery earns the message its PUBACK (see the module comment).
pub fn acknowledges(delivery: &Delivery) -> bool {
    match delivery {
        Delivery::Written { .. }
        | Delivery::DeadLettered { .. }
        | Delivery::Filtered
        | Delivery::Rejected { .. } => true,
        Delivery::Failed { .. } => false,
    }
}

/// Waits for deliveries and sends the PUBACKs they earn, until `shutdown`.
pub async fn run(
    client: AsyncClient,
    mut pending: mpsc::Receiver<PendingAck>,
    connection: ConnectionNumber,
    resend: mpsc::Sender<u64>,
    shutdown: CancellationToken,
) {
    let mut waiting = FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            next = pending.recv() => match next {
                Some(ack) => waiting.push(async move {
                    let delivery = ack.delivery.await;
                    (ack.publish, ack.connection, delivery)
                }),
                None => break,
            },
            Some((publish, arrived_on, delivery)) = waiting.next(), if !waiting.is_empty() => {
                let failed = matches!(delivery, Ok(Delivery::Failed { .. }));
                settle(&client, &publish, arrived_on, delivery, &connection);
                if failed && arrived_on == connection.current() {
                    // One request per connection is enough: the reconnect resends every
                    // unacknowledged message (the session ignores requests for a connection
                    // it has already replaced).
                    let _ = resend.try_send(arrived_on);
                }
            }
        }
    }
}

fn settle(
    client: &AsyncClient,
    publish: &Publish,
    arrived_on: u64,
    delivery: Result<Delivery, oneshot::error::RecvError>,
    connection: &ConnectionNumber,
) {
    let earned = match &delivery {
        Ok(delivery) => acknowledges(delivery),
        Err(_) => false,
    };
    if !earned {
        tracing::debug!(pkid = publish.pkid, topic = %publish.topic, "not durable: no PUBACK, the broker will send it again");
        return;
    }
    if let Ok(Delivery::Rejected { reason }) = &delivery {
        tracing::warn!(topic = %publish.topic, %reason, "Kafka refused the record and there is no dead-letter topic: acknowledged so the broker does not resend it forever");
    }
    if arrived_on != connection.current() {
        tracing::debug!(
            pkid = publish.pkid,
            "the connection it came on is gone: the broker resends it"
        );
        return;
    }
    // The request channel holds more than the broker's in-flight window, so it is full only
    // when the event loop is stuck; then the broker resends after the reconnect.
    if let Err(error) = client.try_ack(publish) {
        tracing::warn!(pkid = publish.pkid, %error, "PUBACK not queued: the broker will send the message again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_settled_deliveries_earn_a_puback() {
        let written = Delivery::Written {
            topic: "t".into(),
            partition: 0,
            offset: 1,
        };
        assert!(acknowledges(&written));
        assert!(acknowledges(&Delivery::DeadLettered { reason: "r".into() }));
        assert!(acknowledges(&Delivery::Filtered));
        assert!(!acknowledges(&Delivery::Failed { reason: "r".into() }));
    }
}
