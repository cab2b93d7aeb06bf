//! Random histories of records, shared by the test suites that hold a store or a working set
//! to the in-memory state: proptest strategies draw raw choices, and a [`Builder`] resolves
//! them against the history so far when each step becomes a record (parties, top-ups,
//! payments and batches, refunds, holds authorized, captured, canceled and expired,
//! idempotency keys retried and reused, prunes, and ids, key hashes and transfer ids reused on
//! purpose).
//!
//! Only test code depends on this crate.

mod temp_dir;
use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use proptest::prelude::*;
use proptest::sample::Index;
pub use temp_dir::TempDir;

/// Where histories start: some microsecond in 2023.
pub const EPOCH: u64 = 1_700_000_000_000_000;
pub const MICROS_PER_SEC: u64 = 1_000_000;
pub const CURRENCIES: [&str; 3] = ["USD", "EUR", "JPY"];

pub fn currency(code: &str) -> Currency {
    Currency::parse(code).expect("a known code")
}

/// A key hash told apart by `n` (its first 16 bytes, big-endian), for tests that make parties
/// by hand.
pub fn key_hash(n: u128) -> KeyHash {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(&n.to_be_bytes());
    KeyHash(bytes)
}

/// A record without an idempotency key, `at` microseconds after [`EPOCH`].
pub fn record_at(at: u64, command: Command) -> Record {
    Record {
        now: Timestamp(EPOCH + at),
        idempotency: None,
        command,
    }
}
/// A payer, a merchant and a funded wallet, then more holds than two expiries take (two
/// thousand and seven, of one micro-unit each), all at [`EPOCH`], their deadlines 10 to 106
/// seconds after it in an order of their own and many shared (the payment's id decides among
/// those): for the tests of expiry in batches. The records, and the held payments' ids.
pub fn many_holds() -> (Vec<Record>, Vec<PaymentId>) {
    let usd = currency("USD");
    let (payer, merchant) = (PayerId::from_u128(1), MerchantId::from_u128(2));
    let mut records = vec![
        record_at(
            0,
            Command::CreatePayer {
                id: payer,
                name: "p".into(),
                key_hash: KeyHash([1; 32]),
            },
        ),
        record_at(
            0,
            Command::CreateMerchant {
                id: merchant,
                name: "m".into(),
                key_hash: KeyHash([2; 32]),
                fee: FeeSchedule::ZERO,
            },
        ),
        record_at(
            0,
            Command::Topup {
                id: TopupId::from_u128(3),
                payer,
                amount: Amount::from_micros(1_000_000),
                currency: usd,
                source: FundingSource::Sandbox,
                transfer_id: TransferId(3),
            },
        ),
    ];
    let count = 2 * u128::from(EXPIRED_PER_COMMAND_MAX) + 7;
    let mut holds = Vec::new();
    for n in 0..count {
        let id = PaymentId::from_u128((n * 7_919) % count + 100);
        holds.push(id);
        records.push(record_at(
            MICROS_PER_SEC,
            Command::from(HoldCommand::Authorize {
                pay: PayCommand {
                    id,
                    payer,
                    merchant,
                    amount: Amount::from_micros(1),
                    currency: usd,
                    description: None,
                    reference: None,
                    transfer_ids: [TransferId(10_000 + 3 * n), TransferId(10_001 + 3 * n)],
                },
                expires_at: Timestamp(EPOCH + (10 + (n * 31) as u64 % 97) * MICROS_PER_SEC),
                settle_id: TransferId(10_002 + 3 * n),
            }),
        ));
    }
    (records, holds)
}

// =============================================================================================
// Generation: raw choices, resolved against the history when the step is built (trimmed from
// tests/state.rs, with key hashes and transfer ids reused too).
// =============================================================================================

#[derive(Clone, Debug)]
pub enum Pick {
    Known(Index),
    Unknown,
}

#[derive(Clone, Debug)]
pub struct PaySpec {
    payer: Pick,
    merchant: Pick,
    amount: u64,
    currency: usize,
    /// Reuse the id of an earlier payment.
    reuse: Option<Index>,
}

#[derive(Clone, Copy, Debug)]
pub enum RefundAmount {
    Rest,
    Zero,
    /// This many 256ths of what is left, at least one micro.
    Part(u8),
    Over,
}

