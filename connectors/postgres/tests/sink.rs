//! The sink against a real PostgreSQL 15 (scripts/postgres-peers), over TCP on 127.0.0.1: the
//! task is driven as the engine drives it (put in batches, flush), errant records collected.

mod support;

use medconnect_api::{ConnectError, Connector, SinkTask};
use medconnect_postgres::PostgresSinkConnector;
use support::*;

fn vitals(count: usize, heart_rate_offset: i64) -> Vec<medconnect_api::SinkRecord> {
    (0..count)
        .map(|n| {
            let value = format!(
                r#"{{"id":{n},"patient":"P{n:05}","hr":{},"temp":36.{},"alarm":{},"obs":{{"spo2":{}}}}}"#,
                60 + (n as i64 % 60) + heart_rate_offset,
                n % 10,
                n % 7 == 0,
                90 + n % 10
            );
            record("vitals", n as i64, None, Some(&value))
        })
        .collect()
}

#[tokio::test]
async fn ten_thousand_records_make_ten_thousand_rows_and_an_upsert_of_them_again_no_more() {
    let url = shared().database("bulk").await;
    let keyed = [
        ("pk.mode", "record_value"),
        ("pk.fields", "id"),
        ("auto.create", "true"),
        ("batch.size", "3000"),
    ];
    let mut insert = keyed.to_vec();
    insert.push(("insert.mode", "insert"));
    let (mut task, mut errant) = sink_task(&url, &insert);
    task.start().await.expect("start");
    put_all(&mut task, &vitals(10_000, 0)).await;
    task.stop().await.expect("stop");
    assert!(drain(&mut errant).is_empty());
    assert_eq!(count(&url, "SELECT count(*) FROM vitals").await, 10_000);
    assert_eq!(
        count(&url, "SELECT count(DISTINCT id) FROM vitals").await,
        10_000
    );

    // The same records again (as after a crash before the commit), heart rates changed:
    // upserted, not added.
    let mut upsert = keyed.to_vec();
    upsert.push(("insert.mode", "upsert"));
    let (mut task, mut errant) = sink_task(&url, &upsert);
    task.start().await.expect("start");
    put_all(&mut task, &vitals(10_000, 1000)).await;
    task.stop().await.expect("stop");
    assert!(drain(&mut errant).is_empty());
    assert_eq!(count(&url, "SELECT count(*) FROM vitals").await, 10_000);
    assert_eq!(
        count(&url, "SELECT count(*) FROM vitals WHERE hr >= 1000").await,
        10_000
    );
    // The inferred types.
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'vitals' AND \
             ((column_name = 'id' AND data_type = 'bigint') OR (column_name = 'patient' AND data_type = 'text') \
             OR (column_name = 'temp' AND data_type = 'double precision') OR (column_name = 'alarm' AND data_type = 'boolean') \
             OR (column_name = 'obs' AND data_type = 'jsonb'))"
        )
        .await,
        5
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM vitals WHERE (obs->>'spo2')::int BETWEEN 90 AND 99"
        )
        .await,
        10_000
    );
}

