//! `apply_batch` on a fresh PostgreSQL database per test (from `FARTHING_TEST_DATABASE_URL`;
//! without it each test says it was skipped): random histories give the outcomes and totals
//! the in-memory state gives, and concurrent writers neither deadlock, overdraw, lose money
//! nor apply an idempotency key twice.

mod common;

use std::collections::BTreeSet;

use common::TestDatabase;
use farthing_store_postgres::{apply_batch, connect, migrate};
use proptest::test_runner::TestCaseError;
use tokio_postgres::Client;

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use proptest::prelude::*;
use proptest::sample::Index;

/// Where histories start: some microsecond in 2023.
const EPOCH: u64 = 1_700_000_000_000_000;
const MICROS_PER_SEC: u64 = 1_000_000;
const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];

fn currency(code: &str) -> Currency {
    Currency::parse(code).expect("a known code")
}

// =============================================================================================
// Generation: raw choices, resolved against the history when the step is built (trimmed from
// tests/state.rs, with key hashes and transfer ids reused too).
// =============================================================================================

#[derive(Clone, Debug)]
enum Pick {
    Known(Index),
    Unknown,
}

#[derive(Clone, Debug)]
struct PaySpec {
    payer: Pick,
    merchant: Pick,
    amount: u64,
    currency: usize,
    /// Reuse the id of an earlier payment.
    reuse: Option<Index>,
}

#[derive(Clone, Copy, Debug)]
enum RefundAmount {
    Rest,
    Zero,
    /// This many 256ths of what is left, at least one micro.
    Part(u8),
    Over,
}

#[derive(Clone, Debug)]
enum Caller {
    Operator,
    ItsMerchant,
    AnotherMerchant(Index),
    ItsPayer,
}

#[derive(Clone, Debug)]
enum OpSpec {
    SetOperatorKey {
        key: Option<Index>,
    },
    CreatePayer {
        reuse: Option<Index>,
        key: Option<Index>,
    },
    CreateMerchant {
        fee: FeeSchedule,
        reuse: Option<Index>,
        key: Option<Index>,
    },
    Topup {
        payer: Pick,
        amount: u64,
        currency: usize,
        decline: bool,
        reuse: Option<Index>,
    },
    Pay(PaySpec),
    Batch(Vec<PaySpec>),
    Refund {
        payment: Pick,
        amount: RefundAmount,
        caller: Caller,
        reuse: Option<Index>,
    },
    Prune {
        age_secs: u64,
    },
}

#[derive(Clone, Debug)]
enum ClaimSpec {
    None,
    Fresh,
    /// The same key and request as an earlier claimed step, with fresh ids.
    Retry(Index),
    /// The key of an earlier claimed step with another request.
    Conflict(Index),
}

#[derive(Clone, Debug)]
struct StepSpec {
    advance_secs: u64,
    op: OpSpec,
    claim: ClaimSpec,
    /// Reuse the transfer ids of an earlier step.
    reuse_transfers: Option<Index>,
}

fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![15 => any::<Index>().prop_map(Pick::Known), 1 => Just(Pick::Unknown)]
}

fn currency_index() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 2 => Just(1), 1 => Just(2)]
}

fn maybe_reuse() -> impl Strategy<Value = Option<Index>> {
    prop_oneof![19 => Just(None), 1 => any::<Index>().prop_map(Some)]
}

fn pay_spec() -> impl Strategy<Value = PaySpec> {
    (
        pick(),
        pick(),
        prop_oneof![8 => 1..=800_000u64, 1 => 1..=u64::MAX],
        currency_index(),
        maybe_reuse(),
    )
        .prop_map(|(payer, merchant, amount, currency, reuse)| PaySpec {
            payer,
            merchant,
            amount,
            currency,
            reuse,
        })
}

