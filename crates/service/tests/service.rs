//! The service over a real file journal: group commit, restart, idempotent creation, and reads
//! that never show what a crash could take back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use farthing_ledger::{Amount, Currency, MICROS_PER_UNIT, Timestamp};
use farthing_payments::*;
use farthing_service::*;
use farthing_store::{Journal, StoreError};
use farthing_store_embedded::FileJournal;
use farthing_testing::TempDir;

const EPOCH: u64 = 1_700_000_000_000_000;

fn usd() -> Currency {
    Currency::parse("USD").expect("known")
}

fn eur() -> Currency {
    Currency::parse("EUR").expect("known")
}

fn units(n: u64) -> Amount {
    Amount::from_micros(n * MICROS_PER_UNIT)
}

fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(EPOCH)))
}

async fn open_with(
    journal: Box<dyn Journal>,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn Ids>,
    operator_key: Option<Secret>,
) -> Opened {
    match Service::open(journal, Config::default(), clock, ids, operator_key).await {
        Ok(opened) => opened,
        Err(error) => panic!("the service opens: {error}"),
    }
}

async fn open(dir: &TempDir, clock: Arc<dyn Clock>, operator_key: Option<Secret>) -> Opened {
    let journal = FileJournal::open(dir.path()).expect("the journal opens");
    open_with(
        Box::new(journal),
        clock,
        Arc::new(TimeOrderedIds),
        operator_key,
    )
    .await
}

/// Stops the service and waits for its writer (which blocks), off the async workers.
async fn shutdown(service: Service) {
    tokio::task::spawn_blocking(move || service.shutdown())
        .await
        .expect("shutdown finishes");
}

fn claim(principal: Principal, key: &str, body: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: IdempotencyKey {
            principal,
            key: key.to_string(),
        },
        fingerprint: fingerprint(&[b"POST", b"/v1/test", body.as_bytes()]),
    }
}

async fn create_payer(service: &Service, name: &str) -> (PayerId, Secret) {
    let executed = service
        .create_payer(name.to_string(), None)
        .await
        .expect("submits");
    match executed.outcome {
        Outcome::PayerCreated(payer) => (payer.id, executed.api_key.expect("a new key")),
        other => panic!("expected a payer, got {other:?}"),
    }
}

async fn create_merchant(
    service: &Service,
    name: &str,
    fee: Option<FeeSchedule>,
) -> (MerchantId, Secret) {
    let executed = service
        .create_merchant(name.to_string(), fee, None)
        .await
        .expect("submits");
    match executed.outcome {
        Outcome::MerchantCreated(merchant) => (merchant.id, executed.api_key.expect("a new key")),
        other => panic!("expected a merchant, got {other:?}"),
    }
}

async fn topup(service: &Service, payer: PayerId, amount: Amount, currency: Currency) {
    let executed = service
        .topup(payer, amount, currency, FundingSource::Sandbox, None)
        .await
        .expect("submits");
    assert!(
        matches!(executed.outcome, Outcome::ToppedUp(_)),
        "{:?}",
        executed.outcome
    );
}

async fn pay(
    service: &Service,
    payer: PayerId,
    merchant: MerchantId,
    amount: Amount,
    currency: Currency,
) -> Outcome {
    let command = service.pay_command(payer, merchant, amount, currency, None, None);
    service
        .submit(Command::Pay(command), None)
        .await
        .expect("submits")
        .outcome
}

fn paid(outcome: Outcome) -> Payment {
    match outcome {
        Outcome::Paid(payment) => payment,
        other => panic!("expected a payment, got {other:?}"),
    }
}

fn operator_payment_ids(state: &State) -> Vec<PaymentId> {
    state
        .list_payments(Principal::Operator, usize::MAX, None)
        .unwrap()
        .expect("the operator sees all")
        .items
        .iter()
        .map(|p| p.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_payments_all_succeed_in_fewer_commits_than_payments() {
    const PAYMENTS: u64 = 200;
    let dir = TempDir::new("group-commit");
    let clock = manual_clock();
    let journal = FileJournal::open(dir.path()).expect("opens");
    let opened = open_with(
        Box::new(journal),
        clock,
        Arc::new(SequentialIds::new(1)),
        None,
    )
    .await;
    let service = opened.service;
    let (payer, _) = create_payer(&service, "payer").await;
    let (merchant, _) = create_merchant(&service, "shop", None).await;
    topup(&service, payer, units(1_000), usd()).await;

    let metrics = service.metrics();
    let commits_before = metrics.commits.load(Ordering::SeqCst);
    let records_before = metrics.records_committed.load(Ordering::SeqCst);
    let applied_before = service.read_now(|state| state.records_applied());
    let barrier = Arc::new(tokio::sync::Barrier::new(PAYMENTS as usize));
    let tasks: Vec<_> = (0..PAYMENTS)
        .map(|i| {
            let service = service.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let amount = Amount::from_micros(1_000 + i);
                (amount, pay(&service, payer, merchant, amount, usd()).await)
            })
        })
        .collect();
    let mut spent = 0;
    for task in tasks {
        let (amount, outcome) = task.await.expect("the task finishes");
        let payment = paid(outcome);
        assert_eq!(payment.amount, amount);
        spent += i128::from(amount.micros());
    }

    let commits = metrics.commits.load(Ordering::SeqCst) - commits_before;
    let records = metrics.records_committed.load(Ordering::SeqCst) - records_before;
    let applied = service.read_now(|state| state.records_applied()) - applied_before;
    assert!(commits >= 1);
    assert!(
        commits < PAYMENTS,
        "{PAYMENTS} payments took {commits} commits: nothing was grouped"
    );
    // The clock did not move, so no pruning record joined them: one record per payment.
    assert_eq!(records, PAYMENTS);
    assert_eq!(applied, PAYMENTS);
    let (count, balance) = service
        .read(|state| {
            (
                state.payment_count(),
                state.payer_balances(payer).unwrap().expect("known")[0].1,
            )
        })
        .await
        .expect("reads");
    assert_eq!(count, PAYMENTS as usize);
    assert_eq!(
        balance,
        i128::from(units(1_000).micros()) - spent,
        "every payment moved its money once"
    );
    shutdown(service).await;
}

