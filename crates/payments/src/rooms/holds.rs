//! Holds: a payment authorized now and captured later (or canceled, or left to expire).
//!
//! Authorizing places a pending ledger transfer from the payer's wallet to the merchant's
//! account: the money leaves the wallet's available balance but moves nowhere yet. Capturing
//! posts all of it or a part (the rest goes back to the wallet at once) and takes the fee on
//! what was captured; canceling voids it; a hold not captured by its deadline is released by
//! [`HoldCommand::Expire`], a command of its own in the journal,
//! so that expiry happens at one point in the record on every backend. Expiry marks the
//! pending transfer expired with no transfer of its own (`Ledger::expire_pending`): it needs
//! no id, so no transfer that took the hold's settling id since can keep a hold from expiring.
//!
//! A hold is state kept beside its payment's row (which is history and never changes), by the
//! payment's id. Every hold still live is held in memory with its deadline, whatever the
//! store: expiry finds them without a search.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, Timestamp, Transfer, TransferId, TransferKind};

use crate::codec::{Reader, Writer};
use crate::ids::PaymentId;
use crate::kinds::{Kind, Rows};
use crate::model::{EntryObject, Owner, PayCommand, Principal, Rejection};
use crate::paying::Payment;
use crate::rooms::{Explained, RefusalKind, Room};
use crate::state::{State, chain_failure, ledger_rejection};
use crate::working_set::Needs;

/// The longest a hold may wait for capture: 30 days, as card networks allow at most.
pub const HOLD_SECS_MAX: u64 = 30 * 24 * 60 * 60;
/// How long a hold waits when the caller does not say: 7 days.
pub const HOLD_SECS_DEFAULT: u64 = 7 * 24 * 60 * 60;
/// Holds one [`HoldCommand::Expire`] releases at most (each
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
        payment.hold = Some(Box::new(*self));
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

/// The holds room: placing, capturing, canceling and expiring holds.
pub struct Holds;

/// What changes holds.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum HoldCommand {
    /// Places a hold: `pay` authorized, its money held until it is captured, canceled or
    /// expires at `expires_at`. `pay.transfer_ids` are the hold's pending transfer and the fee
    /// leg of its capture; `settle_id` posts it (capture) or voids it (cancel).
    Authorize {
        pay: PayCommand,
        expires_at: Timestamp,
        settle_id: TransferId,
    },
    /// Captures a held payment: all of it, or `amount` of it (the rest goes back to the
    /// wallet).
    Capture {
        payment: PaymentId,
        amount: Option<Amount>,
        caller: Principal,
    },
    /// Cancels a held payment: the money goes back to the wallet.
    Cancel {
        payment: PaymentId,
        caller: Principal,
    },
    /// Releases the live holds whose deadline is at or before `at` (no later than the
    /// record's time), oldest deadline first, at most [`EXPIRED_PER_COMMAND_MAX`]: each
    /// pending transfer is marked expired, with no transfer of its own.
    Expire { at: Timestamp },
}

/// What a hold command did.
// As large as `Outcome::Paid`, which it travels beside: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum HoldOutcome {
    /// A hold placed, captured or canceled: the payment as it stands, its hold included.
    Changed(Payment),
    /// Holds whose deadline had come were released.
    Expired { count: usize },
}

/// Why a hold command was refused, beyond the refusals every payment shares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HoldRejection {
    /// Capture or cancel of a payment that is not held: a plain payment, or a hold already
    /// captured, canceled or expired.
    PaymentNotHeld,
    /// Capture of a hold whose deadline has passed.
    HoldExpired,
    /// Capture of more than was authorized.
    CaptureExceedsAuthorization,
    /// Refund of a payment whose money never moved (held, canceled or expired).
    PaymentNotCaptured,
}

impl Room for Holds {
    type Command = HoldCommand;
    type Outcome = HoldOutcome;
    type Rejection = HoldRejection;
    /// How many expiries came before in the batch.
    type Batch = usize;

    const COMMAND_TAGS: &'static [u8] = &[10, 11, 12, 13];
    const OUTCOME_TAGS: &'static [u8] = &[11, 12];
    const REJECTION_TAGS: &'static [u8] = &[13, 14, 15, 16];

    fn encode(command: &HoldCommand, w: &mut Writer) {
        match command {
            HoldCommand::Authorize {
                pay,
                expires_at,
                settle_id,
            } => {
                w.u8(10);
                w.pay(pay);
                w.u64(expires_at.0);
                w.u128(settle_id.0);
            }
            HoldCommand::Capture {
                payment,
                amount,
                caller,
            } => {
                w.u8(11);
                w.u128(payment.to_u128());
                w.opt_amount(*amount);
                w.principal(*caller);
            }
            HoldCommand::Cancel { payment, caller } => {
                w.u8(12);
                w.u128(payment.to_u128());
                w.principal(*caller);
            }
            HoldCommand::Expire { at } => {
                w.u8(13);
                w.u64(at.0);
            }
        }
    }