fn fee_schedule() -> impl Strategy<Value = FeeSchedule> {
    (
        prop_oneof![Just(0u32), Just(290), Just(FEE_BPS_MAX), 0..=FEE_BPS_MAX],
        prop_oneof![Just(0u64), 1..=1_000u64, Just(u64::MAX)],
    )
        .prop_map(|(bps, fixed)| FeeSchedule {
            bps,
            fixed: Amount::from_micros(fixed),
        })
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        1 => maybe_reuse().prop_map(|key| OpSpec::SetOperatorKey { key }),
        3 => (maybe_reuse(), maybe_reuse())
            .prop_map(|(reuse, key)| OpSpec::CreatePayer { reuse, key }),
        3 => (fee_schedule(), maybe_reuse(), maybe_reuse())
            .prop_map(|(fee, reuse, key)| OpSpec::CreateMerchant { fee, reuse, key }),
        5 => (
            pick(),
            prop_oneof![5 => 1..=5_000_000u64, 1 => (u64::MAX / 4)..=u64::MAX],
            currency_index(),
            prop::bool::weighted(0.15),
            maybe_reuse(),
        )
            .prop_map(|(payer, amount, currency, decline, reuse)| OpSpec::Topup {
                payer,
                amount,
                currency,
                decline,
                reuse,
            }),
        8 => pay_spec().prop_map(OpSpec::Pay),
        2 => prop::collection::vec(pay_spec(), 0..5).prop_map(OpSpec::Batch),
        6 => (
            pick(),
            prop_oneof![
                3 => Just(RefundAmount::Rest),
                1 => Just(RefundAmount::Zero),
                4 => any::<u8>().prop_map(RefundAmount::Part),
                1 => Just(RefundAmount::Over),
            ],
            prop_oneof![
                2 => Just(Caller::Operator),
                4 => Just(Caller::ItsMerchant),
                1 => any::<Index>().prop_map(Caller::AnotherMerchant),
                1 => Just(Caller::ItsPayer),
            ],
            maybe_reuse(),
        )
            .prop_map(|(payment, amount, caller, reuse)| OpSpec::Refund {
                payment,
                amount,
                caller,
                reuse,
            }),
        1 => prop_oneof![Just(0u64), Just(3_600), 0..100_000u64]
            .prop_map(|age_secs| OpSpec::Prune { age_secs }),
    ]
}

/// Parties and money first, so that most of the history has someone to pay.
fn setup_op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        2 => Just(OpSpec::CreatePayer { reuse: None, key: None }),
        2 => fee_schedule().prop_map(|fee| OpSpec::CreateMerchant { fee, reuse: None, key: None }),
        3 => (any::<Index>(), 1_000_000..=10_000_000u64, currency_index()).prop_map(
            |(payer, amount, currency)| OpSpec::Topup {
                payer: Pick::Known(payer),
                amount,
                currency,
                decline: false,
                reuse: None,
            }
        ),
    ]
}

fn step(op: impl Strategy<Value = OpSpec>) -> impl Strategy<Value = StepSpec> {
    (
        prop_oneof![Just(0u64), 0..60u64, 0..(3 * 3_600u64)],
        op,
        prop_oneof![
            4 => Just(ClaimSpec::None),
            3 => Just(ClaimSpec::Fresh),
            2 => any::<Index>().prop_map(ClaimSpec::Retry),
            1 => any::<Index>().prop_map(ClaimSpec::Conflict),
        ],
        prop_oneof![29 => Just(None), 1 => any::<Index>().prop_map(Some)],
    )
        .prop_map(|(advance_secs, op, claim, reuse_transfers)| StepSpec {
            advance_secs,
            op,
            claim,
            reuse_transfers,
        })
}

fn history() -> impl Strategy<Value = Vec<StepSpec>> {
    (
        prop::collection::vec(step(setup_op()), 2..10),
        prop::collection::vec(step(op_spec()), 1..50),
    )
        .prop_map(|(mut steps, rest)| {
            steps.extend(rest);
            steps
        })
}

