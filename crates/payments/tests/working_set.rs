//! Working sets (ADR 0002): a state holding only the objects a record reads gives the record
//! the outcome the whole state gives, and its change set, written over the stored objects,
//! leaves them as the whole state has them.
//!
//! Random histories (parties, top-ups, payments and batches, refunds, idempotency keys retried
//! and reused, prunes, ids, key hashes and transfer ids reused) run on a whole state. Before
//! each record (or each batch of records), a working set is loaded from the whole state with
//! what `needs` lists, as a PostgreSQL loader would load it from tables; the record is applied
//! to both. A table model of the listed objects, taken before and changed by the working
//! set's change set, must equal the same model taken after.

use std::collections::BTreeMap;

use farthing_ledger::{Account, Amount, Currency, Timestamp, TransferId, TransferRecord};
use farthing_payments::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

const CASES: u32 = 128;
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
// Loading, and a table model of storage
// =============================================================================================

/// Copies into `working` what `needs` lists and `whole` holds, skipping what `working` already
/// holds: what a loader reads from the tables.
fn load(working: &mut State, whole: &State, needs: &Needs) {
    let ok = |result: Result<(), LoadError>| result.expect("a loaded object fits the working set");
    if needs.operator_key
        && let Some(key) = whole.operator_key()
        && working.principal(&key).is_none()
    {
        ok(working.insert_key(key, Principal::Operator));
    }
    for key in &needs.key_hashes {
        if let Some(principal) = whole.principal(key)
            && working.principal(key).is_none()
        {
            ok(working.insert_key(*key, principal));
        }
    }
    // Parties before their accounts.
    for id in &needs.merchants {
        if let Some(merchant) = whole.merchant(*id)
            && working.merchant(*id).is_none()
        {
            ok(working.insert_merchant(merchant.clone()));
        }
    }
    for id in &needs.payers {
        if let Some(payer) = whole.payer(*id)
            && working.payer(*id).is_none()
        {
            ok(working.insert_payer(payer.clone()));
        }
    }
    for &(owner, currency) in &needs.accounts {
        if let Some(account) = whole.account_of(owner, currency)
            && working.account_of(owner, currency).is_none()
        {
            ok(working.insert_account(owner, account));
        }
    }
    for id in &needs.payments {
        if let Some(payment) = whole.payment(*id)
            && working.payment(*id).is_none()
        {
            ok(working.insert_payment(payment.clone()));
        }
    }
    for id in &needs.topups {
        if let Some(topup) = whole.topup_record(*id)
            && working.topup_record(*id).is_none()
        {
            ok(working.insert_topup(topup.clone()));
        }
    }
    for id in &needs.refunds {
        if let Some(refund) = whole.refund_record(*id)
            && working.refund_record(*id).is_none()
        {
            ok(working.insert_refund(refund.clone()));
        }
    }
    for id in &needs.transfers {
        if let Some(record) = whole.transfer_record(*id)
            && working.transfer_record(*id).is_none()
        {
            ok(working.insert_transfer_record(record));
        }
    }
    let mut rows: Vec<IdempotencyRow> = needs
        .idempotency_keys
        .iter()
        .filter_map(|key| whole.idempotency_record(key))
        .collect();
    if let Some(before) = needs.idempotency_made_before {
        rows.extend(whole.idempotency_records_made_before(before));
    }
    for row in rows {
        if working.idempotency_record(&row.key).is_none() {
            ok(working.insert_idempotency_record(row));
        }
    }
}

/// A working set for `records`, loaded from `whole` as a loader does: ask the working set what
/// the records need, load it, and ask again until nothing new is asked for.
fn working_set_for(whole: &State, records: &[Record]) -> Result<(State, Needs), TestCaseError> {
    let mut working = State::new_working_set();
    let needs_of = |working: &State| {
        let mut needs = Needs::default();
        for record in records {
            needs.extend(working.needs(record));
        }
        needs
    };
    let mut needs = needs_of(&working);
    for round in 1.. {
        prop_assert!(round <= 3, "loading settles in two rounds");
        load(&mut working, whole, &needs);
        let again = needs_of(&working);
        if again == needs {
            break;
        }
        needs = again;
    }
    Ok((working, needs))
}

