//! A whole state as a list of items, and back: [`State::export`] lists every object, and
//! [`Command::Import`] puts such items into a state. This is how an installation moves between
//! storage backends (`farthing copy`) with every id, time, total and statement line kept.

use std::collections::{HashMap, HashSet};

use farthing_ledger::{
    AccountId, Currency, HoldState, TOTAL_MICROS_MAX, TransferId, TransferKind, TransferRecord,
};

use super::{Owned, State};
use crate::disk::PartyLists;
use crate::history::{RefundRow, TopupRow};
use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;
use crate::state::account_id;

/// What the items of one import bring, checked before any goes in: items may name objects
/// that earlier items of the same import bring.
#[derive(Default)]
struct Staged<'a> {
    operator_key: bool,
    keys: HashSet<KeyHash>,
    merchants: HashSet<MerchantId>,
    payers: HashSet<PayerId>,
    accounts: HashSet<(Owner, Currency)>,
    account_ids: HashSet<AccountId>,
    transfers: HashMap<TransferId, &'a TransferRecord>,
    payments: HashMap<PaymentId, &'a Payment>,
    holds: HashMap<PaymentId, Hold>,
    rows: HashSet<(u8, u128)>,
    topups: HashMap<TopupId, &'a Topup>,
    refunds: HashMap<RefundId, &'a Refund>,
    lines: HashSet<EntryObject>,
    idempotency: HashSet<&'a IdempotencyKey>,
}

impl State {
    /// Every object of this state as [`Imported`] items, in one canonical order: the operator
    /// key; merchants, payers, accounts (by owner, then currency) and transfer records, each by
    /// id; payments in the order they were made; top-ups and refunds by id; each payer's
    /// statement lines in statement order, payers by id; idempotency keys by key.
    ///
    /// Two states hold the same objects, lists and statements exactly when their exports are
    /// equal, and importing an export into an empty state gives a state with the same export.
    /// Only a whole state is exported: a working set holds a part.
    pub fn export(&self) -> impl Iterator<Item = Imported> + '_ {
        assert!(!self.is_cache(), "only a whole state is exported");
        let (merchants, payers) = self.parties.with_keys();
        let mut accounts: Vec<((Owner, Currency), AccountId)> = self
            .owners
            .iter()
            .map(|(id, owned)| {
                let currency = self.ledger.account(*id).expect("held").currency;
                ((owned.owner(), currency), *id)
            })
            .collect();
        accounts.sort_unstable_by_key(|(key, _)| *key);
        let mut transfers: Vec<_> = self.ledger.all_transfer_records().collect();
        transfers.sort_unstable_by_key(|record| record.transfer.id);
        let mut topups: Vec<&Topup> = self.young.topups.values().map(|row| &row.topup).collect();
        topups.sort_unstable_by_key(|topup| topup.id);
        let mut refunds: Vec<&Refund> =
            self.young.refunds.values().map(|row| &row.refund).collect();
        refunds.sort_unstable_by_key(|refund| refund.id);
        let idempotency = self.idempotency.rows();
        let rows: Vec<StoredRow> = self
            .kinds
            .all()
            .flat_map(|rows| rows.stored_rows())
            .collect();
        // Oldest first: each list's chain, walked from its newest item, then reversed.
        let mut payments = Vec::with_capacity(self.young.payments.len());
        let mut at = self.newest_payment;
        while let Some(id) = at {
            let row = self.payment_row(id).expect("a listed payment is held");
            payments.push(self.payment_exported(id).expect("held"));
            at = row.previous;
        }
        payments.reverse();
        let statements: Vec<(PayerId, Vec<Entry>)> = payers
            .iter()
            .map(|row| {
                let mut lines = Vec::new();
                let mut at = self
                    .payer_lists
                    .get(&row.payer.id)
                    .expect("a payer's lists")
                    .newest_line;
                while let Some(object) = at {
                    let (_, entry, previous) = self
                        .line_any(object)
                        .expect("a whole state reads memory alone")
                        .expect("a listed line is held");
                    lines.push(entry);
                    at = previous;
                }
                lines.reverse();
                (row.payer.id, lines)
            })
            .collect();

