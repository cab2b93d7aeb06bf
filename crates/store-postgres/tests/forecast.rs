//! `apply_batch_foreseen` with a shared `Forecast`, on a fresh PostgreSQL database per test
//! (from `FARTHING_TEST_DATABASE_URL`; without it each test says it was skipped). Outcomes and
//! balances are those of the in-memory state when another process changed the accounts after
//! the forecast learnt them; writers sharing one forecast beside a writer without one neither
//! lose, make nor overdraw money; a batch that fails after it was worked out (an id it makes
//! is taken, or it is cancelled) leaves no wrong figures for a batch worked out after it; and a
//! change that left an account's totals as they were still moves the next batch past it.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use common::TestDatabase;
use farthing_ledger::{Amount, MICROS_PER_UNIT, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store_postgres::export::export_all;
use farthing_store_postgres::{
    Answer, Forecast, PgError, apply_batch, apply_batch_foreseen, connect, query,
};
use farthing_testing::{currency, key_hash, record_at as record};
use tokio_postgres::Client;

const UNIT: u64 = MICROS_PER_UNIT;

const FEE: FeeSchedule = FeeSchedule {
    bps: 100,
    fixed: Amount::ZERO,
};

fn create_merchant(id: MerchantId) -> Command {
    Command::CreateMerchant {
        id,
        name: format!("merchant {}", id.to_u128()),
        key_hash: key_hash(id.to_u128()),
        fee: FEE,
    }
}

fn create_payer(id: PayerId) -> Command {
    Command::CreatePayer {
        id,
        name: format!("payer {}", id.to_u128()),
        key_hash: key_hash(id.to_u128()),
    }
}

/// A top-up; `id` also names its transfer, so top-up ids stay below payment ids.
fn topup(id: u128, payer: PayerId, micros: u64) -> Command {
    Command::Topup {
        id: TopupId::from_u128(id),
        payer,
        amount: Amount::from_micros(micros),
        currency: currency("USD"),
        source: FundingSource::Sandbox,
        transfer_id: TransferId(id),
    }
}

fn pay(id: u128, payer: PayerId, merchant: MerchantId, micros: u64) -> Command {
    Command::Pay(PayCommand {
        id: PaymentId::from_u128(id),
        payer,
        merchant,
        amount: Amount::from_micros(micros),
        currency: currency("USD"),
        description: None,
        reference: None,
        transfer_ids: [TransferId(id), TransferId(id + (1 << 64))],
    })
}

/// The outcomes of answers that are none of them replays (no test here sends a key).
fn outcomes(answers: Vec<Answer>) -> Vec<Outcome> {
    answers
        .into_iter()
        .map(|answer| {
            assert!(!answer.replayed, "no idempotency key was sent: {answer:?}");
            answer.outcome
        })
        .collect()
}

/// The in-memory state's outcomes for `records`, applied after everything before them.
fn expect(state: &mut State, records: &[Record]) -> Vec<Outcome> {
    records.iter().map(|record| state.apply(record)).collect()
}

/// The payers' wallets that hold less than nothing.
fn overdrawn(items: &[Imported]) -> Vec<(PayerId, u64, u64)> {
    items
        .iter()
        .filter_map(|item| match item {
            Imported::Account {
                owner: Owner::Payer(payer),
                account,
            } if account.debits_posted + account.debits_pending > account.credits_posted => {
                Some((*payer, account.debits_posted, account.credits_posted))
            }
            _ => None,
        })
        .collect()
}

/// The database holds exactly what `state` does (a payer's balance first, for a short message),
/// and no wallet is overdrawn.
async fn assert_holds(client: &mut Client, state: &State, payer: PayerId) {
    assert_eq!(
        query::payer_balances(&*client, payer).await.unwrap(),
        state.payer_balances(payer).unwrap(),
        "{payer:?}'s balance"
    );
    let stored = export_all(client).await.expect("export");
    assert_eq!(overdrawn(&stored), vec![], "no wallet is overdrawn");
    let expected: Vec<Imported> = state.export().collect();
    assert_eq!(stored.len(), expected.len(), "items exported");
    for (index, (got, want)) in stored.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "exported item {index}");
    }
}

