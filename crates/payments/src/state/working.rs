//! Working sets: what a record reads, loading objects into a state that holds only those, and
//! the changes applying made (ADR 0002).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use farthing_kernel::Slot;
use farthing_ledger::{Account, AccountId, Currency, TransferId, TransferRecord};

use super::{Owned, State, Tracker, account_id};
use crate::disk::PartyLists;
use crate::history::{PaymentRow, RefundRow, Refunded, TopupRow};
use crate::ids::{PayerId, PaymentId};
use crate::model::*;
use crate::rooms::RoomBatches;
use crate::working_set::*;

/// Working sets: what a record reads, loading objects into a state that holds only those, and
/// the changes applying made (ADR 0002). A whole state (the embedded store's) never tracks
/// changes, and none of this runs on its path.
impl State {
    /// What applying `record` reads; see [`Needs`].
    ///
    /// A refund names only its payment; the payment names its payer, its merchant and its
    /// currency, hence the accounts. So `self` answers for the payments it holds: a loader asks
    /// a working set, loads what is listed, and asks again while the answer is
    /// [`Needs::incomplete`] and lists something new (two rounds at most). Asked of a whole
    /// state, the answer is complete at once.
    pub fn needs(&self, record: &Record) -> Needs {
        self.needs_of(record.idempotency.as_ref(), &record.command)
    }

    /// [`State::needs`] of a command with its idempotency claim, before they are a record.
    pub fn needs_of(&self, claim: Option<&IdempotencyClaim>, command: &Command) -> Needs {
        let mut needs = self.needs_unsorted(claim, command);
        needs.normalize();
        needs
    }

    /// [`State::needs_of`] with lists neither sorted nor free of repeats: what a cache loads
    /// from is found by lookups, so it spares the sort.
    pub fn needs_unsorted(&self, claim: Option<&IdempotencyClaim>, command: &Command) -> Needs {
        self.needs_after(claim, command, &mut RoomBatches::default())
    }