/// Which payment a capture, a cancel or a refund names.
#[derive(Clone, Debug)]
pub enum PaymentPick {
    /// Any payment the history made (or tried to make).
    Any(Index),
    /// A hold placed so far: held, captured, canceled or expired.
    Held(Index),
    /// The newest hold still held (else the newest placed): the one a capture most likely
    /// finds in time.
    NewestHeld,
    /// An id no one made.
    Unknown,
}

/// How much of a hold a capture takes.
#[derive(Clone, Copy, Debug)]
pub enum CaptureAmount {
    /// No amount: all of it.
    All,
    /// All of it, named.
    Exact,
    Zero,
    /// This many 256ths of what was authorized, at least one micro.
    Part(u8),
    /// One micro more than was authorized.
    Over,
}

#[derive(Clone, Debug)]
pub enum Caller {
    Operator,
    ItsMerchant,
    AnotherMerchant(Index),
    ItsPayer,
}

#[derive(Clone, Debug)]
pub enum OpSpec {
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
        payment: PaymentPick,
        amount: RefundAmount,
        caller: Caller,
        reuse: Option<Index>,
    },
    /// A payment authorized for capture later, with its deadline this many seconds after the
    /// record's time (before it, when negative).
    Authorize {
        pay: PaySpec,
        deadline_secs: i64,
        /// Reuse an earlier transfer id for the settling transfer.
        reuse_settle: Option<Index>,
    },
    Capture {
        payment: PaymentPick,
        amount: CaptureAmount,
        caller: Caller,
    },
    Cancel {
        payment: PaymentPick,
        caller: Caller,
    },
    /// Expiry of the holds due this many seconds before the record's time.
    ExpireHolds {
        back_secs: u64,
    },
    Prune {
        age_secs: u64,
    },
}

#[derive(Clone, Debug)]
pub enum ClaimSpec {
    None,
    Fresh,
    /// The same key and request as an earlier claimed step, with fresh ids.
    Retry(Index),
    /// The key of an earlier claimed step with another request.
    Conflict(Index),
}

#[derive(Clone, Debug)]
pub struct StepSpec {
    advance_secs: u64,
    op: OpSpec,
    claim: ClaimSpec,
    /// Reuse the transfer ids of an earlier step.
    reuse_transfers: Option<Index>,
}

pub fn pick() -> impl Strategy<Value = Pick> {
    prop_oneof![15 => any::<Index>().prop_map(Pick::Known), 1 => Just(Pick::Unknown)]
}

pub fn currency_index() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 2 => Just(1), 1 => Just(2)]
}

pub fn maybe_reuse() -> impl Strategy<Value = Option<Index>> {
    prop_oneof![19 => Just(None), 1 => any::<Index>().prop_map(Some)]
}

/// The payment a refund names: mostly any payment, as before holds; sometimes a hold (held,
/// captured, canceled or expired).
pub fn payment_pick() -> impl Strategy<Value = PaymentPick> {
    prop_oneof![
        14 => any::<Index>().prop_map(PaymentPick::Any),
        3 => any::<Index>().prop_map(PaymentPick::Held),
        2 => Just(PaymentPick::NewestHeld),
        1 => Just(PaymentPick::Unknown),
    ]
}

pub fn caller() -> impl Strategy<Value = Caller> {
    prop_oneof![
        2 => Just(Caller::Operator),
        4 => Just(Caller::ItsMerchant),
        1 => any::<Index>().prop_map(Caller::AnotherMerchant),
        1 => Just(Caller::ItsPayer),
    ]
}

/// A hold's deadline after the record's time, in seconds: minutes or hours ahead, so that
/// captures soon after come in time and the steps' hours pass many deadlines before the
/// history ends; sometimes already past, or exactly now.
pub fn deadline_secs() -> impl Strategy<Value = i64> {
    prop_oneof![
        2 => -600..0i64,
        1 => Just(0i64),
        4 => 1..600i64,
        3 => 600..(4 * 3_600i64),
        3 => (4 * 3_600i64)..(24 * 3_600i64),
    ]
}