/// Everything a caller can see about some parties.
#[derive(Debug, PartialEq)]
struct Snapshot {
    records_applied: u64,
    counts: (usize, usize, usize, usize),
    payer_balances: Vec<Option<Vec<(Currency, i128)>>>,
    merchant_balances: Vec<Option<Vec<(Currency, i128)>>>,
    payments: Vec<Vec<Payment>>,
    statements: Vec<Vec<Entry>>,
    totals: Vec<CurrencyTotals>,
}

fn snapshot(state: &State, payers: &[PayerId], merchants: &[MerchantId]) -> Snapshot {
    let list = |principal| -> Vec<Payment> {
        state
            .list_payments(principal, usize::MAX, None)
            .unwrap()
            .expect("a known principal")
            .items
            .into_iter()
            .collect()
    };
    let mut principals = vec![Principal::Operator];
    principals.extend(payers.iter().map(|p| Principal::Payer(*p)));
    principals.extend(merchants.iter().map(|m| Principal::Merchant(*m)));
    Snapshot {
        records_applied: state.records_applied(),
        counts: (
            state.payer_count(),
            state.merchant_count(),
            state.payment_count(),
            state.ledger_transfer_count(),
        ),
        payer_balances: payers
            .iter()
            .map(|p| state.payer_balances(*p).unwrap())
            .collect(),
        merchant_balances: merchants
            .iter()
            .map(|m| state.merchant_balances(*m).unwrap())
            .collect(),
        payments: principals.into_iter().map(list).collect(),
        statements: payers
            .iter()
            .map(|p| {
                state
                    .payer_entries(*p, usize::MAX, None)
                    .unwrap()
                    .expect("a known payer")
                    .items
            })
            .collect(),
        totals: state.currency_totals(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_to_the_same_state_and_the_operator_key_given_still_works() {
    let dir = TempDir::new("restart");
    let operator = Secret::new("fk_op_restart-test-operator-key".to_string());
    let opened = open(&dir, Arc::new(SystemClock), Some(operator.clone())).await;
    assert!(
        opened.generated_operator_key.is_none(),
        "a key was given, none is made"
    );
    let service = opened.service;
    assert_eq!(
        service.authenticate(&operator).await.unwrap(),
        Some(Principal::Operator)
    );

    let (alice, alice_key) = create_payer(&service, "Alice").await;
    let (bob, _) = create_payer(&service, "Bob").await;
    let fee = FeeSchedule {
        bps: 290,
        fixed: Amount::from_micros(30_000),
    };
    let (cafe, cafe_key) = create_merchant(&service, "Café", Some(fee)).await;
    let (books, _) = create_merchant(&service, "Books", None).await;
    topup(&service, alice, units(100), usd()).await;
    topup(&service, alice, units(20), eur()).await;
    topup(&service, bob, units(5), usd()).await;
    let declined = service
        .topup(bob, units(5), usd(), FundingSource::SandboxDecline, None)
        .await
        .expect("submits");
    assert_eq!(
        declined.outcome,
        Outcome::Rejected(Rejection::FundingDeclined)
    );
    let coffee = paid(pay(&service, alice, cafe, units(3), usd()).await);
    paid(pay(&service, alice, books, units(12), eur()).await);
    paid(pay(&service, bob, cafe, units(4), usd()).await);
    assert_eq!(
        pay(&service, bob, books, units(50), usd()).await,
        Outcome::Rejected(Rejection::InsufficientFunds)
    );
    let batch = vec![
        service.pay_command(alice, books, units(1), usd(), Some("📚".into()), None),
        service.pay_command(alice, cafe, units(1_000), usd(), None, None),
    ];
    let executed = service
        .submit(Command::PayBatch(batch), None)
        .await
        .expect("submits");
    assert!(matches!(executed.outcome, Outcome::PaidBatch(_)));
    let partial = service
        .refund(Principal::Merchant(cafe), coffee.id, Some(units(1)), None)
        .await
        .expect("submits");
    assert!(matches!(partial.outcome, Outcome::Refunded(_)));
    let rest = service
        .refund(Principal::Operator, coffee.id, None, None)
        .await
        .expect("submits");
    assert!(matches!(rest.outcome, Outcome::Refunded(_)));
    let order = claim(Principal::Payer(alice), "order-7", "{\"amount\":\"2\"}");
    let command = service.pay_command(alice, cafe, units(2), usd(), None, None);
    let first = service
        .submit(Command::Pay(command), Some(order.clone()))
        .await
        .expect("submits");
    let first = paid(first.outcome);

    let payers = [alice, bob];
    let merchants = [cafe, books];
    let before = service
        .read(|state| snapshot(state, &payers, &merchants))
        .await
        .expect("reads");
    shutdown(service).await;

    let reopened = open(&dir, Arc::new(SystemClock), None).await;
    assert!(
        reopened.generated_operator_key.is_none(),
        "an operator key exists, none is made"
    );
    assert_eq!(reopened.records_replayed, before.records_applied);
    let service = reopened.service;
    let after = service
        .read(|state| snapshot(state, &payers, &merchants))
        .await
        .expect("reads");
    assert_eq!(after, before);
    assert_eq!(
        service.authenticate(&operator).await.unwrap(),
        Some(Principal::Operator)
    );
    assert_eq!(
        service.authenticate(&alice_key).await.unwrap(),
        Some(Principal::Payer(alice))
    );
    assert_eq!(
        service.authenticate(&cafe_key).await.unwrap(),
        Some(Principal::Merchant(cafe))
    );
    // The idempotency key survived too: the retry answers with the first payment.
    let command = service.pay_command(alice, cafe, units(2), usd(), None, None);
    let retry = service
        .submit(Command::Pay(command), Some(order))
        .await
        .expect("submits");
    assert!(retry.replayed);
    assert_eq!(paid(retry.outcome), first);
    shutdown(service).await;

    // A new key given at open replaces the old one.
    let replacement = Secret::new("fk_op_restart-test-replacement".to_string());
    let reopened = open(&dir, Arc::new(SystemClock), Some(replacement.clone())).await;
    assert!(reopened.generated_operator_key.is_none());
    let service = reopened.service;
    assert_eq!(
        service.authenticate(&replacement).await.unwrap(),
        Some(Principal::Operator)
    );
    assert_eq!(service.authenticate(&operator).await.unwrap(), None);
    shutdown(service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_key_is_generated_only_when_the_journal_has_none() {
    let dir = TempDir::new("generated-key");
    let opened = open(&dir, manual_clock(), None).await;
    let generated = opened
        .generated_operator_key
        .expect("a new journal gets a key");
    let service = opened.service;
    assert_eq!(
        service.authenticate(&generated).await.unwrap(),
        Some(Principal::Operator)
    );
    shutdown(service).await;

    for _ in 0..2 {
        let reopened = open(&dir, manual_clock(), None).await;
        assert!(reopened.generated_operator_key.is_none());
        let service = reopened.service;
        assert_eq!(
            service.authenticate(&generated).await.unwrap(),
            Some(Principal::Operator)
        );
        shutdown(service).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_creation_answers_with_the_same_api_key_and_another_body_is_refused() {
    let dir = TempDir::new("creation-retry");
    let opened = open(&dir, manual_clock(), None).await;
    let service = opened.service;

    let shop = claim(Principal::Operator, "create-shop", "{\"name\":\"Shop\"}");
    let first = service
        .create_merchant("Shop".into(), None, Some(shop.clone()))
        .await
        .expect("submits");
    assert!(!first.replayed);
    let Outcome::MerchantCreated(merchant) = &first.outcome else {
        panic!("expected a merchant, got {:?}", first.outcome)
    };
    let key = first.api_key.clone().expect("a new merchant's key");
    assert_eq!(
        service.authenticate(&key).await.unwrap(),
        Some(Principal::Merchant(merchant.id))
    );
    let retry = service
        .create_merchant("Shop".into(), None, Some(shop.clone()))
        .await
        .expect("submits");
    assert!(retry.replayed);
    assert_eq!(retry.outcome, first.outcome);
    assert_eq!(retry.api_key, Some(key));
    let other_body = IdempotencyClaim {
        fingerprint: fingerprint(&[b"POST", b"/v1/test", b"{\"name\":\"Other\"}"]),
        ..shop
    };
    let refused = service
        .create_merchant("Other".into(), None, Some(other_body))
        .await
        .expect("submits");
    assert_eq!(
        refused.outcome,
        Outcome::Rejected(Rejection::IdempotencyKeyReused)
    );
    assert_eq!(refused.api_key, None, "nothing was made, so no key");
    assert_eq!(service.read_now(|state| state.merchant_count()), 1);

    // Payers, retried concurrently: one payer, one key, one fresh answer.
    let payer_claim = claim(Principal::Operator, "create-payer", "{\"name\":\"Pat\"}");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let service = service.clone();
            let payer_claim = payer_claim.clone();
            tokio::spawn(async move {
                service
                    .create_payer("Pat".into(), Some(payer_claim))
                    .await
                    .expect("submits")
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("the task finishes"));
    }
    let Outcome::PayerCreated(payer) = &answers[0].outcome else {
        panic!("expected a payer, got {:?}", answers[0].outcome)
    };
    let payer_key = answers[0].api_key.clone().expect("a key");
    for answer in &answers {
        assert_eq!(&answer.outcome, &answers[0].outcome);
        assert_eq!(answer.api_key.as_ref(), Some(&payer_key));
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed).count(), 1);
    assert_eq!(service.read_now(|state| state.payer_count()), 1);
    assert_eq!(
        service.authenticate(&payer_key).await.unwrap(),
        Some(Principal::Payer(payer.id))
    );
    let refused = service
        .create_payer(
            "Sam".into(),
            Some(IdempotencyClaim {
                fingerprint: [0; 32],
                ..payer_claim
            }),
        )
        .await
        .expect("submits");
    assert_eq!(
        refused.outcome,
        Outcome::Rejected(Rejection::IdempotencyKeyReused)
    );
    shutdown(service).await;
}

/// A journal whose appends, once the switch is thrown, never reach the disk: the writer blocks
/// in them (an fsync that does not finish) until released, as a machine about to lose power.
struct LosingJournal {
    inner: FileJournal,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    losing: AtomicBool,
    blocked: AtomicBool,
    released: Mutex<bool>,
    wake: Condvar,
}

impl Gate {
    fn release(&self) {
        *self.released.lock().expect("gate lock") = true;
        self.wake.notify_all();
    }
}

impl Journal for LosingJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if !self.gate.losing.load(Ordering::SeqCst) {
            return self.inner.append(records);
        }
        self.gate.blocked.store(true, Ordering::SeqCst);
        let mut released = self.gate.released.lock().expect("gate lock");
        while !*released {
            released = self.gate.wake.wait(released).expect("gate lock");
        }
        Ok(())
    }

    fn replay(&mut self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        self.inner.replay(visit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_never_shows_a_payment_before_it_is_durable() {
    let dir = TempDir::new("durable-reads");
    let gate = Arc::new(Gate::default());
    let journal = LosingJournal {
        inner: FileJournal::open(dir.path()).expect("opens"),
        gate: gate.clone(),
    };
    let opened = open_with(
        Box::new(journal),
        manual_clock(),
        Arc::new(SequentialIds::new(1)),
        None,
    )
    .await;
    let service = opened.service;
    let (payer, _) = create_payer(&service, "payer").await;
    let (merchant, _) = create_merchant(&service, "shop", None).await;
    topup(&service, payer, units(1_000), usd()).await;

    // Readers run throughout and keep what they saw, until the "crash".
    let crashed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let reads_before_crash = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (service, crashed, stop, seen, reads) = (
                service.clone(),
                crashed.clone(),
                stop.clone(),
                seen.clone(),
                reads_before_crash.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(ids) = service.read(operator_payment_ids).await else {
                        break;
                    };
                    if !crashed.load(Ordering::SeqCst) {
                        seen.lock().expect("seen lock").extend(ids);
                        reads.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();

    // Payments that are acknowledged, hence durable.
    let acknowledged: Vec<_> = (0..150)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                paid(
                    pay(
                        &service,
                        payer,
                        merchant,
                        Amount::from_micros(1_000 + i),
                        usd(),
                    )
                    .await,
                )
                .id
            })
        })
        .collect();
    let mut durable = HashSet::new();
    for task in acknowledged {
        durable.insert(task.await.expect("the task finishes"));
    }

    // Let the readers see some of them before going on, however busy the machine is.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.lock().expect("seen lock").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the readers never read"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Payments whose commit never reaches the disk.
    gate.losing.store(true, Ordering::SeqCst);
    let lost: Vec<_> = (0..50)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(async move {
                pay(
                    &service,
                    payer,
                    merchant,
                    Amount::from_micros(5_000 + i),
                    usd(),
                )
                .await
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !gate.blocked.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never reached the lost commit"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The writer is stuck inside the commit of the lost payments. Reads go on, without waiting
    // for it, and show exactly what is durable: the lost payments are not in memory yet.
    let during: HashSet<PaymentId> =
        tokio::time::timeout(Duration::from_secs(5), service.read(operator_payment_ids))
            .await
            .expect("a read does not wait for a stuck commit")
            .expect("reads")
            .into_iter()
            .collect();
    assert_eq!(
        during, durable,
        "while a commit is stuck, reads show exactly the durable payments"
    );

    // The machine goes down: nothing after this counts, and the lost commit is never written.
    crashed.store(true, Ordering::SeqCst);
    gate.release();
    stop.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await.expect("the reader finishes");
    }
    for task in lost {
        task.await.expect("the task finishes");
    }
    shutdown(service).await;

    let seen = seen.lock().expect("seen lock").clone();
    assert!(
        reads_before_crash.load(Ordering::SeqCst) > 0 && !seen.is_empty(),
        "some reads returned before the crash"
    );
    let reopened = open(&dir, manual_clock(), None).await;
    let service = reopened.service;
    let recovered: HashSet<PaymentId> = service
        .read(operator_payment_ids)
        .await
        .expect("reads")
        .into_iter()
        .collect();
    assert_eq!(
        recovered, durable,
        "exactly the acknowledged payments survive"
    );
    let unseen: Vec<_> = seen.difference(&recovered).collect();
    assert!(
        unseen.is_empty(),
        "reads showed payments a crash took back: {unseen:?}"
    );
    shutdown(service).await;
}

/// A journal that refuses appends while its switch is on, as a full disk does, leaving the
/// file as it was.
struct RefusingJournal {
    inner: FileJournal,
    refusing: Arc<AtomicBool>,
}

impl Journal for RefusingJournal {
    fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device",
            )));
        }
        self.inner.append(records)
    }

    fn replay(&mut self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        self.inner.replay(visit)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_changes_nothing_answers_storage_unavailable_and_the_service_goes_on() {
    let dir = TempDir::new("refused-append");
    let refusing = Arc::new(AtomicBool::new(false));
    let journal = RefusingJournal {
        inner: FileJournal::open(dir.path()).expect("opens"),
        refusing: refusing.clone(),
    };
    let opened = open_with(
        Box::new(journal),
        manual_clock(),
        Arc::new(SequentialIds::new(1)),
        None,
    )
    .await;
    let service = opened.service;
    let (payer, _) = create_payer(&service, "payer").await;
    let (merchant, _) = create_merchant(&service, "shop", None).await;
    topup(&service, payer, units(10), usd()).await;
    let balances =
        |service: &Service| service.read_now(|state| state.payer_balances(payer).unwrap());
    let before = balances(&service);

    refusing.store(true, Ordering::SeqCst);
    let command = service.pay_command(payer, merchant, units(3), usd(), None, None);
    let refused = service.submit(Command::Pay(command), None).await;
    assert!(
        matches!(refused, Err(ServiceError::StorageUnavailable)),
        "{refused:?}"
    );
    assert_eq!(balances(&service), before, "a refused write moves no money");
    assert_eq!(service.read_now(|state| state.payment_count()), 0);

    refusing.store(false, Ordering::SeqCst);
    let made = paid(pay(&service, payer, merchant, units(4), usd()).await);
    assert_eq!(made.amount, units(4));
    let after = balances(&service);
    shutdown(service).await;

    // The journal holds exactly what was acknowledged.
    let reopened = open(&dir, manual_clock(), None).await;
    let service = reopened.service;
    assert_eq!(balances(&service), after);
    assert_eq!(service.read_now(|state| state.payment_count()), 1);
    shutdown(service).await;
}

/// Times the writer asked the allocator to give memory back, in the stores `open_bounded`
/// opens (only their writers call it: their journals are too short to checkpoint in replay).
static WRITER_GAVE_BACK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_writer_give_back() {
    WRITER_GAVE_BACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Times the allocator was asked to give memory back, by the one test that counts it.
static GIVEN_BACK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_give_back() {
    GIVEN_BACK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_in_one_journal_file_starts_on_the_bounded_store_and_answers_as_before() {
    let dir = TempDir::new("upgrade");
    let operator = Secret::new("fk_op_upgrade-test-operator-key".to_string());
    // The installation as earlier builds kept it: one journal file, the whole state in memory.
    let service = open(&dir, Arc::new(SystemClock), Some(operator.clone()))
        .await
        .service;
    let mut payers = Vec::new();
    for name in ["Alice", "Bob", "Carol"] {
        let (payer, _) = create_payer(&service, name).await;
        topup(&service, payer, units(50), usd()).await;
        payers.push(payer);
    }
    topup(&service, payers[0], units(10), eur()).await;
    let fee = FeeSchedule {
        bps: 250,
        fixed: Amount::ZERO,
    };
    let (cafe, _) = create_merchant(&service, "Café", Some(fee)).await;
    let (books, _) = create_merchant(&service, "Books", None).await;
    let merchants = vec![cafe, books];
    let mut made = Vec::new();
    for n in 0..60u64 {
        let merchant = merchants[(n % 2) as usize];
        let outcome = pay(
            &service,
            payers[(n % 3) as usize],
            merchant,
            Amount::from_micros(10_000 + n),
            usd(),
        )
        .await;
        made.push(paid(outcome).id);
    }
    let refunded = service
        .submit(
            Command::Refund {
                id: RefundId::from_u128(service.next_id()),
                payment: made[3],
                amount: None,
                caller: Principal::Operator,
                transfer_ids: [
                    farthing_ledger::TransferId(service.next_id()),
                    farthing_ledger::TransferId(service.next_id()),
                ],
            },
            None,
        )
        .await
        .expect("submits");
    assert!(matches!(refunded.outcome, Outcome::Refunded(_)));
    let mut before = service.read_now(|state| snapshot(state, &payers, &merchants));
    shutdown(service).await;

    // The bounded store takes the file over as its first segment; replaying it writes a
    // checkpoint every 20 history rows and forgets every unchanged row after each.
    let (journal, checkpoints) =
        farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 4096).expect("opens");
    let opened = Service::open_cached(
        Box::new(journal),
        CacheOptions {
            checkpoints: Arc::new(checkpoints),
            cache_bytes: 0,
            checkpoint_rows: 20,
            give_back: Some(count_give_back),
        },
        Config::default(),
        Arc::new(SystemClock),
        Arc::new(TimeOrderedIds),
        Some(operator.clone()),
    )
    .await
    .expect("the bounded store opens the old journal");
    assert!(
        GIVEN_BACK.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "having let rows go, replay asks the allocator to give the memory back"
    );
    let service = opened.service;
    assert!(!dir.path().join("journal.farthing").exists());
    assert!(dir.path().join("engine").is_dir());
    let mut after = service.read_now(|state| snapshot(state, &payers, &merchants));
    // A cache holds some accounts only: its totals are not the whole state's.
    before.totals.clear();
    after.totals.clear();
    assert_eq!(
        after, before,
        "the bounded store answers as the whole state did"
    );
    assert_eq!(
        service.authenticate(&operator).await.unwrap(),
        Some(Principal::Operator)
    );
    // And it goes on from there.
    let outcome = pay(&service, payers[1], books, units(1), usd()).await;
    let payment = paid(outcome);
    assert_eq!(
        service.read_now(|state| state.payment(payment.id).unwrap()),
        Some(payment)
    );
    shutdown(service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_row_is_read_by_its_id_as_it_stands_and_an_unknown_id_reads_none() {
    let dir = TempDir::new("room_row");
    let service = open(&dir, manual_clock(), None).await.service;
    let (payer, _) = create_payer(&service, "Ada").await;
    let (merchant, _) = create_merchant(&service, "Shop", None).await;
    topup(&service, payer, units(5), usd()).await;
    let pay = service.pay_command(payer, merchant, units(2), usd(), None, None);
    let id = pay.id;
    let authorize = HoldCommand::Authorize {
        pay,
        expires_at: Timestamp(EPOCH + 60_000_000),
        settle_id: farthing_ledger::TransferId(service.next_id()),
    };
    let placed = service
        .submit(authorize.into(), None)
        .await
        .expect("submits");
    assert!(matches!(
        placed.outcome,
        Outcome::Room(RoomOutcome::Holds(HoldOutcome::Changed(_)))
    ));

    let row = service
        .row::<HoldKind>(id.to_u128())
        .await
        .expect("reads")
        .expect("the hold is there");
    assert_eq!(row.payment, id);
    assert_eq!(row.hold.status, HoldStatus::Held);
    assert_eq!(row.hold.amount_authorized, units(2));

    let capture = HoldCommand::Capture {
        payment: id,
        amount: Some(units(1)),
        caller: Principal::Merchant(merchant),
    };
    service.submit(capture.into(), None).await.expect("submits");
    let row = service
        .row::<HoldKind>(id.to_u128())
        .await
        .expect("reads")
        .expect("the hold is there");
    assert_eq!(row.hold.status, HoldStatus::Captured);
    assert_eq!(row.hold.amount_captured, units(1));

    assert_eq!(
        service.row::<HoldKind>(u128::MAX - 3).await.expect("reads"),
        None
    );
    shutdown(service).await;
}

/// Checkpoints that wait at a gate before writing, to hold one in flight.
struct Gated {
    inner: Arc<dyn farthing_store::Checkpoints>,
    open: Mutex<bool>,
    opened: Condvar,
}

impl farthing_store::Checkpoints for Gated {
    fn disk(&self) -> Arc<dyn farthing_payments::disk::Disk> {
        self.inner.disk()
    }

    fn write(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        self.inner.write(checkpoint)
    }
}

/// A bounded store over `journal` and `checkpoints` that lets every unchanged row go after
/// each checkpoint.
async fn open_bounded(
    dir: &TempDir,
    checkpoints: Arc<dyn farthing_store::Checkpoints>,
    journal: Box<dyn Journal>,
    checkpoint_rows: usize,
) -> Service {
    open_bounded_within(dir, checkpoints, journal, checkpoint_rows, 0).await
}

/// A bounded store that keeps about `cache_bytes` of rows not changed since the last
/// checkpoint.
async fn open_bounded_within(
    dir: &TempDir,
    checkpoints: Arc<dyn farthing_store::Checkpoints>,
    journal: Box<dyn Journal>,
    checkpoint_rows: usize,
    cache_bytes: usize,
) -> Service {
    Service::open_cached(
        journal,
        CacheOptions {
            checkpoints,
            cache_bytes,
            checkpoint_rows,
            give_back: Some(count_writer_give_back),
        },
        Config::default(),
        Arc::new(SystemClock),
        Arc::new(TimeOrderedIds),
        None,
    )
    .await
    .unwrap_or_else(|error| panic!("the bounded store in {:?} opens: {error}", dir.path()))
    .service
}

impl Gated {
    /// Lets the checkpoint waiting at the gate, and every later one, be written.
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Single payments from `payer` to `merchant`, each answered within 5 s, until the history made
/// since the last checkpoint began holds at least `rows`.
async fn pay_until_young(service: &Service, payer: PayerId, merchant: MerchantId, rows: usize) {
    while service.read_now(|state| state.young_rows()) < rows {
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            pay(service, payer, merchant, Amount::from_micros(1_000), usd()),
        )
        .await
        .expect("a single payment below its own bound is answered");
        paid(answered);
    }
}

/// Submits a batch of `count` payments of one micro-unit from `payer` to `merchant`, on a task
/// of its own.
fn spawn_batch(
    service: &Service,
    payer: PayerId,
    merchant: MerchantId,
    count: usize,
) -> tokio::task::JoinHandle<Result<Executed, ServiceError>> {
    let service = service.clone();
    tokio::spawn(async move {
        let items = (0..count)
            .map(|_| {
                service.pay_command(payer, merchant, Amount::from_micros(1), usd(), None, None)
            })
            .collect();
        service.submit(Command::PayBatch(items), None).await
    })
}

/// A bounded store whose checkpoints wait at a closed gate, with a funded payer and a merchant.
async fn gated_shop(
    dir: &TempDir,
    checkpoint_rows: usize,
) -> (Service, Arc<Gated>, PayerId, MerchantId) {
    let (journal, checkpoints) =
        farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 1 << 20).expect("opens");
    let gate = Arc::new(Gated {
        inner: Arc::new(checkpoints),
        open: Mutex::new(false),
        opened: Condvar::new(),
    });
    let service = open_bounded(dir, gate.clone(), Box::new(journal), checkpoint_rows).await;
    let (payer, _) = create_payer(&service, "Ada").await;
    let (merchant, _) = create_merchant(&service, "Shop", None).await;
    topup(&service, payer, units(100), usd()).await;
    (service, gate, payer, merchant)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_faster_than_its_checkpoints_waits_for_them_rather_than_growing_memory() {
    const CHECKPOINT_ROWS: usize = 30;
    let dir = TempDir::new("held_back");
    let (service, gate, payer, merchant) = gated_shop(&dir, CHECKPOINT_ROWS).await;

    // Payments one at a time while the first checkpoint cannot be written: the history made
    // since it began grows to its bound (for commits of single payments, one interval past
    // the bound of large ones), and then a payment waits.
    let mut answered = 0;
    let waiting = loop {
        let mut next = {
            let service = service.clone();
            tokio::spawn(async move {
                pay(&service, payer, merchant, Amount::from_micros(1_000), usd()).await
            })
        };
        match tokio::time::timeout(Duration::from_millis(500), &mut next).await {
            Ok(outcome) => {
                paid(outcome.expect("the payment task ends"));
                answered += 1;
                assert!(answered < 200, "the writer never waited for its checkpoint");
            }
            Err(_) => break next,
        }
    };
    let young = service.read_now(|state| state.young_rows());
    assert!(
        (3 * CHECKPOINT_ROWS..3 * CHECKPOINT_ROWS + 10).contains(&young),
        "held back at {young} history rows"
    );

    // Once the checkpoint is written, the waiting payment goes through, and so do others.
    gate.open();
    paid(waiting.await.expect("the waiting payment task ends"));
    paid(pay(&service, payer, merchant, Amount::from_micros(1_000), usd()).await);
    shutdown(service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_payment_queued_beside_a_large_batch_is_committed_before_it() {
    const CHECKPOINT_ROWS: usize = 30;
    const BATCH: usize = 1_000;
    let dir = TempDir::new("small_first");
    let (service, gate, payer, merchant) = gated_shop(&dir, CHECKPOINT_ROWS).await;

    // Hold the writer at its bound (a checkpoint that cannot be written), so that what comes
    // next queues up behind it: first a large batch, then a single payment.
    let waiting = loop {
        let mut next = {
            let service = service.clone();
            tokio::spawn(async move {
                pay(&service, payer, merchant, Amount::from_micros(1_000), usd()).await
            })
        };
        if tokio::time::timeout(Duration::from_millis(500), &mut next)
            .await
            .is_err()
        {
            break next;
        }
    };
    let batch = spawn_batch(&service, payer, merchant, BATCH);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let single = {
        let service = service.clone();
        tokio::spawn(
            async move { pay(&service, payer, merchant, Amount::from_micros(7), usd()).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open();
    paid(waiting.await.expect("the waiting payment task ends"));
    let single = paid(single.await.expect("the single payment task ends"));
    let batch = batch.await.expect("the batch task ends").expect("submits");
    assert!(matches!(batch.outcome, Outcome::PaidBatch(ref items) if items.len() == BATCH));
    shutdown(service).await;
    // The gate holds the engine open.
    drop(gate);

    // The journal holds the single payment before the batch, though the batch came first: it
    // was held back so that the single payment did not wait for it.
    let (mut journal, _) =
        farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 1 << 30).expect("opens");
    let mut order = Vec::new();
    journal
        .replay(&mut |record| match record.command {
            Command::Pay(command) if command.id == single.id => order.push("single"),
            Command::PayBatch(items) if items.len() == BATCH => order.push("batch"),
            _ => {}
        })
        .expect("replays");
    assert_eq!(order, ["single", "batch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_payment_goes_through_while_a_large_batch_waits_for_a_checkpoint_behind() {
    const CHECKPOINT_ROWS: usize = 30;
    const BATCH: usize = 1_000;
    let dir = TempDir::new("single_past_bound");
    let (service, gate, payer, merchant) = gated_shop(&dir, CHECKPOINT_ROWS).await;

    // Single payments while the first checkpoint cannot be written, until the history made
    // since it began is past the bound of large commits.
    pay_until_young(&service, payer, merchant, 2 * CHECKPOINT_ROWS).await;
    let batch = spawn_batch(&service, payer, merchant, BATCH);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!batch.is_finished(), "the batch waits for the checkpoint");

    // A single payment queued after the batch is answered while the batch still waits.
    let single = tokio::time::timeout(
        Duration::from_secs(5),
        pay(&service, payer, merchant, Amount::from_micros(7), usd()),
    )
    .await
    .expect("the single payment does not wait for the checkpoint");
    paid(single);
    assert!(
        !batch.is_finished(),
        "the batch still waits for the checkpoint"
    );

    gate.open();
    let batch = batch.await.expect("the batch task ends").expect("submits");
    assert!(
        matches!(batch.outcome, Outcome::PaidBatch(ref items) if items.len() == BATCH
            && items.iter().all(|item| matches!(item, BatchItemOutcome::Succeeded(_))))
    );
    shutdown(service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_batch_whose_payer_left_memory_while_it_waited_reads_it_again() {
    const CHECKPOINT_ROWS: usize = 30;
    const BATCH: u64 = 1_000;
    let dir = TempDir::new("read_again");
    let (service, gate, ada, merchant) = gated_shop(&dir, CHECKPOINT_ROWS).await;
    // Bob is funded before the first checkpoint begins, and does nothing after it.
    let (bob, _) = create_payer(&service, "Bob").await;
    topup(&service, bob, units(1), usd()).await;

    // Ada's single payments take the history past the bound of large commits while the first
    // checkpoint cannot be written.
    pay_until_young(&service, ada, merchant, 2 * CHECKPOINT_ROWS).await;
    // Bob's batch is held back: what it reads (Bob, in memory) is read ahead, and it waits for
    // the checkpoint.
    let batch = spawn_batch(&service, bob, merchant, BATCH as usize);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!batch.is_finished(), "the batch waits for the checkpoint");

    // Written, the checkpoint lets Bob go from memory (a cache of no bytes forgets every row
    // not changed since it began) before the batch is committed: the batch reads him again.
    gate.open();
    let batch = batch.await.expect("the batch task ends").expect("submits");
    match &batch.outcome {
        Outcome::PaidBatch(items) => {
            assert_eq!(items.len() as u64, BATCH);
            for item in items {
                assert!(
                    matches!(item, BatchItemOutcome::Succeeded(_)),
                    "each payment of Bob's succeeds: {item:?}"
                );
            }
        }
        other => panic!("expected a paid batch, got {other:?}"),
    }
    let balance = service
        .read(move |state| state.payer_balances(bob).unwrap().expect("known")[0].1)
        .await
        .expect("reads");
    assert_eq!(balance, i128::from(MICROS_PER_UNIT - BATCH));
    assert!(
        WRITER_GAVE_BACK.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "having let rows go, the writer asks the allocator to give the memory back"
    );
    shutdown(service).await;
}

/// Checkpoints whose writing fails outright: the thread that writes them ends.
struct Broken {
    inner: Arc<dyn farthing_store::Checkpoints>,
}

impl farthing_store::Checkpoints for Broken {
    fn disk(&self) -> Arc<dyn farthing_payments::disk::Disk> {
        self.inner.disk()
    }

    fn write(&self, _: &Checkpoint) -> Result<(), StoreError> {
        panic!("a checkpoint writer that breaks (expected in this test)")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_past_the_bound_is_committed_when_the_checkpoint_thread_is_gone() {
    const CHECKPOINT_ROWS: usize = 30;
    let dir = TempDir::new("checkpoints_gone");
    let (journal, checkpoints) =
        farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 1 << 20).expect("opens");
    let broken = Arc::new(Broken {
        inner: Arc::new(checkpoints),
    });
    let service = open_bounded(&dir, broken, Box::new(journal), CHECKPOINT_ROWS).await;
    let (payer, _) = create_payer(&service, "Ada").await;
    let (merchant, _) = create_merchant(&service, "Shop", None).await;
    topup(&service, payer, units(100), usd()).await;
    pay_until_young(&service, payer, merchant, 2 * CHECKPOINT_ROWS).await;

    // The first checkpoint will never be written: a batch held for it goes on rather than
    // waiting for ever, and its payments are in the journal.
    let batch = tokio::time::timeout(
        Duration::from_secs(5),
        spawn_batch(&service, payer, merchant, 1_000),
    )
    .await
    .expect("the batch is answered")
    .expect("the batch task ends")
    .expect("submits");
    assert!(matches!(batch.outcome, Outcome::PaidBatch(ref items) if items.len() == 1_000));
    shutdown(service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_store_opens_again_at_once_after_a_shutdown() {
    let dir = TempDir::new("reopen");
    for round in 0..3 {
        let (journal, checkpoints) =
            farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 1 << 20)
                .unwrap_or_else(|error| panic!("round {round}: the store opens again: {error}"));
        let service = open_bounded(&dir, Arc::new(checkpoints), Box::new(journal), 600).await;
        create_payer(&service, "Ada").await;
        shutdown(service).await;
    }
}

/// Past its budget, the writer brings memory back under it a few shards at a time between
/// commits, letting the payers unused since they were made go and keeping those whose
/// balances are read all along, though they never change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_budget_memory_comes_back_under_it_and_the_payers_in_use_stay() {
    const BUDGET: usize = 128 << 10;
    let dir = TempDir::new("service-budget");
    let (journal, checkpoints) =
        farthing_store_embedded::cached::open_with(dir.path(), 8 << 20, 1 << 20).expect("opens");
    let service =
        open_bounded_within(&dir, Arc::new(checkpoints), Box::new(journal), 100, BUDGET).await;
    let (merchant, _) = create_merchant(&service, "Shop", None).await;
    let mut payers = Vec::new();
    for n in 0..400 {
        let (payer, _) = create_payer(&service, &format!("payer {n}")).await;
        topup(&service, payer, units(10), usd()).await;
        payers.push(payer);
    }
    // Reads come from memory or from disk; only commands bring rows back into memory. So the
    // payers read are the ten made last, still in memory when the reading begins.
    let (resting, read, busy) = (&payers[..389], &payers[389..399], payers[399]);
    // One payer pays, checkpoint after checkpoint; ten others have their balances read.
    for _ in 0..400 {
        paid(pay(&service, busy, merchant, Amount::from_micros(1_000), usd()).await);
        for payer in read {
            let balances = service
                .read_now(|state| state.payer_balances(*payer))
                .expect("reads");
            assert_eq!(balances, Some(vec![(usd(), 10_000_000)]));
        }
    }
    let (held, read_held, resting_held) = service.read_now(|state| {
        let holds = |payers: &[PayerId]| {
            payers
                .iter()
                .filter(|payer| state.holds_payer(**payer, usd()))
                .count()
        };
        (state.held_bytes(), holds(read), holds(resting))
    });
    assert!(held <= BUDGET, "{held} bytes held, past {BUDGET}");
    assert_eq!(read_held, read.len(), "the payers read all along stay");
    assert!(
        resting_held < resting.len() / 2,
        "{resting_held} of {} resting payers still held",
        resting.len()
    );
    // What went reads back as it was.
    for payer in resting {
        let balances = service
            .read_now(|state| state.payer_balances(*payer))
            .expect("reads");
        assert_eq!(balances, Some(vec![(usd(), 10_000_000)]));
    }
    shutdown(service).await;
}
