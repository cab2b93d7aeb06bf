//! What a storage backend that keeps state outside the process (PostgreSQL, ADR 0002) needs in
//! order to run the same [`State::apply`](crate::State::apply) over a small working set:
//!
//! 1. [`Needs`]: what a record reads, from [`State::needs`](crate::State::needs).
//! 2. Hydration: the `State::insert_*` methods put loaded objects into a working set made with
//!    [`State::new_working_set`](crate::State::new_working_set).
//! 3. [`Changes`]: what applying records did, from
//!    [`State::take_changes`](crate::State::take_changes), to write back.
//!
//! The embedded store uses none of this: its state is whole and tracks nothing.

use farthing_ledger::{Account, Amount, Currency, Timestamp, TransferId, TransferRecord};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;

/// What applying a record reads. A working set holding every object listed here (those that
/// exist), copied from a state, gives the record the outcome it gets on that state, and
/// changes those objects the same way.
///
/// Ids and keys that name nothing yet are listed too: the record checks that they are free,
/// so "not found" is part of what a loader reports. Lists are sorted, without repeats.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Needs {
    /// The operator's key hash, whichever it is (setting a new one removes the old one).
    pub operator_key: bool,
    /// Key hashes: a new party's key must not be taken.
    pub key_hashes: Vec<KeyHash>,
    pub merchants: Vec<MerchantId>,
    pub payers: Vec<PayerId>,
    /// Payments read (refunded, settled), and ids of new payments (which must be free).
    pub payments: Vec<PaymentId>,
    /// The payments read that exist (a refund's, a hold's settled): a loader loads (and
    /// locks) them, and never assumes them new.
    pub payments_existing: Vec<PaymentId>,
    /// Ids of new top-ups (which must be free).
    pub topups: Vec<TopupId>,
    /// Ids of new refunds (which must be free).
    pub refunds: Vec<RefundId>,
    /// Accounts, by owner and currency. A loader looks each up by its derived id
    /// ([`crate::account_id`]) and loads what it finds under its own owner, so that the
    /// 2⁻⁶⁴ case of an id held by another owner is refused as it is in a whole state.
    pub accounts: Vec<(Owner, Currency)>,
    /// Ledger transfer ids: a reused id gets the answer its first use got.
    pub transfers: Vec<TransferId>,
    /// The pending transfers of holds to settle: they exist, and must be loaded (never
    /// assumed new).
    pub held_transfers: Vec<TransferId>,
    /// State rows of registered kinds ([`crate::kinds`]), by tag and id: those a record reads
    /// or must find free.
    pub rows: Vec<(u8, u128)>,
    /// An expiry's time and how many holds it may release: the live holds due by then must
    /// be loaded, oldest deadline first, at most that many, with their payments
    /// ([`EXPIRED_PER_COMMAND_MAX`] for each expiry of the batch). The latest of a batch's,
    /// and the most.
    pub holds_due: Option<(Timestamp, usize)>,
    /// Idempotency keys presented with the record.
    pub idempotency_keys: Vec<IdempotencyKey>,
    /// Whether asking again, once what is listed is loaded, may list more: a refund whose
    /// payment the state does not hold yet names that payment only.
    pub incomplete: bool,
}