/// The stored rows of the objects `needs` lists, as storage would hold them.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
struct Tables {
    keys: BTreeMap<KeyHash, Principal>,
    merchants: BTreeMap<MerchantId, Merchant>,
    payers: BTreeMap<PayerId, Payer>,
    accounts: BTreeMap<(Owner, Currency), Account>,
    payments: BTreeMap<PaymentId, Payment>,
    topups: BTreeMap<TopupId, Topup>,
    refunds: BTreeMap<RefundId, Refund>,
    /// Each listed payer's statement, oldest first.
    statements: BTreeMap<PayerId, Vec<Entry>>,
    transfers: BTreeMap<TransferId, TransferRecord>,
    idempotency: BTreeMap<IdempotencyKey, IdempotencyRow>,
}

impl Tables {
    fn of(state: &State, needs: &Needs) -> Tables {
        let mut tables = Tables::default();
        let mut key_hashes = needs.key_hashes.clone();
        if needs.operator_key {
            key_hashes.extend(state.operator_key());
        }
        for key in key_hashes {
            if let Some(principal) = state.principal(&key) {
                tables.keys.insert(key, principal);
            }
        }
        for id in &needs.merchants {
            if let Some(merchant) = state.merchant(*id) {
                tables.merchants.insert(*id, merchant.clone());
            }
        }
        for id in &needs.payers {
            if let Some(payer) = state.payer(*id) {
                tables.payers.insert(*id, payer.clone());
                let mut statement = state
                    .payer_entries(*id, usize::MAX, None)
                    .expect("a known payer")
                    .items;
                statement.reverse();
                tables.statements.insert(*id, statement);
            }
        }
        for &(owner, currency) in &needs.accounts {
            if let Some(account) = state.account_of(owner, currency) {
                tables.accounts.insert((owner, currency), account);
            }
        }
        for id in &needs.payments {
            if let Some(payment) = state.payment(*id) {
                tables.payments.insert(*id, payment.clone());
            }
        }
        for id in &needs.topups {
            if let Some(topup) = state.topup_record(*id) {
                tables.topups.insert(*id, topup.clone());
            }
        }
        for id in &needs.refunds {
            if let Some(refund) = state.refund_record(*id) {
                tables.refunds.insert(*id, refund.clone());
            }
        }
        for id in &needs.transfers {
            if let Some(record) = state.transfer_record(*id) {
                tables.transfers.insert(*id, record);
            }
        }
        let mut rows: Vec<IdempotencyRow> = needs
            .idempotency_keys
            .iter()
            .filter_map(|key| state.idempotency_record(key))
            .collect();
        if let Some(before) = needs.idempotency_made_before {
            rows.extend(state.idempotency_records_made_before(before));
        }
        for row in rows {
            tables.idempotency.insert(row.key.clone(), row);
        }
        tables
    }

    /// Writes a change set, in the order `Changes` documents. A new row whose key is taken, or
    /// an update of a row not held, is an error.
    fn write(&mut self, changes: &Changes) -> Result<(), TestCaseError> {
        fn insert<K: Ord + std::fmt::Debug, V>(
            table: &mut BTreeMap<K, V>,
            key: K,
            value: V,
        ) -> Result<(), TestCaseError> {
            prop_assert!(
                !table.contains_key(&key),
                "a new row's key {:?} is free",
                key
            );
            table.insert(key, value);
            Ok(())
        }
        for (key, principal) in &changes.keys {
            match principal {
                Some(principal) => self.keys.insert(*key, *principal),
                None => self.keys.remove(key),
            };
        }
        for merchant in &changes.merchants {
            insert(&mut self.merchants, merchant.id, merchant.clone())?;
        }
        for payer in &changes.payers {
            insert(&mut self.payers, payer.id, payer.clone())?;
            insert(&mut self.statements, payer.id, Vec::new())?;
        }
        for (owner, account) in &changes.accounts_created {
            insert(&mut self.accounts, (*owner, account.currency), *account)?;
        }
        for account in &changes.account_totals {
            let stored = self.accounts.values_mut().find(|a| a.id == account.id);
            prop_assert!(
                stored.is_some(),
                "a changed account {:?} is held",
                account.id
            );
            let stored = stored.expect("checked");
            prop_assert_ne!(*stored, *account, "an account listed as changed changed");
            *stored = *account;
        }
        for topup in &changes.topups {
            insert(&mut self.topups, topup.id, topup.clone())?;
        }
        for payment in &changes.payments {
            insert(&mut self.payments, payment.id, payment.clone())?;
        }
        for change in &changes.payments_refunded {
            let stored = self.payments.get_mut(&change.id);
            prop_assert!(
                stored.is_some(),
                "a refunded payment {:?} is held",
                change.id
            );
            let stored = stored.expect("checked");
            prop_assert_ne!(stored.amount_refunded, change.amount_refunded);
            stored.amount_refunded = change.amount_refunded;
            stored.fee_refunded = change.fee_refunded;
        }
        for refund in &changes.refunds {
            insert(&mut self.refunds, refund.id, refund.clone())?;
        }
        for (payer, entry) in &changes.entries {
            let statement = self.statements.get_mut(payer);
            prop_assert!(
                statement.is_some(),
                "a statement line's payer {:?} is held",
                payer
            );
            statement.expect("checked").push(*entry);
        }
        for record in &changes.transfers {
            insert(&mut self.transfers, record.transfer.id, *record)?;
        }
        for before in &changes.prunes {
            self.idempotency.retain(|_, row| row.made >= *before);
        }
        for row in &changes.idempotency {
            insert(&mut self.idempotency, row.key.clone(), row.clone())?;
        }
        Ok(())
    }
}

