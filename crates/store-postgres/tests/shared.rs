//! The pool of [`PgStore`]: connections kept for batches while reads pile up, and sessions
//! that PostgreSQL ends on its own when their server stops waiting for them.

mod common;

use std::time::Duration;

use common::{TestDatabase, shop_and_payer};
use farthing_ledger::{Amount, Currency, MICROS_PER_UNIT, TransferId};
use farthing_payments::*;
use farthing_store::{Reads, SharedStore, StoreError};
use farthing_store_postgres::{PgOptions, PgStore, connect};
use farthing_testing::{key_hash, record_at};

fn record(command: Command) -> Record {
    record_at(0, command)
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// Backends of this database's Farthing sessions that are waiting for a lock.
async fn farthing_sessions_waiting_for_locks(admin: &tokio_postgres::Client, db: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'farthing' AND wait_event_type = 'Lock'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn postgresql_ends_a_batch_its_server_gave_up_on_instead_of_leaving_it_queued_for_locks() {
    let Some(db) = TestDatabase::create("postgresql_ends_a_batch_its_server_gave_up_on").await
    else {
        return;
    };
    let store = PgStore::open(
        &db.url,
        PgOptions {
            call_timeout: Duration::from_secs(1),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    let (records, merchant, payer) = shop_and_payer(100);
    store.apply(&records).await.unwrap();
    // Another session holds the payer's wallet.
    let mut holder = connect(&db.url).await.unwrap();
    let holding = holder.transaction().await.unwrap();
    holding
        .execute(
            "SELECT 1 FROM accounts WHERE owner_kind = 1 FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let pay = record(Command::Pay(PayCommand {
        id: PaymentId::from_u128(10),
        payer,
        merchant,
        amount: Amount::from_micros(MICROS_PER_UNIT),
        currency: usd(),
        description: None,
        reference: None,
        transfer_ids: [TransferId(11), TransferId(12)],
    }));
    let answer = store.apply(std::slice::from_ref(&pay)).await;
    assert!(
        matches!(answer, Err(StoreError::Unavailable(_))),
        "a batch that cannot get its locks within the call timeout is unavailable: {answer:?}"
    );
    // The server gave up after a second; PostgreSQL ends the statement by then too, rather
    // than keep it queued (with whatever it had locked) until the wallet is released.
    let admin = connect(&db.url).await.unwrap();
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let mut waiting = farthing_sessions_waiting_for_locks(&admin, &name).await;
    for _ in 0..40 {
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiting = farthing_sessions_waiting_for_locks(&admin, &name).await;
    }
    assert_eq!(
        waiting, 0,
        "the abandoned batch is still waiting for its locks"
    );
    holding.rollback().await.unwrap();
    // And the payment goes through once the wallet is free.
    let answers = store.apply(std::slice::from_ref(&pay)).await.unwrap();
    assert!(
        matches!(answers[0].outcome, Outcome::Paid(_)),
        "{:?}",
        answers[0]
    );
}

#[tokio::test]
async fn batches_get_a_connection_while_reads_hold_all_the_others() {
    let Some(db) = TestDatabase::create("batches_get_a_connection_while_reads_hold").await else {
        return;
    };
    let store = PgStore::open(
        &db.url,
        PgOptions {
            connections_max: 3,
            writer_connections: 1,
            call_timeout: Duration::from_secs(5),
            ..PgOptions::default()
        },
    )
    .await
    .unwrap();
    let (records, _, _) = shop_and_payer(100);
    store.apply(&records).await.unwrap();
    // Reads of the payments table wait behind this lock, each holding a connection.
    let mut holder = connect(&db.url).await.unwrap();
    let holding = holder.transaction().await.unwrap();
    holding
        .batch_execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let reads: Vec<_> = (0..6)
        .map(|_| {
            let store = &store;
            async move { store.list_payments(Principal::Operator, 10, None).await }
        })
        .collect();
    let reads = futures_util::future::join_all(reads);
    tokio::pin!(reads);
    let batch = async {
        // Let the reads take their connections first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .apply(&[record(Command::CreateMerchant {
                id: MerchantId::from_u128(20),
                name: "Second shop".into(),
                key_hash: key_hash(3),
                fee: FeeSchedule::ZERO,
            })])
            .await
    };
    tokio::pin!(batch);
    let answered = tokio::select! {
        answered = &mut batch => answered,
        _ = &mut reads => panic!("the reads ended before the batch was answered"),
    };
    let answers = answered.expect("the batch had a connection of its own");
    assert!(
        matches!(answers[0].outcome, Outcome::MerchantCreated(_)),
        "{:?}",
        answers[0]
    );
    holding.rollback().await.unwrap();
    for read in reads.await {
        assert!(read.unwrap().is_some());
    }
}
