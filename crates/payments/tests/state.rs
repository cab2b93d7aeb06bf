//! Properties of the payments state and its journal codec.
//!
//! - The codec: every record of every command survives encoding; shortened, lengthened or
//!   wrongly versioned bytes are refused.
//! - Random histories (parties with various fee schedules, top-ups that succeed, are declined
//!   or overflow, payments and batches that fit, overdraw or name unknown parties, refunds in
//!   full or in parts by every kind of caller, idempotency keys retried with the same and with
//!   another request, pruning, ids reused) are checked step by step against a model written
//!   from the rules, against the money invariants, and replayed (directly and through the
//!   codec) into fresh states that must answer every query the same.
//! - Idempotency and authorization, one rule per test.

use std::collections::{HashMap, HashSet};

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::codec;
use farthing_payments::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

const CASES: u32 = 128;
/// Where histories start: some microsecond in 2023.
const EPOCH: u64 = 1_700_000_000_000_000;
const MICROS_PER_SEC: u64 = 1_000_000;

fn currency(code: &str) -> Currency {
    Currency::parse(code).expect("a known code")
}

/// The fee rule, written from its definition: `floor(amount × bps / 10000) + fixed`, capped at
/// the amount. Computed in `u128`, so nothing saturates on the way.
fn expected_fee(amount: Amount, schedule: FeeSchedule) -> Amount {
    let a = u128::from(amount.micros());
    let proportional = a * u128::from(schedule.bps) / 10_000;
    let fee = (proportional + u128::from(schedule.fixed.micros())).min(a);
    Amount::from_micros(u64::try_from(fee).expect("capped at the amount"))
}

// =============================================================================================
// Codec
// =============================================================================================

mod codec_properties {
    use super::*;

    const CODES: [&str; 8] = ["USD", "EUR", "JPY", "KES", "GBP", "ZAR", "NGN", "BRL"];

    fn any_currency() -> impl Strategy<Value = Currency> {
        prop::sample::select(CODES.to_vec()).prop_map(currency)
    }

    /// Any Unicode text: control characters, NUL, emoji, combining marks.
    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
            prop::sample::select(vec![
                "",
                "café",
                "日本語の説明",
                "🪙💸",
                "a\u{0}b",
                "e\u{301}"
            ])
            .prop_map(str::to_string),
        ]
    }

    fn any_amount() -> impl Strategy<Value = Amount> {
        prop_oneof![
            Just(Amount::ZERO),
            Just(Amount::MAX),
            any::<u64>().prop_map(Amount::from_micros),
        ]
    }

    fn any_principal() -> impl Strategy<Value = Principal> {
        prop_oneof![
            Just(Principal::Operator),
            any::<u128>().prop_map(|v| Principal::Merchant(MerchantId::from_u128(v))),
            any::<u128>().prop_map(|v| Principal::Payer(PayerId::from_u128(v))),
        ]
    }

    fn any_key_hash() -> impl Strategy<Value = KeyHash> {
        prop::array::uniform32(any::<u8>()).prop_map(KeyHash)
    }

    fn any_pay() -> impl Strategy<Value = PayCommand> {
        (
            (any::<u128>(), any::<u128>(), any::<u128>()),
            any_amount(),
            any_currency(),
            prop::option::of(any_text()),
            prop::option::of(any_text()),
            (any::<u128>(), any::<u128>()),
        )
            .prop_map(
                |((id, payer, merchant), amount, currency, description, reference, (t0, t1))| {
                    PayCommand {
                        id: PaymentId::from_u128(id),
                        payer: PayerId::from_u128(payer),
                        merchant: MerchantId::from_u128(merchant),
                        amount,
                        currency,
                        description,
                        reference,
                        transfer_ids: [TransferId(t0), TransferId(t1)],
                    }
                },
            )
    }

    fn any_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            any_key_hash().prop_map(|key_hash| Command::SetOperatorKey { key_hash }),
            (
                any::<u128>(),
                any_text(),
                any_key_hash(),
                any::<u32>(),
                any_amount()
            )
                .prop_map(|(id, name, key_hash, bps, fixed)| Command::CreateMerchant {
                    id: MerchantId::from_u128(id),
                    name,
                    key_hash,
                    fee: FeeSchedule { bps, fixed },
                }),
            (any::<u128>(), any_text(), any_key_hash()).prop_map(|(id, name, key_hash)| {
                Command::CreatePayer {
                    id: PayerId::from_u128(id),
                    name,
                    key_hash,
                }
            }),
            (
                (any::<u128>(), any::<u128>()),
                any_amount(),
                any_currency(),
                any::<bool>(),
                any::<u128>()
            )
                .prop_map(|((id, payer), amount, currency, decline, transfer)| {
                    Command::Topup {
                        id: TopupId::from_u128(id),
                        payer: PayerId::from_u128(payer),
                        amount,
                        currency,
                        source: if decline {
                            FundingSource::SandboxDecline
                        } else {
                            FundingSource::Sandbox
                        },
                        transfer_id: TransferId(transfer),
                    }
                }),
            any_pay().prop_map(Command::Pay),
            prop::collection::vec(any_pay(), 0..4).prop_map(Command::PayBatch),
            (
                (any::<u128>(), any::<u128>()),
                prop::option::of(any_amount()),
                any_principal(),
                (any::<u128>(), any::<u128>())
            )
                .prop_map(|((id, payment), amount, caller, (t0, t1))| {
                    Command::Refund {
                        id: RefundId::from_u128(id),
                        payment: PaymentId::from_u128(payment),
                        amount,
                        caller,
                        transfer_ids: [TransferId(t0), TransferId(t1)],
                    }
                }),
            any::<u64>().prop_map(|before| Command::PruneIdempotencyKeys {
                before: Timestamp(before)
            }),
            (any_pay(), any::<u64>(), any::<u128>()).prop_map(|(pay, expires_at, settle)| {
                Command::from(HoldCommand::Authorize {
                    pay,
                    expires_at: Timestamp(expires_at),
                    settle_id: TransferId(settle),
                })
            }),
            (
                any::<u128>(),
                prop::option::of(any_amount()),
                any_principal()
            )
                .prop_map(|(payment, amount, caller)| Command::from(
                    HoldCommand::Capture {
                        payment: PaymentId::from_u128(payment),
                        amount,
                        caller,
                    }
                )),
            (any::<u128>(), any_principal()).prop_map(|(payment, caller)| Command::from(
                HoldCommand::Cancel {
                    payment: PaymentId::from_u128(payment),
                    caller,
                }
            )),
            any::<u64>().prop_map(|at| Command::from(HoldCommand::Expire { at: Timestamp(at) })),
        ]
    }

    fn any_record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            prop::option::of((
                any_principal(),
                any_text(),
                prop::array::uniform32(any::<u8>()),
            )),
            any_command(),
        )
            .prop_map(|(now, claim, command)| Record {
                now: Timestamp(now),
                idempotency: claim.map(|(principal, key, fingerprint)| IdempotencyClaim {
                    key: IdempotencyKey { principal, key },
                    fingerprint,
                }),
                command,
            })
    }

    fn encoded(record: &Record) -> Vec<u8> {
        let mut bytes = Vec::new();
        codec::encode(record, &mut bytes);
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn every_record_decodes_to_itself_after_encoding(record in any_record()) {
            prop_assert_eq!(codec::decode(&encoded(&record)), Ok(record));
        }

        #[test]
        fn a_record_cut_short_at_any_length_does_not_decode(record in any_record()) {
            let bytes = encoded(&record);
            for len in 0..bytes.len() {
                prop_assert!(
                    codec::decode(&bytes[..len]).is_err(),
                    "{} of {} bytes decoded",
                    len,
                    bytes.len()
                );
            }
        }

        #[test]
        fn a_record_with_bytes_after_it_does_not_decode(record in any_record(), extra in 1..4usize) {
            let mut bytes = encoded(&record);
            bytes.extend(std::iter::repeat_n(0u8, extra));
            prop_assert_eq!(codec::decode(&bytes), Err(codec::DecodeError::TrailingBytes));
        }

        #[test]
        fn a_version_byte_the_codec_does_not_know_is_refused(
            record in any_record(),
            version in any::<u8>(),
        ) {
            let mut bytes = encoded(&record);
            // Version 1 (the first) and 2 (the current) are known.
            prop_assume!(version != 1 && version != 2);
            bytes[0] = version;
            prop_assert_eq!(codec::decode(&bytes), Err(codec::DecodeError::UnknownVersion(version)));
        }
    }

    #[test]
    fn a_refund_of_zero_and_a_refund_of_the_rest_encode_differently() {
        let refund = |amount| Record {
            now: Timestamp(1),
            idempotency: None,
            command: Command::Refund {
                id: RefundId::from_u128(1),
                payment: PaymentId::from_u128(2),
                amount,
                caller: Principal::Operator,
                transfer_ids: [TransferId(3), TransferId(4)],
            },
        };
        let zero = refund(Some(Amount::ZERO));
        let rest = refund(None);
        assert_ne!(encoded(&zero), encoded(&rest));
        assert_eq!(codec::decode(&encoded(&zero)), Ok(zero));
        assert_eq!(codec::decode(&encoded(&rest)), Ok(rest));
    }
}