impl Needs {
    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        *self == Needs::default()
    }

    /// Adds what `other` lists: the needs of a batch are those of its records together.
    pub fn extend(&mut self, other: Needs) {
        self.append(other);
        self.normalize();
    }

    /// Adds what `other` lists, leaving the lists unsorted and with repeats (to gather many
    /// records' needs and sort once).
    pub fn append(&mut self, other: Needs) {
        self.operator_key |= other.operator_key;
        self.incomplete |= other.incomplete;
        self.key_hashes.extend(other.key_hashes);
        self.merchants.extend(other.merchants);
        self.payers.extend(other.payers);
        self.payments.extend(other.payments);
        self.payments_existing.extend(other.payments_existing);
        self.topups.extend(other.topups);
        self.refunds.extend(other.refunds);
        self.accounts.extend(other.accounts);
        self.transfers.extend(other.transfers);
        self.held_transfers.extend(other.held_transfers);
        self.rows.extend(other.rows);
        self.holds_due = match (self.holds_due, other.holds_due) {
            (Some((by, most)), Some((other_by, other_most))) => {
                Some((by.max(other_by), most.max(other_most)))
            }
            (due, other) => due.or(other),
        };
        self.idempotency_keys.extend(other.idempotency_keys);
    }

    /// Splits what is listed into `count` parts (at least one), each list dealt out in runs of
    /// about equal length, the flags and the expiry with the first: reading every part reads
    /// what reading the whole would.
    pub fn split(self, count: usize) -> Vec<Needs> {
        fn deal<T>(list: Vec<T>, parts: &mut [Needs], field: impl Fn(&mut Needs) -> &mut Vec<T>) {
            let run = list.len().div_ceil(parts.len()).max(1);
            let mut items = list.into_iter();
            for part in parts.iter_mut() {
                field(part).extend(items.by_ref().take(run));
            }
        }
        let mut parts: Vec<Needs> = (0..count.max(1)).map(|_| Needs::default()).collect();
        parts[0].operator_key = self.operator_key;
        parts[0].incomplete = self.incomplete;
        parts[0].holds_due = self.holds_due;
        deal(self.key_hashes, &mut parts, |part| &mut part.key_hashes);
        deal(self.merchants, &mut parts, |part| &mut part.merchants);
        deal(self.payers, &mut parts, |part| &mut part.payers);
        deal(self.payments, &mut parts, |part| &mut part.payments);
        deal(self.payments_existing, &mut parts, |part| {
            &mut part.payments_existing
        });
        deal(self.topups, &mut parts, |part| &mut part.topups);
        deal(self.refunds, &mut parts, |part| &mut part.refunds);
        deal(self.accounts, &mut parts, |part| &mut part.accounts);
        deal(self.transfers, &mut parts, |part| &mut part.transfers);
        deal(self.held_transfers, &mut parts, |part| {
            &mut part.held_transfers
        });
        deal(self.rows, &mut parts, |part| &mut part.rows);
        deal(self.idempotency_keys, &mut parts, |part| {
            &mut part.idempotency_keys
        });
        parts
    }

    /// Sorts every list and drops repeats.
    pub(crate) fn normalize(&mut self) {
        fn tidy<T: Ord>(list: &mut Vec<T>) {
            list.sort_unstable();
            list.dedup();
        }
        tidy(&mut self.key_hashes);
        tidy(&mut self.merchants);
        tidy(&mut self.payers);
        tidy(&mut self.payments);
        tidy(&mut self.payments_existing);
        tidy(&mut self.topups);
        tidy(&mut self.refunds);
        tidy(&mut self.accounts);
        tidy(&mut self.transfers);
        tidy(&mut self.held_transfers);
        tidy(&mut self.rows);
        tidy(&mut self.idempotency_keys);
    }

    /// A payment read as it stands: its row, and its hold (a state row of its own) or that
    /// it has none.
    pub(crate) fn add_payment_read(&mut self, payment: PaymentId) {
        self.payments.push(payment);
        self.rows.push((HoldKind::TAG, payment.to_u128()));
    }

    /// A payment's reads: its parties, the payer's wallet, the merchant's account and the fee
    /// account in its currency, its id and its transfer ids.
    pub(crate) fn add_pay(&mut self, pay: &PayCommand) {
        self.payers.push(pay.payer);
        self.merchants.push(pay.merchant);
        self.payments.push(pay.id);
        self.add_payment_accounts(pay.payer, pay.merchant, pay.currency);
        self.transfers.extend(pay.transfer_ids);
    }

    /// The three accounts a payment's money moves between: the payer's wallet, the
    /// merchant's account and the platform's fees, in its currency.
    pub(crate) fn add_payment_accounts(
        &mut self,
        payer: PayerId,
        merchant: MerchantId,
        currency: Currency,
    ) {
        self.accounts.extend([
            (Owner::Payer(payer), currency),
            (Owner::Merchant(merchant), currency),
            (Owner::PlatformFees, currency),
        ]);
    }

    /// A payment that exists read as it stands (one refunded, or whose hold is settled):
    /// [`Needs::add_payment_read`], and listed as existing.
    pub(crate) fn add_payment_existing(&mut self, payment: PaymentId) {
        self.add_payment_read(payment);
        self.payments_existing.push(payment);
    }

    /// An import's reads: every id and key its items bring (which must be free) and every
    /// object they name (which must be held).
    pub(crate) fn add_import(&mut self, items: &[Imported]) {
        for item in items {
            match item {
                Imported::OperatorKey(key_hash) => {
                    self.operator_key = true;
                    self.key_hashes.push(*key_hash);
                }
                Imported::Merchant { merchant, key_hash } => {
                    self.merchants.push(merchant.id);
                    self.key_hashes.push(*key_hash);
                }
                Imported::Payer { payer, key_hash } => {
                    self.payers.push(payer.id);
                    self.key_hashes.push(*key_hash);
                }
                Imported::Account { owner, account } => {
                    match owner {
                        Owner::Payer(payer) => self.payers.push(*payer),
                        Owner::Merchant(merchant) => self.merchants.push(*merchant),
                        Owner::PlatformFees | Owner::ExternalFunding => {}
                    }
                    self.accounts.push((*owner, account.currency));
                }
                Imported::Transfer(record) => self.transfers.push(record.transfer.id),
                Imported::Payment(payment) => {
                    self.payments.push(payment.id);
                    self.payers.push(payment.payer);
                    self.merchants.push(payment.merchant);
                }
                Imported::Topup(topup) => {
                    self.topups.push(topup.id);
                    self.payers.push(topup.payer);
                }
                Imported::Refund(refund) => {
                    self.refunds.push(refund.id);
                    self.payments.push(refund.payment);
                }
                Imported::Entry { payer, entry } => {
                    self.payers.push(*payer);
                    match entry.object {
                        EntryObject::Topup(id) => self.topups.push(id),
                        EntryObject::Payment(id) => self.add_payment_read(id),
                        EntryObject::Refund(id) => self.refunds.push(id),
                    }
                }
                Imported::Idempotency(row) => self.idempotency_keys.push(row.key.clone()),
                Imported::Row(row) => {
                    self.rows.push((row.tag, row.id));
                    // A hold names its payment and its pending transfer.
                    if let Some(Ok(hold)) = row.decode::<HoldKind>() {
                        self.payments.push(hold.payment);
                        self.held_transfers.push(hold.hold.transfers[0]);
                    }
                }
            }
        }
    }
}

