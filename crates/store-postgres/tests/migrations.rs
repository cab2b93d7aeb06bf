//! The schema migrations, on a fresh PostgreSQL database per test (from
//! `FARTHING_TEST_DATABASE_URL`); without that variable each test says it was skipped.

mod common;

use common::TestDatabase;
use farthing_store_postgres::with_database;
use farthing_store_postgres::{MIGRATIONS, PgError, connect, migrate};

async fn tables(url: &str) -> Vec<String> {
    let client = connect(url).await.unwrap();
    client
        .query(
            "SELECT table_name::TEXT FROM information_schema.tables
             WHERE table_schema = 'public' ORDER BY table_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn a_fresh_database_gets_every_migration_recorded_once() {
    let Some(db) = TestDatabase::create("a_fresh_database_gets_every_migration").await else {
        return;
    };
    let mut client = connect(&db.url).await.unwrap();
    let migrated = migrate(&mut client).await.unwrap();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(migrated.applied, all);
    assert_eq!(migrated.version, *all.last().unwrap());
    let tables = tables(&db.url).await;
    for table in [
        "accounts",
        "holds",
        "idempotency_keys",
        "merchants",
        "operator_keys",
        "payers",
        "payments",
        "refunds",
        "statement_lines",
        "topups",
        "transfers",
    ] {
        assert!(
            tables.contains(&table.to_string()),
            "no table {table}: {tables:?}"
        );
    }
    let recorded = client
        .query(
            "SELECT version, name FROM farthing_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(recorded.len(), MIGRATIONS.len());
    for (row, migration) in recorded.iter().zip(MIGRATIONS) {
        assert_eq!(row.get::<_, i32>(0), migration.version);
        assert_eq!(row.get::<_, String>(1), migration.name);
    }
}

#[tokio::test]
async fn migrating_again_applies_nothing() {
    let Some(db) = TestDatabase::create("migrating_again_applies_nothing").await else {
        return;
    };
    let mut client = connect(&db.url).await.unwrap();
    let first = migrate(&mut client).await.unwrap();
    let before = tables(&db.url).await;
    let second = migrate(&mut client).await.unwrap();
    assert!(second.applied.is_empty());
    assert_eq!(second.version, first.version);
    assert_eq!(tables(&db.url).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_migrating_at_once_apply_each_migration_exactly_once() {
    let Some(db) = TestDatabase::create("servers_migrating_at_once").await else {
        return;
    };
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await.unwrap();
            migrate(&mut client).await.unwrap()
        }));
    }
    let mut applied = Vec::new();
    for task in tasks {
        applied.extend(task.await.unwrap().applied);
    }
    applied.sort();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(
        applied, all,
        "each migration applied by exactly one of the servers"
    );
}

#[tokio::test]
async fn a_database_set_up_by_a_newer_farthing_is_refused() {
    let Some(db) = TestDatabase::create("a_database_set_up_by_a_newer_farthing").await else {
        return;
    };
    let mut client = connect(&db.url).await.unwrap();
    migrate(&mut client).await.unwrap();
    client
        .execute(
            "INSERT INTO farthing_migrations (version, name, applied_at) VALUES (9999, 'future', 0)",
            &[],
        )
        .await
        .unwrap();
    match migrate(&mut client).await {
        Err(PgError::NewerSchema { version }) => assert_eq!(version, 9999),
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
}

/// A database with history, set up before payments kept their statement lines in their rows:
/// the migration that starts it keeps every earlier line where it is, and only payments made
/// after everything there keep theirs in their rows.
#[tokio::test]
async fn payments_keep_their_lines_only_after_the_history_a_database_had() {
    let Some(db) = TestDatabase::create("payments_keep_their_lines_only_after").await else {
        return;
    };
    let mut client = connect(&db.url).await.unwrap();
    let before_lines = MIGRATIONS
        .iter()
        .position(|m| m.name == "payment_lines")
        .expect("the migration is listed");
    for migration in &MIGRATIONS[..before_lines] {
        client.batch_execute(migration.sql).await.unwrap();
    }
    client
        .batch_execute(
            "INSERT INTO payments (id, payer, merchant, amount, currency, fee, created_at,
                                   batch_position)
             VALUES ('00000000-0000-0000-0000-0000000000a0',
                     '00000000-0000-0000-0000-000000000001',
                     '00000000-0000-0000-0000-000000000002', 100, 'USD', 0, 700, 0);
             INSERT INTO statement_lines (payer, object_id, object_kind, currency, credit, amount,
                                          balance_after, created_at, batch_position)
             VALUES ('00000000-0000-0000-0000-000000000001',
                     '00000000-0000-0000-0000-0000000000b0', 1, 'USD', TRUE, 500, 500, 900, 0),
                    ('00000000-0000-0000-0000-000000000001',
                     '00000000-0000-0000-0000-0000000000a0', 2, 'USD', FALSE, 100, 400, 700, 0);",
        )
        .await
        .unwrap();
    let recorded: Vec<String> = MIGRATIONS[..before_lines]
        .iter()
        .map(|m| {
            format!(
                "INSERT INTO farthing_migrations (version, name, applied_at)
                 VALUES ({}, '{}', 0);",
                m.version, m.name
            )
        })
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE farthing_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,
                                               applied_at BIGINT NOT NULL);
             {}",
            recorded.concat()
        ))
        .await
        .unwrap();
    let migrated = migrate(&mut client).await.unwrap();
    assert_eq!(migrated.applied[0], MIGRATIONS[before_lines].version);
    let made_from: i64 = client
        .query_one("SELECT made_from FROM payment_lines", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made_from, 901, "one past the latest line or payment");
    // The old lines read as they did, once each.
    let statement: Vec<(i16, i64)> = client
        .query(
            "SELECT object_kind, created_at FROM statement ORDER BY created_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(statement, [(2, 700), (1, 900)]);

    // A fresh database keeps every payment's line in its row.
    let Some(fresh) = TestDatabase::create("payments_keep_their_lines_fresh").await else {
        return;
    };
    let mut client = connect(&fresh.url).await.unwrap();
    migrate(&mut client).await.unwrap();
    let made_from: i64 = client
        .query_one("SELECT made_from FROM payment_lines", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(made_from, 0);
}

#[tokio::test]
async fn the_schema_refuses_amounts_and_fees_that_break_the_rules() {
    let Some(db) = TestDatabase::create("the_schema_refuses_bad_amounts").await else {
        return;
    };
    let mut client = connect(&db.url).await.unwrap();
    migrate(&mut client).await.unwrap();
    let insert = "INSERT INTO payments (id, payer, merchant, amount, currency, fee, created_at,
                                        batch_position)
                  VALUES ($1::TEXT::UUID, '00000000-0000-0000-0000-000000000001',
                          '00000000-0000-0000-0000-000000000002', $2, 'USD', $3, 0, 0)";
    let id = |n: u8| format!("00000000-0000-0000-0000-0000000000{n:02x}");
    let ok = client.execute(insert, &[&id(0xa0), &100i64, &10i64]).await;
    assert!(ok.is_ok(), "{ok:?}");
    for (n, amount, fee) in [(0xa1, 0i64, 0i64), (0xa2, 100, 101), (0xa3, -5, 0)] {
        let refused = client.execute(insert, &[&id(n), &amount, &fee]).await;
        assert!(refused.is_err(), "amount {amount}, fee {fee} was accepted");
    }
}

#[test]
fn a_test_database_url_keeps_the_server_and_options_and_names_the_new_database() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/test?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(
        with_database("postgres://h:5432", "x"),
        "postgres://h:5432/x"
    );
}
