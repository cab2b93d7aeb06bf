//! `apply_batch` on a fresh PostgreSQL database per test (from `FARTHING_TEST_DATABASE_URL`;
//! without it each test says it was skipped): random histories give the outcomes and totals
//! the in-memory state gives, and concurrent writers neither deadlock, overdraw, lose money
//! nor apply an idempotency key twice.

mod common;

use std::collections::BTreeSet;

use common::{TestDatabase, database_configured};
use farthing_store_postgres::{apply_batch, connect, query};
use farthing_testing::{Builder, StepSpec, currency, history, key_hash, record_at as record};
use proptest::test_runner::TestCaseError;
use tokio_postgres::Client;

use farthing_ledger::{Amount, Timestamp, TransferId};
use farthing_payments::*;
use proptest::prelude::*;

// =============================================================================================
// Random histories: PostgreSQL against the in-memory state
// =============================================================================================

/// Histories per run: each gets a database of its own.
const CASES: u32 = 24;

async fn count(client: &Client, table: &str) -> usize {
    let row = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap();
    usize::try_from(row.get::<_, i64>(0)).unwrap()
}

/// Every account's totals, by id.
async fn stored_accounts(client: &Client) -> Vec<(u64, [u64; 4])> {
    let mut accounts: Vec<(u64, [u64; 4])> = client
        .query(
            "SELECT id, debits_posted, credits_posted, debits_pending, credits_pending
             FROM accounts ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let total = |i| u64::try_from(row.get::<_, i64>(i)).unwrap();
            (
                row.get::<_, i64>(0) as u64,
                [total(1), total(2), total(3), total(4)],
            )
        })
        .collect();
    // Ids are u64 stored bit-cast: sort them as u64.
    accounts.sort();
    accounts
}

/// Applies `history` to the in-memory state record by record and to PostgreSQL in batches of
/// the given sizes (cycled), and compares outcomes, then totals and row counts.
async fn run_history(history: &[StepSpec], sizes: &[usize]) -> Result<(), TestCaseError> {
    let db = TestDatabase::create("a_random_history_applied_in_batches")
        .await
        .expect("checked before");
    let mut client = db.migrated().await;
    let mut state = State::new();
    let mut builder = Builder::new();
    let mut steps = history.iter();
    let mut last_batch_time = Timestamp(0);
    for &size in sizes.iter().cycle() {
        let mut batch: Vec<Record> = steps
            .by_ref()
            .take(size)
            .map(|step| builder.record(step, &state))
            .collect();
        if batch.is_empty() {
            break;
        }
        // As a server does, each batch is later than the one before: PostgreSQL moves a batch
        // that is not past the last change to its accounts.
        for record in &mut batch {
            record.now = record.now.max(Timestamp(last_batch_time.0 + 1));
        }
        last_batch_time = batch.iter().map(|record| record.now).max().unwrap();
        let expected: Vec<Outcome> = batch.iter().map(|record| state.apply(record)).collect();
        let got = apply_batch(&mut client, &batch).await;
        prop_assert!(got.is_ok(), "batch {:?} failed: {:?}", batch, got);
        prop_assert_eq!(got.unwrap(), expected, "batch {:?}", batch);
    }

    let mut expected_accounts: Vec<(u64, [u64; 4])> = state
        .ledger_accounts()
        .map(|a| {
            (
                a.id.0,
                [
                    a.debits_posted,
                    a.credits_posted,
                    a.debits_pending,
                    a.credits_pending,
                ],
            )
        })
        .collect();
    expected_accounts.sort();
    prop_assert_eq!(stored_accounts(&client).await, expected_accounts);

    prop_assert_eq!(count(&client, "payments").await, state.payment_count());
    let refunds: BTreeSet<RefundId> = builder
        .refund_ids
        .iter()
        .copied()
        .filter(|id| state.refund_record(*id).is_some())
        .collect();
    prop_assert_eq!(count(&client, "refunds").await, refunds.len());
    let payers: BTreeSet<PayerId> = builder.payer_ids.iter().copied().collect();
    let lines: usize = payers
        .iter()
        .filter_map(|id| state.payer_entries(*id, usize::MAX, None).unwrap())
        .map(|page| page.items.len())
        .sum();
    // Every line, wherever it is kept: payments' own lines in their rows, the rest apart.
    prop_assert_eq!(count(&client, "statement").await, lines);
    prop_assert_eq!(
        count(&client, "transfers").await,
        state.ledger_transfer_count()
    );
    let refunded = client
        .query(
            "SELECT uuid_send(id), amount_refunded, fee_refunded FROM payments",
            &[],
        )
        .await
        .unwrap();
    for row in refunded {
        let id = PaymentId::from_u128(u128::from_be_bytes(
            row.get::<_, &[u8]>(0).try_into().unwrap(),
        ));
        let payment = state.payment(id).unwrap();
        prop_assert!(payment.is_some(), "stored payment {:?} is known", id);
        let payment = payment.unwrap();
        prop_assert_eq!(
            (row.get::<_, i64>(1) as u64, row.get::<_, i64>(2) as u64),
            (
                payment.amount_refunded.micros(),
                payment.fee_refunded.micros()
            )
        );
    }
    Ok(())
}

