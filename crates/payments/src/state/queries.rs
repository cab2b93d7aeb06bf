//! What a state answers. A cache answers from memory first and then from its disk; a whole
//! state or a working set from memory alone.

use std::borrow::Cow;
use std::collections::HashMap;

use farthing_ledger::{Account, AccountId, Currency};

use super::{State, with_refunds};
use crate::disk::{self, Disk, DiskError, KeyOwner, MerchantState, PartyLists, PayerState};
use crate::history::{Line, PaymentRow, RefundRow, Refunded, TopupRow};
use crate::idempotency::IdempotencyLookup;
use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;
use crate::state::{CurrencyTotals, Page};

impl State {
    /// How `command` would be refused if it were applied now, from the checks it makes
    /// before it moves money; `None` when it might succeed. Reads only: a server answers such
    /// a refusal without recording anything, since a refusal that changes nothing can be
    /// answered as of any moment its state was current. Checks needing ids not yet chosen
    /// (collisions) are left to [`State::apply`]. A cache answers it once the command's
    /// reads are loaded ([`State::load_for`]).
    pub fn refusal(&self, command: &Command) -> Option<Rejection> {
        match command {
            Command::Pay(pay) => self.pay_refusal(pay),
            Command::Room(command) => command.refused(self),
            Command::Topup {
                payer,
                amount,
                source,
                ..
            } => {
                if self.parties.payer(*payer).is_none() {
                    Some(Rejection::PayerNotFound)
                } else if amount.is_zero() {
                    Some(Rejection::AmountNotPositive)
                } else if *source == FundingSource::SandboxDecline {
                    Some(Rejection::FundingDeclined)
                } else {
                    None
                }
            }
            Command::Refund {
                payment,
                amount,
                caller,
                ..
            } => {
                let payment = match self.payment_settled_by(*payment, *caller) {
                    Ok(payment) => payment,
                    Err(rejection) => return Some(rejection),
                };
                if !payment.is_settled() {
                    return Some(HoldRejection::PaymentNotCaptured.into());
                }
                let remaining = payment
                    .amount
                    .checked_sub(payment.amount_refunded)
                    .expect("refunds never exceed the payment");
                let amount = amount.unwrap_or(remaining);
                (amount.is_zero() || amount > remaining).then_some(Rejection::RefundExceedsPayment)
            }
            _ => None,
        }
    }

    /// How a new payment (paid at once or held) would be refused now, from its checks before
    /// money moves; see [`State::refusal`].
    pub(crate) fn pay_refusal(&self, pay: &PayCommand) -> Option<Rejection> {
        if self.parties.merchant(pay.merchant).is_none() {
            return Some(Rejection::MerchantNotFound);
        }
        if self.parties.payer(pay.payer).is_none() {
            return Some(Rejection::PayerNotFound);
        }
        if pay.amount.is_zero() {
            return Some(Rejection::AmountNotPositive);
        }
        match self.account_of_owner(Owner::Payer(pay.payer), pay.currency) {
            None => Some(Rejection::InsufficientFunds),
            Some(wallet) if self.certainly_short(wallet, pay) => Some(Rejection::InsufficientFunds),
            Some(_) => None,
        }
    }

    /// Whose key this is.
    pub fn principal(&self, key_hash: &KeyHash) -> Result<Option<Principal>, DiskError> {
        match self.parties.key_slot(key_hash) {
            Some(held) => Ok(held),
            None => match self.disk() {
                Some(disk) => read_state::<KeyOwner>(disk, &disk::key_key(key_hash))
                    .map(|owner| owner.map(|owner| owner.0)),
                None => Ok(None),
            },
        }
    }

    pub fn has_operator_key(&self) -> bool {
        self.parties.operator_key().is_some()
    }