pub fn hold_op() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        6 => (pay_spec(), deadline_secs(), maybe_reuse()).prop_map(
            |(pay, deadline_secs, reuse_settle)| OpSpec::Authorize {
                pay,
                deadline_secs,
                reuse_settle,
            }
        ),
        8 => (
            prop_oneof![
                2 => any::<Index>().prop_map(PaymentPick::Held),
                4 => Just(PaymentPick::NewestHeld),
                1 => any::<Index>().prop_map(PaymentPick::Any),
                1 => Just(PaymentPick::Unknown),
            ],
            prop_oneof![
                4 => Just(CaptureAmount::All),
                1 => Just(CaptureAmount::Exact),
                1 => Just(CaptureAmount::Zero),
                4 => any::<u8>().prop_map(CaptureAmount::Part),
                1 => Just(CaptureAmount::Over),
            ],
            caller(),
        )
            .prop_map(|(payment, amount, caller)| OpSpec::Capture {
                payment,
                amount,
                caller,
            }),
        2 => (
            prop_oneof![
                2 => any::<Index>().prop_map(PaymentPick::Held),
                2 => Just(PaymentPick::NewestHeld),
                1 => any::<Index>().prop_map(PaymentPick::Any),
                1 => Just(PaymentPick::Unknown),
            ],
            caller(),
        )
            .prop_map(|(payment, caller)| OpSpec::Cancel { payment, caller }),
        2 => prop_oneof![4 => Just(0u64), 2 => 0..600u64, 1 => 0..(24 * 3_600u64)]
            .prop_map(|back_secs| OpSpec::ExpireHolds { back_secs }),
    ]
}

pub fn pay_spec() -> impl Strategy<Value = PaySpec> {
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

pub fn fee_schedule() -> impl Strategy<Value = FeeSchedule> {
    (
        prop_oneof![Just(0u32), Just(290), Just(FEE_BPS_MAX), 0..=FEE_BPS_MAX],
        prop_oneof![Just(0u64), 1..=1_000u64, Just(u64::MAX)],
    )
        .prop_map(|(bps, fixed)| FeeSchedule {
            bps,
            fixed: Amount::from_micros(fixed),
        })
}

pub fn op_spec() -> impl Strategy<Value = OpSpec> {
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
            payment_pick(),
            prop_oneof![
                3 => Just(RefundAmount::Rest),
                1 => Just(RefundAmount::Zero),
                4 => any::<u8>().prop_map(RefundAmount::Part),
                1 => Just(RefundAmount::Over),
            ],
            caller(),
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
        // Holds: authorized, captured, canceled, expired (about a third of the operations;
        // the others keep their shares among themselves, and histories are longer).
        18 => hold_op(),
    ]
}