#[tokio::test]
async fn a_stale_forecast_never_changes_an_outcome() {
    let Some(db) = TestDatabase::create("a_stale_forecast_never_changes_an_outcome").await else {
        return;
    };
    let mut ours = db.migrated().await;
    let mut theirs = connect(&db.url).await.expect("a second connection");
    let (merchant, wallet) = (MerchantId::from_u128(1), PayerId::from_u128(2));
    let mut state = State::new();
    let forecast = Forecast::default();
    let setup = [
        record(0, create_merchant(merchant)),
        record(0, create_payer(wallet)),
        record(0, topup(10, wallet, 100 * UNIT)),
    ];
    let expected = expect(&mut state, &setup);
    assert_eq!(apply_batch(&mut ours, &setup).await.unwrap(), expected);

    // This process pays once: the forecast now knows the wallet, at 90.
    let batch = [record(1, pay(1_000, wallet, merchant, 10 * UNIT))];
    let expected = expect(&mut state, &batch);
    assert!(matches!(expected[..], [Outcome::Paid(_)]), "{expected:?}");
    let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
        .await
        .unwrap();
    assert_eq!(outcomes(got), expected);
    assert!(
        !forecast.is_empty(),
        "the forecast learnt the batch's accounts"
    );

    // Another process spends 80 of those 90.
    let batch = [record(2, pay(1_001, wallet, merchant, 80 * UNIT))];
    let expected = expect(&mut state, &batch);
    assert!(matches!(expected[..], [Outcome::Paid(_)]), "{expected:?}");
    assert_eq!(apply_batch(&mut theirs, &batch).await.unwrap(), expected);

    // The forecast still says 90: 50 would fit there, but the wallet holds 10. The 8 after it
    // fits either way.
    let batch = [
        record(3, pay(1_002, wallet, merchant, 50 * UNIT)),
        record(3, pay(1_003, wallet, merchant, 8 * UNIT)),
    ];
    let expected = expect(&mut state, &batch);
    assert!(
        matches!(
            expected[..],
            [
                Outcome::Rejected(Rejection::InsufficientFunds),
                Outcome::Paid(_)
            ]
        ),
        "{expected:?}"
    );
    let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
        .await
        .unwrap();
    assert_eq!(
        outcomes(got),
        expected,
        "declined as the whole state declines"
    );
    assert_holds(&mut ours, &state, wallet).await;

    // Payments that fit are paid, past the batches that lock first after a wrong forecast.
    for n in 0..6 {
        let batch = [record(
            4 + n,
            pay(1_010 + u128::from(n), wallet, merchant, UNIT / 4),
        )];
        let expected = expect(&mut state, &batch);
        assert!(matches!(expected[..], [Outcome::Paid(_)]), "{expected:?}");
        let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
            .await
            .unwrap();
        assert_eq!(outcomes(got), expected, "payment {n} after the decline");
    }

    // The other way: another process tops the wallet up, so a payment the forecast would
    // decline is paid.
    let batch = [record(20, topup(11, wallet, 50 * UNIT))];
    let expected = expect(&mut state, &batch);
    assert_eq!(apply_batch(&mut theirs, &batch).await.unwrap(), expected);
    let batch = [record(21, pay(1_020, wallet, merchant, 40 * UNIT))];
    let expected = expect(&mut state, &batch);
    assert!(matches!(expected[..], [Outcome::Paid(_)]), "{expected:?}");
    let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
        .await
        .unwrap();
    assert_eq!(outcomes(got), expected, "paid as the whole state pays it");
    assert_holds(&mut ours, &state, wallet).await;
}

