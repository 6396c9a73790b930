//! The CDC source against a real PostgreSQL 15 (`wal_level=logical`): the initial snapshot
//! then inserts, updates and deletes in commit order; the slot's `confirmed_flush_lsn` moving
//! only to stored offsets; heartbeats moving an idle slot; a restart inside a transaction; a
//! dropped slot failing the task. The engine is played by the test: it stores the offsets of
//! the records it chooses and calls `commit` with them.

mod support;

use std::time::Duration;

use medconnect_api::{ConnectError, SourceRecord, SourceTask};
use medconnect_postgres::PostgresCdcSourceTask;
use serde_json::{Value, json};
use support::{
    DEADLINE, MemoryOffsets, count, execute, poll_for, poll_until, shared, source_context,
    value_json,
};

fn cdc_task(
    url: &str,
    slot: &str,
    offsets: &MemoryOffsets,
    extra: &[(&str, &str)],
) -> PostgresCdcSourceTask {
    let mut pairs = vec![
        ("slot.name", slot),
        ("publication.name", "medconnect_pub"),
        ("table.include", "public.patients"),
        ("topic.prefix", "ehr"),
        ("status.interval.ms", "100"),
        ("heartbeat.interval.ms", "0"),
    ];
    pairs.extend_from_slice(extra);
    PostgresCdcSourceTask::new(source_context(url, &pairs, offsets)).expect("a valid task config")
}

const PATIENTS: &str =
    "CREATE TABLE patients (id int PRIMARY KEY, name text, score numeric, tags jsonb)";

fn changes(records: &[SourceRecord]) -> Vec<&SourceRecord> {
    records
        .iter()
        .filter(|r| r.record.topic == "ehr.public.patients")
        .collect()
}

fn op(record: &SourceRecord) -> String {
    match &record.record.value {
        None => "tombstone".into(),
        Some(_) => value_json(record)["op"].as_str().unwrap_or("?").to_string(),
    }
}

fn key(record: &SourceRecord) -> Value {
    record
        .record
        .key
        .as_ref()
        .and_then(|k| serde_json::from_slice(k).ok())
        .unwrap_or(Value::Null)
}

fn lsn_of(record: &SourceRecord) -> u64 {
    record.source_offset["lsn"]
        .as_u64()
        .expect("an lsn in the offset")
}

/// Polls until `want` change records of the patients table came (heartbeats aside).
async fn poll_changes(task: &mut PostgresCdcSourceTask, want: usize) -> Vec<SourceRecord> {
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut got: Vec<SourceRecord> = Vec::new();
    while changes(&got).len() < want {
        assert!(
            tokio::time::Instant::now() < until,
            "only {} of {want} changes",
            changes(&got).len()
        );
        got.extend(poll_until(task, 1, DEADLINE).await);
    }
    got
}

