//! The query-mode source against a real PostgreSQL 15: rows committed out of order by
//! concurrent transactions, groups of equal timestamps cut by `batch.max.rows`, and a task
//! restarted from its stored offsets. Nothing skipped, nothing twice.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use medconnect_api::{SourceRecord, SourceTask};
use medconnect_postgres::PostgresSourceTask;
use sqlx::Connection;
use support::{
    DEADLINE, MemoryOffsets, connect, execute, poll_for, poll_until, shared, source_context,
    value_json,
};

fn ids(records: &[SourceRecord]) -> Vec<i64> {
    records
        .iter()
        .map(|r| value_json(r)["id"].as_i64().expect("an id in every row"))
        .collect()
}

fn task(url: &str, pairs: &[(&str, &str)], offsets: &MemoryOffsets) -> PostgresSourceTask {
    PostgresSourceTask::new(source_context(url, pairs, offsets)).expect("a valid task config")
}

/// An open transaction on its own connection that inserted `rows` rows into `table` (ids
/// from the table's sequence, timestamps `now()`, i.e. its start).
async fn open_insert(url: &str, table: &str, rows: usize) -> sqlx::PgConnection {
    let mut connection = connect(url).await;
    sqlx::raw_sql(&format!(
        "BEGIN; INSERT INTO {table} (v) SELECT 'late' FROM generate_series(1, {rows});"
    ))
    .execute(&mut connection)
    .await
    .expect("open transaction");
    connection
}

async fn commit(mut connection: sqlx::PgConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut connection)
        .await
        .expect("commit");
    let _ = connection.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incrementing_mode_does_not_skip_a_row_committed_after_a_larger_one() {
    let url = shared().database("q_incrementing").await;
    execute(&url, "CREATE TABLE obs (id bigserial PRIMARY KEY, v text)").await;
    execute(
        &url,
        "INSERT INTO obs (v) SELECT 'early' FROM generate_series(1, 3)",
    )
    .await;
    let offsets = MemoryOffsets::default();
    let mut source = task(
        &url,
        &[
            ("mode", "incrementing"),
            ("incrementing.column.name", "id"),
            ("table.whitelist", "obs"),
            ("topic.prefix", "pg."),
            ("poll.interval.ms", "50"),
            ("batch.max.rows", "2"),
        ],
        &offsets,
    );
    source.start().await.expect("start");
    let early = poll_until(&mut source, 3, DEADLINE).await;
    assert_eq!(ids(&early), vec![1, 2, 3]);

    // T1 takes id 4 and stays open; T2 takes 5..9 and commits first.
    let t1 = open_insert(&url, "obs", 1).await;
    execute(
        &url,
        "INSERT INTO obs (v) SELECT 'later' FROM generate_series(1, 5)",
    )
    .await;
    let while_open = poll_for(&mut source, Duration::from_millis(600)).await;
    assert!(
        while_open.is_empty(),
        "rows read past an open transaction: {:?}",
        ids(&while_open)
    );

    commit(t1).await;
    let rest = poll_until(&mut source, 6, DEADLINE).await;
    assert_eq!(
        ids(&rest),
        vec![4, 5, 6, 7, 8, 9],
        "T1's row is not skipped"
    );
    assert_eq!(rest[0].record.topic, "pg.obs");
    assert_eq!(rest[0].record.key.as_deref(), Some(&b"{\"id\":4}"[..]));
    assert_eq!(rest[5].source_offset["incrementing"], 9);
    assert!(
        poll_for(&mut source, Duration::from_millis(300))
            .await
            .is_empty()
    );
    source.stop().await.expect("stop");
}

/// Both timestamp modes: ten rows of one transaction (equal timestamps, cut by
/// batch.max.rows=3), then T1 (started first, four rows) still open while T2 (started later,
/// seven rows) commits: T2's rows must wait for T1's, whose timestamps are older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_modes_read_equal_timestamps_and_late_commits_once_each() {
    for (mode, db) in [
        ("timestamp", "q_timestamp"),
        ("timestamp+incrementing", "q_timestamp_inc"),
    ] {
        let url = shared().database(db).await;
        execute(
            &url,
            "CREATE TABLE ev (id bigserial PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now(), v text)",
        )
        .await;
        execute(
            &url,
            "INSERT INTO ev (v) SELECT 'group' FROM generate_series(1, 10)",
        )
        .await;
        let offsets = MemoryOffsets::default();
        let mut source = task(
            &url,
            &[
                ("mode", mode),
                ("timestamp.column.name", "ts"),
                ("incrementing.column.name", "id"),
                ("table.include", "ev"),
                ("topic.prefix", "pg."),
                ("poll.interval.ms", "50"),
                ("batch.max.rows", "3"),
            ],
            &offsets,
        );
        source.start().await.expect("start");
        let group = poll_until(&mut source, 10, DEADLINE).await;
        assert_eq!(ids(&group), (1..=10).collect::<Vec<_>>(), "{mode}");

        let t1 = open_insert(&url, "ev", 4).await;
        // T2 starts after T1 (a later now()) and commits first.
        tokio::time::sleep(Duration::from_millis(5)).await;
        execute(
            &url,
            "INSERT INTO ev (v) SELECT 'T2' FROM generate_series(1, 7)",
        )
        .await;
        let while_open = poll_for(&mut source, Duration::from_millis(600)).await;
        assert!(
            while_open.is_empty(),
            "{mode}: rows read past an open transaction: {:?}",
            ids(&while_open)
        );
        commit(t1).await;
        let late = poll_until(&mut source, 11, DEADLINE).await;
        let got: BTreeSet<i64> = ids(&late).into_iter().collect();
        assert_eq!(got.len(), 11, "{mode}: no row twice");
        assert_eq!(got, (11..=21).collect(), "{mode}: T1's rows and T2's");
        // T1's rows (ids 11..14, the older timestamp) come first.
        assert_eq!(
            ids(&late)[..4].iter().copied().collect::<BTreeSet<_>>(),
            (11..=14).collect(),
            "{mode}"
        );
        assert!(
            poll_for(&mut source, Duration::from_millis(300))
                .await
                .is_empty(),
            "{mode}"
        );
        source.stop().await.expect("stop");
    }
}

