//! The read side (`farthing_store_postgres::query`) on a fresh PostgreSQL database per test
//! (from `FARTHING_TEST_DATABASE_URL`; without it each test says it was skipped): after a random
//! history applied in batches, every answer equals the in-memory state's, page by page.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestDatabase, database_configured};
use farthing_payments::*;
use farthing_store_postgres::{apply_batch, connect, migrate, query};
use farthing_testing::{Builder, StepSpec, history};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio_postgres::Client;

/// Histories per round: each gets a database of its own.
const CASES: u32 = 16;

/// Rounds at most, while some case below was not yet reached.
const ROUNDS_MAX: usize = 5;
const LIMITS: [usize; 4] = [1, 2, 3, 100];

/// Cursors answered `None` over the whole run, by why: the runs must reach each case.
static SOMEONE_ELSES_PAYMENT: AtomicUsize = AtomicUsize::new(0);
static UNKNOWN_PAYMENT: AtomicUsize = AtomicUsize::new(0);
static SOMEONE_ELSES_ENTRY: AtomicUsize = AtomicUsize::new(0);
/// Histories with payments' lines kept in their rows, and kept apart (as before the migration
/// that keeps them in rows, or for a captured hold).
static LINES_IN_ROWS: AtomicUsize = AtomicUsize::new(0);
static LINES_APART: AtomicUsize = AtomicUsize::new(0);

/// Applies `history` to the in-memory state and to PostgreSQL in batches of the given sizes
/// (cycled). The records of one batch share one time, and batches get strictly increasing
/// times, as one server's writer gives them: that is what the stored order relies on.
///
/// With `upgraded_at`, the database is as if migrated to keep payments' statement lines in
/// their rows just before that batch: the batches before it keep every line apart, as a
/// database written before the migration does.
async fn apply_history(
    client: &mut Client,
    history: &[StepSpec],
    sizes: &[usize],
    upgraded_at: Option<usize>,
) -> Result<(State, Builder), TestCaseError> {
    let mut state = State::new();
    let mut builder = Builder::new();
    let mut steps = history.iter();
    if upgraded_at.is_some() {
        set_made_from(client, i64::MAX).await;
    }
    for (batch_index, &size) in sizes.iter().cycle().enumerate() {
        let mut batch: Vec<Record> = steps
            .by_ref()
            .take(size)
            .map(|step| builder.record(step, &state))
            .collect();
        let Some(last) = batch.last().map(|r| r.now) else {
            break;
        };
        // Times only grow, so adding the batch's index makes them strictly increasing.
        let now = farthing_ledger::Timestamp(last.0 + batch_index as u64);
        for record in &mut batch {
            record.now = now;
        }
        builder.now = builder.now.max(now.0);
        if upgraded_at == Some(batch_index) {
            set_made_from(client, now.0 as i64).await;
        }
        let expected: Vec<Outcome> = batch.iter().map(|record| state.apply(record)).collect();
        let got = apply_batch(client, &batch).await;
        prop_assert!(got.is_ok(), "batch {:?} failed: {:?}", batch, got);
        prop_assert_eq!(got.unwrap(), expected, "batch {:?}", batch);
    }
    Ok((state, builder))
}

/// Sets the time from which payments keep their statement lines in their rows.
async fn set_made_from(client: &Client, at: i64) {
    client
        .execute("UPDATE payment_lines SET made_from = $1", &[&at])
        .await
        .expect("payment_lines updates");
}

/// Walks every page of a principal's payments, following cursors, comparing each page.
async fn compare_payment_pages(
    client: &Client,
    state: &State,
    principal: Principal,
    limit: usize,
) -> Result<(), TestCaseError> {
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let expected = state.list_payments(principal, limit, cursor).unwrap();
        let got = query::list_payments(client, principal, limit, cursor)
            .await
            .expect("list payments");
        let (Some(expected), Some(got)) = (expected, got) else {
            prop_assert!(
                false,
                "{:?} limit {} after {:?}: one side has no page",
                principal,
                limit,
                cursor
            );
            unreachable!()
        };
        let expected_items: Vec<Payment> = expected.items;
        prop_assert_eq!(
            &got.items,
            &expected_items,
            "{:?} limit {} after {:?}",
            principal,
            limit,
            cursor
        );
        prop_assert_eq!(got.has_more, expected.has_more);
        pages += 1;
        prop_assert!(pages < 10_000, "pages never end");
        match (got.has_more, got.items.last()) {
            (true, Some(last)) => cursor = Some(last.id),
            _ => return Ok(()),
        }
    }
}