/// Another process holds money in the wallet and gives it back: the totals are as the forecast
/// says, only the time they last changed is not. A batch worked out from the forecast would
/// take a time before that change although it commits after it; it is applied again from the
/// locked accounts, and its payment comes after the release in every list.
#[tokio::test]
async fn a_batch_is_timed_after_a_change_that_left_the_totals_as_they_were() {
    let Some(db) =
        TestDatabase::create("a_batch_is_timed_after_a_change_that_left_the_totals_as_they_were")
            .await
    else {
        return;
    };
    let mut ours = db.migrated().await;
    let mut theirs = connect(&db.url).await.expect("a second connection");
    let (merchant, wallet) = (MerchantId::from_u128(1), PayerId::from_u128(2));
    let mut state = State::new();
    let forecast = Forecast::default();
    let setup = [
        record(0, create_merchant(merchant)),
        record(0, create_payer(wallet)),
        record(0, topup(10, wallet, 100 * UNIT)),
    ];
    let expected = expect(&mut state, &setup);
    assert_eq!(apply_batch(&mut ours, &setup).await.unwrap(), expected);
    let batch = [record(1, pay(1_000, wallet, merchant, 10 * UNIT))];
    let expected = expect(&mut state, &batch);
    let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
        .await
        .unwrap();
    assert_eq!(outcomes(got), expected);

    // Another process places a hold at 10 and cancels it at 20.
    let Command::Pay(held) = pay(2_000, wallet, merchant, 30 * UNIT) else {
        unreachable!("pay makes a payment")
    };
    let hold = [record(
        10,
        Command::from(HoldCommand::Authorize {
            pay: held,
            expires_at: Timestamp(farthing_testing::EPOCH + 3_600_000_000),
            settle_id: TransferId(2_002),
        }),
    )];
    let cancel = [record(
        20,
        Command::from(HoldCommand::Cancel {
            payment: PaymentId::from_u128(2_000),
            caller: Principal::Merchant(merchant),
        }),
    )];
    for batch in [&hold[..], &cancel[..]] {
        let expected = expect(&mut state, batch);
        assert!(matches!(expected[..], [Outcome::Room(_)]), "{expected:?}");
        assert_eq!(apply_batch(&mut theirs, batch).await.unwrap(), expected);
    }

    // This process pays with a clock at 5.
    let batch = [record(5, pay(1_001, wallet, merchant, 10 * UNIT))];
    let got = apply_batch_foreseen(&mut ours, &batch, &forecast)
        .await
        .unwrap();
    let [Outcome::Paid(payment)] = &outcomes(got)[..] else {
        panic!("paid")
    };
    assert!(
        payment.created_at > Timestamp(farthing_testing::EPOCH + 20),
        "made at {:?}, before the release it committed after",
        payment.created_at
    );
    let newest = query::list_payments(&ours, Principal::Payer(wallet), 1, None)
        .await
        .unwrap()
        .expect("the payer's payments");
    assert_eq!(newest.items[0].id, payment.id, "the newest payment");
}

/// Two processes, each with two writers sharing its own forecast, pay from many wallets to the
/// same few merchants (and the platform's fee account). Each process keeps finding the shared
/// accounts changed by the other, so its batches mix worked-out and lock-first ones; both kinds
/// must take the accounts in one order (by id), or two batches wait on each other in a cycle
/// until PostgreSQL breaks it as a deadlock, a second later. No attempt is redone, and every
/// payment is kept as it was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_with_forecasts_take_shared_accounts_without_deadlocks() {
    let Some(db) = TestDatabase::create("two_processes_with_forecasts_without_deadlocks").await
    else {
        return;
    };
    const WALLETS: u128 = 400;
    const MERCHANTS: u128 = 4;
    const SIZE: usize = 60;
    const BATCHES: usize = 30;
    let mut client = db.migrated().await;
    let merchants: Vec<MerchantId> = (1..=MERCHANTS).map(MerchantId::from_u128).collect();
    let wallets: Vec<PayerId> = (11..11 + WALLETS).map(PayerId::from_u128).collect();
    let setup = funded(&merchants, &wallets, 1_000 * UNIT, 1_000);
    apply_batch(&mut client, &setup).await.unwrap();
    // Every merchant's and the fee account exist before the race.
    let opening: Vec<Record> = merchants
        .iter()
        .enumerate()
        .map(|(n, &merchant)| record(0, pay(10_000 + n as u128, wallets[0], merchant, UNIT)))
        .collect();
    apply_batch(&mut client, &opening).await.unwrap();

    let mut random = Random(0xDEAD_10C5);
    let parties = (&wallets[..], &merchants[..]);
    let processes = [1_000_000, 2_000_000].map(|first_id| {
        Arc::new(random_batches(
            &mut random,
            parties,
            first_id,
            (BATCHES, SIZE),
            UNIT,
        ))
    });
    let start = Arc::new(tokio::sync::Barrier::new(4));
    let mut forecasts = Vec::new();
    let mut writers = Vec::new();
    for batches in &processes {
        let forecast = Arc::new(Forecast::default());
        forecasts.push(forecast.clone());
        let queue = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            writers.push(forecast_writer(
                db.url.clone(),
                batches.clone(),
                forecast.clone(),
                queue.clone(),
                start.clone(),
            ));
        }
    }
    let mut paid = Vec::new();
    for writer in writers {
        for (_, outcomes) in writer.await.unwrap() {
            paid.extend(outcomes.into_iter().filter_map(|outcome| match outcome {
                Outcome::Paid(payment) => Some(payment.id),
                _ => None,
            }));
        }
    }
    assert_eq!(
        paid.len(),
        2 * BATCHES * SIZE,
        "every payment fits its wallet"
    );
    let conflicts: Vec<u64> = forecasts
        .iter()
        .map(|forecast| forecast.conflicts())
        .collect();
    assert_eq!(conflicts, [0, 0], "attempts redone after a deadlock");
    let stored = export_all(&mut client).await.expect("export");
    assert_eq!(overdrawn(&stored), vec![], "no wallet is overdrawn");
    let stored: BTreeMap<PaymentId, ()> = stored
        .iter()
        .filter_map(|item| match item {
            Imported::Payment(payment) if payment.id.to_u128() >= 1_000_000 => {
                Some((payment.id, ()))
            }
            _ => None,
        })
        .collect();
    paid.sort();
    assert_eq!(
        stored.into_keys().collect::<Vec<_>>(),
        paid,
        "the payments stored are those answered paid"
    );
}

