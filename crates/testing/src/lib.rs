//! Random histories of records, shared by the test suites that hold a store or a working set
//! to the in-memory state: proptest strategies draw raw choices, and a [`Builder`] resolves
//! them against the history so far when each step becomes a record (parties, top-ups,
//! payments and batches, refunds, idempotency keys retried and reused, prunes, and ids, key
//! hashes and transfer ids reused on purpose).
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
        prop::collection::vec(step(op_spec()), 1..50),
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
                let target = state
                    .payment(payment_id)
                    .expect("a whole state reads memory");
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