    /// What an idempotency key holds. A cache answers it once the key is loaded.
    pub fn idempotency_lookup(
        &self,
        key: &IdempotencyKey,
        fingerprint: &[u8; 32],
    ) -> IdempotencyLookup<'_> {
        self.idempotency.lookup(key, fingerprint)
    }

    /// A merchant held in memory.
    pub fn merchant(&self, id: MerchantId) -> Option<&Merchant> {
        self.parties.merchant(id)
    }

    /// A payer held in memory.
    pub fn payer(&self, id: PayerId) -> Option<&Payer> {
        self.parties.payer(id)
    }

    /// Whether the payer exists.
    pub fn payer_exists(&self, id: PayerId) -> Result<bool, DiskError> {
        Ok(self.payer_lists_any(id)?.is_some())
    }

    pub fn merchant_count(&self) -> usize {
        usize::try_from(self.merchants).expect("counts fit")
    }

    pub fn payer_count(&self) -> usize {
        usize::try_from(self.payers).expect("counts fit")
    }

    pub fn payment_count(&self) -> usize {
        usize::try_from(self.payments_before).expect("counts fit") + self.young.payments.len()
    }

    /// A payment, refunds and its hold included.
    pub fn payment(&self, id: PaymentId) -> Result<Option<Payment>, DiskError> {
        let Some(row) = self.payment_row_any(id)? else {
            return Ok(None);
        };
        self.payment_as_it_stands(row.into_owned().payment)
            .map(Some)
    }

    /// A payment's row with what changed since it was made: refund totals and its hold.
    fn payment_as_it_stands(&self, payment: Payment) -> Result<Payment, DiskError> {
        let id = payment.id;
        let mut payment = with_refunds(payment, self.refunded_any(id)?);
        if let Some(hold) = self.hold_any(id)? {
            hold.apply_to(&mut payment);
        }
        Ok(payment)
    }

    /// The earliest deadline among live holds: when an expiry is next due.
    pub fn next_hold_deadline(&self) -> Option<farthing_ledger::Timestamp> {
        self.holds().next_deadline()
    }

    /// How many holds are live.
    pub fn live_holds(&self) -> usize {
        self.holds().pinned_count()
    }

    /// A refund held in memory.
    pub fn refund_record(&self, id: RefundId) -> Option<&Refund> {
        self.refund_row(id).map(|row| &row.refund)
    }

    /// A top-up held in memory.
    pub fn topup_record(&self, id: TopupId) -> Option<&Topup> {
        self.topup_row(id).map(|row| &row.topup)
    }

    /// Available balances of a payer's wallets, by currency.
    pub fn payer_balances(&self, id: PayerId) -> Result<Option<Vec<(Currency, i128)>>, DiskError> {
        match self.payer_lists_any(id)? {
            Some(lists) => self.balances(Owner::Payer(id), &lists).map(Some),
            None => Ok(None),
        }
    }

    /// Available balances of a merchant, by currency.
    pub fn merchant_balances(
        &self,
        id: MerchantId,
    ) -> Result<Option<Vec<(Currency, i128)>>, DiskError> {
        match self.merchant_lists_any(id)? {
            Some(lists) => self.balances(Owner::Merchant(id), &lists).map(Some),
            None => Ok(None),
        }
    }

    fn balances(
        &self,
        owner: Owner,
        lists: &PartyLists,
    ) -> Result<Vec<(Currency, i128)>, DiskError> {
        let mut out = Vec::with_capacity(lists.accounts.len());
        for (currency, id) in &lists.accounts {
            let account = self
                .account_any(owner, *id)?
                .ok_or_else(|| DiskError(format!("a listed account {} is missing", id.0)))?;
            out.push((*currency, account.available()));
        }
        out.sort_by_key(|(currency, _)| *currency);
        Ok(out)
    }

    /// Payments visible to `principal`, newest first, after the payment `starting_after`.
    /// `None` when the cursor is not a payment the principal may see.
    pub fn list_payments(
        &self,
        principal: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> Result<Option<Page<Payment>>, DiskError> {
        // Each list is a chain from its newest payment; a page starts at the list's head, or
        // at the payment before the cursor in that list.
        let next: fn(&PaymentRow) -> Option<PaymentId> = match principal {
            Principal::Operator => |row| row.previous,
            Principal::Payer(_) => |row| row.previous_of_payer,
            Principal::Merchant(_) => |row| row.previous_of_merchant,
        };
        let start = match starting_after {
            None => match principal {
                Principal::Operator => self.newest_payment,
                Principal::Payer(payer) => match self.payer_lists_any(payer)? {
                    Some(lists) => lists.newest_payment,
                    None => return Ok(None),
                },
                Principal::Merchant(merchant) => match self.merchant_lists_any(merchant)? {
                    Some(lists) => lists.newest_payment,
                    None => return Ok(None),
                },
            },
            Some(cursor) => {
                let Some(row) = self.payment_row_any(cursor)? else {
                    return Ok(None);
                };
                if !Self::may_see(principal, &row.payment) {
                    return Ok(None);
                }
                next(&row)
            }
        };
        let mut items = Vec::new();
        let mut at = start;
        while let Some(id) = at {
            if items.len() == limit {
                break;
            }
            let row = self
                .payment_row_any(id)?
                .ok_or_else(|| DiskError(format!("a listed payment {id} is missing")))?;
            at = next(&row);
            items.push(self.payment_as_it_stands(row.into_owned().payment)?);
        }
        Ok(Some(Page {
            items,
            has_more: at.is_some(),
        }))
    }

    /// Whether `principal` may see `payment`.
    pub fn may_see(principal: Principal, payment: &Payment) -> bool {
        match principal {
            Principal::Operator => true,
            Principal::Payer(payer) => payment.payer == payer,
            Principal::Merchant(merchant) => payment.merchant == merchant,
        }
    }

    /// A payer's statement, newest first, after the entry for object `starting_after`.
    /// `None` when the payer or the cursor is unknown.
    pub fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> Result<Option<Page<Entry>>, DiskError> {
        let Some(lists) = self.payer_lists_any(payer)? else {
            return Ok(None);
        };
        let start = match starting_after {
            None => lists.newest_line,
            Some(object) => match self.line_any(object)? {
                Some((owner, _, previous)) if owner == payer => previous,
                _ => return Ok(None),
            },
        };
        let mut items = Vec::new();
        let mut at = start;
        while let Some(object) = at {
            if items.len() == limit {
                break;
            }
            let (_, entry, previous) = self.line_any(object)?.ok_or_else(|| {
                DiskError(format!("a listed statement line {object:?} is missing"))
            })?;
            items.push(entry);
            at = previous;
        }
        Ok(Some(Page {
            items,
            has_more: at.is_some(),
        }))
    }

    /// Per-currency sums over every account held: money is conserved when every sum is
    /// zero. A whole state holds every account.
    pub fn currency_totals(&self) -> Vec<CurrencyTotals> {
        let mut totals: HashMap<Currency, CurrencyTotals> = HashMap::new();
        for account in self.ledger.accounts() {
            let entry = totals.entry(account.currency).or_insert(CurrencyTotals {
                currency: account.currency,
                posted_net: 0,
                pending_net: 0,
                accounts: 0,
            });
            entry.posted_net += account.posted_balance();
            entry.pending_net +=
                i128::from(account.credits_pending) - i128::from(account.debits_pending);
            entry.accounts += 1;
        }
        let mut out: Vec<CurrencyTotals> = totals.into_values().collect();
        out.sort_by_key(|t| t.currency);
        out
    }

    /// Every ledger account held (for audits and copies of a whole state).
    pub fn ledger_accounts(&self) -> impl Iterator<Item = &Account> {
        self.ledger.accounts()
    }

    /// Transfer records made, failed ones included.
    pub fn ledger_transfer_count(&self) -> usize {
        usize::try_from(self.transfers_before).expect("counts fit")
            + self.ledger.transfer_records().len()
    }

    // Memory, then disk.

    pub(crate) fn disk(&self) -> Option<&dyn Disk> {
        self.cache.as_ref().map(|cache| &*cache.disk)
    }

    /// Whether a history row with this id may be on disk.
    fn on_disk(disk: &dyn Disk, id: u128) -> bool {
        id <= disk.history_id_max()
    }

    pub(crate) fn payment_row_any(
        &self,
        id: PaymentId,
    ) -> Result<Option<Cow<'_, PaymentRow>>, DiskError> {
        if let Some(row) = self.payment_row(id) {
            return Ok(Some(Cow::Borrowed(row)));
        }
        read_history(self.disk(), id.to_u128(), disk::history_kind::PAYMENT)
            .map(|row| row.map(Cow::Owned))
    }

    pub(crate) fn topup_row_any(
        &self,
        id: TopupId,
    ) -> Result<Option<Cow<'_, TopupRow>>, DiskError> {
        if let Some(row) = self.topup_row(id) {
            return Ok(Some(Cow::Borrowed(row)));
        }
        read_history(self.disk(), id.to_u128(), disk::history_kind::TOPUP)
            .map(|row| row.map(Cow::Owned))
    }

    pub(crate) fn refund_row_any(
        &self,
        id: RefundId,
    ) -> Result<Option<Cow<'_, RefundRow>>, DiskError> {
        if let Some(row) = self.refund_row(id) {
            return Ok(Some(Cow::Borrowed(row)));
        }
        read_history(self.disk(), id.to_u128(), disk::history_kind::REFUND)
            .map(|row| row.map(Cow::Owned))
    }

    pub(crate) fn hold_any(&self, id: PaymentId) -> Result<Option<Hold>, DiskError> {
        Ok(self.row_any::<HoldKind>(id.to_u128())?.map(|row| row.hold))
    }

    /// The state row of the registered kind `tag` under `id`, in its stored form, from
    /// memory or else from disk: how a room's object is read through any backend
    /// ([`StoredRow::decode`] gives it back as its row).
    pub fn row(&self, tag: u8, id: u128) -> Result<Option<StoredRow>, DiskError> {
        let Some(rows) = self.kinds.tag(tag) else {
            return Ok(None);
        };
        if rows.knows(id) {
            return Ok(rows.get_stored(id));
        }
        match self.disk() {
            Some(disk) => {
                Ok(disk
                    .state(&disk::row_key(tag, id))?
                    .map(|bytes| StoredRow { tag, id, bytes }))
            }
            None => Ok(None),
        }
    }

    /// A state row of kind `K`, from memory or else from disk.
    pub(crate) fn row_any<K: Kind>(&self, id: u128) -> Result<Option<K::Row>, DiskError> {
        let rows = self.kinds.of::<K>();
        if rows.knows(id) {
            return Ok(rows.get(id).cloned());
        }
        match self.disk() {
            Some(disk) => read_state(disk, &disk::row_key(K::TAG, id)),
            None => Ok(None),
        }
    }

    pub(crate) fn refunded_any(&self, id: PaymentId) -> Result<Option<Refunded>, DiskError> {
        if let Some(slot) = self.refunded.slot(&id) {
            return Ok(match slot {
                farthing_kernel::Slot::Present(refunded) => Some(*refunded),
                farthing_kernel::Slot::Absent => None,
            });
        }
        match self.disk() {
            Some(disk) => read_state(disk, &disk::refunded_key(id)),
            None => Ok(None),
        }
    }

    /// The line an import brought for `object` as a row of its own.
    fn imported_line_any(&self, object: EntryObject) -> Result<Option<Line>, DiskError> {
        let held = self
            .young
            .lines
            .get(&object)
            .or_else(|| {
                self.frozen_history()
                    .and_then(|frozen| frozen.lines.get(&object))
            })
            .or_else(|| self.loaded.lines.get(&object));
        if let Some(line) = held {
            return Ok(Some(*line));
        }
        let Some(disk) = self.disk() else {
            return Ok(None);
        };
        let id = match object {
            EntryObject::Topup(id) => id.to_u128(),
            EntryObject::Payment(id) => id.to_u128(),
            EntryObject::Refund(id) => id.to_u128(),
        };
        if !Self::on_disk(disk, id) {
            return Ok(None);
        }
        match disk.history(&disk::line_key(object))? {
            Some(bytes) => disk::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The statement line of `object` with its payer and the payer's line before it, if the
    /// object exists and has a line.
    pub(crate) fn line_any(
        &self,
        object: EntryObject,
    ) -> Result<Option<(PayerId, Entry, Option<EntryObject>)>, DiskError> {
        let (payer, currency, credit, amount, created_at, line) = match object {
            EntryObject::Payment(id) => {
                let Some(row) = self.payment_row_any(id)? else {
                    return Ok(None);
                };
                let p = &row.payment;
                // A captured hold's line is made by the capture: what was captured, then.
                let (amount, at) = match self.hold_any(id)? {
                    Some(hold) => hold.line_shows(p),
                    None => (p.amount, p.created_at),
                };
                (p.payer, p.currency, false, amount, at, row.line)
            }
            EntryObject::Topup(id) => {
                let Some(row) = self.topup_row_any(id)? else {
                    return Ok(None);
                };
                let t = &row.topup;
                (t.payer, t.currency, true, t.amount, t.created_at, row.line)
            }
            EntryObject::Refund(id) => {
                let Some(row) = self.refund_row_any(id)? else {
                    return Ok(None);
                };
                let r = &row.refund;
                (r.payer, r.currency, true, r.amount, r.created_at, row.line)
            }
        };
        let line = match line {
            Some(line) => line,
            None => match self.imported_line_any(object)? {
                Some(line) => line,
                None => return Ok(None),
            },
        };
        let entry = Entry {
            object,
            currency,
            credit,
            amount,
            balance_after: line.balance_after,
            created_at,
        };
        Ok(Some((payer, entry, line.previous)))
    }

    pub(crate) fn payer_lists_any(
        &self,
        id: PayerId,
    ) -> Result<Option<Cow<'_, PartyLists>>, DiskError> {
        if let Some(lists) = self.payer_lists.get(&id) {
            return Ok(Some(Cow::Borrowed(lists)));
        }
        match self.disk() {
            Some(disk) => Ok(read_state::<PayerState>(disk, &disk::payer_key(id))?
                .map(|payer| Cow::Owned(payer.lists))),
            None => Ok(None),
        }
    }

    pub(crate) fn merchant_lists_any(
        &self,
        id: MerchantId,
    ) -> Result<Option<Cow<'_, PartyLists>>, DiskError> {
        if let Some(lists) = self.merchant_lists.get(&id) {
            return Ok(Some(Cow::Borrowed(lists)));
        }
        match self.disk() {
            Some(disk) => Ok(read_state::<MerchantState>(disk, &disk::merchant_key(id))?
                .map(|merchant| Cow::Owned(merchant.lists))),
            None => Ok(None),
        }
    }

    /// `owner`'s account `id`, from memory or else from disk (a payer's in the payer's row).
    pub(crate) fn account_any(
        &self,
        owner: Owner,
        id: AccountId,
    ) -> Result<Option<Account>, DiskError> {
        if let Some(account) = self.ledger.account(id) {
            if let Some(owned) = self.owners.get(&id) {
                owned.used.mark(self.round());
            }
            return Ok(Some(*account));
        }
        match self.disk() {
            Some(disk) => match owner {
                Owner::Payer(payer) => Ok(read_state::<PayerState>(disk, &disk::payer_key(payer))?
                    .and_then(|row| row.accounts.into_iter().find(|account| account.id == id))),
                _ => {
                    Ok(read_state::<AccountRow>(disk, &disk::account_key(id))?
                        .map(|row| row.account))
                }
            },
            None => Ok(None),
        }
    }
}

/// The state entry under `key`, decoded.
pub(crate) fn read_state<T: farthing_kernel::Fields>(
    disk: &dyn Disk,
    key: &[u8],
) -> Result<Option<T>, DiskError> {
    match disk.state(key)? {
        Some(bytes) => disk::decode(&bytes).map(Some),
        None => Ok(None),
    }
}

/// The history row of `kind` with this id, decoded; `None` without a disk.
pub(crate) fn read_history<T: farthing_kernel::Fields>(
    disk: Option<&dyn Disk>,
    id: u128,
    kind: u8,
) -> Result<Option<T>, DiskError> {
    let Some(disk) = disk else {
        return Ok(None);
    };
    if !State::on_disk(disk, id) {
        return Ok(None);
    }
    match disk.history(&disk::history_key(id, kind))? {
        Some(bytes) => disk::decode(&bytes).map(Some),
        None => Ok(None),
    }
}