/// SplitMix64: the same payments on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The merchants, and the payers each with a wallet topped up with `funds` (the top-ups' ids
/// count up from `first_topup`).
fn funded(
    merchants: &[MerchantId],
    wallets: &[PayerId],
    funds: u64,
    first_topup: u128,
) -> Vec<Record> {
    let mut setup: Vec<Record> = merchants
        .iter()
        .map(|&merchant| record(0, create_merchant(merchant)))
        .collect();
    for (n, &wallet) in wallets.iter().enumerate() {
        setup.push(record(0, create_payer(wallet)));
        setup.push(record(0, topup(first_topup + n as u128, wallet, funds)));
    }
    setup
}

/// `count` batches of `size` payments, each from a random wallet to a random merchant of 1 to
/// `most` micro-units, with ids counting up from `first_id`; batch `b` comes at time `1 + b`.
fn random_batches(
    random: &mut Random,
    (wallets, merchants): (&[PayerId], &[MerchantId]),
    first_id: u128,
    (count, size): (usize, usize),
    most: u64,
) -> Vec<Vec<Record>> {
    (0..count)
        .map(|b| {
            (0..size)
                .map(|i| {
                    let id = first_id + (b * size + i) as u128;
                    let wallet = wallets[random.below(wallets.len() as u64) as usize];
                    let merchant = merchants[random.below(merchants.len() as u64) as usize];
                    let amount = 1 + random.below(most);
                    record(1 + b as u64, pay(id, wallet, merchant, amount))
                })
                .collect()
        })
        .collect()
}