#[test]
fn a_random_history_applied_in_batches_matches_the_in_memory_state() {
    if !database_configured("a_random_history_applied_in_batches_matches_the_in_memory_state") {
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
    let cases = (history(), prop::collection::vec(1..8usize, 1..4));
    let result = proptest::test_runner::TestRunner::new(config).run(&cases, |(history, sizes)| {
        runtime.block_on(run_history(&history, &sizes))
    });
    if let Err(error) = result {
        panic!("{error}");
    }
}

// =============================================================================================
// Concurrent writers
// =============================================================================================

const USD: &str = "USD";

/// A merchant (2% fee), and payers each topped up with `funds` USD micros.
fn setup_records(payers: &[PayerId], funds: u64) -> (MerchantId, Vec<Record>) {
    let merchant = MerchantId::from_u128(1);
    let mut records = vec![record(
        0,
        Command::CreateMerchant {
            id: merchant,
            name: "Café".into(),
            key_hash: key_hash(1),
            fee: FeeSchedule {
                bps: 200,
                fixed: Amount::ZERO,
            },
        },
    )];
    for (n, payer) in payers.iter().enumerate() {
        let n = n as u128;
        records.push(record(
            0,
            Command::CreatePayer {
                id: *payer,
                name: format!("payer {n}"),
                key_hash: key_hash(100 + n),
            },
        ));
        records.push(record(
            0,
            Command::Topup {
                id: TopupId::from_u128(200 + n),
                payer: *payer,
                amount: Amount::from_micros(funds),
                currency: currency(USD),
                source: FundingSource::Sandbox,
                transfer_id: TransferId(300 + n),
            },
        ));
    }
    (merchant, records)
}

/// Applies [`setup_records`].
async fn setup(client: &mut Client, payers: &[PayerId], funds: u64) -> MerchantId {
    let (merchant, records) = setup_records(payers, funds);
    let outcomes = apply_batch(client, &records).await.unwrap();
    assert!(
        outcomes.iter().all(|o| !matches!(o, Outcome::Rejected(_))),
        "{outcomes:?}"
    );
    merchant
}

fn pay(id: u128, payer: PayerId, merchant: MerchantId, amount: u64) -> Command {
    Command::Pay(PayCommand {
        id: PaymentId::from_u128(id),
        payer,
        merchant,
        amount: Amount::from_micros(amount),
        currency: currency(USD),
        description: None,
        reference: None,
        transfer_ids: [TransferId(id), TransferId(id + (1 << 64))],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_paying_from_the_same_wallets_never_deadlock_or_overdraw() {
    let Some(db) = TestDatabase::create("concurrent_batches_paying_from_the_same_wallets").await
    else {
        return;
    };
    const FUNDS: u64 = 600_000;
    const AMOUNT: u64 = 10_000;
    const ROUNDS: u128 = 60;
    let mut client = db.migrated().await;
    let wallets = [PayerId::from_u128(11), PayerId::from_u128(12)];
    let merchant = setup(&mut client, &wallets, FUNDS).await;
    let mut tasks = Vec::new();
    for task in 0..2u128 {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await.unwrap();
            let mut paid = [0u64; 2];
            for round in 0..ROUNDS {
                let order = if task == 0 { [0, 1] } else { [1, 0] };
                let batch: Vec<Record> = order
                    .iter()
                    .map(|&w| {
                        let id = 1_000_000 + task * 1_000_000 + round * 10 + w as u128;
                        record(1 + round as u64, pay(id, wallets[w], merchant, AMOUNT))
                    })
                    .collect();
                let outcomes = apply_batch(&mut client, &batch)
                    .await
                    .expect("no deadlock or conflict survives the retries");
                for (&w, outcome) in order.iter().zip(&outcomes) {
                    match outcome {
                        Outcome::Paid(_) => paid[w] += AMOUNT,
                        Outcome::Rejected(Rejection::InsufficientFunds) => {}
                        other => panic!("unexpected outcome {other:?}"),
                    }
                }
            }
            paid
        }));
    }
    let mut paid = [0u64; 2];
    for task in tasks {
        let by_task = task.await.unwrap();
        paid[0] += by_task[0];
        paid[1] += by_task[1];
    }
    // Demand (2 tasks × 60 rounds × 10 000) exceeds the funds: each wallet is spent exactly.
    assert_eq!(paid, [FUNDS, FUNDS], "each wallet paid out what it held");
    for wallet in wallets {
        let row = client
            .query_one(
                "SELECT debits_posted, credits_posted FROM accounts
                 WHERE owner_kind = 1 AND owner_id = encode($1::BYTEA, 'hex')::UUID",
                &[&wallet.to_u128().to_be_bytes().as_slice()],
            )
            .await
            .unwrap();
        let (debits, credits): (i64, i64) = (row.get(0), row.get(1));
        assert!(
            debits <= credits,
            "{wallet:?} overdrawn: {debits} > {credits}"
        );
        assert_eq!(debits as u64, FUNDS);
    }
    let paid_rows = count(&client, "payments").await;
    assert_eq!(paid_rows as u64, 2 * FUNDS / AMOUNT);
    let net = client
        .query(
            "SELECT currency::TEXT, sum(credits_posted - debits_posted)::BIGINT FROM accounts
             GROUP BY currency",
            &[],
        )
        .await
        .unwrap();
    for row in net {
        assert_eq!(
            row.get::<_, i64>(1),
            0,
            "money is conserved in {}",
            row.get::<_, String>(0)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_claim_in_two_concurrent_batches_is_applied_once() {
    let Some(db) = TestDatabase::create("one_idempotency_claim_in_two_concurrent_batches").await
    else {
        return;
    };
    const KEYS: u128 = 40;
    let mut client = db.migrated().await;
    let payer = PayerId::from_u128(11);
    let merchant = setup(&mut client, &[payer], 10_000_000).await;
    let mut other = connect(&db.url).await.unwrap();
    for n in 0..KEYS {
        let claim = IdempotencyClaim {
            key: IdempotencyKey {
                principal: Principal::Payer(payer),
                key: format!("order-{n}"),
            },
            fingerprint: [n as u8; 32],
        };
        // Two servers got the same request: each chose its own ids.
        let batch = |server: u128| {
            vec![Record {
                idempotency: Some(claim.clone()),
                ..record(
                    1 + n as u64,
                    pay(1_000_000 * (server + 1) + n, payer, merchant, 1_000),
                )
            }]
        };
        let (first, second) = (batch(0), batch(1));
        let (a, b) = tokio::join!(
            apply_batch(&mut client, &first),
            apply_batch(&mut other, &second)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(matches!(a[0], Outcome::Paid(_)), "{a:?}");
        assert_eq!(a, b, "both get the first answer");
    }
    assert_eq!(count(&client, "payments").await, KEYS as usize);
    assert_eq!(count(&client, "idempotency_keys").await, KEYS as usize);
    let row = client
        .query_one(
            "SELECT debits_posted FROM accounts
             WHERE owner_kind = 1 AND owner_id = encode($1::BYTEA, 'hex')::UUID",
            &[&payer.to_u128().to_be_bytes().as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        1_000 * KEYS as i64,
        "each key charged once"
    );
}

fn refund(id: u128, payment: u128, amount: Option<u64>, caller: Principal) -> Command {
    Command::Refund {
        id: RefundId::from_u128(id),
        payment: PaymentId::from_u128(payment),
        amount: amount.map(Amount::from_micros),
        caller,
        transfer_ids: [TransferId(id), TransferId(id + (1 << 64))],
    }
}

#[tokio::test]
async fn refunds_in_later_batches_load_their_payment_and_match_the_in_memory_state() {
    let Some(db) = TestDatabase::create("refunds_in_later_batches_load_their_payment").await else {
        return;
    };
    let mut client = db.migrated().await;
    let payer = PayerId::from_u128(11);
    let (merchant, setup) = setup_records(&[payer], 5_000_000);
    let its = Principal::Merchant(merchant);
    let batches = vec![
        setup,
        vec![
            record(1, pay(1_000, payer, merchant, 1_000_000)),
            record(1, pay(1_001, payer, merchant, 333_333)),
        ],
        vec![
            record(2, refund(2_000, 1_000, Some(250_000), Principal::Operator)),
            record(2, refund(2_001, 1_001, None, its)),
        ],
        vec![
            record(3, refund(2_002, 1_000, Some(250_001), its)),
            record(3, refund(2_003, 1_000, None, Principal::Operator)),
            // Nothing is left, and a payer may not refund.
            record(3, refund(2_004, 1_000, Some(1), Principal::Operator)),
            record(3, refund(2_005, 1_001, None, Principal::Payer(payer))),
            // A refund id already used.
            record(3, refund(2_000, 1_001, None, Principal::Operator)),
        ],
    ];
    let mut state = State::new();
    for batch in &batches {
        let expected: Vec<Outcome> = batch.iter().map(|r| state.apply(r)).collect();
        assert_eq!(apply_batch(&mut client, batch).await.unwrap(), expected);
    }
    let refunded = state.payment(PaymentId::from_u128(1_000)).unwrap().unwrap();
    assert_eq!(refunded.amount_refunded, refunded.amount);
    assert_eq!(refunded.fee_refunded, refunded.fee);
    let mut expected_accounts: Vec<(u64, [u64; 4])> = state
        .ledger_accounts()
        .map(|a| {
            let totals = [
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            ];
            (a.id.0, totals)
        })
        .collect();
    expected_accounts.sort();
    assert_eq!(stored_accounts(&client).await, expected_accounts);
    for id in [1_000u128, 1_001] {
        let payment = state.payment(PaymentId::from_u128(id)).unwrap().unwrap();
        let row = client
            .query_one(
                "SELECT amount_refunded, fee_refunded FROM payments
                 WHERE id = encode($1::BYTEA, 'hex')::UUID",
                &[&id.to_be_bytes().as_slice()],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0) as u64,
            payment.amount_refunded.micros()
        );
        assert_eq!(row.get::<_, i64>(1) as u64, payment.fee_refunded.micros());
    }
    assert_eq!(count(&client, "refunds").await, 4);
    // A top-up, two payments and four refunds: the payments' lines are kept in their rows.
    assert_eq!(count(&client, "statement").await, 1 + 2 + 4);
    assert_eq!(count(&client, "statement_lines").await, 1 + 4);
    assert_eq!(
        count(&client, "payments WHERE balance_after IS NOT NULL").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_refunds_of_the_rest_of_a_payment_refund_it_once() {
    let Some(db) = TestDatabase::create("two_concurrent_refunds_of_the_rest").await else {
        return;
    };
    const PAYMENTS: u128 = 20;
    let mut client = db.migrated().await;
    let payer = PayerId::from_u128(11);
    let merchant = setup(&mut client, &[payer], 50_000_000).await;
    let payments: Vec<Record> = (0..PAYMENTS)
        .map(|n| record(1, pay(1_000 + n, payer, merchant, 1_000_000)))
        .collect();
    apply_batch(&mut client, &payments).await.unwrap();
    let mut other = connect(&db.url).await.unwrap();
    for n in 0..PAYMENTS {
        let first = [record(
            2,
            refund(10_000 + n, 1_000 + n, None, Principal::Operator),
        )];
        let second = [record(
            2,
            refund(20_000 + n, 1_000 + n, None, Principal::Operator),
        )];
        let (a, b) = tokio::join!(
            apply_batch(&mut client, &first),
            apply_batch(&mut other, &second)
        );
        let mut outcomes = [a.unwrap().remove(0), b.unwrap().remove(0)];
        outcomes.sort_by_key(|o| matches!(o, Outcome::Rejected(_)));
        assert!(matches!(outcomes[0], Outcome::Refunded(_)), "{outcomes:?}");
        assert_eq!(
            outcomes[1],
            Outcome::Rejected(Rejection::RefundExceedsPayment)
        );
    }
    assert_eq!(count(&client, "refunds").await, PAYMENTS as usize);
    let row = client
        .query_one(
            "SELECT debits_posted, credits_posted FROM accounts WHERE owner_kind = 1",
            &[],
        )
        .await
        .unwrap();
    // Paid once each, and refunded once each: the wallet holds its top-up again.
    assert_eq!(row.get::<_, i64>(0), 1_000_000 * PAYMENTS as i64);
    assert_eq!(
        row.get::<_, i64>(1),
        50_000_000 + 1_000_000 * PAYMENTS as i64
    );
}

// =============================================================================================
// Large batches
// =============================================================================================

fn pay_item(id: u128, payer: PayerId, merchant: MerchantId, amount: u64) -> PayCommand {
    match pay(id, payer, merchant, amount) {
        Command::Pay(item) => item,
        _ => unreachable!("pay makes a payment"),
    }
}

/// Batches large enough that their payments, statement lines and transfers go in by `COPY`,
/// with rejections, ids taken by earlier batches (among them a top-up's transfer id that a
/// zero-fee payment names for the fee leg it does not use), descriptions and idempotency keys,
/// read back as the in-memory state has them.
#[tokio::test]
async fn large_batches_read_back_as_the_in_memory_state() {
    let Some(db) = TestDatabase::create("large_batches_read_back").await else {
        return;
    };
    let mut client = db.migrated().await;
    let payers: Vec<PayerId> = (11..41).map(PayerId::from_u128).collect();
    let (merchant, setup) = setup_records(&payers, 2_000_000);
    // The top-ups' transfer ids are 300 to 329: no other transfer is recorded.
    // Below 50 micro-units the 2% fee is zero: one leg, and the second transfer id unused.
    let amount = |n: u128| {
        if n.is_multiple_of(7) {
            30
        } else {
            100_000 + (n * 97) % 50_000
        }
    };
    let batch_a = vec![record(
        1,
        Command::PayBatch(
            (0..600u128)
                .map(|n| {
                    let mut item = pay_item(
                        10_000 + n,
                        payers[n as usize % 30],
                        merchant,
                        amount(n) as u64,
                    );
                    if n.is_multiple_of(3) {
                        item.description = Some(format!("order {n} — café ☕"));
                    }
                    if n.is_multiple_of(5) {
                        item.reference = Some(format!("ref-{n}"));
                    }
                    item
                })
                .collect(),
        ),
    )];
    let claim = |n: u128, fingerprint: u8| IdempotencyClaim {
        key: IdempotencyKey {
            principal: Principal::Payer(payers[n as usize % 30]),
            key: format!("b-{n}"),
        },
        fingerprint: [fingerprint; 32],
    };
    let batch_b: Vec<Record> = (0..300u128)
        .map(|n| {
            let payer = payers[n as usize % 30];
            let mut item = pay_item(20_000 + n, payer, merchant, 20);
            match n {
                // A payment id taken in batch A, and a first leg's id taken by a top-up.
                5 => item.id = PaymentId::from_u128(10_001),
                6 => item.transfer_ids[0] = TransferId(300 + 4),
                // A payment's legs leave no records: an id one of batch A's payments
                // used is free.
                9 => item.transfer_ids[1] = TransferId(10_002),
                _ => {}
            }
            Record {
                idempotency: n.is_multiple_of(50).then(|| claim(n, 1)),
                ..record(2, Command::Pay(item))
            }
        })
        .collect();
    let batch_c = vec![
        // Replays of batch B's requests (their ids would collide, but they are not read),
        // and a key reused with another request.
        Record {
            idempotency: Some(claim(0, 1)),
            ..record(3, pay(10_004, payers[0], merchant, 20))
        },
        Record {
            idempotency: Some(claim(50, 1)),
            ..record(3, pay(30_000, payers[20], merchant, 20))
        },
        Record {
            idempotency: Some(claim(100, 2)),
            ..record(3, pay(30_001, payers[10], merchant, 20))
        },
        // A zero-fee payment whose unused second id a top-up took: the largest transfer id
        // recorded, the very bound of the commit's check.
        record(
            3,
            Command::Pay(PayCommand {
                transfer_ids: [TransferId(30_002), TransferId(300 + 29)],
                ..pay_item(30_002, payers[3], merchant, 20)
            }),
        ),
    ];
    let mut state = State::new();
    for batch in [setup, batch_a, batch_b, batch_c] {
        let expected: Vec<Outcome> = batch.iter().map(|r| state.apply(r)).collect();
        let got = apply_batch(&mut client, &batch).await.unwrap();
        assert_eq!(got, expected);
    }
    let rejected = |id: u128| state.payment(PaymentId::from_u128(id)).unwrap().is_none();
    assert!(
        [20_005, 20_006, 30_002].into_iter().all(rejected),
        "ids taken earlier are refused"
    );
    assert!(
        !rejected(20_009),
        "a payment's leg ids are not held against later ones"
    );
    assert!(
        (10_000..10_600u128).any(rejected),
        "some payers run out of money"
    );

    for id in (10_000..10_600u128)
        .chain(20_000..20_300)
        .chain(30_000..30_003)
    {
        let id = PaymentId::from_u128(id);
        assert_eq!(
            query::payment(&client, id).await.unwrap(),
            state.payment(id).unwrap(),
            "{id:?}"
        );
    }
    for payer in &payers {
        let got = query::payer_entries(&client, *payer, 10_000, None)
            .await
            .unwrap()
            .unwrap();
        let expected = state.payer_entries(*payer, 10_000, None).unwrap().unwrap();
        assert_eq!(got.items, expected.items, "{payer:?}");
    }
    let transfers = client
        .query(
            "SELECT uuid_send(id), debit_account, credit_account, amount::TEXT, outcome
             FROM transfers",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(transfers.len(), state.ledger_transfer_count());
    for row in transfers {
        let id = TransferId(u128::from_be_bytes(
            row.get::<_, &[u8]>(0).try_into().unwrap(),
        ));
        let record = state
            .transfer_record(id)
            .expect("a stored transfer is known");
        assert_eq!(row.get::<_, i64>(1) as u64, record.transfer.debit.0);
        assert_eq!(row.get::<_, i64>(2) as u64, record.transfer.credit.0);
        assert_eq!(
            row.get::<_, &str>(3),
            record.transfer.amount.micros().to_string()
        );
        assert_eq!(row.get::<_, i16>(4) == 0, record.outcome.is_ok(), "{id:?}");
    }
    let mut expected_accounts: Vec<(u64, [u64; 4])> = state
        .ledger_accounts()
        .map(|a| {
            let totals = [
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            ];
            (a.id.0, totals)
        })
        .collect();
    expected_accounts.sort();
    assert_eq!(stored_accounts(&client).await, expected_accounts);
}

/// More holds due than two expiries void: a batch of two expiries loads the holds both void
/// (oldest deadline first, ties by payment), and the third expiry the rest, as in memory.
#[tokio::test]
async fn a_batch_of_two_expiries_voids_a_thousand_holds_each_as_in_memory() {
    let Some(db) = TestDatabase::create("a_batch_of_two_expiries").await else {
        return;
    };
    let mut client = db.migrated().await;
    let payer = PayerId::from_u128(11);
    let (merchant, setup) = setup_records(&[payer], 1_000_000);
    let mut state = State::new();
    for record in &setup {
        state.apply(record);
    }
    apply_batch(&mut client, &setup).await.unwrap();
    let count = 2 * u128::from(EXPIRED_PER_COMMAND_MAX) + 7;
    let authorizations: Vec<Record> = (0..count)
        .map(|n| {
            record(
                1_000_000,
                Command::from(HoldCommand::Authorize {
                    pay: PayCommand {
                        transfer_ids: [TransferId(10_000 + 3 * n), TransferId(10_001 + 3 * n)],
                        ..pay_item((n * 7_919) % count + 1_000, payer, merchant, 1)
                    },
                    // Deadlines in an order of their own, many shared.
                    expires_at: Timestamp(
                        farthing_testing::EPOCH + 10_000_000 + (n as u64 * 31) % 97 * 1_000_000,
                    ),
                    settle_id: TransferId(10_002 + 3 * n),
                }),
            )
        })
        .collect();
    // Each batch later than the one before, as a server's are.
    for (n, batch) in authorizations.chunks(500).enumerate() {
        let mut batch = batch.to_vec();
        for record in &mut batch {
            record.now = Timestamp(record.now.0 + n as u64);
        }
        let expected: Vec<Outcome> = batch.iter().map(|record| state.apply(record)).collect();
        assert_eq!(apply_batch(&mut client, &batch).await.unwrap(), expected);
    }
    let expire = record(
        200_000_000,
        Command::from(HoldCommand::Expire {
            at: Timestamp(farthing_testing::EPOCH + 200_000_000),
        }),
    );
    let mut later = expire.clone();
    later.now = Timestamp(later.now.0 + 1);
    for batch in [vec![expire.clone(), expire], vec![later]] {
        let expected: Vec<Outcome> = batch.iter().map(|record| state.apply(record)).collect();
        assert_eq!(apply_batch(&mut client, &batch).await.unwrap(), expected);
    }
    assert_eq!(state.live_holds(), 0);
    assert_eq!(query::next_hold_deadline(&client).await.unwrap(), None);
    for n in 0..count {
        let id = PaymentId::from_u128(n + 1_000);
        assert_eq!(
            query::payment(&client, id).await.unwrap(),
            state.payment(id).unwrap()
        );
    }
}