/// A payment whose refund totals changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PaymentRefunded {
    pub id: PaymentId,
    /// The payment's totals after the change.
    pub amount_refunded: Amount,
    pub fee_refunded: Amount,
}

/// What applying records to a tracking state did since the last
/// [`State::take_changes`](crate::State::take_changes): new rows, and the final values of
/// rows that changed.
///
/// To write it to storage that held the working set's objects before: set or delete each key
/// hash listed in `keys`, insert the new parties and accounts, update the totals of the
/// changed accounts, insert top-ups, payments, refunds, statement entries and transfer
/// records, update the refunded payments, delete the idempotency records made before each
/// prune's time, and only then insert the new idempotency records (a key pruned and used
/// again in one batch is new).
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Changes {
    /// The operator's key hash, when it was set (the last one set).
    pub operator_key: Option<KeyHash>,
    /// Every key hash whose principal changed, with its principal now (`None`: the hash no
    /// longer maps, as the operator's previous key), by hash. A new party's key is here.
    pub keys: Vec<(KeyHash, Option<Principal>)>,
    /// New merchants, in the order made.
    pub merchants: Vec<Merchant>,
    /// New payers, in the order made.
    pub payers: Vec<Payer>,
    /// New accounts, with their owner and their totals now, in the order made.
    pub accounts_created: Vec<(Owner, Account)>,
    /// Accounts held before whose totals changed, with their totals now, by id.
    pub account_totals: Vec<Account>,
    /// New top-ups, in the order made.
    pub topups: Vec<Topup>,
    /// New payments as they are now (refunds included), in the order made.
    pub payments: Vec<Payment>,
    /// Payments held before whose refund totals changed, with the totals now, by id.
    pub payments_refunded: Vec<PaymentRefunded>,
    /// New refunds, in the order made.
    pub refunds: Vec<Refund>,
    /// New statement entries, each with its payer: by payer, then in the order made.
    pub entries: Vec<(PayerId, Entry)>,
    /// New ledger transfer records, failures included (so that their ids stay failed), in the
    /// order made.
    pub transfers: Vec<TransferRecord>,
    /// Transfer records held before whose hold state changed (posted, voided, expired), as
    /// they are now, by id.
    pub transfers_resolved: Vec<TransferRecord>,
    /// State rows of registered kinds made or changed, as they are now: by kind (in
    /// [`crate::kinds::KINDS`] order), then by id.
    pub rows: Vec<StoredRow>,
    /// New idempotency records still held, in the order made.
    pub idempotency: Vec<IdempotencyRow>,
    /// The time of each prune, in order.
    pub prunes: Vec<Timestamp>,
}

impl Changes {
    /// Whether applying changed nothing.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Why a loaded object was not put into a working set.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LoadError {
    /// The working set already holds an object with this id or key.
    AlreadyLoaded,
    /// An id the ledger cannot hold (zero), or an account id held under another owner.
    BadId,
}