/// Builds records from step specs, resolving picks against what the history has made so far
/// (read from the whole state).
struct Builder {
    now: u64,
    next_id: u128,
    payer_ids: Vec<PayerId>,
    merchant_ids: Vec<MerchantId>,
    payment_ids: Vec<PaymentId>,
    topup_ids: Vec<TopupId>,
    refund_ids: Vec<RefundId>,
    key_hashes: Vec<KeyHash>,
    transfer_ids: Vec<[TransferId; 2]>,
    claimed: Vec<(IdempotencyClaim, Command)>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            now: EPOCH,
            next_id: 1,
            payer_ids: Vec::new(),
            merchant_ids: Vec::new(),
            payment_ids: Vec::new(),
            topup_ids: Vec::new(),
            refund_ids: Vec::new(),
            key_hashes: Vec::new(),
            transfer_ids: Vec::new(),
            claimed: Vec::new(),
        }
    }

    fn fresh(&mut self) -> u128 {
        self.next_id += 1;
        self.next_id
    }

    fn reuse_or_fresh<T: Copy>(
        &mut self,
        reuse: &Option<Index>,
        used: &[T],
        make: fn(u128) -> T,
    ) -> T {
        match reuse {
            Some(index) if !used.is_empty() => used[index.index(used.len())],
            _ => make(self.fresh()),
        }
    }

    fn key_hash(&mut self, reuse: &Option<Index>) -> KeyHash {
        let used = self.key_hashes.clone();
        let hash = self.reuse_or_fresh(reuse, &used, |n| {
            let mut bytes = [0u8; 32];
            bytes[..16].copy_from_slice(&n.to_le_bytes());
            bytes[31] = 0xAB;
            KeyHash(bytes)
        });
        self.key_hashes.push(hash);
        hash
    }

    fn transfer_ids(&mut self, reuse: &Option<Index>) -> [TransferId; 2] {
        let used = self.transfer_ids.clone();
        let ids = match reuse {
            Some(index) if !used.is_empty() => used[index.index(used.len())],
            _ => [TransferId(self.fresh()), TransferId(self.fresh())],
        };
        self.transfer_ids.push(ids);
        ids
    }

    fn known<T: Copy>(&mut self, pick: &Pick, known: &[T], make: fn(u128) -> T) -> T {
        match pick {
            Pick::Known(index) if !known.is_empty() => known[index.index(known.len())],
            _ => make(self.fresh()),
        }
    }

    fn pay(&mut self, spec: &PaySpec, reuse_transfers: &Option<Index>) -> PayCommand {
        let used = self.payment_ids.clone();
        let id = self.reuse_or_fresh(&spec.reuse, &used, PaymentId::from_u128);
        self.payment_ids.push(id);
        let (payers, merchants) = (self.payer_ids.clone(), self.merchant_ids.clone());
        PayCommand {
            id,
            payer: self.known(&spec.payer, &payers, PayerId::from_u128),
            merchant: self.known(&spec.merchant, &merchants, MerchantId::from_u128),
            amount: Amount::from_micros(spec.amount),
            currency: currency(CURRENCIES[spec.currency]),
            description: None,
            reference: Some(format!("ref-{}", self.next_id)),
            transfer_ids: self.transfer_ids(reuse_transfers),
        }
    }

    fn command(&mut self, step: &StepSpec, state: &State) -> Command {
        let reuse_transfers = &step.reuse_transfers;
        match &step.op {
            OpSpec::SetOperatorKey { key } => Command::SetOperatorKey {
                key_hash: self.key_hash(key),
            },
            OpSpec::CreatePayer { reuse, key } => {
                let used = self.payer_ids.clone();
                let id = self.reuse_or_fresh(reuse, &used, PayerId::from_u128);
                self.payer_ids.push(id);
                Command::CreatePayer {
                    id,
                    name: format!("payer {}", id.to_u128()),
                    key_hash: self.key_hash(key),
                }
            }
            OpSpec::CreateMerchant { fee, reuse, key } => {
                let used = self.merchant_ids.clone();
                let id = self.reuse_or_fresh(reuse, &used, MerchantId::from_u128);
                self.merchant_ids.push(id);
                Command::CreateMerchant {
                    id,
                    name: format!("Café {}", id.to_u128()),
                    key_hash: self.key_hash(key),
                    fee: *fee,
                }
            }
            OpSpec::Topup {
                payer,
                amount,
                currency: c,
                decline,
                reuse,
            } => {
                let used = self.topup_ids.clone();
                let id = self.reuse_or_fresh(reuse, &used, TopupId::from_u128);
                self.topup_ids.push(id);
                let payers = self.payer_ids.clone();
                Command::Topup {
                    id,
                    payer: self.known(payer, &payers, PayerId::from_u128),
                    amount: Amount::from_micros(*amount),
                    currency: currency(CURRENCIES[*c]),
                    source: if *decline {
                        FundingSource::SandboxDecline
                    } else {
                        FundingSource::Sandbox
                    },
                    transfer_id: self.transfer_ids(reuse_transfers)[0],
                }
            }
            OpSpec::Pay(spec) => Command::Pay(self.pay(spec, reuse_transfers)),
            OpSpec::Batch(specs) => Command::PayBatch(
                specs
                    .iter()
                    .map(|spec| self.pay(spec, reuse_transfers))
                    .collect(),
            ),
            OpSpec::Refund {
                payment,
                amount,
                caller,
                reuse,
            } => {
                let used = self.refund_ids.clone();
                let id = self.reuse_or_fresh(reuse, &used, RefundId::from_u128);
                self.refund_ids.push(id);
                let payments = self.payment_ids.clone();
                let payment_id = self.known(payment, &payments, PaymentId::from_u128);
                let target = state.payment(payment_id).cloned();
                let remaining = target
                    .as_ref()
                    .map_or(1_000, |p| p.amount.micros() - p.amount_refunded.micros());
                let amount = match amount {
                    RefundAmount::Rest => None,
                    RefundAmount::Zero => Some(Amount::ZERO),
                    RefundAmount::Part(share) => Some(Amount::from_micros(
                        u64::try_from(u128::from(remaining) * u128::from(*share) / 256)
                            .expect("at most the remainder")
                            .max(1),
                    )),
                    RefundAmount::Over => Some(Amount::from_micros(remaining.saturating_add(1))),
                };
                let merchants = self.merchant_ids.clone();
                let caller = match (caller, &target) {
                    (Caller::Operator, _) => Principal::Operator,
                    (Caller::ItsMerchant, Some(p)) => Principal::Merchant(p.merchant),
                    (Caller::ItsPayer, Some(p)) => Principal::Payer(p.payer),
                    (Caller::AnotherMerchant(index), _) if !merchants.is_empty() => {
                        Principal::Merchant(merchants[index.index(merchants.len())])
                    }
                    _ => Principal::Merchant(MerchantId::from_u128(self.fresh())),
                };
                Command::Refund {
                    id,
                    payment: payment_id,
                    amount,
                    caller,
                    transfer_ids: self.transfer_ids(reuse_transfers),
                }
            }
            OpSpec::Prune { age_secs } => Command::PruneIdempotencyKeys {
                before: Timestamp(self.now.saturating_sub(age_secs * MICROS_PER_SEC)),
            },
        }
    }

    fn record(&mut self, step: &StepSpec, state: &State) -> Record {
        self.now += step.advance_secs * MICROS_PER_SEC;
        let command = self.command(step, state);
        let idempotency = match &step.claim {
            ClaimSpec::None => None,
            // A retry repeats an earlier request; the command built above only spent fresh ids.
            ClaimSpec::Retry(index) if !self.claimed.is_empty() => {
                let (claim, _) = self.claimed[index.index(self.claimed.len())].clone();
                Some(claim)
            }
            ClaimSpec::Conflict(index) if !self.claimed.is_empty() => {
                let (mut claim, _) = self.claimed[index.index(self.claimed.len())].clone();
                claim.fingerprint[0] ^= 0xFF;
                Some(claim)
            }
            _ => {
                let n = self.fresh();
                let mut fingerprint = [0u8; 32];
                fingerprint[..16].copy_from_slice(&n.to_le_bytes());
                Some(IdempotencyClaim {
                    key: IdempotencyKey {
                        principal: Principal::Operator,
                        key: format!("key-{n}"),
                    },
                    fingerprint,
                })
            }
        };
        if let Some(claim) = &idempotency {
            self.claimed.push((claim.clone(), command.clone()));
        }
        Record {
            now: Timestamp(self.now),
            idempotency,
            command,
        }
    }
}
// =============================================================================================
// Random histories: PostgreSQL against the in-memory state
// =============================================================================================

