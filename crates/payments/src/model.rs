//! The objects Farthing keeps, and the commands that change them.

use farthing_ledger::{
    Account, AccountKind, Amount, Currency, Timestamp, TransferId, TransferRecord,
};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::working_set::IdempotencyRow;

/// The SHA-256 digest of an API key. Keys themselves are never kept.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KeyHash(pub [u8; 32]);

/// Who is calling.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Principal {
    Operator,
    Merchant(MerchantId),
    Payer(PayerId),
}

/// Whose money a ledger account holds. Each owner has at most one account per currency, and
/// the account's id is derived from the two ([`crate::account_id`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Owner {
    /// The payer's prepaid wallet.
    Payer(PayerId),
    /// The merchant's earnings.
    Merchant(MerchantId),
    /// The platform's fee income.
    PlatformFees,
    /// Money outside the ledger: where top-ups come from.
    ExternalFunding,
}

impl Owner {
    /// The kind of account this owner holds.
    pub fn account_kind(self) -> AccountKind {
        match self {
            Owner::Payer(_) => AccountKind::PayerWallet,
            Owner::Merchant(_) => AccountKind::Merchant,
            Owner::PlatformFees => AccountKind::PlatformFees,
            Owner::ExternalFunding => AccountKind::ExternalFunding,
        }
    }
}

/// A merchant's fee schedule: `floor(amount × bps / 10000) + fixed`, capped at the amount.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FeeSchedule {
    pub bps: u32,
    pub fixed: Amount,
}

/// Basis points in a whole: a fee above 100% is refused.
pub const FEE_BPS_MAX: u32 = 10_000;

impl FeeSchedule {
    pub const ZERO: FeeSchedule = FeeSchedule {
        bps: 0,
        fixed: Amount::ZERO,
    };

    /// The fee on `amount`, never more than the amount itself.
    pub fn fee_on(&self, amount: Amount) -> Amount {
        let proportional = amount
            .mul_div_floor(u64::from(self.bps), u64::from(FEE_BPS_MAX))
            .expect("bps is at most 10000, so the fee fits");
        let fee = proportional.checked_add(self.fixed).unwrap_or(Amount::MAX);
        fee.min(amount)
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    pub fee: FeeSchedule,
    pub created_at: Timestamp,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payer {
    pub id: PayerId,
    pub name: String,
    pub created_at: Timestamp,
}

/// Where top-up money comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FundingSource {
    /// The built-in sandbox provider: always succeeds.
    Sandbox,
    /// The built-in sandbox provider, told to decline.
    SandboxDecline,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Topup {
    pub id: TopupId,
    pub payer: PayerId,
    pub amount: Amount,
    pub currency: Currency,
    pub source: FundingSource,
    pub created_at: Timestamp,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payment {
    pub id: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    pub fee: Amount,
    pub description: Option<String>,
    pub reference: Option<String>,
    pub created_at: Timestamp,
    /// What refunds have returned so far, and the part of it taken from the fee.
    pub amount_refunded: Amount,
    pub fee_refunded: Amount,
}

impl Payment {
    /// What the merchant receives: the amount less the fee (never negative: the fee is capped
    /// at the amount).
    pub fn net(&self) -> Amount {
        self.amount
            .checked_sub(self.fee)
            .expect("the fee never exceeds the amount")
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Refund {
    pub id: RefundId,
    pub payment: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    /// The part of the refund taken back from the platform's fee.
    pub fee_refunded: Amount,
    pub created_at: Timestamp,
}

/// One line of a payer's statement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    pub object: EntryObject,
    pub currency: Currency,
    /// `true` when money came into the wallet.
    pub credit: bool,
    pub amount: Amount,
    /// The wallet's posted balance in this currency after the entry.
    pub balance_after: Amount,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EntryObject {
    Topup(TopupId),
    Payment(PaymentId),
    Refund(RefundId),
}

/// A payment to make: the same shape for a single payment and each item of a batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PayCommand {
    pub id: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    pub description: Option<String>,
    pub reference: Option<String>,
    /// Ledger ids for the merchant leg and the fee leg.
    pub transfer_ids: [TransferId; 2],
}

/// Everything that changes state. Ids and time are chosen before a command is applied, so
/// applying the same commands again gives the same state.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    SetOperatorKey {
        key_hash: KeyHash,
    },
    CreateMerchant {
        id: MerchantId,
        name: String,
        key_hash: KeyHash,
        fee: FeeSchedule,
    },
    CreatePayer {
        id: PayerId,
        name: String,
        key_hash: KeyHash,
    },
    Topup {
        id: TopupId,
        payer: PayerId,
        amount: Amount,
        currency: Currency,
        source: FundingSource,
        transfer_id: TransferId,
    },
    Pay(PayCommand),
    PayBatch(Vec<PayCommand>),
    Refund {
        id: RefundId,
        payment: PaymentId,
        amount: Option<Amount>,
        caller: Principal,
        transfer_ids: [TransferId; 2],
    },
    /// Forgets idempotency keys made before `before`.
    PruneIdempotencyKeys {
        before: Timestamp,
    },
    /// Puts objects of another installation into this state as they are, with their own
    /// ids, times and totals: how an installation moves between storage backends
    /// (`farthing copy`). All of it goes in or, when an item does not fit, none of it.
    Import(Vec<Imported>),
}

/// One object of a state, as [`Command::Import`] carries it and
/// [`State::export`](crate::State::export) lists it.
///
/// An import lists parties before what names them, accounts before transfers, payments,
/// top-ups and refunds before the statement lines that show them; each payer's lines come in
/// statement order and payments in the order they were made (the operator's list).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Imported {
    /// The operator's key hash.
    OperatorKey(KeyHash),
    Merchant {
        merchant: Merchant,
        key_hash: KeyHash,
    },
    Payer {
        payer: Payer,
        key_hash: KeyHash,
    },
    /// A ledger account with its owner and totals.
    Account {
        owner: Owner,
        account: Account,
    },
    /// A ledger transfer record, failed ones included, so that its id stays used. Live holds
    /// are not imported: payments never place them.
    Transfer(TransferRecord),
    /// A payment with its refund totals.
    Payment(Payment),
    Topup(Topup),
    Refund(Refund),
    /// One line of a payer's statement.
    Entry {
        payer: PayerId,
        entry: Entry,
    },
    /// An idempotency key with its first answer.
    Idempotency(IdempotencyRow),
}

/// An idempotency key presented with a command.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct IdempotencyKey {
    pub principal: Principal,
    pub key: String,
}