async fn confirmed_flush(url: &str, slot: &str) -> u64 {
    let text = count_text(
        url,
        &format!("SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::text FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
    .await;
    text.parse().expect("an LSN")
}

async fn count_text(url: &str, sql: &str) -> String {
    let mut connection = support::connect(url).await;
    let text: String = sqlx::query_scalar(sql)
        .fetch_one(&mut connection)
        .await
        .expect("query");
    text
}

/// Waits until the server received a standby status update from the slot's session sent
/// after now: the session had its chance to confirm whatever it was told.
async fn a_status_update_later(url: &str, slot: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
         WHERE s.slot_name = '{slot}' AND r.reply_time > now()"
    );
    let started = count_text(url, "SELECT now()::text").await;
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let sql = sql.replace("now()", &format!("'{started}'::timestamptz"));
        if count(url, &sql).await == 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no status update from the slot's session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_then_inserts_updates_and_deletes_stream_in_commit_order() {
    let url = shared().database("cdc_order").await;
    execute(&url, PATIENTS).await;
    execute(&url, "INSERT INTO patients VALUES (1, 'Ada', 7.5, '{\"ward\": \"icu\"}'), (2, 'Ben', NULL, NULL)").await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(&url, "cdc_order", &offsets, &[]);
    task.start().await.expect("start");
    // The snapshot (two reads), then the heartbeat that marks it complete.
    let snapshot = poll_until(&mut task, 3, DEADLINE).await;
    assert_eq!(snapshot[..2].iter().map(op).collect::<Vec<_>>(), ["r", "r"]);
    assert_eq!(snapshot[2].record.topic, "__medconnect-heartbeat.ehr");
    let ada = value_json(&snapshot[0]);
    assert_eq!(
        ada["after"],
        json!({"id": 1, "name": "Ada", "score": 7.5, "tags": {"ward": "icu"}})
    );
    assert_eq!(ada["source"]["snapshot"], true);
    assert_eq!(key(&snapshot[0]), json!({"id": 1}));

    execute(&url, "INSERT INTO patients VALUES (3, 'Cy', 1, '[]')").await;
    execute(&url, "BEGIN; UPDATE patients SET name = 'Ada L.' WHERE id = 1; INSERT INTO patients VALUES (4, 'Di', 2, NULL); COMMIT").await;
    execute(&url, "DELETE FROM patients WHERE id = 2").await;
    let streamed = poll_changes(&mut task, 5).await;
    let streamed: Vec<&SourceRecord> = changes(&streamed);
    assert_eq!(
        streamed.iter().map(|r| op(r)).collect::<Vec<_>>(),
        ["c", "u", "c", "d", "tombstone"]
    );
    assert_eq!(
        streamed.iter().map(|r| key(r)).collect::<Vec<_>>(),
        [
            json!({"id": 3}),
            json!({"id": 1}),
            json!({"id": 4}),
            json!({"id": 2}),
            json!({"id": 2})
        ]
    );
    let update = value_json(streamed[1]);
    assert_eq!(update["after"]["name"], "Ada L.");
    assert_eq!(
        update["before"],
        Value::Null,
        "default replica identity: no old row"
    );
    let delete = value_json(streamed[3]);
    assert_eq!(delete["before"], json!({"id": 2}));
    assert_eq!(delete["after"], Value::Null);
    assert_eq!(delete["source"]["table"], "patients");
    // source.lsn grows, and the update and the insert share their transaction.
    let lsns: Vec<u64> = streamed[..4]
        .iter()
        .map(|r| value_json(r)["source"]["lsn"].as_u64().expect("source.lsn"))
        .collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
    assert_eq!(
        value_json(streamed[1])["source"]["txId"],
        value_json(streamed[2])["source"]["txId"]
    );
    // Offsets: the update is not its transaction's last (its commit LSN), the insert is.
    assert_eq!(
        streamed[1].source_offset["lsn"],
        streamed[1].source_offset["txn"]
    );
    assert!(lsn_of(streamed[2]) > lsn_of(streamed[1]));
    assert!(
        poll_for(&mut task, Duration::from_millis(300))
            .await
            .is_empty()
    );
    task.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_confirmed_only_up_to_the_stored_offsets() {
    let url = shared().database("cdc_confirm").await;
    execute(&url, PATIENTS).await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(&url, "cdc_confirm", &offsets, &[]);
    task.start().await.expect("start");
    let heartbeat = poll_until(&mut task, 1, DEADLINE).await;
    let consistent = lsn_of(&heartbeat[0]);
    for id in 1..=3 {
        execute(&url, &format!("INSERT INTO patients (id) VALUES ({id})")).await;
    }
    let polled = poll_changes(&mut task, 3).await;
    let inserts: Vec<&SourceRecord> = changes(&polled);
    // Nothing stored: the session reports, and the slot stays where it was created.
    a_status_update_later(&url, "cdc_confirm").await;
    assert!(confirmed_flush(&url, "cdc_confirm").await <= consistent);

    for (stored, record) in inserts.iter().enumerate() {
        let batch: Vec<SourceRecord> = vec![SourceRecord::new(
            record.record.clone(),
            record.source_partition.clone(),
            record.source_offset.clone(),
        )];
        let newly = offsets.store(&batch);
        task.commit(&newly).await.expect("commit");
        let want = lsn_of(record);
        let until = tokio::time::Instant::now() + DEADLINE;
        while confirmed_flush(&url, "cdc_confirm").await != want {
            assert!(
                tokio::time::Instant::now() < until,
                "slot not confirmed at insert {stored}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a_status_update_later(&url, "cdc_confirm").await;
        assert_eq!(
            confirmed_flush(&url, "cdc_confirm").await,
            want,
            "never past the stored offset"
        );
        if let Some(next) = inserts.get(stored + 1) {
            assert!(want < lsn_of(next));
        }
    }
    task.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_move_an_idle_slot_past_wal_written_for_other_tables() {
    let url = shared().database("cdc_idle").await;
    execute(&url, PATIENTS).await;
    execute(&url, "CREATE TABLE audit (n int)").await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(
        &url,
        "cdc_idle",
        &offsets,
        &[("heartbeat.interval.ms", "200")],
    );
    task.start().await.expect("start");
    let first = poll_until(&mut task, 1, DEADLINE).await;
    let newly = offsets.store(&first);
    task.commit(&newly).await.expect("commit");
    let before = confirmed_flush(&url, "cdc_idle").await;

    // WAL for a table outside the publication: no change for the connector.
    execute(&url, "INSERT INTO audit SELECT generate_series(1, 1000)").await;
    let written: u64 = count_text(&url, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::text")
        .await
        .parse()
        .expect("an LSN");
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut heartbeats = 0;
    loop {
        let polled = poll_for(&mut task, Duration::from_millis(300)).await;
        assert!(
            changes(&polled).is_empty(),
            "no change record for another table"
        );
        heartbeats += polled.len();
        let newly = offsets.store(&polled);
        task.commit(&newly).await.expect("commit");
        if confirmed_flush(&url, "cdc_idle").await >= written {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the idle slot did not move past {written}"
        );
    }
    assert!(heartbeats >= 1);
    assert!(confirmed_flush(&url, "cdc_idle").await > before);
    task.stop().await.expect("stop");
}

/// A restart with offsets stored through the second change of a four-change transaction:
/// the new task gets exactly the third and fourth, then what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_inside_a_transaction_resumes_after_the_stored_change() {
    let url = shared().database("cdc_restart").await;
    execute(&url, PATIENTS).await;
    let offsets = MemoryOffsets::default();
    let mut first = cdc_task(&url, "cdc_restart", &offsets, &[]);
    first.start().await.expect("start");
    let heartbeat = poll_until(&mut first, 1, DEADLINE).await;
    let newly = offsets.store(&heartbeat);
    first.commit(&newly).await.expect("commit");
    execute(&url, "INSERT INTO patients (id) VALUES (1)").await;
    execute(
        &url,
        "BEGIN; INSERT INTO patients (id) VALUES (2), (3), (4), (5); COMMIT",
    )
    .await;
    let polled = poll_changes(&mut first, 5).await;
    let inserts: Vec<SourceRecord> = changes(&polled)
        .into_iter()
        .map(|r| {
            SourceRecord::new(
                r.record.clone(),
                r.source_partition.clone(),
                r.source_offset.clone(),
            )
        })
        .collect();
    let newly = offsets.store(&inserts[..3]);
    first.commit(&newly).await.expect("commit");
    // Crash: the session goes without a word.
    drop(first);

    let mut second = cdc_task(&url, "cdc_restart", &offsets, &[]);
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match second.start().await {
            Ok(()) => break,
            // The crashed session's walsender may still hold the slot a moment.
            Err(error) if error.is_retriable() && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("start: {error}"),
        }
    }
    execute(&url, "INSERT INTO patients (id) VALUES (6)").await;
    let again = poll_changes(&mut second, 3).await;
    let ids: Vec<Value> = changes(&again)
        .iter()
        .map(|r| key(r)["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!(4), json!(5), json!(6)],
        "exactly the changes not stored"
    );
    second.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_fails_the_task_with_the_reason() {
    let url = shared().database("cdc_lost").await;
    execute(&url, PATIENTS).await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(&url, "cdc_lost", &offsets, &[]);
    task.start().await.expect("start");
    let heartbeat = poll_until(&mut task, 1, DEADLINE).await;
    let newly = offsets.store(&heartbeat);
    task.commit(&newly).await.expect("commit");

    execute(&url, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'cdc_lost'").await;
    let until = tokio::time::Instant::now() + DEADLINE;
    while count(&url, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_lost' AND active_pid IS NULL").await != 1 {
        assert!(tokio::time::Instant::now() < until, "walsender still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    execute(&url, "SELECT pg_drop_replication_slot('cdc_lost')").await;
    let error = loop {
        match task.poll().await {
            Ok(_) => {}
            Err(error) if error.is_retriable() => {}
            Err(error) => break error,
        }
        assert!(tokio::time::Instant::now() < until, "no task error");
    };
    assert!(matches!(error, ConnectError::Fatal(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("\"cdc_lost\" does not exist"), "{message}");
    task.stop().await.expect("stop");

    // A new task with the offsets stored refuses to start rather than re-create the slot.
    let mut again = cdc_task(&url, "cdc_lost", &offsets, &[]);
    let error = again
        .start()
        .await
        .expect_err("a missing slot with stored offsets");
    assert!(
        error
            .to_string()
            .contains("does not exist although offsets are stored"),
        "{error}"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_lost'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_names_a_user_without_the_replication_attribute() {
    use medconnect_api::Connector;
    let url = shared().database("cdc_validate").await;
    execute(&url, "DROP ROLE IF EXISTS plain; CREATE ROLE plain LOGIN").await;
    let config = |user: &str| {
        support::props(&[
            ("connection.url", &url),
            ("connection.user", user),
            ("slot.name", "cdc_validate"),
            ("publication.name", "p"),
            ("topic.prefix", "ehr"),
        ])
    };
    let connector = medconnect_postgres::PostgresCdcSourceConnector;
    match connector.validate(&config("plain")).await {
        Err(ConnectError::Config { field, reason }) => {
            assert_eq!(field, "connection.user");
            assert!(reason.contains("REPLICATION"), "{reason}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    connector
        .validate(&config("medconnect"))
        .await
        .expect("a superuser on a wal_level=logical server");
}

/// A slot the server invalidated (its WAL removed past `max_slot_wal_keep_size`) while the
/// connector was stopped: the next start is a task error saying so, on a server of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_fails_the_start_with_the_reason() {
    let server = support::PgServer::start_with(|_| "-c max_slot_wal_keep_size=1MB".into());
    let url = server.database("cdc_invalidated").await;
    execute(&url, PATIENTS).await;
    let offsets = MemoryOffsets::default();
    let mut first = cdc_task(&url, "cdc_invalidated", &offsets, &[]);
    first.start().await.expect("start");
    let heartbeat = poll_until(&mut first, 1, DEADLINE).await;
    let newly = offsets.store(&heartbeat);
    first.commit(&newly).await.expect("commit");
    first.stop().await.expect("stop");

    // WAL past the limit, segments switched and a checkpoint to remove them.
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        execute(
            &url,
            "CREATE TABLE IF NOT EXISTS filler (n int, pad text); \
             INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g; \
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await;
        let lost = count(
            &url,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cdc_invalidated' AND wal_status = 'lost'",
        )
        .await;
        if lost == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the slot was never invalidated"
        );
    }
    let mut second = cdc_task(&url, "cdc_invalidated", &offsets, &[]);
    match second.start().await {
        Err(ConnectError::Fatal(detail)) => {
            assert!(
                detail.contains("\"cdc_invalidated\" is invalidated"),
                "{detail}"
            );
            assert!(detail.contains("max_slot_wal_keep_size"), "{detail}");
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

fn of_table<'a>(records: &'a [SourceRecord], table: &str) -> Vec<&'a SourceRecord> {
    let topic = format!("ehr.public.{table}");
    records.iter().filter(|r| r.record.topic == topic).collect()
}

/// Polls until `want` records of `table` came.
async fn poll_table(
    task: &mut PostgresCdcSourceTask,
    table: &str,
    want: usize,
) -> Vec<SourceRecord> {
    let until = tokio::time::Instant::now() + DEADLINE;
    let mut got: Vec<SourceRecord> = Vec::new();
    while of_table(&got, table).len() < want {
        assert!(
            tokio::time::Instant::now() < until,
            "only {} of {want} records of {table}",
            of_table(&got, table).len()
        );
        got.extend(poll_until(task, 1, DEADLINE).await);
    }
    got.retain(|r| r.record.topic == format!("ehr.public.{table}"));
    got
}

/// Values read by the snapshot and streamed look the same; an unchanged TOASTed value is left
/// out of `after`; a changed primary key is a delete (and tombstone) of the old key then a
/// create; `REPLICA IDENTITY FULL` gives updates their whole old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_toast_key_changes_and_full_replica_identity() {
    let url = shared().database("cdc_values").await;
    execute(
        &url,
        "CREATE TABLE typed (id int PRIMARY KEY, weight numeric(5,1), big numeric, ratio float8, \
           flag bool, at timestamptz, doc jsonb, tags text[], note text); \
         CREATE TABLE notes (id int PRIMARY KEY, title text, body text); \
         CREATE TABLE full_t (id int PRIMARY KEY, v text); \
         ALTER TABLE full_t REPLICA IDENTITY FULL; \
         INSERT INTO typed VALUES (1, 7.5, 12345678901234567890.123, 'NaN', true, \
           '2024-05-01 10:00:00+00', '{\"ward\": [\"icu\"]}', '{a,b}', NULL);",
    )
    .await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(
        &url,
        "cdc_values",
        &offsets,
        &[("table.include", "public.typed,public.notes,public.full_t")],
    );
    task.start().await.expect("start");
    let read = poll_table(&mut task, "typed", 1).await;
    execute(
        &url,
        "INSERT INTO typed VALUES (2, 7.5, 12345678901234567890.123, 'NaN', true, \
           '2024-05-01 10:00:00+00', '{\"ward\": [\"icu\"]}', '{a,b}', NULL)",
    )
    .await;
    let streamed = poll_table(&mut task, "typed", 1).await;
    let mut snapshot_row = value_json(&read[0])["after"].clone();
    let mut stream_row = value_json(&streamed[0])["after"].clone();
    assert_eq!(snapshot_row["id"], 1);
    snapshot_row["id"] = json!(0);
    stream_row["id"] = json!(0);
    assert_eq!(
        snapshot_row, stream_row,
        "a row read and a row streamed look the same"
    );
    assert_eq!(
        stream_row,
        json!({"id": 0, "weight": 7.5, "big": "12345678901234567890.123", "ratio": "NaN",
               "flag": true, "at": "2024-05-01 10:00:00+00", "doc": {"ward": ["icu"]},
               "tags": "{a,b}", "note": null})
    );

    // A body stored out of line (96 kB of hex digits do not compress below 2 kB).
    execute(
        &url,
        "INSERT INTO notes SELECT 1, 'draft', string_agg(md5(g::text), '') FROM generate_series(1, 3000) g; \
         UPDATE notes SET title = 'final' WHERE id = 1; \
         UPDATE notes SET id = 2 WHERE id = 1;",
    )
    .await;
    let notes = poll_table(&mut task, "notes", 5).await;
    assert_eq!(
        notes.iter().map(op).collect::<Vec<_>>(),
        ["c", "u", "d", "tombstone", "c"]
    );
    let inserted = value_json(&notes[0]);
    assert_eq!(
        inserted["after"]["body"].as_str().map(str::len),
        Some(96_000)
    );
    let retitled = value_json(&notes[1]);
    assert_eq!(retitled["after"]["title"], "final");
    assert!(
        retitled["after"].get("body").is_none(),
        "an unchanged TOASTed value is left out"
    );
    assert_eq!(key(&notes[2]), json!({"id": 1}));
    assert_eq!(key(&notes[3]), json!({"id": 1}));
    assert_eq!(key(&notes[4]), json!({"id": 2}));
    assert_eq!(value_json(&notes[2])["before"], json!({"id": 1}));

    execute(
        &url,
        "INSERT INTO full_t VALUES (1, 'old'); UPDATE full_t SET v = 'new'",
    )
    .await;
    let full = poll_table(&mut task, "full_t", 2).await;
    let update = value_json(&full[1]);
    assert_eq!(update["before"], json!({"id": 1, "v": "old"}));
    assert_eq!(update["after"], json!({"id": 1, "v": "new"}));
    task.stop().await.expect("stop");
}

/// A table without a primary key or replica identity is never published: its UPDATEs and
/// DELETEs would fail for every application. The start says which table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_replica_identity_is_not_published() {
    let url = shared().database("cdc_identity").await;
    execute(
        &url,
        "CREATE TABLE loose (n int, note text); CREATE TABLE patients (id int PRIMARY KEY)",
    )
    .await;
    let offsets = MemoryOffsets::default();
    let mut task = cdc_task(
        &url,
        "cdc_identity",
        &offsets,
        &[("table.include", "public.patients,public.loose")],
    );
    match task.start().await {
        Err(ConnectError::Config { field, reason }) => {
            assert_eq!(field, "table.include");
            assert!(
                reason.contains("loose") && !reason.contains("patients"),
                "{reason}"
            );
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    assert_eq!(count(&url, "SELECT count(*) FROM pg_publication").await, 0);
    execute(&url, "UPDATE loose SET note = 'still writable'").await;
}