/// Histories per run: each gets a database of its own.
const CASES: u32 = 24;

fn database_configured() -> bool {
    if std::env::var("FARTHING_TEST_DATABASE_URL").is_ok() {
        return true;
    }
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "a_random_history_applied_in_batches_matches_the_in_memory_state: skipped, \
         FARTHING_TEST_DATABASE_URL is not set"
    );
    false
}

async fn migrated(db: &TestDatabase) -> Client {
    let mut client = connect(&db.url)
        .await
        .expect("connect to the test database");
    migrate(&mut client).await.expect("migrate");
    client
}

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
    let mut client = migrated(&db).await;
    let mut state = State::new();
    let mut builder = Builder::new();
    let mut steps = history.iter();
    for &size in sizes.iter().cycle() {
        let batch: Vec<Record> = steps
            .by_ref()
            .take(size)
            .map(|step| builder.record(step, &state))
            .collect();
        if batch.is_empty() {
            break;
        }
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
        .filter_map(|id| state.payer_entries(*id, usize::MAX, None))
        .map(|page| page.items.len())
        .sum();
    prop_assert_eq!(count(&client, "statement_lines").await, lines);
    prop_assert_eq!(
        count(&client, "transfers").await,
        state.ledger_transfer_count()
    );
    let refunded = client
        .query(
            "SELECT id, amount_refunded, fee_refunded FROM payments",
            &[],
        )
        .await
        .unwrap();
    for row in refunded {
        let id = PaymentId::from_u128(u128::from_be_bytes(
            row.get::<_, &[u8]>(0).try_into().unwrap(),
        ));
        let payment = state.payment(id);
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
    if !database_configured() {
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

fn key_hash(n: u128) -> KeyHash {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&n.to_be_bytes());
    KeyHash(bytes)
}

fn record(now: u64, command: Command) -> Record {
    Record {
        now: Timestamp(EPOCH + now),
        idempotency: None,
        command,
    }
}

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
    let mut client = migrated(&db).await;
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
                 WHERE owner_kind = 1 AND owner_id = $1",
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
    let mut client = migrated(&db).await;
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
            "SELECT debits_posted FROM accounts WHERE owner_kind = 1 AND owner_id = $1",
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
    let mut client = migrated(&db).await;
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
    let refunded = state.payment(PaymentId::from_u128(1_000)).unwrap();
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
        let payment = state.payment(PaymentId::from_u128(id)).unwrap();
        let row = client
            .query_one(
                "SELECT amount_refunded, fee_refunded FROM payments WHERE id = $1",
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
    assert_eq!(count(&client, "statement_lines").await, 1 + 2 + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_concurrent_refunds_of_the_rest_of_a_payment_refund_it_once() {
    let Some(db) = TestDatabase::create("two_concurrent_refunds_of_the_rest").await else {
        return;
    };
    const PAYMENTS: u128 = 20;
    let mut client = migrated(&db).await;
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