    /// What applying these commands (with their idempotency claims) one after another reads:
    /// [`State::needs_unsorted`] of each, except that a room's command reads what earlier
    /// ones of the batch leave for it (an expiry after others reads the due holds those may
    /// release before its own), as a batch applied to what was loaded must find them. Lists
    /// neither sorted nor free of repeats.
    pub fn needs_of_batch<'a>(
        &self,
        commands: impl IntoIterator<Item = (Option<&'a IdempotencyClaim>, &'a Command)>,
    ) -> Needs {
        let mut needs = Needs::default();
        let mut batch = RoomBatches::default();
        for (claim, command) in commands {
            needs.append(self.needs_after(claim, command, &mut batch));
        }
        needs
    }

    /// [`State::needs_unsorted`] of a command that follows what `batch` says of its batch.
    fn needs_after(
        &self,
        claim: Option<&IdempotencyClaim>,
        command: &Command,
        batch: &mut RoomBatches,
    ) -> Needs {
        let mut needs = Needs::default();
        if let Some(claim) = claim {
            needs.idempotency_keys.push(claim.key.clone());
        }
        match command {
            Command::SetOperatorKey { key_hash } => {
                needs.operator_key = true;
                needs.key_hashes.push(*key_hash);
            }
            Command::CreateMerchant { id, key_hash, .. } => {
                needs.merchants.push(*id);
                needs.key_hashes.push(*key_hash);
            }
            Command::CreatePayer { id, key_hash, .. } => {
                needs.payers.push(*id);
                needs.key_hashes.push(*key_hash);
            }
            Command::Topup {
                id,
                payer,
                currency,
                transfer_id,
                ..
            } => {
                needs.payers.push(*payer);
                needs.topups.push(*id);
                needs.accounts.extend([
                    (Owner::ExternalFunding, *currency),
                    (Owner::Payer(*payer), *currency),
                ]);
                needs.transfers.push(*transfer_id);
            }
            Command::Pay(pay) => needs.add_pay(pay),
            Command::PayBatch(items) => {
                for pay in items {
                    needs.add_pay(pay);
                }
            }
            Command::Refund {
                id,
                payment,
                transfer_ids,
                ..
            } => {
                needs.add_payment_existing(*payment);
                needs.refunds.push(*id);
                needs.transfers.extend(transfer_ids);
                match self.payment_held(*payment) {
                    Some(payment) => {
                        // The statement line goes to the payer; the money moves between the
                        // payment's three accounts.
                        needs.payers.push(payment.payer);
                        needs.add_payment_accounts(
                            payment.payer,
                            payment.merchant,
                            payment.currency,
                        );
                    }
                    None => needs.incomplete = true,
                }
            }
            // A prune reads nothing: keys a working set holds are forgotten as in a whole
            // state, and the store forgets the rest by their age (`Changes::prunes`).
            Command::PruneIdempotencyKeys { .. } => {}
            Command::Import(items) => needs.add_import(items),
            Command::Room(command) => command.needs(self, batch, &mut needs),
        }
        needs
    }

    /// An empty state that tracks what applying records changes, to be filled with the loaded
    /// objects a batch needs (the `insert_*` methods) and then applied to.
    ///
    /// A working set answers queries only about what it holds, and its lists and statements
    /// hold only what was applied to it.
    pub fn new_working_set() -> State {
        let mut state = State::new();
        state.track_changes();
        state
    }

    /// Starts tracking changes from here on, if not already.
    pub fn track_changes(&mut self) {
        if self.tracker.is_none() {
            self.idempotency.track_changes();
            self.parties.track_changes();
            self.refunded.track_changes();
            self.ledger.track_hold_changes();
            for rows in self.kinds.all_mut() {
                rows.track_changes();
            }
            self.merchant_lists.track_changes();
            self.payer_lists.track_changes();
            self.tracker = Some(Box::new(Tracker {
                transfers_seen: self.ledger.transfer_records().len(),
                ..Tracker::default()
            }));
        }
    }

    /// Whether this state tracks its changes.
    pub fn is_tracking_changes(&self) -> bool {
        self.tracker.is_some()
    }

    /// What applying records changed since tracking began or the last call; empty for a state
    /// that does not track changes.
    pub fn take_changes(&mut self) -> Changes {
        let transfers_now = self.ledger.transfer_records().len();
        let Some(tracker) = &mut self.tracker else {
            return Changes::default();
        };
        let taken = std::mem::replace(
            &mut **tracker,
            Tracker {
                transfers_seen: transfers_now,
                ..Tracker::default()
            },
        );
        let account = |state: &State, id: AccountId| -> Account {
            *state.ledger.account(id).expect("a tracked account exists")
        };
        let mut created_ids = HashSet::new();
        let accounts_created = taken
            .accounts_created
            .iter()
            .map(|&(owner, currency)| {
                let id = account_id(owner, currency);
                created_ids.insert(id);
                (owner, account(self, id))
            })
            .collect();
        let transfers: Vec<TransferRecord> =
            self.ledger.transfer_records()[taken.transfers_seen..].to_vec();
        let new_transfers: HashSet<TransferId> =
            transfers.iter().map(|record| record.transfer.id).collect();
        let transfers_resolved: Vec<TransferRecord> = self
            .ledger
            .take_hold_changes()
            .into_iter()
            .filter(|record| !new_transfers.contains(&record.transfer.id))
            .collect();
        let applied = transfers.iter().filter(|record| {
            record.outcome.is_ok() && !taken.imported_transfers.contains(&record.transfer.id)
        });
        let changed: BTreeSet<AccountId> = net_changed(applied, &transfers_resolved)
            .into_iter()
            .chain(taken.accounts_moved.iter().copied())
            .filter(|id| !created_ids.contains(id))
            .collect();
        let account_totals = changed.into_iter().map(|id| account(self, id)).collect();

        let new_payment_ids: HashSet<PaymentId> = taken.payments.iter().copied().collect();
        let mut payments_refunded: Vec<PaymentRefunded> = self
            .refunded
            .take_changes()
            .into_iter()
            .filter(|(id, _)| !new_payment_ids.contains(id))
            .filter_map(|(id, slot)| match slot {
                Slot::Present(refunded) => Some(PaymentRefunded {
                    id,
                    amount_refunded: refunded.amount_refunded,
                    fee_refunded: refunded.fee_refunded,
                }),
                Slot::Absent => None,
            })
            .collect();
        payments_refunded.sort_unstable_by_key(|refunded| refunded.id);
        let topups = taken
            .topups
            .iter()
            .map(|id| {
                self.topup_row(*id)
                    .expect("a new top-up is held")
                    .topup
                    .clone()
            })
            .collect();
        let refunds = taken
            .refunds
            .iter()
            .map(|id| {
                self.refund_row(*id)
                    .expect("a new refund is held")
                    .refund
                    .clone()
            })
            .collect();
        let payments = taken
            .payments
            .iter()
            .map(|id| self.payment_stored(*id).expect("a new payment is held"))
            .collect();
        let rows = self
            .kinds
            .all_mut()
            .flat_map(|rows| rows.take_changes())
            .map(|(row, _)| row)
            .collect();
        // By payer, each payer's in the order made.
        let mut entries: Vec<(PayerId, Entry)> = taken
            .lines
            .iter()
            .map(|object| {
                let (payer, entry, _) = self
                    .line_any(*object)
                    .expect("a working set reads memory alone")
                    .expect("a new line is held");
                (payer, entry)
            })
            .collect();
        entries.sort_by_key(|(payer, _)| *payer);

        let parties = self.parties.take_changes();
        let (idempotency, prunes) = self.idempotency.take_changes();

        Changes {
            operator_key: parties.operator_key,
            keys: parties.keys,
            merchants: parties.merchants,
            payers: parties.payers,
            accounts_created,
            account_totals,
            topups,
            payments,
            payments_refunded,
            refunds,
            entries,
            transfers,
            transfers_resolved,
            rows,
            idempotency,
            prunes,
        }
    }

    // Loading: each puts one stored object into a working set. Parties go in before their
    // accounts, so that their balances list them.

    /// Loads a key hash and whose it is. The operator's key is the operator key.
    pub fn insert_key(&mut self, key_hash: KeyHash, principal: Principal) -> Result<(), LoadError> {
        self.parties.load_key(key_hash, principal)
    }

    /// Loads a merchant, fee schedule included.
    pub fn insert_merchant(&mut self, merchant: Merchant) -> Result<(), LoadError> {
        self.insert_merchant_with_lists(Arc::new(merchant), PartyLists::default())
    }

    pub fn insert_payer(&mut self, payer: Payer) -> Result<(), LoadError> {
        self.insert_payer_with_lists(Arc::new(payer), PartyLists::default())
    }

    /// Loads a merchant with its lists (a working set's are empty: its lists are the
    /// store's).
    pub(crate) fn insert_merchant_with_lists(
        &mut self,
        merchant: Arc<Merchant>,
        lists: PartyLists,
    ) -> Result<(), LoadError> {
        let id = merchant.id;
        self.parties.load_merchant(merchant)?;
        let loaded = self.merchant_lists.load(id, Slot::Present(lists));
        assert!(loaded, "a merchant's lists go with the merchant");
        Ok(())
    }

    pub(crate) fn insert_payer_with_lists(
        &mut self,
        payer: Arc<Payer>,
        lists: PartyLists,
    ) -> Result<(), LoadError> {
        let id = payer.id;
        self.parties.load_payer(payer)?;
        let loaded = self.payer_lists.load(id, Slot::Present(lists));
        assert!(loaded, "a payer's lists go with the payer");
        Ok(())
    }

    /// Loads `owner`'s account with its totals. Its id, kind and currency must be those
    /// `owner` and the account's currency give.
    pub fn insert_account(&mut self, owner: Owner, account: Account) -> Result<(), LoadError> {
        self.insert_account_unlisted(owner, account)?;
        let (currency, id) = (account.currency, account.id);
        self.list_account_loaded(owner, currency, id);
        Ok(())
    }

    /// Loads an account without adding it to its owner's lists (a cache loads the lists with
    /// the owner).
    pub(crate) fn insert_account_unlisted(
        &mut self,
        owner: Owner,
        account: Account,
    ) -> Result<(), LoadError> {
        if account.id != account_id(owner, account.currency) || account.kind != owner.account_kind()
        {
            return Err(LoadError::BadId);
        }
        if self.owners.contains_key(&account.id) || self.ledger.account(account.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        self.ledger
            .insert_account(account)
            .map_err(|_| LoadError::BadId)?;
        self.owners
            .insert(account.id, Owned::new(owner, self.round()));
        Ok(())
    }

    /// Adds a loaded account to its owner's list without making the list a change.
    fn list_account_loaded(&mut self, owner: Owner, currency: Currency, id: AccountId) {
        let lists = match owner {
            Owner::Payer(payer) => self.payer_lists.get(&payer),
            Owner::Merchant(merchant) => self.merchant_lists.get(&merchant),
            Owner::PlatformFees | Owner::ExternalFunding => None,
        };
        let Some(lists) = lists else {
            return;
        };
        let mut lists = lists.clone();
        lists.accounts.push((currency, id));
        match owner {
            Owner::Payer(payer) => self.payer_lists.reload(payer, lists),
            Owner::Merchant(merchant) => self.merchant_lists.reload(merchant, lists),
            Owner::PlatformFees | Owner::ExternalFunding => {}
        }
    }

    /// Loads a payment, refund totals included.
    pub fn insert_payment(&mut self, payment: Payment) -> Result<(), LoadError> {
        if self.payment_row(payment.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        let id = payment.id;
        // Its hold, if it has one, is a state row of its own (`insert_row`).
        let mut payment = payment;
        payment.hold = None;
        let refunded = Refunded {
            amount_refunded: payment.amount_refunded,
            fee_refunded: payment.fee_refunded,
        };
        // A loaded payment is in no list of the working set: its lists are the store's.
        self.loaded.push_payment(PaymentRow {
            payment,
            previous_of_payer: None,
            previous_of_merchant: None,
            previous: None,
            line: None,
        });
        if !refunded.amount_refunded.is_zero() {
            let loaded = self.refunded.load(id, Slot::Present(refunded));
            assert!(loaded, "the payment was not held");
        }
        Ok(())
    }

    pub fn insert_topup(&mut self, topup: Topup) -> Result<(), LoadError> {
        if self.topup_row(topup.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        self.loaded
            .topups
            .insert(topup.id, TopupRow { topup, line: None });
        Ok(())
    }

    pub fn insert_refund(&mut self, refund: Refund) -> Result<(), LoadError> {
        if self.refund_row(refund.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        self.loaded
            .refunds
            .insert(refund.id, RefundRow { refund, line: None });
        Ok(())
    }

    /// Loads a state row of a registered kind, or (`None`) that there is none under `id`.
    pub fn insert_row(&mut self, tag: u8, id: u128, bytes: Option<&[u8]>) -> Result<(), LoadError> {
        let rows = self.kinds.tag_mut(tag).ok_or(LoadError::BadId)?;
        match rows.load_stored(id, bytes) {
            Ok(true) => Ok(()),
            Ok(false) => Err(LoadError::AlreadyLoaded),
            Err(_) => Err(LoadError::BadId),
        }
    }

    /// Whether memory knows the row of kind `tag` under `id`, or that there is none.
    pub fn knows_row(&self, tag: u8, id: u128) -> bool {
        self.kinds.tag(tag).is_some_and(|rows| rows.knows(id))
    }

    /// Loads a ledger transfer record, failed ones included.
    pub fn insert_transfer_record(&mut self, record: TransferRecord) -> Result<(), LoadError> {
        if self.ledger.transfer(record.transfer.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        self.ledger
            .insert_transfer_record(record)
            .map_err(|_| LoadError::BadId)
    }

    /// Loads an idempotency key's stored answer. Records may come in any order: pruning goes
    /// by the time each was made.
    pub fn insert_idempotency_record(&mut self, row: IdempotencyRow) -> Result<(), LoadError> {
        if self.idempotency.load(row) {
            Ok(())
        } else {
            Err(LoadError::AlreadyLoaded)
        }
    }

    // Reading objects out, to copy them into a working set.

    /// The operator's key hash, if one is set.
    pub fn operator_key(&self) -> Option<KeyHash> {
        self.parties.operator_key()
    }

    /// `owner`'s account in `currency`, with its totals, if it has one.
    pub fn account_of(&self, owner: Owner, currency: Currency) -> Option<Account> {
        let id = self.account_of_owner(owner, currency)?;
        self.ledger.account(id).copied()
    }

    /// The ledger's record of a transfer id.
    pub fn transfer_record(&self, id: TransferId) -> Option<TransferRecord> {
        self.ledger.transfer(id).copied()
    }

    /// An idempotency key's stored answer, if the key is held.
    pub fn idempotency_record(&self, key: &IdempotencyKey) -> Option<IdempotencyRow> {
        self.idempotency.row(key)
    }
}

/// The accounts whose totals these transfers changed: `applied`, the records made and applied
/// (a failed one is recorded and moves nothing, and an imported one moved its money before,
/// so neither is among them), and `resolved`, holds made before whose state changed since.
///
/// Posted totals only grow, so a post changes both its accounts. Pending totals go up when a
/// hold is placed and back down when it is posted, voided or expires: a hold placed and
/// released in the same changes leaves them as they were, and an account that saw nothing
/// else is unchanged.
fn net_changed<'a>(
    applied: impl Iterator<Item = &'a TransferRecord>,
    resolved: &[TransferRecord],
) -> BTreeSet<AccountId> {
    use farthing_ledger::{HoldState, TransferKind};
    let mut posted: BTreeSet<AccountId> = BTreeSet::new();
    // Each account's pending debits and credits, as they moved.
    let mut pending: std::collections::BTreeMap<AccountId, [i128; 2]> =
        std::collections::BTreeMap::new();
    let mut hold = |record: &TransferRecord, sign: i128| {
        let amount = sign * i128::from(record.transfer.amount.micros());
        pending.entry(record.transfer.debit).or_default()[0] += amount;
        pending.entry(record.transfer.credit).or_default()[1] += amount;
    };
    for record in applied {
        match record.transfer.kind {
            TransferKind::Posted | TransferKind::PostPending { .. } => {
                posted.extend([record.transfer.debit, record.transfer.credit]);
            }
            // Placed now: still held, or already released (its post, if any, is listed).
            TransferKind::Pending { .. } if record.hold == Some(HoldState::Pending) => {
                hold(record, 1);
            }
            TransferKind::Pending { .. } | TransferKind::VoidPending { .. } => {}
        }
    }
    // Placed before, released now.
    for record in resolved {
        if record.hold != Some(HoldState::Pending) {
            hold(record, -1);
        }
    }
    pending
        .into_iter()
        .filter(|(_, delta)| *delta != [0, 0])
        .map(|(id, _)| id)
        .chain(posted)
        .collect()
}