/// A task stopped after two batches, inside a group of 50 equal timestamps, and a new task
/// given the stored offsets: it reads exactly the 30 rows the first did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_task_resumes_from_its_stored_offsets() {
    for (mode, db) in [
        ("incrementing", "q_restart_inc"),
        ("timestamp+incrementing", "q_restart_ts"),
    ] {
        let url = shared().database(db).await;
        execute(
            &url,
            "CREATE TABLE vitals (id bigserial PRIMARY KEY, ts timestamptz NOT NULL DEFAULT now(), v text)",
        )
        .await;
        execute(
            &url,
            "INSERT INTO vitals (v) SELECT 'x' FROM generate_series(1, 50)",
        )
        .await;
        let settings = [
            ("mode", mode),
            ("timestamp.column.name", "ts"),
            ("incrementing.column.name", "id"),
            ("table.whitelist", "vitals"),
            ("topic.prefix", "pg."),
            ("poll.interval.ms", "50"),
            ("batch.max.rows", "10"),
        ];
        let offsets = MemoryOffsets::default();
        let mut first = task(&url, &settings, &offsets);
        first.start().await.expect("start");
        let read = poll_until(&mut first, 20, DEADLINE).await;
        assert_eq!(read.len(), 20, "{mode}: two whole batches");
        offsets.store(&read);
        first.stop().await.expect("stop");

        let mut second = task(&url, &settings, &offsets);
        second.start().await.expect("start again");
        let rest = poll_until(&mut second, 30, DEADLINE).await;
        assert_eq!(ids(&rest), (21..=50).collect::<Vec<_>>(), "{mode}");
        assert!(
            poll_for(&mut second, Duration::from_millis(300))
                .await
                .is_empty(),
            "{mode}"
        );
        second.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_mode_and_a_custom_query() {
    let url = shared().database("q_bulk").await;
    execute(
        &url,
        "CREATE TABLE beds (id int PRIMARY KEY, ward text); INSERT INTO beds SELECT g, 'icu' FROM generate_series(1, 5) g",
    )
    .await;
    let offsets = MemoryOffsets::default();
    let mut bulk = task(
        &url,
        &[
            ("mode", "bulk"),
            ("table.whitelist", "beds"),
            ("topic.prefix", "pg."),
            ("poll.interval.ms", "100"),
        ],
        &offsets,
    );
    bulk.start().await.expect("start");
    let twice = poll_until(&mut bulk, 10, DEADLINE).await;
    assert_eq!(twice.len(), 10, "the whole table at each poll");
    assert!(twice.iter().all(|r| r.source_partition.is_empty()));
    bulk.stop().await.expect("stop");

    let mut query = task(
        &url,
        &[
            ("mode", "incrementing"),
            ("incrementing.column.name", "id"),
            (
                "query",
                "SELECT id, upper(ward) AS ward FROM beds WHERE id % 2 = 1",
            ),
            ("topic.prefix", "beds-odd"),
            ("poll.interval.ms", "50"),
        ],
        &offsets,
    );
    query.start().await.expect("start");
    let odd = poll_until(&mut query, 3, DEADLINE).await;
    assert_eq!(ids(&odd), vec![1, 3, 5]);
    assert_eq!(value_json(&odd[0])["ward"], "ICU");
    assert_eq!(odd[0].record.topic, "beds-odd");
    query.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_cannot_see_other_sessions_is_refused_at_start() {
    let url = shared().database("q_roles").await;
    execute(
        &url,
        "DROP ROLE IF EXISTS reader; CREATE ROLE reader LOGIN; CREATE TABLE t (id int); GRANT SELECT ON t TO reader",
    )
    .await;
    let offsets = MemoryOffsets::default();
    let mut source = task(
        &url,
        &[
            ("connection.user", "reader"),
            ("mode", "incrementing"),
            ("incrementing.column.name", "id"),
            ("table.whitelist", "t"),
            ("topic.prefix", "pg."),
        ],
        &offsets,
    );
    match source.start().await {
        Err(medconnect_api::ConnectError::Config { field, reason }) => {
            assert_eq!(field, "connection.user");
            assert!(reason.contains("pg_read_all_stats"), "{reason}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}
