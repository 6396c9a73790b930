//! PostgreSQL stopped in the middle of a stream and started again: the sink's writes fail as
//! retriable (the engine puts the same batch again), then catch up with nothing lost and
//! nothing written twice. This test stops its server, so it has one of its own.

mod support;

use std::time::{Duration, Instant};

use medconnect_api::{ConnectError, SinkTask};
use support::*;

#[tokio::test]
async fn a_restarted_server_gets_every_record_once_after_retriable_errors() {
    let mut server = PgServer::start();
    let url = server.database("restart").await;
    let (mut task, mut errant) = sink_task(
        &url,
        &[
            ("pk.mode", "kafka"),
            ("insert.mode", "upsert"),
            ("auto.create", "true"),
            ("batch.size", "500"),
            ("connection.timeout.ms", "500"),
        ],
    );
    task.start().await.expect("start");
    let records: Vec<_> = (0..5000)
        .map(|n| {
            record(
                "stream",
                n,
                None,
                Some(&format!(r#"{{"seq":{n},"hr":{}}}"#, 60 + n % 40)),
            )
        })
        .collect();
    let batches: Vec<_> = records.chunks(500).map(<[_]>::to_vec).collect();
    for batch in &batches[..4] {
        task.put(batch.clone()).await.expect("put");
    }
    task.flush().await.expect("flush");
    assert_eq!(count(&url, "SELECT count(*) FROM stream").await, 2000);

    server.stop();
    // The engine's retries: the same batch, until it goes through.
    let mut retriable = 0;
    for (n, batch) in batches[4..].iter().enumerate() {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match task.put(batch.clone()).await {
                Ok(()) => break,
                Err(error @ ConnectError::Retriable(_)) => {
                    retriable += 1;
                    assert!(Instant::now() < deadline, "still failing: {error}");
                    // Down for a few attempts, then back on the same port.
                    if n == 0 && retriable == 3 {
                        server.run();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(other) => panic!("not retriable: {other:?}"),
            }
        }
    }
    task.flush().await.expect("flush");
    task.stop().await.expect("stop");
    assert!(retriable >= 3, "{retriable} retriable errors");
    assert!(drain(&mut errant).is_empty());
    assert_eq!(count(&url, "SELECT count(*) FROM stream").await, 5000);
    assert_eq!(
        count(
            &url,
            "SELECT count(DISTINCT seq) FROM stream WHERE seq = __connect_offset"
        )
        .await,
        5000
    );
}