// =============================================================================================
// The properties
// =============================================================================================

/// Applies `batch` to the whole state and to a working set loaded for it, and checks that the
/// outcomes agree and that the change set carries the stored rows from before to after.
/// `whole` tracks its own changes, which must be the same change set.
fn check_batch(
    whole: &mut State,
    embedded: &mut State,
    batch: &[Record],
) -> Result<(), TestCaseError> {
    let (mut working, needs) = working_set_for(whole, batch)?;
    let mut needs_of_whole = Needs::default();
    for record in batch {
        needs_of_whole.extend(whole.needs(record));
    }
    prop_assert_eq!(
        &needs,
        &needs_of_whole,
        "the working set asks for what the whole state does"
    );
    let before = Tables::of(whole, &needs);
    prop_assert!(
        whole.take_changes().is_empty(),
        "nothing changed between batches"
    );
    for record in batch {
        let expected = embedded.apply(record);
        prop_assert_eq!(
            &whole.apply(record),
            &expected,
            "tracking changes nothing: {:?}",
            record
        );
        prop_assert_eq!(&working.apply(record), &expected, "record {:?}", record);
    }
    let changes = working.take_changes();
    prop_assert!(working.take_changes().is_empty(), "changes are taken once");
    let mut written = before;
    written.write(&changes)?;
    prop_assert_eq!(
        &written,
        &Tables::of(whole, &needs),
        "changes {:?}",
        changes
    );
    prop_assert_eq!(&whole.take_changes(), &changes);
    Ok(())
}