/// Walks every page of a payer's statement, following cursors, comparing each page.
async fn compare_entry_pages(
    client: &Client,
    state: &State,
    payer: PayerId,
    limit: usize,
) -> Result<(), TestCaseError> {
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let expected = state.payer_entries(payer, limit, cursor).unwrap();
        let got = query::payer_entries(client, payer, limit, cursor)
            .await
            .expect("payer entries");
        let (Some(expected), Some(got)) = (expected, got) else {
            prop_assert!(
                false,
                "{:?} limit {} after {:?}: one side has no page",
                payer,
                limit,
                cursor
            );
            unreachable!()
        };
        prop_assert_eq!(
            &got.items,
            &expected.items,
            "{:?} limit {} after {:?}",
            payer,
            limit,
            cursor
        );
        prop_assert_eq!(got.has_more, expected.has_more);
        pages += 1;
        prop_assert!(pages < 10_000, "pages never end");
        match (got.has_more, got.items.last()) {
            (true, Some(last)) => cursor = Some(last.object),
            _ => return Ok(()),
        }
    }
}

async fn run_history(
    history: &[StepSpec],
    sizes: &[usize],
    upgraded_at: Option<usize>,
) -> Result<(), TestCaseError> {
    let db = TestDatabase::create("every_query_answers_as_the_in_memory_state")
        .await
        .expect("checked before");
    let mut client = connect(&db.url)
        .await
        .expect("connect to the test database");
    migrate(&mut client).await.expect("migrate");
    let (state, builder) = apply_history(&mut client, history, sizes, upgraded_at).await?;
    let kept = |table: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .expect("count");
            row.get::<_, i64>(0)
        }
    };
    if kept("payments WHERE balance_after IS NOT NULL").await > 0 {
        LINES_IN_ROWS.fetch_add(1, Ordering::Relaxed);
    }
    if kept("statement_lines WHERE object_kind = 2").await > 0 {
        LINES_APART.fetch_add(1, Ordering::Relaxed);
    }
    let client = &client;

    // Every id the history named, made or not, and one it never did.
    let never = u128::MAX - 7;
    let payers: BTreeSet<PayerId> = builder
        .payer_ids
        .iter()
        .copied()
        .chain([PayerId::from_u128(never)])
        .collect();
    let merchants: BTreeSet<MerchantId> = builder
        .merchant_ids
        .iter()
        .copied()
        .chain([MerchantId::from_u128(never)])
        .collect();
    let payments: BTreeSet<PaymentId> = builder
        .payment_ids
        .iter()
        .copied()
        .chain([PaymentId::from_u128(never)])
        .collect();

    // Principals by key hash, and a hash no one holds.
    let mut unknown = [0u8; 32];
    unknown[0] = 0x5A;
    for hash in builder.key_hashes.iter().chain([&KeyHash(unknown)]) {
        let got = query::principal(client, hash).await.expect("principal");
        prop_assert_eq!(got, state.principal(hash).unwrap(), "key hash {:?}", hash);
    }

    for &payer in &payers {
        let got = query::payer_balances(client, payer)
            .await
            .expect("payer balances");
        prop_assert_eq!(got, state.payer_balances(payer).unwrap(), "{:?}", payer);
    }
    for &merchant in &merchants {
        let got = query::merchant_balances(client, merchant)
            .await
            .expect("merchant balances");
        prop_assert_eq!(
            got,
            state.merchant_balances(merchant).unwrap(),
            "{:?}",
            merchant
        );
    }
    for &id in &payments {
        let got = query::payment(client, id).await.expect("payment");
        prop_assert_eq!(got, state.payment(id).unwrap(), "{:?}", id);
    }
    // Every registered kind's rows, read by id as a room's routes read them (a hold is
    // kept under its payment's id).
    for info in farthing_payments::kinds::KINDS {
        for &id in &payments {
            let got = query::row(client, info.tag, id.to_u128())
                .await
                .expect("row");
            let expected = state.row(info.tag, id.to_u128()).unwrap();
            prop_assert_eq!(got, expected, "{} row {:?}", info.table, id);
        }
    }

    // Every principal's pages, walked with every limit; unknown parties have no list.
    let principals: Vec<Principal> = [Principal::Operator]
        .into_iter()
        .chain(merchants.iter().map(|&m| Principal::Merchant(m)))
        .chain(payers.iter().map(|&p| Principal::Payer(p)))
        .collect();
    for &principal in &principals {
        let known = match principal {
            Principal::Operator => true,
            Principal::Merchant(id) => state.merchant(id).is_some(),
            Principal::Payer(id) => state.payer(id).is_some(),
        };
        if !known {
            let got = query::list_payments(client, principal, 10, None)
                .await
                .expect("list payments");
            prop_assert!(got.is_none(), "{:?} is unknown", principal);
            continue;
        }
        for limit in LIMITS {
            compare_payment_pages(client, &state, principal, limit).await?;
        }
        // Every cursor: someone else's payment and an unknown one answer None, like in memory.
        for &cursor in &payments {
            let expected = state.list_payments(principal, 2, Some(cursor)).unwrap();
            let got = query::list_payments(client, principal, 2, Some(cursor))
                .await
                .expect("list payments");
            if expected.is_none() {
                let counter = match state.payment(cursor).unwrap() {
                    Some(_) => &SOMEONE_ELSES_PAYMENT,
                    None => &UNKNOWN_PAYMENT,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            let expected = expected.map(|page| {
                let items: Vec<Payment> = page.items;
                (items, page.has_more)
            });
            prop_assert_eq!(
                got.map(|page| (page.items, page.has_more)),
                expected,
                "{:?} after {:?}",
                principal,
                cursor
            );
        }
    }

    // Every payer's statement, walked with every limit, and cursors of every kind.
    let objects: Vec<EntryObject> = payments
        .iter()
        .map(|&id| EntryObject::Payment(id))
        .chain(builder.topup_ids.iter().map(|&id| EntryObject::Topup(id)))
        .chain(builder.refund_ids.iter().map(|&id| EntryObject::Refund(id)))
        .chain([
            EntryObject::Topup(TopupId::from_u128(never)),
            EntryObject::Refund(RefundId::from_u128(never)),
        ])
        .collect();
    for &payer in &payers {
        if state.payer(payer).is_none() {
            let got = query::payer_entries(client, payer, 10, None)
                .await
                .expect("payer entries");
            prop_assert!(got.is_none(), "{:?} is unknown", payer);
            continue;
        }
        for limit in LIMITS {
            compare_entry_pages(client, &state, payer, limit).await?;
        }
        for &cursor in &objects {
            let expected = state.payer_entries(payer, 2, Some(cursor)).unwrap();
            let made = match cursor {
                EntryObject::Payment(id) => state.payment(id).unwrap().is_some(),
                EntryObject::Topup(id) => state.topup_record(id).is_some(),
                EntryObject::Refund(id) => state.refund_record(id).is_some(),
            };
            if expected.is_none() && made {
                SOMEONE_ELSES_ENTRY.fetch_add(1, Ordering::Relaxed);
            }
            let got = query::payer_entries(client, payer, 2, Some(cursor))
                .await
                .expect("payer entries");
            prop_assert_eq!(
                got.map(|page| (page.items, page.has_more)),
                expected.map(|page| (page.items, page.has_more)),
                "{:?} after {:?}",
                payer,
                cursor
            );
        }
    }
    Ok(())
}

#[test]
fn every_query_answers_as_the_in_memory_state_after_a_random_history() {
    if !database_configured("every_query_answers_as_the_in_memory_state_after_a_random_history") {
        return;
    }
    let config = ProptestConfig {
        cases: CASES,
        max_shrink_iters: 16,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // Now and then a database upgraded partway through its history.
    let cases = (
        history(),
        prop::collection::vec(1..8usize, 1..4),
        prop::option::weighted(0.5, 0..6usize),
    );
    // Random histories reach each case below only now and then (one in three or so has
    // payments' lines kept apart): a run that missed one goes on with more histories, a few
    // rounds at most, so the check is of what the histories can reach, not of luck.
    let cases_reached = [
        ("someone else's payment", &SOMEONE_ELSES_PAYMENT),
        ("an unknown payment", &UNKNOWN_PAYMENT),
        ("someone else's statement line", &SOMEONE_ELSES_ENTRY),
        ("payment lines kept in their rows", &LINES_IN_ROWS),
        ("payment lines kept apart", &LINES_APART),
    ];
    for _round in 0..ROUNDS_MAX {
        let result = proptest::test_runner::TestRunner::new(config.clone()).run(
            &cases,
            |(history, sizes, upgraded_at)| {
                runtime.block_on(run_history(&history, &sizes, upgraded_at))
            },
        );
        if let Err(error) = result {
            panic!("{error}");
        }
        if cases_reached
            .iter()
            .all(|(_, counter)| counter.load(Ordering::Relaxed) > 0)
        {
            break;
        }
    }
    for (case, counter) in cases_reached {
        assert!(
            counter.load(Ordering::Relaxed) > 0,
            "no history had a cursor of {case}"
        );
    }
}
