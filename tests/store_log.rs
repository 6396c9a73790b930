//! The compacted-log store the config, offset and status stores stand on, against the
//! embedded broker: a writer applies its own record at once when nothing before it is unread,
//! and the reader, fetching it later, must not apply it again; records of another writer
//! (another worker) are applied by the reader, in log order.

use std::sync::{Arc, Mutex};

use medconnect_e2e::{TestCluster, eventually};
use medconnect_runtime::kafka::{KafkaSettings, TopicSpec, ensure_topics};
use medconnect_runtime::store::KafkaLog;

type Applied = Arc<Mutex<Vec<(String, Option<String>)>>>;

async fn open(settings: &KafkaSettings, topic: &str) -> anyhow::Result<(KafkaLog, Applied)> {
    let applied: Applied = Arc::default();
    let sink = applied.clone();
    let log = KafkaLog::open(
        settings,
        topic,
        Box::new(move |key, value| {
            sink.lock().expect("lock").push((
                String::from_utf8_lossy(key).into_owned(),
                value.map(|v| String::from_utf8_lossy(v).into_owned()),
            ));
        }),
    )
    .await?;
    Ok((log, applied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_applied_once_in_log_order_by_whichever_applier_comes_first()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let settings = KafkaSettings::new(&cluster.bootstrap());
    ensure_topics(&settings, &[TopicSpec::compacted("store-log", 1, 1)]).await?;
    let (mine, applied) = open(&settings, "store-log").await?;
    let (other, _) = open(&settings, "store-log").await?;

    // Own writes, one by one and in batches, visible once each call returns.
    for n in 0..20 {
        mine.write(format!("own-{n}").as_bytes(), Some(b"v"))
            .await?;
        assert_eq!(
            applied.lock().expect("lock").last().map(|(k, _)| k.clone()),
            Some(format!("own-{n}")),
            "a write returns once its record is applied"
        );
    }
    let batch: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..20)
        .map(|n| (format!("batch-{n}").into_bytes(), Some(b"v".to_vec())))
        .collect();
    mine.write_all(&batch).await?;
    mine.write(b"gone", None).await?;
    // Another writer's records reach this store through its reader only, after every own
    // record was fetched too: had the reader applied those again, they would show twice.
    for n in 0..5 {
        other
            .write(format!("other-{n}").as_bytes(), Some(b"v"))
            .await?;
    }
    eventually("the other writer's records applied", async || {
        (applied.lock().ok()?.len() >= 46).then_some(())
    })
    .await?;
    mine.read_to_end().await?;
    let keys: Vec<String> = applied
        .lock()
        .expect("lock")
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    let expected: Vec<String> = (0..20)
        .map(|n| format!("own-{n}"))
        .chain((0..20).map(|n| format!("batch-{n}")))
        .chain(["gone".to_string()])
        .chain((0..5).map(|n| format!("other-{n}")))
        .collect();
    assert_eq!(keys, expected, "each record once, in log order");
    assert_eq!(applied.lock().expect("lock")[40].1, None, "a tombstone");
    assert_eq!(mine.position(0), 46);
    Ok(())
}