/// Runs a history in batches of the given sizes (cycled).
fn run(history: &[StepSpec], batch_sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut whole = State::new();
    whole.track_changes();
    let mut embedded = State::new();
    let mut builder = Builder::new();
    let mut steps = history.iter();
    for &size in batch_sizes.iter().cycle() {
        // Records are built against the state before the batch, as a server builds requests
        // before the writer batches them.
        let batch: Vec<Record> = steps
            .by_ref()
            .take(size)
            .map(|step| builder.record(step, &whole))
            .collect();
        if batch.is_empty() {
            break;
        }
        check_batch(&mut whole, &mut embedded, &batch)?;
    }
    prop_assert!(!embedded.is_tracking_changes());
    prop_assert!(
        embedded.take_changes().is_empty(),
        "the embedded state tracks nothing"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn every_record_applied_to_a_working_set_of_what_it_needs_agrees_with_the_whole_state(
        history in history(),
    ) {
        run(&history, &[1])?;
    }

    #[test]
    fn batches_of_records_applied_to_one_working_set_agree_with_the_whole_state(
        history in history(),
        sizes in prop::collection::vec(1..8usize, 1..4),
    ) {
        run(&history, &sizes)?;
    }

    #[test]
    fn a_payment_needs_at_most_its_payer_its_merchant_and_three_accounts(
        history in history(),
    ) {
        let mut state = State::new();
        let mut builder = Builder::new();
        for step in &history {
            let record = builder.record(step, &state);
            let needs = state.needs(&record);
            if let Command::Pay(pay) = &record.command {
                prop_assert_eq!(&needs.payers, &vec![pay.payer]);
                prop_assert_eq!(&needs.merchants, &vec![pay.merchant]);
                let mut accounts = vec![
                    (Owner::Payer(pay.payer), pay.currency),
                    (Owner::Merchant(pay.merchant), pay.currency),
                    (Owner::PlatformFees, pay.currency),
                ];
                accounts.sort();
                prop_assert_eq!(&needs.accounts, &accounts);
                prop_assert!(needs.key_hashes.is_empty() && needs.topups.is_empty());
                prop_assert!(needs.refunds.is_empty() && !needs.operator_key);
                prop_assert!(needs.idempotency_made_before.is_none());
            }
            if let Command::Refund { .. } = &record.command {
                prop_assert!(needs.payers.len() <= 1 && needs.merchants.is_empty());
                prop_assert!(needs.accounts.len() <= 3 && needs.payments.len() == 1);
            }
            state.apply(&record);
        }
    }
}

#[test]
fn loading_an_object_twice_is_refused() {
    let usd = currency("USD");
    let payer = PayerId::from_u128(7);
    let mut whole = State::new();
    whole.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: payer,
            name: "p".to_string(),
            key_hash: KeyHash([1; 32]),
        },
    });
    whole.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(8),
            payer,
            amount: Amount::from_micros(5),
            currency: usd,
            source: FundingSource::Sandbox,
            transfer_id: TransferId(9),
        },
    });
    let mut working = State::new_working_set();
    let stored = whole.payer(payer).expect("made above").clone();
    let wallet = whole
        .account_of(Owner::Payer(payer), usd)
        .expect("topped up above");
    assert_eq!(working.insert_payer(stored.clone()), Ok(()));
    assert_eq!(working.insert_payer(stored), Err(LoadError::AlreadyLoaded));
    assert_eq!(working.insert_account(Owner::Payer(payer), wallet), Ok(()));
    assert_eq!(
        working.insert_account(Owner::Payer(payer), wallet),
        Err(LoadError::AlreadyLoaded)
    );
    assert_eq!(
        working.insert_account(Owner::PlatformFees, wallet),
        Err(LoadError::BadId),
        "an account goes in under the owner its id is derived from"
    );
    assert_eq!(working.payer_balances(payer), whole.payer_balances(payer));
    assert!(working.take_changes().is_empty(), "loading is not a change");
}

#[test]
fn a_payment_or_transfer_loaded_after_applying_with_changes_untaken_is_refused() {
    let mut working = State::new_working_set();
    let payer = PayerId::from_u128(1);
    working.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: payer,
            name: "p".to_string(),
            key_hash: KeyHash([1; 32]),
        },
    });
    working.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(2),
            payer,
            amount: Amount::from_micros(5),
            currency: currency("USD"),
            source: FundingSource::Sandbox,
            transfer_id: TransferId(3),
        },
    });
    let mut other = State::new();
    other.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: PayerId::from_u128(4),
            name: "q".to_string(),
            key_hash: KeyHash([2; 32]),
        },
    });
    other.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(5),
            payer: PayerId::from_u128(4),
            amount: Amount::from_micros(5),
            currency: currency("USD"),
            source: FundingSource::Sandbox,
            transfer_id: TransferId(6),
        },
    });
    let record = other.transfer_record(TransferId(6)).expect("made above");
    assert_eq!(
        working.insert_transfer_record(record),
        Err(LoadError::ChangesPending)
    );
    let changes = working.take_changes();
    assert_eq!(changes.transfers.len(), 1);
    assert_eq!(working.insert_transfer_record(record), Ok(()));
    assert!(
        working.take_changes().transfers.is_empty(),
        "a loaded record is not new"
    );
}

#[test]
fn a_batch_that_replaces_the_operator_key_frees_the_old_one_for_a_new_party() {
    let record = |command| Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command,
    };
    let (old, new) = (KeyHash([1; 32]), KeyHash([2; 32]));
    let mut whole = State::new();
    whole.apply(&record(Command::SetOperatorKey { key_hash: old }));
    let batch = [
        record(Command::SetOperatorKey { key_hash: new }),
        record(Command::CreatePayer {
            id: PayerId::from_u128(3),
            name: "p".to_string(),
            key_hash: old,
        }),
    ];
    let mut embedded = State::new();
    embedded.apply(&record(Command::SetOperatorKey { key_hash: old }));
    whole.track_changes();
    check_batch(&mut whole, &mut embedded, &batch).expect("the working set agrees");
    assert_eq!(
        whole.principal(&old),
        Some(Principal::Payer(PayerId::from_u128(3)))
    );
}