/// The longest idempotency key accepted (Stripe's limit).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyClaim {
    pub key: IdempotencyKey,
    /// A digest of the request (method, path and body); the same key with another request
    /// is refused.
    pub fingerprint: [u8; 32],
}

/// One journal record: a command with the time it was applied and its idempotency key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record {
    pub now: Timestamp,
    pub idempotency: Option<IdempotencyClaim>,
    pub command: Command,
}

/// Why a command did not do what it asked, as a business outcome.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rejection {
    PayerNotFound,
    MerchantNotFound,
    PaymentNotFound,
    InsufficientFunds,
    FundingDeclined,
    RefundExceedsPayment,
    /// The merchant's balance no longer covers the refund.
    MerchantBalanceInsufficient,
    /// A total would exceed the largest amount the ledger keeps.
    AmountTooLarge,
    /// A top-up or payment of nothing.
    AmountNotPositive,
    IdempotencyKeyReused,
    /// An id chosen for the command is already taken.
    IdCollision,
    /// An imported item names an object the state does not hold, or breaks a rule the state
    /// keeps (a payment's fee above its amount, a wallet below zero, a live hold).
    ImportDoesNotFit,
}

impl Rejection {
    /// Whether an idempotency key keeps this outcome: a decline is an answer the caller must
    /// see again on retry; a request that was wrong from the start is not kept, so that a
    /// corrected retry goes through.
    pub fn is_kept_for_idempotency(self) -> bool {
        matches!(
            self,
            Rejection::InsufficientFunds
                | Rejection::FundingDeclined
                | Rejection::MerchantBalanceInsufficient
        )
    }
}

/// The outcome of one item of a batch payment.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BatchItemOutcome {
    Succeeded(PaymentId),
    Failed(Rejection),
}

/// What applying a command did. Successful outcomes carry a copy of the object as it was made,
/// which is what an idempotent retry answers with.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    OperatorKeySet,
    MerchantCreated(Merchant),
    PayerCreated(Payer),
    ToppedUp(Topup),
    Paid(Payment),
    PaidBatch(Vec<BatchItemOutcome>),
    Refunded(Refund),
    /// Idempotency keys made before the cut-off were forgotten. How many is not said: a store
    /// that keeps them in a database forgets them with one `DELETE`, without reading them.
    Pruned,
    /// An import put this many items into the state.
    Imported {
        count: usize,
    },
    Rejected(Rejection),
}

impl Outcome {
    pub fn is_kept_for_idempotency(&self) -> bool {
        match self {
            Outcome::Rejected(rejection) => rejection.is_kept_for_idempotency(),
            Outcome::OperatorKeySet | Outcome::Pruned | Outcome::Imported { .. } => false,
            _ => true,
        }
    }
}