        self.parties
            .operator_key()
            .map(Imported::OperatorKey)
            .into_iter()
            .chain(merchants.into_iter().map(|row| Imported::Merchant {
                merchant: row.merchant,
                key_hash: row.key_hash,
            }))
            .chain(payers.into_iter().map(|row| Imported::Payer {
                payer: row.payer,
                key_hash: row.key_hash,
            }))
            .chain(
                accounts
                    .into_iter()
                    .map(|((owner, _), id)| Imported::Account {
                        owner,
                        account: *self.ledger.account(id).expect("listed accounts exist"),
                    }),
            )
            .chain(
                transfers
                    .into_iter()
                    .map(|record| Imported::Transfer(*record)),
            )
            .chain(payments.into_iter().map(Imported::Payment))
            .chain(rows.into_iter().map(Imported::Row))
            .chain(
                topups
                    .into_iter()
                    .map(|topup| Imported::Topup(topup.clone())),
            )
            .chain(
                refunds
                    .into_iter()
                    .map(|refund| Imported::Refund(refund.clone())),
            )
            .chain(statements.into_iter().flat_map(|(payer, entries)| {
                entries
                    .into_iter()
                    .map(move |entry| Imported::Entry { payer, entry })
            }))
            .chain(idempotency.into_iter().map(Imported::Idempotency))
    }

    /// A payment as an export lists it: its row with its refund totals, and a captured hold's
    /// amount and fee those of its capture, which its refunds were worked out on (so that an
    /// import can check them without its hold, which comes after it).
    fn payment_exported(&self, id: PaymentId) -> Option<Payment> {
        let mut payment = self.payment_stored(id)?;
        if let Some(hold) = self.holds().hold(&id) {
            hold.apply_to(&mut payment);
            payment.hold = None;
        }
        Some(payment)
    }

    /// Applies [`Command::Import`]: checks every item against the state and the items before
    /// it, then puts them all in, or none when one does not fit.
    pub(super) fn import(&mut self, items: &[Imported]) -> Outcome {
        let mut staged = Staged::default();
        for item in items {
            if let Err(rejection) = self.check_import(&mut staged, item) {
                return Outcome::Rejected(rejection);
            }
        }
        let idempotency_sorted_before = self.idempotency.order_len();
        for item in items {
            self.put_imported(item);
        }
        // Keys go to the back of the pruning order, which stays sorted by the time each was
        // made.
        self.idempotency.sort_order_from(idempotency_sorted_before);
        Outcome::Imported { count: items.len() }
    }

    fn payer_held(&self, staged: &Staged, id: PayerId) -> bool {
        self.parties.payer(id).is_some() || staged.payers.contains(&id)
    }

    fn merchant_held(&self, staged: &Staged, id: MerchantId) -> bool {
        self.parties.merchant(id).is_some() || staged.merchants.contains(&id)
    }

    fn key_held(&self, staged: &Staged, key_hash: &KeyHash) -> bool {
        self.parties.key_taken(key_hash) || staged.keys.contains(key_hash)
    }

    /// Whether `item` fits the state with the items `staged` before it, and if so stages it.
    fn check_import<'a>(
        &self,
        staged: &mut Staged<'a>,
        item: &'a Imported,
    ) -> Result<(), Rejection> {
        use Rejection::{IdCollision, ImportDoesNotFit};
        let fits = |holds: bool| if holds { Ok(()) } else { Err(ImportDoesNotFit) };
        let free = |taken: bool| if taken { Err(IdCollision) } else { Ok(()) };
        match item {
            Imported::OperatorKey(key_hash) => {
                free(self.parties.operator_key().is_some() || staged.operator_key)?;
                free(self.key_held(staged, key_hash))?;
                staged.operator_key = true;
                staged.keys.insert(*key_hash);
            }
            Imported::Merchant { merchant, key_hash } => {
                free(self.merchant_held(staged, merchant.id))?;
                free(self.key_held(staged, key_hash))?;
                fits(merchant.fee.bps <= FEE_BPS_MAX)?;
                staged.merchants.insert(merchant.id);
                staged.keys.insert(*key_hash);
            }
            Imported::Payer { payer, key_hash } => {
                free(self.payer_held(staged, payer.id))?;
                free(self.key_held(staged, key_hash))?;
                staged.payers.insert(payer.id);
                staged.keys.insert(*key_hash);
            }
            Imported::Account { owner, account } => {
                match owner {
                    Owner::Payer(payer) if !self.payer_held(staged, *payer) => {
                        return Err(Rejection::PayerNotFound);
                    }
                    Owner::Merchant(merchant) if !self.merchant_held(staged, *merchant) => {
                        return Err(Rejection::MerchantNotFound);
                    }
                    _ => {}
                }
                let key = (*owner, account.currency);
                fits(account.id == account_id(*owner, account.currency))?;
                fits(account.kind == owner.account_kind())?;
                free(
                    self.account_of_owner(*owner, account.currency).is_some()
                        || staged.accounts.contains(&key),
                )?;
                free(
                    self.ledger.account(account.id).is_some()
                        || staged.account_ids.contains(&account.id),
                )?;
                let totals = [
                    account.debits_posted,
                    account.credits_posted,
                    account.debits_pending,
                    account.credits_pending,
                ];
                fits(totals.iter().all(|total| *total <= TOTAL_MICROS_MAX))?;
                fits(!account.kind.debits_must_not_exceed_credits() || account.available() >= 0)?;
                staged.accounts.insert(key);
                staged.account_ids.insert(account.id);
            }
            Imported::Transfer(record) => {
                let id = record.transfer.id;
                // A live hold comes with its payment's hold; the ledger's own deadlines are not
                // carried.
                fits(
                    id.0 != 0
                        && (record.hold != Some(HoldState::Pending) || record.expires_at.is_none()),
                )?;
                free(self.ledger.transfer(id).is_some() || staged.transfers.contains_key(&id))?;
                staged.transfers.insert(id, record);
            }
            Imported::Payment(payment) => {
                free(
                    self.payment_row(payment.id).is_some()
                        || staged.payments.contains_key(&payment.id),
                )?;
                if !self.payer_held(staged, payment.payer) {
                    return Err(Rejection::PayerNotFound);
                }
                if !self.merchant_held(staged, payment.merchant) {
                    return Err(Rejection::MerchantNotFound);
                }
                // A hold is an item of its own.
                fits(payment.hold.is_none() && !payment.amount.is_zero())?;
                fits(payment.fee <= payment.amount && payment.amount_refunded <= payment.amount)?;
                // Refunds return the fee in proportion to the running total refunded.
                let fee_share = payment
                    .fee
                    .mul_div_floor(payment.amount_refunded.micros(), payment.amount.micros());
                fits(fee_share == Some(payment.fee_refunded))?;
                staged.payments.insert(payment.id, payment);
            }
            Imported::Topup(topup) => {
                free(self.topup_row(topup.id).is_some() || staged.topups.contains_key(&topup.id))?;
                if !self.payer_held(staged, topup.payer) {
                    return Err(Rejection::PayerNotFound);
                }
                fits(!topup.amount.is_zero())?;
                staged.topups.insert(topup.id, topup);
            }
            Imported::Refund(refund) => {
                free(
                    self.refund_row(refund.id).is_some() || staged.refunds.contains_key(&refund.id),
                )?;
                let payment = self
                    .payment_held(refund.payment)
                    .or_else(|| staged.payments.get(&refund.payment).map(|p| (*p).clone()))
                    .ok_or(Rejection::PaymentNotFound)?;
                fits(
                    refund.payer == payment.payer
                        && refund.merchant == payment.merchant
                        && refund.currency == payment.currency,
                )?;
                fits(!refund.amount.is_zero() && refund.fee_refunded <= refund.amount)?;
                staged.refunds.insert(refund.id, refund);
            }
            Imported::Entry { payer, entry } => {
                if !self.payer_held(staged, *payer) {
                    return Err(Rejection::PayerNotFound);
                }
                // An object has one line.
                fits(self.line_held(entry.object).is_none() && staged.lines.insert(entry.object))?;
                // The line shows its object as it was made.
                let shown = match entry.object {
                    EntryObject::Payment(id) => {
                        let payment = self
                            .payment_stored(id)
                            .or_else(|| staged.payments.get(&id).map(|p| (*p).clone()))
                            .ok_or(Rejection::PaymentNotFound)?;
                        let hold = self.holds().hold(&id).or(staged.holds.get(&id));
                        let (amount, at) = match hold {
                            Some(hold) => hold.line_shows(&payment),
                            None => (payment.amount, payment.created_at),
                        };
                        (payment.payer, payment.currency, false, amount, at)
                    }
                    EntryObject::Topup(id) => {
                        let topup = self
                            .topup_record(id)
                            .or_else(|| staged.topups.get(&id).copied())
                            .ok_or(ImportDoesNotFit)?;
                        (
                            topup.payer,
                            topup.currency,
                            true,
                            topup.amount,
                            topup.created_at,
                        )
                    }
                    EntryObject::Refund(id) => {
                        let refund = self
                            .refund_record(id)
                            .or_else(|| staged.refunds.get(&id).copied())
                            .ok_or(ImportDoesNotFit)?;
                        (
                            refund.payer,
                            refund.currency,
                            true,
                            refund.amount,
                            refund.created_at,
                        )
                    }
                };
                fits(
                    shown
                        == (
                            *payer,
                            entry.currency,
                            entry.credit,
                            entry.amount,
                            entry.created_at,
                        ),
                )?;
            }
            Imported::Idempotency(row) => {
                free(self.idempotency.contains(&row.key) || staged.idempotency.contains(&row.key))?;
                staged.idempotency.insert(&row.key);
            }
            Imported::Row(row) => {
                let rows = self.kinds.tag(row.tag).ok_or(ImportDoesNotFit)?;
                free(rows.has(row.id) || staged.rows.contains(&(row.tag, row.id)))?;
                if let Some(hold) = row.decode::<HoldKind>() {
                    let hold = hold.map_err(|_| ImportDoesNotFit)?;
                    fits(hold.payment.to_u128() == row.id)?;
                    self.check_hold_import(staged, &hold)?;
                }
                staged.rows.insert((row.tag, row.id));
            }
        }
        Ok(())
    }

    /// Whether an imported hold fits its payment and its pending transfer.
    fn check_hold_import(&self, staged: &mut Staged, row: &HoldRow) -> Result<(), Rejection> {
        use Rejection::ImportDoesNotFit;
        let fits = |holds: bool| if holds { Ok(()) } else { Err(ImportDoesNotFit) };
        let id = row.payment;
        let hold = &row.hold;
        let payment = self
            .payment_stored(id)
            .or_else(|| staged.payments.get(&id).map(|p| (*p).clone()))
            .ok_or(Rejection::PaymentNotFound)?;
        fits(hold.amount_captured <= hold.amount_authorized)?;
        fits(hold.fee_captured <= hold.amount_captured)?;
        fits(hold.is_live() == hold.resolved_at.is_none())?;
        // The payment as an export lists it: a captured hold's with the figures of its
        // capture, which its refund totals were checked against; only money that moved
        // is refunded.
        let (amount, fee) = match hold.status {
            HoldStatus::Captured => (hold.amount_captured, hold.fee_captured),
            _ => (hold.amount_authorized, payment.fee),
        };
        fits(payment.amount == amount && payment.fee == fee)?;
        fits(payment.amount_refunded.is_zero() || hold.status == HoldStatus::Captured)?;
        // The hold's pending transfer is held, or comes with the import: it moves what
        // the hold says from the payer's wallet to the merchant, and stands as the hold
        // does.
        let [hold_id, ..] = hold.transfers;
        let pending = self
            .ledger
            .transfer(hold_id)
            .or_else(|| staged.transfers.get(&hold_id).copied())
            .ok_or(ImportDoesNotFit)?;
        let wallet = account_id(Owner::Payer(payment.payer), payment.currency);
        let merchant = account_id(Owner::Merchant(payment.merchant), payment.currency);
        let hold_state = match hold.status {
            HoldStatus::Held => HoldState::Pending,
            HoldStatus::Captured => HoldState::Posted,
            HoldStatus::Canceled => HoldState::Voided,
            HoldStatus::Expired => HoldState::Expired,
        };
        fits(
            pending.outcome.is_ok()
                && matches!(pending.transfer.kind, TransferKind::Pending { .. })
                && pending.transfer.amount == hold.amount_authorized
                && pending.transfer.debit == wallet
                && pending.transfer.credit == merchant
                && pending.hold == Some(hold_state),
        )?;
        staged.holds.insert(id, *hold);
        Ok(())
    }

    /// Puts in one checked item.
    fn put_imported(&mut self, item: &Imported) {
        match item {
            Imported::OperatorKey(key_hash) => {
                self.parties.put_imported_operator_key(*key_hash);
            }
            Imported::Merchant { merchant, key_hash } => {
                self.parties.put_imported_merchant(merchant, *key_hash);
                self.merchant_lists.put(merchant.id, PartyLists::default());
                self.merchants += 1;
            }
            Imported::Payer { payer, key_hash } => {
                self.parties.put_imported_payer(payer, *key_hash);
                self.payer_lists.put(payer.id, PartyLists::default());
                self.payers += 1;
            }
            Imported::Account { owner, account } => {
                self.ledger
                    .insert_account(*account)
                    .expect("a checked account fits the ledger");
                self.owners
                    .insert(account.id, Owned::new(*owner, self.round()));
                self.list_account(*owner, account.currency, account.id);
                if let Some(tracker) = &mut self.tracker {
                    tracker.accounts_created.push((*owner, account.currency));
                }
                self.touched(&[account.id]);
            }
            Imported::Transfer(record) => {
                self.ledger.put_imported_transfer_record(*record);
                if let Some(tracker) = &mut self.tracker {
                    tracker.imported_transfers.insert(record.transfer.id);
                }
            }
            Imported::Payment(payment) => self.add_payment(payment.clone(), None),
            Imported::Topup(topup) => {
                self.young.topups.insert(
                    topup.id,
                    TopupRow {
                        topup: topup.clone(),
                        line: None,
                    },
                );
                if let Some(tracker) = &mut self.tracker {
                    tracker.topups.push(topup.id);
                }
            }
            Imported::Refund(refund) => {
                self.young.refunds.insert(
                    refund.id,
                    RefundRow {
                        refund: refund.clone(),
                        line: None,
                    },
                );
                if let Some(tracker) = &mut self.tracker {
                    tracker.refunds.push(refund.id);
                }
            }
            Imported::Entry { payer, entry } => {
                self.add_line(*payer, entry.object, entry.balance_after);
            }
            Imported::Idempotency(row) => {
                self.idempotency.put_imported(row);
            }
            Imported::Row(row) => {
                self.kinds
                    .tag_mut(row.tag)
                    .expect("a checked row's kind is registered")
                    .put_stored(row)
                    .expect("a checked row decodes");
            }
        }
    }
}