    fn decode(tag: u8, r: &mut Reader) -> Result<HoldCommand, DecodeError> {
        Ok(match tag {
            10 => HoldCommand::Authorize {
                pay: r.pay()?,
                expires_at: Timestamp(r.u64()?),
                settle_id: TransferId(r.u128()?),
            },
            11 => HoldCommand::Capture {
                payment: PaymentId::from_u128(r.u128()?),
                amount: r.opt_amount()?,
                caller: r.principal()?,
            },
            12 => HoldCommand::Cancel {
                payment: PaymentId::from_u128(r.u128()?),
                caller: r.principal()?,
            },
            13 => HoldCommand::Expire {
                at: Timestamp(r.u64()?),
            },
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }

    fn encode_outcome(outcome: &HoldOutcome, w: &mut Writer) {
        match outcome {
            HoldOutcome::Changed(payment) => {
                w.u8(11);
                w.paid(payment);
                let hold = payment.hold.as_deref().expect("a held payment carries its hold");
                hold.put(&mut w.bin());
            }
            HoldOutcome::Expired { count } => {
                w.u8(12);
                w.u64(u64::try_from(*count).expect("a usize fits in 64 bits"));
            }
        }
    }

    fn decode_outcome(tag: u8, r: &mut Reader) -> Result<HoldOutcome, DecodeError> {
        Ok(match tag {
            11 => {
                let mut payment = r.paid()?;
                payment.hold = Some(Box::new(r.with(Hold::get)?));
                HoldOutcome::Changed(payment)
            }
            12 => HoldOutcome::Expired {
                count: usize::try_from(r.u64()?).map_err(|_| DecodeError::OutOfRange)?,
            },
            other => return Err(DecodeError::UnknownTag(other)),
        })
    }

    fn rejection_tag(rejection: HoldRejection) -> u8 {
        match rejection {
            HoldRejection::PaymentNotHeld => 13,
            HoldRejection::HoldExpired => 14,
            HoldRejection::CaptureExceedsAuthorization => 15,
            HoldRejection::PaymentNotCaptured => 16,
        }
    }

    fn rejection_of_tag(tag: u8) -> Option<HoldRejection> {
        Some(match tag {
            13 => HoldRejection::PaymentNotHeld,
            14 => HoldRejection::HoldExpired,
            15 => HoldRejection::CaptureExceedsAuthorization,
            16 => HoldRejection::PaymentNotCaptured,
            _ => return None,
        })
    }

    fn needs(state: &State, command: &HoldCommand, expiries: &mut usize, needs: &mut Needs) {
        match command {
            HoldCommand::Authorize { pay, settle_id, .. } => {
                needs.add_pay(pay);
                needs.transfers.push(*settle_id);
            }
            HoldCommand::Capture { payment, .. } | HoldCommand::Cancel { payment, .. } => {
                settling_needs(state, *payment, needs);
            }
            HoldCommand::Expire { at } => {
                // Those before it release at most as many, all among the first due by `at`
                // (or due later than that); it releases at most as many of the rest.
                *expiries += 1;
                let limit = EXPIRED_PER_COMMAND_MAX as usize * *expiries;
                // A working set learns which holds are due from its store; a whole state or a
                // cache holds every live one.
                needs.holds_due = Some(match needs.holds_due {
                    Some((by, most)) => (by.max(*at), most.max(limit)),
                    None => (*at, limit),
                });
                needs.incomplete = true;
                for id in state.holds().due(*at, limit) {
                    settling_needs(state, id, needs);
                }
            }
        }
    }

    fn execute(
        state: &mut State,
        now: Timestamp,
        command: &HoldCommand,
    ) -> Result<HoldOutcome, Rejection> {
        match command {
            HoldCommand::Authorize {
                pay,
                expires_at,
                settle_id,
            } => authorize(state, now, pay, *expires_at, *settle_id).map(HoldOutcome::Changed),
            HoldCommand::Capture {
                payment,
                amount,
                caller,
            } => settle(state, now, *payment, *caller, Settle::Capture(*amount))
                .map(HoldOutcome::Changed),
            HoldCommand::Cancel { payment, caller } => {
                settle(state, now, *payment, *caller, Settle::Cancel).map(HoldOutcome::Changed)
            }
            HoldCommand::Expire { at } => {
                let due = state
                    .holds()
                    .due((*at).min(now), EXPIRED_PER_COMMAND_MAX as usize);
                for id in &due {
                    settle(state, now, *id, Principal::Operator, Settle::Expire)
                        .expect("a due hold expires");
                }
                Ok(HoldOutcome::Expired { count: due.len() })
            }
        }
    }

    fn ids_max(command: &HoldCommand) -> u128 {
        match command {
            HoldCommand::Authorize { pay, settle_id, .. } => pay.ids_max().max(settle_id.0),
            HoldCommand::Capture { .. } | HoldCommand::Cancel { .. } | HoldCommand::Expire { .. } => {
                0
            }
        }
    }

    fn settles_pending(command: &HoldCommand) -> bool {
        match command {
            HoldCommand::Authorize { .. } => false,
            HoldCommand::Capture { .. } | HoldCommand::Cancel { .. } | HoldCommand::Expire { .. } => {
                true
            }
        }
    }

    fn keeps_outcome(outcome: &HoldOutcome) -> bool {
        match outcome {
            HoldOutcome::Changed(_) => true,
            HoldOutcome::Expired { .. } => false,
        }
    }

    fn keeps_rejection(rejection: HoldRejection) -> bool {
        match rejection {
            HoldRejection::PaymentNotHeld
            | HoldRejection::HoldExpired
            | HoldRejection::CaptureExceedsAuthorization
            | HoldRejection::PaymentNotCaptured => false,
        }
    }

    fn refused(state: &State, command: &HoldCommand) -> Option<Rejection> {
        match command {
            HoldCommand::Authorize { pay, .. } => state.pay_refusal(pay),
            HoldCommand::Capture { .. } | HoldCommand::Cancel { .. } | HoldCommand::Expire { .. } => {
                None
            }
        }
    }

    fn explain(rejection: HoldRejection) -> Explained {
        match rejection {
            HoldRejection::PaymentNotHeld => Explained {
                kind: RefusalKind::Conflict,
                code: "payment_not_held",
                title: "Payment not held",
                detail: "the payment is not waiting for capture: it was paid at once, or its \
                         hold was already captured, canceled or expired",
            },
            HoldRejection::HoldExpired => Explained {
                kind: RefusalKind::Conflict,
                code: "hold_expired",
                title: "Hold expired",
                detail: "the hold's deadline for capture has passed; the money goes back to \
                         the payer",
            },
            HoldRejection::CaptureExceedsAuthorization => Explained {
                kind: RefusalKind::Unprocessable,
                code: "capture_exceeds_authorization",
                title: "Capture exceeds authorization",
                detail: "the amount to capture is larger than the amount authorized",
            },
            HoldRejection::PaymentNotCaptured => Explained {
                kind: RefusalKind::Conflict,
                code: "payment_not_captured",
                title: "Payment not captured",
                detail: "no money moved for this payment: it is held, or was canceled or expired",
            },
        }
    }
}

/// What settling `payment`'s hold reads: the payment, then (once it is held) its parties,
/// its three accounts and its hold's transfers.
fn settling_needs(state: &State, payment: PaymentId, needs: &mut Needs) {
    needs.add_payment_existing(payment);
    match state.payment_held(payment) {
        Some(payment) => {
            needs.payers.push(payment.payer);
            needs.merchants.push(payment.merchant);
            needs.add_payment_accounts(payment.payer, payment.merchant, payment.currency);
            if let Some(hold) = payment.hold {
                let [hold_id, settle_id, fee_id] = hold.transfers;
                needs.held_transfers.push(hold_id);
                needs.transfers.extend([settle_id, fee_id]);
            }
        }
        None => needs.incomplete = true,
    }
}

/// Places a hold: the payment's money leaves the wallet's available balance and waits,
/// pending, for capture. The payment has no statement line until it is captured.
fn authorize(
    state: &mut State,
    now: Timestamp,
    pay: &PayCommand,
    expires_at: Timestamp,
    settle_id: TransferId,
) -> Result<Payment, Rejection> {
    let (fee_schedule, wallet) = state.new_payment_checked(pay)?;
    let [hold_id, fee_id] = pay.transfer_ids;
    let ids = [hold_id, settle_id, fee_id];
    if state.transfer_ids_taken(&ids) || ids.iter().any(|id| id.0 == 0) || {
        let mut sorted = ids;
        sorted.sort_unstable();
        sorted[0] == sorted[1] || sorted[1] == sorted[2]
    } {
        return Err(Rejection::IdCollision);
    }
    if state.certainly_short(wallet, pay) {
        return Err(Rejection::InsufficientFunds);
    }
    let merchant_account = state.account_for(Owner::Merchant(pay.merchant), pay.currency)?;
    let hold = Transfer {
        id: hold_id,
        debit: wallet,
        credit: merchant_account,
        amount: pay.amount,
        kind: TransferKind::Pending { timeout_secs: 0 },
        linked: false,
    };
    if let Err(rejection) = state.transfer(now, &[hold])[0] {
        return Err(ledger_rejection(rejection));
    }
    state.touched(&[wallet, merchant_account]);
    let payment = pay.made(now, fee_schedule.fee_on(pay.amount));
    state.holds_mut().put_hold(
        pay.id,
        Hold {
            status: HoldStatus::Held,
            amount_authorized: pay.amount,
            amount_captured: Amount::ZERO,
            fee_captured: Amount::ZERO,
            expires_at,
            resolved_at: None,
            transfers: ids,
        },
    );
    state.add_payment(payment, None);
    Ok(state.payment_held(pay.id).expect("just added"))
}

/// How a hold is settled.
#[derive(Clone, Copy)]
enum Settle {
    Capture(Option<Amount>),
    Cancel,
    Expire,
}

/// Captures, cancels or expires a held payment. `caller` must see the payment and be its
/// merchant or the operator.
fn settle(
    state: &mut State,
    now: Timestamp,
    id: PaymentId,
    caller: Principal,
    settle: Settle,
) -> Result<Payment, Rejection> {
    let payment = state.payment_settled_by(id, caller)?;
    let Some(mut hold) = payment.hold.as_deref().copied().filter(Hold::is_live) else {
        return Err(HoldRejection::PaymentNotHeld.into());
    };
    let [hold_id, settle_id, fee_id] = hold.transfers;
    let wallet = state.account_for(Owner::Payer(payment.payer), payment.currency)?;
    let merchant_account = state.account_for(Owner::Merchant(payment.merchant), payment.currency)?;
    match settle {
        Settle::Capture(requested) => {
            if now >= hold.expires_at {
                return Err(HoldRejection::HoldExpired.into());
            }
            let amount = requested.unwrap_or(hold.amount_authorized);
            if amount.is_zero() {
                return Err(Rejection::AmountNotPositive);
            }
            if amount > hold.amount_authorized {
                return Err(HoldRejection::CaptureExceedsAuthorization.into());
            }
            let fee = match state.merchant_fee(payment.merchant) {
                Some(schedule) => schedule.fee_on(amount),
                None => return Err(Rejection::MerchantNotFound),
            };
            // Ids another transfer took since the hold was placed are refused before anything
            // moves, so a refused capture records nothing (and burns no id).
            let used: &[TransferId] = if fee.is_zero() {
                &[settle_id]
            } else {
                &[settle_id, fee_id]
            };
            if state.transfer_ids_taken(used) {
                return Err(Rejection::IdCollision);
            }
            let fees_account = state.account_for(Owner::PlatformFees, payment.currency)?;
            let mut legs = vec![Transfer {
                id: settle_id,
                debit: wallet,
                credit: merchant_account,
                amount,
                kind: TransferKind::PostPending {
                    pending_id: hold_id,
                },
                linked: !fee.is_zero(),
            }];
            if !fee.is_zero() {
                legs.push(Transfer {
                    id: fee_id,
                    debit: merchant_account,
                    credit: fees_account,
                    amount: fee,
                    kind: TransferKind::Posted,
                    linked: false,
                });
            }
            if let Some(rejection) = chain_failure(&state.transfer(now, &legs)) {
                return Err(ledger_rejection(rejection));
            }
            state.touched(&[wallet, merchant_account, fees_account]);
            hold.status = HoldStatus::Captured;
            hold.amount_captured = amount;
            hold.fee_captured = fee;
            hold.resolved_at = Some(now);
            state.holds_mut().put_hold(id, hold);
            let balance_after = state.posted_balance(wallet);
            state.add_line(payment.payer, EntryObject::Payment(id), balance_after);
        }
        Settle::Cancel => {
            if state.transfer_ids_taken(&[settle_id]) {
                return Err(Rejection::IdCollision);
            }
            let void = Transfer {
                id: settle_id,
                debit: wallet,
                credit: merchant_account,
                amount: Amount::ZERO,
                kind: TransferKind::VoidPending {
                    pending_id: hold_id,
                },
                linked: false,
            };
            if let Err(rejection) = state.transfer(now, &[void])[0] {
                return Err(ledger_rejection(rejection));
            }
            state.touched(&[wallet, merchant_account]);
            hold.status = HoldStatus::Canceled;
            hold.resolved_at = Some(now);
            state.holds_mut().put_hold(id, hold);
        }
        // Expiry needs no id of its own: the ledger marks the hold expired, so that an id
        // chosen for settling it, and taken since by another transfer, cannot keep it.
        Settle::Expire => {
            state.expire_pending(hold_id);
            state.touched(&[wallet, merchant_account]);
            hold.status = HoldStatus::Expired;
            hold.resolved_at = Some(now);
            state.holds_mut().put_hold(id, hold);
        }
    }
    Ok(state.payment_held(id).expect("held above"))
}