// =============================================================================================
// Random histories, a model, invariants and replay
// =============================================================================================

mod histories {
    use super::*;

    const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];

    // -- Generation: raw choices, resolved against the history when the step is built. ------

    #[derive(Clone, Debug)]
    enum Pick {
        First,
        Known(Index),
        Unknown,
    }

    #[derive(Clone, Debug)]
    struct PaySpec {
        payer: Pick,
        merchant: Pick,
        amount: u64,
        currency: usize,
        description: Option<String>,
        /// Reuse the id of an earlier payment.
        reuse: Option<Index>,
    }

    #[derive(Clone, Copy, Debug)]
    enum RefundAmount {
        /// `None`: whatever is left.
        Rest,
        Zero,
        /// This many 256ths of what is left, at least one micro.
        Part(u8),
        Exact,
        /// One micro more than what is left.
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
        SetOperatorKey,
        CreatePayer {
            reuse: Option<Index>,
        },
        CreateMerchant {
            fee: FeeSchedule,
            reuse: Option<Index>,
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
        /// The same key and request as an earlier claimed step (a client retry): the command is
        /// rebuilt with fresh ids, as a server would for a retried request.
        Retry(Index),
        /// The key of an earlier claimed step with another request.
        Conflict(Index),
    }

    #[derive(Clone, Debug)]
    struct StepSpec {
        advance_secs: u64,
        op: OpSpec,
        claim: ClaimSpec,
    }

    fn pick() -> impl Strategy<Value = Pick> {
        prop_oneof![15 => any::<Index>().prop_map(Pick::Known), 1 => Just(Pick::Unknown)]
    }

    /// Mostly the first currency, so that wallets and payments meet.
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
            prop_oneof![
                8 => 1..=800_000u64,
                1 => 1..=u64::MAX,
            ],
            currency_index(),
            prop::option::of(prop::sample::select(vec!["coffee", "☕ café", "書籍"])),
            maybe_reuse(),
        )
            .prop_map(
                |(payer, merchant, amount, currency, description, reuse)| PaySpec {
                    payer,
                    merchant,
                    amount,
                    currency,
                    description: description.map(str::to_string),
                    reuse,
                },
            )
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

    fn refund_amount() -> impl Strategy<Value = RefundAmount> {
        prop_oneof![
            3 => Just(RefundAmount::Rest),
            1 => Just(RefundAmount::Zero),
            4 => any::<u8>().prop_map(RefundAmount::Part),
            1 => Just(RefundAmount::Exact),
            1 => Just(RefundAmount::Over),
        ]
    }

    fn caller() -> impl Strategy<Value = Caller> {
        prop_oneof![
            2 => Just(Caller::Operator),
            4 => Just(Caller::ItsMerchant),
            1 => any::<Index>().prop_map(Caller::AnotherMerchant),
            1 => Just(Caller::ItsPayer),
        ]
    }

    fn op_spec() -> impl Strategy<Value = OpSpec> {
        prop_oneof![
            1 => Just(OpSpec::SetOperatorKey),
            3 => maybe_reuse().prop_map(|reuse| OpSpec::CreatePayer { reuse }),
            3 => (fee_schedule(), maybe_reuse())
                .prop_map(|(fee, reuse)| OpSpec::CreateMerchant { fee, reuse }),
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
            6 => (pick(), refund_amount(), caller(), maybe_reuse()).prop_map(
                |(payment, amount, caller, reuse)| OpSpec::Refund {
                    payment,
                    amount,
                    caller,
                    reuse,
                }
            ),
            1 => prop_oneof![Just(0u64), Just(3_600), Just(24 * 3_600), 0..100_000u64]
                .prop_map(|age_secs| OpSpec::Prune { age_secs }),
        ]
    }

    fn claim_spec() -> impl Strategy<Value = ClaimSpec> {
        prop_oneof![
            4 => Just(ClaimSpec::None),
            3 => Just(ClaimSpec::Fresh),
            2 => any::<Index>().prop_map(ClaimSpec::Retry),
            1 => any::<Index>().prop_map(ClaimSpec::Conflict),
        ]
    }

    /// Parties and money first, so that most of the history has someone to pay.
    fn setup_op() -> impl Strategy<Value = OpSpec> {
        prop_oneof![
            2 => Just(OpSpec::CreatePayer { reuse: None }),
            2 => fee_schedule().prop_map(|fee| OpSpec::CreateMerchant { fee, reuse: None }),
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
            claim_spec(),
        )
            .prop_map(|(advance_secs, op, claim)| StepSpec {
                advance_secs,
                op,
                claim,
            })
    }

    fn history() -> impl Strategy<Value = Vec<StepSpec>> {
        let first = (
            step(Just(OpSpec::CreatePayer { reuse: None })),
            step(fee_schedule().prop_map(|fee| OpSpec::CreateMerchant { fee, reuse: None })),
            step(Just(OpSpec::Topup {
                payer: Pick::First,
                amount: 5_000_000,
                currency: 0,
                decline: false,
                reuse: None,
            })),
        );
        (
            first,
            prop::collection::vec(step(setup_op()), 0..8),
            prop::collection::vec(step(op_spec()), 1..50),
        )
            .prop_map(|((a, b, c), setup, rest)| {
                let mut steps = vec![a, b, c];
                steps.extend(setup);
                steps.extend(rest);
                steps
            })
    }

    // -- The model: the rules, written out. ---------------------------------------------

    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    enum Acct {
        Payer(PayerId),
        Merchant(MerchantId),
        Fees,
        External,
    }

    impl Acct {
        /// Every account but the outside world's must stay at or above zero.
        fn limited(self) -> bool {
            !matches!(self, Acct::External)
        }
    }

    #[derive(Clone, Copy, Default, Debug)]
    struct Totals {
        debits: u64,
        credits: u64,
    }

    enum LegFailure {
        Exceeds,
        Overflow,
    }

    struct KeptOutcome {
        made: Timestamp,
        key: IdempotencyKey,
        fingerprint: [u8; 32],
        outcome: Outcome,
    }

    #[derive(Default)]
    struct Model {
        totals: HashMap<(Acct, Currency), Totals>,
        /// Wallets exist once a top-up in their currency got past the funding source.
        wallets: HashSet<(PayerId, Currency)>,
        operator_key: Option<KeyHash>,
        keys: HashMap<KeyHash, Principal>,
        payers: Vec<PayerId>,
        merchants: Vec<Merchant>,
        payments: Vec<Payment>,
        topups: HashSet<TopupId>,
        refunds: HashSet<RefundId>,
        /// The sum of the amounts of the refunds of each payment, from refund outcomes.
        refunded: HashMap<PaymentId, (Amount, Amount)>,
        idempotency: Vec<KeptOutcome>,
    }

    /// Whether an outcome is kept for its idempotency key, per the rules: declines are,
    /// requests wrong from the start and non-business outcomes are not.
    fn kept(outcome: &Outcome) -> bool {
        match outcome {
            Outcome::Rejected(rejection) => matches!(
                rejection,
                Rejection::InsufficientFunds
                    | Rejection::FundingDeclined
                    | Rejection::MerchantBalanceInsufficient
            ),
            Outcome::OperatorKeySet | Outcome::Pruned => false,
            _ => true,
        }
    }

    impl Model {
        fn merchant(&self, id: MerchantId) -> Option<&Merchant> {
            self.merchants.iter().find(|m| m.id == id)
        }

        fn payment_mut(&mut self, id: PaymentId) -> Option<&mut Payment> {
            self.payments.iter_mut().find(|p| p.id == id)
        }

        fn balance(&self, acct: Acct, currency: Currency) -> i128 {
            let t = self
                .totals
                .get(&(acct, currency))
                .copied()
                .unwrap_or_default();
            i128::from(t.credits) - i128::from(t.debits)
        }

        /// Moves money along legs that all happen or none does; legs of zero are skipped.
        fn chain(
            &mut self,
            currency: Currency,
            legs: &[(Acct, Acct, Amount)],
        ) -> Result<(), LegFailure> {
            let mut totals = self.totals.clone();
            for &(debit, credit, amount) in legs {
                if amount.is_zero() {
                    continue;
                }
                let d = totals.get(&(debit, currency)).copied().unwrap_or_default();
                let c = totals.get(&(credit, currency)).copied().unwrap_or_default();
                let debits = d
                    .debits
                    .checked_add(amount.micros())
                    .filter(|total| *total <= farthing_ledger::TOTAL_MICROS_MAX)
                    .ok_or(LegFailure::Overflow)?;
                let credits = c
                    .credits
                    .checked_add(amount.micros())
                    .filter(|total| *total <= farthing_ledger::TOTAL_MICROS_MAX)
                    .ok_or(LegFailure::Overflow)?;
                if debit.limited() && debits > d.credits {
                    return Err(LegFailure::Exceeds);
                }
                totals.insert((debit, currency), Totals { debits, ..d });
                totals.insert((credit, currency), Totals { credits, ..c });
            }
            self.totals = totals;
            Ok(())
        }

        fn apply(&mut self, record: &Record) -> Outcome {
            if let Some(claim) = &record.idempotency
                && let Some(earlier) = self.idempotency.iter().find(|k| k.key == claim.key)
            {
                return if earlier.fingerprint == claim.fingerprint {
                    earlier.outcome.clone()
                } else {
                    Outcome::Rejected(Rejection::IdempotencyKeyReused)
                };
            }
            let outcome = self.execute(record.now, &record.command);
            if let Some(claim) = &record.idempotency
                && kept(&outcome)
            {
                self.idempotency.push(KeptOutcome {
                    made: record.now,
                    key: claim.key.clone(),
                    fingerprint: claim.fingerprint,
                    outcome: outcome.clone(),
                });
            }
            outcome
        }

        fn execute(&mut self, now: Timestamp, command: &Command) -> Outcome {
            match command {
                Command::SetOperatorKey { key_hash } => {
                    if let Some(old) = self.operator_key.replace(*key_hash) {
                        self.keys.remove(&old);
                    }
                    self.keys.insert(*key_hash, Principal::Operator);
                    Outcome::OperatorKeySet
                }
                Command::CreateMerchant {
                    id,
                    name,
                    key_hash,
                    fee,
                } => {
                    if self.merchant(*id).is_some() || self.keys.contains_key(key_hash) {
                        return Outcome::Rejected(Rejection::IdCollision);
                    }
                    let merchant = Merchant {
                        id: *id,
                        name: name.clone(),
                        fee: *fee,
                        created_at: now,
                    };
                    self.keys.insert(*key_hash, Principal::Merchant(*id));
                    self.merchants.push(merchant.clone());
                    Outcome::MerchantCreated(merchant)
                }
                Command::CreatePayer { id, name, key_hash } => {
                    if self.payers.contains(id) || self.keys.contains_key(key_hash) {
                        return Outcome::Rejected(Rejection::IdCollision);
                    }
                    self.keys.insert(*key_hash, Principal::Payer(*id));
                    self.payers.push(*id);
                    Outcome::PayerCreated(Payer {
                        id: *id,
                        name: name.clone(),
                        created_at: now,
                    })
                }
                Command::Topup {
                    id,
                    payer,
                    amount,
                    currency,
                    source,
                    ..
                } => {
                    if !self.payers.contains(payer) {
                        return Outcome::Rejected(Rejection::PayerNotFound);
                    }
                    if self.topups.contains(id) {
                        return Outcome::Rejected(Rejection::IdCollision);
                    }
                    if *source == FundingSource::SandboxDecline {
                        return Outcome::Rejected(Rejection::FundingDeclined);
                    }
                    self.wallets.insert((*payer, *currency));
                    match self.chain(*currency, &[(Acct::External, Acct::Payer(*payer), *amount)]) {
                        Ok(()) => {}
                        Err(LegFailure::Overflow) => {
                            return Outcome::Rejected(Rejection::AmountTooLarge);
                        }
                        Err(LegFailure::Exceeds) => unreachable!("the outside world has no limit"),
                    }
                    self.topups.insert(*id);
                    Outcome::ToppedUp(Topup {
                        id: *id,
                        payer: *payer,
                        amount: *amount,
                        currency: *currency,
                        source: *source,
                        created_at: now,
                    })
                }
                Command::Pay(pay) => match self.pay(now, pay) {
                    Ok(payment) => Outcome::Paid(payment),
                    Err(rejection) => Outcome::Rejected(rejection),
                },
                Command::PayBatch(items) => Outcome::PaidBatch(
                    items
                        .iter()
                        .map(|pay| match self.pay(now, pay) {
                            Ok(payment) => BatchItemOutcome::Succeeded(payment.id),
                            Err(rejection) => BatchItemOutcome::Failed(rejection),
                        })
                        .collect(),
                ),
                Command::Refund {
                    id,
                    payment,
                    amount,
                    caller,
                    ..
                } => match self.refund(now, *id, *payment, *amount, *caller) {
                    Ok(refund) => Outcome::Refunded(refund),
                    Err(rejection) => Outcome::Rejected(rejection),
                },
                Command::PruneIdempotencyKeys { before } => {
                    self.idempotency.retain(|k| k.made >= *before);
                    Outcome::Pruned
                }

                // Imports have properties of their own (tests/import.rs), and holds are held
                // to the other ways of keeping a state (tests/working_set.rs, the stores).
                Command::Import(_) => unreachable!("these histories hold no imports"),
                Command::Room(RoomCommand::Holds(HoldCommand::Authorize { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Capture { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Cancel { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Expire { .. })) => {
                    unreachable!("these histories hold no holds")
                }
            }
        }

        fn pay(&mut self, now: Timestamp, pay: &PayCommand) -> Result<Payment, Rejection> {
            let schedule = self
                .merchant(pay.merchant)
                .ok_or(Rejection::MerchantNotFound)?
                .fee;
            if !self.payers.contains(&pay.payer) {
                return Err(Rejection::PayerNotFound);
            }
            if self.payments.iter().any(|p| p.id == pay.id) {
                return Err(Rejection::IdCollision);
            }
            if !self.wallets.contains(&(pay.payer, pay.currency)) {
                return Err(Rejection::InsufficientFunds);
            }
            let fee = expected_fee(pay.amount, schedule);
            let net = Amount::from_micros(pay.amount.micros() - fee.micros());
            let payer = Acct::Payer(pay.payer);
            match self.chain(
                pay.currency,
                &[
                    (payer, Acct::Merchant(pay.merchant), net),
                    (payer, Acct::Fees, fee),
                ],
            ) {
                Ok(()) => {}
                Err(LegFailure::Exceeds) => return Err(Rejection::InsufficientFunds),
                Err(LegFailure::Overflow) => return Err(Rejection::AmountTooLarge),
            }
            let payment = Payment {
                id: pay.id,
                payer: pay.payer,
                merchant: pay.merchant,
                amount: pay.amount,
                currency: pay.currency,
                fee,
                description: pay.description.clone(),
                reference: pay.reference.clone(),
                created_at: now,
                amount_refunded: Amount::ZERO,
                fee_refunded: Amount::ZERO,
                hold: None,
            };
            self.payments.push(payment.clone());
            Ok(payment)
        }

        fn refund(
            &mut self,
            now: Timestamp,
            id: RefundId,
            payment_id: PaymentId,
            requested: Option<Amount>,
            caller: Principal,
        ) -> Result<Refund, Rejection> {
            let payment = self
                .payments
                .iter()
                .find(|p| p.id == payment_id)
                .cloned()
                .ok_or(Rejection::PaymentNotFound)?;
            let allowed = match caller {
                Principal::Operator => true,
                Principal::Merchant(merchant) => merchant == payment.merchant,
                Principal::Payer(_) => false,
            };
            if !allowed {
                return Err(Rejection::PaymentNotFound);
            }
            if self.refunds.contains(&id) {
                return Err(Rejection::IdCollision);
            }
            let remaining = payment.amount.micros() - payment.amount_refunded.micros();
            let amount = requested.map_or(remaining, Amount::micros);
            if amount == 0 || amount > remaining {
                return Err(Rejection::RefundExceedsPayment);
            }
            // The fee comes back in proportion to the running total refunded.
            let refunded_after = payment.amount_refunded.micros() + amount;
            let fee_after = u64::try_from(
                u128::from(payment.fee.micros()) * u128::from(refunded_after)
                    / u128::from(payment.amount.micros()),
            )
            .expect("at most the fee");
            let fee_back = fee_after - payment.fee_refunded.micros();
            let net_back = amount - fee_back;
            let wallet = Acct::Payer(payment.payer);
            match self.chain(
                payment.currency,
                &[
                    (
                        Acct::Merchant(payment.merchant),
                        wallet,
                        Amount::from_micros(net_back),
                    ),
                    (Acct::Fees, wallet, Amount::from_micros(fee_back)),
                ],
            ) {
                Ok(()) => {}
                Err(LegFailure::Exceeds) => return Err(Rejection::MerchantBalanceInsufficient),
                Err(LegFailure::Overflow) => return Err(Rejection::AmountTooLarge),
            }
            let row = self.payment_mut(payment_id).expect("found above");
            row.amount_refunded = Amount::from_micros(refunded_after);
            row.fee_refunded = Amount::from_micros(fee_after);
            self.refunds.insert(id);
            Ok(Refund {
                id,
                payment: payment_id,
                payer: payment.payer,
                merchant: payment.merchant,
                amount: Amount::from_micros(amount),
                currency: payment.currency,
                fee_refunded: Amount::from_micros(fee_back),
                created_at: now,
            })
        }
    }

    // -- Building records from the specs. ------------------------------------------------

    struct Builder {
        now: u64,
        next_id: u128,
        /// Every id handed out, to reuse some.
        payer_ids: Vec<PayerId>,
        merchant_ids: Vec<MerchantId>,
        payment_ids: Vec<PaymentId>,
        topup_ids: Vec<TopupId>,
        refund_ids: Vec<RefundId>,
        /// Claimed records so far: their claim and command.
        claimed: Vec<(IdempotencyClaim, Command)>,
        key_hashes: Vec<KeyHash>,
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
                claimed: Vec::new(),
                key_hashes: Vec::new(),
            }
        }

        fn fresh(&mut self) -> u128 {
            self.next_id += 1;
            self.next_id
        }

        fn key_hash(&mut self) -> KeyHash {
            let mut bytes = [0u8; 32];
            bytes[..16].copy_from_slice(&self.fresh().to_le_bytes());
            bytes[31] = 0xAB;
            let hash = KeyHash(bytes);
            self.key_hashes.push(hash);
            hash
        }

        fn transfer_ids(&mut self) -> [TransferId; 2] {
            [TransferId(self.fresh()), TransferId(self.fresh())]
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

        fn payer(&mut self, pick: &Pick, model: &Model) -> PayerId {
            match pick {
                Pick::First if !model.payers.is_empty() => model.payers[0],
                Pick::Known(index) if !model.payers.is_empty() => {
                    model.payers[index.index(model.payers.len())]
                }
                _ => PayerId::from_u128(self.fresh()),
            }
        }

        fn merchant(&mut self, pick: &Pick, model: &Model) -> MerchantId {
            match pick {
                Pick::First if !model.merchants.is_empty() => model.merchants[0].id,
                Pick::Known(index) if !model.merchants.is_empty() => {
                    model.merchants[index.index(model.merchants.len())].id
                }
                _ => MerchantId::from_u128(self.fresh()),
            }
        }

        fn pay(&mut self, spec: &PaySpec, model: &Model) -> PayCommand {
            let payment_ids = self.payment_ids.clone();
            let id = self.reuse_or_fresh(&spec.reuse, &payment_ids, PaymentId::from_u128);
            self.payment_ids.push(id);
            PayCommand {
                id,
                payer: self.payer(&spec.payer, model),
                merchant: self.merchant(&spec.merchant, model),
                amount: Amount::from_micros(spec.amount),
                currency: currency(CURRENCIES[spec.currency]),
                description: spec.description.clone(),
                reference: Some(format!("ref-{}", self.next_id)),
                transfer_ids: self.transfer_ids(),
            }
        }

        fn command(&mut self, op: &OpSpec, model: &Model) -> Command {
            match op {
                OpSpec::SetOperatorKey => Command::SetOperatorKey {
                    key_hash: self.key_hash(),
                },
                OpSpec::CreatePayer { reuse } => {
                    let used = self.payer_ids.clone();
                    let id = self.reuse_or_fresh(reuse, &used, PayerId::from_u128);
                    self.payer_ids.push(id);
                    Command::CreatePayer {
                        id,
                        name: format!("payer {}", id.to_u128()),
                        key_hash: self.key_hash(),
                    }
                }
                OpSpec::CreateMerchant { fee, reuse } => {
                    let used = self.merchant_ids.clone();
                    let id = self.reuse_or_fresh(reuse, &used, MerchantId::from_u128);
                    self.merchant_ids.push(id);
                    Command::CreateMerchant {
                        id,
                        name: format!("Café {}", id.to_u128()),
                        key_hash: self.key_hash(),
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
                    Command::Topup {
                        id,
                        payer: self.payer(payer, model),
                        amount: Amount::from_micros(*amount),
                        currency: currency(CURRENCIES[*c]),
                        source: if *decline {
                            FundingSource::SandboxDecline
                        } else {
                            FundingSource::Sandbox
                        },
                        transfer_id: TransferId(self.fresh()),
                    }
                }
                OpSpec::Pay(spec) => Command::Pay(self.pay(spec, model)),
                OpSpec::Batch(specs) => {
                    Command::PayBatch(specs.iter().map(|spec| self.pay(spec, model)).collect())
                }
                OpSpec::Refund {
                    payment,
                    amount,
                    caller,
                    reuse,
                } => {
                    let used = self.refund_ids.clone();
                    let id = self.reuse_or_fresh(reuse, &used, RefundId::from_u128);
                    self.refund_ids.push(id);
                    let target = match payment {
                        Pick::First if !model.payments.is_empty() => {
                            Some(model.payments[0].clone())
                        }
                        Pick::Known(index) if !model.payments.is_empty() => {
                            Some(model.payments[index.index(model.payments.len())].clone())
                        }
                        _ => None,
                    };
                    let payment_id = target
                        .as_ref()
                        .map_or_else(|| PaymentId::from_u128(self.fresh()), |p| p.id);
                    let remaining = target
                        .as_ref()
                        .map_or(1_000, |p| p.amount.micros() - p.amount_refunded.micros());
                    let amount = match amount {
                        RefundAmount::Rest => None,
                        RefundAmount::Zero => Some(Amount::ZERO),
                        RefundAmount::Part(share) => Some(Amount::from_micros(
                            (u64::try_from(u128::from(remaining) * u128::from(*share) / 256)
                                .unwrap())
                            .max(1),
                        )),
                        RefundAmount::Exact => Some(Amount::from_micros(remaining)),
                        RefundAmount::Over => {
                            Some(Amount::from_micros(remaining.saturating_add(1)))
                        }
                    };
                    let caller = match (caller, &target) {
                        (Caller::Operator, _) => Principal::Operator,
                        (Caller::ItsMerchant, Some(p)) => Principal::Merchant(p.merchant),
                        (Caller::ItsPayer, Some(p)) => Principal::Payer(p.payer),
                        (Caller::AnotherMerchant(index), _) if !model.merchants.is_empty() => {
                            Principal::Merchant(
                                model.merchants[index.index(model.merchants.len())].id,
                            )
                        }
                        _ => Principal::Merchant(MerchantId::from_u128(self.fresh())),
                    };
                    Command::Refund {
                        id,
                        payment: payment_id,
                        amount,
                        caller,
                        transfer_ids: self.transfer_ids(),
                    }
                }
                OpSpec::Prune { age_secs } => Command::PruneIdempotencyKeys {
                    before: Timestamp(self.now.saturating_sub(age_secs * MICROS_PER_SEC)),
                },
            }
        }

        /// The same request with fresh ids, as a server builds it for a retried request.
        fn refresh(&mut self, command: &Command) -> Command {
            fn refresh_pay(this: &mut Builder, pay: &PayCommand) -> PayCommand {
                let id = PaymentId::from_u128(this.fresh());
                this.payment_ids.push(id);
                PayCommand {
                    id,
                    transfer_ids: this.transfer_ids(),
                    ..pay.clone()
                }
            }
            match command {
                Command::CreatePayer { name, .. } => {
                    let id = PayerId::from_u128(self.fresh());
                    self.payer_ids.push(id);
                    Command::CreatePayer {
                        id,
                        name: name.clone(),
                        key_hash: self.key_hash(),
                    }
                }
                Command::CreateMerchant { name, fee, .. } => {
                    let id = MerchantId::from_u128(self.fresh());
                    self.merchant_ids.push(id);
                    Command::CreateMerchant {
                        id,
                        name: name.clone(),
                        key_hash: self.key_hash(),
                        fee: *fee,
                    }
                }
                Command::Topup {
                    payer,
                    amount,
                    currency,
                    source,
                    ..
                } => Command::Topup {
                    id: TopupId::from_u128(self.fresh()),
                    payer: *payer,
                    amount: *amount,
                    currency: *currency,
                    source: *source,
                    transfer_id: TransferId(self.fresh()),
                },
                Command::Pay(pay) => Command::Pay(refresh_pay(self, pay)),
                Command::PayBatch(items) => {
                    Command::PayBatch(items.iter().map(|pay| refresh_pay(self, pay)).collect())
                }
                Command::Refund {
                    payment,
                    amount,
                    caller,
                    ..
                } => Command::Refund {
                    id: RefundId::from_u128(self.fresh()),
                    payment: *payment,
                    amount: *amount,
                    caller: *caller,
                    transfer_ids: self.transfer_ids(),
                },
                Command::SetOperatorKey { .. } => Command::SetOperatorKey {
                    key_hash: self.key_hash(),
                },
                Command::PruneIdempotencyKeys { before } => {
                    Command::PruneIdempotencyKeys { before: *before }
                }

                Command::Import(_) => unreachable!("these histories hold no imports"),
                Command::Room(RoomCommand::Holds(HoldCommand::Authorize { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Capture { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Cancel { .. }))
                | Command::Room(RoomCommand::Holds(HoldCommand::Expire { .. })) => {
                    unreachable!("these histories hold no holds")
                }
            }
        }

        fn actor(command: &Command) -> Principal {
            match command {
                Command::Pay(pay) => Principal::Payer(pay.payer),
                Command::PayBatch(items) => items
                    .first()
                    .map_or(Principal::Operator, |p| Principal::Payer(p.payer)),
                Command::Refund { caller, .. } => *caller,
                _ => Principal::Operator,
            }
        }

        fn record(&mut self, step: &StepSpec, model: &Model) -> Record {
            self.now += step.advance_secs * MICROS_PER_SEC;
            let (idempotency, command) = match &step.claim {
                ClaimSpec::Retry(index) if !self.claimed.is_empty() => {
                    let (claim, command) = self.claimed[index.index(self.claimed.len())].clone();
                    (Some(claim), self.refresh(&command))
                }
                ClaimSpec::Conflict(index) if !self.claimed.is_empty() => {
                    let (mut claim, _) = self.claimed[index.index(self.claimed.len())].clone();
                    claim.fingerprint[0] ^= 0xFF;
                    claim.fingerprint[1] = claim.fingerprint[1].wrapping_add(1);
                    let command = self.command(&step.op, model);
                    (Some(claim), command)
                }
                ClaimSpec::None => (None, self.command(&step.op, model)),
                _ => {
                    let command = self.command(&step.op, model);
                    let n = self.fresh();
                    let mut fingerprint = [0u8; 32];
                    fingerprint[..16].copy_from_slice(&n.to_le_bytes());
                    let claim = IdempotencyClaim {
                        key: IdempotencyKey {
                            principal: Self::actor(&command),
                            key: format!("key-{n}"),
                        },
                        fingerprint,
                    };
                    (Some(claim), command)
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

    // -- Queries, for comparing states. ---------------------------------------------------

    fn payment_pages(
        state: &State,
        principal: Principal,
        limit: usize,
    ) -> Option<Vec<Vec<Payment>>> {
        let mut pages = Vec::new();
        let mut cursor = None;
        loop {
            assert!(pages.len() <= state.payment_count(), "the pages never end");
            let page = state.list_payments(principal, limit, cursor).unwrap()?;
            let items: Vec<Payment> = page.items;
            cursor = items.last().map(|p| p.id);
            pages.push(items);
            if !page.has_more {
                return Some(pages);
            }
        }
    }

    fn entry_pages(state: &State, payer: PayerId, limit: usize) -> Option<Vec<Vec<Entry>>> {
        let mut pages: Vec<Vec<Entry>> = Vec::new();
        let mut cursor = None;
        loop {
            let entries: usize = pages.iter().map(Vec::len).sum();
            assert!(entries <= 10_000, "the pages never end");
            let page = state.payer_entries(payer, limit, cursor).unwrap()?;
            cursor = page.items.last().map(|e| e.object);
            pages.push(page.items);
            if !page.has_more {
                return Some(pages);
            }
        }
    }

    /// A statement, oldest first.
    fn statement(state: &State, payer: PayerId) -> Vec<Entry> {
        let mut entries = state
            .payer_entries(payer, usize::MAX, None)
            .unwrap()
            .expect("a known payer")
            .items;
        entries.reverse();
        entries
    }

    /// Balances other than zero, by currency.
    fn nonzero(balances: Option<Vec<(Currency, i128)>>) -> Vec<(Currency, i128)> {
        let mut out: Vec<(Currency, i128)> = balances
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, b)| *b != 0)
            .collect();
        out.sort();
        out
    }

    /// Everything a caller can ask.
    #[derive(Debug, PartialEq)]
    struct Answers {
        records_applied: u64,
        counts: (usize, usize, usize, usize),
        payer_balances: Vec<Option<Vec<(Currency, i128)>>>,
        merchant_balances: Vec<Option<Vec<(Currency, i128)>>>,
        payment_pages: Vec<(Principal, Option<Vec<Vec<Payment>>>)>,
        entry_pages: Vec<Option<Vec<Vec<Entry>>>>,
        currency_totals: Vec<CurrencyTotals>,
        principals: Vec<Option<Principal>>,
        idempotency: Vec<String>,
        payments: Vec<Option<Payment>>,
    }

    fn answers(state: &State, builder: &Builder) -> Answers {
        let mut principals = vec![Principal::Operator];
        principals.extend(builder.payer_ids.iter().map(|p| Principal::Payer(*p)));
        principals.extend(builder.merchant_ids.iter().map(|m| Principal::Merchant(*m)));
        Answers {
            records_applied: state.records_applied(),
            counts: (
                state.payer_count(),
                state.merchant_count(),
                state.payment_count(),
                state.ledger_transfer_count(),
            ),
            payer_balances: builder
                .payer_ids
                .iter()
                .map(|p| state.payer_balances(*p).unwrap())
                .collect(),
            merchant_balances: builder
                .merchant_ids
                .iter()
                .map(|m| state.merchant_balances(*m).unwrap())
                .collect(),
            payment_pages: principals
                .iter()
                .map(|principal| (*principal, payment_pages(state, *principal, 3)))
                .collect(),
            entry_pages: builder
                .payer_ids
                .iter()
                .map(|p| entry_pages(state, *p, 2))
                .collect(),
            currency_totals: state.currency_totals(),
            principals: builder
                .key_hashes
                .iter()
                .map(|k| state.principal(k).unwrap())
                .collect(),
            idempotency: builder
                .claimed
                .iter()
                .map(|(claim, _)| {
                    format!(
                        "{:?}",
                        state.idempotency_lookup(&claim.key, &claim.fingerprint)
                    )
                })
                .collect(),
            payments: builder
                .payment_ids
                .iter()
                .map(|p| state.payment(*p).unwrap())
                .collect(),
        }
    }

    // -- Invariants on the state itself. -------------------------------------------------

    fn check_invariants(state: &State, model: &Model) -> Result<(), TestCaseError> {
        for totals in state.currency_totals() {
            prop_assert_eq!(
                totals.posted_net,
                0,
                "posted money not conserved in {:?}",
                totals
            );
            prop_assert_eq!(
                totals.pending_net,
                0,
                "pending money not conserved in {:?}",
                totals
            );
        }
        for &payer in &model.payers {
            let balances = state.payer_balances(payer).unwrap().expect("a known payer");
            prop_assert!(
                balances.iter().all(|(_, b)| *b >= 0),
                "negative wallet {:?}",
                balances
            );
            let expected: Vec<(Currency, i128)> = CURRENCIES
                .iter()
                .map(|code| {
                    (
                        currency(code),
                        model.balance(Acct::Payer(payer), currency(code)),
                    )
                })
                .collect();
            prop_assert_eq!(nonzero(Some(balances)), nonzero(Some(expected)));
            // The statement: each running balance is the one before it plus or minus the entry.
            let mut running: HashMap<Currency, i128> = HashMap::new();
            for entry in statement(state, payer) {
                let before = running.entry(entry.currency).or_insert(0);
                let change = i128::from(entry.amount.micros());
                let after = if entry.credit {
                    *before + change
                } else {
                    *before - change
                };
                prop_assert_eq!(
                    i128::from(entry.balance_after.micros()),
                    after,
                    "{:?}",
                    entry
                );
                *before = after;
            }
            for (currency, balance) in running {
                prop_assert_eq!(balance, model.balance(Acct::Payer(payer), currency));
            }
        }
        for merchant in &model.merchants {
            let balances = state
                .merchant_balances(merchant.id)
                .unwrap()
                .expect("a known merchant");
            prop_assert!(
                balances.iter().all(|(_, b)| *b >= 0),
                "negative merchant {:?}",
                balances
            );
            let expected: Vec<(Currency, i128)> = CURRENCIES
                .iter()
                .map(|code| {
                    (
                        currency(code),
                        model.balance(Acct::Merchant(merchant.id), currency(code)),
                    )
                })
                .collect();
            prop_assert_eq!(nonzero(Some(balances)), nonzero(Some(expected)));
        }
        Ok(())
    }

    /// The fee and refund rules, on what the state says about a payment.
    fn check_payment(state: &State, model: &Model, id: PaymentId) -> Result<(), TestCaseError> {
        let payment = state.payment(id).unwrap().expect("a made payment is kept");
        let schedule = state.merchant(payment.merchant).expect("its merchant").fee;
        prop_assert_eq!(payment.fee, expected_fee(payment.amount, schedule));
        prop_assert_eq!(
            payment.net().micros(),
            payment.amount.micros() - payment.fee.micros()
        );
        let (refunded, fee_refunded) = model
            .refunded
            .get(&id)
            .copied()
            .unwrap_or((Amount::ZERO, Amount::ZERO));
        prop_assert!(refunded <= payment.amount);
        prop_assert_eq!(payment.amount_refunded, refunded);
        prop_assert_eq!(payment.fee_refunded, fee_refunded);
        prop_assert!(payment.fee_refunded <= payment.fee);
        if refunded == payment.amount {
            prop_assert_eq!(
                payment.fee_refunded,
                payment.fee,
                "a full refund returns the whole fee"
            );
        }
        Ok(())
    }

    fn note_outcome(
        model: &mut Model,
        state: &State,
        outcome: &Outcome,
        replayed: bool,
    ) -> Result<Vec<PaymentId>, TestCaseError> {
        if replayed {
            return Ok(Vec::new());
        }
        Ok(match outcome {
            Outcome::Paid(payment) => vec![payment.id],
            Outcome::PaidBatch(items) => items
                .iter()
                .filter_map(|item| match item {
                    BatchItemOutcome::Succeeded(id) => Some(*id),
                    BatchItemOutcome::Failed(_) => None,
                })
                .collect(),
            Outcome::Refunded(refund) => {
                prop_assert!(refund.fee_refunded <= refund.amount);
                let sums = model
                    .refunded
                    .entry(refund.payment)
                    .or_insert((Amount::ZERO, Amount::ZERO));
                sums.0 = sums
                    .0
                    .checked_add(refund.amount)
                    .expect("bounded by the payment");
                sums.1 = sums
                    .1
                    .checked_add(refund.fee_refunded)
                    .expect("bounded by the fee");
                prop_assert!(state.refund_record(refund.id).is_some());
                vec![refund.payment]
            }
            _ => Vec::new(),
        })
    }

    fn run(history: &[StepSpec]) -> Result<(), TestCaseError> {
        let mut state = State::new();
        let mut model = Model::default();
        let mut builder = Builder::new();
        let mut records = Vec::new();
        let mut outcomes = Vec::new();
        for step in history {
            let record = builder.record(step, &model);
            let replay_expected = record
                .idempotency
                .as_ref()
                .is_some_and(|claim| model.idempotency.iter().any(|k| k.key == claim.key));
            // What the state refuses beforehand (answered by a server without a record) is
            // exactly what applying the record refuses, and without an idempotency key (whose
            // answer is then kept) such a refusal changes nothing.
            let told = (!replay_expected)
                .then(|| state.refusal(&record.command))
                .flatten();
            let unkeyed_refusal = told.is_some() && record.idempotency.is_none();
            let before = (replay_expected || unkeyed_refusal).then(|| answers(&state, &builder));
            let expected = model.apply(&record);
            let outcome = state.apply(&record);
            prop_assert_eq!(&outcome, &expected, "record {:?}", record);
            // Only ids chosen again on purpose (which random 128-bit ids never are) can make
            // `apply` refuse otherwise: `refusal` leaves collisions to it.
            if let Some(rejection) = told
                && outcome != Outcome::Rejected(Rejection::IdCollision)
            {
                prop_assert_eq!(&outcome, &Outcome::Rejected(rejection), "told {:?}", record);
            }
            if let Some(before) = before {
                // A replay, a refusal of a reused key or a refusal told beforehand changes
                // nothing but the record count.
                let after = answers(&state, &builder);
                prop_assert_eq!(after.records_applied, before.records_applied + 1);
                prop_assert_eq!(
                    Answers {
                        records_applied: before.records_applied + 1,
                        ..before
                    },
                    after
                );
            }
            for id in note_outcome(&mut model, &state, &outcome, replay_expected)? {
                check_payment(&state, &model, id)?;
            }
            check_invariants(&state, &model)?;
            records.push(record);
            outcomes.push(outcome);
        }
        for payment in &model.payments {
            check_payment(&state, &model, payment.id)?;
        }

        // What each party may list: exactly its own payments, newest first, in full pages.
        let newest_first = |keep: &dyn Fn(&Payment) -> bool| -> Vec<PaymentId> {
            model
                .payments
                .iter()
                .rev()
                .filter(|p| keep(p))
                .map(|p| p.id)
                .collect()
        };
        let listed = |principal| -> Result<Vec<PaymentId>, TestCaseError> {
            let page = state
                .list_payments(principal, usize::MAX, None)
                .unwrap()
                .expect("a known principal");
            prop_assert_eq!(page.has_more, false);
            Ok(page.items.iter().map(|p| p.id).collect())
        };
        prop_assert_eq!(listed(Principal::Operator)?, newest_first(&|_| true));
        for &payer in &model.payers {
            prop_assert_eq!(
                listed(Principal::Payer(payer))?,
                newest_first(&|p| p.payer == payer)
            );
            let paged: Vec<PaymentId> = payment_pages(&state, Principal::Payer(payer), 2)
                .expect("a known payer")
                .concat()
                .iter()
                .map(|p| p.id)
                .collect();
            prop_assert_eq!(paged, newest_first(&|p| p.payer == payer));
        }
        for merchant in &model.merchants {
            let id = merchant.id;
            prop_assert_eq!(
                listed(Principal::Merchant(id))?,
                newest_first(&|p| p.merchant == id)
            );
        }

        // Replays: directly, and through the codec as the journal does.
        let final_answers = answers(&state, &builder);
        let mut direct = State::new();
        let mut decoded = State::new();
        for (record, outcome) in records.iter().zip(&outcomes) {
            prop_assert_eq!(&direct.apply(record), outcome);
            let mut bytes = Vec::new();
            codec::encode(record, &mut bytes);
            let copy = codec::decode(&bytes).expect("an encoded record decodes");
            prop_assert_eq!(&decoded.apply(&copy), outcome);
        }
        prop_assert_eq!(&answers(&direct, &builder), &final_answers);
        prop_assert_eq!(&answers(&decoded, &builder), &final_answers);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn random_histories_follow_the_rules_conserve_money_and_replay_identically(history in history()) {
            run(&history)?;
        }
    }
}

// =============================================================================================
// Idempotency and authorization, one rule at a time
// =============================================================================================

mod rules {
    use super::*;

    /// A state and the means to drive it: time moves forward one second per record.
    struct World {
        state: State,
        now: u64,
        next_id: u128,
    }

    fn usd() -> Currency {
        currency("USD")
    }

    fn claim(principal: Principal, key: &str, fingerprint: u8) -> IdempotencyClaim {
        IdempotencyClaim {
            key: IdempotencyKey {
                principal,
                key: key.to_string(),
            },
            fingerprint: [fingerprint; 32],
        }
    }

    impl World {
        fn new() -> World {
            World {
                state: State::new(),
                now: EPOCH,
                next_id: 100,
            }
        }

        fn fresh(&mut self) -> u128 {
            self.next_id += 1;
            self.next_id
        }

        fn apply(&mut self, command: Command, idempotency: Option<IdempotencyClaim>) -> Outcome {
            self.now += MICROS_PER_SEC;
            self.state.apply(&Record {
                now: Timestamp(self.now),
                idempotency,
                command,
            })
        }

        fn key_hash(&mut self) -> KeyHash {
            let mut bytes = [7u8; 32];
            bytes[..16].copy_from_slice(&self.fresh().to_le_bytes());
            KeyHash(bytes)
        }

        fn payer(&mut self) -> PayerId {
            let id = PayerId::from_u128(self.fresh());
            let key_hash = self.key_hash();
            let outcome = self.apply(
                Command::CreatePayer {
                    id,
                    name: "payer".into(),
                    key_hash,
                },
                None,
            );
            assert!(matches!(outcome, Outcome::PayerCreated(_)), "{outcome:?}");
            id
        }

        fn merchant_with_id(&mut self, id: MerchantId, fee: FeeSchedule) {
            let key_hash = self.key_hash();
            let outcome = self.apply(
                Command::CreateMerchant {
                    id,
                    name: "merchant".into(),
                    key_hash,
                    fee,
                },
                None,
            );
            assert!(
                matches!(outcome, Outcome::MerchantCreated(_)),
                "{outcome:?}"
            );
        }

        fn merchant(&mut self) -> MerchantId {
            let id = MerchantId::from_u128(self.fresh());
            self.merchant_with_id(
                id,
                FeeSchedule {
                    bps: 290,
                    fixed: Amount::from_micros(30),
                },
            );
            id
        }

        fn topup_command(&mut self, payer: PayerId, micros: u64, source: FundingSource) -> Command {
            Command::Topup {
                id: TopupId::from_u128(self.fresh()),
                payer,
                amount: Amount::from_micros(micros),
                currency: usd(),
                source,
                transfer_id: TransferId(self.fresh()),
            }
        }

        fn topup(&mut self, payer: PayerId, micros: u64) {
            let command = self.topup_command(payer, micros, FundingSource::Sandbox);
            let outcome = self.apply(command, None);
            assert!(matches!(outcome, Outcome::ToppedUp(_)), "{outcome:?}");
        }

        /// A payment command with fresh ids, as a server builds one per request.
        fn pay_command(&mut self, payer: PayerId, merchant: MerchantId, micros: u64) -> Command {
            Command::Pay(PayCommand {
                id: PaymentId::from_u128(self.fresh()),
                payer,
                merchant,
                amount: Amount::from_micros(micros),
                currency: usd(),
                description: None,
                reference: None,
                transfer_ids: [TransferId(self.fresh()), TransferId(self.fresh())],
            })
        }

        fn pay(&mut self, payer: PayerId, merchant: MerchantId, micros: u64) -> Payment {
            let command = self.pay_command(payer, merchant, micros);
            match self.apply(command, None) {
                Outcome::Paid(payment) => payment,
                other => panic!("expected a payment, got {other:?}"),
            }
        }

        fn refund_command(
            &mut self,
            payment: PaymentId,
            amount: Option<u64>,
            caller: Principal,
        ) -> Command {
            Command::Refund {
                id: RefundId::from_u128(self.fresh()),
                payment,
                amount: amount.map(Amount::from_micros),
                caller,
                transfer_ids: [TransferId(self.fresh()), TransferId(self.fresh())],
            }
        }

        fn balance(&self, payer: PayerId) -> i128 {
            self.state
                .payer_balances(payer)
                .unwrap()
                .expect("a known payer")
                .into_iter()
                .find(|(c, _)| *c == usd())
                .map_or(0, |(_, b)| b)
        }

        fn merchant_balance(&self, merchant: MerchantId) -> i128 {
            self.state
                .merchant_balances(merchant)
                .unwrap()
                .expect("a known merchant")
                .into_iter()
                .find(|(c, _)| *c == usd())
                .map_or(0, |(_, b)| b)
        }

        /// Facts that change when money moves or objects are made.
        fn footprint(&self, payer: PayerId, merchant: MerchantId) -> (i128, i128, usize, usize) {
            (
                self.balance(payer),
                self.merchant_balance(merchant),
                self.state.payment_count(),
                self.state.ledger_transfer_count(),
            )
        }

        /// The ids of every payment `principal` sees, walking pages of `limit` by cursor.
        fn pages(&self, principal: Principal, limit: usize) -> Vec<PaymentId> {
            let mut ids = Vec::new();
            let mut cursor = None;
            loop {
                assert!(
                    ids.len() <= self.state.payment_count(),
                    "the pages never end"
                );
                let page = self
                    .state
                    .list_payments(principal, limit, cursor)
                    .unwrap()
                    .expect("a cursor the principal may see");
                assert!(page.items.len() <= limit);
                ids.extend(page.items.iter().map(|p| p.id));
                cursor = ids.last().copied();
                if !page.has_more {
                    return ids;
                }
            }
        }

        fn list(&self, principal: Principal) -> Vec<Payment> {
            self.state
                .list_payments(principal, usize::MAX, None)
                .unwrap()
                .expect("a known principal")
                .items
        }
    }

    #[test]
    fn a_retry_with_the_same_key_and_request_answers_the_first_outcome_and_moves_no_money() {
        let mut world = World::new();
        let (payer, merchant) = (world.payer(), world.merchant());
        world.topup(payer, 10_000);
        let key = claim(Principal::Payer(payer), "order-1", 1);
        let command = world.pay_command(payer, merchant, 3_000);
        let first = world.apply(command, Some(key.clone()));
        let Outcome::Paid(paid) = &first else {
            panic!("expected a payment, got {first:?}")
        };
        let before = world.footprint(payer, merchant);
        let retry = world.pay_command(payer, merchant, 3_000);
        let Command::Pay(retry_pay) = &retry else {
            unreachable!()
        };
        let retry_id = retry_pay.id;
        assert_eq!(world.apply(retry, Some(key)), first);
        assert_eq!(world.footprint(payer, merchant), before);
        assert_eq!(world.state.payment(retry_id).unwrap(), None);
        assert_eq!(
            world.balance(payer),
            10_000 - i128::from(paid.amount.micros())
        );
    }

    #[test]
    fn the_same_key_with_another_request_is_refused_as_reused_and_changes_nothing() {
        let mut world = World::new();
        let (payer, merchant) = (world.payer(), world.merchant());
        world.topup(payer, 10_000);
        let key = claim(Principal::Payer(payer), "order-1", 1);
        let command = world.pay_command(payer, merchant, 3_000);
        assert!(matches!(
            world.apply(command, Some(key.clone())),
            Outcome::Paid(_)
        ));
        let before = world.footprint(payer, merchant);
        let other = world.pay_command(payer, merchant, 4_000);
        let reused = IdempotencyClaim {
            fingerprint: [2; 32],
            ..key.clone()
        };
        assert_eq!(
            world.apply(other, Some(reused)),
            Outcome::Rejected(Rejection::IdempotencyKeyReused)
        );
        assert_eq!(world.footprint(payer, merchant), before);
        // The same key text under another principal is another key.
        let operator_key = IdempotencyClaim {
            key: IdempotencyKey {
                principal: Principal::Operator,
                ..key.key.clone()
            },
            fingerprint: [2; 32],
        };
        let command = world.pay_command(payer, merchant, 4_000);
        assert!(matches!(
            world.apply(command, Some(operator_key)),
            Outcome::Paid(_)
        ));
    }

    #[test]
    fn a_kept_decline_is_answered_again_even_after_the_payer_tops_up() {
        let mut world = World::new();
        let (payer, merchant) = (world.payer(), world.merchant());
        world.topup(payer, 1_000);
        let key = claim(Principal::Payer(payer), "big-order", 9);
        let command = world.pay_command(payer, merchant, 5_000);
        let declined = world.apply(command, Some(key.clone()));
        assert_eq!(declined, Outcome::Rejected(Rejection::InsufficientFunds));
        world.topup(payer, 100_000);
        let before = world.footprint(payer, merchant);
        let retry = world.pay_command(payer, merchant, 5_000);
        assert_eq!(world.apply(retry, Some(key)), declined);
        assert_eq!(world.footprint(payer, merchant), before);
        // Without the key, the same payment now goes through.
        world.pay(payer, merchant, 5_000);

        // A declined top-up is kept too.
        let key = claim(Principal::Operator, "topup-1", 3);
        let command = world.topup_command(payer, 1_000, FundingSource::SandboxDecline);
        let declined = world.apply(command, Some(key.clone()));
        assert_eq!(declined, Outcome::Rejected(Rejection::FundingDeclined));
        let command = world.topup_command(payer, 1_000, FundingSource::SandboxDecline);
        assert_eq!(world.apply(command, Some(key)), declined);
    }

    #[test]
    fn a_request_wrong_from_the_start_is_not_kept_so_a_retry_with_the_same_key_can_succeed() {
        let mut world = World::new();
        let payer = world.payer();
        world.topup(payer, 10_000);
        let missing = MerchantId::from_u128(world.fresh());
        let key = claim(Principal::Payer(payer), "to-a-new-shop", 4);
        let command = world.pay_command(payer, missing, 2_000);
        assert_eq!(
            world.apply(command, Some(key.clone())),
            Outcome::Rejected(Rejection::MerchantNotFound)
        );
        assert_eq!(
            world.state.idempotency_lookup(&key.key, &key.fingerprint),
            IdempotencyLookup::New
        );
        world.merchant_with_id(missing, FeeSchedule::ZERO);
        let retry = world.pay_command(payer, missing, 2_000);
        let outcome = world.apply(retry, Some(key.clone()));
        let Outcome::Paid(payment) = &outcome else {
            panic!("the retry should pay, got {outcome:?}")
        };
        assert_eq!(payment.merchant, missing);
        assert_eq!(world.balance(payer), 8_000);
        assert_eq!(
            world.state.idempotency_lookup(&key.key, &key.fingerprint),
            IdempotencyLookup::Replay(&outcome)
        );
    }

    #[test]
    fn pruning_forgets_keys_made_before_the_cutoff_and_keeps_the_newer_ones() {
        let mut world = World::new();
        let (payer, merchant) = (world.payer(), world.merchant());
        world.topup(payer, 100_000);
        let mut made = Vec::new();
        for (n, name) in ["k1", "k2", "k3"].into_iter().enumerate() {
            let key = claim(Principal::Payer(payer), name, n as u8);
            let command = world.pay_command(payer, merchant, 1_000);
            let outcome = world.apply(command, Some(key.clone()));
            made.push((Timestamp(world.now), key, outcome));
        }
        // Cut at the second key's time: only the first was made before it.
        let cutoff = made[1].0;
        assert_eq!(
            world.apply(Command::PruneIdempotencyKeys { before: cutoff }, None),
            Outcome::Pruned
        );
        let lookup = |world: &World, i: usize| {
            let (_, key, _) = &made[i];
            format!(
                "{:?}",
                world.state.idempotency_lookup(&key.key, &key.fingerprint)
            )
        };
        assert_eq!(lookup(&world, 0), format!("{:?}", IdempotencyLookup::New));
        for i in [1, 2] {
            assert_eq!(
                lookup(&world, i),
                format!("{:?}", IdempotencyLookup::Replay(&made[i].2))
            );
        }
        // A forgotten key is free again, even for another request.
        let forgotten = IdempotencyClaim {
            fingerprint: [99; 32],
            ..made[0].1.clone()
        };
        let command = world.pay_command(payer, merchant, 1_000);
        assert!(matches!(
            world.apply(command, Some(forgotten)),
            Outcome::Paid(_)
        ));
        // Pruning again at the same cutoff keeps the newer keys; a later cutoff takes the rest.
        assert_eq!(
            world.apply(Command::PruneIdempotencyKeys { before: cutoff }, None),
            Outcome::Pruned
        );
        for i in [1, 2] {
            assert_ne!(lookup(&world, i), format!("{:?}", IdempotencyLookup::New));
        }
        let now = Timestamp(world.now + 1);
        assert_eq!(
            world.apply(Command::PruneIdempotencyKeys { before: now }, None),
            Outcome::Pruned
        );
        for i in [1, 2] {
            assert_eq!(lookup(&world, i), format!("{:?}", IdempotencyLookup::New));
        }
    }

    #[test]
    fn payers_and_merchants_list_only_their_own_payments_and_cannot_page_from_another_s() {
        let mut world = World::new();
        let payers = [world.payer(), world.payer()];
        let merchants = [world.merchant(), world.merchant()];
        for payer in payers {
            world.topup(payer, 1_000_000);
        }
        let mut made = Vec::new();
        for round in 0..3u64 {
            for payer in payers {
                for merchant in merchants {
                    made.push(world.pay(payer, merchant, 1_000 + round));
                }
            }
        }
        let ids = |payments: &[Payment]| payments.iter().map(|p| p.id).collect::<Vec<_>>();
        let expected = |keep: &dyn Fn(&Payment) -> bool| {
            made.iter()
                .rev()
                .filter(|p| keep(p))
                .map(|p| p.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&world.list(Principal::Operator)), expected(&|_| true));
        for payer in payers {
            assert_eq!(
                ids(&world.list(Principal::Payer(payer))),
                expected(&|p| p.payer == payer)
            );
            assert_eq!(
                world.pages(Principal::Payer(payer), 2),
                expected(&|p| p.payer == payer)
            );
            let theirs = made
                .iter()
                .find(|p| p.payer != payer)
                .expect("another's payment");
            assert!(
                world
                    .state
                    .list_payments(Principal::Payer(payer), 10, Some(theirs.id))
                    .unwrap()
                    .is_none()
            );
        }
        for merchant in merchants {
            assert_eq!(
                ids(&world.list(Principal::Merchant(merchant))),
                expected(&|p| p.merchant == merchant)
            );
            assert_eq!(
                world.pages(Principal::Merchant(merchant), 2),
                expected(&|p| p.merchant == merchant)
            );
            let theirs = made
                .iter()
                .find(|p| p.merchant != merchant)
                .expect("another's");
            assert!(
                world
                    .state
                    .list_payments(Principal::Merchant(merchant), 10, Some(theirs.id))
                    .unwrap()
                    .is_none()
            );
        }
        let stranger = Principal::Payer(PayerId::from_u128(world.fresh()));
        assert!(
            world
                .state
                .list_payments(stranger, 10, None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn only_the_operator_and_the_payment_s_own_merchant_may_refund_it() {
        let mut world = World::new();
        let (payer, merchant, other) = (world.payer(), world.merchant(), world.merchant());
        world.topup(payer, 100_000);
        let payment = world.pay(payer, merchant, 10_000);
        let before = world.footprint(payer, merchant);
        for caller in [Principal::Merchant(other), Principal::Payer(payer)] {
            let command = world.refund_command(payment.id, None, caller);
            assert_eq!(
                world.apply(command, None),
                Outcome::Rejected(Rejection::PaymentNotFound),
                "{caller:?}"
            );
            assert_eq!(world.footprint(payer, merchant), before);
        }
        let command = world.refund_command(payment.id, Some(4_000), Principal::Merchant(merchant));
        assert!(matches!(world.apply(command, None), Outcome::Refunded(_)));
        let command = world.refund_command(payment.id, None, Principal::Operator);
        let Outcome::Refunded(rest) = world.apply(command, None) else {
            panic!("the operator may refund")
        };
        assert_eq!(rest.amount.micros(), 6_000);
        assert_eq!(world.balance(payer), 100_000);
        let refunded = world.state.payment(payment.id).unwrap().expect("kept");
        assert_eq!(refunded.amount_refunded, payment.amount);
        assert_eq!(refunded.fee_refunded, payment.fee);
    }

    #[test]
    fn a_refund_of_zero_is_refused_and_still_refused_after_a_replay_through_the_codec() {
        let mut world = World::new();
        let (payer, merchant) = (world.payer(), world.merchant());
        world.topup(payer, 100_000);
        let payment = world.pay(payer, merchant, 10_000);
        let command = world.refund_command(payment.id, Some(0), Principal::Operator);
        let record = Record {
            now: Timestamp(world.now + 1),
            idempotency: None,
            command,
        };
        let mut bytes = Vec::new();
        codec::encode(&record, &mut bytes);
        let copy = codec::decode(&bytes).expect("decodes");
        let live = world.state.apply(&record);
        assert_eq!(live, Outcome::Rejected(Rejection::RefundExceedsPayment));

        // Replay everything, the last record through the codec.
        let mut replayed = World::new();
        let (p, m) = (replayed.payer(), replayed.merchant());
        replayed.topup(p, 100_000);
        replayed.pay(p, m, 10_000);
        assert_eq!(replayed.state.apply(&copy), live);
        assert_eq!(replayed.balance(p), world.balance(payer));
    }
}