#[tokio::test]
async fn a_new_field_adds_a_nullable_column_with_auto_evolve_and_is_errant_without() {
    let url = shared().database("evolve").await;
    let settings = [
        ("pk.mode", "kafka"),
        ("insert.mode", "upsert"),
        ("auto.create", "true"),
        ("auto.evolve", "true"),
    ];
    let (mut task, mut errant) = sink_task(&url, &settings);
    task.start().await.expect("start");
    put_all(&mut task, &[record("obs", 0, None, Some(r#"{"hr":80}"#))]).await;
    put_all(
        &mut task,
        &[record("obs", 1, None, Some(r#"{"hr":81,"Spo2 %":97.5}"#))],
    )
    .await;
    assert!(drain(&mut errant).is_empty());
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'obs' \
             AND column_name = 'Spo2 %' AND data_type = 'double precision' AND is_nullable = 'YES'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &url,
            r#"SELECT count(*) FROM obs WHERE "Spo2 %" = 97.5 AND __connect_offset = 1"#
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &url,
            r#"SELECT count(*) FROM obs WHERE "Spo2 %" IS NULL AND __connect_offset = 0"#
        )
        .await,
        1
    );
    task.stop().await.expect("stop");

    // Without auto.evolve, a record with a field the table lacks is errant; the others land.
    let (mut task, mut errant) = sink_task(&url, &settings[..3]);
    task.start().await.expect("start");
    put_all(
        &mut task,
        &[
            record("obs", 2, None, Some(r#"{"hr":82}"#)),
            record("obs", 3, None, Some(r#"{"hr":83,"rr":14}"#)),
        ],
    )
    .await;
    let reports = drain(&mut errant);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].0.kafka_offset, 3);
    assert!(
        reports[0].1.to_string().contains("\"rr\""),
        "{}",
        reports[0].1
    );
    assert_eq!(count(&url, "SELECT count(*) FROM obs").await, 3);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_tombstone_deletes_the_row_of_its_key() {
    let url = shared().database("tombstones").await;
    let (mut task, mut errant) = sink_task(
        &url,
        &[
            ("pk.mode", "record_key"),
            ("insert.mode", "upsert"),
            ("delete.enabled", "true"),
            ("auto.create", "true"),
            ("table.name.format", "patients_${topic}"),
        ],
    );
    task.start().await.expect("start");
    let key = |p: &str| format!(r#"{{"mrn":"{p}"}}"#);
    put_all(
        &mut task,
        &[
            record("adt", 0, Some(&key("P1")), Some(r#"{"name":"Doe"}"#)),
            record("adt", 1, Some(&key("P2")), Some(r#"{"name":"Roe"}"#)),
            record("adt", 2, Some(&key("P3")), Some(r#"{"name":"Poe"}"#)),
        ],
    )
    .await;
    assert_eq!(count(&url, "SELECT count(*) FROM patients_adt").await, 3);
    // P2 deleted in its own batch; P3 deleted and written again within one batch.
    put_all(
        &mut task,
        &[
            record("adt", 3, Some(&key("P2")), None),
            record("adt", 4, Some(&key("P3")), None),
            record("adt", 5, Some(&key("P3")), Some(r#"{"name":"Moe"}"#)),
        ],
    )
    .await;
    assert!(drain(&mut errant).is_empty());
    assert_eq!(count(&url, "SELECT count(*) FROM patients_adt").await, 2);
    assert_eq!(
        count(&url, "SELECT count(*) FROM patients_adt WHERE mrn = 'P2'").await,
        0
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM patients_adt WHERE mrn = 'P3' AND name = 'Moe'"
        )
        .await,
        1
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn only_the_rows_breaking_a_constraint_are_errant_and_the_rest_are_written() {
    let url = shared().database("constraints").await;
    execute(
        &url,
        "CREATE TABLE vitals (id bigint PRIMARY KEY, patient text NOT NULL, \
         hr bigint CONSTRAINT hr_plausible CHECK (hr BETWEEN 0 AND 300))",
    )
    .await;
    let (mut task, mut errant) = sink_task(
        &url,
        &[
            ("pk.mode", "record_value"),
            ("pk.fields", "id"),
            ("insert.mode", "upsert"),
            ("batch.size", "1000"),
        ],
    );
    task.start().await.expect("start");
    let records: Vec<_> = (0..1000)
        .map(|n| {
            let value = match n {
                137 => r#"{"id":137,"patient":"P137","hr":999}"#.to_string(),
                500 => r#"{"id":500,"patient":null,"hr":70}"#.to_string(),
                _ => format!(r#"{{"id":{n},"patient":"P{n}","hr":70}}"#),
            };
            record("vitals", n, None, Some(&value))
        })
        .collect();
    put_all(&mut task, &records).await;
    let reports = drain(&mut errant);
    let offsets: Vec<i64> = reports.iter().map(|(r, _)| r.kafka_offset).collect();
    assert_eq!(offsets, [137, 500]);
    let messages: Vec<String> = reports.iter().map(|(_, e)| e.to_string()).collect();
    assert!(
        matches!(reports[0].1, ConnectError::Data(_))
            && messages[0].contains("23514")
            && messages[0].contains("hr_plausible"),
        "{messages:?}"
    );
    assert!(
        messages[1].contains("23502") && messages[1].contains("patient"),
        "{messages:?}"
    );
    // Values never appear in the reasons.
    assert!(!messages[0].contains("999"), "{messages:?}");
    assert_eq!(count(&url, "SELECT count(*) FROM vitals").await, 998);
    assert_eq!(
        count(&url, "SELECT count(*) FROM vitals WHERE id IN (137, 500)").await,
        0
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn plain_inserts_go_by_copy_and_fall_back_to_isolate_a_refused_row() {
    let url = shared().database("copy").await;
    execute(
        &url,
        "CREATE TABLE readings (device text NOT NULL, note text, \
         hr bigint CONSTRAINT hr_plausible CHECK (hr BETWEEN 0 AND 300))",
    )
    .await;
    let (mut task, mut errant) = sink_task(&url, &[("batch.size", "1000")]);
    task.start().await.expect("start");
    // COPY's special characters travel intact.
    let note = r#""tab\there, backslash \\ and\r\nnewline, \\N""#;
    let batch = |offsets: std::ops::Range<i64>, bad: Option<i64>| -> Vec<_> {
        offsets
            .map(|n| {
                let hr = if Some(n) == bad { 999 } else { 70 };
                let value = format!(r#"{{"device":"D{n}","note":{note},"hr":{hr}}}"#);
                record("readings", n, None, Some(&value))
            })
            .collect()
    };
    put_all(&mut task, &batch(0..1000, None)).await;
    put_all(&mut task, &batch(1000..2000, Some(1500))).await;
    let reports = drain(&mut errant);
    let offsets: Vec<i64> = reports.iter().map(|(r, _)| r.kafka_offset).collect();
    assert_eq!(offsets, [1500]);
    assert_eq!(count(&url, "SELECT count(*) FROM readings").await, 1999);
    assert_eq!(
        count(
            &url,
            r"SELECT count(*) FROM readings WHERE note = E'tab\there, backslash \\ and\r\nnewline, \\N'"
        )
        .await,
        1999
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn timestamps_become_timestamptz_and_hl7_messages_text() {
    let url = shared().database("typed").await;
    let (mut task, mut errant) = sink_task(
        &url,
        &[
            ("pk.mode", "kafka"),
            ("insert.mode", "upsert"),
            ("auto.create", "true"),
            ("auto.create.timestamptz", "true"),
        ],
    );
    task.start().await.expect("start");
    let mut hl7 = record("adt", 0, None, Some("MSH|^~\\&|EPIC|HOSP\rPID|1||P1\r"));
    hl7.record.headers.add("content-type", "application/hl7-v2");
    put_all(
        &mut task,
        &[
            record(
                "obs",
                0,
                None,
                Some(r#"{"at":"2024-01-01T12:00:00+01:00","hr":70}"#),
            ),
            hl7,
        ],
    )
    .await;
    assert!(drain(&mut errant).is_empty());
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM obs WHERE at = '2024-01-01T11:00:00Z'::timestamptz \
             AND pg_typeof(at) = 'timestamp with time zone'::regtype"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM adt WHERE value LIKE 'MSH|%' AND pg_typeof(value) = 'text'::regtype"
        )
        .await,
        1
    );
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn validate_connects_and_names_the_setting_at_fault() {
    let url = shared().database("validate").await;
    let connector = PostgresSinkConnector;
    connector
        .validate(&props(&[("connection.url", &url)]))
        .await
        .expect("a reachable server is valid");
    let closed = format!(
        "postgres://{USER}@127.0.0.1:{}/validate",
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    );
    let error = connector
        .validate(&props(&[
            ("connection.url", &closed),
            ("connection.timeout.ms", "2000"),
        ]))
        .await
        .expect_err("nobody listens there");
    assert!(
        matches!(error, ConnectError::Config { ref field, ref reason } if field == "connection.url" && reason.contains("refused")),
        "{error:?}"
    );
    let missing = format!("{}_missing", url);
    let error = connector
        .validate(&props(&[("connection.url", &missing)]))
        .await
        .expect_err("no such database");
    assert!(
        matches!(error, ConnectError::Config { ref field, ref reason } if field == "connection.url" && reason.contains("does not exist")),
        "{error:?}"
    );
}

/// `pk.mode=kafka` goes by COPY first: a batch delivered again (a new task after a crash, half
/// of it already written) conflicts, and the statement writes it instead: `upsert` takes the
/// new values, `insert` keeps the rows; a row breaking a constraint is still errant alone.
#[tokio::test]
async fn kafka_keys_go_by_copy_and_a_redelivered_batch_falls_back_to_the_statement() {
    let url = shared().database("kafka_copy").await;
    execute(
        &url,
        "CREATE TABLE obs (__connect_topic text, __connect_partition integer, __connect_offset bigint, \
           hr bigint CONSTRAINT hr_plausible CHECK (hr < 1000), \
           PRIMARY KEY (__connect_topic, __connect_partition, __connect_offset))",
    )
    .await;
    let batch = |from: i64, to: i64, hr: i64| -> Vec<_> {
        (from..to)
            .map(|n| {
                record(
                    "obs",
                    n,
                    None,
                    Some(&format!(r#"{{"hr":{}}}"#, hr + n % 10)),
                )
            })
            .collect()
    };
    for (mode, hr) in [("upsert", 100), ("insert", 200)] {
        let settings = [("pk.mode", "kafka"), ("insert.mode", mode)];
        let (mut first, mut errant) = sink_task(&url, &settings);
        first.start().await.expect("start");
        put_all(&mut first, &batch(0, 500, hr)).await;
        first.stop().await.expect("stop");
        // Delivered again, with what follows: 0..1000 once each.
        let (mut again, _) = sink_task(&url, &settings);
        again.start().await.expect("start");
        put_all(&mut again, &batch(0, 1000, hr + 1)).await;
        again.stop().await.expect("stop");
        assert!(drain(&mut errant).is_empty());
        assert_eq!(
            count(&url, "SELECT count(*) FROM obs").await,
            1000,
            "{mode}"
        );
        let (old, new) = match mode {
            "upsert" => (0, 1000),
            _ => (500, 500),
        };
        assert_eq!(
            count(
                &url,
                &format!("SELECT count(*) FROM obs WHERE hr = {hr} + 1 + __connect_offset % 10")
            )
            .await,
            new,
            "{mode}: rows with the second delivery's values"
        );
        if mode == "insert" {
            assert_eq!(
                count(
                    &url,
                    &format!("SELECT count(*) FROM obs WHERE hr = {hr} + __connect_offset % 10")
                )
                .await,
                old,
                "insert keeps the rows already there"
            );
        }
        execute(&url, "TRUNCATE obs").await;
    }
    let (mut task, mut errant) =
        sink_task(&url, &[("pk.mode", "kafka"), ("insert.mode", "upsert")]);
    task.start().await.expect("start");
    let mut records = batch(0, 300, 100);
    records[123] = record("obs", 123, None, Some(r#"{"hr":5000}"#));
    put_all(&mut task, &records).await;
    let refused = drain(&mut errant);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0.kafka_offset, 123);
    assert_eq!(count(&url, "SELECT count(*) FROM obs").await, 299);
    task.stop().await.expect("stop");
}

#[tokio::test]
async fn a_streamed_copy_gives_way_to_another_shape_and_to_a_redelivered_record() {
    let url = shared().database("streamed").await;
    let settings = [
        ("table.name.format", "streamed"),
        ("pk.mode", "kafka"),
        ("insert.mode", "insert"),
        ("auto.create", "true"),
        ("auto.evolve", "true"),
        ("batch.size", "100"),
    ];
    // 150 has a field the others lack; the rest, fields in two orders.
    let records = |topic: &str, offsets: std::ops::Range<i64>| -> Vec<_> {
        offsets
            .map(|n| {
                let value = match n {
                    150 => r#"{"hr":150,"spo2":97}"#.to_string(),
                    n if n % 2 == 0 => format!(r#"{{"hr":{n},"note":"tab\tend"}}"#),
                    n => format!(r#"{{"note":"tab\tend","hr":{n}}}"#),
                };
                record(topic, n, None, Some(&value))
            })
            .collect()
    };
    // The first batch creates the table; the next go by a streamed COPY: the one with 150
    // aborts it in its middle and is planned (a column added).
    let (mut task, mut errant) = sink_task(&url, &settings);
    task.start().await.expect("start");
    put_all(&mut task, &records("vitals", 0..300)).await;
    task.stop().await.expect("stop");
    // A task started again gets 200..300 again, then 300..400. Its first batch (another
    // topic, the same table) has it read the table, so that 200..300 is streamed: a conflict
    // refuses the COPY, and the statement keeps the rows there.
    let (mut again, _) = sink_task(&url, &settings);
    again.start().await.expect("start");
    put_all(&mut again, &records("other", 0..100)).await;
    put_all(&mut again, &records("vitals", 200..400)).await;
    again.stop().await.expect("stop");
    assert!(drain(&mut errant).is_empty());
    assert_eq!(count(&url, "SELECT count(*) FROM streamed").await, 500);
    assert_eq!(
        count(
            &url,
            r"SELECT count(*) FROM streamed WHERE hr = __connect_offset AND (note = E'tab\tend' OR spo2 = 97)"
        )
        .await,
        500
    );
    assert_eq!(count(&url, "SELECT count(spo2) FROM streamed").await, 1);
}

#[tokio::test]
async fn a_batch_ends_at_batch_max_bytes_before_batch_size() {
    let url = shared().database("max_bytes").await;
    // Values of one length; a record counts for its value's bytes (no key, no headers).
    let value = |n: i64| format!(r#"{{"id":{},"note":"0123456789"}}"#, 10_000 + n);
    let length = value(0).len();
    let max_bytes = (10 * length + length / 2).to_string();
    let settings = [
        ("table.name.format", "bounded"),
        ("auto.create", "true"),
        ("batch.size", "1000000"),
        ("batch.max.bytes", max_bytes.as_str()),
    ];
    let (mut task, mut errant) = sink_task(&url, &settings);
    task.start().await.expect("start");
    let batches = "SELECT count(DISTINCT xmin::text) FROM bounded";

    // Far below batch.size, 100 records reach batch.max.bytes every ten: `put` itself writes
    // nine batches of ten, each committed in a transaction of its own; the last ten fit
    // under the bound and wait.
    let records: Vec<_> = (0..100)
        .map(|n| record("vitals", n, None, Some(&value(n))))
        .collect();
    task.put(records).await.expect("put");
    assert_eq!(count(&url, "SELECT count(*) FROM bounded").await, 90);
    assert_eq!(count(&url, batches).await, 9);

    // A record larger than batch.max.bytes: the ten before it are a batch, it is a batch
    // alone, and the four small ones after it wait for flush.
    let large = format!(r#"{{"id":10100,"note":"{}"}}"#, "x".repeat(20 * length));
    let mut records = vec![record("vitals", 100, None, Some(&large))];
    records.extend((101..105).map(|n| record("vitals", n, None, Some(&value(n)))));
    task.put(records).await.expect("put");
    assert_eq!(count(&url, "SELECT count(*) FROM bounded").await, 101);
    assert_eq!(count(&url, batches).await, 11);
    task.flush().await.expect("flush");
    assert_eq!(count(&url, "SELECT count(*) FROM bounded").await, 105);
    assert_eq!(count(&url, batches).await, 12);
    assert_eq!(
        count(&url, "SELECT count(DISTINCT id) FROM bounded").await,
        105
    );
    task.stop().await.expect("stop");
    assert!(drain(&mut errant).is_empty());
}
