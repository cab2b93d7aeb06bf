//! Holds: a payment authorized now and captured later (or canceled, or left to expire).
//!
//! Authorizing places a pending ledger transfer from the payer's wallet to the merchant's
//! account: the money leaves the wallet's available balance but moves nowhere yet. Capturing
//! posts all of it or a part (the rest goes back to the wallet at once) and takes the fee on
//! what was captured; canceling voids it; a hold not captured by its deadline is released by
//! [`Command::ExpireHolds`](crate::Command::ExpireHolds), a command of its own in the journal,
//! so that expiry happens at one point in the record on every backend. Expiry marks the
//! pending transfer expired with no transfer of its own (`Ledger::expire_pending`): it needs
//! no id, so no transfer that took the hold's settling id since can keep a hold from expiring.
//!
//! A hold is state kept beside its payment's row (which is history and never changes), by the
//! payment's id. Every hold still live is held in memory with its deadline, whatever the
//! store: expiry finds them without a search.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, Timestamp, TransferId};

use crate::ids::PaymentId;
use crate::kinds::{Kind, Rows};
use crate::paying::Payment;

/// The longest a hold may wait for capture: 30 days, as card networks allow at most.
pub const HOLD_SECS_MAX: u64 = 30 * 24 * 60 * 60;
/// How long a hold waits when the caller does not say: 7 days.
pub const HOLD_SECS_DEFAULT: u64 = 7 * 24 * 60 * 60;
/// Holds one [`Command::ExpireHolds`](crate::Command::ExpireHolds) releases at most (each
/// changes one ledger transfer and its two accounts); the rest wait for the next.
pub const EXPIRED_PER_COMMAND_MAX: u32 = 1_000;

/// Where a hold stands.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum HoldStatus {
    /// Authorized: the money is held, waiting for capture.
    Held,
    Captured,
    /// Canceled by the merchant or the operator.
    Canceled,
    /// Not captured before its deadline.
    Expired,
}

impl HoldStatus {
    pub fn code(self) -> u8 {
        match self {
            HoldStatus::Held => 1,
            HoldStatus::Captured => 2,
            HoldStatus::Canceled => 3,
            HoldStatus::Expired => 4,
        }
    }

    pub fn of_code(code: u8) -> Result<HoldStatus, DecodeError> {
        Ok(match code {
            1 => HoldStatus::Held,
            2 => HoldStatus::Captured,
            3 => HoldStatus::Canceled,
            4 => HoldStatus::Expired,
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }
}

/// A payment's hold: what was authorized, what was captured, and the ledger transfers that
/// hold and settle the money.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Hold {
    pub status: HoldStatus,
    pub amount_authorized: Amount,
    /// Zero until captured.
    pub amount_captured: Amount,
    /// The fee taken on capture, on the amount captured.
    pub fee_captured: Amount,
    /// Capture is refused from this moment on, and expiry releases the hold.
    pub expires_at: Timestamp,
    /// When it was captured, canceled or expired.
    pub resolved_at: Option<Timestamp>,
    /// The pending transfer that holds the money, the transfer that posts it (capture) or
    /// voids it (cancel), and the fee leg of a capture: chosen when the hold is placed, so that
    /// settling needs no new ids and a settlement can never be applied twice. (Expiry needs
    /// none.)
    pub transfers: [TransferId; 3],
}

impl Hold {
    pub fn is_live(&self) -> bool {
        self.status == HoldStatus::Held
    }

    /// `payment` (as its row has it) as it stands with this hold: once captured, its amount and
    /// fee are those of the capture.
    pub fn apply_to(&self, payment: &mut Payment) {
        if self.status == HoldStatus::Captured {
            payment.amount = self.amount_captured;
            payment.fee = self.fee_captured;
        }
        payment.hold = Some(*self);
    }

    /// The amount and time the statement line of `payment` (as its row has it) shows: a hold
    /// has a line once captured, made then, for what was captured.
    pub fn line_shows(&self, payment: &Payment) -> (Amount, Timestamp) {
        match (self.status, self.resolved_at) {
            (HoldStatus::Captured, Some(at)) => (self.amount_captured, at),
            _ => (payment.amount, payment.created_at),
        }
    }
}

/// A hold with its payment's id: how a hold is stored and imported.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HoldRow {
    pub payment: PaymentId,
    pub hold: Hold,
}

impl Fields for HoldRow {
    fn put(&self, out: &mut impl Put) {
        out.id("payment", self.payment.to_u128());
        self.hold.put(out);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(HoldRow {
            payment: PaymentId::from_u128(input.id("payment")?),
            hold: Hold::get(input)?,
        })
    }
}

impl Fields for Hold {
    fn put(&self, out: &mut impl Put) {
        out.code("status", self.status.code());
        out.int("amount_authorized", self.amount_authorized.micros());
        out.int("amount_captured", self.amount_captured.micros());
        out.int("fee_captured", self.fee_captured.micros());
        out.int("expires_at", self.expires_at.0);
        out.opt_int("resolved_at", self.resolved_at.map(|at| at.0));
        out.id("hold_transfer", self.transfers[0].0);
        out.id("settle_transfer", self.transfers[1].0);
        out.id("fee_transfer", self.transfers[2].0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(Hold {
            status: HoldStatus::of_code(input.code("status")?)?,
            amount_authorized: Amount::from_micros(input.int("amount_authorized")?),
            amount_captured: Amount::from_micros(input.int("amount_captured")?),
            fee_captured: Amount::from_micros(input.int("fee_captured")?),
            expires_at: Timestamp(input.int("expires_at")?),
            resolved_at: input.opt_int("resolved_at")?.map(Timestamp),
            transfers: [
                TransferId(input.id("hold_transfer")?),
                TransferId(input.id("settle_transfer")?),
                TransferId(input.id("fee_transfer")?),
            ],
        })
    }
}

/// Holds as a kind of state row: keyed by their payment, a live one pinned in memory by its
/// deadline.
pub struct HoldKind;

impl Kind for HoldKind {
    const TAG: u8 = b'h';
    const TABLE: &'static str = "holds";
    type Row = HoldRow;

    fn id(row: &HoldRow) -> u128 {
        row.payment.to_u128()
    }

    fn pin(row: &HoldRow) -> Option<u64> {
        row.hold.is_live().then_some(row.hold.expires_at.0)
    }
}

/// The holds a state holds, by payment, every live one among them.
impl Rows<HoldKind> {
    pub(crate) fn hold(&self, id: &PaymentId) -> Option<&Hold> {
        self.get(id.to_u128()).map(|row| &row.hold)
    }

    /// Puts a hold made or changed here.
    pub(crate) fn put_hold(&mut self, payment: PaymentId, hold: Hold) {
        self.put(HoldRow { payment, hold });
    }

    /// Live holds whose deadline is at or before `now`, oldest deadline first, at most
    /// `limit`.
    pub(crate) fn due(&self, now: Timestamp, limit: usize) -> Vec<PaymentId> {
        self.pinned_upto(now.0, limit)
            .into_iter()
            .map(PaymentId::from_u128)
            .collect()
    }

    /// The earliest deadline of a live hold held.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.first_pin().map(Timestamp)
    }
}
