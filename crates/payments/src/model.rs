//! The envelope of every change: commands, the journal's records, their outcomes and
//! rejections, and the items an import carries. The objects themselves live with their
//! capability (`parties`, `wallets`, `paying`, `statements`, `idempotency`) and are named here
//! again so that every part of the crate sees them in one place.

use farthing_ledger::{Account, Amount, Currency, Timestamp, TransferId, TransferRecord};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};

pub use crate::idempotency::{
    IDEMPOTENCY_KEY_BYTES_MAX, IdempotencyClaim, IdempotencyKey, IdempotencyRow,
};
pub use crate::kinds::{Kind, StoredRow};
pub use crate::parties::{
    FEE_BPS_MAX, FeeSchedule, KeyHash, Merchant, MerchantRow, Payer, PayerRow, Principal,
};
pub use crate::paying::{PayCommand, Payment, Refund};
pub use crate::rooms::holds::{
    EXPIRED_PER_COMMAND_MAX, HOLD_SECS_DEFAULT, HOLD_SECS_MAX, Hold, HoldCommand, HoldKind,
    HoldOutcome, HoldRejection, HoldRow, HoldStatus, Holds,
};
pub use crate::rooms::{Explained, RefusalKind, Room, RoomCommand, RoomOutcome, RoomRejection};
pub use crate::statements::{Entry, EntryObject, EntryRow};
pub use crate::wallets::{AccountRow, FundingSource, Owner, Topup};

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
    /// A command of a room ([`crate::rooms`]): holds, and each capability registered there.
    Room(RoomCommand),
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
    /// A ledger transfer record, failed ones included, so that its id stays used. A pending
    /// hold has no deadline of its own: the deadline of a payment's hold is its `Hold`'s.
    Transfer(TransferRecord),
    /// A payment with its refund totals; a captured hold's with the amount and fee of its
    /// capture (which its refunds were worked out on), its hold apart.
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
    /// A state row of a registered kind ([`crate::kinds`]): a payment's hold, after the
    /// payment and the transfers it names.
    Row(StoredRow),
}

impl Imported {
    /// A payment's hold as an import item.
    pub fn hold(row: HoldRow) -> Imported {
        Imported::Row(StoredRow::of::<HoldKind>(&row))
    }

    /// The hold this item brings, if it is one.
    pub fn as_hold(&self) -> Option<HoldRow> {
        match self {
            Imported::Row(row) => row.decode::<HoldKind>().and_then(Result::ok),
            _ => None,
        }
    }
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
    /// keeps (a payment's fee above its amount, a wallet below zero, a hold unlike its
    /// transfers).
    ImportDoesNotFit,
    /// A refusal of a room ([`crate::rooms`]).
    Room(RoomRejection),
}

impl Rejection {
    /// Whether an idempotency key keeps this outcome: a decline is an answer the caller must
    /// see again on retry; a request that was wrong from the start is not kept, so that a
    /// corrected retry goes through.
    pub fn is_kept_for_idempotency(self) -> bool {
        match self {
            Rejection::InsufficientFunds
            | Rejection::FundingDeclined
            | Rejection::MerchantBalanceInsufficient => true,
            Rejection::Room(rejection) => rejection.is_kept_for_idempotency(),
            _ => false,
        }
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
    /// What a room's command did ([`crate::rooms`]).
    Room(RoomOutcome),
}

impl Outcome {
    pub fn is_kept_for_idempotency(&self) -> bool {
        match self {
            Outcome::Rejected(rejection) => rejection.is_kept_for_idempotency(),
            Outcome::Room(outcome) => outcome.is_kept_for_idempotency(),
            Outcome::OperatorKeySet | Outcome::Pruned | Outcome::Imported { .. } => false,
            _ => true,
        }
    }
}