/// One writer of a process: once everyone has started, takes the next of `batches` from
/// `queue` until none is left and applies it with the process's `forecast`. Returns each batch
/// it applied, by its place in `batches`, with the outcomes.
fn forecast_writer(
    url: String,
    batches: Arc<Vec<Vec<Record>>>,
    forecast: Arc<Forecast>,
    queue: Arc<AtomicUsize>,
    start: Arc<tokio::sync::Barrier>,
) -> tokio::task::JoinHandle<Vec<(usize, Vec<Outcome>)>> {
    tokio::spawn(async move {
        let mut client = connect(&url).await.expect("a writer's connection");
        start.wait().await;
        let mut answered = Vec::new();
        loop {
            let taken = queue.fetch_add(1, Ordering::Relaxed);
            let Some(batch) = batches.get(taken) else {
                return answered;
            };
            let answers = apply_batch_foreseen(&mut client, batch, &forecast)
                .await
                .expect("a batch of this process applies");
            answered.push((taken, outcomes(answers)));
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_sharing_a_forecast_beside_another_process_keep_every_account_right() {
    let Some(db) = TestDatabase::create("writers_sharing_a_forecast_beside_another_process").await
    else {
        return;
    };
    const WALLETS: u128 = 10;
    const MERCHANTS: u128 = 3;
    const FUNDS: u64 = 1_000 * UNIT;
    const SIZE: usize = 50;
    const OURS: usize = 40;
    const THEIRS: usize = 20;
    let mut client = db.migrated().await;
    let merchants: Vec<MerchantId> = (1..=MERCHANTS).map(MerchantId::from_u128).collect();
    let wallets: Vec<PayerId> = (11..11 + WALLETS).map(PayerId::from_u128).collect();
    let setup = funded(&merchants, &wallets, FUNDS, 100);
    let set_up = apply_batch(&mut client, &setup).await.unwrap();
    assert!(
        set_up.iter().all(|o| !matches!(o, Outcome::Rejected(_))),
        "{set_up:?}"
    );

    // 3 000 payments of up to 20 (10 on average) from wallets of 1 000 each: about a third
    // fit.
    let mut random = Random(0x5EED);
    let parties = (&wallets[..], &merchants[..]);
    let ours = Arc::new(random_batches(
        &mut random,
        parties,
        1_000_000,
        (OURS, SIZE),
        20 * UNIT,
    ));
    let theirs = random_batches(&mut random, parties, 2_000_000, (THEIRS, SIZE), 20 * UNIT);

    // Two writers of this process take batches from one queue and share one forecast; another
    // process writes at the same time without one.
    let forecast = Arc::new(Forecast::default());
    let queue = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(3));
    let writers: Vec<_> = (0..2)
        .map(|_| {
            forecast_writer(
                db.url.clone(),
                ours.clone(),
                forecast.clone(),
                queue.clone(),
                start.clone(),
            )
        })
        .collect();
    let other = {
        let (url, theirs, start) = (db.url.clone(), theirs.clone(), start.clone());
        tokio::spawn(async move {
            let mut client = connect(&url).await.expect("the other process's connection");
            start.wait().await;
            let mut answered = Vec::new();
            for batch in &theirs {
                answered.push(
                    apply_batch(&mut client, batch)
                        .await
                        .expect("a batch of the other process applies"),
                );
            }
            answered
        })
    };
    let mut answered: Vec<(usize, Vec<Outcome>)> = Vec::new();
    for writer in writers {
        answered.extend(writer.await.unwrap());
    }
    answered.sort_by_key(|(taken, _)| *taken);
    assert_eq!(
        answered.iter().map(|(taken, _)| *taken).collect::<Vec<_>>(),
        (0..OURS).collect::<Vec<_>>(),
        "each batch of this process applied once"
    );
    let answered: Vec<Vec<Outcome>> = answered
        .into_iter()
        .map(|(_, outcomes)| outcomes)
        .chain(other.await.unwrap())
        .collect();

    // Every payment is paid as asked or declined for want of funds.
    let mut accepted: HashMap<PaymentId, Payment> = HashMap::new();
    let mut declined = Vec::new();
    for (batch, outcomes) in ours.iter().chain(&theirs).zip(&answered) {
        assert_eq!(batch.len(), outcomes.len());
        for (record, outcome) in batch.iter().zip(outcomes) {
            let Command::Pay(asked) = &record.command else {
                unreachable!("only payments are sent")
            };
            match outcome {
                Outcome::Paid(payment) => {
                    assert_eq!(
                        (
                            payment.id,
                            payment.payer,
                            payment.merchant,
                            payment.amount,
                            payment.fee
                        ),
                        (
                            asked.id,
                            asked.payer,
                            asked.merchant,
                            asked.amount,
                            FEE.fee_on(asked.amount)
                        )
                    );
                    accepted.insert(payment.id, payment.clone());
                }
                Outcome::Rejected(Rejection::InsufficientFunds) => declined.push(asked.id),
                other => panic!("payment {:?}: unexpected outcome {other:?}", asked.id),
            }
        }
    }
    assert!(
        accepted.len() > 500 && declined.len() > 500,
        "the wallets ran out: {} paid, {} declined",
        accepted.len(),
        declined.len()
    );

    let stored = export_all(&mut client).await.expect("export");
    // Exactly the payments answered paid are stored, as they were answered.
    let stored_payments: HashMap<PaymentId, Payment> = stored
        .iter()
        .filter_map(|item| match item {
            Imported::Payment(payment) => Some((payment.id, payment.clone())),
            _ => None,
        })
        .collect();
    let missing = accepted
        .keys()
        .filter(|id| !stored_payments.contains_key(id))
        .count();
    assert_eq!(missing, 0, "payments answered paid but not stored");
    let kept = declined
        .iter()
        .filter(|id| stored_payments.contains_key(id))
        .count();
    assert_eq!(kept, 0, "payments answered declined but stored");
    assert!(stored_payments == accepted, "stored payments differ");

    // Each account holds what the payments answered paid moved, and no more.
    let stored_accounts: BTreeMap<Owner, [u64; 4]> = stored
        .iter()
        .filter_map(|item| match item {
            Imported::Account { owner, account } => Some((
                *owner,
                [
                    account.debits_posted,
                    account.credits_posted,
                    account.debits_pending,
                    account.credits_pending,
                ],
            )),
            _ => None,
        })
        .collect();
    assert_eq!(overdrawn(&stored), vec![], "no wallet is overdrawn");
    let mut expected: BTreeMap<Owner, [u64; 4]> = BTreeMap::new();
    expected.insert(Owner::ExternalFunding, [WALLETS as u64 * FUNDS, 0, 0, 0]);
    for &wallet in &wallets {
        expected.insert(Owner::Payer(wallet), [0, FUNDS, 0, 0]);
    }
    for payment in accepted.values() {
        let net = payment.net().micros();
        let fee = payment.fee.micros();
        expected.get_mut(&Owner::Payer(payment.payer)).unwrap()[0] += payment.amount.micros();
        expected
            .entry(Owner::Merchant(payment.merchant))
            .or_default()[1] += net;
        expected.entry(Owner::PlatformFees).or_default()[1] += fee;
    }
    let total = |accounts: &BTreeMap<Owner, [u64; 4]>| -> i128 {
        accounts
            .iter()
            .filter(|(owner, _)| **owner != Owner::ExternalFunding)
            .map(|(_, [debits, credits, _, _])| i128::from(*credits) - i128::from(*debits))
            .sum()
    };
    assert_eq!(
        total(&stored_accounts),
        i128::from(WALLETS as u64 * FUNDS),
        "money is conserved: the parties hold what was topped up"
    );
    for merchant in &merchants {
        assert_eq!(
            stored_accounts.get(&Owner::Merchant(*merchant)),
            expected.get(&Owner::Merchant(*merchant)),
            "{merchant:?} received the payments answered paid to it, less fees"
        );
    }
    assert_eq!(stored_accounts, expected, "every account's totals");
}

/// Polls `batch` until `worked_out()` holds after a poll that left it waiting, and leaves it
/// there, unfinished.
async fn run_until<F>(mut batch: Pin<&mut F>, worked_out: impl Fn() -> bool)
where
    F: Future<Output = Result<Vec<Answer>, PgError>>,
{
    std::future::poll_fn(|cx| match batch.as_mut().poll(cx) {
        Poll::Ready(result) => panic!("the batch ended before it was worked out: {result:?}"),
        Poll::Pending if worked_out() => Poll::Ready(()),
        Poll::Pending => Poll::Pending,
    })
    .await
}

/// How the first of two batches worked out one after the other fails.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Failure {
    /// A payment id it makes is taken: it is rolled back and applied again, and pays less.
    IdTaken,
    /// It is dropped, unfinished, after it was worked out: none of it commits.
    Cancelled,
}

/// Two batches of one process are worked out from the forecast, the second from what the
/// first leaves; then the first fails. The second, and the batches after it, must come out as
/// the in-memory state fed what committed says.
async fn a_failed_batch_leaves_no_wrong_figures(test: &str, failure: Failure) {
    let Some(db) = TestDatabase::create(test).await else {
        return;
    };
    let mut first = db.migrated().await;
    let mut second = connect(&db.url).await.expect("a second connection");
    let (shop, cafe) = (MerchantId::from_u128(1), MerchantId::from_u128(2));
    let (wallet, neighbour) = (PayerId::from_u128(11), PayerId::from_u128(12));
    const TAKEN: u128 = 900;
    let mut state = State::new();
    // Every account the batches read exists, so that the forecast can know them all; payment
    // `TAKEN` is stored.
    let setup = [
        record(0, create_merchant(shop)),
        record(0, create_merchant(cafe)),
        record(0, create_payer(wallet)),
        record(0, create_payer(neighbour)),
        record(0, topup(20, wallet, 100 * UNIT)),
        record(0, topup(21, neighbour, 100 * UNIT)),
        record(0, pay(TAKEN, neighbour, shop, 10 * UNIT)),
        record(0, pay(901, neighbour, cafe, 10 * UNIT)),
    ];
    let expected = expect(&mut state, &setup);
    assert!(
        expected.iter().all(|o| !matches!(o, Outcome::Rejected(_))),
        "{expected:?}"
    );
    assert_eq!(apply_batch(&mut first, &setup).await.unwrap(), expected);

    let forecast = Forecast::default();
    let doomed_id = match failure {
        Failure::IdTaken => TAKEN,
        Failure::Cancelled => 1_000,
    };
    // Worked out from the forecast, the wallet is left at 40; then at 10.
    let doomed = [
        record(1, pay(doomed_id, wallet, shop, 40 * UNIT)),
        record(1, pay(1_001, wallet, shop, 20 * UNIT)),
    ];
    let after = [record(2, pay(2_000, wallet, cafe, 30 * UNIT))];
    let mut doomed_batch = Box::pin(apply_batch_foreseen(&mut first, &doomed, &forecast));
    // The forecast learns the accounts of the first batch and works it out at once.
    run_until(doomed_batch.as_mut(), || !forecast.is_empty()).await;
    let known = forecast.len();
    let mut after_batch = Box::pin(apply_batch_foreseen(&mut second, &after, &forecast));
    // The second learns the café's account, and is worked out from what the first left.
    run_until(after_batch.as_mut(), || forecast.len() > known).await;
    match failure {
        Failure::IdTaken => {
            let expected = expect(&mut state, &doomed);
            assert!(
                matches!(
                    expected[..],
                    [Outcome::Rejected(Rejection::IdCollision), Outcome::Paid(_)]
                ),
                "{expected:?}"
            );
            let got = doomed_batch
                .await
                .expect("applied again with the ids loaded");
            assert_eq!(outcomes(got), expected);
        }
        Failure::Cancelled => drop(doomed_batch),
    }
    let expected = expect(&mut state, &after);
    assert!(matches!(expected[..], [Outcome::Paid(_)]), "{expected:?}");
    let got = after_batch.await.expect("the second batch applies");
    assert_eq!(outcomes(got), expected);
    if failure == Failure::Cancelled {
        for id in [1_000, 1_001] {
            let stored = query::payment(&first, PaymentId::from_u128(id)).await;
            assert_eq!(stored.unwrap(), None, "payment {id} of the cancelled batch");
        }
    }
    assert_holds(&mut first, &state, wallet).await;

    // Later batches, on both connections, with the same forecast: 45 fits the wallet (50 or
    // 70) but not the figures a failed batch would have left (10).
    let amounts = [45, 3, 3, 3, 3, 3, 30, 2];
    for (n, units) in amounts.into_iter().enumerate() {
        let batch = [record(
            3 + n as u64,
            pay(3_000 + n as u128, wallet, shop, units * UNIT),
        )];
        let expected = expect(&mut state, &batch);
        let client = if n % 2 == 0 { &mut first } else { &mut second };
        let got = apply_batch_foreseen(client, &batch, &forecast)
            .await
            .unwrap();
        assert_eq!(outcomes(got), expected, "batch {n} after the failure");
    }
    assert!(
        matches!(
            state.payment(PaymentId::from_u128(3_000)).unwrap(),
            Some(payment) if payment.amount.micros() == 45 * UNIT
        ),
        "the first later payment is paid"
    );
    assert_holds(&mut first, &state, wallet).await;
}

#[tokio::test]
async fn a_batch_whose_id_is_taken_leaves_no_wrong_figures_behind() {
    a_failed_batch_leaves_no_wrong_figures(
        "a_batch_whose_id_is_taken_leaves_no_wrong_figures",
        Failure::IdTaken,
    )
    .await;
}

#[tokio::test]
async fn a_batch_cancelled_after_it_was_worked_out_leaves_no_wrong_figures_behind() {
    a_failed_batch_leaves_no_wrong_figures(
        "a_batch_cancelled_after_it_was_worked_out_leaves_no_wrong_figures",
        Failure::Cancelled,
    )
    .await;
}