/// Parties and money first, so that most of the history has someone to pay.
pub fn setup_op() -> impl Strategy<Value = OpSpec> {
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

pub fn step(op: impl Strategy<Value = OpSpec>) -> impl Strategy<Value = StepSpec> {
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

pub fn history() -> impl Strategy<Value = Vec<StepSpec>> {
    (
        prop::collection::vec(step(setup_op()), 2..10),
        prop::collection::vec(step(op_spec()), 1..75),
    )
        .prop_map(|(mut steps, rest)| {
            steps.extend(rest);
            steps
        })
}

/// Builds records from step specs, resolving picks against what the history has made so far
/// (read from the whole state).
pub struct Builder {
    pub now: u64,
    pub next_id: u128,
    pub payer_ids: Vec<PayerId>,
    pub merchant_ids: Vec<MerchantId>,
    pub payment_ids: Vec<PaymentId>,
    /// The payments authorized for capture later (or tried to be), oldest first.
    pub hold_ids: Vec<PaymentId>,
    pub topup_ids: Vec<TopupId>,
    pub refund_ids: Vec<RefundId>,
    pub key_hashes: Vec<KeyHash>,
    pub transfer_ids: Vec<[TransferId; 2]>,
    pub claimed: Vec<(IdempotencyClaim, Command)>,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder::new()
    }
}

impl Builder {
    pub fn new() -> Builder {
        Builder {
            now: EPOCH,
            next_id: 1,
            payer_ids: Vec::new(),
            merchant_ids: Vec::new(),
            payment_ids: Vec::new(),
            hold_ids: Vec::new(),
            topup_ids: Vec::new(),
            refund_ids: Vec::new(),
            key_hashes: Vec::new(),
            transfer_ids: Vec::new(),
            claimed: Vec::new(),
        }
    }

    /// A new id, never zero, in no particular order: ids made one after another do not sort
    /// in the order they were made, so a list that falls back to id order shows it.
    fn fresh(&mut self) -> u128 {
        self.next_id += 1;
        // Multiplying by an odd number is a bijection of u128, so ids stay distinct.
        self.next_id
            .wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
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

    /// As [`Builder::pay`], but a known payer and merchant are picked among those that
    /// exist, the payer among those with money, and the currency among the payer's when it
    /// has none in the one drawn: most such payments can be made (holds are settled only
    /// once placed, so enough must be placed).
    fn funded_pay(
        &mut self,
        spec: &PaySpec,
        reuse_transfers: &Option<Index>,
        state: &State,
    ) -> PayCommand {
        let mut pay = self.pay(spec, reuse_transfers);
        let funded: Vec<(PayerId, Vec<Currency>)> = self
            .payer_ids
            .iter()
            .filter_map(|id| {
                let balances = state
                    .payer_balances(*id)
                    .expect("a whole state reads memory")?;
                let currencies: Vec<Currency> = balances
                    .into_iter()
                    .filter(|(_, balance)| *balance > 0)
                    .map(|(currency, _)| currency)
                    .collect();
                (!currencies.is_empty()).then_some((*id, currencies))
            })
            .collect();
        let merchants: Vec<MerchantId> = self
            .merchant_ids
            .iter()
            .copied()
            .filter(|id| state.merchant(*id).is_some())
            .collect();
        if let Pick::Known(index) = &spec.payer
            && !funded.is_empty()
        {
            let (payer, currencies) = &funded[index.index(funded.len())];
            pay.payer = *payer;
            if !currencies.contains(&pay.currency) {
                pay.currency = currencies[index.index(currencies.len())];
            }
        }
        if let Pick::Known(index) = &spec.merchant
            && !merchants.is_empty()
        {
            pay.merchant = merchants[index.index(merchants.len())];
        }
        pay
    }

    /// The payment `pick` names, and how it stands in `state` (`None`: there is none).
    fn payment(&mut self, pick: &PaymentPick, state: &State) -> (PaymentId, Option<Payment>) {
        let payments = self.payment_ids.clone();
        // The holds placed so far, oldest first (an authorization may have been refused).
        let holds: Vec<Payment> = self
            .hold_ids
            .iter()
            .filter_map(|id| state.payment(*id).expect("a whole state reads memory"))
            .filter(|payment| payment.hold.is_some())
            .collect();
        let id = match pick {
            PaymentPick::Any(index) => {
                self.known(&Pick::Known(*index), &payments, PaymentId::from_u128)
            }
            PaymentPick::Held(index) if !holds.is_empty() => holds[index.index(holds.len())].id,
            PaymentPick::NewestHeld if !holds.is_empty() => {
                holds
                    .iter()
                    .rev()
                    .find(|payment| payment.hold.as_deref().is_some_and(Hold::is_live))
                    .unwrap_or(&holds[holds.len() - 1])
                    .id
            }
            PaymentPick::Held(_) | PaymentPick::NewestHeld | PaymentPick::Unknown => {
                PaymentId::from_u128(self.fresh())
            }
        };
        let payment = state.payment(id).expect("a whole state reads memory");
        (id, payment)
    }

    /// Who `caller` is for `target`.
    fn caller(&mut self, caller: &Caller, target: Option<&Payment>) -> Principal {
        let merchants = self.merchant_ids.clone();
        match (caller, target) {
            (Caller::Operator, _) => Principal::Operator,
            (Caller::ItsMerchant, Some(p)) => Principal::Merchant(p.merchant),
            (Caller::ItsPayer, Some(p)) => Principal::Payer(p.payer),
            (Caller::AnotherMerchant(index), _) if !merchants.is_empty() => {
                Principal::Merchant(merchants[index.index(merchants.len())])
            }
            _ => Principal::Merchant(MerchantId::from_u128(self.fresh())),
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
                let (payment_id, target) = self.payment(payment, state);
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
                let caller = self.caller(caller, target.as_ref());
                Command::Refund {
                    id,
                    payment: payment_id,
                    amount,
                    caller,
                    transfer_ids: self.transfer_ids(reuse_transfers),
                }
            }
            OpSpec::Authorize {
                pay,
                deadline_secs,
                reuse_settle,
            } => {
                let pay = self.funded_pay(pay, reuse_transfers, state);
                self.hold_ids.push(pay.id);
                let deadline = if *deadline_secs < 0 {
                    self.now
                        .saturating_sub(deadline_secs.unsigned_abs() * MICROS_PER_SEC)
                } else {
                    self.now + deadline_secs.unsigned_abs() * MICROS_PER_SEC
                };
                // Mostly a fresh id; sometimes one an earlier step chose (taken, or held for
                // another hold's settlement).
                let used: Vec<TransferId> = self.transfer_ids.iter().flatten().copied().collect();
                let settle_id = match reuse_settle {
                    Some(index) if !used.is_empty() => used[index.index(used.len())],
                    _ => TransferId(self.fresh()),
                };
                // A later step that reuses transfer ids may take this hold's.
                self.transfer_ids.push([settle_id, pay.transfer_ids[1]]);
                Command::from(HoldCommand::Authorize {
                    pay,
                    expires_at: Timestamp(deadline),
                    settle_id,
                })
            }
            OpSpec::Capture {
                payment,
                amount,
                caller,
            } => {
                let (payment_id, target) = self.payment(payment, state);
                let authorized = target
                    .as_ref()
                    .and_then(|p| p.hold.as_deref().copied())
                    .map_or(1_000, |hold| hold.amount_authorized.micros());
                let amount = match amount {
                    CaptureAmount::All => None,
                    CaptureAmount::Exact => Some(Amount::from_micros(authorized)),
                    CaptureAmount::Zero => Some(Amount::ZERO),
                    CaptureAmount::Part(share) => Some(Amount::from_micros(
                        u64::try_from(u128::from(authorized) * u128::from(*share) / 256)
                            .expect("at most the amount authorized")
                            .max(1),
                    )),
                    CaptureAmount::Over => Some(Amount::from_micros(authorized.saturating_add(1))),
                };
                Command::from(HoldCommand::Capture {
                    payment: payment_id,
                    amount,
                    caller: self.caller(caller, target.as_ref()),
                })
            }
            OpSpec::Cancel { payment, caller } => {
                let (payment_id, target) = self.payment(payment, state);
                Command::from(HoldCommand::Cancel {
                    payment: payment_id,
                    caller: self.caller(caller, target.as_ref()),
                })
            }
            OpSpec::ExpireHolds { back_secs } => Command::from(HoldCommand::Expire {
                at: Timestamp(self.now.saturating_sub(back_secs * MICROS_PER_SEC)),
            }),
            OpSpec::Prune { age_secs } => Command::PruneIdempotencyKeys {
                before: Timestamp(self.now.saturating_sub(age_secs * MICROS_PER_SEC)),
            },
        }
    }

    pub fn record(&mut self, step: &StepSpec, state: &State) -> Record {
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
// The test database

/// The URL of the PostgreSQL server that tests make their databases on
/// (`FARTHING_TEST_DATABASE_URL`), or `None` after saying, past the test harness's capture,
/// that `test` was skipped.
///
/// Under `CI=true` a test that needs PostgreSQL never skips: a missing URL fails it, so a
/// green CI run means every PostgreSQL test ran.
pub fn test_database_url(test: &str) -> Option<String> {
    let url = std::env::var("FARTHING_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty());
    if url.is_none() {
        if running_in_ci() {
            panic!(
                "{test}: FARTHING_TEST_DATABASE_URL is not set; under CI=true a test that \
                 needs PostgreSQL fails instead of skipping"
            );
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "{test}: skipped, FARTHING_TEST_DATABASE_URL is not set"
        );
    }
    url
}

/// Whether the tests run under continuous integration (`CI=true`), where nothing may skip.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value.eq_ignore_ascii_case("true") || value == "1")
}
